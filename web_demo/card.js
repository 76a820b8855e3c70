// A generation's card: its status, stats, waveform with a playhead, and one
// transport (play/pause/stop, seek) for the live stream and then the finished
// clip; the Multi-Band Diffusion version behind an A/B switch; downloads,
// partial ones too; remove. A stream of an encoded format (Opus, MP3, FLAC) is
// decoded here as it comes (decode.js), and its file is offered as it came.
import { pcmToFloat32 } from "./protocol.js";
import { ENCODED, StreamDecoder } from "./decode.js";
import { encodeWav } from "./wav.js";
import { Player } from "./player.js";
import { asCli, asJson, asPython, settingsLink } from "./code.js";
import { drawSpectrogram, spectrogram } from "./spectrogram.js";

const $ = (sel, root) => root.querySelector(sel);

// Speech has no set length: a guess from the text (about 14 characters a second).
export const CHARS_PER_SECOND = 14;

export function speechTitle(text) {
  return text
    .split("\n")
    .map((line) => line.replace(/^\s*\[SPEAKER(\d+)\]\s*/, (_, n) => `${Number(n) === 0 ? "A" : "B"}: `).trim())
    .filter(Boolean)
    .join(" / ");
}

function join(chunks) {
  const all = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { all.set(c, at); at += c.length; }
  return all;
}

function joinBytes(chunks) {
  const all = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { all.set(c, at); at += c.length; }
  return all;
}

// Bytes in words: "812 B", "41.3 kB", "2.61 MB".
export function bytesText(n) {
  if (n < 1000) return `${n} B`;
  if (n < 1e6) return `${(n / 1000).toFixed(1)} kB`;
  return `${(n / 1e6).toFixed(2)} MB`;
}

// An encoded file's samples, whole (a second version's, say).
async function decodeWhole(format, bytes, sampleRate, channels) {
  const chunks = [];
  let failed = null;
  const decoder = new StreamDecoder(format, {
    sampleRate, channels, onSamples: (samples) => chunks.push(samples.slice()), onError: (err) => { failed = err; },
  });
  decoder.push(bytes);
  await decoder.end();
  if (failed) throw failed;
  return chunks;
}

function slug(text) {
  const words = text.toLowerCase().replace(/\[speaker\d+\]/g, " ").match(/[\p{L}\p{N}]+/gu) || [];
  return words.slice(0, 6).join("-").slice(0, 48) || "clip";
}

// Seconds the server may have generated past the audio this page has before a
// card waiting for audio says the connection, not the model, is what it waits
// for (the live progress comes ahead of the audio waiting to be sent: §4.4).
export const LINK_BEHIND_SECONDS = 2;

// A request the server had no room for (busy) before it started is asked again:
// after half a second, then each wait twice the last up to 8 s (a fifth more or
// less at random, so that pages turned away together do not come back together),
// while it is under two minutes old. One the server could not start as it shut
// down, or whose connection was lost before it started, is asked again once the
// page is connected again (to the server that comes back), in the same time. One
// cut under way the same way is picked up where it was cut (PROTOCOL.md §3.1
// resume: its seed, and the frames it has; resume_codes: the codes its audio
// came with), within two minutes of the cut: its player waits meanwhile, and
// plays on.
// Bytes of a stream's codes kept to pick it up from (beyond: from its start).
const MAX_KEPT_CODES = 4 << 20;
const RETRY_FIRST_MS = 500;
const RETRY_MOST_MS = 8000;
export const retry = { forMs: 120000 }; // (a test shortens it)

const FRIENDLY = {
  busy: "The server is busy (no room for another request now). Try again in a moment.",
  shutting_down: "The server is restarting. Try again in a moment.",
  disconnected: "The connection to the server was lost.",
  internal_error: "The server failed on this request.",
  too_many_requests: "Too many requests at once on this page: wait for one to finish.",
  slow_consumer: "This page could not keep up with the stream.",
  audio: "Live playback is unavailable in this browser.",
  decode: "This browser could not decode the stream.",
};

// What a card says where its text, written as it is spoken, is all said so far.
const WAITING_FOR_TEXT = "all said so far: waiting for more text";
// Captions a card keeps (a text chunk each: bounded, as every buffer is).
const MAX_CAPTIONS = 10000;

