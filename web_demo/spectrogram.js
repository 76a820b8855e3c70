// A clip's spectrogram, for the card's second view: short-time Fourier
// magnitudes (Hann window) in decibels, one column per pixel.

// In-place radix-2 FFT of `re`, `im` (length a power of two).
export function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const angle = (-2 * Math.PI) / len;
    const wr = Math.cos(angle), wi = Math.sin(angle);
    for (let i = 0; i < n; i += len) {
      let cr = 1, ci = 0;
      for (let k = 0; k < len / 2; k++) {
        const a = i + k, b = a + len / 2;
        const tr = re[b] * cr - im[b] * ci;
        const ti = re[b] * ci + im[b] * cr;
        re[b] = re[a] - tr; im[b] = im[a] - ti;
        re[a] += tr; im[a] += ti;
        [cr, ci] = [cr * wr - ci * wi, cr * wi + ci * wr];
      }
    }
  }
}

// Magnitudes in dB, `columns` x `size / 2` (column-major), of the first channel
// of interleaved `samples`; columns spread evenly over `totalFrames` (the
// clip's expected length: a stream still arriving fills the left part).
export function spectrogram(samples, channels, { size = 1024, columns = 800, totalFrames } = {}) {
  const frames = Math.floor(samples.length / channels);
  const span = Math.max(totalFrames ?? frames, frames, 1);
  const bins = size / 2;
  const data = new Float32Array(columns * bins).fill(-Infinity);
  const window = new Float32Array(size);
  for (let i = 0; i < size; i++) window[i] = 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / (size - 1));
  const re = new Float32Array(size), im = new Float32Array(size);
  let filled = 0;
  for (let c = 0; c < columns; c++) {
    const center = Math.floor(((c + 0.5) / columns) * span);
    if (center >= frames) break;
    const start = center - size / 2;
    for (let i = 0; i < size; i++) {
      const f = start + i;
      re[i] = f >= 0 && f < frames ? samples[f * channels] * window[i] : 0;
      im[i] = 0;
    }
    fft(re, im);
    for (let b = 0; b < bins; b++) {
      data[c * bins + b] = 10 * Math.log10(re[b] * re[b] + im[b] * im[b] + 1e-12);
    }
    filled = c + 1;
  }
  return { columns, bins, filled, data };
}

// Paint it: low frequencies at the bottom, the loudest 80 dB in colour.
export function drawSpectrogram(canvas, spec) {
  const { width, height } = canvas;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  let top = -Infinity;
  for (let i = 0; i < spec.filled * spec.bins; i++) if (spec.data[i] > top) top = spec.data[i];
  for (let x = 0; x < width; x++) {
    const c = Math.min(spec.columns - 1, Math.floor((x / width) * spec.columns));
    if (c >= spec.filled) continue;
    for (let y = 0; y < height; y++) {
      const b = Math.min(spec.bins - 1, Math.floor(((height - 1 - y) / height) * spec.bins));
      const level = Math.max(0, Math.min(1, (spec.data[c * spec.bins + b] - (top - 80)) / 80));
      const at = (y * width + x) * 4;
      image.data[at] = Math.round(255 * Math.min(1, level * 1.6));
      image.data[at + 1] = Math.round(255 * level * level);
      image.data[at + 2] = Math.round(120 + 100 * level - 120 * level * level);
      image.data[at + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}
