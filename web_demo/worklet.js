// AudioWorklet player: a bounded ring buffer of interleaved float samples fed
// by the page, with a small jitter buffer. Playback starts once `startFrames`
// are buffered (or the stream has ended); if it catches up with generation it
// waits ("buffering") and resumes once enough is buffered again. Chunks join
// sample by sample, so there are no clicks at chunk seams.
class StreamPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.channels = o.channels;
    this.capacity = o.capacityFrames; // bounded: the longest clip the server makes
    this.startFrames = o.startFrames;
    this.ring = new Float32Array(this.capacity * this.channels);
    this.readPos = 0; // frames
    this.writePos = 0; // frames
    this.ended = false;
    this.playing = false;
    this.stopped = false;
    this.consumed = 0;
    this.underruns = 0;
    this.lastReport = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.kind === "chunk") {
      const frames = msg.samples.length / this.channels;
      const free = this.capacity - (this.writePos - this.readPos);
      const n = Math.min(frames, free); // never grows past its bound
      for (let i = 0; i < n * this.channels; i++) {
        this.ring[((this.writePos * this.channels) + i) % this.ring.length] = msg.samples[i];
      }
      this.writePos += n;
      if (n < frames) this.port.postMessage({ kind: "overflow", dropped: frames - n });
    } else if (msg.kind === "end") {
      this.ended = true;
    } else if (msg.kind === "stop") {
      this.stopped = true;
      this.readPos = this.writePos;
    }
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const frames = out[0].length;
    const buffered = this.writePos - this.readPos;
    if (!this.playing && !this.stopped && (buffered >= this.startFrames || (this.ended && buffered > 0))) {
      this.playing = true;
      this.port.postMessage({ kind: "state", state: "playing", consumed: this.consumed });
    }
    let n = 0;
    if (this.playing && !this.stopped) {
      n = Math.min(frames, buffered);
      for (let f = 0; f < n; f++) {
        const base = ((this.readPos + f) * this.channels) % this.ring.length;
        for (let c = 0; c < out.length; c++) {
          out[c][f] = this.ring[base + Math.min(c, this.channels - 1)];
        }
      }
      this.readPos += n;
      this.consumed += n;
      if (n < frames) {
        for (let c = 0; c < out.length; c++) out[c].fill(0, n);
        if (this.ended) {
          this.playing = false;
          this.stopped = true;
          this.port.postMessage({ kind: "state", state: "finished", consumed: this.consumed });
        } else {
          this.playing = false;
          this.underruns += 1;
          this.port.postMessage({ kind: "state", state: "buffering", consumed: this.consumed });
        }
      }
    } else {
      for (let c = 0; c < out.length; c++) out[c].fill(0);
    }
    if (currentTime - this.lastReport > 0.05) {
      this.lastReport = currentTime;
      this.port.postMessage({ kind: "position", consumed: this.consumed, buffered: this.writePos - this.readPos, underruns: this.underruns });
    }
    return !this.stopped;
  }
}

registerProcessor("wavecast-stream-player", StreamPlayer);