export class Card {
  // hooks: send(message), announce(text), removed(card), finished(card), ended(card),
  // load(settings), reuseSeed(seed), rerun(settings)
  constructor({ id, model, prompt, params, inputs, rate = null, format = null, bitrate = null, scroll = true }, hooks) {
    this.id = id;
    this.model = model;
    this.prompt = prompt;
    this.params = params;
    this.hooks = hooks;
    this.speech = (model.capabilities || []).includes("tts");
    this.inputs = Object.keys(inputs || {});
    this.continuation = this.inputs.includes("continuation") && !params.include_prompt;
    this.rate = rate; // the output rate asked for (null: the model's)
    this.format = format; // the encoded format asked for (null: PCM)
    this.bitrate = bitrate; // its bit rate asked for (null: the server's)
    this.sampleRate = rate || model.sample_rate; // the samples' here (decoded Opus: 48 kHz)
    this.streamRate = this.sampleRate; // the stream's (its started message says)
    this.decoder = null;
    this.file = []; // an encoded stream's bytes, as they came
    this.fileLength = 0; // (their count)
    this.until = 0; // the sample frames they hold (the last chunk's until: where it is picked up)
    this.silence = 0; // frames of silence its file got at waits for text (§4.8)
    this.waits = new Map(); // where: each wait's frames -> its silence (to pick it up from)
    this.captions = []; // which text the audio speaks from where: {offset, text} (§4.9)
    this.bytes = 0; // of audio received, every rendition
    this.channels = model.channels;
    this.maxSeconds = model.max_duration;
    this.duration = this.speech
      ? Math.min(model.max_duration, Math.max(2, Math.ceil(prompt.length / CHARS_PER_SECOND)))
      : params.duration ?? paramDefault(model, "duration") ?? 10;
    this.status = "queued";
    this.statuses = ["queued"];
    this.request = null; // the generate message (app.js): sent again after "busy"
    this.retries = 0;
    this.stopRetry = null; // while waiting to ask again: ends the wait
    this.awaiting = false; // waiting for the page to connect again (resend())
    this.socket = null; // the connection its request went on (app.js)
    this.frames = 0; // received
    this.codes = []; // the live stream's codes (Uint8Array pieces; null: past MAX_KEPT_CODES)
    this.codeBytes = 0;
    this.consumed = 0; // played by the worklet, in all
    this.chunks = [];
    this.sentAt = performance.now();
    this.since = this.sentAt; // the retry time counts from here (and from a cut under way)
    this.resuming = false; // asked again where its stream was cut: its started is not news
    this.liveFraction = 0; // the live stream's progress shown
    this.generated = 0; // seconds of the live stream the server has generated (its progress)
    this.preparedFrom = null;
    this.startedAt = null;
    this.firstAudioAt = null;
    this.renditions = {}; // name -> Float32Array chunks
    this.rendition = "live";
    this.ended = false;
    this.player = null;
    this.urls = [];

    const el = document.querySelector("#card-template").content.firstElementChild.cloneNode(true);
    this.el = el;
    el.dataset.id = id;
    this.title = (this.speech ? speechTitle(prompt) : prompt) || "(no prompt)";
    $(".title", el).textContent = this.title;
    this.meta = [
      model.name + (model.test_model ? " · test model (random weights: noise)" : ""),
      this.speech ? (params.voice ? `voice ${params.voice}` : "speech") : `${this.duration} s`,
      `${this.sampleRate} Hz`,
      this.channels === 2 ? "stereo" : "mono",
    ];
    if (format) {
      const spec = ENCODED[format];
      this.meta.push(bitrate ? `${spec?.label ?? format} ${Math.round(bitrate / 1000)} kbit/s` : spec?.label ?? format);
    }
    this.renderMeta();
    for (const [cls, label] of [
      ["play", "Play"], ["stop", "Stop"], ["cancel", "Cancel"], ["remove", "Remove"],
    ]) {
      $(`.${cls}`, el).setAttribute("aria-label", `${label}: ${this.title}`);
    }
    $(".progress", el).setAttribute("aria-label", `Generated so far: ${this.title}`);
    this.seekBar = $(".wave-box", el);
    this.seekBar.setAttribute("aria-label", `Playhead: ${this.title}`);
    $(".cancel", el).addEventListener("click", () => this.cancel());
    $(".play", el).addEventListener("click", () => this.togglePlay());
    $(".stop", el).addEventListener("click", () => this.player?.stop());
    $(".remove", el).addEventListener("click", () => this.remove());
    for (const button of el.querySelectorAll(".renditions button")) {
      button.addEventListener("click", () => this.switchTo(button.dataset.rendition));
    }
    this.seekBar.addEventListener("click", (event) => {
      const box = this.seekBar.getBoundingClientRect();
      this.seekTo(((event.clientX - box.left) / box.width) * this.duration);
    });
    this.seekBar.addEventListener("keydown", (event) => this.onSeekKey(event));
    $(".show-code", el).addEventListener("click", () => this.toggleCode());
    $(".view", el).addEventListener("click", () => this.toggleView());
    $(".load-settings", el).addEventListener("click", () => hooks.load(this.settings()));
    // Run again: the request as it was sent (a fresh seed unless one was given).
    $(".rerun", el).addEventListener("click", () => hooks.rerun({ ...this.settings(), params: { ...this.params } }));
    $(".reuse-seed", el).addEventListener("click", () => hooks.reuseSeed(this.seed));
    $(".copy-link", el).addEventListener("click", () => this.copy(settingsLink(this.settings()), $(".copy-link", el)));
    for (const button of el.querySelectorAll(".code .copy")) {
      button.addEventListener("click", () => this.copy(this.code()[button.dataset.copy], button));
    }
    this.canvas = $(".wave", el);
    this.ctx2d = this.canvas.getContext("2d");
    document.querySelector("#cards").prepend(el);
    if (scroll) el.scrollIntoView?.({ block: "nearest" });
    this.timer = setInterval(() => this.tick(), 100);
    this.updateTransport();
  }

