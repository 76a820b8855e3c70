// The WebSocket to the server (PROTOCOL.md §1): msgpack frames both ways,
// reconnecting with backoff when the connection drops.
import { STREAM_PATH, encodeMessage, decodeMessage } from "./protocol.js";

// The server's API key, when it needs one: kept in this browser, sent as the
// `token` query parameter (a WebSocket cannot carry an Authorization header).
export const auth = {
  key: localStorage.getItem("wavecast-key") || "",
  set(key) {
    this.key = key;
    if (key) localStorage.setItem("wavecast-key", key);
    else localStorage.removeItem("wavecast-key");
  },
  // `url` with the key in it, for what cannot send headers (<audio>, WebSocket).
  url(url) {
    return this.key ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(this.key)}` : url;
  },
};

// Whether the server refuses us for want of a (right) key.
async function keyRefused() {
  try {
    const response = await fetch(auth.url("/v1/info"), { cache: "no-store" });
    return response.status === 401;
  } catch {
    return false; // unreachable: the socket will say so
  }
}

export class Connection {
  constructor(onMessage, onState) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.retry = 0;
    this.connect();
  }

  async connect() {
    this.onState("connecting");
    if (await keyRefused()) {
      this.onState("key"); // until a key is given (app.js calls connect again)
      return;
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(auth.url(`${scheme}//${location.host}${STREAM_PATH}`));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
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
