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
  // onMessage(message, ws), onState(status, event, ws): the socket new requests
  // go on; onLeft(ws, event): one left behind by renew() closed.
  constructor(onMessage, onState, onLeft = () => {}) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.onLeft = onLeft;
    this.ws = null;
    this.retry = 0;
    this.connect();
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // The server said it is shutting down: new requests go on a new connection (to
  // the server that answers there: another replica, or this one once it is
  // back), while those under way on this one finish on it.
  renew(from) {
    if (from !== this.ws || !this.open) return;
    this.ws = null; // (from now on, its close is onLeft's)
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
      if (message.type === "hello" && ws === this.ws) this.onState("open", null, ws);
      this.onMessage(message, ws);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) {
        this.onLeft(ws, event); // (one renew() left behind: the new one goes on)
        return;
      }
      this.onState("disconnected", event, ws);
      // (At most every 2 s: a server restarting is found soon after it listens.)
      const delay = Math.min(2000, 500 * 2 ** this.retry++);
      setTimeout(() => this.connect(), delay);
    };
  }

  // Send on `ws` (default: the connection new requests go on): the socket it
  // went on, or null where that one is not open.
  send(message, ws = this.ws) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return null;
    ws.send(encodeMessage(message));
    return ws;
  }
}