  renderMeta() {
    $(".meta", this.el).textContent = this.meta.join(" · ");
  }

  setStatus(status, text = status) {
    const changed = status !== this.status;
    this.status = status;
    if (this.statuses.at(-1) !== text) this.statuses.push(text); // what the badge said, in order
    const badge = $(".status", this.el);
    badge.textContent = text;
    badge.dataset.status = status;
    this.el.dataset.status = status;
    if (changed && ["completed", "cancelled", "error"].includes(status)) {
      this.hooks.announce(`${this.title}: ${status}`);
    }
  }

  onPreparing(fraction) {
    // Out of the queue; the server analyses the inputs (a melody can take a
    // while: it says how far it is).
    if (!(fraction > 0)) this.preparedFrom = performance.now();
    const what = this.inputs.includes("melody") ? "analysing the melody…"
      : this.inputs.includes("continuation") ? "analysing your clip…"
      : this.inputs.some((role) => role.startsWith("reference")) ? "reading the voice…"
      : "preparing…";
    this.setStatus("preparing", fraction > 0 ? `${what} ${Math.round(fraction * 100)}%` : what);
  }

  onStarted(message) {
    if (this.resuming) {
      // The stream picked up where it was cut: it goes on, from the frame it had.
      this.resuming = false;
      this.setStatus("generating", `picked up at ${(this.frames / this.sampleRate).toFixed(1)} s`);
      return;
    }
    this.startedAt = performance.now();
    this.sampleRate = this.streamRate = message.sample_rate;
    this.channels = message.channels;
    this.meta[2] = `${message.sample_rate} Hz`; // (Opus: 48 kHz for a rate it does not take)
    this.seed = message.seed;
    if (message.seed !== undefined && message.seed !== null) {
      this.meta.push(`seed ${message.seed}`);
      $(".reuse-seed", this.el).hidden = false;
    }
    if (message.seconds != null) {
      this.duration = Math.max(message.seconds, 0.01);
      this.meta[1] = this.continuation
        ? `${message.seconds.toFixed(1)} s after your clip`
        : `${message.seconds.toFixed(1)} s`;
    }
    if (message.max_seconds != null) {
      this.maxSeconds = message.max_seconds;
      this.duration = Math.min(this.duration, message.max_seconds);
      this.meta.push(`up to ${message.max_seconds.toFixed(1)} s`);
    }
    this.renderMeta();
    if (this.preparedFrom !== null) {
      $(".s-wait", this.el).textContent = `${((this.startedAt - this.sentAt) / 1000).toFixed(1)} s`;
    }
    this.setStatus("generating");
    if (this.format) {
      // The player starts with the first decoded samples, at their rate.
      this.decoder = new StreamDecoder(this.format, {
        sampleRate: this.streamRate,
        channels: this.channels,
        onSamples: (samples, rate) => this.onSamples(samples, rate),
        onError: (err) => {
          console.error("cannot decode the stream", err);
          this.showError("decode", err.message);
        },
      });
    } else {
      this.startPlayer();
    }
    this.updateTransport();
  }

  startPlayer() {
    const capacity = Math.ceil(((this.speech ? this.maxSeconds : this.duration) + 1) * this.sampleRate);
    this.player = new Player(
      { sampleRate: this.sampleRate, channels: this.channels, capacityFrames: capacity, paused: this.userPaused },
      {
        onState: (state) => this.onPlayerState(state),
        onPosition: (player) => this.onPosition(player),
        onError: (err) => {
          console.error("audio output unavailable", err);
          this.showError("audio", err.message);
        },
      },
    );
  }

  onAudio(message) {
    if (!message.rendition) this.waitingForText = false;
    this.bytes += message.data.length;
    $(".s-bytes", this.el).textContent = bytesText(this.bytes);
    if (message.rendition) {
      // A complete second version (Multi-Band Diffusion), offered once it is whole.
      const part = this.format ? message.data.slice() : pcmToFloat32(message);
      (this.renditions[message.rendition] ??= []).push(part);
      return;
    }
    if (message.codes && this.codes) {
      this.codes.push(message.codes.slice());
      this.codeBytes += message.codes.length;
      if (this.codeBytes > MAX_KEPT_CODES) this.codes = null; // (picked up from its start)
    }
    if (this.format) {
      // (A file picked up where it was cut goes on from the byte the card has.)
      const had = this.fileLength - message.offset;
      if (had >= message.data.length) return;
      const data = had > 0 ? message.data.subarray(had) : message.data;
      this.file.push(data.slice());
      this.fileLength += data.length;
      if (message.until != null) this.until = message.until;
      this.decoder?.push(data);
      return;
    }
    // (A stream picked up where it was cut starts at the frame the card has.)
    const had = this.frames - message.offset;
    const samples = pcmToFloat32(message);
    if (had <= 0) this.onSamples(samples);
    else if (had * this.channels < samples.length) this.onSamples(samples.subarray(had * this.channels));
  }

