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
within float rounding (measured in ``tests/engines/test_codec_stream.py``), while
the work per chunk stays bounded whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .base import FloatAudio

__all__ = ["DecodePlan", "StreamDecoder", "decode_batched"]


class StreamDecoder:
    """Turns frames of codes, pushed as they are generated, into audio chunks.

    Args:
        decode: Maps codes ``[1, K, n]`` to audio ``[1, C, n * hop]``.
        hop: Audio samples per frame.
        left_context: Frames decoded before the first frame emitted.
        holdback: Trailing frames kept back until more follow.
        first_frames: Emittable frames needed for the first chunk (small: the
            first audio goes out as early as possible).
        chunk_frames: Emittable frames needed for later chunks.
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
    ) -> None:
        if min(hop, first_frames, chunk_frames) < 1 or min(left_context, holdback) < 0:
            raise ValueError("invalid stream decoder geometry")
        self._decode = decode
        self.hop = hop
        self.left_context = left_context
        self.holdback = holdback
        self.first_frames = first_frames
        self.chunk_frames = chunk_frames
        self._codes: torch.Tensor | None = None  # frames [_base, total)
        self._base = 0
        self.total = 0  # frames pushed
        self.emitted = 0  # frames whose audio went out

    def push(self, codes: torch.Tensor) -> FloatAudio | None:
        """Add frames ``[1, K, n]``; return new audio ``[frames, C]`` if a chunk is due."""
        plan = self.plan_push(codes)
        return None if plan is None else self.complete(plan, self._decode(plan.window))

    def plan_push(self, codes: torch.Tensor) -> DecodePlan | None:
        """Add frames ``[1, K, n]``; if a chunk is due, the window to decode for it.

        The caller decodes ``plan.window`` (alone, or batched with other streams'
        windows of the same shape) and passes the audio to ``complete`` before the
        next push.
        """
        if codes.shape[-1] == 0:
            return None
        self._codes = codes if self._codes is None else torch.cat([self._codes, codes], dim=-1)
        self.total += codes.shape[-1]
        ready = self.total - self.holdback - self.emitted
        if ready >= (self.first_frames if self.emitted == 0 else self.chunk_frames):
            return self._plan(self.total - self.holdback)
        return None

    def prime(self, codes: torch.Tensor) -> None:
        """Add frames ``[1, K, n]`` as context only: their audio is never emitted."""
        if self.total != self.emitted:
            raise RuntimeError("prime() must come before frames that are to be emitted")
        self._codes = codes if self._codes is None else torch.cat([self._codes, codes], dim=-1)
        self.total += codes.shape[-1]
        self.emitted = self.total

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
        return DecodePlan(self._codes[..., start - self._base :], start, end)

    def complete(self, plan: DecodePlan, wav: torch.Tensor) -> FloatAudio:
        """The chunk of a decoded window ``[1, C, n * hop]``; the stream moves on."""
        first = (self.emitted - plan.start) * self.hop
        last = (plan.end - plan.start) * self.hop
        chunk = wav[0, :, first:last].transpose(0, 1).float().cpu().numpy()
        self.emitted = plan.end
        keep_from = max(self._base, self.emitted - self.left_context)
        assert self._codes is not None
        self._codes = self._codes[..., keep_from - self._base :]
        self._base = keep_from
        return np.ascontiguousarray(chunk, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """A codec window to decode: codes ``[1, K, n]`` from frame ``start``; emits up to ``end``."""

    window: torch.Tensor
    start: int
    end: int


def decode_batched(
    decode: Callable[[torch.Tensor], torch.Tensor], plans: list[DecodePlan]
) -> list[torch.Tensor]:
    """Decode every plan's window, one codec call per window shape; audio in plan order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(tuple(plan.window.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(plans)
    for indices in groups.values():
        wav = decode(torch.cat([plans[i].window for i in indices]))
        for row, i in enumerate(indices):
            out[i] = wav[row : row + 1]
    return [wav for wav in out if wav is not None]
