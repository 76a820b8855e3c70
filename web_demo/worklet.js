// AudioWorklet player: the clip's interleaved float samples, fed by the page as
// they arrive, played with a small jitter buffer. Playback starts once
// `startFrames` are buffered (or the stream has ended); if it catches up with
// generation it waits ("buffering") and resumes once enough is buffered again.
// Chunks join sample by sample, so there are no clicks at chunk seams.
//
// The whole clip is kept (up to `capacityFrames`, a bound the page sets from
// the longest clip the server makes), so the same player pauses, resumes,
// stops, seeks and plays the finished clip again; `load` swaps in another
// rendition of the clip at the same position. The buffer grows by doubling.
//
// Where the audio comes slower than real time, the page raises the amount held
// before a start or a resume (`lead {frames}`: what covers the rest at the
// speed it measures; all of it until it has measured it), so that playback
// does not stop and start again.
//
// Messages in: chunk {samples}, end, lead {frames}, play, pause, stop {epoch},
// seek {frame, epoch}, load {samples}, close. Out: state {state:
// waiting|playing|buffering|paused|finished}, position {position, consumed,
// buffered, underruns}, overflow.
// Every position out carries the epoch of the last stop or seek it follows, so
// that the page can tell a report sent before its last move from one after.
const INITIAL_FRAMES = 32768;

class StreamPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.channels = o.channels;
    this.capacity = o.capacityFrames;
    this.startFrames = o.startFrames;
    this.leadFrames = 0; // more held before a start or resume (the page's `lead`)
    this.samples = new Float32Array(Math.min(this.capacity, INITIAL_FRAMES) * this.channels);
    this.length = 0; // frames received
    this.readPos = 0; // frames: the playhead
    this.ended = false;
    this.paused = Boolean(o.paused);
    this.state = "waiting";
    this.closed = false;
    this.consumed = 0; // frames played, in all (seeks do not change it)
    this.underruns = 0;
    this.lastReport = 0;
    this.epoch = 0; // the last stop or seek's (the page's count)
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.port.postMessage({
      kind: "state",
      state,
      position: this.readPos,
      consumed: this.consumed,
      epoch: this.epoch,
    });
  }

  append(samples) {
    const frames = samples.length / this.channels;
    const n = Math.min(frames, this.capacity - this.length); // never grows past its bound
    const needed = (this.length + n) * this.channels;
    if (needed > this.samples.length) {
      let size = this.samples.length;
      while (size < needed) size *= 2;
      const grown = new Float32Array(Math.min(size, this.capacity * this.channels));
      grown.set(this.samples.subarray(0, this.length * this.channels));
      this.samples = grown;
    }
    this.samples.set(samples.subarray(0, n * this.channels), this.length * this.channels);
    this.length += n;
    if (n < frames) this.port.postMessage({ kind: "overflow", dropped: frames - n });
  }

  onMessage(msg) {
    switch (msg.kind) {
      case "chunk":
        this.append(msg.samples);
        break;
      case "end":
        this.ended = true;
        break;
      case "lead":
        this.leadFrames = Math.max(0, msg.frames);
        break;
      case "load": // another rendition of the whole clip, at the same position
        this.length = 0;
        this.append(msg.samples);
        this.ended = true;
        this.readPos = Math.min(this.readPos, this.length);
        break;
      case "play":
        if (this.ended && this.readPos >= this.length) this.readPos = 0; // again
        this.paused = false;
        if (this.state === "paused" || this.state === "finished") this.setState("waiting");
        break;
      case "pause":
        this.paused = true;
        this.setState("paused");
        break;
      case "stop":
        this.epoch = msg.epoch ?? this.epoch;
        this.paused = true;
        this.readPos = 0;
        this.setState("paused");
        break;
      case "seek":
        this.epoch = msg.epoch ?? this.epoch;
        this.readPos = Math.max(0, Math.min(this.length, Math.round(msg.frame)));
        if (this.state === "finished" && this.readPos < this.length) this.setState("paused");
        break;
      case "close":
        this.closed = true;
        break;
    }
    this.report();
  }

  report() {
    this.port.postMessage({
      kind: "position",
      position: this.readPos,
      consumed: this.consumed,
      buffered: this.length - this.readPos,
      underruns: this.underruns,
      epoch: this.epoch,
    });
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const frames = out[0].length;
    const buffered = this.length - this.readPos;
    if (!this.paused && this.state !== "playing" && this.state !== "finished") {
      const needed = Math.max(this.startFrames, this.leadFrames);
      if (buffered >= needed || (this.ended && buffered > 0)) this.setState("playing");
      else if (this.ended && buffered === 0) {
        // Playback caught up with generation and then the stream ended: nothing
        // is left to wait for.
        this.paused = true;
        this.setState("finished");
      }
    }
    let n = 0;
    if (this.state === "playing") {
      n = Math.min(frames, buffered);
      for (let f = 0; f < n; f++) {
        const base = (this.readPos + f) * this.channels;
        for (let c = 0; c < out.length; c++) {
          out[c][f] = this.samples[base + Math.min(c, this.channels - 1)];
        }
      }
      this.readPos += n;
      this.consumed += n;
      if (n < frames) {
        if (this.ended) {
          this.paused = true;
          this.setState("finished");
        } else {
          this.underruns += 1;
          this.setState("buffering");
        }
      }
    }
    for (let c = 0; c < out.length; c++) out[c].fill(0, n);
    if (currentTime - this.lastReport > 0.05) {
      this.lastReport = currentTime;
      this.report();
    }
    return !this.closed;
  }
}

registerProcessor("wavecast-stream-player", StreamPlayer);