  // Samples to play and draw: a PCM chunk's, or what the decoder gave out.
  onSamples(samples, rate = this.sampleRate) {
    if (!this.player) {
      if (rate !== this.streamRate) this.meta.push(`decoded at ${rate / 1000} kHz`);
      this.renderMeta();
      this.sampleRate = rate;
      this.startPlayer();
    }
    if (this.firstAudioAt === null) {
      this.firstAudioAt = performance.now();
      const from = this.startedAt ?? this.sentAt;
      $(".s-first", this.el).textContent = `${Math.round(this.firstAudioAt - from)} ms`;
    }
    this.chunks.push(samples);
    this.frames += samples.length / this.channels;
    $(".s-generated", this.el).textContent = `${(this.frames / this.sampleRate).toFixed(2)} s`;
    this.draw(samples);
    if (this.spectro && performance.now() - this.spectroAt > 500) this.drawSpectro();
    this.player?.feed(samples.slice());
    this.updateTransport();
  }

  onProgress(message) {
    if (message.stage === "prepare") {
      if (this.startedAt === null) this.onPreparing(message.fraction);
      return;
    }
    if (message.stage === "mbd") {
      this.setStatus("generating", `rendering MBD ${Math.round(message.fraction * 100)}%`);
      return;
    }
    if (message.fraction < this.liveFraction) return; // (made again, up to where it was cut)
    this.liveFraction = message.fraction;
    this.generated = message.seconds;
    if (this.status === "generating" && this.player && this.player.state !== "playing" && this.linkBehind()) {
      this.setStatus("generating", this.slowLinkText());
    }
    if (this.player && message.fraction > 0) this.player.total = message.seconds / message.fraction;
    const pct = Math.round(message.fraction * 100);
    const progress = $(".progress", this.el);
    progress.setAttribute("aria-valuenow", String(pct));
    $(".bar", progress).style.width = `${pct}%`;
  }

  // A text written as it is spoken is all said so far (PROTOCOL.md §4.8 waiting).
  // An encoded stream's bytes so far then play all of its audio so far: the
  // decoder gives out its last frame (a FLAC frame ends where the next begins).
  onWaiting(message) {
    this.waitingForText = true;
    if (message.frames == null) {
      this.silence += message.silence ?? 0;
    } else if (message.silence != null) {
      // (a stream picked up where it waited waits there again: the same silence)
      this.waits.set(message.frames, message.silence);
      this.silence = [...this.waits.values()].reduce((sum, frames) => sum + frames, 0);
    }
    this.decoder?.flush();
    if (!this.ended) this.setStatus("generating", WAITING_FOR_TEXT);
  }

  onPlayerState(state) {
    if (this.status === "generating" && !this.ended && this.streaming()) {
      if (state === "buffering" && this.waitingForText) this.setStatus("generating", WAITING_FOR_TEXT);
      else if (state === "buffering") this.setStatus("generating", this.linkBehind() ? this.slowLinkText() : "buffering…");
      else if (state === "playing") this.setStatus("generating", "playing live");
      else if (state === "paused") this.setStatus("generating", "generating (paused)");
    }
    this.updateTransport();
  }

  // Which text the stream speaks from a sample frame on (PROTOCOL.md §4.9): shown
  // under the waveform once the playhead reaches it.
  onCaption(message) {
    // (a stream picked up says again those ahead of the audio the card had)
    if (this.captions.length && this.captions.at(-1).offset >= message.offset) return;
    if (this.captions.length < MAX_CAPTIONS) this.captions.push({ offset: message.offset, text: message.text });
    if (this.player) this.showCaption(this.player.position / this.sampleRate);
  }

  showCaption(seconds) {
    let shown = null;
    for (const c of this.captions) {
      if (c.offset / this.streamRate > seconds + 1e-6) break;
      shown = c;
    }
    const p = $(".caption", this.el);
    p.hidden = shown === null;
    if (shown !== null && p.textContent !== shown.text) p.textContent = shown.text;
  }

  onPosition(player) {
    this.consumed = player.consumed;
    const seconds = player.position / this.sampleRate;
    if (this.captions.length) this.showCaption(seconds);
    $(".s-played", this.el).textContent = `${seconds.toFixed(2)} s`;
    const pct = Math.min(100, (seconds / this.duration) * 100);
    $(".played", this.el).style.width = `${pct}%`;
    $(".playhead", this.el).style.left = `${pct}%`;
    this.seekBar.setAttribute("aria-valuenow", seconds.toFixed(1));
    this.seekBar.setAttribute("aria-valuetext", `${seconds.toFixed(1)} of ${(this.frames / this.sampleRate).toFixed(1)} seconds`);
  }

  updateTransport() {
    const play = $(".play", this.el);
    const playing = this.player ? this.player.playing : !this.userPaused;
    play.textContent = playing ? "❚❚ Pause" : "▶ Play";
    play.setAttribute("aria-label", `${playing ? "Pause" : "Play"}: ${this.title}`);
    play.disabled = this.ended && this.frames === 0;
    $(".stop", this.el).disabled = this.frames === 0;
    this.seekBar.setAttribute("aria-valuemax", this.duration.toFixed(1));
  }

