"""The inference thread: admission, queue positions, the step loop.

One ``Scheduler`` owns one device. Its thread loads the models, then loops:
admit queued requests while there is room (in turns among the clients, oldest
first for each: see ``fair_order``), prepare the admitted ones for
at most ``prefill_budget`` seconds (their conditioning, uploads and prompts, in
the engines' bounded units of work; requests arriving meanwhile are admitted and
prepared too, within the budget, so a crowd arriving over a few milliseconds
takes its costly first step together: what of that step can be done apart, the
engine's ``begin`` does as soon as a request is prepared, and the queue is
looked at again after it), step every running request once, hand the
results to each request's sink on the event loop, and drop any request whose
cancel flag is set, all between two decoding steps. A request that is slow to
prepare (a melody, a long continuation) therefore delays the running streams by
one budget per step, not by its whole preparation. Only this thread touches
torch.

Once the models are loaded and warmed up, everything alive (the imported
libraries, the models' modules, tokenizers) is frozen out of the garbage
collector's walk (``gc.freeze``): a full collection would otherwise visit those
half a million objects, holding the interpreter for about 300 ms on a CPU core
(every stream stalls; the first request after a start paid it) to find nothing;
it now visits only what requests allocated since. The heap is unfrozen when the
thread ends.

Before loading, the C heap (glibc's malloc, on Linux) is told to keep what is
freed for the next allocation (``keep_freed_memory``): by default it hands the
top of its heap back to the system once more than a few megabytes are free, and
maps large blocks afresh each time, so a codec call over many streams, whose
tensors are megabytes each, met fresh pages in every call: it took 15-25% longer
in some processes and not in others, which made the codec batch measured at
warm-up (``fastest_rows``) come out anywhere from 3 to 8 for the same model.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import heapq
import logging
import math
import platform
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wavecast.protocol import (
    Busy,
    InternalError,
    ModelInfo,
    Progress,
    Queued,
    ServerMessage,
    ShuttingDown,
    Started,
    TextTimeout,
    WavecastError,
)
from wavecast.protocol.messages import AudioFormat, DoneStatus

from .capacity import TickCosts, TickFit
from .engines.base import Engine, EngineRequest, Job, StepOutput
from .metrics import Metrics
from .outputs import RequestOutputs, done_message, progress_due

__all__ = ["Request", "Scheduler", "keep_freed_memory"]

log = logging.getLogger(__name__)

Sink = Callable[[ServerMessage], None]
EngineFactory = Callable[[], Mapping[str, Engine]]


@dataclass(eq=False)
class Request:
    """A request as the scheduler sees it. ``sink`` runs on the event loop."""

    id: str
    model: str
    engine_request: EngineRequest
    format: AudioFormat
    sink: Sink
    log: logging.LoggerAdapter[logging.Logger]
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_error: WavecastError | None = None
    sample_rate: int | None = None  # the audio's rate as asked for (None: the model's)
    # True while the request's audio is not taken up as fast as it is made (its
    # client reads slower: ``Session.congested``; its encoders are behind:
    # ``EncodedStream.behind``): it is left out of the steps meanwhile, the
    # others going on. Called on the inference thread.
    held: Callable[[], bool] | None = None
    # Sample frames of the live stream its client already has (``generate.resume``):
    # made again, not sent.
    resume: int = 0
    # An encoded file picked up (``generate.resume_until``): the sample frames of
    # it its client has. Made again, and encoded again from a few of its codec's
    # frames before; its packets up to there not sent (``EncodedStream``).
    resume_until: int = 0
    # A stream picked up (``generate.resume`` above 0): its client's first places
    # in the queue (``fair_order``), and counted so in the metrics; a file whose
    # client has its first bytes and no audio of them yet too.
    picked_up: bool = False
    # Send the live stream's codes with its audio (``generate.codes``), from the
    # timestep after those the client has (``generate.resume_codes``).
    codes: bool = False
    codes_from: int = 0
    # Say which text its audio speaks (``generate.captions``, §4.9).
    captions: bool = False
    from_codes: float = 0.0  # seconds of the stream the engine took from them
    submitted_at: float = field(default_factory=time.perf_counter)
    # Who asked (its API key's digest on a server with keys, else its address):
    # the queue's places and the slots are shared among clients in turns
    # (``fair_order``), not by who asked first.
    client: str = ""
    # Inference-thread bookkeeping.
    job: Job | None = None
    # The engine's units of preparation, and the last part of it done that went out.
    preparing: Generator[Job | float | None, None, None] | None = None
    prepared: tuple[float, float] = (0.0, float("-inf"))  # (fraction, when sent)
    position: int = 0
    started_at: float = 0.0
    steps: int = 0  # ticks it has been stepped in
    seconds: float = 0.0  # audio generated so far (its context grows with it)
    target: float | None = None  # the audio it asked for, where it says (MusicGen)
    outputs: RequestOutputs | None = None  # once started
    # Its text comes as it is written (``generate.text_stream``): the parts that
    # came and are not yet with its engine (text, flush, end), under the
    # scheduler's lock; since when it has waited for its next part.
    texts: collections.deque[tuple[str, bool, bool]] = field(default_factory=collections.deque)
    waiting_since: float | None = None
    text_waited: float = 0.0  # seconds it waited for its text before (``waited``)
    # (the event loop's: characters of its text so far, and whether its end came)
    text_chars: int = 0
    text_ended: bool = False

    def waited(self, now: float) -> float:
        """Seconds it has waited for its text so far (``text_stream``): its
        audio is not behind real time for them. (Read on any thread.)"""
        since = self.waiting_since
        return self.text_waited + (now - since if since is not None else 0.0)

    def cancel(self, error: WavecastError | None = None) -> None:
        """Ask for the request to stop; ``error`` makes it end in ``error``."""
        if error is not None and self.cancel_error is None:
            self.cancel_error = error
        self.cancelled.set()


class Scheduler:
    """Runs engines on a dedicated thread and streams their output back."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine_factory: EngineFactory,
        *,
        max_queue: int,
        max_active: int,
        prefill_budget: float = 0.02,
        admission: str = "realtime",
        name: str = "inference",
    ) -> None:
        self._loop = loop
        self._factory = engine_factory
        self.max_queue = max_queue
        self.max_active = max_active
        self.prefill_budget = prefill_budget
        self.admission = admission
        # Seconds per tick (one step of every model) and streams stepped, over the
        # recent ticks with requests running, fitted as a fixed part and a part
        # per stream, with the codec's calls and the streams' contexts counted
        # apart (``capacity.TickCosts``).
        self._ticks = TickCosts()
        self._unmeasured = 0  # ticks in a row left out of the measure (young streams)
        self._preparing: list[Request] = []  # admitted, not running yet (FIFO)
        self._prepared: list[Request] = []  # prepared, not begun (``_begin_prepared``)
        self._held = 0  # decoding requests left out of the last tick (``Request.held``)
        self._waiting = 0  # and those that waited for their text (``text_stream``)
        self._outbox: list[tuple[Sink, ServerMessage]] = []  # this tick's messages
        # Requests past their live stream, rendering a post-stage (Multi-Band
        # Diffusion), FIFO: one step of the oldest per tick. They hold no place of
        # max_active (no decoder slot), and stay in _active for cancels and counts.
        self._post: list[Request] = []
        self._cond = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._reordered = False  # the clients' turns moved since the queue was ordered
        self._active: list[Request] = []
        self._stopping = False
        # While draining: when the drain ends (``perf_counter``; None: no end set).
        self._drain_until: float | None = None
        self._engines: Mapping[str, Engine] = {}
        self._ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._idle_event = asyncio.Event()  # set on the loop when nothing is queued or running
        # Counters, read by /v1/info and the tests.
        self.steps_total = 0
        self.metrics = Metrics()
        self.completed = 0
        self.cancelled = 0
        self.failed = 0

    # -- event-loop side -------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread; return once every model is loaded (or raise)."""
        self._thread.start()
        await self._ready

    @property
    def models(self) -> dict[str, ModelInfo]:
        return {name: engine.info for name, engine in self._engines.items()}

    def submit(self, request: Request) -> None:
        """Queue a request, in its client's turn (``fair_order``).

        A full queue makes room for a client holding fewer of its places than
        another by two or more: that one's newest queued request ends ``busy``.

        Raises:
            Busy: The queue is full, and shared as evenly as it can be.
            ShuttingDown: The server is draining.
        """
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down", id=request.id)
            waiting = [r for r in self._pending if not r.cancelled.is_set()]
            if len(waiting) + len(self._active) >= self.max_active + self.max_queue:
                victim = _place_for(request.client, waiting)
                if victim is None:
                    raise Busy("the request queue is full, try again later", id=request.id)
                # (dropped from the queue, with its done, at the next tick)
                victim.cancel(
                    Busy(
                        "the request queue is full, and its place went to another client "
                        "with fewer: try again later",
                        id=victim.id,
                    )
                )
            self._pending.append(request)
            self._pending = fair_order(self._pending, self._active)
            request.position = self._pending.index(request) + 1
            self._reordered = True  # (the others' positions: sent at the next tick)
            queued = Queued(id=request.id, position=request.position)
            self._loop.call_soon_threadsafe(request.sink, queued)
            self._cond.notify()

    def request_check(self, model: str) -> Callable[[EngineRequest], Any] | None:
        """The model's check of a request, to run before it is queued.

        Pure CPU work that touches no torch (see ``Engine.check``).
        """
        engine = self._engines.get(model)
        return None if engine is None else engine.check

    def cancel(self, request: Request, error: WavecastError | None = None) -> None:
        request.cancel(error)
        with self._cond:
            self._cond.notify()

    def add_text(self, request: Request, text: str, *, flush: bool, end: bool) -> None:
        """More text for a request opened with ``text_stream``: its engine has it
        before its next step (``Engine.add_text``)."""
        with self._cond:
            add_text_part(request.texts, text, flush, end)
            self._cond.notify()

    def per_model(self) -> dict[str, dict[str, int]]:
        """Requests queued, preparing and decoding, by model."""
        with self._cond:
            counts = {model: {"queued": 0, "active": 0} for model in self._engines}
            for request in self._pending:
                counts[request.model]["queued"] += 1
            for request in self._active:
                counts[request.model]["active"] += 1
        return counts

    def graphs(self) -> dict[str, tuple[int, int]]:
        """Models stepping through CUDA graphs: the shapes ready and how many
        times every graph was dropped (the cache grew: the next steps stall while
        their shapes are recorded again)."""
        counts = {}
        for name, engine in self._engines.items():
            graphs = engine.graphs
            if graphs is not None:
                counts[name] = (len(graphs), graphs.dropped)
        return counts

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            counters: dict[str, Any] = {
                "queued": len(self._pending),
                "active": len(self._active),
                "rendering": len(self._post),
                "waiting_for_text": self._waiting,
                "steps_total": self.steps_total,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "failed": self.failed,
            }
        counters["capacity"] = self.capacity()
        return counters

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; requests still pending or active end in ``shutting_down``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until no request is queued or running; False on timeout."""
        if self.idle:
            return True
        self._idle_event.clear()
        try:
            await asyncio.wait_for(self._idle_event.wait(), timeout)
        except TimeoutError:
            return self.idle
        return True

    def _notify_idle(self) -> None:
        if self.idle:
            self._idle_event.set()

    def refuse_new(self, drain_seconds: float | None = None) -> None:
        """Take no new request (``submit`` raises ``ShuttingDown``). With
        ``drain_seconds``, a queued request starts only where it would finish in
        half the time left, after those ahead of it (``_late_in_drain``); the
        others end ``shutting_down`` at the next tick, without waiting for the
        drain to run out: they had not started, and their clients may ask again
        elsewhere."""
        with self._cond:
            self._stopping = True
            if drain_seconds is not None:
                self._drain_until = time.perf_counter() + drain_seconds
            self._cond.notify()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._active

    # -- inference thread ------------------------------------------------------------

    def _emit(self, request: Request, message: ServerMessage) -> None:
        """Queue a message for the event loop; ``_flush`` hands a tick's over at once."""
        self._outbox.append((request.sink, message))

    def _flush(self) -> None:
        # One wake-up of the event loop per tick, not one per message.
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(_deliver_all, batch)

    def _run(self) -> None:
        keep_freed_memory()
        try:
            self._engines = dict(self._factory())
            # Every model sized before any reserves its table: each in its part
            # of the same memory, and each then reserved (and its graphs
            # recorded) for the number the server runs, the least of theirs.
            took: dict[str, float] = {}
            for name, engine in self._engines.items():
                start = time.perf_counter()
                engine.size()
                took[name] = time.perf_counter() - start
            if self.max_active <= 0:  # (as many as fit: what each model found room for)
                self.max_active = min(
                    (engine.max_active for engine in self._engines.values()), default=1
                )
                log.info("up to %d requests at once", self.max_active)
            for name, engine in self._engines.items():
                start = time.perf_counter()
                engine.warm_up(self.max_active)
                took[name] += time.perf_counter() - start
                log.info("%s warmed up in %.2f s", name, took[name])
            # Last, every model loaded and every table reserved: the packed
            # copies take what memory is left, or none.
            for engine in self._engines.values():
                engine.pack_weights()
        except BaseException as exc:  # report any load failure to the loop
            self._loop.call_soon_threadsafe(_set_exception, self._ready, exc)
            return
        _freeze_heap()
        self.metrics.watch_gc()
        self._loop.call_soon_threadsafe(_set_result, self._ready)
        try:
            while self._loop_once():
                self._flush()
        except Exception:
            log.exception("inference thread crashed")
            for request in [*self._active, *self._pending]:
                self._finish(request, "error", InternalError("the server failed"))
        finally:
            with self._cond:
                leftover = [*self._active, *self._pending]
                self._active.clear()
                self._pending.clear()
            for request in leftover:
                self._finish(request, "error", ShuttingDown("the server is shutting down"))
            self._flush()
            self.metrics.unwatch_gc()
            gc.unfreeze()  # what the models held can be collected again

    def _loop_once(self) -> bool:
        with self._cond:
            if not self._pending and not self._active:
                self._loop.call_soon_threadsafe(self._notify_idle)
            while not self._pending and not self._active and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._pending and not self._active:
                return False
        deadline = time.perf_counter() + self.prefill_budget
        admitted = self._admit_pending()
        self._prepare_some(deadline)
        self._begin_prepared()
        # Requests that came while those were prepared and begun (a crowd arriving
        # over a few milliseconds) start in the same step: their first step (the
        # prefill, in one call) is the costly one, and paid once.
        while admitted and self._pending and time.perf_counter() < deadline:
            admitted = self._admit_pending()
            self._prepare_some(deadline)
            self._begin_prepared()
        # Preparation is left out of the measure (it passes, the steps recur), and
        # so are the ticks in which a stream is still young: its first step
        # encodes its description and prefills (a burst's first tick can take ten
        # times a steady one).
        start = time.perf_counter()
        codec = self._codec_seconds()
        running, young, context = self._step_active()
        if not running and self._held and not self._post and not self._preparing:
            # Every stream waits for its encoders: a moment, not a spin (that
            # would take the cores they need).
            with self._cond:
                if not self._pending and not self._stopping:
                    self._cond.wait(self.HELD_WAIT)
        elif not running and self._waiting and not self._post and not self._preparing:
            # Every stream waits for its text: until some comes (``add_text``
            # wakes the thread), or a while, to end those that waited too long.
            # (Requests queued behind them wait too, for a slot they free.)
            with self._cond:
                if not self._stopping and not self._texts_came() and not self._room():
                    self._cond.wait(self.TEXT_POLL)
        if running:
            took = time.perf_counter() - start
            codec = self._codec_seconds() - codec
            self._unmeasured = 0 if not young else self._unmeasured + 1
            if self._unmeasured in (0, self.MEASURE_ANYWAY):
                self._unmeasured = 0
                with self._cond:
                    self._ticks.add(took, running, context, codec)
        return True

    # A stream is young for its first this many steps.
    YOUNG_STEPS = 2
    # Seconds the thread waits where every decoding stream is held (``Request.held``).
    HELD_WAIT = 0.005
    # Seconds a request whose text comes as it is written (``text_stream``) may
    # wait for its next part once it has spoken the rest; how often the thread
    # looks where every stream waits for text.
    TEXT_WAIT = 60.0
    TEXT_POLL = 0.5
    # Where young streams run in tick after tick (requests arriving all the time),
    # one tick in this many is measured anyway.
    MEASURE_ANYWAY = 16

    # Real time with room to spare: a tick may take at most this part of the
    # audio one step adds to each stream.
    REALTIME_MARGIN = 0.8

    # Seconds of audio ahead of a stream that admission counts its context at,
    # where the stream does not say how long it will be (speech): real time for
    # that much longer.
    HORIZON = 10.0

    def _admit_pending(self) -> int:
        """Drop the cancelled requests from the queue and admit the oldest while
        there is room; update the others' positions. How many were admitted."""
        with self._cond:
            dropped = [r for r in self._pending if r.cancelled.is_set()]
            decoding = len(self._active) - len(self._post)
            if self._drain_until is not None:  # (draining: what would not end in time)
                late = self._late_in_drain()
                for request in late:
                    why = "the server is shutting down, and the request would not finish in time"
                    request.cancel(ShuttingDown(why + ": it had not started", id=request.id))
                dropped += late
            for request in dropped:
                self._pending.remove(request)
            # The clients' turns move as requests join, leave the queue and end
            # (not as they start: a client's next request's turn stays).
            reordered, self._reordered = self._reordered or bool(dropped), False
            if reordered and self._pending:
                self._pending = fair_order(self._pending, self._active)
            admitted: list[Request] = []
            limit = self._admission_limit(decoding) if self._pending else self.max_active
            while self._pending and decoding + len(admitted) < limit:
                # Active from now on, so that submit() counts it while it prepares.
                request = self._pending.popleft()
                self._active.append(request)
                admitted.append(request)
            moved = bool(dropped or admitted or reordered)
            pending = list(self._pending)
        for request in dropped:
            self._end_cancelled(request)
        if moved:
            for position, request in enumerate(pending, start=1):
                if request.position != position:
                    request.position = position
                    self._emit(request, Queued(id=request.id, position=position))
        for request in admitted:
            self._admit(request)
        return len(admitted)

    # A draining server starts a queued request only where, at the measured speed,
    # it would end within this part of the drain time left.
    DRAIN_SHARE = 0.5

    def _late_in_drain(self) -> list[Request]:
        """The queued requests that, on a draining server, would not finish in
        ``DRAIN_SHARE`` of the time left: each in its turn takes the slot that
        frees first (the running ones' and the earlier queued ones' ends), and
        runs for the most audio it can make (``Engine.most_seconds``: a music
        clip's ``duration``, speech's ``max_new_tokens`` a chunk of its text),
        a step a frame, each at the measured tick of every slot busy at the
        longest context. A request whose time is not known (a Multi-Band
        Diffusion post-stage, an upload's analysis; no tick measured yet) is
        late, and a running one whose end is not known holds its slot to the
        end. Call with the lock."""
        assert self._drain_until is not None
        fit = self._ticks.fit()
        waiting = [r for r in self._pending if not r.cancelled.is_set()]
        if fit is None:
            return waiting
        left = self.DRAIN_SHARE * (self._drain_until - time.perf_counter())
        slots = self.max_active
        tick = fit.cost(slots, slots * self._context_ahead())

        def seconds(request: Request, done: float) -> float:
            """What is left of a request's steps, in seconds (inf: not known)."""
            engine = self._engines.get(request.model)
            if engine is None:
                return math.inf
            most: Any = request.target  # (MusicGen's, once started)
            if most is None and request.job is not None:
                most = request.job.extra.get("max_seconds")  # (speech's, once prepared)
            if most is None:
                most = engine.most_seconds(request.engine_request)
            if not isinstance(most, int | float):
                return math.inf
            return max(0.0, float(most) - done) * engine.frame_rate * tick

        decoding = [r for r in self._active if r not in self._post]
        ends = [seconds(r, r.seconds) for r in decoding][:slots]
        ends += [0.0] * (slots - len(ends))  # (free slots)
        heapq.heapify(ends)
        late = []
        for request in waiting:
            start = heapq.heappop(ends)
            end = start + seconds(request, 0.0)
            if end <= left:
                heapq.heappush(ends, end)
            else:
                late.append(request)
                heapq.heappush(ends, start)
        return late

    def _admission_limit(self, running: int) -> int:
        """How many streams may decode at once now (``running`` do): ``max_active``,
        or with ``realtime`` admission (once ticks are measured) the most that the
        measured ticks' fit (``capacity.TickFit``) says stay faster than real
        time, each at the context it will reach; one at least. Call with the lock."""
        fit = self._ticks.fit()
        if self.admission != "realtime" or fit is None:
            return self.max_active
        return max(1, running, self._realtime_streams(fit))

    def _realtime_streams(self, fit: TickFit) -> int:
        """The most streams whose tick is estimated to fit in the audio a step adds
        to each, with the margin (at most ``max_active``), each at the longest
        context a stream running or about to start will reach."""
        budget = self.REALTIME_MARGIN * self._step_audio()
        return fit.most(budget, self.max_active, self._context_ahead())

    def _context(self, engine: Engine, seconds: float) -> float:
        """What the context of a stream ``seconds`` into its audio costs a step
        (``Engine.context_cost``), its attention spanning at most the engine's
        window (``Engine.context_seconds``)."""
        window = engine.context_seconds
        return engine.context_cost * (seconds if window is None else min(seconds, window))

    def _context_ahead(self) -> float:
        """The most a running, preparing or queued stream's context will cost a step:
        at its length (MusicGen's, once started; before, the ``duration`` it asks
        for), else HORIZON seconds past where it is. Call with the lock."""
        most = 0.0
        for request in (*self._active, *self._pending):
            engine = self._engines.get(request.model)
            if engine is None:
                continue
            target = request.target
            if target is None and request.job is None:
                asked = request.engine_request.params.get("duration")
                target = float(asked) if isinstance(asked, int | float) else None
            ahead = target if target is not None else request.seconds + self.HORIZON
            most = max(most, self._context(engine, ahead))
        return most

    def _codec_seconds(self) -> float:
        """Seconds the engines have spent in codec calls so far."""
        return sum(engine.codec_seconds for engine in self._engines.values())

    def _step_audio(self) -> float:
        """Seconds of audio a step adds to a stream (the slowest model's)."""
        return min((1.0 / engine.frame_rate for engine in self._engines.values()), default=0.0)

    def capacity(self) -> dict[str, Any]:
        """The measured speed, for /v1/info: the mean tick, its fit and the
        real-time estimate."""
        with self._cond:
            fit = self._ticks.fit()
            streams = None if fit is None else self._realtime_streams(fit)
            context = self._context_ahead()
        if fit is None:
            return {
                "tick_ms": None,
                "measured_streams": 0,
                "tick_fixed_ms": None,
                "tick_per_stream_ms": None,
                "tick_codec_ms_per_stream": None,
                "tick_context_ms": None,
                "realtime_streams": None,
                "admission": self.admission,
            }
        return {
            "tick_ms": round(fit.mean_tick * 1000, 3),
            "measured_streams": round(fit.mean_streams, 2),
            "tick_fixed_ms": round(fit.fixed * 1000, 3),
            "tick_per_stream_ms": round(fit.per_stream * 1000, 4),
            "tick_codec_ms_per_stream": round(fit.codec_per_stream * 1000, 4),
            "tick_context_ms": round(context * 1000, 4),
            "realtime_streams": streams,
            "admission": self.admission,
        }

    def _admit(self, request: Request) -> None:
        if request.cancelled.is_set():
            self._release(request)
            self._end_cancelled(request)
            return
        engine = self._engines[request.model]
        request.started_at = time.perf_counter()
        request.preparing = engine.prepare_steps(request.engine_request)
        self._preparing.append(request)
        # Out of the queue: say so now, a melody's analysis may take a while.
        self._emit(request, Progress(id=request.id, fraction=0.0, seconds=0.0, stage="prepare"))
        request.prepared = (0.0, time.perf_counter())

    def _prepare_some(self, deadline: float) -> None:
        """Advance the admitted requests' preparation, oldest first, until
        ``deadline`` (the tick's budget).

        At least one unit of work runs per call, so preparation always moves on.
        """
        while self._preparing:
            request = self._preparing[0]
            if request.cancelled.is_set():
                self._release(request)
                self._end_cancelled(request)
                continue
            assert request.preparing is not None
            try:
                job = next(request.preparing)
                if isinstance(job, float):
                    self._preparation_progress(request, job)
                    job = None
            except WavecastError as exc:
                exc.id = request.id
                self._release(request)
                self._finish(request, "error", exc)
                job = None
            except Exception:
                request.log.exception("prepare failed")
                self._release(request)
                self._finish(request, "error", InternalError("the model failed on this request"))
                job = None
            if job is not None:
                self._preparing.pop(0)
                request.preparing = None
                request.job = job
                self._prepared.append(request)
                self._started(request)
            if time.perf_counter() >= deadline:
                return

    def _begin_prepared(self) -> None:
        """The requests prepared since the last call, handed to their engines'
        ``begin`` (the first step's work that need not wait for it), a call per
        model: the crowd arriving meanwhile is then admitted before that step."""
        prepared, self._prepared = self._prepared, []
        by_model: dict[str, list[Request]] = {}
        for request in prepared:
            if request.job is not None and not request.cancelled.is_set():
                by_model.setdefault(request.model, []).append(request)
        for model, requests in by_model.items():
            try:
                self._engines[model].begin([r.job for r in requests if r.job is not None])
            except Exception:  # (as a step that fails: these requests end)
                log.exception("beginning requests failed for model %s", model)
                for request in requests:
                    self._release(request)
                    self._finish(request, "error", InternalError("the model failed"))

    def _preparation_progress(self, request: Request, fraction: float) -> None:
        """The part of a request's preparation done, as a ``"prepare"`` progress:
        at most every 1% and every ``PROGRESS_INTERVAL``, as a stage's progress."""
        now = time.perf_counter()
        if progress_due(fraction, *request.prepared, now):
            request.prepared = (fraction, now)
            self._emit(
                request,
                Progress(id=request.id, fraction=round(fraction, 4), seconds=0.0, stage="prepare"),
            )

    def _started(self, request: Request) -> None:
        assert request.job is not None
        info = self._engines[request.model].info
        request.outputs = RequestOutputs(
            request.id,
            info,
            request.format,
            request.sample_rate or 0,
            skip=request.resume,
            had=request.resume_until,
            codes=request.codes,
            codes_from=request.codes_from,
            captions=request.captions,
        )
        extra = request.job.extra
        seed, seconds, max_seconds = (extra.get(k) for k in ("seed", "seconds", "max_seconds"))
        request.target = float(seconds) if isinstance(seconds, int | float) else None
        from_codes = extra.get("from_codes")
        request.from_codes = float(from_codes) if isinstance(from_codes, int | float) else 0.0
        from_sample = extra.get("from_sample")
        if isinstance(from_sample, int):  # (the audio before, its client has: not made again)
            request.outputs.begin_at(from_sample)
        self._emit(
            request,
            Started(
                id=request.id,
                model=request.model,
                sample_rate=request.outputs.sample_rate,
                channels=info.channels,
                format=request.format,
                seed=seed if isinstance(seed, int) else None,
                seconds=float(seconds) if isinstance(seconds, int | float) else None,
                max_seconds=float(max_seconds) if isinstance(max_seconds, int | float) else None,
            ),
        )
        request.log.info("started (queued %.3f s)", request.started_at - request.submitted_at)

    def _step_active(self) -> tuple[int, bool, float]:
        """Step every decoding request once, and the oldest post-stage one; how many
        decoding requests ran, whether one of them is young (``YOUNG_STEPS``), and what
        their contexts cost the tick: each model's streams at the longest context
        among them (what its batched step's attention spans), summed."""
        with self._cond:
            active = list(self._active)
        runnable: dict[str, list[Request]] = {}
        self._held = self._waiting = 0
        for request in active:
            if request.cancelled.is_set():
                self._release(request)
                self._end_cancelled(request)
            elif request.job is None or request in self._post:
                continue
            elif request.engine_request.text_stream and self._waits_for_text(request):
                # It has spoken all of its text so far, or it ended there (its
                # wait too long, or its text refused): then it waits no more.
                self._waiting += request.job is not None
            elif request.held is not None and request.held():
                self._held += 1  # (its step waits for its encoders)
                self.metrics.held(request.model)
            else:
                runnable.setdefault(request.model, []).append(request)
        groups = list(runnable.items())
        if self._post:
            oldest = self._post[0]
            groups.append((oldest.model, [oldest]))
        for model, requests in groups:
            engine = self._engines[model]
            jobs = [r.job for r in requests if r.job is not None]
            assert len(jobs) == len(requests)
            try:
                outputs = engine.step(jobs)
            except Exception:
                log.exception("step failed for model %s", model)
                for request in requests:
                    self._release(request)
                    self._finish(request, "error", InternalError("the model failed"))
                continue
            self.steps_total += 1
            now = time.perf_counter()
            for request, output in zip(requests, outputs, strict=True):
                self._deliver(request, output, now)
        young = False
        context = 0.0
        for model, requests in runnable.items():
            longest = 0.0
            for request in requests:
                young = young or request.steps < self.YOUNG_STEPS
                request.steps += 1
                longest = max(longest, request.seconds)
            context += len(requests) * self._context(self._engines[model], longest)
        return sum(len(requests) for requests in runnable.values()), young, context

    def _waits_for_text(self, request: Request) -> bool:
        """Give a request's engine the text that came for it; whether it is left
        out of the steps: it has spoken all of its text so far and waits for more
        (its row kept), or it ended here (released): one whose text the engine
        refused, or that waited ``TEXT_WAIT`` seconds."""
        assert request.job is not None
        engine = self._engines[request.model]
        with self._cond:
            texts = list(request.texts)
            request.texts.clear()
        try:
            for text, flush, end in texts:
                engine.add_text(request.job, text, flush=flush, end=end)
        except WavecastError as exc:
            self._release(request)
            self._finish(request, "error", exc)
            return True
        if not engine.waiting(request.job):
            if request.waiting_since is not None:
                # (the sum first: read meanwhile, the wait counts twice, never not)
                request.text_waited += time.perf_counter() - request.waiting_since
                request.waiting_since = None
            return False
        now = time.perf_counter()
        if request.waiting_since is None:
            request.waiting_since = now
        elif now - request.waiting_since > self.TEXT_WAIT:
            self._release(request)
            self._finish(
                request,
                "error",
                TextTimeout(f"no text came for {self.TEXT_WAIT:g} s", id=request.id),
            )
        return True

    def _texts_came(self) -> bool:
        """Whether text came for a decoding request (call with the lock)."""
        return any(request.texts for request in self._active)

    def _room(self) -> bool:
        """Whether a queued request could start now (call with the lock)."""
        decoding = len(self._active) - len(self._post)
        return bool(self._pending) and decoding < self._admission_limit(decoding)

    def _deliver(self, request: Request, output: StepOutput, now: float) -> None:
        assert request.outputs is not None
        if output.error is not None:  # it failed alone; its neighbours go on
            self._release(request)
            self._finish(request, "error", output.error)
            return
        live = request.outputs.stage is None
        if live:
            request.seconds = output.seconds
        for message in request.outputs.messages(output, now):
            self._emit(request, message)
        if live and output.stage is not None and not output.done:
            self._post.append(request)  # the live stream is complete
        if output.done:
            self._release(request)
            self._finish(request, "completed")

    def _release(self, request: Request) -> None:
        with self._cond:
            if request in self._active:
                self._active.remove(request)
                self._reordered = True  # (its client's turn moved)
        if request in self._post:
            self._post.remove(request)
        if request.preparing is not None:
            self._preparing.remove(request)
            request.preparing.close()
            request.preparing = None
        if request.job is not None:
            try:
                self._engines[request.model].finish(request.job)
            finally:
                request.job = None

    def _end_cancelled(self, request: Request) -> None:
        """A cancelled request's end: ``cancelled`` when the client asked, an error
        when the server did (``shutting_down`` at the end of a drain), wherever it
        was (queued, preparing, decoding)."""
        error = request.cancel_error
        self._finish(request, "error" if error else "cancelled", error)

    def _finish(
        self, request: Request, status: DoneStatus, error: WavecastError | None = None
    ) -> None:
        stats = None
        if request.outputs is not None:
            stats = request.outputs.stats(
                submitted_at=request.submitted_at,
                started_at=request.started_at,
                now=time.perf_counter(),
            )
        outputs = request.outputs
        self.metrics.finished(
            request.model,
            status,
            error=error.code if error else None,
            audio_seconds=outputs.sent_seconds if outputs else 0.0,
            first_audio_seconds=stats.first_audio_seconds if stats else None,
            queued_seconds=stats.queued_seconds if stats else None,
            real_time_factor=stats.real_time_factor if stats else None,
            resumed_seconds=outputs.skipped_seconds if outputs and request.picked_up else None,
            from_codes_seconds=float(request.from_codes),
        )
        if status == "completed":
            self.completed += 1
        elif status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        request.log.info("%s%s", status, f" ({error.code})" if error else "")
        self._emit(request, done_message(request.id, status, error, stats))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks this large or larger are mapped on their own (and unmapped when freed);
