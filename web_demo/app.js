// The wavecast demo page: connect, pick a model, generate, listen while it
// generates. Protocol: protocol/PROTOCOL.md; messages via ./protocol.js.
import { STREAM_PATH, encodeMessage, decodeMessage, pcmToFloat32 } from "./protocol.js";
import { encodeWav } from "./wav.js";

const $ = (sel, root = document) => root.querySelector(sel);
const JITTER_SECONDS = 0.15; // audio buffered before playback starts or resumes

// State visible to the end-to-end tests (tests/browser) and to curious users.
const state = {
  connected: false,
  hello: null,
  cards: new Map(), // id -> Card
};
window.wavecast = state;

// -- connection (§1) --------------------------------------------------------------

class Connection {
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

// -- audio ------------------------------------------------------------------------

const contexts = new Map(); // sample rate -> Promise<AudioContext> with the worklet loaded

function audioContext(sampleRate) {
  if (!contexts.has(sampleRate)) {
    contexts.set(sampleRate, (async () => {
      const ctx = new AudioContext({ sampleRate, latencyHint: "interactive" });
      await ctx.audioWorklet.addModule("worklet.js");
      return ctx;
    })());
  }
  return contexts.get(sampleRate);
}

// -- a generation -----------------------------------------------------------------

let counter = 0;

class Card {
  constructor(id, model, prompt, params) {
    this.id = id;
    this.model = model;
    this.prompt = prompt;
    this.speech = (model.capabilities || []).includes("tts");
    // Speech has no set length: a guess from the text (about 14 characters a
    // second) that the waveform rescales past.
    this.duration = this.speech
      ? Math.min(model.max_duration, Math.max(2, Math.ceil(prompt.length / 14)))
      : params.duration ?? paramDefault(model, "duration") ?? 10;
    this.params = params;
    this.status = "queued";
    this.frames = 0; // received
    this.consumed = 0; // played by the worklet
    this.chunks = [];
    this.sampleRate = model.sample_rate;
    this.channels = model.channels;
    this.sentAt = performance.now();
    this.firstAudioAt = null;
    this.node = null;
    this.pending = []; // chunks that arrived before the worklet was ready
    this.renditions = {}; // name -> Float32Array chunks
    this.ended = false;
    this.peakX = 0;

    const el = $("#card-template").content.firstElementChild.cloneNode(true);
    this.el = el;
    $(".title", el).textContent = prompt || "(no prompt)";
    const note = model.test_model ? " · test model (random weights: noise)" : "";
    const length = this.speech ? (params.voice ? `voice ${params.voice}` : "speech") : `${this.duration} s`;
    $(".meta", el).textContent = `${model.name}${note} · ${length} · ${this.sampleRate} Hz · ${this.channels === 2 ? "stereo" : "mono"}`;
    $(".cancel", el).addEventListener("click", () => this.cancel());
    this.canvas = $(".wave", el);
    this.ctx2d = this.canvas.getContext("2d");
    $("#cards").prepend(el);
    this.timer = setInterval(() => this.tick(), 100);
  }

  setStatus(status, text = status) {
    this.status = status;
    const badge = $(".status", this.el);
    badge.textContent = text;
    badge.dataset.status = status;
    this.el.dataset.status = status;
  }

  async onStarted(message) {
    this.sampleRate = message.sample_rate;
    this.channels = message.channels;
    this.seed = message.seed;
    this.setStatus("generating");
    if (message.seed !== undefined) {
      $(".meta", this.el).textContent += ` · seed ${message.seed}`;
    }
    try {
      const ctx = await audioContext(this.sampleRate);
      if (ctx.state === "suspended") await ctx.resume();
      if (this.status === "cancelled" || this.status === "error") return;
      const node = new AudioWorkletNode(ctx, "wavecast-stream-player", {
        numberOfInputs: 0,
        outputChannelCount: [this.channels],
        processorOptions: {
          channels: this.channels,
          // Speech: room for the longest request the server allows.
          capacityFrames: Math.ceil(((this.speech ? this.model.max_duration : this.duration) + 1) * this.sampleRate),
          startFrames: Math.round(JITTER_SECONDS * this.sampleRate),
        },
      });
      node.port.onmessage = (event) => this.onPlayer(event.data);
      node.connect(ctx.destination);
      this.node = node;
      for (const samples of this.pending) this.feed(samples);
      this.pending = [];
      if (this.ended) node.port.postMessage({ kind: "end" });
    } catch (err) {
      console.error("audio output unavailable", err);
      this.showError("audio", "live playback is unavailable in this browser: " + err.message);
    }
  }

