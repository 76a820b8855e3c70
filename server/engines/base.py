"""The one small interface every engine implements.

Engines know nothing of WebSockets or asyncio: a request goes in, audio chunks
and progress come out of ``step``, and the scheduler checks each request's cancel
flag between steps. Only the inference thread calls these methods.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from wavecast.protocol import (
    InternalError,
    InvalidField,
    ModelInfo,
    ParamSpec,
    ParamValue,
    WavecastError,
    resolve_params,
)

if TYPE_CHECKING:
    import torch

    from .codec_stream import CodecStreams
    from .graphs import StepGraphs
    from .measures import Measures

__all__ = [
    "SEED_SPEC",
    "Engine",
    "EngineRequest",
    "Job",
    "ModelLoadError",
    "StepOutput",
    "TableSizing",
    "attempt",
    "attempt_together",
    "failed_output",
    "isolated",
    "non_finite",
    "number",
    "request_seed",
    "run_once",
    "step_error",
]

log = logging.getLogger(__name__)

FloatAudio = npt.NDArray[np.float32]
Upload = tuple[FloatAudio, int]  # samples [frames, channels], rate

MAX_SEED = 2**63 - 1
SEED_SPEC = ParamSpec(
    "seed",
    "int",
    None,
    0,
    MAX_SEED,
    description="random seed (empty: a fresh one, reported in started)",
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What an engine needs to know about a request (params already validated)."""

    request_id: str
    prompt: str
    params: Mapping[str, ParamValue]
    inputs: Mapping[str, bytes] = field(default_factory=dict)  # uploaded files by role
    # The uploads decoded and checked before the request was queued (``Engine.check``):
    # float32 ``[frames, channels]`` and the rate, by role. Missing: decoded in prepare.
    decoded: Mapping[str, Upload] = field(default_factory=dict)
    # The codes of the live stream a cut try of it sent (``generate.resume_codes``:
    # little-endian uint16, frame after frame), to pick it up from them.
    resume_codes: bytes | None = None
    # Sample frames of the live stream its client has, at the model's rate
    # (``generate.resume``, where the client hears that rate; else 0): a stream
    # picked up from its codes makes none of their audio again (``Job.extra``'s
    # ``from_sample``: where its audio starts).
    resume: int = 0
    # The text comes as it is written (``generate.text_stream``): ``prompt`` is its
    # beginning, the rest comes by ``Engine.add_text``.
    text_stream: bool = False
    # A text stream picked up (``generate.resume_flushes``): where, in characters
    # of ``prompt``, the cut try's parts sent with ``flush`` ended (ascending).
    text_flushes: tuple[int, ...] = ()


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one job.

    Args:
        audio: New audio, float32 of shape ``[frames, channels]`` (may be empty).
        fraction: Progress in [0, 1].
        seconds: Seconds of audio generated so far (tokens, not yet all decoded).
        done: The job is finished; ``audio`` holds its last samples.
        stage: ``None`` while generating, ``"mbd"`` while diffusion renders.
        rendition: The whole Multi-Band Diffusion version, on its last step.
        error: The job failed on its own inside the step (its neighbours in the
            batch go on); the scheduler ends it with this error.
        codes: The timesteps of the live stream completed in the step, each
            one's codes ``[K]`` (engines whose streams are picked up from
            codes: ``generate.codes``).
        codes_from: The index of the first of them among the live stream's
            timesteps (a continuation's prompt not counted).
        waiting: The job has spoken all of its text so far and waits for more
            (``Engine.add_text``): its audio up to here is all in this output
            and those before it.
        caption: A text chunk's audio begins in the step: the sample frame
            of the live stream (at the model's rate) it begins at, and the
            chunk's text (``generate.captions``).
    """

    audio: FloatAudio | None
    fraction: float
    seconds: float
    done: bool = False
    stage: str | None = None  # None: generating; "mbd": rendering the diffusion version
    rendition: FloatAudio | None = None  # the complete "mbd" version, when ready
    error: WavecastError | None = None
    codes: list[list[int]] | None = None
    codes_from: int = 0
    waiting: bool = False
    caption: tuple[int, str] | None = None


def step_error(exc: BaseException, request_id: str | None = None) -> WavecastError:
    """What a request that failed alone in a batched step ends with (logged here:
    the client sees only the code and a short message)."""
    if isinstance(exc, WavecastError):
        log.warning("request %s failed in a step: %s (%s)", request_id or "?", exc, exc.code)
        return exc
    log.error("request %s failed in a step", request_id or "?", exc_info=exc)
    return InternalError("the model failed on this request")


def non_finite() -> InternalError:
    """A request whose rows produced NaN or infinite logits (it ends; others go on)."""
    return InternalError("the model produced non-finite values (NaN or infinity) for this request")


T = TypeVar("T")


def attempt(
    failures: dict[int, BaseException],
    owners: Sequence[object],
    fn: Callable[..., T],
    *args: Any,
) -> T | None:
    """``fn(*args)``; if it raises, the exception goes into ``failures`` for each of
    ``owners`` (by ``id``: the requests whose part of a step it was) and ``None``
    comes back, so that the step goes on without them."""
    try:
        return fn(*args)
    except Exception as exc:
        for owner in owners:
            failures[id(owner)] = exc
        return None


Owner = TypeVar("Owner")


def attempt_together(
    failures: dict[int, BaseException], owners: Sequence[Owner], fn: Callable[[list[Owner]], object]
) -> None:
    """``fn(owners)``, the requests' parts of a step in one call; if it raises,
    ``fn([owner])`` for each alone (``attempt``), so that only the ones at fault
    go into ``failures``."""
    if len(owners) > 1:
        try:
            fn(list(owners))
        except Exception:  # each alone: only the one at fault fails
            log.debug("a call for %d requests failed; each is tried alone", len(owners))
        else:
            return
    for owner in owners:
        attempt(failures, [owner], fn, [owner])


def isolated(job: Job, fn: Callable[..., StepOutput], *args: Any) -> StepOutput:
    """A job's part of a step; if it raises, that job's failed output."""
    try:
        return fn(*args)
    except Exception as exc:
        return failed_output(job, exc)


def failed_output(job: Job, exc: BaseException) -> StepOutput:
    """The output of a job that failed alone in a batched step."""
    error = step_error(exc, job.request.request_id)
    return StepOutput(audio=None, fraction=0.0, seconds=0.0, done=True, error=error)


@dataclass(slots=True)
class Job:
    """One request's generation state, owned by its engine."""

    request: EngineRequest
    state: Any = None
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A model behind the step interface."""

    # Frames of audio per second: each step adds one frame to every running request.
    frame_rate: float
    # Seconds of audio past which a stream's attention stops growing (a window
    # that slides on: MusicGen's), or None (it grows to the end: speech).
    context_seconds: float | None
    # Seconds a step costs per stream per second of its context (its attention
    # reading more positions), measured at warm-up (``step_cost``); 0 before.
    context_cost: float
    # Host seconds spent in the streams' codec calls so far (a step decodes every
    # stream's due chunks together, now and then: the scheduler counts it apart).
    codec_seconds: float
    # Requests its table is sized for (decoded at once): as asked, or, asked for
    # none, as many as the device's memory held at warm-up (``kv.room_for``).
    max_active: int

    @property
    def graphs(self) -> StepGraphs | None:
        """The step's CUDA graphs (``--cuda-graphs``), or None."""
        ...

    @property
    def info(self) -> ModelInfo:
        """What the greeting says about this model."""
        ...

    def prepare(self, request: EngineRequest) -> Job:
        """Set up a request (conditioning, buffers). May raise ``WavecastError``."""
        ...

    def prepare_steps(self, request: EngineRequest) -> Generator[Job | float | None, None, None]:
        """``prepare`` in bounded units of work, for the scheduler.

        Yields ``None`` between units (the scheduler may step the running
        requests there), or a float there: the part of the preparation done,
        0 to 1, where a long one measures it (a melody's separation, an
        upload's encoding); then the Job. May raise ``WavecastError``.
        """
        ...

    def most_seconds(self, request: EngineRequest) -> float | None:
        """The most audio ``request`` can make, in seconds, where that and its
        preparation are known before it starts (a draining server starts a
        queued request only where it would finish in time); None where not (a
        post-stage, an upload's analysis)."""
        ...

    def begin(self, jobs: Sequence[Job]) -> None:
        """Work of the first step of ``jobs`` (prepared, not stepped yet) that
        can be done before that step, done now (MusicGen: their descriptions
        encoded, in one call). The scheduler calls it as the jobs are prepared,
        and then looks at its queue again: requests that came meanwhile (a
        crowd arriving over a few milliseconds) still start in the same step.
        A request that fails here fails in that step, on its own (MusicGen:
        nothing is kept, and the step encodes the descriptions again)."""
        ...

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        """Advance every job by one decoding step; one output per job, in order."""
        ...

    def finish(self, job: Job) -> None:
        """Release a job's resources (completed, cancelled or failed)."""
        ...

    def add_text(self, job: Job, text: str, *, flush: bool, end: bool) -> None:
        """More text for a job whose request streams its text (``text_stream``;
        models with the ``text_stream`` capability): what is complete of it
        (sentences; all of it with ``flush`` or ``end``) is spoken next; after
        ``end``, no more comes. On the inference thread, between steps."""
        ...

    def waiting(self, job: Job) -> bool:
        """Whether a job has spoken all of its text so far and waits for more
        (``add_text``): the scheduler leaves it out of the steps meanwhile, its
        row kept."""
        ...

    def check(self, request: EngineRequest) -> dict[str, Upload]:
        """Check a request before it is queued; its uploads, decoded.

        What needs no model: the parameters against the server's configuration
        (named voices, a transcript without its clip, an empty text) and the
        uploads (not audio, too long, too short). Touches no torch: it runs on the
        event loop for a request without uploads, in a worker pool for one with.
        Raises ``InvalidField``.
        """
        ...

    def size(self) -> int:
        """Run a short request once (``run_once``: the first calls allocate, and
        pick their kernels) and size the table (``max_active``): the requests it
        takes, as asked, or as many as fit (``kv.room_for``). Reserves nothing
        more than that request's rows; the same number once done."""
        ...

    def warm_up(self, max_active: int = 0) -> None:
        """``size`` where not done, then ready the table for ``max_active``
        requests where fewer than it found room for (the server's number: its
        models' least), so that the first client's request is not the slowest:
        the codec's calls measured, the table reserved and its graphs recorded
        (``--cuda-graphs``), the context's cost measured."""
        ...

    def pack_weights(self) -> None:
        """Once every engine is warm (every model's weights loaded and its
        key/value table reserved): give the large weights a step multiplies a
        packed copy where the memory left allows (``dense.pack``), and log it."""
        ...


def run_once(engine: Engine, prompt: str, params: Mapping[str, ParamValue]) -> float:
    """Generate one short request to the end and drop it (warming a model up: the
    first calls allocate, and pick their kernels); the median of its steps' times
    after the first three (of all, where there are no more), in seconds."""
    request = EngineRequest("warm-up", prompt, resolve_params(engine.info.params, dict(params)))
    job = next(job for job in engine.prepare_steps(request) if isinstance(job, Job))
    steps: list[float] = []
    try:
        while True:
            began = time.perf_counter()
            done = any(output.done for output in engine.step([job]))
            steps.append(time.perf_counter() - began)
            if done:
                break
    finally:
        engine.finish(job)
    return statistics.median(steps[3:] or steps)


class TableSizing:
    """``Engine.size``, ``warm_up`` and ``pack_weights`` for an engine that sizes
    a slot table (``kv.room_for``): a short request (``_warm_up_request``) run
    once, eagerly, then the room checked (``_check_room``, which sets
    ``max_active``); at warm-up, the codec's calls measured, the step's graphs
    recorded (``_prepare_graphs``, where it has them) and the context's cost
    measured over the table's rows (``step_cost``), what a start before
    measured taken where it still holds (``Measures``)."""

    name: str
    max_active: int
    device: torch.device
    pipelined: bool
    codec_batch: int | None
    codec_streams: CodecStreams
    decoder: Any  # (the engine's batched decoder: ``pack_weights``, and ``step_cost``'s)
    frame_rate: float
    context_cost: float
    # Rows of the table a request takes (two for a guidance pair).
    ROWS_PER_STREAM = 1
    _graphs: StepGraphs | None
    _sized: int | None  # (max_active as ``size`` found it; None before)
    _warm: bool

    @property
    def info(self) -> ModelInfo:
        raise NotImplementedError

    def _measured(self) -> list[torch.nn.Module]:
        """The model's parts whose shapes its warm-up's measures depend on."""
        raise NotImplementedError

    def _measures(self) -> Measures:
        """What a start before measured at warm-up for this model, set up as it
        is now (``measures``): its shapes, device and data type, the requests
        its table is readied for, its codec's chunking, its graphs and pipelining."""
        from .measures import Measures, fingerprint

        streams = self.codec_streams
        return Measures.open(
            self.name,
            {
                "model": fingerprint(self._measured()),
                "device": str(self.device),
                "dtype": self.info.dtype,
                "max_active": self.max_active,
                "codec_batch": self.codec_batch,
                "codec": repr(streams.geometry),
                "incremental": streams.incremental is not None,
                "graphs": self._graphs is not None,
                "pipelined": self.pipelined,
            },
            cpu=self.device.type == "cpu",
        )

    def _warm_up_request(self) -> tuple[str, dict[str, ParamValue]]:
        """The short request that ``size`` runs: its prompt and parameters."""
        raise NotImplementedError

    def _check_room(self, step: float) -> None:
        """Set ``max_active``: the requests the memory holds, one stream's step at
        warm-up taking ``step`` seconds; refuse a number it cannot hold."""
        raise NotImplementedError

    def size(self) -> int:
        if self._sized is None:
            # Eagerly (the table grows afterwards: graphs recorded now would be dropped).
            graphs, self._graphs = self._graphs, None
            try:
                step = run_once(cast("Engine", self), *self._warm_up_request())
            finally:
                self._graphs = graphs
            self._check_room(step)
            self._sized = self.max_active
        return self._sized

    def _ready_for(self, max_active: int) -> None:
        """``size``, then ``max_active`` where fewer than it found room for (the
        server's number: its models' least)."""
        self.size()
        if 0 < max_active < self.max_active:
            self.max_active = max_active
            log.info("%s: its table for %d requests (the server's)", self.name, max_active)

    def warm_up(self, max_active: int = 0) -> None:
        if self._warm:
            return
        import torch

        from .kv import reserving

        self._ready_for(max_active)
        measures = self._measures()
        with torch.no_grad(), self._codec_context():
            self.codec_batch = self.codec_streams.warm_up(
                self.codec_batch, self.max_active, measures
            )
        with reserving(self.name, self.max_active):
            if self._graphs is not None:
                self._prepare_graphs()
            self._measure_context_cost(measures)
        measures.log_taken()
        self._warm = True

    def pack_weights(self) -> None:
        self.decoder.pack_weights().log(self.name)

    def _codec_context(self) -> AbstractContextManager[Any]:
        """Where the codec's calls run (its number format, its device stream)."""
        raise NotImplementedError

    def _step_context(self) -> AbstractContextManager[Any]:
        """Where the decode steps run (a model's autocast): none by default."""
        return contextlib.nullcontext()

    def _prepare_graphs(self) -> None:
        """Record the step's graphs for ``max_active`` requests (``_graphs`` set)."""
        raise NotImplementedError

    def _grow(self, slots: int) -> int:
        """Room in the table for ``slots`` requests; how many there is now."""
        raise NotImplementedError

    def _table_length(self) -> int:
        """A row's positions as the table is reserved for."""
        raise NotImplementedError

    def _measure_context_cost(self, measures: Measures) -> None:
        """``context_cost`` (``step_cost``), over ``max_active`` requests' rows
        (or as kept in ``measures``)."""
        from .step_cost import measure_context_cost

        self._grow(self.max_active)
        with self._step_context():
            self.context_cost = measure_context_cost(
                self.decoder,
                name=self.name,
                streams=self.max_active,
                rows_per_stream=self.ROWS_PER_STREAM,
                table_length=self._table_length(),
                frame_rate=self.frame_rate,
                device=self.device,
                measures=measures,
            )


def resume_timesteps(
    data: bytes, codebooks: int, card: int, most: int, most_says: str
) -> npt.NDArray[np.uint16]:
    """``generate.resume_codes`` as ``[n, codebooks]`` codes: whole timesteps of
    ``codebooks`` little-endian uint16 codes, each below ``card``, at most
    ``most`` of them (``most_says`` how many, ``{most}``: "the clip has {most}");
    else ``InvalidField``."""
    if len(data) % (2 * codebooks):
        raise InvalidField(
            f"resume_codes must hold whole timesteps: {codebooks} codes of 2 bytes each",
            field="resume_codes",
        )
    codes = np.frombuffer(data, dtype="<u2").reshape(-1, codebooks)
    if int(codes.max()) >= card:
        raise InvalidField(
            f"resume_codes holds a code of {int(codes.max())}: this model's are below {card}",
            field="resume_codes",
        )
    if codes.shape[0] > most:
        raise InvalidField(
            f"resume_codes holds {codes.shape[0]} timesteps: " + most_says.format(most=most),
            field="resume_codes",
        )
    return codes


def resampled_length(samples: int, old: int, new: int) -> int:
    """The length julius' ``resample_frac`` (audiocraft's and Demucs'
    ``convert_audio``) makes of ``samples`` at rate ``old`` resampled to
    ``new``: the rates over their greatest common divisor, the length rounded
    down after a float32 rounding."""
    if old == new:
        return samples
    common = math.gcd(old, new)
    old, new = old // common, new // common
    return int(np.floor(np.float32(new * samples / old)))


def number(value: ParamValue) -> float:
    """A numeric parameter that ``resolve_params`` has validated."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(f"expected a number, got {value!r}")
    return float(value)


def request_seed(params: Mapping[str, ParamValue]) -> int:
    """``params.seed``, or a fresh one (reported to the client in ``started``)."""
    import secrets

    given = params.get("seed")
    return secrets.randbelow(2**31) if given is None else int(number(given))
