"""Exact incremental decoding of codec frames into audio.

Neural codec decoders (EnCodec's SEANet, with its non-causal convolutions and
LSTM) keep no streaming state, and the audio of a frame depends on frames on
both sides of it. Decoding a growing prefix therefore changes the prefix's last
few frames. ``StreamDecoder`` re-decodes a bounded window instead:

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

The windows of every stream with a chunk due in a step are decoded together
(``complete_due``): one codec call per window shape, of at most ``rows`` windows,
the batch that ``fastest_rows`` measured to cost least per window on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from .base import FloatAudio, StepOutput, step_error

__all__ = [
    "DecodePlan",
    "Due",
    "StreamDecoder",
    "complete_due",
    "decode_batched",
    "fastest_rows",
]

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
        self._base = 0
        self.total = 0  # frames pushed
        self.emitted = 0  # frames whose audio went out

    def push(self, codes: Codes) -> FloatAudio | None:
        """Add frames ``[1, K, n]``; return new audio ``[frames, C]`` if a chunk is due."""
        plan = self.plan_push(codes)
        return None if plan is None else self.complete(plan, self._decode(plan.window))

    def plan_push(self, codes: Codes) -> DecodePlan | None:
        """Add frames ``[1, K, n]``; if a chunk is due, the window to decode for it.

        The caller decodes ``plan.window`` (alone, or batched with other streams'
        windows of the same shape) and passes the audio to ``complete`` before the
        next push.
        """
        if codes.shape[-1] == 0:
            return None
        self._append(codes)
        ready = self.total - self.holdback - self.emitted
        if ready >= self._target():
            return self._plan(self.total - self.holdback)
        return None

    def _target(self) -> int:
        """Emittable frames the next chunk waits for."""
        if self.emitted == self._primed:
            return self.first_frames
        if self.max_chunk_frames == self.chunk_frames or self._first_at is None:
            return self.chunk_frames
        played = (self._clock() - self._first_at) * self.frame_rate
        lead = self.emitted - self._primed - played
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
        frames = frames.astype(np.int64, copy=False)
        self._codes = frames if self._codes is None else np.concatenate([self._codes, frames], -1)
        self.total += frames.shape[-1]

    def flush(self) -> FloatAudio | None:
        """The end of the stream: return the audio of every frame not yet emitted."""
        if self.total == self.emitted:
            return None
        plan = self._plan(self.total)
        return self.complete(plan, self._decode(plan.window))

    def _plan(self, end: int) -> DecodePlan:
        assert self._codes is not None
        start = max(self._base, self.emitted - self.left_context)
        # Every known frame goes in: those after `end` are right context.
        window = torch.from_numpy(np.ascontiguousarray(self._codes[..., start - self._base :]))
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
        assert self._codes is not None
        self._codes = self._codes[..., keep_from - self._base :]
        self._base = keep_from
        return np.ascontiguousarray(chunk, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """A codec window to decode: codes ``[1, K, n]`` (on the CPU) from frame ``start``;
    emits up to ``end``."""

    window: torch.Tensor
    start: int
    end: int


def decode_batched(
    decode: Callable[[torch.Tensor], torch.Tensor],
    plans: list[DecodePlan],
    rows: int | None = None,
) -> list[torch.Tensor]:
    """Decode every plan's window, one codec call per window shape (of at most
    ``rows`` windows each, if given); audio in plan order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(tuple(plan.window.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(plans)
    for group in groups.values():
        step = rows or len(group)
        for at in range(0, len(group), step):
            indices = group[at : at + step]
            # One transfer each way per call: the windows in, the audio out.
            wav = decode(torch.cat([plans[i].window for i in indices])).float().cpu()
            for row, i in enumerate(indices):
                out[i] = wav[row : row + 1]
    return [wav for wav in out if wav is not None]


def fastest_rows(
    decode: Callable[[torch.Tensor], torch.Tensor],
    codebooks: int,
    frames: int,
    most: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """How many windows one codec call should decode: the batch that costs the
    least per window, measured on windows of ``codebooks`` x ``frames`` codes,
    1, 2, 3, 4, 6, 8 … up to ``most`` of them at once.

    On a GPU the cost per window falls as the batch grows. On a CPU it stops
    falling after a few windows and then jumps (by 1.5-3x with this project's
    codecs on one thread, once a call's activations outgrow the caches or the
    batch crosses a convolution library's kernel choice), so many streams due
    in one step are decoded in calls of this size. A larger batch is taken only
    if it saves at least 3% per window; the search stops past a jump of 30%.
    """
    best, best_cost = 1, float("inf")
    for rows in _batch_sizes(max(1, most)):
        batch = torch.zeros(rows, codebooks, frames, dtype=torch.long)
        decode(batch).float().cpu()  # (the first call of a shape allocates)
        cost = float("inf")
        for _ in range(3):  # the least of three: a busy machine's noise only adds
            began = clock()
            decode(batch).float().cpu()
            cost = min(cost, (clock() - began) / rows)
        if cost < best_cost * 0.97:
            best, best_cost = rows, cost
        elif cost > best_cost * 1.3:
            break
    return best


def _batch_sizes(most: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16 … (powers of two and the midpoints), then ``most``."""
    sizes, power = {1, most}, 2
    while power < most:
        sizes.update((power, power + power // 2))
        power *= 2
    return sorted(size for size in sizes if size <= most)


# A step's due windows: the output each chunk goes to, its stream, its window.
Due: TypeAlias = "list[tuple[StepOutput, StreamDecoder, DecodePlan]]"


def complete_due(
    decode: Callable[[torch.Tensor], torch.Tensor], due: Due, rows: int | None = None
) -> None:
    """Decode the windows due in a step, batched (``decode_batched``, calls of at
    most ``rows`` windows), and append each stream's new chunk to its step
    output's audio."""
    wavs: list[torch.Tensor | BaseException]
    try:
        wavs = list(decode_batched(decode, [plan for _, _, plan in due], rows))
    except Exception:
        # One window may be at fault: each alone, so that only its stream fails.
        wavs = [_decode_alone(decode, plan) for _, _, plan in due]
    for (output, decoder, plan), wav in zip(due, wavs, strict=True):
        try:
            if isinstance(wav, BaseException):
                raise wav
            chunk = decoder.complete(plan, wav)
        except Exception as exc:
            output.error = step_error(exc)
            output.audio, output.done = None, True
            continue
        output.audio = chunk if output.audio is None else np.concatenate([output.audio, chunk])


def _decode_alone(
    decode: Callable[[torch.Tensor], torch.Tensor], plan: DecodePlan
) -> torch.Tensor | BaseException:
    try:
        return decode(plan.window).float().cpu()
    except Exception as exc:
        return exc