  feed(samples) {
    this.node.port.postMessage({ kind: "chunk", samples }, [samples.buffer]);
  }

  onAudio(message) {
    if (message.rendition) {
      // A complete second version (Multi-Band Diffusion), offered once it is whole.
      (this.renditions[message.rendition] ??= []).push(pcmToFloat32(message));
      return;
    }
    if (this.firstAudioAt === null) this.firstAudioAt = performance.now();
    const samples = pcmToFloat32(message);
    this.chunks.push(samples);
    this.frames += samples.length / this.channels;
    this.draw(samples);
    const copy = samples.slice();
    if (this.node) this.feed(copy);
    else this.pending.push(copy);
  }

  onProgress(message) {
    if (message.stage === "mbd") {
      this.setStatus("generating", `rendering MBD ${Math.round(message.fraction * 100)}%`);
      return;
    }
    const pct = Math.round(message.fraction * 100);
    const progress = $(".progress", this.el);
    progress.setAttribute("aria-valuenow", String(pct));
    $(".bar", progress).style.width = `${pct}%`;
    $(".s-generated", this.el).textContent = `${message.seconds.toFixed(2)} s`;
  }

  onPlayer(msg) {
    if (msg.consumed !== undefined) this.consumed = msg.consumed;
    if (msg.kind === "state" && this.status === "generating" && msg.state === "buffering") {
      this.setStatus("generating", "buffering…");
    } else if (msg.kind === "state" && msg.state === "playing" && this.status === "generating") {
      this.setStatus("generating", "playing live");
    }
    const played = this.consumed / this.sampleRate;
    $(".s-played", this.el).textContent = `${played.toFixed(2)} s`;
    $(".played", this.el).style.width = `${Math.min(100, (played / this.duration) * 100)}%`;
  }

  onDone(message) {
    clearInterval(this.timer);
    this.tick();
    this.ended = true;
    $(".cancel", this.el).hidden = true;
    const stats = message.stats;
    if (stats) {
      $(".s-elapsed", this.el).textContent = `${stats.wall_seconds.toFixed(1)} s`;
      if (stats.first_audio_seconds !== undefined) {
        $(".s-first", this.el).textContent = `${Math.round(stats.first_audio_seconds * 1000)} ms`;
      }
      $(".s-rtf", this.el).textContent = `×${stats.real_time_factor.toFixed(2)} real time`;
      this.serverSamples = stats.samples;
    }
    if (message.status === "completed") {
      this.setStatus("completed");
      if (this.node) this.node.port.postMessage({ kind: "end" });
      this.finishClip();
    } else if (message.status === "cancelled") {
      this.setStatus("cancelled");
      this.stopPlayback();
    } else {
      this.setStatus("error");
      this.stopPlayback();
      const err = message.error || { code: "error", message: "failed" };
      this.showError(err.code, err.message);
    }
  }

