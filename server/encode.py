"""Streams as compressed files: MP3, Ogg Opus and FLAC (PROTOCOL.md §4.5).

A request that asks for an encoded ``format`` is generated as any other (its
audio leaves the inference thread as float PCM, at the rate it asked for);
:class:`EncodedStream` stands between the scheduler and the connection, on the
event loop, and has each stream's chunks encoded in a small pool of threads
(FFmpeg's encoders, through ``av``, run without Python's lock), one piece of
work at a time per request, in order. Each stream (the live one, and a
rendition) is one file: its chunks' ``data`` joined is that file, ``offset``
counting its bytes. The messages of a request keep their order: a ``progress``
or the ``done`` behind audio being encoded waits for it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import fractions
import io
import itertools
import logging
import os
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from wavecast.protocol import (
    Audio,
    Busy,
    Caption,
    Done,
    ErrorInfo,
    InternalError,
    InvalidField,
    Progress,
    ServerMessage,
    Started,
    Waiting,
    WavecastError,
)
from wavecast.protocol.messages import CODEC_RATES, ENCODED_FORMATS, AudioFormat

from .metrics import Metrics

__all__ = [
    "ENCODED_FORMATS",
    "EncodedStream",
    "Encoder",
    "bit_rate",
    "check_bitrate",
    "configure",
    "encoded_rate",
]

log = logging.getLogger(__name__)

FLAC_MAX_RATE = 655350
# FFmpeg's muxer and encoder for each format.
_MUXERS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "flac": ("flac", "flac")}
# An Ogg page per Opus packet (20 ms): each chunk's audio leaves with it, at some
# 10 kbit/s of page headers (pages of a second would hold the audio back a second).
OGG_PAGE_MICROSECONDS = 20000
# Live audio a request's encoding may fall behind its generation, in seconds:
# past HOLD_SECONDS the request is left out of the steps until its encoders catch
# up (``EncodedStream.behind``; the other streams go on), so it goes at the pace
# its encoders keep; past MAX_BACKLOG_SECONDS it ends (``busy``), as where it
# could not be held. (A second version, Multi-Band Diffusion's, comes whole, as
# long as the stream: not counted.)
HOLD_SECONDS = 4.0
MAX_BACKLOG_SECONDS = 30.0
# A live chunk's bytes at most: whole pieces of its file (packets), each chunk
# one message (no more than the session's pieces, ``session.PIECE_BYTES``), so
# that a client's bytes end where a packet does, at a chunk's ``until``.
CHUNK_BYTES = 32 << 10
# A file picked up is encoded again from this many of its codec's frames before
# the cut, not from its start (``EncodedStream``): MP3's and Opus' look-ahead and
# overlap reach a frame or two back (and each MP3 frame holds its own bits), so
# the packets after the cut are as a file made again from its start makes them
# (to a rounding: ``tests/server/test_encode.py``), at a cost that does not grow
# with the stream. (Ogg's pages and FLAC's frames are numbered on from there, their
# CRCs computed again; FLAC's frames stand alone, the same bytes of the same
# samples.)
WARM_FRAMES = 4
# FLAC's block sizes that its frame headers code in four bits: a FLAC stream's
# frames hold the largest within ``FLAC_BLOCK_MS`` (FFmpeg's own choice, set).
FLAC_BLOCKS = (192, 256, 512, 576, 1024, 1152, 2048, 2304, 4096, 4608, 8192, 16384, 32768)
FLAC_BLOCK_MS = 105
# Frames of silence ``Encoder.flush`` gives an encoder at most (LAME holds some
# 3,000 samples: six of its 576-sample frames at 24 kHz).
MAX_FLUSH_FRAMES = 16
# The encoders' threads: FFmpeg's encoders run without Python's lock, so that
# several streams encode on several cores while the inference thread steps; at a
# lower priority (bench/RESULTS.md: on two cores, eight speech streams in FLAC made
# 26% less audio a second than in PCM at the same priority, 10% less at nice 10).
ENCODER_NICE = 10


def _lower_priority() -> None:
    """An encoder's thread gives way to the inference thread (and the event loop)
    where they want the same core: nice 10, a tenth of their share. (On Linux,
    where a thread has a priority of its own.)"""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENCODER_NICE)


_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def default_threads() -> int:
    """The encoders' threads where the server is not told: a core each, but two
    (the inference thread's and the event loop's), from one to eight."""
    return max(1, min(8, (os.cpu_count() or 2) - 2))


def configure(threads: int = 0) -> int:
    """Encode with ``threads`` threads (0: ``default_threads()``) from the next
    piece of work on; how many."""
    global _pool, _pool_threads
    count = threads if threads > 0 else default_threads()
    if _pool is None or _pool_threads != count:
        old, _pool, _pool_threads = (
            _pool,
            ThreadPoolExecutor(
                max_workers=count, thread_name_prefix="encoders", initializer=_lower_priority
            ),
            count,
        )
        if old is not None:
            old.shutdown(wait=False)  # (what it holds still runs)
    return count


def encoded_rate(format: str, model_rate: int, asked: int | None) -> int:
    """The rate a stream of ``format`` goes out at: the rate asked for, else the
    model's where the codec takes it (Opus: else 48 kHz; MP3: else 48 kHz).

    Raises:
        InvalidField: The codec does not take the rate asked for (``sample_rate``).
    """
    rates = CODEC_RATES.get(format)
    if rates is None:  # (FLAC, and PCM: any)
        if asked is not None and format == "flac" and asked > FLAC_MAX_RATE:
            raise InvalidField(f"flac takes at most {FLAC_MAX_RATE} Hz", field="sample_rate")
        return asked or model_rate
    if asked is None:
        return model_rate if model_rate in rates else 48000
    if asked not in rates:
        raise InvalidField(
            f"{format} streams at {', '.join(map(str, rates[:-1]))} or {rates[-1]} Hz, not {asked}",
            field="sample_rate",
        )
    return asked


def check_bitrate(format: str, channels: int, bitrate: int | None) -> None:
    """Whether a stream of ``format`` can be asked for at ``bitrate`` bits a
    second (None: the server's choice): MP3 and Opus only; Opus 6 to 256
    kbit/s a channel. (MP3 takes 8 to 320 kbit/s, LAME the nearest that its
    rate allows: up to 160 kbit/s at 16-24 kHz, 64 below.)

    Raises:
        InvalidField: Not a lossy format, or beyond what its codec takes (``bitrate``).
    """
    if bitrate is None:
        return
    if format not in ("mp3", "opus"):
        raise InvalidField(
            f"bitrate is for the mp3 and opus formats, not {format}", field="bitrate"
        )
    most = 320000 if format == "mp3" else 256000 * channels
    least = 8000 if format == "mp3" else 6000
    if not least <= bitrate <= most:
        raise InvalidField(
            f"{format} takes {least} to {most} bits a second"
            + (f" for {channels} channel(s)" if format == "opus" else ""),
            field="bitrate",
        )


def bit_rate(format: str, sample_rate: int, channels: int) -> int:
    """Bits a second of a lossy stream: Opus 64 kbit/s a channel (32 at 16 kHz
    and below); MP3 128 kbit/s a channel at 32 kHz and above (MPEG-1), 64 at
    16-24 kHz (MPEG-2), 32 below (MPEG-2.5), at most 320 kbit/s. 0: lossless."""
    if format == "opus":
        return (64000 if sample_rate > 16000 else 32000) * channels
    if format == "mp3":
        per_channel = 128000 if sample_rate >= 32000 else 64000 if sample_rate >= 16000 else 32000
        return min(320000, per_channel * channels)
    return 0


def frame_size(format: str, sample_rate: int) -> int:
    """Samples a frame of ``format``'s codec holds at ``sample_rate``: MP3 1,152
    (MPEG-1, 32 kHz and above), else 576; Opus 20 ms; FLAC the largest of its
    block sizes within ``FLAC_BLOCK_MS`` (2,304 at 24 and 32 kHz)."""
    if format == "mp3":
        return 1152 if sample_rate >= 32000 else 576
    if format == "flac":
        return max(b for b in FLAC_BLOCKS if b <= sample_rate * FLAC_BLOCK_MS // 1000)
    return sample_rate // 50 if format == "opus" else 0


def warm_start(format: str, sample_rate: int, until: int) -> int:
    """The stream's frame a file picked up at ``until`` is encoded again from:
    ``WARM_FRAMES`` of its codec's frames before (0: from its start)."""
    frame = frame_size(format, sample_rate)
    return max(0, until // frame - WARM_FRAMES) * frame if frame else 0


@dataclasses.dataclass(frozen=True, slots=True)
class Silences:
    """Where a file whose text came as it was written got silence at its waits
    for the text (PROTOCOL.md §4.8; ``generate.resume_waits``): at each
    ``waiting``'s ``frames`` of the stream, its ``silence`` frames, in order.
    The file's frames are the stream's and that silence."""

    waits: tuple[tuple[int, int], ...] = ()
    # The silence up to and with each wait's (``before``: a caption's, each in a
    # look-up, however many waits a client says its file had).
    _held: tuple[int, ...] = dataclasses.field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_held", tuple(itertools.accumulate(s for _, s in self.waits)))

    def before(self, frame: int) -> int:
        """The frames of silence the file holds before the stream's ``frame``."""
        waits = bisect.bisect_right(self.waits, frame, key=lambda wait: wait[0])
        return self._held[waits - 1] if waits else 0

    def stream_frame(self, file_frame: int) -> tuple[int, int]:
        """The stream's frame at the file's ``file_frame``; and, where that is
        within a wait's silence, the frames of it from there (the stream's frame
        is then the one it comes before), else 0."""
        held = 0
        for at, silence in self.waits:
            if file_frame < at + held:
                break
            if file_frame < at + held + silence:
                return at, at + held + silence - file_frame
            held += silence
        return file_frame - held, 0


# Each byte's bits in reverse order (``ogg_crc``).
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 of a page (its CRC field zeroed): polynomial 0x04C11DB7, not
    reflected, no inversions; by zlib's reflected one over the bytes' bits
    reversed, its result reflected back."""
    crc = ~zlib.crc32(page.translate(_REVERSED), 0xFFFFFFFF) & 0xFFFFFFFF
    return int(f"{crc:032b}"[::-1], 2)


def _ogg_renumbered(data: bytes, by: int) -> bytes:
    """Whole Ogg pages, their sequence numbers ``by`` on (their CRCs again)."""
    out, at = bytearray(data), 0
    while at < len(out):
        count = out[at + 26]
        size = 27 + count + sum(out[at + 27 : at + 27 + count])
        (number,) = struct.unpack_from("<I", out, at + 18)
        struct.pack_into("<II", out, at + 18, number + by, 0)
        struct.pack_into("<I", out, at + 22, ogg_crc(bytes(out[at : at + size])))
        at += size
    return bytes(out)


def _crc8(data: bytes) -> int:
    """FLAC's CRC-8 (a frame header's): polynomial 0x07, from 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes, crc: int = 0) -> int:
    """FLAC's CRC-16 (a frame's): polynomial 0x8005, from ``crc``, not reflected."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _times(a: int, b: int) -> int:
    """``a`` times ``b``, polynomials over GF(2), modulo CRC-16's (0x18005)."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a & 0x10000:
            a ^= 0x18005
    return out


