// A stream of an encoded format (PROTOCOL.md §4.5: one Ogg Opus, MP3 or FLAC
// file, its bytes in pieces) played as it comes: the file is cut into the
// codec's packets here, and the browser's decoder (WebCodecs' AudioDecoder)
// turns them into samples, in order.
//
// WebCodecs needs a secure context (https, or this computer: localhost,
// 127.0.0.1): elsewhere `decodable()` is false and the page streams PCM.

// The formats, as the page offers them (the server's bit rates: §3.1).
export const ENCODED = {
  opus: { label: "Opus", suffix: "opus", mime: "audio/ogg; codecs=opus" },
  mp3: { label: "MP3", suffix: "mp3", mime: "audio/mpeg" },
  flac: { label: "FLAC", suffix: "flac", mime: "audio/flac" },
};

// LAME's delay: an MP3 stream's first samples are the encoder's, not the audio's
// (its file has no tag to say so: it is written as it streams).
export const MP3_DELAY = 1105;

export function decodable() {
  return typeof AudioDecoder === "function" && typeof EncodedAudioChunk === "function";
}

// The formats this browser's decoder takes (a browser may lack a codec).
export async function decodableFormats() {
  if (!decodable()) return [];
  const codecs = { opus: [48000, 2], mp3: [44100, 2], flac: [44100, 2] };
  const taken = [];
  for (const [format, [sampleRate, numberOfChannels]] of Object.entries(codecs)) {
    try {
      const { supported } = await AudioDecoder.isConfigSupported({ codec: format, sampleRate, numberOfChannels });
      if (supported) taken.push(format);
    } catch {
      // (not this one)
    }
  }
  return taken;
}

function ascii(bytes, at, length) {
  return String.fromCharCode(...bytes.subarray(at, at + length));
}

// -- Ogg (RFC 3533): pages of lacing-delimited packets ------------------------

export class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // a packet's pieces, across pages
  }

  // The whole packets the bytes complete: {data, granule, last}, the granule
  // position (-1: none) on a page's last packet, `last` on the stream's.
  push(bytes) {
    this.buffer = concat(this.buffer, bytes);
    const packets = [];
    let at = 0;
    for (;;) {
      const b = this.buffer;
      if (b.length - at < 27) break;
      if (ascii(b, at, 4) !== "OggS") throw new Error("not an Ogg page");
      const segments = b[at + 26];
      if (b.length - at < 27 + segments) break;
      let size = 0;
      for (let i = 0; i < segments; i++) size += b[at + 27 + i];
      if (b.length - at < 27 + segments + size) break;
      const granule = Number(new DataView(b.buffer, b.byteOffset + at).getBigInt64(6, true));
      const first = packets.length;
      let data = at + 27 + segments;
      for (let i = 0; i < segments; i++) {
        const lace = b[at + 27 + i];
        this.partial.push(b.subarray(data, data + lace));
        data += lace;
        if (lace < 255) {
          packets.push({ data: join(this.partial), granule: -1, last: false });
          this.partial = [];
        }
      }
      if (packets.length > first) {
        packets.at(-1).granule = granule;
        packets.at(-1).last = Boolean(b[at + 5] & 4);
      }
      at = data;
    }
    this.buffer = this.buffer.slice(at);
    return packets;
  }
}

// -- MP3: frames found by their headers ------------------------------------------