  finishClip() {
    const join = (chunks) => {
      const all = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
      let at = 0;
      for (const c of chunks) { all.set(c, at); at += c.length; }
      return all;
    };
    const all = join(this.chunks);
    this.clip = all;
    if (this.speech && this.frames > 0) {
      // Now that the length is known, fit the waveform to it.
      this.duration = this.frames / this.sampleRate;
      this.redraw();
    }
    if (this.renditions.mbd) {
      const mbd = join(this.renditions.mbd);
      this.mbdFrames = mbd.length / this.channels;
      const url = URL.createObjectURL(encodeWav(mbd, this.sampleRate, this.channels));
      const box = document.createElement("div");
      box.className = "rendition";
      box.innerHTML = '<span class="badge">Multi-Band Diffusion</span>';
      const player = document.createElement("audio");
      player.controls = true;
      player.src = url;
      player.className = "clip-mbd";
      player.addEventListener("play", () => this.stopPlayback());
      const link = document.createElement("a");
      link.href = url;
      link.download = `wavecast-${this.id}-mbd.wav`;
      link.className = "download-mbd";
      link.textContent = "Download MBD WAV";
      box.append(player, link);
      $(".card-actions", this.el).after(box);
    }
    const blob = encodeWav(all, this.sampleRate, this.channels);
    const url = URL.createObjectURL(blob);
    const audio = $(".clip", this.el);
    audio.src = url;
    audio.hidden = false;
    // The finished clip replaces the live stream when the user presses play.
    audio.addEventListener("play", () => this.stopPlayback());
    const link = $(".download", this.el);
    link.href = url;
    link.download = `wavecast-${this.id}.wav`;
    link.hidden = false;
  }

  stopPlayback() {
    if (this.node) {
      this.node.port.postMessage({ kind: "stop" });
      this.node.disconnect();
      this.node = null;
    }
    this.pending = [];
  }

  cancel() {
    this.stopPlayback();
    this.setStatus("cancelling", "cancelling…");
    connection.send({ type: "cancel", id: this.id });
  }

  showError(code, text) {
    const p = $(".error", this.el);
    p.hidden = false;
    p.textContent = code === "busy"
      ? "The server is busy (its queue is full). Try again in a moment."
      : `${code}: ${text}`;
    this.errorCode = code;
  }

  tick() {
    const elapsed = (performance.now() - this.sentAt) / 1000;
    $(".s-elapsed", this.el).textContent = `${elapsed.toFixed(1)} s`;
    if (this.firstAudioAt !== null && $(".s-first", this.el).textContent === "–") {
      $(".s-first", this.el).textContent = `${Math.round(this.firstAudioAt - this.sentAt)} ms`;
    }
  }

  redraw() {
    // The waveform again from every chunk, after the time scale changed.
    this.cols = null;
    const chunks = this.chunks;
    const total = this.frames;
    this.chunks = [];
    this.frames = 0;
    for (const c of chunks) {
      this.chunks.push(c);
      this.frames += c.length / this.channels;
      this.draw(c);
    }
    this.frames = total;
  }

