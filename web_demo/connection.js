// The WebSocket to the server (PROTOCOL.md §1): msgpack frames both ways,
// reconnecting with backoff when the connection drops.
import { STREAM_PATH, encodeMessage, decodeMessage } from "./protocol.js";

export class Connection {
  constructor(onMessage, onState) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.retry = 0;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${STREAM_PATH}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.onState("connecting");
    ws.onopen = () => { this.retry = 0; };
    ws.onmessage = (event) => {
      let message;
      try {
        message = decodeMessage(event.data);
      } catch (err) {
        console.error("undecodable frame", err);
        return;
      }
      // "open" only once the greeting arrived: the models are known then.
      if (message.type === "hello") this.onState("open");
      this.onMessage(message);
    };
    ws.onclose = (event) => {
      this.onState("disconnected", event);
      const delay = Math.min(5000, 500 * 2 ** this.retry++);
      setTimeout(() => this.connect(), delay);
    };
  }

  send(message) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(encodeMessage(message));
    return true;
  }
}