  togglePlay() {
    if (!this.player) {
      this.userPaused = !this.userPaused; // before the audio starts
    } else if (this.player.playing) {
      this.player.pause();
    } else {
      this.player.play();
    }
    this.updateTransport();
  }

  seekTo(seconds) {
    if (!this.player) return;
    const frame = Math.max(0, Math.min(this.frames, seconds * this.sampleRate));
    this.player.seek(frame);
  }

  onSeekKey(event) {
    if (!this.player) return;
    const now = this.player.position / this.sampleRate;
    const moves = { ArrowLeft: now - 1, ArrowRight: now + 1, PageDown: now - 5, PageUp: now + 5, Home: 0, End: this.frames / this.sampleRate };
    if (event.key in moves) {
      event.preventDefault();
      this.seekTo(moves[event.key]);
    } else if (event.key === " " || event.key === "Enter") {
      event.preventDefault();
      this.togglePlay();
    }
  }

  async onDone(message) {
    if (this.finishing) return;
    this.finishing = true;
    this.stopRetry?.(); // (a lost connection, while waiting to ask again)
    clearInterval(this.timer);
    this.tick();
    $(".cancel", this.el).hidden = true;
    if (this.decoder) {
      // The rest of the file out of the decoder (after a lost connection, what
      // came whole), then the second version's file, decoded whole.
      const decoder = this.decoder;
      await decoder.end(message.error?.code !== "disconnected");
      this.decoder = null;
      await this.decodeRenditions();
      if (this.removed) return;
    }
    this.ended = true;
    const stats = message.stats;
    if (stats) {
      $(".s-elapsed", this.el).textContent = `${stats.wall_seconds.toFixed(1)} s`;
      if (stats.samples > 0) {
        $(".s-rtf", this.el).textContent = `×${stats.real_time_factor.toFixed(2)} real time`;
      }
      this.serverSamples = stats.samples;
      if (this.bytes > 0 && stats.samples > 0) {
        const kbps = (this.bytes * 8) / (stats.samples / this.streamRate) / 1000;
        $(".s-bytes", this.el).textContent = `${bytesText(this.bytes)} (${Math.round(kbps)} kbit/s)`;
      }
    }
    this.player?.end();
    if (message.status === "completed") {
      $(".bar", this.el).style.width = "100%";
      $(".progress", this.el).setAttribute("aria-valuenow", "100");
      this.setStatus("completed");
    } else if (message.status === "cancelled") {
      this.setStatus("cancelled", this.frames ? "cancelled (partial)" : "cancelled");
    } else {
      this.setStatus("error", this.frames ? "failed (partial)" : "failed");
      const err = message.error || { code: "error", message: "failed" };
      this.showError(err.code, err.message);
    }
    if (this.frames > 0) {
      this.finishClip(message.status !== "completed");
      this.hooks.finished?.(this);
    } else if (this.player) {
      this.player.close();
      this.player = null;
    }
    this.updateTransport();
  }

  async decodeRenditions() {
    for (const [name, chunks] of Object.entries(this.renditions)) {
      const bytes = joinBytes(chunks);
      (this.renditionFiles ??= {})[name] = bytes;
      try {
        this.renditions[name] = await decodeWhole(this.format, bytes, this.streamRate, this.channels);
      } catch (err) {
        delete this.renditions[name];
        this.showError("decode", `${name}: ${err.message}`);
      }
    }
  }

  // What the history keeps of a finished card.
  entry() {
    const m = this.model;
    const text = (cls) => $(cls, this.el).textContent;
    return {
      id: this.id,
      savedAt: Date.now(),
      model: {
        name: m.name, capabilities: m.capabilities, sample_rate: m.sample_rate,
        channels: m.channels, test_model: m.test_model, max_duration: m.max_duration,
        params: m.params,
      },
      prompt: this.prompt,
      params: this.params,
      inputs: this.inputs,
      seed: this.seed ?? null,
      status: this.status,
      statusText: $(".status", this.el).textContent,
      meta: this.meta,
      error: $(".error", this.el).hidden ? null : text(".error"),
      stats: {
        elapsed: text(".s-elapsed"), rtf: text(".s-rtf"), first: text(".s-first"), wait: text(".s-wait"), bytes: text(".s-bytes"),
      },
      rate: this.rate,
      sampleRate: this.sampleRate,
      channels: this.channels,
      clip: this.clip,
      mbd: this.mbd ?? null,
      streamRate: this.streamRate,
      bytes: this.bytes,
      format: this.format,
      bitrate: this.bitrate,
      file: this.fileBytes ?? null,
      mbdFile: this.renditionFiles?.mbd ?? null,
    };
  }

