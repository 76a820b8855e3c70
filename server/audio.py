"""Audio in and out: PCM conversion and output rates (PROTOCOL.md §4.5), uploaded
files (§3.1)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr  # (at start-up, not on the inference thread at a request: 0.1 s)

from wavecast.protocol import InvalidField

__all__ = [
    "Resampler",
    "alaw",
    "decode_upload",
    "mulaw",
    "resample",
    "resampled_from",
    "to_pcm",
    "to_wav",
    "warm_resample_start",
]

# soxr's "high quality" (20-bit precision, a pass band to 91% of the lower rate's
# Nyquist): past what 16-bit output holds; 0.1-0.4 ms per second of audio. It gives
# its output in blocks, so a small first chunk may give none, its samples coming
# with the next (bench/RESULTS.md: a polyphase filter giving every sample at once
# cost 10-25x more).
RESAMPLE_QUALITY = "HQ"

# A resampler begun this long before a stream's frame gives the stream's samples
# from there on as one begun at its start does, to a float's rounding (soxr's
# filter has settled: within 2e-7 at 8-192 kHz from 24 and 32 kHz after 20 ms;
# bench/RESULTS.md).
WARM_RESAMPLE_SECONDS = 0.1


class Resampler:
    """A stream's audio at another rate, chunk by chunk (PROTOCOL.md §4.5).

    soxr holds back the last few tens of milliseconds until more come or the
    stream ends (``last``). The chunks' concatenation is the whole stream
    resampled at once (:func:`resample`), bit for bit, however it was cut.
    """

    def __init__(self, source: int, target: int, channels: int) -> None:
        self._stream = soxr.ResampleStream(
            source, target, channels, dtype="float32", quality=RESAMPLE_QUALITY
        )
        self.ended = False

    def push(
        self, audio: npt.NDArray[np.float32], *, last: bool = False
    ) -> npt.NDArray[np.float32]:
        """``[frames, channels]`` at the source rate in, what is ready at the target out."""
        if self.ended:
            raise RuntimeError("the stream has ended")
        self.ended = last
        out: npt.NDArray[np.float32] = self._stream.resample_chunk(
            np.ascontiguousarray(audio, dtype=np.float32), last=last
        )
        return out


def _steps(source: int, target: int) -> tuple[int, int]:
    """The frames at ``source`` and at ``target`` that span the same time, fewest."""
    common = math.gcd(source, target)
    return source // common, target // common


def warm_resample_start(source: int, target: int, frame: int) -> int:
    """The frame at ``source`` from which a stream, resampled to ``target``,
    is resampled again to give its samples from ``frame`` (at ``target``) on:
    ``WARM_RESAMPLE_SECONDS`` before, and a step of the rates' ratio more (the
    resampler begins where the two rates' frames meet, ``resampled_from``)."""
    step, _ = _steps(source, target)
    warm = round(WARM_RESAMPLE_SECONDS * source) + step
    return max(0, frame * source // target - warm)


def resampled_from(source: int, target: int, frame: int) -> tuple[int, int]:
    """Where a stream's audio at ``source`` from ``frame`` on is resampled from
    as the whole stream is: the first frame at or after it where a frame at
    ``source`` and one at ``target`` begin at once, and that frame at
    ``target``."""
    step, other = _steps(source, target)
    first = -(-frame // step)
    return first * step, first * other


def resample(audio: npt.NDArray[np.float32], source: int, target: int) -> npt.NDArray[np.float32]:
    """A whole ``[frames, channels]`` clip at another rate, as :class:`Resampler` makes it."""
    if audio.shape[0] == 0:
        return np.zeros((0, audio.shape[1]), dtype=np.float32)
    out: npt.NDArray[np.float32] = soxr.resample(
        np.ascontiguousarray(audio, dtype=np.float32), source, target, quality=RESAMPLE_QUALITY
    )
    return out.reshape(-1, audio.shape[1])


def to_pcm(audio: npt.NDArray[np.float32], fmt: str) -> bytes:
    """Interleave ``[frames, channels]`` float audio into the bytes of a format:
    little-endian 16-bit or float PCM, or G.711 (from the 16-bit samples)."""
    if fmt == "pcm_f32le":
        return np.ascontiguousarray(audio, dtype="<f4").tobytes()
    scaled = np.rint(np.clip(audio, -1.0, 1.0) * 32767.0)
    if fmt == "pcm_s16le":
        return np.ascontiguousarray(scaled, dtype="<i2").tobytes()
    if fmt == "pcm_mulaw":
        return mulaw(scaled.astype(np.int32)).tobytes()
    if fmt == "pcm_alaw":
        return alaw(scaled.astype(np.int32)).tobytes()
    raise ValueError(f"unknown PCM format {fmt!r}")


# G.711's segment ends, searched as the reference coder (Sun's g711.c, which
# Python's audioop ran) searches them: the same code for every 16-bit sample.
_MULAW_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def mulaw(samples: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    """16-bit samples (as int32) to G.711 mu-law codes."""
    x = samples >> 2  # 14 bits
    magnitude = np.minimum(np.abs(x), 8159) + 0x21  # clipped, biased
    segment = np.searchsorted(_MULAW_ENDS, magnitude)
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0xF))
    return (code ^ np.where(x < 0, 0x7F, 0xFF)).astype(np.uint8)


def alaw(samples: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    """16-bit samples (as int32) to G.711 A-law codes."""
    x = samples >> 3  # 13 bits
    magnitude = np.where(x < 0, -x - 1, x)
    segment = np.searchsorted(_ALAW_ENDS, magnitude)
    step = np.where(segment < 2, 1, segment)
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> step) & 0xF))
    return (code ^ np.where(x < 0, 0x55, 0xD5)).astype(np.uint8)