# x to the power of 8 * 2**i, modulo CRC-16's polynomial: a CRC-16 register's
# move over 2**i zero bytes is a product by it (``_after_zeros``).
_ZERO_BYTES = [_times(1, 1 << 8)]
for _ in range(40):
    _ZERO_BYTES.append(_times(_ZERO_BYTES[-1], _ZERO_BYTES[-1]))


def _after_zeros(crc: int, count: int) -> int:
    """A CRC-16 register after ``count`` more zero bytes."""
    for power in _ZERO_BYTES:
        if not count:
            break
        if count & 1:
            crc = _times(crc, power)
        count >>= 1
    return crc


def _coded_number(number: int) -> bytes:
    """A FLAC frame's number as its header codes it (as UTF-8 codes a
    character, to 36 bits)."""
    if number < 0x80:
        return bytes([number])
    size = next(n for n in range(2, 8) if number < 1 << (6 * (n - 1) + 7 - n))
    tail = [0x80 | (number >> 6 * i) & 0x3F for i in reversed(range(size - 1))]
    return bytes([(0xFF00 >> size) & 0xFF | number >> 6 * (size - 1), *tail])


def _flac_renumbered(data: bytes, by: int) -> bytes:
    """A FLAC frame (after the file's header, where the first piece has it)
    numbered ``by`` on: its header's number coded again, the header's CRC-8 and
    the frame's CRC-16 computed again. The CRC-16 from the old one: a CRC is
    linear, so only the header's part of it is worked out, not the samples'."""
    at = 0
    if data[:4] == b"fLaC":  # (the stream's header: its metadata blocks)
        at, last = 4, False
        while not last:
            last = bool(data[at] & 0x80)
            at += 4 + int.from_bytes(data[at + 1 : at + 4], "big")
    if at == len(data):
        return data
    if data[at : at + 2] != b"\xff\xf8":  # (fixed block sizes: the frames numbered)
        raise ValueError("not a FLAC frame of a fixed block size")
    first = data[at + 4]
    marks = 0 if first < 0x80 else 8 - (~first & 0xFF).bit_length()  # (its leading ones)
    coded = at + 4 + max(1, marks)  # (where the coded number ends)
    number = first & (0x7F >> marks)
    for byte in data[at + 5 : coded]:
        number = number << 6 | byte & 0x3F
    block, rate = data[at + 2] >> 4, data[at + 2] & 0x0F
    end = coded + (block == 6) + 2 * (block == 7) + (rate == 12) + 2 * (rate in (13, 14))
    old = data[at : end + 1]  # (with its CRC-8)
    header = data[at : at + 4] + _coded_number(number + by) + data[coded:end]
    new = header + bytes([_crc8(header)])
    body = len(data) - (end + 1) - 2
    crc = int.from_bytes(data[-2:], "big") ^ _after_zeros(_crc16(old) ^ _crc16(new), body)
    return data[:at] + new + data[end + 1 : -2] + crc.to_bytes(2, "big")