# smaller ones come from the heap. glibc's largest.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap past this goes back to the system.
TRIM_THRESHOLD = 256 << 20


def add_text_part(
    parts: collections.deque[tuple[str, bool, bool]], text: str, flush: bool, end: bool
) -> None:
    """A ``text`` frame's part into a request's parts not yet with its engine,
    as few as say the same: a part joins the one before where that one neither
    flushes nor ends (the same text, cut at the same places); a part of nothing
    that neither flushes nor ends, or that flushes after a flush, is dropped.
    So they are at most one a character of the request's text
    (``limits.max_prompt_chars``), however many frames came."""
    if parts and not parts[-1][1] and not parts[-1][2]:
        parts[-1] = (parts[-1][0] + text, flush, end)
    elif text or end or (flush and not (parts and parts[-1][1])):
        parts.append((text, flush, end))


def keep_freed_memory() -> bool:
    """Have the C heap keep freed memory for reuse: blocks under 32 MiB from the
    heap, and up to 256 MiB free at its top before any goes back to the system
    (glibc only; whether it was done). Process-wide, and it stays so."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if done:
        log.info(
            "freed memory kept for reuse: blocks under %d MiB from the heap, %d MiB free "
            "at its top before any is returned",
            MMAP_THRESHOLD >> 20,
            TRIM_THRESHOLD >> 20,
        )
    return done


def _freeze_heap() -> None:
    """Collect what loading left behind, then keep everything still alive out of
    every later collection's walk (it stays alive until the server stops)."""
    start = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - start
    gc.freeze()
    log.info(
        "heap frozen: %d objects out of the garbage collector's walk "
        "(a full collection took %.0f ms)",
        gc.get_freeze_count(),
        took * 1000,
    )


