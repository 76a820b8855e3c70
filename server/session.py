"""One WebSocket connection: decode, validate, track requests, send.

The reader decodes each frame (PROTOCOL.md §2), validates it and hands
``generate`` to the scheduler; the scheduler's events come back through
``_on_event`` on the event loop and wait in a send queue bounded by bytes (§7
``send_buffer_bytes``) for the writer task, which sends each request's messages
in order and, between requests, the audio due first: a chunk is due when its
client plays it, as the writer reckons (from when it wrote the stream's first
chunk), so that a stream just begun is not behind the seconds another has
waiting, nor behind more than a piece of a chunk (a chunk of more than
``PIECE_BYTES`` goes in pieces, each its own message); a request's live
progress goes ahead of its own audio waiting (it says what is generated, as it
is made), and a cancel leaves out a PCM stream's audio waiting, made to its end
or not. While more than half of the bound waits, a request sits out the model's
steps (``Request.held``) if it is ``LEAD_SECONDS`` ahead of its playback or
half of what waits is its own (a stream begun beside one that fills the queue
goes on), and every request past seven eighths: a client that reads slower than
its audio is made, but at least in real time, gets it at the pace it reads. One
that reads slower than real time (its requests fall ``PACE_GRACE`` behind), or
whose buffer overflows anyway, loses its requests (``slow_consumer``) rather
than the server its memory and its slots. A second version (Multi-Band
Diffusion's), which comes whole, waits beside the queue and goes into it as the
client reads (half the bound at most), so that a long one is neither an
overflow nor in the live streams' way. On disconnect every request of the
connection is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from wavecast.protocol import (
    PROTOCOL_VERSION,
    Audio,
    Cancel,
    Caption,
    ClientError,
    Done,
    DuplicateId,
    ErrorInfo,
    ErrorMessage,
    Generate,
    Hello,
    InternalError,
    InvalidField,
    Limits,
    ModelInfo,
    Progress,
    Queued,
    ServerMessage,
    SlowConsumer,
    Started,
    TextInput,
    TooManyRequests,
    UnknownId,
    UnknownModel,
    Unsupported,
    Waiting,
    WavecastError,
    __version__,
    decode_client,
    encode,
    offset_unit,
    resolve_params,
)
from wavecast.protocol.errors import CLOSE_POLICY_VIOLATION

from .audio import warm_resample_start
from .config import Config
from .encode import (
    ENCODED_FORMATS,
    MAX_FLUSH_FRAMES,
    EncodedStream,
    Silences,
    check_bitrate,
    encoded_rate,
    frame_size,
    warm_start,
)
from .engines.base import EngineRequest
from .scheduler import Request, Scheduler

__all__ = ["Session"]

# Uploaded file roles and the capability each needs (PROTOCOL.md §3.3).
UPLOAD_ROLES = {
    "continuation": "continuation",
    "melody": "melody",
    "reference": "reference",
    "reference_1": "reference",
}
# Parameters that belong to a capability: asking a model without it is `unsupported`.
FEATURE_PARAMS = {"mbd": "mbd", "extend_stride": "long_form", "include_prompt": "continuation"}

log = logging.getLogger(__name__)

# Seconds a slow consumer's connection waits for its requests' done messages to
# be written before it closes all the same.
SLOW_CONSUMER_GRACE = 10.0
SLOW_CONSUMER_MESSAGE = "the client does not read audio as fast as it is made"
# Seconds a request held back by its client may fall behind real time (its audio
# made, against the time since it started) before the client is a slow consumer.
PACE_GRACE = 10.0
# Bytes of a connection's stream the kernel holds not yet sent (TCP_NOTSENT_LOWAT,
# Linux): the rest waits in the send queue, where it is counted. Without it the
# kernel takes megabytes (its send buffer grows to the link's bandwidth-delay),
# and on a link slower than the stream a keepalive's answer waited behind them
# past its timeout (bench/RESULTS.md: a client at 256 kbit/s lost its
# connection after 41 s of a float PCM stream). What it holds is ahead of anything
# sent next (a stream asked beside another, a cancel's done): 32 KiB is a quarter
# of a second of a 1 Mbit/s link (128 KiB, a second, made those a second later:
# bench/RESULTS.md), and some 20 ms of a 12 Mbit/s one, the fastest stream
# (192 kHz stereo, float), for the event loop to come back to it.
UNSENT_BYTES = 32 << 10
# Seconds of audio a request may have ahead of its client's playback (as the
# writer reckons it) before it sits out steps while more than half the send
# buffer waits: one with less, and less than half of what waits (a stream begun
# beside a long one), goes on, its chunks sent first (they are due sooner).
LEAD_SECONDS = 2.0
# Most bytes of audio one ``audio`` message holds: a larger chunk is sent in
# pieces (§4.5), so that on a slow link a message sent next (a stream asked
# beside it, a progress, a cancel's done) waits behind at most one piece, not a
# chunk's second: 128 kB of float PCM at 32 kHz, 1.5 MB at 192 kHz stereo.
PIECE_BYTES = 32 << 10
_ids = itertools.count(1)
# Uploads are decoded and checked here, off the event loop and off the inference
# thread, before their request is queued: a bad one is refused at once.
_UPLOADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="uploads")
POOLED_PROMPT_CHARS = 1000


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Puts the connection and request ids on every line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        kwargs.setdefault("extra", {}).update(extra)
        tags = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"[{tags}] {msg}", kwargs


def hello_message(config: Config, models: dict[str, ModelInfo], max_active: int) -> Hello:
    """The greeting: the models, and the limits (``max_active``: the scheduler's,
    found at load where the configuration leaves it to the memory)."""
    limits = config.limits
    return Hello(
        server="wavecast",
        version=__version__,
        protocol=PROTOCOL_VERSION,
        models=tuple(models.values()),
        limits=Limits(
            max_frame_bytes=limits.max_frame_bytes,
            max_requests_per_connection=limits.max_requests_per_connection,
            max_queue=limits.max_queue,
            max_active=max_active,
            max_prompt_chars=limits.max_prompt_chars,
            send_buffer_bytes=limits.send_buffer_bytes,
            max_upload_bytes=limits.max_upload_bytes,
            max_upload_seconds=limits.max_upload_seconds,
        ),
    )


class Session:
    """Serves one connection until it closes."""

    def __init__(
        self,
        websocket: ServerConnection,
        scheduler: Scheduler,
        config: Config,
        *,
        address: str | None = None,
        client: str | None = None,
        on_close: Callable[[Session], None] | None = None,
    ) -> None:
        self.ws = websocket
        self.address = address  # the client's (a trusted load balancer's X-Forwarded-For)
        # Whom its requests are queued for (Request.client): its API key's digest, else
        # its address.
        self.client = client or address or ""
        self.scheduler = scheduler
        self.config = config
        self.conn_id = f"c{next(_ids)}"
        self.log = ContextAdapter(log, {"conn": self.conn_id})
        self.requests: dict[str, Request] = {}
        # The send queue: a line of frames a request (in order; "": the
        # connection's own messages), the writer taking the head due first.
        self._lines: dict[str, collections.deque[_Queued]] = {}
        self._order = itertools.count()  # (frames due at once go in the order queued)
        self._ready = asyncio.Event()  # a frame was queued, or the end
        self._ending = False  # the writer ends once the queue is empty
        self._queued_bytes = 0
        # Each request's audio on its way: when its client plays it (by id, until
        # its done is made).
        self._flows: dict[str, _Flow] = {}
        # By request, its live stream's latest progress below 1.0 not yet sent
        # (each in place of the one before): it goes ahead of the request's audio
        # waiting, once its started is sent; its done puts it in its line.
        self._progress: dict[str, tuple[_Queued, _Flow]] = {}
        # A second version's frames (and what follows them, by request, in order)
        # waiting for room in the queue: what the request made, bounded by its length.
        self._waiting: collections.deque[tuple[_Queued, ServerMessage]] = collections.deque()
        self._waiting_bytes = 0
        self._waiting_ids: collections.Counter[str] = collections.Counter()
        # Requests whose audio was dropped (slow_consumer): their done says so.
        self._dropped: set[str] = set()
        # Requests the client cancelled, until their done is written: their audio
        # still queued is not sent (a PCM stream's: an encoded file is sent whole),
        # by the bytes left out so far.
        self._cut: dict[str, int] = {}
        # Requests the client cancelled while in flight, until their done is put
        # in the queue: the done says ``cancelled``, though the request finished
        # in the scheduler before the cancel reached it (its done was on its way).
        self._cancelled: set[str] = set()
        self._paced_at = 0.0  # when the requests' pace was last checked
        self._pace_timer: asyncio.TimerHandle | None = None  # (checked while congested)
        self._closing = False
        # The send buffer overflowed: no more audio; each request ends with a
        # slow_consumer done, then the connection closes 1008.
        self._slow = False
        self._flushed = asyncio.Event()  # the writer wrote everything up to the end
        self._close_task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # uploads being decoded
        self._on_close = on_close
        query = websocket.request.path.partition("?")[2] if websocket.request else ""
        # Answers follow the client's encoding; ?encoding=json picks JSON from the start.
        self.text = "encoding=json" in query.split("&")

    async def run(self) -> None:
        _hold_unsent(self.ws)
        peer = _peer(self.ws)
        if self.address is not None and not peer.startswith(f"{self.address}:"):
            peer = f"{self.address} (via {peer})"
        self.log.info("connected from %s", peer)
        self._send(hello_message(self.config, self.scheduler.models, self.scheduler.max_active))
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._writer())
                try:
                    await self._reader()
                finally:
                    self._cancel_all()
                    self._end_queue()
                    if self._closing:
                        writer.cancel()
        except* ConnectionClosed:
            pass
        finally:
            for task in list(self._checks):
                task.cancel()
            if self._pace_timer is not None:
                self._pace_timer.cancel()
            self._closing = True
            if self._on_close is not None:
                self._on_close(self)
            self.log.info("disconnected (%s)", self.ws.close_code)

    # -- reading -------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            async for frame in self.ws:
                self._handle(frame)
        except ConnectionClosed:
            pass

    @property
    def buffered_bytes(self) -> int:
        """Frames queued for this client and not yet written (bounded: §7), and a
        second version's waiting for room."""
        return self._queued_bytes + self._waiting_bytes

    def _handle(self, frame: bytes | str) -> None:
        self.text = isinstance(frame, str)
        try:
            message = decode_client(frame)
        except ClientError as exc:
            self._refuse(exc, frame_type=exc.message_type)
            return
        if isinstance(message, Generate):
            self._generate(message)
        elif isinstance(message, TextInput):
            self._text(message)
        else:
            self._cancel(message)

    def _refuse(self, exc: WavecastError, *, frame_type: str | None) -> None:
        """Answer a bad frame: a ``done`` if it opened a request, else an ``error``."""
        self.scheduler.metrics.refused(exc.code, request=frame_type == "generate")
        if frame_type == "generate" and exc.id is not None and exc.id not in self.requests:
            self._send(
                Done(id=exc.id, status="error", error=ErrorInfo(exc.code, exc.message, exc.field))
            )
        else:
            self._send(ErrorMessage(code=exc.code, message=exc.message, field=exc.field, id=exc.id))

    def _generate(self, message: Generate) -> None:
        limits = self.config.limits
        if self._slow:
            self._refuse(
                SlowConsumer("the connection is closing: it did not keep up", id=message.id),
                frame_type="generate",
            )
            return
        if message.id in self.requests:
            self._refuse(
                DuplicateId(
                    f"request {message.id!r} is already in flight", field="id", id=message.id
                ),
                frame_type=None,
            )
            return
        try:
            if len(self.requests) >= limits.max_requests_per_connection:
                raise TooManyRequests(
                    f"at most {limits.max_requests_per_connection} requests in flight "
                    "per connection",
                    id=message.id,
                )
            models = self.scheduler.models
            if message.model not in models:
                raise UnknownModel(
                    f"model {message.model[:100]!r} is not served here "
                    f"(available: {', '.join(models)})",
                    field="model",
                    id=message.id,
                )
            if len(message.prompt) > limits.max_prompt_chars:
                raise InvalidField(
                    f"prompt is longer than {limits.max_prompt_chars} characters",
                    field="prompt",
                    id=message.id,
                )
            info = models[message.model]
            for name in message.params:
                needs = FEATURE_PARAMS.get(name)
                if needs is not None and needs not in info.capabilities:
                    raise _unsupported(message, info, f"params.{name}")
            params = resolve_params(info.params, message.params, request_id=message.id)
            inputs = message.inputs or {}
            for role, data in inputs.items():
                if UPLOAD_ROLES.get(role) not in info.capabilities:
                    raise _unsupported(message, info, f"inputs.{role[:64]}")
                if len(data) > limits.max_upload_bytes:
                    raise InvalidField(
                        f"inputs.{role} is larger than {limits.max_upload_bytes} bytes",
                        field=f"inputs.{role}",
                        id=message.id,
                    )
            if message.resume is not None or message.resume_until is not None:
                _check_resume(message)
            if (
                message.text_stream
                or message.resume_flushes is not None
                or message.resume_waits is not None
            ):
                _check_text_stream(message, info)
            if message.captions and "captions" not in info.capabilities:
                raise _unsupported(message, info, "captions")
            codes_from = _check_codes(message, info)
            sink: Callable[[ServerMessage], None] = self._on_event
            flow = _Flow(_pcm_span)
            held = self._held(flow)
            wire_format, sample_rate = message.format, message.sample_rate
            check_bitrate(message.format, info.channels, message.bitrate)
            encoded = message.format in ENCODED_FORMATS
            had = heard = 0 if encoded else message.resume or 0
            until = message.resume_until or 0
            if encoded:
                # Generated as float PCM at the codec's rate; encoded on its way here
                # (a file picked up: from a few frames before the cut, ``warm_start``;
                # its frames are the stream's and the silence of its waits for text).
                sample_rate = encoded_rate(message.format, info.sample_rate, sample_rate)
                silences = Silences(message.resume_waits or ())
                _check_waits(
                    message,
                    silences,
                    MAX_FLUSH_FRAMES * frame_size(message.format, sample_rate),
                    until,
                )
                if message.resume:
                    heard = warm_start(message.format, sample_rate, until)
                wire_format = "pcm_f32le"
                sink = EncodedStream(
                    message.id,
                    message.format,
                    self._on_event,
                    on_error=lambda error: self.scheduler.cancel(request, error),
                    bitrate=message.bitrate,
                    metrics=self.scheduler.metrics,
                    resume=message.resume or 0,
                    until=until,
                    start=heard,
                    silences=silences,
                )
                heard, until = sink.stream_start, silences.stream_frame(until)[0]
                flow.span, flow.encoded = sink.span_of, True
                held = self._held_for(sink, held)  # (it waits for its encoders, rather than fail)
            # What the engine need not make again: of PCM, the frames its client
            # has; of a file, those its encoder is not given again. At another
            # rate, those before where the resampler begins again (a little
            # before: ``warm_resample_start``).
            if sample_rate and sample_rate != info.sample_rate:
                heard = warm_resample_start(info.sample_rate, sample_rate, heard)
            request = Request(
                id=message.id,
                model=message.model,
                engine_request=EngineRequest(
                    message.id,
                    message.prompt,
                    params,
                    inputs,
                    resume_codes=message.resume_codes,
                    resume=heard,
                    text_stream=bool(message.text_stream),
                    text_flushes=message.resume_flushes or (),
                ),
                format=wire_format,
                sample_rate=sample_rate,
                sink=sink,
                held=held,
                resume=had,
                resume_until=until,
                picked_up=bool(message.resume),
                text_chars=len(message.prompt),
                codes=bool(message.codes),
                codes_from=codes_from,
                captions=bool(message.captions),
                log=ContextAdapter(log, {"conn": self.conn_id, "req": message.id}),
                client=self.client,
            )
            check = self.scheduler.request_check(message.model)
            # Uploads and long prompts (tokenized) are checked in the pool; the rest
            # costs microseconds, on the spot.
            pooled = bool(inputs) or len(message.prompt) > POOLED_PROMPT_CHARS
            if check is not None and not pooled:
                check(request.engine_request)
            self.requests[message.id] = request
            self._flows[message.id] = flow
            if check is not None and pooled:
                task = asyncio.get_running_loop().create_task(
                    self._check_then_submit(request, check)
                )
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            else:
                try:
                    self.scheduler.submit(request)
                except WavecastError:
                    self._forget(message.id)
                    raise
        except WavecastError as exc:
            exc.id = message.id
            self._refuse(exc, frame_type="generate")
            return
        request.log.info(
            "generate model=%s params=%s format=%s%s%s%s%s",
            message.model,
            params,
            message.format,
            f" sample_rate={sample_rate}" if sample_rate else "",
            f" bitrate={message.bitrate}" if message.bitrate else "",
            f" resume={message.resume}" if message.resume is not None else "",
            f" resume_codes={codes_from}" if message.resume_codes else "",
        )
        if message.text_stream:
            request.log.info("its text comes as it is written (text_stream)")

    async def _check_then_submit(
        self, request: Request, check: Callable[[EngineRequest], Any]
    ) -> None:
        """Check a request and decode its uploads in the pool, then queue it (§3.3)."""
        try:
            decoded = await asyncio.get_running_loop().run_in_executor(
                _UPLOADS, check, request.engine_request
            )
            if request.cancelled.is_set():  # cancelled, or the client left, meanwhile
                self._forget(request.id)
                self._send(Done(id=request.id, status="cancelled"))
                return
            request.engine_request = dataclasses.replace(request.engine_request, decoded=decoded)
            self.scheduler.submit(request)
        except WavecastError as exc:
            self._forget(request.id)
            exc.id = request.id
            self._refuse(exc, frame_type="generate")
        except Exception:
            request.log.exception("checking the uploads failed")
            self._forget(request.id)
            self._refuse(
                InternalError("the uploads could not be checked", id=request.id),
                frame_type="generate",
            )

    def _forget(self, request_id: str) -> None:
        """A request refused or cancelled before the scheduler had it."""
        self.requests.pop(request_id, None)
        self._flows.pop(request_id, None)

    def _text(self, message: TextInput) -> None:
        """More text for a request opened with ``text_stream`` (§3.4)."""
        request = self.requests.get(message.id)
        limits = self.config.limits
        error: WavecastError | None = None
        if request is None:
            error = UnknownId(f"no request {message.id!r} in flight", field="id")
        elif not request.engine_request.text_stream:
            error = InvalidField(
                f"request {message.id!r} was not opened with text_stream: its text came whole",
                field="text_stream",
            )
        elif request.text_ended:
            error = InvalidField("the request's text has ended (its end came)", field="end")
        elif request.text_chars + len(message.text) > limits.max_prompt_chars:
            error = InvalidField(
                f"the request's text would be longer than {limits.max_prompt_chars} characters",
                field="text",
            )
        if error is not None or request is None:
            assert error is not None
            error.id = message.id
            self._refuse(error, frame_type="text")
            return
        request.text_chars += len(message.text)
        request.text_ended = bool(message.end)
        self.scheduler.add_text(
            request, message.text, flush=bool(message.flush), end=bool(message.end)
        )

    def _cancel(self, message: Cancel) -> None:
        request = self.requests.get(message.id)
        if request is None and self._cancel_unsent(message.id):
            return
        if request is None:
            self._send(
                ErrorMessage(
                    code=UnknownId.code,
                    field="id",
                    id=message.id,
                    message=f"no request {message.id!r} in flight",
                )
            )
            return
        request.log.info("cancel requested")
        self._cancelled.add(request.id)
        if not isinstance(request.sink, EncodedStream):
            self._leave_out(request.id)
        self.scheduler.cancel(request)

    def _cancel_unsent(self, rid: str) -> bool:
        """A cancel of a request made to its end whose done still waits to be
        sent (a slow link: the model is faster than the client reads): as a
        cancel under way, its PCM audio waiting is left out, and its done says
        ``cancelled``. False where none waits."""
        line = self._lines.get(rid, collections.deque())
        waiting = [queued for queued, _ in self._waiting if queued.id == rid]
        done = next((q for q in [*line, *waiting] if q.kind == "done"), None)
        if done is None or done.done is None:
            return False
        ContextAdapter(log, {"conn": self.conn_id, "req": rid}).info(
            "cancel requested (made to its end; its audio waiting to be sent)"
        )
        if done.flow is None or not done.flow.encoded:
            self._leave_out(rid)
        if done.done.status == "completed":
            said = dataclasses.replace(done.done, status="cancelled")
            new = done._replace(frame=encode(said, text=self.text), done=said)
            grew = len(new.frame) - len(done.frame)
            at = next((i for i, q in enumerate(line) if q is done), None)
            if at is not None:
                line[at] = new
                self._queued_bytes += grew
                if new.flow is not None:
                    new.flow.bytes += grew
            else:
                at = next(i for i, (q, _) in enumerate(self._waiting) if q is done)
                self._waiting[at] = (new, said)
                self._waiting_bytes += grew
        return True

    def _leave_out(self, rid: str) -> None:
        """A cancelled PCM stream's audio waiting is not sent: out of the queue at
        once (else each waited its turn by when it is due, and a stream asked
        after the cancel, due sooner, went ahead of the cancelled one's done), and
        what the step the cancel arrived in makes is dropped as it comes."""
        left_out = self._cut.setdefault(rid, 0)
        line = self._lines.get(rid)
        if line is None:
            return
        kept: collections.deque[_Queued] = collections.deque()
        for queued in line:
            if queued.kind != "audio":
                kept.append(queued)
                continue
            self._take(queued)
            left_out += len(queued.frame)
        self._cut[rid] = left_out
        line.clear()  # (in place: ``_cancel_unsent`` holds it)
        line.extend(kept)
        if not line:
            del self._lines[rid]

    def _cancel_all(self, error: WavecastError | None = None) -> None:
        for request in self.requests.values():
            self.scheduler.cancel(request, error)

    # -- writing -------------------------------------------------------------------

    def _on_event(self, message: ServerMessage) -> None:
        if isinstance(message, Done):
            self.requests.pop(message.id, None)
            self._send(message)
            self._flows.pop(message.id, None)
            return
        if isinstance(message, Audio) and message.id not in self.requests:
            return
        self._send(message)

    def _send(self, message: ServerMessage) -> None:
        if self._closing:
            return
        if isinstance(message, Audio) and self._slow:
            self._dropped.add(message.id)
            return  # the client cannot keep up: its requests are ending
        if isinstance(message, Audio) and message.id in self._cut:
            return  # (made in the step the cancel arrived in)
        if not isinstance(message, Audio):
            self._put(message)
            return
        flow = self._flows.get(message.id)
        pieces = [(message, (0.0, 0.0))] if flow is None else flow.pieces(message)
        chunk = _Chunk() if len(pieces) > 1 else None
        frames = [
            (self._entry(encode(piece, text=self.text), piece, span)._replace(chunk=chunk), piece)
            for piece, span in pieces
        ]
        size = sum(len(queued.frame) for queued, _ in frames)
        live = message.rendition is None  # (a second version waits for room: no overflow)
        if live and self._queued_bytes + size > self.config.limits.send_buffer_bytes:
            self._dropped.add(message.id)
            self._slow_consumer()
            return
        for queued, piece in frames:
            self._put(piece, queued)

    def _put(self, message: ServerMessage, queued: _Queued | None = None) -> None:
        """A message into the send queue (an audio piece: with its entry)."""
        if queued is None:
            message = self._honest(message)
            queued = self._entry(encode(message, text=self.text), message)
        size = len(queued.frame)
        rendition = queued.rendition is not None
        rid = queued.id
        waits = bool(rid) and self._waiting_ids[rid] > 0  # (its order kept)
        flow = self._flows.get(rid)
        if not waits and flow is not None and _overtakes(message):
            self._progress_ahead(queued, flow)
            return
        if rid in self._progress and isinstance(message, Done):
            self._progress_in_place(rid)
        if waits or (rendition and self._queued_bytes + size > self._rendition_room()):
            self._waiting.append((queued, message))
            self._waiting_bytes += size
            self._waiting_ids[rid] += 1
            return
        # Other messages are small and few (bounded by the requests in flight):
        # they always go, so that every request's done reaches the client.
        self._enqueue(queued)
        if isinstance(message, Audio) and not rendition and self.congested():
            self._check_pace()
            self._watch_pace()
        if self._slow and isinstance(message, Done) and not self.requests:
            self._close_slow()

    def _held(self, flow: _Flow) -> Callable[[], bool]:
        """Whether a request sits out the model's steps for its client (read on
        the inference thread): while more than half the send buffer waits, if its
        audio is ``LEAD_SECONDS`` ahead of its client's playback, or half of what
        waits is its own (a stream alone, or beside others as far ahead); past
        seven eighths, whatever its lead. So a stream asked beside one that fills
        the buffer is made, and is sent first (its chunks are due sooner)."""
        bound = self.config.limits.send_buffer_bytes

        def held() -> bool:
            queued = self._queued_bytes
            if queued <= bound // 2:
                return False
            return (
                queued > bound * 7 // 8
                or 2 * flow.bytes >= queued
                or flow.lead(time.monotonic()) > LEAD_SECONDS
            )

        return held

    @staticmethod
    def _held_for(stream: EncodedStream, client: Callable[[], bool]) -> Callable[[], bool]:
        """An encoded stream's request sits out steps while its client or its
        encoders are behind."""
        behind = stream.behind

        def held() -> bool:
            return client() or behind()

        return held

    def congested(self) -> bool:
        """More than half the send buffer waits for the client (``_held`` says
        which of its requests sit out the steps meanwhile)."""
        return self._queued_bytes > self.config.limits.send_buffer_bytes // 2

    def _check_pace(self) -> None:
        """Held back by the client, a request that falls ``PACE_GRACE`` behind
        real time means a client slower than real time: it is a slow consumer
        (else it would keep a slot as long as it likes). At most once a second."""
        now = time.perf_counter()
        if now < self._paced_at + 1.0:
            return
        self._paced_at = now
        for request in self.requests.values():
            outputs = request.outputs
            if not request.started_at or outputs is None or outputs.stage is not None:
                continue  # (not started, or its live stream complete)
            # (Not the time it waited for its text to come: ``text_stream``.)
            if now - request.started_at - request.waited(now) - PACE_GRACE > request.seconds:
                self._slow_consumer(
                    f"request {request.id}: {request.seconds:.1f} s of audio in "
                    f"{now - request.started_at:.1f} s, held back by a client slower than real time"
                )
                return

    def _watch_pace(self) -> None:
        """While the client holds its requests back, their pace is checked every
        second, whether it reads or not (a client that reads nothing sends no
        chunk through ``_send``; the keepalive may be off)."""
        if self._pace_timer is None and not self._closing:
            self._pace_timer = asyncio.get_running_loop().call_later(1.0, self._pace_tick)

    def _pace_tick(self) -> None:
        self._pace_timer = None
        if self._closing or self._slow or not self.congested():
            return
        self._check_pace()
        self._watch_pace()

    def _honest(self, message: ServerMessage) -> ServerMessage:
        """A done after audio of its request was dropped says so, though the
        request finished in the scheduler before it was asked to end; so does
        a done after the client's cancel (``cancelled``): the request may have
        finished as the cancel came, and its audio waiting was left out."""
        if not isinstance(message, Done):
            return message
        cancelled = message.id in self._cancelled
        self._cancelled.discard(message.id)
        if message.id in self._dropped:
            self._dropped.discard(message.id)
            if message.status != "error":
                error = ErrorInfo(SlowConsumer.code, SLOW_CONSUMER_MESSAGE)
                message = dataclasses.replace(message, status="error", error=error)
        if cancelled and message.status == "completed":
            message = dataclasses.replace(message, status="cancelled")
        return message

    def _rendition_room(self) -> int:
        """What a second version's frames may fill the queue to: half of it (the
        rest is the live streams')."""
        return self.config.limits.send_buffer_bytes // 2

    def _let_waiting_in(self) -> None:
        """Frames that waited, into the queue while there is room (after the slow
        consumer's end, only what is not audio; of a request the client
        cancelled, only its done)."""
        while self._waiting and not self._closing:
            queued, message = self._waiting[0]
            rid = queued.id
            audio = queued.kind == "audio"
            left_out = audio and (self._slow or rid in self._cut)
            size = len(queued.frame)
            if audio and not left_out and self._queued_bytes + size > self._rendition_room():
                return
            self._waiting.popleft()
            self._waiting_bytes -= size
            self._waiting_ids[rid] -= 1
            if self._waiting_ids[rid] <= 0:
                del self._waiting_ids[rid]
            if left_out and self._slow:
                self._dropped.add(rid)
                continue
            if left_out:
                self._cut[rid] += size
                continue
            if isinstance(message, Done) and message.id in self._dropped:
                queued = queued._replace(frame=encode(self._honest(message), text=self.text))
            self._enqueue(queued)
            if self._slow and isinstance(message, Done) and not self.requests:
                self._close_slow()

    def _slow_consumer(self, why: str = "") -> None:
        """The send buffer is full of audio the client has not read, or the
        client reads slower than real time (§6 ``slow_consumer``): stop queuing
        audio, end every request with a ``slow_consumer`` done, and close 1008
        once those are written."""
        why = why or f"send buffer full ({self._queued_bytes} bytes)"
        self.log.warning("%s: ending its requests", why)
        self._slow = True
        self._let_waiting_in()  # (their dones; no more audio)
        self._cancel_all(SlowConsumer(SLOW_CONSUMER_MESSAGE))
        if not self.requests:
            self._close_slow()
        else:  # the scheduler ends them within a step; a bound all the same
            asyncio.get_running_loop().call_later(SLOW_CONSUMER_GRACE, self._close_slow)

    def _close_slow(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._end_queue()
        self._close_task = asyncio.get_running_loop().create_task(self._close_when_flushed())

    async def _close_when_flushed(self) -> None:
        # A client still reading gets every queued frame, its done messages last;
        # one that stopped reading altogether blocks the writer: bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), SLOW_CONSUMER_GRACE)
        await self.ws.close(CLOSE_POLICY_VIOLATION, "slow consumer")

    def _entry(
        self, frame: bytes | str, message: ServerMessage, span: tuple[float, float] = (0.0, 0.0)
    ) -> _Queued:
        """A frame for the send queue: its request's line, and for audio, the
        part of its stream it holds (``span``: from, to, in seconds)."""
        order = next(self._order)
        if isinstance(message, Audio):
            flow = self._flows.get(message.id)
            start, end = span
            if flow is not None and message.rendition is None:
                flow.queued(start, end)
            return _Queued(frame, message.id, "audio", order, start, message.rendition, flow)
        if isinstance(message, Done):  # (kept: a cancel may yet say it, ``_cancel_unsent``)
            flow = self._flows.get(message.id)
            return _Queued(frame, message.id, "done", order, flow=flow, done=message)
        if isinstance(message, Started):  # (its flow opened once it is sent)
            return _Queued(frame, message.id, "started", order, flow=self._flows.get(message.id))
        if isinstance(message, Queued | Progress | Waiting | Caption):  # (its request's line)
            return _Queued(frame, message.id, "", order)
        return _Queued(frame, "", "", order)  # (the connection's own: hello, error)

    def _progress_ahead(self, queued: _Queued, flow: _Flow) -> None:
        """A live progress that goes ahead of its request's audio waiting: in
        place of the one before, where that has not been sent."""
        before = self._progress.get(queued.id)
        if before is not None:
            self._take(before[0])
        self._progress[queued.id] = (queued, flow)
        self._queued_bytes += len(queued.frame)
        self._ready.set()

    def _progress_in_place(self, rid: str) -> None:
        """The request ends: its live progress not yet sent goes in its line,
        ahead of the audio waiting once its started is sent (else in its place),
        and before what was queued after it (a stage's 1.0, the done)."""
        progress, flow = self._progress.pop(rid)
        line = self._lines.get(rid)
        if line is None:
            line = self._lines[rid] = collections.deque()
        place = next((i for i, q in enumerate(line) if q.order > progress.order), len(line))
        line.insert(0 if flow.opened else place, progress)

    def _enqueue(self, queued: _Queued) -> None:
        self._queued_bytes += len(queued.frame)
        if queued.flow is not None:
            queued.flow.bytes += len(queued.frame)
        if queued.chunk is not None:
            queued.chunk.counted += len(queued.frame)
        line = self._lines.get(queued.id)
        if line is None:
            line = self._lines[queued.id] = collections.deque()
        line.append(queued)
        self._ready.set()

    def _end_queue(self) -> None:
        """The writer ends once it has written what is queued."""
        self._ending = True
        self._ready.set()

    def _next(self) -> _Queued | None:
        """The frame to write next: of the lines' heads, the one due first
        (``_Queued.due``), then the one queued first."""
        now = time.monotonic()
        best: tuple[float, int] | None = None
        key = ""
        for rid, line in self._lines.items():
            head = line[0]
            due = (head.due(now), head.order)
            if best is None or due < best:
                best, key = due, rid
        ahead = None
        for rid, (progress, flow) in self._progress.items():
            if flow.opened and (best is None or (-math.inf, progress.order) < best):
                best, ahead = (-math.inf, progress.order), rid
        if ahead is not None:
            progress = self._progress.pop(ahead)[0]
            self._take(progress)
            return progress
        if best is None:
            return None
        line = self._lines[key]
        queued = line.popleft()
        if not line:
            del self._lines[key]
        self._take(queued)
        return queued

    def _take(self, queued: _Queued) -> None:
        """A frame out of the send queue's count; a piece, with the rest of its
        chunk (``_Chunk``)."""
        taken = len(queued.frame)
        if queued.chunk is not None:
            taken, queued.chunk.counted = queued.chunk.counted, 0
        if queued.flow is not None:
            queued.flow.bytes -= taken
        self._queued_bytes -= taken

    async def _writer(self) -> None:
        while True:
            queued = self._next()
            if queued is None:
                if self._ending:
                    self._flushed.set()
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if self._waiting:
                self._let_waiting_in()
            if queued.kind == "done" and queued.id in self._cut:
                self._end_cut(queued.id)  # (its audio left out: ``_leave_out``)
            if queued.flow is not None:
                if queued.kind == "started":
                    queued.flow.opened = True
                elif queued.kind == "audio":
                    queued.flow.sent(queued.rendition, queued.start)
            await self.ws.send(queued.frame)

    def _end_cut(self, request_id: str) -> None:
        """A cancelled request's done goes out: what was left out of its stream."""
        left_out = self._cut.pop(request_id)
        if left_out:
            ContextAdapter(log, {"conn": self.conn_id, "req": request_id}).info(
                "%d bytes of its audio waiting to be sent were left out (cancelled)", left_out
            )

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


@dataclasses.dataclass(slots=True)
class _Flow:
    """One request's audio on its way to its client, and when the client plays
    it, as the writer reckons: from when the writer sent a stream's first chunk
    (the live stream's, or a second version's), at the pace of its audio."""

    # The part of its stream an audio message holds: from, to (seconds).
    span: Callable[[Audio], tuple[float, float]]
    # A stream (None: the live one) -> when its client plays its second 0
    # (time.monotonic), once its first chunk is sent.
    clocks: dict[str | None, float] = dataclasses.field(default_factory=dict)
    first: float | None = None  # the live stream's first chunk queued: from
    end: float | None = None  # its last chunk queued: to
    bytes: int = 0  # its frames in the send queue
    encoded: bool = False  # one file (MP3, Opus, FLAC): sent whole, even cancelled
    opened: bool = False  # its started sent: its live progress may go ahead
    # A stream (None: the live one) -> the pieces sent so far beyond one a chunk
    # (``pieces``): what its chunks' ``seq`` grow by.
    extra: dict[str | None, int] = dataclasses.field(default_factory=dict)

    def pieces(self, message: Audio) -> list[tuple[Audio, tuple[float, float]]]:
        """A chunk as it is sent: in pieces of at most ``PIECE_BYTES`` (as
        even as its frames allow), numbered on, each with the part of its
        stream it holds (an encoded chunk's, in proportion to its bytes)."""
        start, end = self.span(message)
        data = message.data
        extra = self.extra.get(message.rendition, 0)
        if len(data) <= PIECE_BYTES:
            if extra:
                message = dataclasses.replace(message, seq=message.seq + extra)
            return [(message, (start, end))]
        unit = offset_unit(message.format, message.channels)
        count = -(-len(data) // PIECE_BYTES)
        step = -(-len(data) // unit // count) * unit  # (whole frames, as even as they go)
        seconds = (end - start) / len(data)  # (a byte's)
        pieces = [
            (
                dataclasses.replace(
                    message,
                    seq=message.seq + extra + i,
                    offset=message.offset + at // unit,
                    data=data[at : at + step],
                    codes=message.codes if i == 0 else None,  # (with its first piece)
                    until=message.until if at + step >= len(data) else None,  # (its last)
                ),
                (start + at * seconds, start + min(at + step, len(data)) * seconds),
            )
            for i, at in enumerate(range(0, len(data), step))
        ]
        self.extra[message.rendition] = extra + len(pieces) - 1
        return pieces

    def queued(self, start: float, end: float) -> None:
        if self.first is None:
            self.first = start
        self.end = end

    def sent(self, rendition: str | None, start: float) -> None:
        if rendition not in self.clocks:
            self.clocks[rendition] = time.monotonic() - start

    def lead(self, now: float) -> float:
        """Seconds of the live stream queued or sent ahead of its playback."""
        if self.end is None:
            return 0.0
        clock = self.clocks.get(None)
        if clock is None:  # (nothing sent yet: all of it ahead)
            return self.end - (self.first or 0.0)
        return clock + self.end - now


@dataclasses.dataclass(slots=True)
class _Chunk:
    """A chunk sent in pieces (``_Flow.pieces``). Its pieces leave the send
    queue's count together, as its first is written: as the whole chunk did in
    one frame (its bytes then with the transport). So the send buffer's bound
    and the hold count the chunks waiting, as they did, and the pieces still
    to write only give way to what is due sooner."""

    counted: int = 0  # bytes of its pieces in the queue still counted


class _Queued(NamedTuple):
    """A frame in the send queue, and what the writer needs to know of it: the
    request it is about ("" for none: the connection's own messages), whether it
    is audio or a done, its place in the queue's order and, for audio, where it
    starts in its stream (seconds) and the stream's flow."""

    frame: bytes | str
    id: str
    kind: str  # "audio", "done", "started" or ""
    order: int
    start: float = 0.0
    rendition: str | None = None
    flow: _Flow | None = None
    done: Done | None = None  # (a done's message)
    chunk: _Chunk | None = None  # (a piece of a chunk sent in pieces)

    def due(self, now: float) -> float:
        """When its client plays it: other messages at once (-inf), a stream's
        first chunk now."""
        if self.flow is None or self.kind != "audio":
            return -math.inf
        clock = self.flow.clocks.get(self.rendition)
        return now if clock is None else clock + self.start


def _overtakes(message: ServerMessage) -> bool:
    """A progress of the live stream below 1.0: what is generated, sent as it
    is made, ahead of its request's audio waiting (§4.4)."""
    return isinstance(message, Progress) and message.stage is None and message.fraction < 1.0


def _pcm_span(message: Audio) -> tuple[float, float]:
    start = message.offset / message.sample_rate
    return start, start + message.frames / message.sample_rate


def _hold_unsent(ws: ServerConnection) -> None:
    """At most ``UNSENT_BYTES`` of the connection's stream unsent in the kernel,
    where the system has the option (Linux; elsewhere the kernel's own)."""
    sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is not None and option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, UNSENT_BYTES)


def _check_resume(message: Generate) -> None:
    """A ``resume`` picks the stream up where a cut try of it left off (§3.1): the
    same audio needs the same seed; an encoded file, the frames its bytes hold
    (``resume_until``, for a file only, with ``resume``)."""
    if message.resume is None:
        raise InvalidField(
            "resume_until goes with resume (an encoded file picked up)",
            field="resume_until",
            id=message.id,
        )
    if message.resume_until is not None and message.format not in ENCODED_FORMATS:
        raise InvalidField(
            f"resume_until is for an encoded format (a {message.format} stream's "
            "resume counts its frames)",
            field="resume_until",
            id=message.id,
        )
    if message.format in ENCODED_FORMATS and message.resume_until is None:
        raise InvalidField(
            f"resume of a {message.format} file needs resume_until: the until of "
            "the last audio message the client has",
            field="resume_until",
            id=message.id,
        )
    if message.params.get("seed") is None:
        raise InvalidField(
            "resume needs params.seed: the seed the cut try's started gave, so that "
            "the stream is made again the same",
            field="resume",
            id=message.id,
        )


def _check_text_stream(message: Generate, info: ModelInfo) -> None:
    """``text_stream`` (§3.4): a model whose text may come as it is written; a
    stream picked up (``resume``) only where it is cut a sentence a chunk
    (``chunk_method: sentence``), so that its cuts do not depend on when its
    parts came (its ``prompt`` then holds all of its text so far; where parts
    were flushed mid-sentence, ``resume_flushes`` says where; and, of a file,
    where it got silence as the stream waited for its text, ``resume_waits``)."""
    if message.resume_waits is not None and (
        message.resume is None or not message.text_stream or message.format not in ENCODED_FORMATS
    ):
        raise InvalidField(
            "resume_waits goes with resume and text_stream, in an encoded format (a file "
            "whose text came as it was written, picked up: where it got silence)",
            field="resume_waits",
            id=message.id,
        )
    if message.resume_flushes is not None and (not message.text_stream or message.resume is None):
        raise InvalidField(
            "resume_flushes goes with resume and text_stream (a stream whose text came "
            "as it was written, picked up)",
            field="resume_flushes",
            id=message.id,
        )
    if "text_stream" not in info.capabilities:
        raise _unsupported(message, info, "text_stream")
    if message.resume is not None and message.params.get("chunk_method") != "sentence":
        raise InvalidField(
            "a stream whose text comes as it is written is picked up (resume) only where "
            "it is cut a sentence a chunk (params.chunk_method: sentence)",
            field="text_stream",
            id=message.id,
        )


def _check_waits(message: Generate, silences: Silences, most: int, until: int) -> None:
    """``resume_waits`` a try of the stream could have had: the audio before each
    wait within the file the client has (``resume_until``: its ``waiting`` came
    after that audio's chunks), and no more silence at one than an encoder's
    flush gives (``most``). (So a file picked up is given at most a few of its
    frames of silence again: those within the frames it is encoded again from.)"""
    held = 0
    for frames, silence in silences.waits:
        if frames + held > until or silence > most:
            raise InvalidField(
                f"resume_waits has a wait at frame {frames} with {silence} frames of silence: "
                f"past the file's resume_until ({until}, counting the silence before it), or "
                f"more silence than a wait gives ({most} frames at most)",
                field="resume_waits",
                id=message.id,
            )
        held += silence


def _check_codes(message: Generate, info: ModelInfo) -> int:
    """``codes`` and ``resume_codes`` (§3.1): a model whose streams are picked
    up from codes, and ``resume_codes`` with a ``resume``. The timesteps the
    client has."""
    for name in ("codes", "resume_codes"):
        if getattr(message, name) and "codes" not in info.capabilities:
            raise _unsupported(message, info, name)
    if not message.resume_codes:
        return 0
    if message.resume is None:
        raise InvalidField(
            "resume_codes picks a cut stream up: it needs resume",
            field="resume_codes",
            id=message.id,
        )
    # (Whole timesteps, codes the model has: its engine's check, before it is queued.)
    return len(message.resume_codes) // (2 * (info.codebooks or 1))


def _unsupported(message: Generate, info: ModelInfo, field: str) -> Unsupported:
    return Unsupported(
        f"{message.model} does not support {field} "
        f"(its capabilities: {', '.join(info.capabilities)})",
        field=field,
        id=message.id,
    )


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
