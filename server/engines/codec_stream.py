"""Exact incremental decoding of codec frames into audio.

Neural codec decoders (EnCodec's SEANet, with its non-causal convolutions and
LSTM) keep no streaming state, and the audio of a frame depends on frames on
both sides of it. Decoding a growing prefix therefore changes the prefix's last
few frames. Two ways around it:

* ``IncrementalStream`` (where ``codec_incremental`` can run the decoder's
  layers incrementally: EnCodec, DAC) decodes each frame once, from the
  stream's state, and emits the samples no later code can change;
* ``StreamDecoder`` (any codec; ``--codec-windows``) re-decodes a bounded window:

* it holds back the last ``holdback`` frames, whose audio still depends on codes
  not generated yet, and emits them only once enough frames follow (or at the
  end of the stream);
* each decode starts ``left_context`` frames before the first frame it emits, so
  the emitted samples see (almost) the same left context as a one-shot decode.

The concatenation of every chunk then equals a one-shot decode of all codes to
within float rounding (measured in ``tests/engines/test_musicgen.py``), while
the work per chunk stays bounded whatever the stream's length.

Each decode re-reads its left context and right context, so small chunks cost
more codec work per second of audio (25 + 10 + 4 frames decoded for 10 emitted:
3.9x) than large ones (25 + 50 + 4 for 50: 1.6x). The first chunk is small, so
that the first audio leaves early; later chunks grow up to ``max_chunk_frames``
while the stream is far enough ahead of real time (half of its lead over a
listener who started playing at the first chunk), and stay at ``chunk_frames``
when it is not. The chunking changes when audio leaves, not what it is (beyond
float rounding).

Both share the chunks' schedule. The windows (or new frames) of every stream
with a chunk due in a step are decoded together (``complete_due``): one codec
call per window shape (and decoder state shape), of at most ``rows`` windows,
the batch that ``fastest_rows`` measured to cost least per window on the device;
first chunks due a step before as many other streams' first chunks wait for
them (``wait_for_firsts``), so that a crowd's first chunks make one call.
``CodecStreams`` is what an engine builds: the incremental decoder if its codec
allows one (checked against the one-shot decode at load), windows otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from . import codec_incremental
from .base import FloatAudio, StepOutput, step_error
from .codec_incremental import CodecState, IncrementalCodec, checked, incremental, steady_decode
from .measures import Measures
from .prefill import line_cost, units_for

__all__ = [
    "FIRST_REMADE",
    "REMADE_FRAMES",
    "Cadence",
    "CodecStreams",
    "DecodePlan",
    "Due",
    "IncrementalStream",
    "StreamDecoder",
    "StreamGeometry",
    "complete_due",
    "decode_batched",
    "fastest_rows",
    "frames_to_codes",
    "remake",
    "wait_for_firsts",
]

log = logging.getLogger(__name__)

Codes: TypeAlias = torch.Tensor | npt.NDArray[np.int64]


class StreamDecoder:
    """Turns frames of codes, pushed as they are generated, into audio chunks.

    Args:
        decode: Maps codes ``[B, K, n]`` (int64, on the CPU) to audio ``[B, C, n * hop]``
            (on any device: the decoder moves them).
        hop: Audio samples per frame.
        left_context: Frames decoded before the first frame emitted.
        holdback: Trailing frames kept back until more follow.
        first_frames: Emittable frames needed for the first chunk (small: the
            first audio goes out as early as possible).
        chunk_frames: Emittable frames needed for later chunks.
        max_chunk_frames: Largest chunk, for a stream well ahead of real time
            (default: ``chunk_frames``, a fixed size).
        frame_rate: Frames per second of audio (needed to grow the chunks).
        clock: Seconds, monotonic (``time.perf_counter``; tests pass their own).
    """

    def __init__(
        self,
        decode: Callable[[torch.Tensor], torch.Tensor],
        hop: int,
        *,
        left_context: int = 25,
        holdback: int = 4,
        first_frames: int = 1,
        chunk_frames: int = 10,
        max_chunk_frames: int | None = None,
        frame_rate: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if min(hop, first_frames, chunk_frames) < 1 or min(left_context, holdback) < 0:
            raise ValueError("invalid stream decoder geometry")
        self.max_chunk_frames = max(chunk_frames, max_chunk_frames or chunk_frames)
        if self.max_chunk_frames > chunk_frames and not frame_rate:
            raise ValueError("growing chunks need the frame rate")
        self.frame_rate = frame_rate or 0.0
        self._clock = clock
        self._first_at: float | None = None  # when the first chunk went out
        self._primed = 0  # frames given as context only
        self._decode = decode
        self.hop = hop
        self.left_context = left_context
        self.holdback = holdback
        self.first_frames = first_frames
        self.chunk_frames = chunk_frames
        self._codes: npt.NDArray[np.int64] | None = None  # frames [_base, total), on the host
        # Frames pushed since ``_codes`` was last joined: a step pushes a frame or
        # so, and they are joined only when a window is cut from them (every few
        # steps), not copied into ``_codes`` at every push.
        self._pieces: list[npt.NDArray[np.int64]] = []
        # Frames pushed one at a time as ints (``plan_push_frame``) since the
        # last piece: they become a piece of their own when a window is cut
        # (an array made for each frame would cost a microsecond or two a
        # stream a step).
        self._loose: list[Sequence[int]] = []
        self._base = 0
        self.total = 0  # frames pushed
        self.emitted = 0  # frames whose audio went out
        self._eager = False  # (``push_now``: every frame's audio due)

    def push(self, codes: Codes) -> FloatAudio | None:
        """Add frames ``[1, K, n]``; return new audio ``[frames, C]`` if a chunk is due."""
        plan = self.plan_push(codes)
        return None if plan is None else self.complete_alone(plan)

    def complete_alone(self, plan: DecodePlan) -> FloatAudio:
        """Decode a planned window alone and return its chunk."""
        return self.complete(plan, self._decode(plan.window))

    def push_now(self, codes: Codes) -> FloatAudio | None:
        """``push``, with every frame's audio that can go out now decoded now
        (alone), whatever the chunks' schedule: the audio of codes known before
        the stream steps (a stream picked up from its codes)."""
        self._eager = True
        parts: list[FloatAudio] = []
        try:
            plan = self.plan_push(codes)
            while plan is not None:
                parts.append(self.complete_alone(plan))
                plan = self._plan_due()
        finally:
            self._eager = False
        parts = [part for part in parts if len(part)]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def caught_up(self) -> None:
        """Its audio so far is its listener's already (a stream picked up): the
        chunks after it come as a stream's not ahead of its playback do."""
        if self.frame_rate:
            self._first_at = self._clock() - self._sent_frames() / self.frame_rate

    def _sent_frames(self) -> float:
        return float(self.emitted - self._primed)

    def plan_push(self, codes: Codes) -> DecodePlan | None:
        """Add frames ``[1, K, n]``; if a chunk is due, the window to decode for it.

        The caller decodes ``plan.window`` (alone, or batched with other streams'
        windows of the same shape) and passes the audio to ``complete`` before the
        next push.
        """
        if codes.shape[-1] == 0:
            return None
        self._append(codes)
        return self._plan_due()

    def plan_push_frame(self, frame: Sequence[int]) -> DecodePlan | None:
        """``plan_push`` of one frame, its ``K`` codes as ints (kept as they are
        until a window is cut: the caller leaves them unchanged)."""
        self._loose.append(frame)
        self.total += 1
        return self._plan_due()

    def _plan_due(self) -> DecodePlan | None:
        """The window to decode if a chunk is due, now that frames came."""
        ready = self.total - self.holdback - self.emitted
        if ready >= self._target() or (self._eager and ready > 0):
            return self._plan(self.total - self.holdback)
        return None

    def _target(self) -> int:
        """Emittable frames the next chunk waits for."""
        if self.emitted == self._primed:
            return self.first_frames
        return self._later_target(self.emitted - self._primed)

    def _later_target(self, sent: float) -> int:
        """Frames a chunk after the first waits for, ``sent`` frames' audio out."""
        if self.max_chunk_frames == self.chunk_frames or self._first_at is None:
            return self.chunk_frames
        played = (self._clock() - self._first_at) * self.frame_rate
        lead = sent - played
        return int(min(self.max_chunk_frames, max(self.chunk_frames, lead // 2)))

    def prime(self, codes: Codes) -> None:
        """Add frames ``[1, K, n]`` as context only: their audio is never emitted."""
        if self.total != self.emitted:
            raise RuntimeError("prime() must come before frames that are to be emitted")
        self._append(codes)
        self.emitted = self._primed = self.total

    def _append(self, codes: Codes) -> None:
        # Codes are kept on the host: the windows are assembled there and cross to
        # the codec's device once per batched decode.
        frames = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else codes
        self._settle()
        self._pieces.append(frames.astype(np.int64, copy=False))
        self.total += frames.shape[-1]

    def _settle(self) -> None:
        """The frames pushed as ints, a piece ``[1, K, n]`` of their own."""
        if self._loose:
            self._pieces.append(frames_to_codes(self._loose))
            self._loose = []

    @property
    def held(self) -> int:
        """Frames kept on the host (joined or not): left context, held back, new."""
        return self.total - self._base

    def _joined(self) -> npt.NDArray[np.int64]:
        """Frames ``[_base, total)``, ``[1, K, n]``, the pieces pushed since the
        last call joined to them."""
        self._settle()
        if self._pieces:
            pieces = self._pieces if self._codes is None else [self._codes, *self._pieces]
            self._codes = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, -1)
            self._pieces = []
        assert self._codes is not None
        return self._codes

    def flush(self) -> FloatAudio | None:
        """The end of the stream: return the audio of every frame not yet emitted."""
        plan = self.plan_flush()
        return None if plan is None else self.complete_alone(plan)

    def plan_flush(self) -> DecodePlan | None:
        """The end of the stream: the window that decodes every frame not yet
        emitted (a plan of ``plan_push`` not completed is part of it), or None.
        The caller decodes it (alone, or batched with other streams' windows of
        the same shape and kind) and passes the audio to ``complete``."""
        if self.total == self.emitted:
            return None
        return self._plan(self.total)

    def _plan(self, end: int) -> DecodePlan:
        start = max(self._base, self.emitted - self.left_context)
        # Every known frame goes in: those after `end` are right context.
        window = torch.from_numpy(np.ascontiguousarray(self._joined()[..., start - self._base :]))
        return DecodePlan(window, start, end)

    def complete(self, plan: DecodePlan, wav: torch.Tensor) -> FloatAudio:
        """The chunk of a decoded window ``[1, C, n * hop]``; the stream moves on."""
        first = (self.emitted - plan.start) * self.hop
        last = (plan.end - plan.start) * self.hop
        chunk = wav[0, :, first:last].transpose(0, 1).float().cpu().numpy()
        if self._first_at is None and plan.end > self.emitted:
            self._first_at = self._clock()
        self.emitted = plan.end
        keep_from = max(self._base, self.emitted - self.left_context)
        self._codes = self._joined()[..., keep_from - self._base :]
        self._base = keep_from
        return np.ascontiguousarray(chunk, dtype=np.float32)


def frames_to_codes(frames: Sequence[Sequence[int]]) -> npt.NDArray[np.int64]:
    """Frames, each one's ``K`` codes as ints, as codes ``[1, K, n]``."""
    return np.ascontiguousarray(np.array(frames, dtype=np.int64).T)[None]


class Cadence:
    """The steps on which an engine's incremental streams decode, shared by all
    of them so that their chunks go to the codec together.

    The engine ``tick``s once per step. A stream past its first chunk decodes
    ``size`` frames at a time (``period`` times a power of two, as large as its
    lead over real time allows: the chunk schedule's target), on the steps that
    are multiples of ``size`` (shifted by its group's phase): streams generating
    a frame a step then hold the same number of new frames on the same steps,
    and decode in one call per size, however staggered their starts.

    A call takes ``rows`` chunks at most (``fastest_rows``: on a GPU every
    stream's, on a CPU a few). Streams beyond that would only make more calls on
    the same step, so each ``rows`` streams form a group with a phase of its
    own: a step decodes one group's chunks, not every stream's at once (with
    eight streams of 40-frame chunks on a CPU, a step of 60-90 ms every 40
    steps). The phases lie within ``period`` and differ from one another, so
    groups fall on different steps whatever their chunk sizes; the first
    groups' phases are spread furthest apart (0, a half, a quarter, three
    quarters of the period …).

    ``young`` holds the streams whose first chunk has not gone out
    (``wait_for_firsts``).
    """

    def __init__(self, period: int, rows: int | None = None) -> None:
        self.period = max(1, period)
        self.step = 0
        self.rows = rows
        self.young: weakref.WeakSet[IncrementalStream] = weakref.WeakSet()
        self._members: list[int] = []  # live streams per group
        # (A stream dropped elsewhere than the inference thread leaves from there.)
        self._lock = threading.Lock()
        self._phases = self._spread(self.period)

    def tick(self) -> None:
        self.step += 1

    def size(self, target: int) -> int:
        """The chunk size for a stream whose schedule asks for ``target`` frames."""
        size = self.period
        while size * 2 <= target:
            size *= 2
        return size

    def join(self) -> int:
        """A new stream's group: the first with room for it (all in one while
        ``rows`` is not set); with no room left in any of ``period`` groups, the
        least full. ``leave`` it when the stream ends."""
        with self._lock:
            members = self._members
            rows = self.rows
            group = next(
                (g for g, count in enumerate(members) if rows is None or count < rows),
                len(members),
            )
            if group >= self.period:
                group = min(range(len(members)), key=members.__getitem__)
            if group == len(members):
                members.append(0)
            members[group] += 1
            return group

    def leave(self, group: int) -> None:
        with self._lock:
            self._members[group] -= 1

    def phase(self, group: int) -> int:
        """Steps by which a group's decode steps are shifted."""
        return self._phases[group % self.period]

    @staticmethod
    def _spread(period: int) -> list[int]:
        """Every step of a period, in the order that keeps the first ones
        furthest apart: 0, a half, a quarter, three quarters … of the period
        (the binary fractions in bit-reversed order)."""
        bits = (period - 1).bit_length()
        phases: list[int] = []
        for i in range(1 << bits):
            fraction = int(f"{i:0{bits}b}"[::-1], 2) if bits else 0
            phase = fraction * period >> bits
            if phase not in phases:
                phases.append(phase)
        return phases

    def due(self, size: int, group: int = 0) -> bool:
        return (self.step + self.phase(group)) % size == 0

    def may_be_due(self, group: int) -> bool:
        """Whether a chunk of some size may be due now for ``group`` (``due``
        for the period: every size is a multiple of it). A stream's chunk size
        reads the clock; most steps are ruled out without it."""
        return (self.step + self._phases[group % self.period]) % self.period == 0


class IncrementalStream(StreamDecoder):
    """Turns frames of codes into audio chunks with an incremental codec decoder
    (``codec_incremental``): each frame is decoded once, the decoder's layers
    carrying the stream's state from one chunk to the next, and a chunk's audio
    is every sample that no later code can change.

    The chunks' schedule is ``StreamDecoder``'s (a small first chunk, later ones
    growing while the stream is ahead of real time); ``left_context`` is what a
    prompt primes the decoder with (its last frames), and there is no hold-back:
    the first chunk waits for ``codec.lookahead`` frames more than it emits, and
    decodes just those (every first chunk's call has one shape). A plan that
    ``wait_for_firsts`` holds back is dropped, not completed: the next push
    plans its frames again.

    Args:
        codec: The incremental decoder.
        like: A tensor of the decoder's dtype and device (for its state).
        cadence: The engine's decode steps, shared by its streams (None: this
            stream's own schedule, alone).
    """

    def __init__(
        self,
        codec: IncrementalCodec,
        like: torch.Tensor,
        *,
        left_context: int = 25,
        first_frames: int = 1,
        chunk_frames: int = 10,
        max_chunk_frames: int | None = None,
        frame_rate: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        cadence: Cadence | None = None,
    ) -> None:
        super().__init__(
            _windowless,  # (not a method: nothing of the stream refers back to it)
            codec.hop,
            left_context=left_context,
            holdback=0,
            first_frames=first_frames,
            chunk_frames=chunk_frames,
            max_chunk_frames=max_chunk_frames,
            frame_rate=frame_rate,
            clock=clock,
        )
        self.codec = codec
        self.cadence = cadence
        # Its group in the cadence, left when the stream ends or is dropped.
        self._group = 0
        self._leave: Callable[[], object] | None = None
        if cadence is not None:
            self._group = cadence.join()
            self._leave = weakref.finalize(self, cadence.leave, self._group)
            cadence.young.add(self)
        self._state = codec.start(like)
        self._priming = 0  # pending frames given as context only
        self._discard = 0  # samples of theirs still to drop
        self._sent = 0  # samples emitted
        self._ended = False
        self._waited = False  # its first chunk waited a step for others'

    def _sent_frames(self) -> float:
        return self._sent / self.hop

    def frames_short(self) -> int | None:
        """Frames its first chunk still waits for, where it holds some and no
        audio went out yet (None otherwise: it has not begun, or it is past
        its first chunk)."""
        if self._sent or self._ended:
            return None
        new = self._new_frames()
        return self._first_size() - new if new > 0 else None

    def _new_frames(self) -> int:
        """Frames held that are neither emitted nor given as context only."""
        return self.total - self.emitted - self._priming

    def _first_size(self) -> int:
        """Frames the first chunk decodes: what it emits and the codec's lookahead."""
        return self.first_frames + self.codec.lookahead

    @property
    def before_first(self) -> bool:
        """Whether no audio went out yet (a chunk due is its first)."""
        return not self._sent

    def may_wait(self) -> bool:
        """Whether a first chunk due now may wait a step (``wait_for_firsts``):
        it has a cadence, sent nothing yet, and never waited."""
        return self.cadence is not None and not self._sent and not self._waited

    def wait(self) -> None:
        """Its first chunk due now waits a step (``wait_for_firsts``): once."""
        self._waited = True

    def plan_push(self, codes: Codes) -> DecodePlan | None:
        if codes.shape[-1] == 0:
            return None
        self._append(codes)
        return self._plan_due()

    def _plan_due(self) -> DecodePlan | None:
        new = self._new_frames()
        if self._sent == 0:  # the first audio, as soon as it can go
            # Just the frames it needs (any more go with the next chunk): every
            # first chunk's call has the same shape, so that first chunks due
            # on one step go in one call (``wait_for_firsts``).
            first = self._first_size()
            if new < first:
                return None
            return self._plan(self.emitted + self._priming + first)
        if self._eager:
            due = new > 0
        elif self.cadence is None:
            due = new >= self._later_target(self._sent / self.hop)
        elif not self.cadence.may_be_due(self._group):
            return None
        else:
            size = self.cadence.size(self._later_target(self._sent / self.hop))
            # (Not a sliver either, on the first such step after the first chunk.)
            due = self.cadence.due(size, self._group) and new >= max(1, size // 2)
        return self._plan(self.total) if due else None

    def prime(self, codes: Codes) -> None:
        if self.total != self.emitted or self._sent:
            raise RuntimeError("prime() must come before frames that are to be emitted")
        n = int(codes.shape[-1])
        keep = min(n, self.left_context)
        self.total += n - keep
        self.emitted = self._base = self.total
        if keep:
            self._append(codes[..., n - keep :])
        self._priming += keep
        self._discard += keep * self.hop

    def flush(self) -> FloatAudio | None:
        plan = self.plan_flush()
        if plan is None:
            return None
        chunk = self.complete_alone(plan)
        return chunk if len(chunk) else None

    def plan_flush(self) -> DecodePlan | None:
        if self._ended or (self._codes is None and not self._pieces and not self._loose):
            return None
        return self._plan(self.total, final=True)

    def complete_alone(self, plan: DecodePlan) -> FloatAudio:
        return self.complete(plan, _decode_from_state(plan))

    def _plan(self, end: int, final: bool = False) -> DecodePlan:
        if self._ended:
            raise RuntimeError("the stream has ended")
        start = self.emitted
        window = self._joined()[..., start - self._base : end - self._base]
        return DecodePlan(
            torch.from_numpy(np.ascontiguousarray(window)), start, end, self._state, final
        )

    def complete(self, plan: DecodePlan, wav: torch.Tensor) -> FloatAudio:
        """The chunk of a decoded plan ``[1, C, m]`` (new samples); the stream moves on."""
        drop = min(self._discard, wav.shape[-1])
        self._discard -= drop
        chunk = wav[0, :, drop:].transpose(0, 1).float().cpu().numpy()
        if self._first_at is None and len(chunk):
            self._first_at = self._clock()
        self._sent += len(chunk)
        self._priming = 0
        self.emitted = plan.end
        self._ended = plan.final
        if self.cadence is not None and (self._sent or plan.final):
            self.cadence.young.discard(self)
        if plan.final and self._leave is not None:
            self._leave()
        self._codes = self._joined()[..., plan.end - self._base :]
        self._base = plan.end
        return np.ascontiguousarray(chunk, dtype=np.float32)


def _windowless(window: torch.Tensor) -> torch.Tensor:
    raise AssertionError("an incremental stream decodes from its state, not windows")


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """A codec window to decode: codes ``[1, K, n]`` (on the CPU) from frame ``start``;
    emits up to ``end``. With a ``state`` (an incremental stream), the window is
    the new frames, decoded from that state (and, if ``final``, to the end)."""

    window: torch.Tensor
    start: int
    end: int
    state: CodecState | None = None
    final: bool = False


def decode_batched(
    decode: Callable[[torch.Tensor], torch.Tensor],
    plans: list[DecodePlan],
    rows: int | None = None,
) -> list[torch.Tensor]:
    """Decode every plan's window, one codec call per window shape (of at most
    ``rows`` windows each, if given); audio in plan order."""
    out = _decode_plans(decode, plans, rows, tolerant=False)
    return [wav for wav in out if isinstance(wav, torch.Tensor)]


def _decode_plans(
    decode: Callable[[torch.Tensor], torch.Tensor],
    plans: list[DecodePlan],
    rows: int | None,
    *,
    tolerant: bool,
) -> list[torch.Tensor | BaseException]:
    """``decode_batched``'s audio, or (``tolerant``) where a call fails, each of
    that call's windows decoded alone: the audio, or the exception of the one at
    fault. Only the failed call's: the calls before it moved their streams'
    states on (a call that fails leaves its streams' states as they were)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        key = None if plan.state is None else (plan.state.codec, plan.state.key, plan.final)
        groups.setdefault((tuple(plan.window.shape), key), []).append(i)
    out: list[torch.Tensor | BaseException | None] = [None] * len(plans)
    for group in groups.values():
        step = rows or len(group)
        for at in range(0, len(group), step):
            call = group[at : at + step]
            try:
                wav = _decode_call(decode, [plans[i] for i in call])
            except Exception:
                if not tolerant:
                    raise
                for i in call:
                    out[i] = _decode_alone(decode, plans[i])
                continue
            for row, i in enumerate(call):
                out[i] = wav[row : row + 1]
    return [wav for wav in out if wav is not None]


def _decode_call(
    decode: Callable[[torch.Tensor], torch.Tensor], plans: list[DecodePlan]
) -> torch.Tensor:
    """One codec call for windows of one shape and key: the audio, on the CPU."""
    # One transfer each way per call: the windows in, the audio out.
    codes = torch.cat([plan.window for plan in plans])
    states = [state for plan in plans if (state := plan.state) is not None]
    if not states:
        return decode(codes).float().cpu()
    return states[0].codec.decode(codes, states, final=plans[0].final).float().cpu()


def fastest_rows(
    decode: Callable[[torch.Tensor], torch.Tensor],
    codebooks: int,
    frames: int,
    most: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """How many windows one codec call should decode at most: measured on
    windows of ``codebooks`` x ``frames`` codes, 1, 2, 3, 4, 6, 8 … up to
    ``most`` of them at once, the cap no crowd pays much for. A crowd of ``n``
    streams decodes in ``n // cap`` calls of ``cap`` and one of the rest (as
    ``Cadence`` groups the streams); against the cap best for that ``n``, each
    cap costs some crowd the most: the cap whose worst is least (the smallest
    within 3% of it) is taken.

    On a GPU the cost per window falls as the batch grows: every stream's
    windows in one call. On a CPU it stops falling after a few windows and then
    jumps (by 1.5-3x with this project's codecs on one thread, once a call's
    activations outgrow the caches or the batch crosses a convolution library's
    kernel choice; a sweep stops past a jump of 30% per window). Where it is
    flat, the rest decides: a cap of 6 makes eight streams a call of 6 and one
    of 2, whose windows cost far more each than 8 in one call (tiny-musicgen's
    eight streams made 10% less audio a second with calls of at most 6 than 8).

    A sweep up the sizes finds where to stop (a jump timed twice: one slow
    call, as one start of six met at a server's warm-up, stopped the sweep at
    six windows, and eight streams were decoded in calls of four); then each
    size is timed in turns, three more times, its cost the least of its calls
    (a slow spell of the machine falls on every size, not on one).
    """
    batches: dict[int, torch.Tensor] = {}
    costs: dict[int, float] = {}  # per window, by the call's windows
    cheapest = float("inf")
    for rows in _batch_sizes(max(1, most)):
        batches[rows] = torch.zeros(rows, codebooks, frames, dtype=torch.long)
        decode(batches[rows]).float().cpu()  # (the first call of a shape allocates)
        costs[rows] = _timed(decode, batches[rows], clock)
        if costs[rows] > cheapest * 1.3:
            # A jump, or a slow spell of the machine in that one call (another
            # thread's work, a collection): timed again before the sweep stops.
            costs[rows] = min(costs[rows], _timed(decode, batches[rows], clock))
            if costs[rows] > cheapest * 1.3:
                break
        cheapest = min(cheapest, costs[rows])
    for _ in range(3):  # a busy machine's noise only adds: the least
        for rows, batch in batches.items():
            costs[rows] = min(costs[rows], _timed(decode, batch, clock))
    caps = sorted(costs)
    crowds = range(1, max(1, most) + 1)
    # What a crowd of n streams costs in calls of at most ``cap``: n // cap calls
    # of ``cap`` and one of the rest.
    cost = {
        (cap, n): (n - n % cap) * costs[cap] + n % cap * _per_window(costs, n % cap)
        for cap in caps
        for n in crowds
    }
    least = {n: min(cost[cap, n] for cap in caps) for n in crowds}
    worst = {cap: max(cost[cap, n] / least[n] for n in crowds) for cap in caps}
    return next(cap for cap in caps if worst[cap] <= min(worst.values()) * 1.03)


def _timed(
    decode: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    clock: Callable[[], float],
) -> float:
    """One call's time per window."""
    began = clock()
    decode(batch).float().cpu()
    return (clock() - began) / int(batch.shape[0])


def _per_window(costs: dict[int, float], rows: int) -> float:
    """The cost per window of a call of ``rows`` windows: measured, or on the
    line between the measured sizes around it (0 rows: nothing)."""
    if rows in costs or rows == 0:
        return costs.get(rows, 0.0)
    below = max(size for size in costs if size < rows)
    above = min(size for size in costs if size > rows)
    share = (rows - below) / (above - below)
    return costs[below] + share * (costs[above] - costs[below])


def _batch_sizes(most: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16 … (powers of two and the midpoints), then ``most``."""
    sizes, power = {1, most}, 2
    while power < most:
        sizes.update((power, power + power // 2))
        power *= 2
    return sorted(size for size in sizes if size <= most)


# Frames of a picked-up stream's known codes whose audio is made again at a
# time at most (``remake``), between the running streams' steps; with a time
# budget, the first part's.
REMADE_FRAMES = 250
FIRST_REMADE = 16


def remake(
    decoder: StreamDecoder,
    codes: Codes,
    place: Callable[[], contextlib.AbstractContextManager[object]],
    seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Generator[None, None, list[FloatAudio]]:
    """The audio of a picked-up stream's known frames ``[1, K, n]``, made again
    in parts (within ``place``, a pause after each): all of it that can go out
    before the stream steps. The chunks after it come as a stream's not ahead
    of its listener (who has played what it had, most likely, while it waited).

    A part is ``REMADE_FRAMES`` at most; with a time budget (``seconds``, the
    prefill's per step), from ``FIRST_REMADE`` on (at most twice the last
    part's), the frames the budget decodes at the speed measured on the parts
    so far (a call's fixed cost and a frame's: ``line_cost``, ``units_for``),
    so that a long stream's audio holds the running streams about the budget
    per pause, whatever the codec's speed (where a call's fixed cost alone is
    over half the budget, parts that cost twice it).
    """
    parts: list[FloatAudio] = []
    size = REMADE_FRAMES if seconds is None else FIRST_REMADE
    calls: dict[int, float] = {}  # the last part's seconds of each size (a few sizes)
    start, total = 0, int(codes.shape[-1])
    while start < total:
        part = codes[..., start : start + size]
        began = clock()
        with torch.no_grad(), place():
            audio = decoder.push_now(part)
        took = clock() - began
        start += int(part.shape[-1])
        if audio is not None:
            parts.append(audio)
            if seconds is not None:  # (a part that decoded nothing says nothing)
                calls[int(part.shape[-1])] = took
                bought = units_for(seconds, *line_cost(list(calls.items())))
                size = max(1, min(REMADE_FRAMES, 2 * size, bought))
        yield None
    decoder.caught_up()
    return parts


# A step's due windows: the output each chunk goes to, its stream, its window.
Due: TypeAlias = "list[tuple[StepOutput, StreamDecoder, DecodePlan]]"


def complete_due(
    decode: Callable[[torch.Tensor], torch.Tensor], due: Due, rows: int | None = None
) -> None:
    """Decode the windows due in a step, batched (``decode_batched``, calls of at
    most ``rows`` windows), and append each stream's new chunk to its step
    output's audio. Where a call fails, each of its windows alone, so that only
    the stream at fault fails."""
    wavs = _decode_plans(decode, [plan for _, _, plan in due], rows, tolerant=True)
    for (output, decoder, plan), wav in zip(due, wavs, strict=True):
        try:
            if isinstance(wav, BaseException):
                raise wav
            chunk = decoder.complete(plan, wav)
        except Exception as exc:
            output.error = step_error(exc)
            output.audio, output.done = None, True
            continue
        if len(chunk):  # (a stream's end may hold no samples more)
            output.audio = chunk if output.audio is None else np.concatenate([output.audio, chunk])


def wait_for_firsts(due: Due) -> Due:
    """A step's due chunks, less the first chunks that wait a step.

    Where at least as many other streams of their cadence lack just one frame for
    their own first chunks (they hold frames: they get one a step), each first
    chunk due now waits a step, once, and they all go to the codec in one call
    on the next. A crowd's requests arrive over a few milliseconds and start a
    step or so apart: otherwise the first ones' chunks make a call of their own,
    which the later ones wait through before theirs (a codec call costs mostly
    what a call costs, not what its chunks do, on a CPU). The wait costs each
    waiting stream about a step and spares each later one a call: worth it where
    the later ones are no fewer, and not where first chunks that waited once go
    now (a call is made now anyway: the others join it). A stream's plan that
    waits is dropped: its frames are planned again, with the next one, at its
    next push.
    """
    firsts = [
        stream
        for _, stream, _ in due
        if isinstance(stream, IncrementalStream) and stream.before_first
    ]
    waiting = [stream for stream in firsts if stream.may_wait()]
    cadence = waiting[0].cadence if waiting else None
    if cadence is None or len(waiting) < len(firsts):
        return due  # (first chunks that waited once go now: the others go with them)
    following = sum(1 for stream in list(cadence.young) if stream.frames_short() == 1)
    if following < len(waiting):
        return due
    for stream in waiting:
        stream.wait()
    held = {id(stream) for stream in waiting}
    return [entry for entry in due if id(entry[1]) not in held]


def _decode_alone(
    decode: Callable[[torch.Tensor], torch.Tensor], plan: DecodePlan
) -> torch.Tensor | BaseException:
    try:
        if plan.state is not None:
            return _decode_from_state(plan)
        return decode(plan.window).float().cpu()
    except Exception as exc:
        return exc


def _decode_from_state(plan: DecodePlan) -> torch.Tensor:
    assert plan.state is not None
    wav = plan.state.codec.decode(plan.window, [plan.state], final=plan.final)
    return wav.float().cpu()


# -- what the engines build ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamGeometry:
    """How an engine's streams turn codes into chunks (frames of codes)."""

    left_context: int
    holdback: int
    first_frames: int
    chunk_frames: int
    max_chunk_frames: int
    frame_rate: float


_ROUNDING = 1e-2  # the incremental decoder's largest error against the one-shot decode


class CodecStreams:
    """An engine's codec, for streaming: an incremental decoder where its layers
    allow one (checked at load against the one-shot decode), windows otherwise
    or when asked (``windows``).

    Args:
        codec: The loaded codec model (EnCodec, stereo EnCodec, HiggsAudio's tokenizer).
        decode: Its one-shot decode, codes ``[B, K, n]`` to audio ``[B, C, n * hop]``.
        like: A tensor of the decoder's dtype and device.
        hop: Audio samples per frame.
        codebooks, cardinality: The codes' shape and range.
        name: The model's name, for the log.
        windows: Decode windows even where an incremental decoder would do.
    """

    def __init__(
        self,
        codec: torch.nn.Module,
        decode: Callable[[torch.Tensor], torch.Tensor],
        like: torch.Tensor,
        geometry: StreamGeometry,
        *,
        hop: int,
        codebooks: int,
        cardinality: int,
        name: str,
        windows: bool = False,
    ) -> None:
        self.decode = decode
        self.like = like
        self.geometry = geometry
        self.name = name
        self.hop = hop
        self.codebooks = codebooks
        self.cardinality = cardinality
        self.incremental = None if windows else incremental(codec)
        self.cadence = Cadence(geometry.chunk_frames)
        if self.incremental is not None and self._strays(
            self.incremental, "incremental codec decoder", "windows"
        ):
            self.incremental = None
        mode = "windows" if self.incremental is None else "incremental"
        log.info("%s: codec decoding: %s", name, mode)

    def record_calls(self, record: bool) -> None:
        """The incremental decoder's steady calls as CUDA graphs, one per shape
        (``IncrementalCodec.record_calls``; ``record``: the engine's steps are
        recorded, on CUDA), where ``codec_incremental.RECORD_CALLS`` asks (off
        until measured on a GPU)."""
        if record and codec_incremental.RECORD_CALLS and self.incremental is not None:
            self.incremental.record_calls()
            log.info("%s: the codec's steady calls recorded as CUDA graphs", self.name)

    def _strays(self, inc: IncrementalCodec, what: str, instead: str) -> bool:
        """Whether ``inc`` strays from the one-shot decode by more than float
        rounding, or fails to decode (logged, with what serves ``instead``)."""
        try:
            error = checked(
                inc, self.decode, self.like, codebooks=self.codebooks, cardinality=self.cardinality
            )
        except Exception:  # (a decoder that cannot run is put aside as one that strays)
            log.warning("%s: %s failed its check", self.name, what, exc_info=True)
            return True
        # Float rounding: 1e-6 in float32, 2e-3 under float16 autocast (the
        # tiny EnCodec; 2e-2 under bfloat16, which then streams windows); a
        # layer misread by one sample errs by 5e-2 to 1.
        if error <= _ROUNDING:
            return False
        log.warning("%s: %s off by %.3g: %s", self.name, what, error, instead)
        return True

    def stream(self) -> StreamDecoder:
        """A new stream's decoder."""
        g = self.geometry
        if self.incremental is not None:
            return IncrementalStream(
                self.incremental,
                self.like,
                left_context=g.left_context,
                first_frames=g.first_frames,
                chunk_frames=g.chunk_frames,
                max_chunk_frames=g.max_chunk_frames,
                frame_rate=g.frame_rate,
                cadence=self.cadence,
            )
        return StreamDecoder(
            self.decode,
            self.hop,
            left_context=g.left_context,
            holdback=g.holdback,
            first_frames=g.first_frames,
            chunk_frames=g.chunk_frames,
            max_chunk_frames=g.max_chunk_frames,
            frame_rate=g.frame_rate,
        )

    def tick(self) -> None:
        """A step of the engine (the streams' ``Cadence``)."""
        self.cadence.tick()

    def due_now(self, due: Due) -> Due:
        """Of a step's due chunks, those that go to the codec now: all but the
        first chunks that wait for others' (``wait_for_firsts``)."""
        return wait_for_firsts(due)

    def warm_up(self, asked: int | None, most: int, measures: Measures) -> int:
        """The codec readied for calls of up to ``most`` streams: its layers'
        forms chosen (``choose_forms``), its chunks per call measured where not
        ``asked`` (``fastest_rows``), each call shape made once
        (``prepare_calls``); those measured by a start before taken from
        ``measures`` (and what is measured kept there). The chunks per call."""
        self.choose_forms(asked or most, measures)
        if asked is not None:
            rows = asked
        else:

            def usable(kept: object) -> int | None:
                if isinstance(kept, bool) or not isinstance(kept, int):
                    return None
                return kept if 1 <= kept <= most else None

            rows, _ = measures.recall("codec_batch", usable, lambda: self.fastest_rows(most))
            log.info("%s: codec chunks per call: %d", self.name, rows)
        # Streams beyond a call's chunks decode on steps of their own.
        self.cadence.rows = rows
        self.prepare_calls(rows)
        return rows

    def choose_forms(self, most: int, measures: Measures | None = None) -> None:
        """Each of the incremental decoder's convolutions as the library's, as a
        matrix product or by the row kernel's library, and each residual unit
        fused or not, whichever is fastest on this CPU for one stream's calls
        and for calls of ``most`` streams, on the largest chunk
        (``IncrementalCodec.choose_forms``), or as a start before chose them
        (kept in ``measures``); checked against the one-shot decode again, and
        the library's everywhere if it strays."""
        inc = self.incremental
        if inc is None or self.like.device.type != "cpu":
            return
        frames = self.cadence.size(self.geometry.max_chunk_frames)

        def choose() -> codec_incremental.Forms:
            return inc.choose_forms(self.like, most, self.codebooks, frames)

        if measures is None:
            forms, measured = choose(), True
        else:
            forms, measured = measures.recall(
                "codec_forms",
                lambda kept: inc.use_forms(kept, self.like),
                choose,
                lambda _: inc.kept_forms(),
            )
        said = f"chosen in {forms.seconds:.2f} s" if measured else "as kept"
        if self._strays(inc, "codec layers as products", "as written"):
            inc.direct_forms()
            return
        log.info(
            "%s: codec layers as matrix products: %d of %d for one stream's calls, "
            "%d for more; by the row kernel: %d and %d; residual units fused: %d and %d "
            "of %d (%s)",
            self.name,
            forms.product_one,
            forms.layers,
            forms.product_many,
            forms.kernel_one,
            forms.kernel_many,
            forms.fused_one,
            forms.fused_many,
            forms.units,
            said,
        )

    def fastest_rows(self, most: int) -> int:
        """The codec batch that costs least per chunk (``fastest_rows``), measured
        on the largest chunk: its window, or its new frames (the cadence's largest
        size) from a stream's state."""
        g = self.geometry
        if self.incremental is None:
            frames = g.left_context + g.max_chunk_frames + g.holdback
            return fastest_rows(self.decode, self.codebooks, frames, most)
        decode = steady_decode(self.incremental, self.like, most, self.codebooks)
        return fastest_rows(decode, self.codebooks, self.cadence.size(g.max_chunk_frames), most)

    def prepare_calls(self, rows: int) -> int:
        """Make each call shape the streams will take once, for calls of 1 to
        ``rows`` chunks: a stream's first chunk (from a new state), then every
        chunk size of the cadence (from a state under way). A convolution
        library prepares each new input shape on its first call (on a CPU,
        1.3-3x that call's time), which would otherwise fall on the first
        streams to take it: the first crowd's first audio. How many calls were
        made (none for windows, whose sizes follow each stream's lead, nor off
        the CPU, where a GPU's batch of every due stream would make the calls
        many and large, for a cost not measured there)."""
        inc = self.incremental
        if inc is None or self.like.device.type != "cpu":
            return 0
        began = time.perf_counter()
        g = self.geometry
        targets = range(g.chunk_frames, g.max_chunk_frames + 1)
        sizes = sorted({self.cadence.size(target) for target in targets})
        first = g.first_frames + inc.lookahead
        calls = 0
        for n in range(1, rows + 1):
            states = [inc.start(self.like) for _ in range(n)]
            for frames in (first, *sizes):
                codes = torch.zeros(n, self.codebooks, frames, dtype=torch.long)
                inc.decode(codes.to(self.like.device), states)
                calls += 1
        took = time.perf_counter() - began
        log.info("%s: codec call shapes prepared: %d in %.2f s", self.name, calls, took)
        return calls