const MP3_KBPS = {
  1: [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
  2: [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
};
const MP3_RATES = { 3: [44100, 48000, 32000], 2: [22050, 24000, 16000], 0: [11025, 12000, 8000] };

// A Layer III frame's header at `at`: its length, samples and rate, or null.
export function mp3Frame(b, at) {
  if (b[at] !== 0xff || (b[at + 1] & 0xe0) !== 0xe0) return null;
  const version = (b[at + 1] >> 3) & 3; // 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
  const layer = (b[at + 1] >> 1) & 3;
  const rateIndex = (b[at + 2] >> 2) & 3;
  const kbps = MP3_KBPS[version === 3 ? 1 : 2][b[at + 2] >> 4];
  if (version === 1 || layer !== 1 || rateIndex === 3 || !kbps) return null;
  const rate = MP3_RATES[version][rateIndex];
  const samples = version === 3 ? 1152 : 576;
  const padding = (b[at + 2] >> 1) & 1;
  const channels = b[at + 3] >> 6 === 3 ? 1 : 2;
  return { length: Math.floor((samples / 8) * kbps * 1000 / rate) + padding, samples, rate, channels };
}

export class Mp3Reader {
  constructor() {
    this.buffer = new Uint8Array(0);
  }

  // The whole frames the bytes complete ({data, samples, rate, channels}).
  push(bytes) {
    this.buffer = concat(this.buffer, bytes);
    const frames = [];
    let at = 0;
    while (this.buffer.length - at >= 4) {
      const frame = mp3Frame(this.buffer, at);
      if (!frame) throw new Error("not an MP3 frame");
      if (this.buffer.length - at < frame.length) break;
      frames.push({ ...frame, data: this.buffer.slice(at, at + frame.length) });
      at += frame.length;
    }
    this.buffer = this.buffer.slice(at);
    return frames;
  }
}

// -- FLAC: metadata, then frames told apart by their headers' and their own CRCs --

const CRC8 = new Uint8Array(256);
const CRC16 = new Uint16Array(256);
for (let n = 0; n < 256; n++) {
  let c8 = n;
  let c16 = n << 8;
  for (let k = 0; k < 8; k++) {
    c8 = c8 & 0x80 ? ((c8 << 1) ^ 0x07) & 0xff : (c8 << 1) & 0xff;
    c16 = c16 & 0x8000 ? ((c16 << 1) ^ 0x8005) & 0xffff : (c16 << 1) & 0xffff;
  }
  CRC8[n] = c8;
  CRC16[n] = c16;
}

function crc8(b, from, to) {
  let c = 0;
  for (let i = from; i < to; i++) c = CRC8[c ^ b[i]];
  return c;
}

function crc16(b, from, to) {
  let c = 0;
  for (let i = from; i < to; i++) c = ((c << 8) & 0xffff) ^ CRC16[(c >> 8) ^ b[i]];
  return c;
}

// Whether a frame header (with a good CRC-8) starts at `at`.
export function flacHeader(b, at) {
  if (b.length - at < 6 || b[at] !== 0xff || (b[at + 1] & 0xfe) !== 0xf8) return false;
  const blockCode = b[at + 2] >> 4;
  const rateCode = b[at + 2] & 15;
  if (blockCode === 0 || rateCode === 15 || (b[at + 3] >> 4) > 10 || (b[at + 3] & 1)) return false;
  let n = at + 4;
  // The frame (or sample) number, UTF-8 style: the lead byte says how many follow.
  const lead = b[n];
  const more = lead < 0x80 ? 0 : lead >= 0xfe ? 6 : Math.clz32(~(lead << 24)) - 1;
  if (more < 0 || (lead >= 0x80 && lead < 0xc0)) return false;
  n += 1 + more;
  if (blockCode === 6) n += 1;
  else if (blockCode === 7) n += 2;
  if (rateCode === 12) n += 1;
  else if (rateCode === 13 || rateCode === 14) n += 2;
  return n < b.length && crc8(b, at, n) === b[n];
}

export class FlacReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.description = null; // "fLaC" and the metadata blocks: the decoder's config
    this.rate = 0;
    this.channels = 0;
    this.search = 0; // where to look next for the following frame's header
  }

  // The whole frames the bytes complete; `end`: the rest is the last frame.
  push(bytes, end = false) {
    this.buffer = concat(this.buffer, bytes);
    const b = this.buffer;
    if (!this.description) {
      if (b.length >= 4 && ascii(b, 0, 4) !== "fLaC") throw new Error("not a FLAC file");
      let at = 4;
      for (;;) {
        if (b.length < at + 4) return [];
        const last = b[at] & 0x80;
        const length = (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3];
        if (b.length < at + 4 + length) return [];
        if ((b[at] & 0x7f) === 0) {
          // STREAMINFO: 20 bits of rate, 3 of channels - 1.
          this.rate = (b[at + 14] << 12) | (b[at + 15] << 4) | (b[at + 16] >> 4);
          this.channels = ((b[at + 16] >> 1) & 7) + 1;
        }
        at += 4 + length;
        if (last) break;
      }
      this.description = b.slice(0, at);
      this.buffer = b.slice(at);
      this.search = 0;
      return this.push(new Uint8Array(0), end);
    }
    // A frame ends where the next valid header starts and its own CRC-16 holds
    // (a header's pattern inside a frame's data fails one or the other).
    const frames = [];
    let start = 0;
    let at = Math.max(this.search, 2);
    while (at < b.length) {
      if (b[at] === 0xff && flacHeader(b, at) && crc16(b, start, at) === 0) {
        frames.push(b.slice(start, at));
        start = at;
        at += 2;
      } else {
        at += 1;
      }
    }
    if (end && start < b.length) {
      frames.push(b.slice(start));
      start = b.length;
    }
    this.buffer = b.slice(start);
    // Headers are checked again once more bytes come: a header cut short at the end.
    this.search = Math.max(2, b.length - start - 16);
    return frames;
  }
}

// -- the decoder ------------------------------------------------------------------

// Decodes one stream's file as its bytes come: `onSamples(Float32Array)` gets
// interleaved samples, in order, the format's delay taken off the front;
// `end()` resolves once every sample is out. `limit` (frames, if known) cuts
// the tail (a codec's last frame is padded).
export class StreamDecoder {
  constructor(format, { sampleRate, channels, onSamples, onError }) {
    this.format = format;
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.onSamples = onSamples;
    this.onError = onError;
    this.reader = format === "opus" ? new OggReader() : format === "mp3" ? new Mp3Reader() : new FlacReader();
    this.decoder = null;
    this.timestamp = 0; // microseconds, of the next packet
    this.skip = format === "mp3" ? MP3_DELAY : 0; // frames still to drop at the front
    this.frames = 0; // frames given out
    this.limit = Infinity;
    this.packets = 0;
    this.failed = null;
  }

