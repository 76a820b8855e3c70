// The request form: models and their parameters (from the greeting), uploads
// (file or microphone), the dialogue editor, errors next to their field.
import { CHARS_PER_SECOND } from "./card.js";
import { auth } from "./connection.js";
import { ENCODED, decodable, decodableFormats } from "./decode.js";

const $ = (sel, root = document) => root.querySelector(sel);

export const form = {
  hello: null,
  uploads: {}, // role -> { bytes, label }
};

// Output rates offered beside the model's own (PROTOCOL.md §3.1: 8 to 192 kHz).
const OUTPUT_RATES = [8000, 16000, 22050, 24000, 32000, 44100, 48000];

// A rate in words: "32 kHz", "44100 Hz".
const rateText = (rate) => (rate % 1000 === 0 ? `${rate / 1000} kHz` : `${rate} Hz`);

// The output rate asked for, or null for the model's own.
export function currentSampleRate() {
  const value = $("#output-rate").value;
  return value ? Number(value) : null;
}

function renderOutputRates(model) {
  const select = $("#output-rate");
  const previous = select.value;
  select.replaceChildren();
  const own = document.createElement("option");
  own.value = "";
  own.textContent = model ? `the model's own (${rateText(model.sample_rate)})` : "the model's own";
  select.append(own);
  for (const rate of OUTPUT_RATES) {
    if (rate === model?.sample_rate) continue;
    const option = document.createElement("option");
    option.value = String(rate);
    option.textContent = rateText(rate);
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

// -- the stream's format (PROTOCOL.md §4.5) ------------------------------------------

// The encoded format asked for, or null for PCM (what the page plays as it comes).
export function currentFormat() {
  return $("#stream-format").value || null;
}

// The bit rate asked for, bits a second, or null for the server's.
export function currentBitrate() {
  const box = $("#bitrate");
  if (box.closest("[hidden]") || box.value === "") return null;
  return Math.round(Number(box.value) * 1000);
}

// The server's bit rate for a lossy stream when none is asked for (§3.1; server.encode.bit_rate:
// a test checks they agree).
export function defaultBitrate(format, rate, channels) {
  if (format === "opus") return (rate > 16000 ? 64000 : 32000) * channels;
  const perChannel = rate >= 32000 ? 128000 : rate >= 16000 ? 64000 : 32000;
  return Math.min(320000, perChannel * channels);
}

export const OPUS_RATES = [8000, 12000, 16000, 24000, 48000]; // (protocol CODEC_RATES: a test checks)

// The rate a format's stream goes out at, from the model's: Opus takes 8, 12,
// 16, 24 or 48 kHz (the next one up); the others, the model's.
export function streamRate(format, rate) {
  if (format !== "opus") return rate;
  return OPUS_RATES.find((r) => r >= rate) ?? 48000;
}

// What a second of the stream weighs, in words.
export function formatHelp(format, model, rate, bitrate) {
  if (!decodable()) {
    return "Opus, MP3 and FLAC are decoded by the browser, which allows it on secure pages only (https, or this computer): here the page streams PCM.";
  }
  if (!model) return "";
  if (format === "opus" && rate && !OPUS_RATES.includes(rate)) {
    return "Opus takes 8, 12, 16, 24 or 48 kHz: choose one of those output rates, or the model's own.";
  }
  const channels = model.channels;
  const pcmRate = rate || model.sample_rate;
  const pcm = Math.round((pcmRate * channels * 32) / 1000); // (float samples, as this page asks)
  if (!format) return `${pcm} kbit/s, exactly as made (float samples)`;
  if (format === "flac") return `the 16-bit samples (${pcm / 2} kbit/s), losslessly compressed: a quarter to a half less`;
  const out = rate || streamRate(format, model.sample_rate);
  const kbps = Math.round((bitrate || defaultBitrate(format, out, channels)) / 1000);
  return `${kbps} kbit/s of audio${bitrate ? "" : " (the server's choice)"} against PCM's ${pcm}: for a slow connection; the card offers the ${ENCODED[format].label} file`;
}

export function renderFormat() {
  const format = currentFormat();
  $("#bitrate-box").hidden = !(format === "opus" || format === "mp3");
  $("#stream-format-help").textContent = formatHelp(format, currentModel(), currentSampleRate(), currentBitrate());
}

export function wireFormats() {
  const select = $("#stream-format");
  if (!decodable()) {
    for (const option of select.options) option.disabled = option.value !== "";
    select.value = "";
  } else {
    // A codec this browser lacks is not offered.
    decodableFormats().then((taken) => {
      for (const option of select.options) {
        if (option.value && !taken.includes(option.value)) {
          option.disabled = true;
          option.textContent += " (this browser cannot decode it)";
          if (select.value === option.value) select.value = "";
        }
      }
      renderFormat();
    });
  }
  select.addEventListener("change", renderFormat);
  $("#bitrate").addEventListener("input", renderFormat);
  $("#output-rate").addEventListener("change", renderFormat);
  renderFormat();
}

export function currentModel() {
  return form.hello?.models.find((m) => m.name === $("#model").value);
}

export function renderModels(models) {
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

// What the model is and where it runs, in one line: "MusicGen small (…) · 32 kHz
// mono · up to 30 s · cuda:0, float16" (device and format when the server says them).
export function modelFacts(model) {
  const rate = rateText(model.sample_rate);
  const parts = [
    model.test_model ? "" : model.description,
    `${rate} ${model.channels === 2 ? "stereo" : model.channels === 1 ? "mono" : `${model.channels} channels`}`,
    `up to ${model.max_duration} s`,
    [model.device, model.dtype].filter(Boolean).join(", "),
  ];
  return parts.filter(Boolean).join(" · ");
}

// -- errors next to their field ------------------------------------------------------

function fieldInput(field) {
  if (field === "prompt") return $("#prompt");
  const advanced = { sample_rate: "#output-rate", format: "#stream-format", bitrate: "#bitrate" };
  if (field in advanced) {
    $("#advanced").open = true;
    return $(advanced[field]);
  }
  if (field.startsWith("params.")) {
    const name = field.slice("params.".length);
    const input = $(`#param-${name}`) || $(`#param-${name}-0`);
    if (input?.closest("#advanced")) $("#advanced").open = true;
    return input;
  }
  if (field.startsWith("inputs.")) return $(`#${field.slice("inputs.".length)}`);
  return null;
}

export function clearFieldErrors() {
  for (const input of document.querySelectorAll("[aria-invalid=true]")) {
    input.removeAttribute("aria-invalid");
  }
  for (const note of document.querySelectorAll(".field-error")) note.remove();
  $("#form-error").textContent = "";
}

// Show an error at its field; false if the form has no such field.
export function showFieldError(field, message) {
  const input = field ? fieldInput(field) : null;
  if (!input) return false;
  input.setAttribute("aria-invalid", "true");
  const note = document.createElement("small");
  note.className = "field-error";
  note.id = `${input.id}-error`;
  note.setAttribute("role", "alert");
  note.textContent = message;
  input.setAttribute("aria-describedby", note.id);
  const box = input.closest(".param, fieldset.upload");
  if (box) box.append(note);
  else input.after(note);
  input.addEventListener("input", () => {
    input.removeAttribute("aria-invalid");
    note.remove();
  }, { once: true });
  if (typeof input.focus === "function") input.focus();
  return true;
}

// -- uploads (melody, continuation, reference voices: PROTOCOL.md §3.3) ---------------

const RECORD_NEEDS =
  "Recording needs a secure page (https, or this computer): choose a file instead.";

export function wireUploads() {
  for (const box of document.querySelectorAll("fieldset.upload")) {
    const role = box.dataset.role;
    const note = $(".hint", box);
    const clear = $(".clear", box);
    const fileInput = $("input[type=file]", box);
    const record = $(".record", box);
    const set = (bytes, label) => {
      if (bytes === null) delete form.uploads[role];
      else form.uploads[role] = { bytes, label };
      clear.hidden = bytes === null;
      note.textContent = bytes === null
        ? note.dataset.empty
        : `Using ${label} (${Math.round(bytes.length / 1024)} KiB).`;
      renderParams(true);
    };
    fileInput.addEventListener("change", async () => {
      const file = fileInput.files[0];
      if (!file) return set(null, "");
      const limit = form.hello?.limits.max_upload_bytes || Infinity;
      if (file.size > limit) {
        fileInput.value = "";
        showFieldError(`inputs.${role}`, `That file is larger than the server accepts (${limit} bytes).`);
        return set(null, "");
      }
      set(new Uint8Array(await file.arrayBuffer()), file.name);
    });
    clear.addEventListener("click", () => {
      fileInput.value = "";
      set(null, "");
    });
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      // Browsers lend the microphone to secure pages only.
      record.disabled = true;
      record.title = RECORD_NEEDS;
      note.dataset.empty = `${note.dataset.empty} ${RECORD_NEEDS}`;
      note.textContent = note.dataset.empty;
    }
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
}

// The uploads the current model takes.
export function currentInputs() {
  const inputs = {};
  for (const [role, item] of Object.entries(form.uploads)) {
    if (!$(`fieldset.upload[data-role=${role}]`).hidden) inputs[role] = item.bytes;
  }
  return inputs;
}

// -- parameters ----------------------------------------------------------------------

// Parameters that only mean something with an input: shown when it is given.
const NEEDS_INPUT = { include_prompt: "continuation" };
// Up front; the others (sampling, chunking) in the Advanced section.
const PRIMARY = new Set(["duration", "voice", "scene", "max_new_tokens", "mbd", "seed", "include_prompt"]);

// The voice picker's value for "the recording uploaded for this speaker" (voice
// names are letters, digits, _ . -: never this).
export const UPLOAD = ":upload";
// A speaker's transcript parameter, shown beside its recording.
const TRANSCRIPTS = { reference_text: 0, reference_1_text: 1 };

function paramInputs() {
  return document.querySelectorAll([
    "#params .param input", "#params .param select",
    "#advanced-params .param input", "#advanced-params .param select",
    "#speakers .param input", "#speakers .param select",
  ].join(", "));
}

export function renderParams(keepValues = false) {
  const model = currentModel();
  const kept = keepValues ? readParams({ lenient: true, raw: true }) : {};
  document.querySelectorAll("#params .param, #advanced-params .param, #speakers .param").forEach((n) => n.remove());
  const note = $("#model-note");
  if (!model) return;
  const caps = model.capabilities || [];
  for (const upload of document.querySelectorAll("fieldset.upload")) {
    upload.hidden = !caps.includes(upload.dataset.capability || upload.dataset.role);
  }
  const speech = caps.includes("tts");
  $("#as-typed-box").hidden = !caps.includes("text_stream");
  if (!caps.includes("text_stream")) $("#as-typed").checked = false;
  $("#prompt").required = !$("#as-typed").checked;
  $("#dialogue").hidden = !caps.includes("dialogue");
  $("#speakers").hidden = !(caps.includes("reference") || model.voices?.length);
  $("#prompt-label").textContent = speech ? "Text to speak" : "Describe the music";
  $("#prompt").placeholder = speech
    ? "Hello! This is wavecast, speaking while it thinks."
    : "warm lofi hip hop with soft keys and vinyl crackle";
  note.hidden = !model.test_model;
  note.textContent = "This is a test model with random weights: it makes noise, by design.";
  const facts = $("#model-facts");
  facts.textContent = modelFacts(model);
  facts.hidden = !facts.textContent;
  renderSpeakers(model, kept);
  renderChips(speech, caps.includes("dialogue"));
  for (const spec of model.params || []) {
    const needs = NEEDS_INPUT[spec.name];
    if (needs && !form.uploads[needs]) continue;
    if (spec.name === "voice") continue; // the speakers' pickers
    const speaker = TRANSCRIPTS[spec.name];
    const box = speaker !== undefined
      ? $(`#speakers .speaker[data-speaker="${speaker}"] .speaker-text`)
      : $(PRIMARY.has(spec.name) ? "#params" : "#advanced-params");
    box.append(paramField(model, spec, kept));
  }
  renderOutputRates(model);
  renderFormat();
  showSources();
  updateEstimate();
}

// -- examples (replace the text) and styles (add to a music description) ------------------

const MUSIC_EXAMPLES = [
  "warm lofi hip hop with soft keys and vinyl crackle, 80 bpm",
  "epic orchestral trailer music with big drums and brass",
  "80s synthwave, driving bassline, shimmering pads",
  "solo acoustic guitar, fingerpicked folk melody",
  "deep house groove with a rolling bassline, 122 bpm",
];
const SPEECH_EXAMPLES = [
  "Hello! This is wavecast, speaking while it thinks.",
  "The weather today is calm and clear, with a light breeze in the afternoon.",
];
const DIALOGUE_EXAMPLE = "[SPEAKER0] Did you hear that?\n[SPEAKER1] Hear what? I only hear the rain.\n[SPEAKER0] Exactly. It stopped.";
const STYLES = ["lofi", "jazz", "ambient", "orchestral", "techno", "rock", "acoustic", "calm", "energetic", "90 bpm", "120 bpm"];

function chip(text, label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "chip";
  button.textContent = label;
  button.title = text;
  button.addEventListener("click", onClick);
  return button;
}

function renderChips(speech, dialogue) {
  const prompt = $("#prompt");
  const examples = speech ? [...SPEECH_EXAMPLES, ...(dialogue ? [DIALOGUE_EXAMPLE] : [])] : MUSIC_EXAMPLES;
  $("#examples").replaceChildren(...examples.map((text) => {
    const label = text.startsWith("[SPEAKER") ? "a dialogue" : text.length > 36 ? `${text.slice(0, 34)}…` : text;
    return chip(text, label, () => {
      prompt.value = text;
      prompt.dispatchEvent(new Event("input"));
      prompt.focus();
    });
  }));
  $("#styles").hidden = speech;
  $("#styles").replaceChildren(...(speech ? [] : STYLES.map((style) => chip(style, `+ ${style}`, () => {
    const text = prompt.value.trim();
    prompt.value = text ? `${text}, ${style}` : style;
    prompt.dispatchEvent(new Event("input"));
  }))));
}

// -- speakers: per speaker a named voice (with a preview), a recording, or the model's pick

function renderSpeakers(model, kept) {
  const caps = model.capabilities || [];
  const chosen = String(kept.voice ?? "").split(",");
  for (const select of document.querySelectorAll("#speakers .voice-source")) {
    const speaker = Number(select.dataset.speaker);
    const role = speaker === 0 ? "reference" : `reference_${speaker}`;
    const previous = chosen[speaker] || (form.uploads[role] ? UPLOAD : select.value);
    select.replaceChildren(new Option("the model picks", ""));
    for (const name of model.voices || []) select.append(new Option(name, name));
    if (caps.includes("reference")) select.append(new Option("my own recording…", UPLOAD));
    select.value = [...select.options].some((o) => o.value === previous) ? previous : "";
  }
}

function showSources() {
  for (const box of document.querySelectorAll("#speakers .speaker")) {
    const source = $(".voice-source", box).value;
    const own = source === UPLOAD;
    const upload = $("fieldset.upload", box);
    const allowed = (currentModel()?.capabilities || []).includes("reference");
    upload.hidden = !(own && allowed);
    $(".speaker-text", box).hidden = !(own && allowed);
    $(".preview", box).disabled = !source || own;
  }
}

let preview = null;

export function wireSpeakers(pausePlayers) {
  for (const box of document.querySelectorAll("#speakers .speaker")) {
    $(".voice-source", box).addEventListener("change", showSources);
    $(".preview", box).addEventListener("click", () => {
      const name = $(".voice-source", box).value;
      if (!name || name === UPLOAD) return;
      pausePlayers();
      preview ??= new Audio();
      preview.src = auth.url(`/v1/voices/${encodeURIComponent(name)}.wav`);
      preview.play().catch((err) => { $("#form-error").textContent = `Preview unavailable: ${err.message}`; });
      form.previewed = name;
    });
  }
}

// What the form calls the parameters it knows (the protocol's names stay in
// each label's title, and in the card's "code"); any other: its name, spaced.
const LABELS = {
  duration: "Duration (s)",
  seed: "Seed",
  mbd: "Multi-Band Diffusion",
  temperature: "Temperature",
  top_k: "Top-k",
  top_p: "Top-p",
  cfg_coef: "Guidance (CFG)",
  extend_stride: "Window stride (s)",
  include_prompt: "Include the prompt",
  scene: "Scene",
  max_new_tokens: "Steps per chunk",
  ras_win_len: "Repetition window",
  ras_win_max_num_repeat: "Repeats allowed",
  chunk_method: "Split the text",
  chunk_max_word_num: "Words per chunk",
  chunk_max_num_turns: "Turns per chunk",
  generation_chunk_buffer_size: "Chunks kept as context",
};

export function paramLabel(name) {
  return LABELS[name] ?? name.replaceAll("_", " ");
}

function paramField(model, spec, kept) {
  const id = `param-${spec.name}`;
  const wrap = document.createElement("div");
  wrap.className = "param";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = paramLabel(spec.name);
  label.title = `params.${spec.name}`;
  const help = document.createElement("small");
  help.className = "help";
  help.id = `${id}-help`;
  help.textContent = spec.description || "";
  let input;
  const value = kept[spec.name] ?? spec.default;
  if (spec.kind === "bool") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(value);
    wrap.classList.add("toggle");
  } else if (spec.choices) {
    input = document.createElement("select");
    for (const c of spec.choices) input.append(new Option(c, c));
    if (value != null) input.value = value;
    input.addEventListener("change", () => { input.dataset.touched = "1"; });
  } else {
    input = document.createElement("input");
    input.type = spec.kind === "str" ? "text" : "number";
    if (spec.kind !== "str") {
      input.step = spec.kind === "int" ? "1" : "any";
      if (spec.min != null) input.min = String(spec.min);
      if (spec.max != null) input.max = String(spec.max);
      input.inputMode = spec.kind === "int" ? "numeric" : "decimal";
    }
    if (value != null) input.value = String(value);
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
    const ranged = spec.min != null && spec.max != null && spec.max < 1e9;
    if (ranged) help.textContent += `${help.textContent ? " · " : ""}${spec.min} – ${spec.max}`;
  }
  input.id = id;
  input.name = spec.name;
  input.dataset.kind = spec.kind;
  input.setAttribute("aria-describedby", help.id);
  if (spec.name === "max_new_tokens") input.addEventListener("input", updateEstimate);
  wrap.append(label, input, help);
  return wrap;
}

// The form's parameters; `raw` keeps the pickers' own values (re-rendering).
export function readParams({ lenient = false, raw = false } = {}) {
  const params = {};
  const pickers = $("#speakers").hidden ? [] : [...document.querySelectorAll("#speakers .voice-source")];
  const voices = pickers.map((s) => (s.value === UPLOAD && !raw ? "" : s.value));
  while (voices.length && !voices.at(-1)) voices.pop();
  if (voices.length) params.voice = voices.join(",");
  for (const input of paramInputs()) {
    const kind = input.dataset.kind;
    if (input.closest("[hidden]") && !raw) continue; // e.g. a transcript without its clip
    if (kind === "bool") { params[input.name] = input.checked; continue; }
    if (input.value === "") continue;
    if (kind === "int" || kind === "float") {
      const value = Number(input.value);
      if (!Number.isFinite(value)) {
        if (lenient) continue;
        throw new Error(`${input.name} must be a number`);
      }
      params[input.name] = value;
    } else {
      params[input.name] = input.value;
    }
  }
  return params;
}

// Speech has no set length: say how long the text will roughly take, and the limit.
export function updateEstimate() {
  const model = currentModel();
  const out = $("#estimate");
  const speech = (model?.capabilities || []).includes("tts");
  out.hidden = !speech;
  if (!speech) return;
  const text = $("#prompt").value.replace(/\[SPEAKER\d+\]/g, "").trim();
  const seconds = Math.max(1, Math.round(text.length / CHARS_PER_SECOND));
  const tokens = $("#param-max_new_tokens")?.value;
  const limit = tokens
    ? `each chunk stops at ${tokens} steps and the whole at ${model.max_duration} s`
    : `the whole stops at ${model.max_duration} s`;
  out.textContent = text
    ? `About ${seconds} s of speech at a usual pace; ${limit}.`
    : `${limit[0].toUpperCase()}${limit.slice(1)}.`;
}

// -- the dialogue editor: lines of [SPEAKERn] text, in step with the text box ----------

const TAG = /^\s*\[(SPEAKER\d+)\]\s*(.*)$/;

function editorLines() {
  return [...document.querySelectorAll("#dialogue-lines .line")];
}

// Editor -> text box: every line, tagged with its speaker.
function writeDialogue() {
  const lines = editorLines();
  $("#clear-lines").hidden = lines.length === 0;
  if (!lines.length) return;
  $("#prompt").value = lines
    .map((line) => [$(".speaker", line).value, $(".line-text", line).value.trim()])
    .filter(([, text]) => text)
    .map(([speaker, text]) => (speaker ? `[${speaker}] ${text}` : text))
    .join("\n");
  chunkBySpeaker();
  updateEstimate();
}

// Text box -> editor: lines typed by hand become editor lines (nothing is lost).
function readDialogue() {
  const lines = $("#prompt").value.split("\n").filter((line) => line.trim());
  $("#dialogue-lines").replaceChildren();
  for (const line of lines) {
    const tagged = TAG.exec(line);
    addLine(tagged ? tagged[1] : "", tagged ? tagged[2] : line.trim(), false);
  }
  $("#clear-lines").hidden = lines.length === 0;
  chunkBySpeaker();
}

// A dialogue is spoken a turn at a time, unless the user chose otherwise.
function chunkBySpeaker() {
  const select = $("#param-chunk_method");
  const speakers = new Set(editorLines().map((line) => $(".speaker", line).value).filter(Boolean));
  if (select && !select.dataset.touched && speakers.size > 1) select.value = "speaker";
}

function addLine(speaker, text = "", write = true) {
  const line = document.createElement("div");
  line.className = "line";
  const who = document.createElement("select");
  who.className = "speaker";
  who.setAttribute("aria-label", "speaker");
  who.append(new Option("no tag", ""));
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
  remove.className = "secondary remove-line";
  remove.textContent = "×";
  remove.setAttribute("aria-label", "remove line");
  remove.addEventListener("click", () => { line.remove(); writeDialogue(); });
  who.addEventListener("change", writeDialogue);
  said.addEventListener("input", writeDialogue);
  line.append(who, said, remove);
  $("#dialogue-lines").append(line);
  if (write) writeDialogue();
  return said;
}

export function wireDialogue() {
  $("#add-line").addEventListener("click", () => {
    if (!editorLines().length && $("#prompt").value.trim()) readDialogue();
    const last = editorLines().map((line) => $(".speaker", line).value).filter(Boolean).at(-1);
    addLine(last === "SPEAKER0" ? "SPEAKER1" : "SPEAKER0").focus();
  });
  $("#clear-lines").addEventListener("click", () => {
    $("#dialogue-lines").replaceChildren();
    $("#clear-lines").hidden = true;
  });
  $("#prompt").addEventListener("input", () => {
    if (editorLines().length) readDialogue();
    updateEstimate();
  });
}

// Fill the form with a request's settings (a card's "load settings", a link).
export function applySettings({ model, prompt, params, rate, format = null, bitrate = null }) {
  const select = $("#model");
  if (model && [...select.options].some((o) => o.value === model)) select.value = model;
  renderParams();
  const rates = $("#output-rate");
  rates.value = [...rates.options].some((o) => o.value === String(rate ?? "")) ? String(rate ?? "") : "";
  if (rates.value) $("#advanced").open = true;
  // A format this page cannot decode here (or does not know) streams as PCM.
  const formats = $("#stream-format");
  const offered = [...formats.options].some((o) => o.value === (format ?? "") && !o.disabled);
  formats.value = offered ? format ?? "" : "";
  $("#bitrate").value = bitrate ? String(Math.round(bitrate / 1000)) : "";
  if (formats.value) $("#advanced").open = true;
  renderFormat();
  $("#prompt").value = prompt ?? "";
  $("#prompt").dispatchEvent(new Event("input"));
  for (const [name, value] of Object.entries(params || {})) {
    if (name === "voice") {
      String(value).split(",").forEach((voice, i) => {
        const picker = $(`#param-voice-${i}`);
        if (picker && [...picker.options].some((o) => o.value === voice)) picker.value = voice;
      });
      showSources();
      continue;
    }
    const input = $(`#param-${name}`);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = value === true || value === "true";
    else input.value = String(value);
    if (input.tagName === "SELECT") input.dataset.touched = "1";
    if (input.closest("#advanced")) $("#advanced").open = true;
  }
  updateEstimate();
}