# A file's bytes as its muxer wrote them, each piece with the sample frames of
# audio the file up to its end holds (``Encoder.push_pieces``).
Pieces = list[tuple[bytes, int]]


class _Bytes(io.RawIOBase):
    """Where the muxer writes: kept until taken (a stream cannot seek back)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class Encoder:
    """One stream as one file of an encoded format, its bytes as they are made.

    ``push`` takes ``[frames, channels]`` float audio and gives back what the
    file has gained (maybe nothing: the codecs work in frames, and look ahead);
    ``flush`` gives the rest with the file left open, ``close`` with it ended.
    An encoder runs on one thread at a time.
    ``bitrate`` (bits a second, MP3 and Opus) is ``check_bitrate``'s to check;
    None: ``bit_rate``'s. ``start``: the sample frame of the stream that the
    first pushed is (a whole number of the codec's frames: a file begun again a
    few frames before where it was cut); its packets are stamped in the
    stream's time, and Ogg's pages and FLAC's frames numbered as the file's
    from its start.
    """

    def __init__(
        self,
        format: str,
        sample_rate: int,
        channels: int,
        bitrate: int | None = None,
        start: int = 0,
    ) -> None:
        import av  # (FFmpeg: imported on the encoders' threads, at the first such stream)

        if format not in _MUXERS:
            raise ValueError(f"not an encoded format: {format!r}")
        if channels not in (1, 2):
            raise ValueError(f"{format} streams are mono or stereo, not {channels} channels")
        muxer, codec = _MUXERS[format]
        # (bitexact: the same bytes for the same audio, however it was cut: no
        # random Ogg serial number, no library version in the tags)
        options = {"fflags": "+bitexact"}
        if format == "opus":
            options["page_duration"] = str(OGG_PAGE_MICROSECONDS)
        elif format == "mp3":
            options["id3v2_version"] = "0"  # (no tag: the file is the audio)
            options["write_xing"] = "0"  # (its counts would need a seek back)
        self._out = _Bytes()
        self._container: Any = cast(
            Any, av.open(self._out, mode="w", format=muxer, options=options)
        )
        self._layout = "mono" if channels == 1 else "stereo"
        stream: Any = self._container.add_stream(codec, rate=sample_rate, layout=self._layout)
        if rate := bitrate or bit_rate(format, sample_rate, channels):
            stream.bit_rate = rate
        if format == "mp3":
            # Each frame holds its own bits (no bit reservoir, whose frames spend
            # bits of the frames before them): a stream picked up goes on with
            # the frames of a file made again, whose bits before the cut may
            # differ by a rounding from the client's (bench/RESULTS.md: 0.0-0.4
            # dB of signal to noise, at the same bytes a second).
            stream.codec_context.options = {"reservoir": "0"}
        elif format == "flac":  # (FFmpeg's own choice, set: ``warm_start`` counts on it)
            stream.codec_context.options = {"frame_size": str(frame_size(format, sample_rate))}
        self._stream = stream
        self._av = av
        self._lossless = format == "flac"
        self.format = format
        self._time_base = fractions.Fraction(1, sample_rate)
        # The file's muxer holds its last packet back until the next (an Ogg
        # page is written once the next begins): how many packets it holds.
        self._held = 1 if muxer == "ogg" else 0
        # The ends (in frames of audio pushed) of the last packets made: the
        # codec's packets are stamped in the audio's time, its delay taken off.
        self._ends: deque[int] = deque([0], maxlen=self._held + 1)
        self.sample_rate = sample_rate
        self.channels = channels
        # Frames of audio pushed (the silence ``flush`` adds too), from ``start``.
        self.pushed = start
        # The codec's frames before ``start``: Ogg's pages (one a frame) and FLAC's
        # frames are numbered on from them (``_renumbered``).
        self._before = start // frame_size(format, sample_rate) if start else 0
        self.padded = 0  # (of which that silence)
        self.closed = False

    def push(self, audio: npt.NDArray[np.float32]) -> bytes:
        return b"".join(data for data, _ in self.push_pieces(audio))

    def flush(self) -> bytes:
        """``flush_pieces``' bytes."""
        return b"".join(data for data, _ in self.flush_pieces())

    def close(self) -> bytes:
        return b"".join(data for data, _ in self.close_pieces())

    def _written(self, pieces: Pieces) -> None:
        """What the muxer wrote of the last packet (maybe nothing: an Ogg page
        waits for the next), with the frames the file holds at its end (none
        where the packet ends within the codec's delay: MP3's first at 8-24 kHz)."""
        if data := self._out.take():
            pieces.append((self._renumbered(data), max(0, self._ends[0])))

    def _renumbered(self, data: bytes) -> bytes:
        """What the muxer wrote, numbered as the file's from its start."""
        if not self._before or self.format == "mp3":
            return data
        if self.format == "flac":
            return _flac_renumbered(data, self._before)
        return _ogg_renumbered(data, self._before)

    def push_pieces(self, audio: npt.NDArray[np.float32]) -> Pieces:
        """``push``, in the pieces the muxer wrote (whole packets: an MP3 or
        FLAC frame, an Ogg page; the header with the first), each with the
        sample frames of audio pushed that the file up to its end holds (the
        codec's delay taken off). Those of the same audio end at the same
        frames, however it was pushed."""
        pieces: Pieces = []
        if audio.shape[0]:
            if self._lossless:  # (FLAC: the 16-bit samples of ``pcm_s16le``, exactly)
                samples: npt.NDArray[Any] = np.rint(np.clip(audio, -1.0, 1.0) * 32767.0)
                samples, kind = samples.astype("<i2"), "s16"
            else:
                samples, kind = np.asarray(audio, dtype=np.float32), "flt"
            frame = self._av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples).reshape(1, -1), format=kind, layout=self._layout
            )
            frame.sample_rate = self.sample_rate
            frame.pts, frame.time_base = self.pushed, self._time_base
            self.pushed += int(audio.shape[0])
            for packet in self._stream.encode(frame):
                self._ends.append(int(packet.pts) + int(packet.duration))
                self._container.mux(packet)
                self._written(pieces)
        return pieces

    def flush_pieces(self) -> Pieces:
        """All of the audio pushed so far, playable from the file, which goes on:
        the codec's last frame and its look-ahead filled with silence (and, in
        Ogg, one more frame's, for the page held back). The silence stays in the
        file (``padded``): it plays while the stream waits."""
        pieces: Pieces = []
        audio_end = self.pushed
        frame_size = int(self._stream.codec_context.frame_size) or 1024
        for _ in range(MAX_FLUSH_FRAMES):
            if self._ends[0] >= audio_end:  # (the end of the last packet written)
                break
            # (the codec takes whole frames: the one begun made whole first)
            size = -self.pushed % frame_size or frame_size
            pieces += self.push_pieces(np.zeros((size, self.channels), dtype=np.float32))
            self.padded += size
        return pieces

    def close_pieces(self) -> Pieces:
        """The file's last pieces: the codec's last packets, and the muxer's end."""
        pieces: Pieces = []
        if not self.closed:
            self.closed = True
            for packet in self._stream.encode(None):
                self._ends.append(int(packet.pts) + int(packet.duration))
                self._container.mux(packet)
                self._written(pieces)
            self._container.close()
            if data := self._out.take():
                pieces.append((self._renumbered(data), max(0, self._ends[-1])))
        return pieces


