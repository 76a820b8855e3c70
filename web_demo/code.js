// A request as code: Python (wavecast.clients), the wavecast command, the JSON
// frame for any WebSocket client; and as a link that fills the form again.
import { STREAM_PATH } from "./protocol.js";
import { auth } from "./connection.js";

// With an API key, every snippet reads it from WAVECAST_API_KEY (never written in them).
const KEY_NOTE = "# this server needs an API key: export WAVECAST_API_KEY=...";

const FILES = { continuation: "clip.wav", melody: "melody.wav", reference: "voice.wav", reference_1: "voice1.wav" };

// The file a snippet writes: its name says the format (the client's and the command's rule).
const SUFFIXES = { opus: "opus", mp3: "mp3", flac: "flac" };
const outFile = (format) => `out.${SUFFIXES[format] || "wav"}`;

export function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${STREAM_PATH}`;
}

const py = (value) => {
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "string") return JSON.stringify(value);
  return String(value);
};

const sh = (value) => {
  const text = String(value);
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`;
};

export function asPython({ model, prompt, params, inputs, rate, format = null, bitrate = null }) {
  const args = [py(model), py(prompt)];
  for (const [name, value] of Object.entries(params)) args.push(`${name}=${py(value)}`);
  if (rate) args.push(`sample_rate=${rate}`);
  if (format) args.push(`format=${py(format)}`);
  if (bitrate) args.push(`bitrate=${bitrate}`);
  if (inputs.length) {
    const files = inputs.map((role) => `${py(role)}: open(${py(FILES[role] || `${role}.wav`)}, "rb").read()`);
    args.push(`inputs={${files.join(", ")}}`);
  }
  return [
    ...(auth.key ? [KEY_NOTE, "# (wavecast.clients.connect reads it)"] : []),
    "import asyncio",
    "",
    "from wavecast.clients import connect",
    "",
    "",
    "async def main() -> None:",
    `    async with connect(${py(streamUrl())}) as client:`,
    `        stream = await client.generate(${args.join(", ")})`,
    "        result = await stream.collect()",
    `        result.save(${py(outFile(format))})`,
    "",
    "",
    "asyncio.run(main())",
  ].join("\n");
}

export function asCli({ model, prompt, params, inputs, speech, rate, format = null, bitrate = null }) {
  const words = ["wavecast", speech ? "speak" : "generate", sh(prompt), "--url", sh(streamUrl()), "-o", outFile(format), "--model", sh(model)];
  if (rate) words.push("--sample-rate", String(rate));
  if (bitrate) words.push("--bitrate", String(Math.round(bitrate / 1000)));
  for (const [name, value] of Object.entries(params)) {
    if (name === "voice") {
      for (const voice of String(value).split(",")) words.push("--voice", sh(voice || "''"));
    } else if (name === "reference_text") {
      words.push("--ref-text", sh(value));
    } else if (name === "reference_1_text") {
      words.push("--ref1-text", sh(value));
    } else if (typeof value === "boolean") {
      if (value) words.push(`--${name.replaceAll("_", "-")}`);
    } else {
      words.push(`--${name.replaceAll("_", "-")}`, sh(value));
    }
  }
  const flags = { continuation: "--continue", melody: "--melody", reference: "--ref", reference_1: "--ref1" };
  for (const role of inputs) words.push(flags[role] || `--${role}`, FILES[role] || `${role}.wav`);
  return (auth.key ? `${KEY_NOTE}\n` : "") + words.join(" ");
}

export function asJson({ model, prompt, params, inputs, rate, format = null, bitrate = null }) {
  const frame = { type: "generate", id: "r1", model, prompt, params, format: format || "pcm_s16le" };
  if (rate) frame.sample_rate = rate;
  if (bitrate) frame.bitrate = bitrate;
  if (inputs.length) {
    frame.inputs = Object.fromEntries(inputs.map((role) => [role, `<base64 of ${FILES[role] || role}>`]));
  }
  const header = auth.key ? ` -H "Authorization: Bearer $WAVECAST_API_KEY"` : "";
  return `websocat${header} '${streamUrl()}?encoding=json'\n${JSON.stringify(frame)}`;
}

// The form's settings in a link (uploads stay on this computer).
export function settingsLink({ model, prompt, params, rate, format = null, bitrate = null }) {
  const query = new URLSearchParams({ model, prompt });
  if (rate) query.set("rate", String(rate));
  if (format) query.set("format", format);
  if (bitrate) query.set("bitrate", String(bitrate));
  for (const [name, value] of Object.entries(params)) query.set(`p.${name}`, String(value));
  return `${location.origin}${location.pathname}#${query}`;
}

export function readSettingsLink(hash) {
  if (!hash || hash.length < 2) return null;
  const query = new URLSearchParams(hash.slice(1));
  if (!query.has("model")) return null;
  const params = {};
  for (const [key, value] of query) if (key.startsWith("p.")) params[key.slice(2)] = value;
  const rate = Number(query.get("rate")) || null;
  const format = query.get("format") || null;
  const bitrate = Number(query.get("bitrate")) || null;
  return { model: query.get("model"), prompt: query.get("prompt") || "", params, rate, format, bitrate };
}