  configure(config) {
    this.decoder = new AudioDecoder({
      output: (data) => this.output(data),
      error: (err) => this.fail(err),
    });
    this.decoder.configure(config);
  }

  fail(err) {
    if (this.failed) return;
    this.failed = err;
    this.onError?.(err);
  }

  push(bytes, end = false) {
    if (this.failed) return;
    try {
      if (this.format === "opus") this.pushOpus(bytes);
      else if (this.format === "mp3") this.pushMp3(bytes);
      else this.pushFlac(bytes, end);
    } catch (err) {
      this.fail(err);
    }
  }

  pushOpus(bytes) {
    for (const { data: packet, granule, last } of this.reader.push(bytes)) {
      this.packets += 1;
      if (this.packets === 1) {
        if (ascii(packet, 0, 8) !== "OpusHead") throw new Error("not an Ogg Opus file");
        // (The decoder takes the pre-skip off itself: it reads the header.)
        this.preSkip = packet[10] | (packet[11] << 8);
        this.configure({ codec: "opus", sampleRate: this.sampleRate, numberOfChannels: packet[9], description: packet });
        this.at48 = 0; // 48 kHz samples in the packets so far
        continue;
      }
      if (this.packets === 2) continue; // (OpusTags)
      this.at48 += opusSamples(packet, 48000);
      // Granule positions count 48 kHz samples from an origin, the first page's
      // position less its samples (RFC 7845 §4); the last page's says where the
      // audio ends, pre-skip included: the last packet's padding is cut there.
      if (granule >= 0 && this.origin === undefined) this.origin = granule - this.at48;
      if (last && granule >= 0) {
        const rate = this.outputRate ?? 48000; // (Chromium's Opus decoder gives 48 kHz)
        this.limit = Math.max(0, Math.round(((granule - this.origin - this.preSkip) * rate) / 48000));
      }
      this.decode(packet, opusSamples(packet, this.sampleRate));
    }
  }

  pushMp3(bytes) {
    for (const frame of this.reader.push(bytes)) {
      if (!this.decoder) {
        this.configure({ codec: "mp3", sampleRate: frame.rate, numberOfChannels: frame.channels });
      }
      this.decode(frame.data, frame.samples);
    }
  }

  pushFlac(bytes, end) {
    for (const frame of this.reader.push(bytes, end)) {
      if (!this.decoder) {
        this.configure({
          codec: "flac", sampleRate: this.reader.rate, numberOfChannels: this.reader.channels,
          description: this.reader.description,
        });
      }
      this.decode(frame, 0);
    }
  }

  decode(data, samples) {
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestamp, data }));
    this.timestamp += Math.round((samples * 1e6) / this.sampleRate);
  }

  output(data) {
    try {
      const frames = data.numberOfFrames;
      const channels = data.numberOfChannels;
      const out = new Float32Array(frames * channels);
      if (data.format === "f32") {
        data.copyTo(out, { planeIndex: 0 });
      } else {
        // Planar (or integer) output: each channel's plane as float, interleaved here.
        const plane = new Float32Array(frames);
        for (let c = 0; c < channels; c++) {
          data.copyTo(plane, { planeIndex: c, format: "f32-planar" });
          for (let f = 0; f < frames; f++) out[f * channels + c] = plane[f];
        }
      }
      this.outputRate = data.sampleRate;
      data.close();
      let from = 0;
      if (this.skip > 0) {
        from = Math.min(frames, this.skip);
        this.skip -= from;
      }
      const to = Math.min(frames, from + Math.max(0, this.limit - this.frames));
      if (to > from) {
        this.frames += to - from;
        this.onSamples(out.subarray(from * channels, to * channels), this.outputRate);
      }
    } catch (err) {
      this.fail(err);
    }
  }

  // The bytes so far end where a frame does (the server's file at a wait for
  // text, PROTOCOL.md §4.8): a FLAC frame held for the next one's header, out.
  flush() {
    if (this.format === "flac") this.push(new Uint8Array(0), true);
  }

  // The file is whole (`whole`; or the stream broke off): the rest out.
  // Resolves to the frames given out.
  async end(whole = true) {
    if (whole) this.push(new Uint8Array(0), true);
    if (this.decoder && !this.failed) {
      try {
        await this.decoder.flush();
      } catch (err) {
        this.fail(err);
      }
    }
    this.close();
    return this.frames;
  }

  close() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
  }
}

// An Opus packet's samples at `rate` (RFC 6716 §3.1: its TOC byte and frame count).
export function opusSamples(packet, rate) {
  const toc = packet[0];
  const config = toc >> 3;
  const sizes = config < 12 ? [10, 20, 40, 60] : config < 16 ? [10, 20] : [2.5, 5, 10, 20];
  const ms = config < 12 ? sizes[config & 3] : config < 16 ? sizes[config & 1] : sizes[config & 3];
  const code = toc & 3;
  const count = code === 0 ? 1 : code === 3 ? packet[1] & 0x3f : 2;
  return Math.round((ms * count * rate) / 1000);
}

function concat(a, b) {
  if (!a.length) return b.slice();
  if (!b.length) return a;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function join(parts) {
  if (parts.length === 1) return parts[0].slice();
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