  draw(samples) {
    // One min/max column per pixel over the whole clip, filled as chunks arrive
    // and redrawn with automatic gain (quiet clips stay visible).
    const { width, height } = this.canvas;
    if (this.frames > this.duration * this.sampleRate) {
      // Longer than guessed (speech): double the time scale and redraw it all.
      while (this.frames > this.duration * this.sampleRate) this.duration *= 2;
      this.redraw();
      return;
    }
    if (!this.cols) {
      this.cols = { lo: new Float32Array(width).fill(1), hi: new Float32Array(width).fill(-1) };
      this.peak = 1e-4;
    }
    const perPixel = (this.duration * this.sampleRate) / width;
    const frames = samples.length / this.channels;
    const start = this.frames - frames;
    for (let f = 0; f < frames; f++) {
      const x = Math.min(width - 1, Math.floor((start + f) / perPixel));
      const v = samples[f * this.channels];
      if (v < this.cols.lo[x]) this.cols.lo[x] = v;
      if (v > this.cols.hi[x]) this.cols.hi[x] = v;
      const a = Math.abs(v);
      if (a > this.peak) this.peak = a;
    }
    const ctx = this.ctx2d;
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = getComputedStyle(this.el).getPropertyValue("--wave") || "#7cf";
    const gain = 0.95 / this.peak;
    for (let x = 0; x < width; x++) {
      const hi = this.cols.hi[x], lo = this.cols.lo[x];
      if (hi < lo) continue;
      const y0 = ((1 - hi * gain) / 2) * height;
      const y1 = ((1 - lo * gain) / 2) * height;
      ctx.fillRect(x, y0, 1, Math.max(1, y1 - y0));
    }
  }
}

function paramDefault(model, name) {
  const spec = (model.params || []).find((p) => p.name === name);
  return spec ? spec.default : undefined;
}

// -- the form ---------------------------------------------------------------------

function renderModels(models) {
  const select = $("#model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = model.test_model ? `${model.name} — TEST MODEL (noise)` : model.name;
    select.append(option);
  }
  if (models.some((m) => m.name === previous)) select.value = previous;
  renderParams();
}

function currentModel() {
  return state.hello?.models.find((m) => m.name === $("#model").value);
}

// -- uploads (melody, continuation: PROTOCOL.md §3.3) ------------------------------

const uploads = {}; // role -> { bytes, label }

for (const box of document.querySelectorAll("fieldset.upload")) {
  const role = box.dataset.role;
  const note = $(".hint", box);
  const clear = $(".clear", box);
  const fileInput = $("input[type=file]", box);
  const record = $(".record", box);
  const set = (bytes, label) => {
    if (bytes === null) delete uploads[role];
    else uploads[role] = { bytes, label };
    clear.hidden = bytes === null;
    note.textContent = bytes === null
      ? note.dataset.empty
      : `Using ${label} (${Math.round(bytes.length / 1024)} KiB).`;
  };
  fileInput.addEventListener("change", async () => {
    const file = fileInput.files[0];
    if (!file) return set(null, "");
    const limit = state.hello?.limits.max_upload_bytes || Infinity;
    if (file.size > limit) {
      fileInput.value = "";
      $("#form-error").textContent = `That file is larger than the server accepts (${limit} bytes).`;
      return set(null, "");
    }
    set(new Uint8Array(await file.arrayBuffer()), file.name);
  });
  clear.addEventListener("click", () => {
    fileInput.value = "";
    set(null, "");
  });
  let recorder = null;
  record.addEventListener("click", async () => {
    if (recorder) {
      recorder.stop();
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const parts = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => parts.push(e.data);
      recorder.onstop = async () => {
        stream.getTracks().forEach((t) => t.stop());
        const blob = new Blob(parts, { type: recorder.mimeType });
        recorder = null;
        record.textContent = "● Record";
        record.setAttribute("aria-pressed", "false");
        set(new Uint8Array(await blob.arrayBuffer()), "your recording");
      };
      recorder.start();
      record.textContent = "■ Stop";
      record.setAttribute("aria-pressed", "true");
    } catch (err) {
      $("#form-error").textContent = `Microphone unavailable: ${err.message}`;
    }
  });
}

function renderParams() {
  const model = currentModel();
  const box = $("#params");
  box.querySelectorAll(".param").forEach((n) => n.remove());
  const note = $("#model-note");
  if (!model) return;
  for (const box of document.querySelectorAll("fieldset.upload")) {
    box.hidden = !(model.capabilities || []).includes(box.dataset.capability || box.dataset.role);
  }
  const speech = (model.capabilities || []).includes("tts");
  $("#dialogue").hidden = !(model.capabilities || []).includes("dialogue");
  $("#prompt-label").textContent = speech ? "Text to speak" : "Describe the music";
  $("#prompt").placeholder = speech
    ? "Hello! This is wavecast, speaking while it thinks."
    : "warm lofi hip hop with soft keys and vinyl crackle";
  note.hidden = !model.test_model;
  note.textContent = model.test_model
    ? "This is a test model with random weights: it makes noise, by design."
    : model.description;
  for (const spec of model.params || []) {
    const id = `param-${spec.name}`;
    const wrap = document.createElement("div");
    wrap.className = "param";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = spec.name.replaceAll("_", " ");
    label.title = spec.description || "";
    let input;
    if (spec.name === "voice" && model.voices) {
      // One picker per speaker; params.voice joins them (SPEAKER0,SPEAKER1).
      label.htmlFor = `${id}-0`;
      label.textContent = "voices";
      const pickers = document.createElement("span");
      pickers.className = "voices";
      for (const speaker of [0, 1]) {
        const select = document.createElement("select");
        select.id = `${id}-${speaker}`;
        select.name = "voice";
        select.dataset.kind = "voice";
        select.title = `SPEAKER${speaker}`;
        select.append(new Option(speaker === 0 ? "SPEAKER0: model picks" : "SPEAKER1: model picks", ""));
        for (const name of model.voices) select.append(new Option(`SPEAKER${speaker}: ${name}`, name));
        pickers.append(select);
      }
      const hint = document.createElement("small");
      hint.textContent = model.voices.length ? "" : "no named voices on this server";
      wrap.append(label, pickers, hint);
      box.append(wrap);
      continue;
    }
    if (spec.kind === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(spec.default);
    } else if (spec.choices) {
      input = document.createElement("select");
      for (const c of spec.choices) input.append(new Option(c, c));
      if (spec.default != null) input.value = spec.default;
    } else {
      input = document.createElement("input");
      input.type = spec.kind === "str" ? "text" : "number";
      if (spec.kind !== "str") {
        input.step = spec.kind === "int" ? "1" : "any";
        if (spec.min != null) input.min = String(spec.min);
        if (spec.max != null) input.max = String(spec.max);
        input.inputMode = spec.kind === "int" ? "numeric" : "decimal";
      }
      if (spec.default != null) input.value = String(spec.default);
      else input.placeholder = spec.name === "seed" ? "random" : "default";
      if (spec.name === "scene" && model.scenes) {
        // A named scene, or any description typed in.
        const list = document.createElement("datalist");
        list.id = `${id}-names`;
        for (const name of model.scenes) list.append(new Option(name, name));
        input.setAttribute("list", list.id);
        input.placeholder = "a scene name or a description";
        wrap.append(list);
      }
    }
    input.id = id;
    input.name = spec.name;
    input.dataset.kind = spec.kind;
    const hint = document.createElement("small");
    const ranged = spec.min != null && spec.max != null && spec.max < 1e9;
    hint.textContent = ranged ? `${spec.min} – ${spec.max}` : "";
    wrap.append(label, input, hint);
    box.append(wrap);
  }
}

function readParams() {
  const params = {};
  const voices = [...$("#params").querySelectorAll("select[data-kind=voice]")].map((s) => s.value);
  while (voices.length && !voices.at(-1)) voices.pop();
  if (voices.length) params.voice = voices.join(",");
  for (const input of $("#params").querySelectorAll("input, select")) {
    const kind = input.dataset.kind;
    if (kind === "voice") continue;
    if (kind === "bool") { params[input.name] = input.checked; continue; }
    if (input.value === "") continue;
    if (kind === "int" || kind === "float") {
      const value = Number(input.value);
      if (!Number.isFinite(value)) throw new Error(`${input.name} must be a number`);
      params[input.name] = value;
    } else {
      params[input.name] = input.value;
    }
  }
  return params;
}

function submit(event) {
  event?.preventDefault();
  const model = currentModel();
  const formError = $("#form-error");
  formError.textContent = "";
  if (!model || !state.connected) {
    formError.textContent = "Not connected to the server.";
    return;
  }
  let params;
  try {
    params = readParams();
  } catch (err) {
    formError.textContent = err.message;
    return;
  }
  // Audio output may only start after a user gesture: this click is one.
  audioContext(model.sample_rate).then((ctx) => ctx.resume()).catch(() => {});
  const id = `w${++counter}-${Math.random().toString(36).slice(2, 8)}`;
  const prompt = $("#prompt").value.trim();
  const card = new Card(id, model, prompt, params);
  state.cards.set(id, card);
  const message = { type: "generate", id, model: model.name, prompt, params, format: "pcm_f32le" };
  const inputs = {};
  for (const [role, item] of Object.entries(uploads)) {
    if (!$(`fieldset.upload[data-role=${role}]`).hidden) inputs[role] = item.bytes;
  }
  if (Object.keys(inputs).length) message.inputs = inputs;
  connection.send(message);
}

// -- wiring -----------------------------------------------------------------------

function onMessage(message) {
  if (message.type === "hello") {
    state.hello = message;
    renderModels(message.models);
    $("#generate").disabled = message.models.length === 0;
    return;
  }
  if (message.type === "error" && !(message.id && state.cards.has(message.id))) {
    $("#form-error").textContent = `${message.code}: ${message.message}`;
    return;
  }
  const card = state.cards.get(message.id);
  if (!card) return;
  switch (message.type) {
    case "queued":
      card.setStatus("queued", `queued #${message.position}`);
      break;
    case "started":
      card.onStarted(message);
      break;
    case "audio":
      card.onAudio(message);
      break;
    case "progress":
      card.onProgress(message);
      break;
    case "done":
      card.onDone(message);
      break;
    case "error":
      card.showError(message.code, message.message);
      break;
  }
}

function onConnState(status) {
  state.connected = status === "open";
  const conn = $("#conn");
  conn.dataset.state = status;
  $("#conn-text").textContent = {
    connecting: "connecting…",
    open: "connected",
    disconnected: "disconnected — reconnecting…",
  }[status];
  $("#generate").disabled = !state.connected;
  if (status === "disconnected") {
    for (const card of state.cards.values()) {
      if (!card.ended) {
        card.onDone({ status: "error", error: { code: "disconnected", message: "the connection to the server was lost" } });
      }
    }
  }
}

const connection = new Connection(onMessage, (s) => onConnState(s));
// "open" is only true once the greeting arrived.
const origOnMessage = connection.onMessage;
connection.onMessage = (m) => {
  if (m.type === "hello") onConnState("open");
  origOnMessage(m);
};

// -- the dialogue editor: lines of [SPEAKERn] text, written into the prompt --------

function syncDialogue() {
  const lines = [...document.querySelectorAll("#dialogue-lines .line")];
  $("#clear-lines").hidden = lines.length === 0;
  if (!lines.length) return;
  $("#prompt").value = lines
    .map((line) => [$(".speaker", line).value, $(".line-text", line).value.trim()])
    .filter(([, text]) => text)
    .map(([speaker, text]) => `[${speaker}] ${text}`)
    .join("\n");
}

function addLine(speaker, text = "") {
  const line = document.createElement("div");
  line.className = "line";
  const who = document.createElement("select");
  who.className = "speaker";
  who.setAttribute("aria-label", "speaker");
  for (const s of ["SPEAKER0", "SPEAKER1"]) who.append(new Option(s, s));
  who.value = speaker;
  const said = document.createElement("input");
  said.className = "line-text";
  said.type = "text";
  said.value = text;
  said.placeholder = "what this speaker says";
  said.setAttribute("aria-label", "line");
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary remove";
  remove.textContent = "×";
  remove.setAttribute("aria-label", "remove line");
  remove.addEventListener("click", () => { line.remove(); syncDialogue(); });
  who.addEventListener("change", syncDialogue);
  said.addEventListener("input", syncDialogue);
  line.append(who, said, remove);
  $("#dialogue-lines").append(line);
  syncDialogue();
  return said;
}

$("#add-line").addEventListener("click", () => {
  const last = [...document.querySelectorAll("#dialogue-lines .speaker")].at(-1);
  addLine(last?.value === "SPEAKER0" ? "SPEAKER1" : "SPEAKER0").focus();
});
$("#clear-lines").addEventListener("click", () => {
  $("#dialogue-lines").replaceChildren();
  syncDialogue();
});

$("#compose").addEventListener("submit", submit);
$("#model").addEventListener("change", renderParams);
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) submit(event);
});
