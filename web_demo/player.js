// One player per card: an AudioWorklet node (worklet.js) that plays the live
// stream as it arrives, then the finished clip, with pause, stop and seek.
// Only one player has the speakers at a time: playing one pauses the others.

export const JITTER_SECONDS = 0.15; // audio buffered before playback starts or resumes
export const PLAY_MARGIN = 0.9; // the part of the measured speed counted on (it varies)

// Seconds of audio a player must hold ahead of its playhead to play on to the
// end without running out, where the rest (`remaining` seconds; null: not
// known) comes at `speed` seconds of audio a second (null: not measured):
// none faster than real time (with the margin), else what the rest's slower
// arrival takes away: remaining * (1 - speed) / speed. Unknown, none: the
// jitter buffer alone. (The `wavecast --play` command's rule, play_from.)
export function leadSeconds(remaining, speed) {
  if (remaining === null || speed === null || remaining <= 0) return 0;
  const counted = speed * PLAY_MARGIN;
  if (counted >= 1) return 0;
  if (counted <= 0) return remaining;
  return (remaining * (1 - counted)) / counted;
}

const contexts = new Map(); // sample rate -> Promise<AudioContext> with the worklet loaded

export function audioContext(sampleRate) {
  if (!contexts.has(sampleRate)) {
    contexts.set(sampleRate, (async () => {
      const ctx = new AudioContext({ sampleRate, latencyHint: "interactive" });
      await ctx.audioWorklet.addModule("worklet.js");
      return ctx;
    })());
  }
  return contexts.get(sampleRate);
}

let current = null; // the player that has the speakers
export const playback = { together: false }; // true: cards may play over each other

// Silence whichever card is playing (before a voice preview, say).
export function pauseCurrent() {
  current?.pause();
}

export class Player {
  // events.onState(state), events.onPosition({position, consumed}), events.onError(err)
  constructor({ sampleRate, channels, capacityFrames, paused = false }, events) {
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.events = events;
    this.node = null;
    this.queue = []; // messages posted before the node exists
    this.paused = paused;
    this.state = paused ? "paused" : "waiting";
    this.position = 0; // frames: the playhead
    this.epoch = 0; // stops and seeks so far: the worklet's older reports are stale
    this.consumed = 0; // frames played in all
    this.length = 0; // frames fed
    this.total = null; // seconds of audio in all, as the progress messages give it
    this.first = null; // [when, frames fed then]: the live stream's speed is measured from it
    // Frames the worklet holds before it starts or resumes (leadSeconds): all of
    // them until the second chunk, when the speed is first measured (or the end).
    this.lead = Infinity;
    if (!paused) this.claim();
    this.ready = this.open(capacityFrames);
    this.post({ kind: "lead", frames: this.lead });
  }

  async open(capacityFrames) {
    try {
      const ctx = await audioContext(this.sampleRate);
      if (ctx.state === "suspended") await ctx.resume();
      if (this.closed) return;
      const node = new AudioWorkletNode(ctx, "wavecast-stream-player", {
        numberOfInputs: 0,
        outputChannelCount: [this.channels],
        processorOptions: {
          channels: this.channels,
          capacityFrames,
          startFrames: Math.round(JITTER_SECONDS * this.sampleRate),
          paused: this.paused,
        },
      });
      node.port.onmessage = (event) => this.onMessage(event.data);
      node.connect(ctx.destination);
      this.node = node;
      for (const [message, transfer] of this.queue) node.port.postMessage(message, transfer);
      this.queue = [];
    } catch (err) {
      this.events.onError?.(err);
    }
  }

  post(message, transfer = []) {
    if (this.closed) return;
    if (this.node) this.node.port.postMessage(message, transfer);
    else this.queue.push([message, transfer]);
  }

  onMessage(msg) {
    // A position sent before the worklet saw the last stop or seek is stale (the
    // playhead would jump back until the next report).
    if (msg.position !== undefined && msg.epoch === this.epoch) this.position = msg.position;
    if (msg.consumed !== undefined) this.consumed = msg.consumed;
    if (msg.kind === "state") {
      this.state = msg.state;
      if (msg.state === "finished") this.release();
      this.events.onState?.(msg.state);
    }
    this.events.onPosition?.(this);
  }

  claim() {
    if (current && current !== this && !playback.together) current.pause();
    current = this;
  }

  release() {
    this.paused = true;
    if (current === this) current = null;
  }

  feed(samples) {
    this.length += samples.length / this.channels;
    this.post({ kind: "chunk", samples }, [samples.buffer]);
    // Where the audio comes slower than real time, the worklet holds enough
    // before it starts or resumes that it does not stop again.
    const now = performance.now();
    if (this.first === null) {
      this.first = [now, this.length];
      return;
    }
    const [began, fed] = this.first;
    const speed = now > began ? (this.length - fed) / this.sampleRate / ((now - began) / 1000) : null;
    const remaining = this.total === null ? null : this.total - this.length / this.sampleRate;
    const lead = Math.round(leadSeconds(remaining, speed) * this.sampleRate);
    if (lead !== this.lead) {
      this.lead = lead;
      this.post({ kind: "lead", frames: lead });
    }
  }

  end() { this.post({ kind: "end" }); }

  play() {
    this.claim();
    this.paused = false;
    this.state = "waiting";
    audioContext(this.sampleRate).then((ctx) => ctx.resume()).catch(() => {});
    this.post({ kind: "play" });
    this.events.onState?.(this.state);
  }

  pause() {
    this.release();
    this.state = "paused";
    this.post({ kind: "pause" });
    this.events.onState?.(this.state);
  }

  stop() {
    this.release();
    this.state = "paused";
    this.position = 0;
    this.epoch += 1;
    this.post({ kind: "stop", epoch: this.epoch });
    this.events.onState?.(this.state);
    this.events.onPosition?.(this);
  }

  seek(frame) {
    this.position = Math.max(0, Math.min(this.length, Math.round(frame)));
    this.epoch += 1;
    this.post({ kind: "seek", frame: this.position, epoch: this.epoch });
    this.events.onPosition?.(this);
  }

  // Another rendition of the whole clip, at the same position.
  load(samples) {
    this.length = samples.length / this.channels;
    this.post({ kind: "load", samples }, [samples.buffer]);
  }

  get playing() { return !this.paused; }

  close() {
    this.release();
    this.post({ kind: "close" });
    this.closed = true;
    if (this.node) this.node.disconnect();
    this.node = null;
    this.queue = [];
  }
}