@dataclasses.dataclass(slots=True)
class _Rendition:
    """One file being written: its encoder, its chunks' next ``seq`` and
    ``offset``, and (in seconds) the end of the audio pushed into it and of the
    audio its chunks so far hold."""

    encoder: Encoder | None = None
    seq: int = 0
    offset: int = 0
    end: float = 0.0
    spanned: float = 0.0
    codes: bytearray = dataclasses.field(default_factory=bytearray)  # (not yet sent)
    start: int = 0  # the stream's frame its encoder began at (``Encoder.start``)


class EncodedStream:
    """A request's messages on their way to the connection, its audio encoded.

    Called on the event loop with each message the scheduler sends for the
    request (audio as ``pcm_f32le``); hands ``sink`` the same messages in the
    same order, the audio as ``format``. ``on_error`` is called (on the event
    loop) when the encoding fails or falls ``MAX_BACKLOG_SECONDS`` behind: it
    should end the request with that error; what audio is left is dropped.
    ``behind`` says (to the inference thread) when the generation should wait.

    Each live chunk says the sample frames its file holds at its end
    (``until``: its bytes end where a packet of its codec does). A stream
    picked up where it was cut (``resume``: the bytes of the live file its
    client has; ``until``: the frames they hold, the last chunk's ``until``) is
    encoded again from the stream's frame ``start`` (``warm_start``: a few of
    its codec's frames before the cut; the engine decodes the audio from there
    only, or from a little before, where the resampler begins again),
    and its file goes on from the packet after those frames, its bytes
    numbered on from ``resume``: the packets before are left out (made again,
    they may differ from the client's by a bit, so the bytes are not counted
    but the packets). The live audio's codes (``generate.codes``) go with the
    first chunk after them (a codec's look-ahead makes some pushes give no
    bytes), so that a client's codes always cover its bytes.

    A file whose text came as it was written holds silence where the stream
    waited for its text (``flush`` at a ``waiting``): picked up, it is told
    where (``silences``), ``start`` and ``until`` are its file's frames, and its
    encoders are given that silence again where it was.
    """

    def __init__(
        self,
        request_id: str,
        format: AudioFormat,
        sink: Callable[[ServerMessage], None],
        on_error: Callable[[WavecastError], None],
        *,
        bitrate: int | None = None,
        metrics: Metrics | None = None,
        resume: int = 0,
        until: int = 0,
        start: int = 0,
        silences: Silences | None = None,
    ) -> None:
        assert format in ENCODED_FORMATS
        self.request_id = request_id
        self.format = format
        self.bitrate = bitrate
        self._metrics = metrics
        self._resume, self._until, self._start = resume, until, start
        # A live chunk gone out: until then, a stream picked up is catching up
        # (its audio made again may come at once, from its codes).
        self._sent_live = False
        self._sink = sink
        self._on_error = on_error
        self._pending: deque[ServerMessage] = deque()
        self._live_bytes = 0  # live float PCM waiting for the encoders, or with them
        self._working_live = 0  # (of which with them)
        self._busy = False  # a piece of work is with the encoders
        self._error: WavecastError | None = None  # the encoding failed, or fell behind
        self._renditions: dict[str | None, _Rendition] = {}
        self._max_backlog = 0  # bytes of live float PCM (set at ``started``)
        self._hold = 0  # (the same)
        # Each chunk made: the audio it holds (``span_of``), by file and seq,
        # until it is handed on; the chunk being handed on's.
        self._spans: dict[tuple[str | None, int], tuple[float, float]] = {}
        self._span = (0.0, 0.0)
        self._silence = 0  # frames of silence the live file got at waits for text
        # A file picked up (its frames from ``start``): the stream's frame its
        # encoder begins at (the audio before, the engine need not make again);
        # the silence to give it first, where that is within a wait's; the waits
        # after, whose silence it is given again.
        self._silences = silences or Silences()
        self.stream_start, self._lead = self._silences.stream_frame(start)
        self._gaps = deque((at, n) for at, n in self._silences.waits if at > self.stream_start)
        self._pushed_to = self.stream_start  # where the live file's audio pushed ends

    def span_of(self, message: Audio) -> tuple[float, float]:
        """The audio (from, to: seconds of its stream, as pushed into the
        encoder) that ``message``, being handed on to ``sink``, holds: the
        encoders' look-ahead apart, what its bytes play. (Called by the sink.)"""
        return self._span

    def behind(self) -> bool:
        """Whether the live stream's encoding is more than ``HOLD_SECONDS``
        behind its generation: the scheduler leaves the request out of its steps
        meanwhile. (Read on the inference thread; a tick late at worst.)"""
        return self._error is None and self._hold > 0 and self._live_bytes > self._hold

    def __call__(self, message: ServerMessage) -> None:
        if isinstance(message, Started):
            second = message.sample_rate * message.channels * 4
            self._max_backlog = int(MAX_BACKLOG_SECONDS * second)
            self._hold = int(HOLD_SECONDS * second)
            message = dataclasses.replace(message, format=self.format)
        elif isinstance(message, Audio):
            if self._error is not None:
                return
            if message.rendition is None:
                self._live_bytes += len(message.data)
            catching_up = self._resume > 0 and not self._sent_live
            if self._max_backlog and self._live_bytes > self._max_backlog and not catching_up:
                self._fail(
                    Busy(
                        f"the server's encoders fell {MAX_BACKLOG_SECONDS:g} s of audio "
                        "behind the generation"
                    )
                )
                return
        self._pending.append(message)
        self._pump()

    def _pump(self) -> None:
        """Hand on what needs no encoding; send the next run of it to the encoders."""
        while self._pending and not self._busy:
            head = self._pending[0]
            if not self._needs_work(head):
                self._forward(self._placed(self._pending.popleft()))
                continue
            work: list[ServerMessage] = []
            while self._pending:  # the audio (and what comes between) up to the done
                message = self._pending.popleft()
                work.append(message)
                if isinstance(message, Audio) and message.rendition is None:
                    self._working_live += len(message.data)
                if isinstance(message, Done):
                    break
            self._busy = True
            pool = _pool
            if pool is None:
                configure()
                pool = _pool
            future = asyncio.get_running_loop().run_in_executor(pool, self._encode, work)
            future.add_done_callback(self._encoded)

    def _needs_work(self, message: ServerMessage) -> bool:
        if self._error is not None:
            return False
        if isinstance(message, Audio):
            return True
        # The live file ends at its last chunk: the done, or the next stage;
        # at a wait for text, all of its audio so far goes out.
        if isinstance(message, Done | Progress | Waiting) and (
            not isinstance(message, Progress) or message.stage is not None
        ):
            return any(
                r.encoder is not None and not r.encoder.closed for r in self._renditions.values()
            )
        return False

    def _encode(self, work: list[ServerMessage]) -> tuple[list[ServerMessage], bool]:
        """On an encoder's thread: the messages, their audio encoded; and whether
        the encoding failed (then the messages without their audio)."""
        out: list[ServerMessage] = []
        began = time.perf_counter()
        try:
            for message in work:
                if isinstance(message, Audio):
                    self._audio(message, out)
                    continue
                if isinstance(message, Done):
                    # A stream ended as the server shuts down is picked up where
                    # it was cut (on the server that comes back): its live file
                    # stays at its last whole packet, not closed (which would add
                    # a packet of part of a frame that a file made again has not).
                    cut = message.error is not None and message.error.code == "shutting_down"
                    for name in list(self._renditions):
                        if not (cut and name is None):
                            self._end(name, out)
                elif isinstance(message, Progress) and message.stage is not None:
                    self._end(None, out)
                elif isinstance(message, Waiting):
                    silence = self._end(None, out, flush=True)
                    message = dataclasses.replace(message, silence=silence)
                out.append(self._placed(message))
        except Exception:
            log.exception("encoding %s failed (request %s)", self.format, self.request_id)
            return [m for m in work if not isinstance(m, Audio)], True
        if self._metrics is not None:
            seconds = sum(
                len(m.data) / (4 * m.channels * m.sample_rate) for m in work if isinstance(m, Audio)
            )
            self._metrics.encoded(self.format, seconds, time.perf_counter() - began)
        return out, False

    def _placed(self, message: ServerMessage) -> ServerMessage:
        """A caption's offset in the file: after the silence of the waits before it
        (of the stream's try that was cut too, where it is picked up)."""
        if isinstance(message, Caption):
            silence = self._silence + self._silences.before(message.offset)
            if silence:
                return dataclasses.replace(message, offset=message.offset + silence)
        return message

    def _audio(self, message: Audio, out: list[ServerMessage]) -> None:
        if message.rendition is not None:
            self._end(None, out)  # (a rendition follows the live stream's end)
        audio = np.frombuffer(message.data, dtype="<f4").reshape(-1, message.channels)
        rendition = self._renditions.setdefault(message.rendition, _Rendition())
        live = message.rendition is None
        if rendition.encoder is None:
            start = 0
            if live:  # (picked up: a few frames before the cut)
                rendition.start, start = self.stream_start, self._start
            rendition.encoder = Encoder(
                self.format, message.sample_rate, message.channels, self.bitrate, start
            )
        rendition.end = (message.offset + audio.shape[0]) / message.sample_rate
        if message.codes:
            rendition.codes += message.codes
        audio = audio[max(0, rendition.start - message.offset) :]
        encoder = rendition.encoder
        pieces = self._push_live(encoder, audio) if live else encoder.push_pieces(audio)
        self._chunk(message, message.rendition, pieces, out)

    def _push_live(self, encoder: Encoder, audio: npt.NDArray[np.float32]) -> Pieces:
        """The live stream's audio into its file: where it is picked up, with the
        silence of the cut try's waits where it was (first, what is left of one
        it begins within)."""
        at, pieces = self._pushed_to, self._silence_pieces(encoder, self._lead)
        self._lead = 0
        while self._gaps and self._gaps[0][0] < at + audio.shape[0]:
            frame, silence = self._gaps.popleft()
            pieces += encoder.push_pieces(audio[: frame - at])
            audio, at = audio[frame - at :], frame
            pieces += self._silence_pieces(encoder, silence)
        pieces += encoder.push_pieces(audio)
        self._pushed_to = at + audio.shape[0]
        return pieces

    def _silence_pieces(self, encoder: Encoder, frames: int) -> Pieces:
        return encoder.push_pieces(np.zeros((frames, encoder.channels), dtype=np.float32))

    def _end(self, name: str | None, out: list[ServerMessage], *, flush: bool = False) -> int:
        """Close a file: its last bytes as its last chunk. With ``flush``, the
        file goes on: all of its audio so far in a chunk (``Encoder.flush``).
        Returns the frames of silence that took (``_silence`` counts them: the
        file's offsets after them are the stream's and them)."""
        rendition = self._renditions.get(name)
        if rendition is None or rendition.encoder is None or rendition.encoder.closed:
            return 0
        encoder = rendition.encoder
        pieces: Pieces = []
        again = False  # (a wait of the cut try's, where it was cut: the same again)
        if name is None:  # (the cut try's waits where its audio ends: their silence)
            while self._gaps and self._gaps[0][0] <= self._pushed_to:
                _, silence = self._gaps.popleft()
                if flush:  # (the encoder's flush fills in as it did; counted already)
                    again = True
                else:
                    pieces += self._silence_pieces(encoder, silence)
        padded = encoder.padded
        pieces += encoder.flush_pieces() if flush else encoder.close_pieces()
        template = Audio(
            id=self.request_id,
            seq=0,
            offset=0,
            sample_rate=encoder.sample_rate,
            channels=encoder.channels,
            format=self.format,
            data=b"",
            rendition=name,
        )
        self._chunk(template, name, pieces, out)
        if flush and not again:
            self._silence += encoder.padded - padded
        return encoder.padded - padded

    def _chunk(
        self, message: Audio, name: str | None, pieces: Pieces, out: list[ServerMessage]
    ) -> None:
        """The file's new pieces as chunks: the live file's of at most
        ``CHUNK_BYTES`` (a piece longer alone), each with its ``until``; of a
        stream picked up, from the packet after the client's."""
        rendition = self._renditions[name]
        live = name is None
        if live and self._resume and rendition.offset < self._resume:  # (nothing sent yet)
            kept = [(data, until) for data, until in pieces if until > self._until]
            # (the audio of the pieces left out: the client's)
            rendition.spanned = (
                max(rendition.spanned, self._until / message.sample_rate) if kept else rendition.end
            )
            if kept:
                rendition.offset = self._resume
            pieces = kept
        if not pieces:
            return
        groups: list[Pieces] = [[]]
        size = 0
        for piece in pieces:
            if live and groups[-1] and size + len(piece[0]) > CHUNK_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += len(piece[0])
        total = sum(len(data) for data, _ in pieces)
        start, seconds, at = rendition.spanned, rendition.end - rendition.spanned, 0
        for group in groups:
            data = b"".join(piece for piece, _ in group)
            # (what its bytes play: the audio pushed since the last chunk's, in
            # proportion to its bytes where one push made several chunks)
            at += len(data)
            end = rendition.end if at == total else start + seconds * at / total
            self._spans[name, rendition.seq] = (rendition.spanned, end)
            rendition.spanned = end
            codes = bytes(rendition.codes) or None
            rendition.codes.clear()
            out.append(
                dataclasses.replace(
                    message,
                    seq=rendition.seq,
                    offset=rendition.offset,
                    format=self.format,
                    data=data,
                    codes=codes,
                    until=group[-1][1] if live else None,
                )
            )
            rendition.seq += 1
            rendition.offset += len(data)

    def _encoded(self, future: asyncio.Future[tuple[list[ServerMessage], bool]]) -> None:
        self._busy = False
        self._live_bytes -= self._working_live
        self._working_live = 0
        messages, failed = future.result()
        if failed:
            self._spans.clear()  # (of chunks made before the failure, not handed on)
            self._fail(InternalError("the audio could not be encoded"))
        for message in messages:
            self._forward(message)
        self._pump()

    def _forward(self, message: ServerMessage) -> None:
        """Hand a message on; once the encoding failed, no audio, and a done
        that does not say so says the failure."""
        if isinstance(message, Audio):
            self._span = self._spans.pop((message.rendition, message.seq), (0.0, 0.0))
            self._sent_live |= message.rendition is None
        if self._error is not None:
            if isinstance(message, Audio):
                return
            if isinstance(message, Done) and message.status != "error":
                info = ErrorInfo(self._error.code, self._error.message)
                message = dataclasses.replace(message, status="error", error=info)
        self._sink(message)

    def _fail(self, error: WavecastError) -> None:
        if self._error is not None:
            return
        self._error = error
        # What waits (its audio dropped) goes on in order; the done follows.
        self._pending = deque(m for m in self._pending if not isinstance(m, Audio))
        self._live_bytes = self._working_live
        self._on_error(error)
