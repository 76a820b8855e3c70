"""Async Python client for wavecast.

Example::

    async with connect("ws://127.0.0.1:5555/v1/stream") as client:
        stream = await client.generate("tiny-musicgen", "lofi beat", duration=5)
        async for event in stream:
            if isinstance(event, Audio):
                play(event.data)

Every message of a request, ``queued`` through ``done``, comes out of its
:class:`RequestStream` in order; iteration ends after ``done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl as ssl_module
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, BinaryIO

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from wavecast.protocol import (
    BYTES_PER_SAMPLE,
    ENCODED_FORMATS,
    Audio,
    Cancel,
    Caption,
    Done,
    ErrorMessage,
    Generate,
    Hello,
    ParamValue,
    Progress,
    Queued,
    ServerMessage,
    Started,
    Stats,
    TextInput,
    Waiting,
    WavecastError,
    decode,
    encode,
    error_class,
    offset_unit,
)
from wavecast.protocol.messages import CODEC_RATES

__all__ = [
    "DEFAULT_URL",
    "STREAM_PATH",
    "Client",
    "GenerationResult",
    "RequestStream",
    "connect",
    "server_url",
    "stream_url",
]

_QUEUE_LIMIT = 1024
# Bytes of a stream's codes kept to pick it up from (``generate.resume_codes``):
# beyond them, a cut stream is picked up by making it again from its start.
_MAX_KEPT_CODES = 4 << 20

# Waits between tries of what the server says to try again (``retry_for``): from
# the first, doubled each time up to the most, each a little longer or shorter at
# random, so that clients turned away together do not come back together.
RETRY_FIRST = 0.5
RETRY_MOST = 8.0
# A connection refused (nothing listens: a server restarting) costs the host next
# to nothing, and the server that comes back is wanted at once: tried again at
# least every second.
RETRY_REFUSED_MOST = 1.0

#: ``on_retry(why, seconds)``: told before each wait for another try.
RetryHook = Callable[[str, float], None]


class _Retries:
    """Tries of one thing until ``deadline`` (the loop's clock)."""

    def __init__(self, seconds: float, hook: RetryHook | None) -> None:
        self.deadline = asyncio.get_running_loop().time() + seconds
        self.hook = hook
        self.delay = RETRY_FIRST

    def wait(self, why: str, at_least: float = 0.0, most: float = RETRY_MOST) -> float | None:
        """The time to wait before the next try (the hook told), or None when
        there is no time left for one."""
        wait = max(at_least, min(self.delay, most) * random.uniform(0.8, 1.2))
        if asyncio.get_running_loop().time() + wait > self.deadline:
            return None
        self.delay = min(self.delay * 2, RETRY_MOST)
        if self.hook is not None:
            self.hook(why, wait)
        return wait


# Connections closed with these codes (going away, restarting, try again later),
# or lost without a close frame, end unstarted requests that are worth sending again.
_CLOSED_TRY_AGAIN = frozenset({1001, 1012, 1013})

# The server's stream endpoint (PROTOCOL.md §1).
STREAM_PATH = "/v1/stream"
# Where a client connects when given no URL (nor ``WAVECAST_URL``): a local server.
DEFAULT_URL = "ws://127.0.0.1:5555/v1/stream"
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def server_url(url: str | None = None) -> str:
    """The stream endpoint a client connects to: ``url``'s (:func:`stream_url`),
    else ``WAVECAST_URL``'s, else a local server's (``DEFAULT_URL``)."""
    return stream_url(url or os.environ.get("WAVECAST_URL") or DEFAULT_URL)


def stream_url(url: str) -> str:
    """The stream endpoint that ``url`` names: a server's address as its log
    and demo page show it (``http://host:port/``) or as ``host:port`` alone
    means its ``ws://host:port/v1/stream``; ``https://`` means ``wss://``. A
    path other than ``/`` is kept (a proxy's prefix), and so is the query.

    Raises:
        ValueError: A scheme other than ``ws``, ``wss``, ``http`` or ``https``,
            no host, or a port that is not one from 1 to 65,535.
    """
    given = url
    if "://" not in url:
        url = "ws://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    try:
        port = parts.port  # (raises where it is not a number below 65,536)
    except ValueError:
        port = 0
    if scheme is None or not parts.hostname or port == 0:
        raise ValueError(f"not a wavecast server's address: {given!r} (ws://HOST:PORT)")
    path = parts.path if parts.path not in ("", "/") else STREAM_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _tls_context(
    url: str, ca_file: str | os.PathLike[str] | None, context: ssl_module.SSLContext | None
) -> ssl_module.SSLContext | None:
    """The TLS context for a stream URL (:func:`stream_url`'s): ``context`` if
    given; for ``wss://`` with a CA file (``ca_file``, else ``WAVECAST_CA_FILE``),
    the system's defaults trusting that file's certificates alone; else None (a
    ``wss://`` URL: the system's trust).

    Raises:
        ValueError: TLS asked of a ``ws://`` URL.
        OSError: The CA file cannot be read.
    """
    secure = url.startswith("wss://")
    if context is not None:
        if not secure:
            raise ValueError(f"TLS settings given for {url}: wss:// (or https://) is a TLS one")
        return context
    ca_file = ca_file or os.environ.get("WAVECAST_CA_FILE") or None
    if not secure or ca_file is None:
        return None
    try:
        return ssl_module.create_default_context(cafile=ca_file)
    except ssl_module.SSLError as exc:
        raise OSError(f"{os.fspath(ca_file)}: no PEM certificate in it ({exc.reason})") from None


# A WAV file's sample type (libsndfile's name) for each format of the protocol.
WAV_SUBTYPES = {
    "pcm_s16le": "PCM_16",
    "pcm_f32le": "FLOAT",
    "pcm_mulaw": "ULAW",
    "pcm_alaw": "ALAW",
}
G711 = ("pcm_mulaw", "pcm_alaw")
# The file suffix of each encoded format (a stream in one of them is one file),
# the format a file's name asks for, and libsndfile's container and sample type
# for each (``GenerationResult.save`` writing what was received in another).
FILE_SUFFIXES = {"mp3": ".mp3", "opus": ".opus", "flac": ".flac"}
SAVE_AS = {".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".flac": "flac"}
SOUNDFILE_FORMATS = {
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
    "flac": ("FLAC", "PCM_16"),
}


def decode_file(data: bytes, format: str) -> Any:
    """An encoded stream's file as a ``[frames, channels]`` numpy array at its
    own rate: FLAC's 16-bit samples as int16 (those of ``pcm_s16le``, exactly);
    MP3 and Opus decoded to float32. MP3 begins with its encoder's delay (some
    1,100 samples), and pads its last frame; Opus and FLAC give back the frames
    encoded, no more."""
    import io

    import numpy as np

    if format == "flac":  # (libsndfile wants a streamed FLAC's length in its header)
        import av

        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.audio[0]
            channels = stream.codec_context.channels
            parts = [frame.to_ndarray().reshape(-1, channels) for frame in container.decode(stream)]
        if not parts:
            return np.zeros((0, channels), dtype=np.int16)
        return np.concatenate(parts).astype(np.int16)
    import soundfile

    audio, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio


def _vtt_time(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}.{millis % 1000:03d}"


def flac_with_length(data: bytes, frames: int) -> bytes:
    """A streamed FLAC file with its length in its header (written as unknown,
    0, while it streamed; some readers, libsndfile among them, need it)."""
    if data[:4] != b"fLaC" or len(data) < 26 or data[4] & 0x7F != 0:  # (STREAMINFO first)
        return data
    word = int.from_bytes(data[18:26], "big")
    word = (word & ~((1 << 36) - 1)) | (frames & ((1 << 36) - 1))
    return data[:18] + word.to_bytes(8, "big") + data[26:]


def g711_table(format: str) -> Any:
    """The 16-bit sample of each of G.711's 256 codes (``pcm_mulaw``, ``pcm_alaw``),
    as every decoder has them: ``table[codes]`` decodes."""
    import numpy as np

    code = np.arange(256)
    if format == "pcm_mulaw":
        u = ~code & 0xFF
        t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)
    if format == "pcm_alaw":
        a = code ^ 0x55
        segment = (a & 0x70) >> 4
        t = ((a & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
        t = np.where(segment > 1, t << np.maximum(segment - 1, 0), t)
        return np.where(a & 0x80, t, -t).astype(np.int16)
    raise ValueError(f"not a G.711 format: {format!r}")


@dataclass
class GenerationResult:
    """Everything a finished request produced.

    Attributes:
        id: The request id.
        status: ``completed``, ``cancelled`` or ``error``.
        pcm: The concatenated ``data`` of every ``audio`` message: PCM, or the
            bytes of one file for an encoded format (``mp3``, ``opus``, ``flac``).
        sample_rate: Hz.
        channels: Interleaved channel count.
        format: ``pcm_s16le``, ``pcm_f32le``, ``pcm_mulaw``, ``pcm_alaw``,
            ``mp3``, ``opus`` or ``flac``.
        stats: The server's statistics, if any.
        error: The error, when ``status`` is ``error``.
        seed: The seed the server used.
        chunks: Number of ``audio`` messages of the live stream.
        renditions: Complete alternative versions by name (``mbd``: the
            Multi-Band Diffusion version), in the same format.
        silence: Of an encoded format's file, the sample frames of silence it
            got at waits for text (``Waiting.silence``, PROTOCOL.md §4.8).
        captions: Which text the audio speaks, from where (``Caption``: asked
            for with ``captions=True``).
    """

    id: str
    status: str
    pcm: bytes
    sample_rate: int
    channels: int
    format: str
    stats: Stats | None = None
    error: WavecastError | None = None
    seed: int | None = None
    chunks: int = 0
    renditions: dict[str, bytes] = field(default_factory=dict)
    silence: int = 0
    captions: list[Caption] = field(default_factory=list)

    @property
    def encoded(self) -> bool:
        """Whether the audio is a file of an encoded format (``mp3``, ``opus``, ``flac``)."""
        return self.format in ENCODED_FORMATS

    @property
    def frames(self) -> int:
        """Sample frames received (per channel); of an encoded format, those the
        server encoded (``stats.samples`` and ``silence``), else those its file
        decodes to."""
        if not self.channels or not self.pcm:
            return 0
        if self.encoded:
            if self.stats:
                return self.stats.samples + self.silence
            return int(self.to_numpy().shape[0])
        return len(self.pcm) // (BYTES_PER_SAMPLE[self.format] * self.channels)

    def webvtt(self) -> str:
        """The ``captions`` as a WebVTT file: a cue for each, from its
        ``offset`` to the next one's (the last: to the audio's end)."""
        lines = ["WEBVTT", ""]
        rate = self.sample_rate or 1
        ends = [c.offset for c in self.captions[1:]] + [max(self.frames, 0)]
        for n, (caption, end) in enumerate(zip(self.captions, ends, strict=True), 1):
            start = caption.offset / rate
            stop = max(end / rate, start)
            text = " ".join(caption.text.split()).replace("-->", "->")
            lines += [str(n), f"{_vtt_time(start)} --> {_vtt_time(stop)}", text, ""]
        return "\n".join(lines)

    def to_numpy(self, rendition: str | None = None) -> Any:
        """The audio as a ``[frames, channels]`` numpy array: float32 for
        ``pcm_f32le``, ``mp3`` and ``opus`` (decoded: see :func:`decode_file`),
        else int16 (G.711 codes decoded; FLAC's samples).

        Args:
            rendition: ``None`` for the live stream, or a name in ``renditions``.
        """
        import numpy as np

        data = self.pcm if rendition is None else self.renditions[rendition]
        if self.encoded:
            if not data:
                return np.zeros((0, max(1, self.channels)), dtype=np.float32)
            return decode_file(data, self.format)
        if self.format in G711:
            samples = g711_table(self.format)[np.frombuffer(data, dtype=np.uint8)]
        else:
            dtype = "<f4" if self.format == "pcm_f32le" else "<i2"
            samples = np.frombuffer(data, dtype=dtype)
        return samples.reshape(-1, max(1, self.channels))

    def save(self, file: str | os.PathLike[str] | BinaryIO, rendition: str | None = None) -> None:
        """Write the audio to a file: a path, or a binary file open for writing.

        A path named ``.flac``, ``.mp3``, ``.opus`` or ``.ogg`` (Ogg Opus) gets a
        file of that kind, and one named ``.wav`` a WAV file; another path, or a
        file object, gets the audio as received: a WAV file of 16-bit, float,
        mu-law or A-law samples, or the encoded format's file. What was received
        goes as it came where it is what the name asks for (an encoded file
        byte for byte; FLAC with its length filled in: see
        :func:`flac_with_length`); else its samples are decoded and written as
        the name asks (16-bit in WAV and FLAC).

        Args:
            rendition: ``None`` for the live stream, or a name in ``renditions``.

        Raises:
            ValueError: An Opus file at a rate Opus does not take.
        """
        import soundfile

        suffix = ""
        if isinstance(file, str | os.PathLike):
            suffix = os.path.splitext(os.fspath(file))[1].lower()
        wanted = SAVE_AS.get(suffix)
        if self.encoded and (wanted == self.format or (wanted is None and suffix != ".wav")):
            data = self.pcm if rendition is None else self.renditions[rendition]
            if self.format == "flac" and data:
                data = flac_with_length(data, int(self.to_numpy(rendition).shape[0]))
            if isinstance(file, str | os.PathLike):
                with open(file, "wb") as out:
                    out.write(data)
            else:
                file.write(data)
            return
        audio = self.to_numpy(rendition)
        if wanted is None:  # (WAV)
            subtype = "PCM_16" if self.encoded else WAV_SUBTYPES[self.format]
            soundfile.write(file, audio, self.sample_rate, subtype=subtype, format="WAV")
            return
        if wanted == "opus" and self.sample_rate not in CODEC_RATES["opus"]:
            raise ValueError(
                f"an Opus file is 8, 12, 16, 24 or 48 kHz, not {self.sample_rate} Hz "
                "(ask the server for sample_rate=48000, or format='opus')"
            )
        container, subtype = SOUNDFILE_FORMATS[wanted]
        soundfile.write(file, audio, self.sample_rate, subtype=subtype, format=container)


# A progress stage's place in a request: the live stream after its preparation,
# the Multi-Band Diffusion version after both.
_STAGES = {"prepare": 0, None: 1}


@dataclass
class RequestStream:
    """The events of one request, in order, ``done`` last. Where the connection
    is lost before the request's ``done``, iterating raises websockets'
    ``ConnectionClosed`` (the audio that came before it joins exactly), unless
    the client has ``retry_for`` left: a request that had not started is then
    sent again on a new connection, and one whose stream was under way is
    picked up where it was cut (the same seed, and ``generate.resume``). So is
    one the server ended with ``shutting_down``. The stream shows one try: its
    ``started``, progress that does not go back, and audio that joins on."""

    id: str
    client: Client
    _queue: asyncio.Queue[ServerMessage | BaseException] = field(
        default_factory=lambda: asyncio.Queue(_QUEUE_LIMIT)
    )
    done: Done | None = None
    started: Started | None = None
    #: What the server was asked: sent again where it answers ``busy`` or
    #: ``shutting_down``, or the connection is lost, before it starts (and the
    #: client has ``retry_for`` left).
    generate: Generate | None = None
    _retries: _Retries | None = None
    #: The connection it was last sent on.
    _link: _Link | None = None
    _cancel_asked: asyncio.Event = field(default_factory=asyncio.Event)
    _resending: bool = False  # (being sent again: a cancel is sent after, if at all)
    #: Sent again after it started: the new try's events the consumer has had
    #: from the last one are left out.
    _resumed: bool = False
    _picking: bool = False  # (cut under way, and asked again: until its started)
    #: Per rendition (None: the live stream), where its next chunk starts and its
    #: ``seq``, as the consumer saw them.
    _next: dict[str | None, tuple[int, int]] = field(default_factory=dict)
    _stage: tuple[int, float] = (0, -1.0)  # the last progress seen: its stage's place, fraction
    #: The live stream's codes so far (``generate.codes``), to pick it up from
    #: (None: more than ``_MAX_KEPT_CODES``).
    _codes: bytearray | None = field(default_factory=bytearray)
    #: Its text's parts sent so far (``generate.text_stream``): sent again with
    #: it where it is sent again before it started; in its ``prompt`` where it
    #: is picked up under way (after its first ``prompt``, ``_begun``).
    _texts: list[TextInput] = field(default_factory=list)
    _begun: str | None = None
    _captioned: int = -1  # the offset of the last caption the consumer had
    _waited: int = -1  # the frames of the last ``waiting`` the consumer had
    #: A file whose text comes as it is written: its waits' ``frames`` and
    #: ``silence`` (where its file got silence), to pick it up from.
    _waits: dict[int, int] = field(default_factory=dict)
    #: An encoded file's: the sample frames its bytes the consumer had hold
    #: (the last live chunk's ``until``), where it is picked up from.
    _until: int = 0

    def __aiter__(self) -> AsyncIterator[ServerMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ServerMessage]:
        while self.done is None:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                if await self._tried_again(item):
                    continue
                raise item
            if isinstance(item, Done):
                if await self._tried_again(item):
                    continue
                self.done = item
            elif isinstance(item, Started):
                self._picking = False
                if self.started is not None:
                    continue  # (a try that picks the stream up: the consumer has its start)
                self.started = item
            if isinstance(item, Audio) and item.codes and item.rendition is None:
                self._keep_codes(item.codes)
            new = self._unseen(item) if self._resumed else item
            if isinstance(new, Audio):
                unit = offset_unit(new.format, new.channels)
                self._next[new.rendition] = (new.offset + len(new.data) // unit, new.seq + 1)
                if new.rendition is None and new.until is not None:
                    self._until = new.until
            elif isinstance(new, Progress):
                self._stage = (_STAGES.get(new.stage, 2), new.fraction)
            elif isinstance(new, Caption):
                self._captioned = new.offset
            elif isinstance(new, Waiting) and new.frames is not None:
                self._waited = new.frames
                if new.silence is not None:  # (a file's: where it got silence)
                    self._waits[new.frames] = new.silence
            if new is not None:
                yield new

    def _keep_codes(self, codes: bytes) -> None:
        if self._codes is not None:
            self._codes += codes
            if len(self._codes) > _MAX_KEPT_CODES:
                self._codes = None

    def _unseen(self, item: ServerMessage) -> ServerMessage | None:
        """What of a message of a try that picks the stream up is new to the
        consumer: audio past what it has (numbered on from it), progress past
        what it saw, captions past the last it had, a ``waiting`` past the
        last it had (one cut as it waited waits there again); no ``queued``."""
        if isinstance(item, Queued):
            return None
        if isinstance(item, Waiting) and item.frames is not None:
            return item if item.frames > self._waited else None
        if isinstance(item, Caption):  # (one sent before the cut, ahead of its audio)
            return item if item.offset > self._captioned else None
        if isinstance(item, Progress):
            return item if (_STAGES.get(item.stage, 2), item.fraction) >= self._stage else None
        if isinstance(item, Audio):
            have, seq = self._next.get(item.rendition, (0, 0))
            unit = offset_unit(item.format, item.channels)
            if item.offset + len(item.data) // unit <= have:
                return None
            data = item.data[max(0, have - item.offset) * unit :]
            return replace(item, seq=seq, offset=max(have, item.offset), data=data)
        return item

    def _resumable(self) -> bool:
        """Whether the stream, cut under way, can be picked up where it was: the
        seed that makes it again (and a text that came as it was written, cut a
        sentence a chunk: its cuts do not depend on when its parts came, but for
        the parts flushed, which it says, as it says where a file of it got
        silence as it waited for them)."""
        assert self.generate is not None and self.started is not None
        return self.started.seed is not None and (
            not self.generate.text_stream or self.generate.params.get("chunk_method") == "sentence"
        )

    async def send_text(self, text: str, *, flush: bool = False, end: bool = False) -> None:
        """More text for a request started with ``text_stream=True``
        (PROTOCOL.md §3.4): what of it completes a sentence is spoken once the
        text before it is; ``flush``: all of it so far, mid-sentence too;
        ``end``: the last of it (the stream ends once it is spoken). Where the
        speech catches up with the text, the stream yields a ``Waiting``, after
        all of the audio so far (§4.8).

        Raises:
            ValueError: The request was not started with ``text_stream``, or its
                text has ended.
        """
        if self.generate is None or not self.generate.text_stream:
            raise ValueError("send_text is for a request started with text_stream=True")
        if self._texts and self._texts[-1].end:
            raise ValueError("the request's text has ended")
        part = TextInput(id=self.id, text=text, flush=flush or None, end=end or None)
        self._texts.append(part)
        if self._link is not None and not self._resending and self.done is None:
            try:
                await self._link.ws.send(encode(part, text=self.client.text))
            except ConnectionClosed:
                if self._retries is None:
                    raise
                # (kept: the stream, picked up or sent again, takes it with it)

    async def end_text(self, text: str = "") -> None:
        """``send_text(text, end=True)``: the text's last part."""
        await self.send_text(text, end=True)

    async def _tried_again(self, outcome: Done | BaseException) -> bool:
        """Where the request ended as one the server says to try again, and there
        is time left: wait, and ask again (True; its ``done`` then ends the
        stream: ``cancelled`` where cancelled meanwhile). Before it started:
        ``busy``; ``shutting_down``, or the connection lost: on a new connection.
        Under way (with its seed): those last two, picking the stream up
        where it was cut. False where not, or where no server took it again in
        time."""
        if self._retries is None or self.generate is None or self.client._closed:
            return False
        if self.started is not None and not self._resumable():
            return False
        if isinstance(outcome, ConnectionClosed):
            if outcome.rcvd is not None and outcome.rcvd.code not in _CLOSED_TRY_AGAIN:
                return False  # (closed for a reason of its own: not sent again)
            why = "the connection was lost"
        elif not isinstance(outcome, Done) or outcome.error is None:
            return False
        elif outcome.error.code == "busy" and self.started is None:
            why = f"the server is busy ({outcome.error.message})"
        elif outcome.error.code == "shutting_down":
            why = "the server is shutting down"
            if self._link is not None:
                self._link.draining = True  # (new requests: on a new connection)
        else:
            return False
        if self.started is not None:
            assert self.started.seed is not None
            if not self._picking:  # (cut now: its time to try again counts from here)
                self._retries = _Retries(self.client.retry_for, self.client.on_retry)
                self._picking = True
            have = self._next.get(None, (self.generate.resume or 0, 0))[0]
            encoded = self.generate.format not in BYTES_PER_SAMPLE
            at = (self._until if encoded else have) / self.started.sample_rate
            why += f" (picking the stream up at {at:.2f} s)"
            params = {**self.generate.params, "seed": self.started.seed}
            codes = bytes(self._codes) if self._codes else None
            self.generate = replace(
                self.generate,
                params=params,
                resume=have,
                resume_codes=codes,
                resume_until=self._until if encoded else None,
                resume_waits=(
                    tuple(self._waits.items()) if encoded and self.generate.text_stream else None
                ),
            )
            self._resumed = True
        wait = self._retries.wait(why)
        if wait is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancel_asked.wait(), wait)
        if not self._cancel_asked.is_set():
            # Sent again (connecting again first, where it must), unless cancelled
            # meanwhile: a cancel does not wait for a server to come back.
            first = self._text_so_far()
            submit = asyncio.ensure_future(self.client._submit(self))
            cancelled = asyncio.ensure_future(self._cancel_asked.wait())
            self._resending = True
            try:
                await asyncio.wait({submit, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._resending = False
            cancelled.cancel()
            if not submit.done():
                submit.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await submit
            elif submit.exception() is None:
                if self._link is not None:  # (its text so far, to the new try)
                    parts = self._texts[first:]
                    if first and first == len(self._texts) and self._texts[-1].end:
                        parts = [TextInput(id=self.id, text="", end=True)]  # (in its prompt)
                    for part in parts:
                        await self._link.ws.send(encode(part, text=self.client.text))
                if self._cancel_asked.is_set():  # (asked meanwhile)
                    await self._send_cancel()
                return True
            elif isinstance(submit.exception(), OSError | InvalidStatus | ConnectionClosed):
                return False  # (no server took it in time: the first outcome stands)
            else:
                submit.result()  # (raises what went wrong)
        await self._queue.put(Done(id=self.id, status="cancelled"))
        return True

    def _text_so_far(self) -> int:
        """A text stream sent again: the first of its text's parts to send after
        it. Before it started, all of them; under way (picked up), its
        ``prompt`` becomes all of its text so far, and the parts that come while
        it is sent follow it (and the text's end, where it came before), with
        where its parts sent with ``flush`` ended (``resume_flushes``)."""
        assert self.generate is not None
        if not self.generate.text_stream or self.started is None:
            return 0
        if self._begun is None:
            self._begun = self.generate.prompt
        said, flushes = self._begun, list[int]()
        for part in self._texts:
            said += part.text
            if part.flush and (not flushes or flushes[-1] < len(said)):
                flushes.append(len(said))
        self.generate = replace(self.generate, prompt=said, resume_flushes=tuple(flushes) or None)
        return len(self._texts)

    async def cancel(self) -> None:
        """Ask the server to stop this request; its ``done`` still follows (in a
        PCM format, after the audio already on its way: the server leaves out
        what was still waiting to be sent)."""
        if self.done is None:
            self._cancel_asked.set()
            # (not while waiting to ask again: then, once it is sent, if at all)
            if self.client._streams.get(self.id) is self and not self._resending:
                await self._send_cancel()

    async def _send_cancel(self) -> None:
        """``cancel`` on the connection the request was last sent on."""
        if self._link is not None:
            await self._link.ws.send(encode(Cancel(id=self.id), text=self.client.text))

    async def collect(self) -> GenerationResult:
        """Consume the rest of the stream and return the audio it carried.

        Raises:
            RuntimeError: The audio chunks were not contiguous.
        """
        # rendition (None: the live stream) -> (offset of its first chunk seen, PCM)
        streams: dict[str | None, tuple[int, bytearray]] = {}
        chunks = silence = 0
        captions: list[Caption] = []
        async for event in self:
            if isinstance(event, Waiting):
                silence += event.silence or 0
            elif isinstance(event, Caption):
                captions.append(event)
            if not isinstance(event, Audio):
                continue
            first_offset, data = streams.setdefault(event.rendition, (event.offset, bytearray()))
            unit = offset_unit(event.format, event.channels)  # (encoded: bytes)
            if (event.offset - first_offset) * unit != len(data):
                raise RuntimeError(f"audio chunk {event.seq} is not contiguous")
            data += event.data
            chunks += event.rendition is None
        pcm = streams.pop(None, (0, bytearray()))[1]
        renditions = {name: data for name, (_, data) in streams.items() if name is not None}
        assert self.done is not None
        error = None
        if self.done.error is not None:
            info = self.done.error
            error = error_class(info.code)(info.message, field=info.field, id=self.id)
        started = self.started
        return GenerationResult(
            id=self.id,
            status=self.done.status,
            pcm=bytes(pcm),
            sample_rate=started.sample_rate if started else 0,
            channels=started.channels if started else 0,
            format=started.format if started else "pcm_s16le",
            stats=self.done.stats,
            error=error,
            seed=started.seed if started else None,
            chunks=chunks,
            renditions={name: bytes(data) for name, data in renditions.items()},
            silence=silence,
            captions=captions,
        )


class _Link:
    """One connection of a client: its websocket, the server's greeting on it,
    and the task reading it."""

    def __init__(self, ws: ClientConnection, hello: Hello) -> None:
        self.ws = ws
        self.hello = hello
        #: The server said it is shutting down: new requests go on a new connection.
        self.draining = False
        self.reader: asyncio.Task[None] | None = None


class Client:
    """A connection to a wavecast server; use :func:`connect`.

    With ``retry_for``, a request the server turned away before it started is
    sent again: on the same connection after ``busy``, on a new one (the client
    connects again, for as long as ``retry_for`` allows) after ``shutting_down``
    or a lost connection. Requests under way on a draining connection finish on
    it; the new one carries the rest, and the greeting (:attr:`hello`) is the
    new server's. A PCM stream cut under way (``shutting_down``, a lost
    connection) is picked up on the new one where it was cut: the request is
    sent again with the seed its ``started`` gave and ``resume`` at the frames
    had, and its stream joins on, sample for sample (the server makes the part
    had again first).
    """

    def __init__(
        self,
        websocket: ClientConnection,
        hello: Hello,
        *,
        text: bool = False,
        retry_for: float = 0.0,
        on_retry: RetryHook | None = None,
        connector: connect | None = None,
    ) -> None:
        self._link = _Link(websocket, hello)
        self.text = text
        self.retry_for = retry_for
        self.on_retry = on_retry
        self._connector = connector
        self._links: list[_Link] = [self._link]  # (open: the last one is new requests')
        self._linking = asyncio.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._closed = False  # (close() called: no new connection)
        #: ``error`` messages that belong to no request of this client (newest last).
        self.errors: list[ErrorMessage] = []

    @property
    def ws(self) -> ClientConnection:
        """The connection new requests go on."""
        return self._link.ws

    @property
    def hello(self) -> Hello:
        """The greeting of the server new requests go to."""
        return self._link.hello

    @property
    def models(self) -> dict[str, Any]:
        """Models the server serves, by name."""
        return {model.name: model for model in self.hello.models}

    def _start(self, link: _Link | None = None) -> None:
        link = link or self._link
        link.reader = asyncio.get_running_loop().create_task(self._read(link))

    async def _read(self, link: _Link) -> None:
        error: BaseException
        try:
            async for frame in link.ws:
                message = decode(frame)
                if isinstance(message, Generate | Cancel | TextInput):
                    continue  # a client message coming back: not ours to handle
                target = getattr(message, "id", None)
                stream = self._streams.get(target) if isinstance(target, str) else None
                if stream is not None and stream._link is not link:
                    stream = None  # (sent again on another connection)
                if isinstance(message, ErrorMessage) and (
                    stream is None or message.code == "duplicate_id"
                ):
                    self.errors = [*self.errors[-99:], message]
                    continue
                if stream is None:
                    continue
                if isinstance(message, Done):
                    del self._streams[message.id]
                    self._close_if_done(link)
                await stream._queue.put(message)
            error = link.ws.protocol.close_exc
        except ConnectionClosed as exc:
            error = exc
        except WavecastError as exc:  # the server sent something off-spec
            error = exc
        for stream in [s for s in self._streams.values() if s._link is link]:
            del self._streams[stream.id]
            with contextlib.suppress(asyncio.QueueFull):
                stream._queue.put_nowait(error)
        if link is not self._link:
            self._links.remove(link)

    def _close_if_done(self, link: _Link) -> None:
        """Close a connection left behind once its last request is done."""
        if link is not self._link and not any(s._link is link for s in self._streams.values()):
            asyncio.get_running_loop().create_task(link.ws.close())

    async def _submit(self, stream: RequestStream) -> None:
        """Send a stream's ``generate`` (again: after ``busy`` on the same
        connection, on a new one where the last is draining or closed), its
        events to it.

        Raises:
            OSError, InvalidStatus, ConnectionClosed, TimeoutError: No server
                took it (where ``retry_for`` allows, after trying again).
        """
        assert stream.generate is not None
        link = self._link
        if stream._retries is not None and (link.draining or link.ws.state is not State.OPEN):
            link = await self._relink(link, stream._retries)
        stream._link = link
        self._streams[stream.id] = stream
        try:
            await link.ws.send(encode(stream.generate, text=self.text))
        except BaseException:
            if self._streams.get(stream.id) is stream:
                del self._streams[stream.id]
            raise

    async def _relink(self, old: _Link, retries: _Retries) -> _Link:
        """A new connection for new requests, in place of ``old`` (one already
        made in its place meanwhile, where another request got there first)."""
        async with self._linking:
            if self._link is not old:
                return self._link
            if self._connector is None:
                return old  # (made by hand: nowhere to connect again)
            ws, hello = await self._connector._open(retries)
            if self._closed:  # (closed meanwhile)
                await ws.close()
                raise ConnectionError("the client was closed")
            link = _Link(ws, hello)
            self._links.append(link)
            self._link = link
            self._start(link)
            self._close_if_done(old)
            return link

    async def generate(
        self,
        model: str,
        prompt: str = "",
        *,
        id: str | None = None,
        format: str = "pcm_s16le",
        sample_rate: int | None = None,
        bitrate: int | None = None,
        params: Mapping[str, ParamValue] | None = None,
        inputs: Mapping[str, bytes] | None = None,
        resume: int | None = None,
        resume_codes: bytes | None = None,
        codes: bool | None = None,
        text_stream: bool = False,
        captions: bool = False,
        resume_until: int | None = None,
        **kwargs: ParamValue,
    ) -> RequestStream:
        """Start a generation.

        Args:
            model: A model name from the greeting.
            prompt: The text prompt.
            id: Request id (default: a fresh random one).
            format: ``pcm_s16le``, ``pcm_f32le``, G.711's ``pcm_mulaw`` or
                ``pcm_alaw`` (a byte a sample), or a compressed file: ``mp3``,
                ``opus`` (Ogg Opus) or ``flac``.
            sample_rate: The audio's rate in Hz, 8000 to 192000 (default: the
                model's own); the server resamples the stream as it goes.
            bitrate: Bits a second of an ``mp3`` or ``opus`` stream (default:
                the server's choice for its rate and channels).
            params: Model parameters; keyword arguments are added to them.
            inputs: Audio files by role, as bytes: ``continuation`` (continue this
                clip) where the model's capabilities list it.
            resume: Pick up a stream cut earlier (with its ``seed``): the
                sample frames of it already had (an encoded format: the bytes
                of its file, with ``resume_until``). Its ``audio`` starts there.
                (The client does this itself with ``retry_for``.)
            resume_codes: With ``resume``, the codes the cut stream's audio
                brought (joined): the server picks it up from them rather than
                making it again from its start.
            codes: Have the server send the live stream's codes with its audio
                (``Audio.codes``). Default: where the client retries
                (``retry_for``), the model has the ``codes`` capability and
                the stream could be picked up, so that a cut stream is picked
                up from them.
            text_stream: The text comes as it is written (speech models with the
                ``text_stream`` capability): ``prompt`` is its beginning, and
                ``RequestStream.send_text`` sends the rest (``end_text``: the
                last of it). Such a stream is picked up where it is cut
                (``retry_for``) where it is cut a sentence a chunk
                (``chunk_method="sentence"``): its ``prompt`` is then all of
                its text so far, with where its parts sent with ``flush``
                ended (``resume_flushes``) and, in a file, where it got silence
                as it waited for its text (``resume_waits``).
            resume_until: With ``resume``, for an encoded format: the
                ``until`` of the last live ``Audio`` the cut stream brought.
            captions: Have the server say which text the audio speaks: a
                ``Caption`` ahead of each text chunk's audio (speech models with
                the ``captions`` capability; ``GenerationResult.captions``).

        Returns:
            The request's event stream.
        """
        request_id = id or uuid.uuid4().hex[:12]
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} is already in flight")
        merged = {**(params or {}), **kwargs}
        if codes is None:
            info = self.models.get(model)
            codes = (
                self.retry_for > 0
                and (not text_stream or merged.get("chunk_method") == "sentence")
                and info is not None
                and "codes" in info.capabilities
            ) or None
        message = Generate(
            id=request_id,
            model=model,
            prompt=prompt,
            params=merged,
            format=format,  # type: ignore[arg-type]
            inputs=dict(inputs) if inputs else None,
            sample_rate=sample_rate,
            bitrate=bitrate,
            resume=resume,
            codes=codes,
            resume_codes=resume_codes,
            text_stream=text_stream or None,
            captions=captions or None,
            resume_until=resume_until,
        )
        stream = RequestStream(request_id, self, generate=message)
        if resume_codes:
            stream._keep_codes(resume_codes)
        stream._until = resume_until or 0
        if self.retry_for > 0:
            stream._retries = _Retries(self.retry_for, self.on_retry)
        await self._submit(stream)
        return stream

    async def speak(
        self,
        model: str,
        text: str,
        *,
        voice: str | Sequence[str] | None = None,
        reference: bytes | None = None,
        reference_text: str | None = None,
        scene: str | None = None,
        id: str | None = None,
        format: str = "pcm_s16le",
        sample_rate: int | None = None,
        bitrate: int | None = None,
        params: Mapping[str, ParamValue] | None = None,
        resume: int | None = None,
        resume_codes: bytes | None = None,
        codes: bool | None = None,
        text_stream: bool = False,
        captions: bool = False,
        resume_until: int | None = None,
        **kwargs: ParamValue,
    ) -> RequestStream:
        """Start text to speech on a model with the ``tts`` capability.

        Args:
            model: A speech model's name.
            text: What to say; lines starting with ``[SPEAKER0]``, ``[SPEAKER1]``
                make a dialogue.
            voice: A named voice, or one per speaker (SPEAKER0, SPEAKER1, ...).
            reference: An audio file whose voice to clone (SPEAKER0).
            reference_text: What ``reference`` says.
            scene: A scene name or a free description of the setting.
            id, format, sample_rate, bitrate, params, resume, resume_codes,
                codes, text_stream, captions, resume_until, kwargs: As
                :meth:`generate` (with
                ``text_stream``, ``text`` is the text's beginning, may be empty).
        """
        merged: dict[str, ParamValue] = {**(params or {}), **kwargs}
        if voice is not None:
            merged["voice"] = voice if isinstance(voice, str) else ",".join(voice)
        if reference_text is not None:
            merged["reference_text"] = reference_text
        if scene is not None:
            merged["scene"] = scene
        inputs = {"reference": reference} if reference is not None else None
        return await self.generate(
            model,
            text,
            id=id,
            format=format,
            sample_rate=sample_rate,
            bitrate=bitrate,
            params=merged,
            inputs=inputs,
            resume=resume,
            resume_codes=resume_codes,
            codes=codes,
            text_stream=text_stream,
            captions=captions,
            resume_until=resume_until,
        )

    async def close(self) -> None:
        self._closed = True
        for link in list(self._links):
            await link.ws.close()
            if link.reader is not None:
                await link.reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class connect:
    """Connect to a server: ``async with connect(url) as client`` or ``await connect(url)``.

    Args:
        url: ``ws://host:port/v1/stream``, or the server's address alone
            (``ws://host:port``, ``http://host:port/``, ``host:port``: see
            :func:`stream_url`); default: ``WAVECAST_URL``, else
            ``ws://127.0.0.1:5555/v1/stream``.
        text: Speak JSON text frames instead of msgpack.
        open_timeout: Seconds to wait for the connection and the greeting.
        api_key: The server's API key, when it needs one (sent as
            ``Authorization: Bearer KEY``); default: ``WAVECAST_API_KEY``.
        ca_file: For a ``wss://`` (``https://``) server: a PEM file of the
            certificates to trust (a self-signed server's own, or a private
            authority's) instead of the system's; default: ``WAVECAST_CA_FILE``.
        ssl: For a ``wss://`` server: the whole TLS context (``ca_file`` then
            does not apply).
        retry_for: Seconds to keep trying, where the server says to try again:
            connecting (refused: a server starting; ``503``: draining, after its
            ``Retry-After``; closed ``1013``: at its connection limit), and each
            request that ends before it starts where the server answers ``busy``
            (sent again), ``shutting_down`` or the connection is lost (sent
            again on a new connection, to the server that answers there then);
            a PCM stream cut under way by the last two is picked up where it
            was cut, on the new connection. The stream shows only the last
            answer. Each request has this long from when it was asked, and again
            from each cut under way. Waits from half a second, doubling up to 8 s
            (up to a second where the connection is refused: nothing listens,
            a server restarting). Default 0: no second try.
        on_retry: Called as ``on_retry(why, seconds)`` before each wait.
        headers: More HTTP headers for the handshake (a gateway's own token, say;
            ``api_key`` sets ``Authorization``).

    Raises:
        ValueError: ``url`` names no server (:func:`stream_url`), or TLS is
            asked of a ``ws://`` one.
        OSError: ``ca_file`` cannot be read (when connecting: the server cannot
            be reached, or its certificate is not trusted:
            :class:`ssl.SSLCertVerificationError`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        text: bool = False,
        open_timeout: float = 10.0,
        api_key: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        retry_for: float = 0.0,
        on_retry: RetryHook | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = server_url(url)
        self.text = text
        self.open_timeout = open_timeout
        self.api_key = api_key if api_key is not None else os.environ.get("WAVECAST_API_KEY")
        self.ssl = _tls_context(self.url, ca_file, ssl)
        self.retry_for = max(0.0, retry_for)
        self.on_retry = on_retry
        self.headers = dict(headers or {})
        self._client: Client | None = None

    async def _connect(self) -> Client:
        ws, hello = await self._open(_Retries(self.retry_for, self.on_retry))
        client = Client(
            ws,
            hello,
            text=self.text,
            retry_for=self.retry_for,
            on_retry=self.on_retry,
            connector=self,
        )
        client._start()
        return client

    async def _open(self, retries: _Retries) -> tuple[ClientConnection, Hello]:
        """A connection and its greeting, tried again while ``retries`` allows
        where the server says to."""
        while True:
            try:
                return await self._open_once()
            except (OSError, InvalidStatus, ConnectionClosed) as exc:
                why, at_least = _turned_away(exc)
                most = RETRY_REFUSED_MOST if isinstance(exc, ConnectionRefusedError) else RETRY_MOST
                if why is None or (wait := retries.wait(why, at_least, most)) is None:
                    raise
            await asyncio.sleep(wait)

    async def _open_once(self) -> tuple[ClientConnection, Hello]:
        url = self.url
        if self.text:
            url += ("&" if "?" in url else "?") + "encoding=json"
        headers = dict(self.headers)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # (websockets refuses ssl=None with wss://: its own default context then)
        tls: dict[str, Any] = {"ssl": self.ssl} if self.ssl else {}
        ws = await ws_connect(
            url,
            max_size=64 << 20,
            compression=None,
            open_timeout=self.open_timeout,
            additional_headers=headers,
            **tls,
        )
        try:
            first = await asyncio.wait_for(ws.recv(), self.open_timeout)
            hello = decode(first)
            if not isinstance(hello, Hello):
                raise RuntimeError(f"expected a greeting, got {hello.type!r}")
        except BaseException:
            await ws.close()
            raise
        return ws, hello

    def __await__(self) -> Any:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._connect()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._client is not None
        await self._client.close()


def _turned_away(exc: BaseException) -> tuple[str | None, float]:
    """Why a connection failed where the server says to try again (None where
    not), and the least wait it asks for."""
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused", 0.0
    if isinstance(exc, InvalidStatus) and exc.response.status_code == 503:
        after = exc.response.headers.get("Retry-After", "")
        return "the server is shutting down", float(after) if after.isdigit() else 0.0
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 1013:
        return f"the server is full ({exc.rcvd.reason or 'too many connections'})", 0.0
    return None, 0.0