def to_wav(audio: npt.NDArray[np.float32], rate: int) -> bytes:
    """``[frames]`` or ``[frames, channels]`` float audio as a 16-bit PCM WAV file."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


# Samples a second an upload may decode to (its rate times its channels):
# 192 kHz in stereo, 48 kHz in 8 channels. With ``max_seconds``, what bounds
# the memory its decoding takes, whatever a compressed file holds.
MAX_SAMPLES_PER_SECOND = 384_000


class _OverLimit(Exception):
    """An upload lasts longer, or holds more samples a second, than is decoded:
    ``what`` says which."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def decode_upload(
    data: bytes, *, field: str, max_seconds: float
) -> tuple[npt.NDArray[np.float32], int]:
    """Decode an uploaded audio file into float32 ``[frames, channels]`` and its rate.

    WAV, FLAC, OGG/Vorbis/Opus and MP3 go through libsndfile (soundfile); other
    containers (M4A/AAC, WebM from a browser's recorder) through FFmpeg (av).
    Decoding stops past ``max_seconds`` (a few compressed bytes may hold hours
    of silence: a 0.5 MB FLAC decoded whole took 0.66 GB), and a file of more
    than ``MAX_SAMPLES_PER_SECOND`` samples a second is not decoded.

    Raises:
        InvalidField: The bytes are not audio, hold no samples, last longer
            than ``max_seconds`` or hold too many samples a second.
    """
    try:
        try:
            audio, rate = _decode_soundfile(data, max_seconds)
        except _OverLimit:
            raise
        except Exception:
            audio, rate = _decode_av(data, max_seconds)
    except _OverLimit as exc:
        raise InvalidField(f"{field} {exc.what}", field=field) from None
    except Exception as exc:
        raise InvalidField(
            f"{field} could not be decoded as audio (WAV, FLAC, OGG, MP3, M4A or WebM)",
            field=field,
        ) from exc
    if audio.shape[0] == 0 or rate <= 0:
        raise InvalidField(f"{field} holds no audio", field=field)
    if not np.isfinite(audio).all():
        raise InvalidField(f"{field} holds non-finite samples", field=field)
    return np.ascontiguousarray(audio, dtype=np.float32), int(rate)


def _bounded(rate: int, channels: int, max_seconds: float) -> int:
    """The frames a file of ``rate`` and ``channels`` may hold (``_OverLimit``
    where a second of it is more samples than are decoded)."""
    if rate * channels > MAX_SAMPLES_PER_SECOND:
        raise _OverLimit(
            f"has {channels} channel(s) at {rate} Hz: at most {MAX_SAMPLES_PER_SECOND:,} "
            "samples a second (rate times channels) are decoded"
        )
    return int(max_seconds * rate)


def _too_long(seconds: float | None, max_seconds: float) -> _OverLimit:
    lasts = f"lasts {seconds:.1f} s" if seconds is not None else "lasts longer"
    return _OverLimit(f"{lasts}; at most {max_seconds:g} s are accepted")


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[npt.NDArray[np.float32], int]:
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as file:
        rate = int(file.samplerate)
        most = _bounded(rate, file.channels, max_seconds)
        # (As its header says; libsndfile says 2**63 - 1 where it does not know,
        # as a FLAC file written as it was recorded may have it.)
        if rate > 0 and most < file.frames < 1 << 62:
            raise _too_long(file.frames / rate, max_seconds)
        # One frame more than it may hold: a header that says less is not believed.
        audio = file.read(most + 1, dtype="float32", always_2d=True)
        if audio.shape[0] > most:
            raise _too_long(None, max_seconds)
    return audio, rate


def _decode_av(data: bytes, max_seconds: float) -> tuple[npt.NDArray[np.float32], int]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.audio[0]
        rate = 0
        most = 0
        frames = 0
        chunks: list[npt.NDArray[np.float32]] = []
        for frame in container.decode(stream):
            if not isinstance(frame, av.AudioFrame):
                continue
            if not rate:
                rate = int(frame.sample_rate)
                most = _bounded(rate, len(frame.layout.channels), max_seconds)
            array: npt.NDArray[Any] = frame.to_ndarray()
            if frame.format.is_planar:
                array = array.T  # [samples, channels]
            else:
                array = array.reshape(-1, len(frame.layout.channels))
            if array.dtype.kind == "i":
                scale = float(2 ** (8 * array.dtype.itemsize - 1))
                array = array.astype(np.float32) / scale
            chunks.append(array.astype(np.float32))
            frames += array.shape[0]
            if frames > most:
                raise _too_long(None, max_seconds)
    if not chunks:
        raise ValueError("no audio frames")
    return np.concatenate(chunks), rate