  // A card from the history: the clip in a paused player, as it was left.
  restore(entry) {
    clearInterval(this.timer);
    this.ended = true;
    this.el.dataset.restored = "true";
    $(".cancel", this.el).hidden = true;
    this.seed = entry.seed ?? undefined;
    if (entry.seed != null) $(".reuse-seed", this.el).hidden = false;
    this.meta = entry.meta;
    this.renderMeta();
    this.sampleRate = entry.sampleRate;
    this.streamRate = entry.streamRate ?? entry.sampleRate;
    this.channels = entry.channels;
    this.bytes = entry.bytes ?? 0;
    this.format = entry.format ?? null;
    this.bitrate = entry.bitrate ?? null;
    if (entry.file) this.fileBytes = entry.file;
    if (entry.mbdFile) this.renditionFiles = { mbd: entry.mbdFile };
    this.chunks = [entry.clip];
    this.frames = entry.clip.length / entry.channels;
    this.serverSamples = this.frames;
    if (entry.mbd) this.renditions.mbd = [entry.mbd];
    for (const [key, cls] of [["elapsed", ".s-elapsed"], ["rtf", ".s-rtf"], ["first", ".s-first"], ["wait", ".s-wait"], ["bytes", ".s-bytes"]]) {
      if (entry.stats[key] !== undefined) $(cls, this.el).textContent = entry.stats[key];
    }
    $(".s-generated", this.el).textContent = `${(this.frames / this.sampleRate).toFixed(2)} s`;
    $(".bar", this.el).style.width = entry.status === "completed" ? "100%" : "0%";
    if (entry.error) {
      const p = $(".error", this.el);
      p.hidden = false;
      p.textContent = entry.error;
    }
    this.status = entry.status;
    this.statuses = [entry.statusText];
    const badge = $(".status", this.el);
    badge.textContent = entry.statusText;
    badge.dataset.status = this.el.dataset.status = entry.status;
    this.player = new Player(
      { sampleRate: this.sampleRate, channels: this.channels, capacityFrames: this.frames + 1, paused: true },
      {
        onState: () => this.updateTransport(),
        onPosition: (player) => this.onPosition(player),
        onError: (err) => this.showError("audio", err.message),
      },
    );
    this.player.feed(entry.clip.slice());
    this.player.end();
    this.finishClip(entry.status !== "completed");
    this.updateTransport();
  }

  finishClip(partial) {
    this.clip = join(this.chunks);
    // A codec pads its last frame (and MP3 has no count of its own): the clip
    // is the samples the server made and the silence its waits added, no more.
    if (this.format && this.serverSamples != null) {
      const frames = this.serverSamples + this.silence;
      const made = Math.round((frames * this.sampleRate) / this.streamRate) * this.channels;
      if (this.clip.length > made) {
        this.clip = this.clip.slice(0, made);
        this.chunks = [this.clip];
        this.frames = made / this.channels;
        this.player?.load(this.clip.slice());
      }
    }
    if (this.speech || partial) {
      // Now that the length is known, fit the waveform to it.
      this.duration = this.frames / this.sampleRate;
      this.redraw();
    }
    const name = `wavecast-${slug(this.prompt)}${this.seed != null ? `-seed${this.seed}` : ""}`;
    const link = $(".download", this.el);
    link.href = this.url(encodeWav(this.clip, this.sampleRate, this.channels));
    link.download = `${name}${partial ? "-partial" : ""}.wav`;
    link.textContent = partial ? "Download what was made (WAV)" : "Download WAV";
    link.setAttribute("aria-label", `${link.textContent}: ${this.title}`);
    link.hidden = false;
    if (this.renditions.mbd) {
      this.mbd = join(this.renditions.mbd);
      this.mbdFrames = this.mbd.length / this.channels;
      const mbdLink = $(".download-mbd", this.el);
      mbdLink.href = this.url(encodeWav(this.mbd, this.sampleRate, this.channels));
      mbdLink.download = `${name}-mbd.wav`;
      mbdLink.hidden = false;
      $(".renditions", this.el).hidden = false;
    }
    if (this.format) {
      const spec = ENCODED[this.format];
      this.fileBytes ??= joinBytes(this.file);
      this.file = [];
      const fileLink = $(".download-file", this.el);
      fileLink.href = this.url(new Blob([this.fileBytes], { type: spec.mime }));
      fileLink.download = `${name}${partial ? "-partial" : ""}.${spec.suffix}`;
      fileLink.textContent = partial ? `Download what was made (${spec.label})` : `Download ${spec.label}`;
      fileLink.setAttribute("aria-label", `${fileLink.textContent}: ${this.title}`);
      fileLink.hidden = false;
      const mbdFile = this.renditionFiles?.mbd;
      if (mbdFile && this.mbd) {
        const mbdFileLink = $(".download-mbd-file", this.el);
        mbdFileLink.href = this.url(new Blob([mbdFile], { type: spec.mime }));
        mbdFileLink.download = `${name}-mbd.${spec.suffix}`;
        mbdFileLink.textContent = `Download MBD ${spec.label}`;
        mbdFileLink.hidden = false;
      }
    }
  }