def _deliver_all(batch: list[tuple[Sink, ServerMessage]]) -> None:
    for sink, message in batch:
        try:
            sink(message)
        except Exception:
            log.exception("delivering %s failed", message.type)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def fair_order(
    pending: collections.deque[Request], active: list[Request]
) -> collections.deque[Request]:
    """The queue in the order its requests start: in turns among the clients, a
    client's own in the order they came. A request's turn is the number of its
    client's requests running or ahead of it in the queue; the lower first, and
    among equal turns, the one ahead already (the first to come, in a queue
    ordered so since). So a client with a request or two is not left behind one
    that sent thirty: their requests alternate. A client's streams picked up
    where they were cut (``resume``: its listener is in the middle of it) take
    its first places, ahead of its requests not started yet, in its turns."""
    counts = collections.Counter(request.client for request in active)
    places: dict[str, list[int]] = collections.defaultdict(list)
    theirs: dict[str, list[Request]] = collections.defaultdict(list)
    for index, request in enumerate(pending):
        places[request.client].append(index)
        theirs[request.client].append(request)
    turns = []
    for client, requests in theirs.items():
        # (stable: in the order they came)
        requests.sort(key=lambda request: not request.picked_up)
        for turn, (index, request) in enumerate(zip(places[client], requests, strict=True)):
            turns.append((counts[client] + turn, index, request))
    return collections.deque(request for _, _, request in sorted(turns, key=lambda t: t[:2]))


def _place_for(client: str, waiting: list[Request]) -> Request | None:
    """In a full queue: the request that gives ``client`` a place (the newest of
    the client holding most places, where it holds two or more than ``client``
    does), or None where the places are shared as evenly as they can be."""
    held = collections.Counter(request.client for request in waiting)
    if not held:
        return None
    most, count = held.most_common(1)[0]
    if count < held[client] + 2:
        return None
    return next(request for request in reversed(waiting) if request.client == most)
