// The wavecast protocol for the browser (protocol/PROTOCOL.md). Mirrors
// wavecast.protocol: maps with a `type` tag, msgpack on binary frames, absent
// optional fields left out (§2.2). Checked against tests/protocol/golden.json.
import { encode, decode } from "./vendor/msgpack/index.mjs";

export const PROTOCOL_VERSION = 1;
export const STREAM_PATH = "/v1/stream";

const FIELD_ORDER = {
  generate: [
    "id", "model", "prompt", "params", "format", "inputs", "sample_rate", "bitrate", "resume",
    "codes", "resume_codes", "text_stream", "captions", "resume_until", "resume_flushes",
    "resume_waits",
  ],
  cancel: ["id"],
  text: ["id", "text", "flush", "end"],
};

/** Encode a client message (`generate`, `cancel` or `text`) into msgpack bytes. */
export function encodeMessage(message) {
  const order = FIELD_ORDER[message.type];
  if (!order) throw new Error(`cannot send a ${message.type} message`);
  const wire = { type: message.type };
  for (const key of order) {
    const value = message[key];
    if (value !== undefined && value !== null) wire[key] = value;
  }
  return encode(wire);
}

/** Decode a server frame (msgpack bytes or JSON text) into a plain message object. */
export function decodeMessage(frame) {
  let wire;
  if (typeof frame === "string") {
    wire = JSON.parse(frame);
    if (wire && wire.type === "audio" && typeof wire.data === "string") {
      wire.data = base64ToBytes(wire.data);
      if (typeof wire.codes === "string") wire.codes = base64ToBytes(wire.codes);
    }
    if (wire && wire.type === "generate" && wire.inputs) {
      for (const key of Object.keys(wire.inputs)) wire.inputs[key] = base64ToBytes(wire.inputs[key]);
    }
    if (wire && wire.type === "generate" && typeof wire.resume_codes === "string") {
      wire.resume_codes = base64ToBytes(wire.resume_codes);
    }
  } else {
    wire = decode(frame instanceof ArrayBuffer ? new Uint8Array(frame) : frame);
  }
  if (!wire || typeof wire !== "object" || Array.isArray(wire)) {
    throw new Error("a frame must hold a map");
  }
  if (typeof wire.type !== "string") throw new Error("frame without a type");
  return wire;
}

function base64ToBytes(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

/** Interleaved PCM bytes of an `audio` message -> Float32Array (§4.5). */
export function pcmToFloat32(message) {
  const data = message.data;
  if (message.format === "pcm_f32le") {
    const copy = data.slice().buffer; // aligned copy
    return new Float32Array(copy);
  }
  const samples = new Int16Array(data.slice().buffer);
  const out = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32767;
  return out;
}