  switchTo(rendition) {
    if (!this.player || rendition === this.rendition) return;
    const samples = rendition === "mbd" ? this.mbd : this.clip;
    if (!samples) return;
    this.player.load(samples.slice());
    this.rendition = rendition;
    if (this.spectro) this.drawSpectro();
    for (const button of this.el.querySelectorAll(".renditions button")) {
      button.setAttribute("aria-pressed", String(button.dataset.rendition === rendition));
    }
  }

  // The exact request: the seed the server used, so that it comes out the same.
  settings() {
    const params = { ...this.params };
    if (this.seed != null) params.seed = this.seed;
    return {
      model: this.model.name, prompt: this.prompt, params, inputs: this.inputs, speech: this.speech, rate: this.rate,
      format: this.format, bitrate: this.bitrate,
    };
  }

  code() {
    const settings = this.settings();
    return { python: asPython(settings), cli: asCli(settings), json: asJson(settings) };
  }

  // Waveform or spectrogram (of what has arrived; redrawn as more does).
  toggleView() {
    this.spectro = !this.spectro;
    const button = $(".view", this.el);
    button.setAttribute("aria-pressed", String(this.spectro));
    $(".wave", this.el).hidden = this.spectro;
    $(".spectro", this.el).hidden = !this.spectro;
    if (this.spectro) this.drawSpectro();
  }

  drawSpectro() {
    this.spectroAt = performance.now();
    const canvas = $(".spectro", this.el);
    const samples = this.rendition === "mbd" && this.mbd ? this.mbd : join(this.chunks);
    const spec = spectrogram(samples, this.channels, {
      columns: canvas.width,
      totalFrames: Math.round(this.duration * this.sampleRate),
    });
    drawSpectrogram(canvas, spec);
  }

  toggleCode() {
    const panel = $(".code", this.el);
    panel.hidden = !panel.hidden;
    $(".show-code", this.el).setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) {
      const code = this.code();
      $(".code-python", panel).textContent = code.python;
      $(".code-cli", panel).textContent = code.cli;
      $(".code-json", panel).textContent = code.json;
    }
  }

  async copy(text, button) {
    const label = button.textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = label; }, 1500);
  }

  url(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  // Whether the request may still be asked again: it has not started, or its
  // stream can be picked up where it is cut (its seed known; a text typed as it
  // is spoken, cut a sentence a chunk: its prompt is then all of it so far,
  // sendRequest); and it is under the retry time old (from when it was asked;
  // once started, from the cut).
  mayAskAgain(delay = 0) {
    if (this.request === null || this.ended || this.finishing) return false;
    const typedWhole = !this.request.text_stream || this.request.params.chunk_method === "sentence";
    if (this.startedAt !== null && (this.seed == null || !typedWhole)) return false;
    return performance.now() + delay - (this.streaming() ? performance.now() : this.since) <= retry.forMs;
  }

  // Started, and not cut (or cut and picked up since).
  // Whether the stream waits for the connection rather than the model: the
  // server has generated more than LINK_BEHIND_SECONDS past the audio here.
  linkBehind() {
    return this.streaming() && this.generated - this.frames / this.sampleRate > LINK_BEHIND_SECONDS;
  }

  slowLinkText() {
    const what = "buffering: the connection is slower than this stream";
    return this.format ? what : `${what} (Opus needs a tenth of it: Advanced, stream format)`;
  }

  streaming() {
    return this.startedAt !== null && !this.awaiting && !this.resuming;
  }

  // True where the server's done is not the end: "busy" asks again after a wait
  // (the badge counts it down), "shutting_down" once the page is connected
  // again (to the server that comes back); Cancel ends either wait.
  waitForRoom(message) {
    const code = message.status === "error" ? message.error?.code : null;
    if (code === "shutting_down" && this.mayAskAgain()) return this.awaitConnection("server restarting");
    if (code !== "busy" || this.startedAt !== null) return false;
    const delay = Math.min(RETRY_MOST_MS, RETRY_FIRST_MS * 2 ** this.retries) * (0.8 + 0.4 * Math.random());
    if (!this.mayAskAgain(delay)) return false;
    this.retries += 1;
    const until = performance.now() + delay;
    const show = () => {
      const left = Math.max(1, Math.ceil((until - performance.now()) / 1000));
      this.setStatus("queued", `server busy: trying again in ${left} s`);
    };
    show();
    const countdown = setInterval(show, 1000);
    const timer = setTimeout(() => {
      this.stopRetry();
      if (this.ended || this.finishing) return;
      this.setStatus("queued", `server busy: asked again (${this.retries})`);
      this.sendRequest();
    }, delay);
    this.stopRetry = () => {
      clearInterval(countdown);
      clearTimeout(timer);
      this.stopRetry = null;
    };
    return true;
  }

  // Wait for the page's next connection (app.js calls resend() on its greeting)
  // while the request may be asked again; then it ends as disconnected.
  awaitConnection(why) {
    if (this.streaming()) this.since = performance.now(); // (cut now)
    this.stopRetry?.();
    if (this.startedAt === null) this.setStatus("queued", `${why}: asking again once reconnected`);
    else this.setStatus("generating", `${why}: picking the stream up once reconnected`);
    const timer = setTimeout(() => {
      this.stopRetry();
      const message = `the connection to the server was lost (${why})`;
      this.onDone({ id: this.id, status: "error", error: { code: "disconnected", message } })
        .then(() => this.hooks.ended?.(this));
    }, Math.max(0, retry.forMs - (performance.now() - this.since)));
    this.awaiting = true;
    this.stopRetry = () => {
      clearTimeout(timer);
      this.awaiting = false;
      this.stopRetry = null;
    };
    return true;
  }

  // The page is connected again: a request waiting for it is sent.
  resend() {
    if (!this.awaiting) return;
    this.stopRetry();
    this.retries += 1;
    if (this.startedAt === null) {
      this.setStatus("queued", `asked again (${this.retries})`);
    } else {
      // Made again with its seed, and sent from the frame the card has (a
      // file: from its bytes, the packet after those it has); a second
      // version (MBD) comes whole again.
      const params = { ...this.request.params, seed: this.seed };
      const resume = this.format ? { resume: this.fileLength, resume_until: this.until } : { resume: this.frames };
      // (a file of a text typed as it is spoken: where its waits put silence)
      if (this.format && this.request.text_stream) resume.resume_waits = [...this.waits];
      this.request = { ...this.request, params, ...resume, resume_codes: this.joinedCodes() };
      this.renditions = {};
      this.resuming = true;
      const at = (this.format ? this.until / this.streamRate : this.frames / this.sampleRate).toFixed(1);
      this.setStatus("generating", `picking up at ${at} s (${this.retries})`);
    }
    this.sendRequest();
  }

  // The live stream's codes so far, joined (null: none kept).
  joinedCodes() {
    if (!this.codes || this.codeBytes === 0) return null;
    const joined = new Uint8Array(this.codeBytes);
    let at = 0;
    for (const piece of this.codes) {
      joined.set(piece, at);
      at += piece.length;
    }
    return joined;
  }

  // Send the request on the connection new requests go on (it is on that socket
  // from then on), or wait for one.
  sendRequest() {
    if (this.request.text_stream && this.typed) {
      // Asked again (before it started, or picked up): with the text written so far.
      this.request = { ...this.request, prompt: this.request.prompt + this.typed };
      this.typed = "";
    }
    const socket = this.hooks.send(this.request);
    if (socket) {
      this.socket = socket;
      if (this.request.text_stream && this.textEnded) this.hooks.send({ type: "text", id: this.id, end: true }, socket);
    } else {
      this.awaitConnection("not connected");
    }
  }

  // More of a text written as it is spoken (PROTOCOL.md §3.4 text): sent on the
  // request's connection, and kept for a try asked again before it started.
  sendText(text, end = false) {
    if (!this.request?.text_stream || this.textEnded || this.ended || this.finishing) return;
    this.typed = (this.typed ?? "") + text;
    this.textEnded = end;
    const message = { type: "text", id: this.id, text };
    if (end) message.end = true;
    if (this.socket && !this.awaiting && this.stopRetry === null) this.hooks.send(message, this.socket);
  }

  cancel() {
    if (this.stopRetry !== null) {
      // Waiting to ask again: the server holds nothing of it.
      this.stopRetry();
      this.onDone({ id: this.id, status: "cancelled" }).then(() => this.hooks.ended?.(this));
      return;
    }
    this.player?.pause();
    this.setStatus("cancelling", "cancelling…");
    this.hooks.send({ type: "cancel", id: this.id }, this.socket ?? undefined);
  }

  remove() {
    if (!this.ended && !this.finishing) this.cancel();
    this.removed = true;
    this.decoder?.close();
    clearInterval(this.timer);
    this.player?.close();
    this.player = null;
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.el.remove();
    this.hooks.removed(this);
  }

  showError(code, text) {
    const p = $(".error", this.el);
    p.hidden = false;
    p.textContent = FRIENDLY[code] ? `${FRIENDLY[code]} (${text})` : `${text} (${code})`;
    this.errorCode = code;
  }

  tick() {
    const elapsed = (performance.now() - this.sentAt) / 1000;
    $(".s-elapsed", this.el).textContent = `${elapsed.toFixed(1)} s`;
    if (this.startedAt === null) {
      $(".s-wait", this.el).textContent = `${elapsed.toFixed(1)} s`;
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
    if (this.player) this.onPosition(this.player);
    if (this.spectro) this.drawSpectro();
  }

  draw(samples) {
    // One min/max column per pixel over the whole clip, filled as chunks arrive
    // and redrawn with automatic gain (quiet clips stay visible).
    const { width, height } = this.canvas;
    if (this.frames > this.duration * this.sampleRate) {
      // Longer than guessed (speech): double the time scale and redraw it all.
      while (this.frames > this.duration * this.sampleRate) this.duration *= 2;
      if (this.speech) this.duration = Math.min(this.duration, Math.max(this.maxSeconds, this.frames / this.sampleRate));
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

export function paramDefault(model, name) {
  const spec = (model.params || []).find((p) => p.name === name);
  return spec ? spec.default : undefined;
}
