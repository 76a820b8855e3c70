"""A melody's chroma in pieces: Demucs one segment at a time, between decode steps.

A melody model conditions on the chroma of the melodic stems of its reference,
which audiocraft's ``ChromaStemConditioner`` separates with Demucs
(``demucs.apply.apply_model``) inside the condition provider. On a long reference
that separation costs seconds on a CPU and a good fraction of a second on a GPU:
run in one go on the inference thread, it would hold every other stream.

``apply_model`` cuts its input into overlapping segments and asks a ``pool`` for
each one's separation. :class:`Pieces` is such a pool that separates at most one
new segment per attempt and keeps what it separated: ``in_pieces`` runs the whole
conditioning again after each pause, each segment already separated comes back
from the pool, until the last one is done and the conditioning returns. Demucs'
random shift comes from Python's ``random``, whose state the conditioning sets at
its start (the request's own), so every attempt asks for the same segments in the
same order; a segment that comes back from the pool leaves ``random`` as its
separation did (HTDemucs draws from it too), so the result, and the state of
``random`` after it, are the one-go ones exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch

__all__ = ["Pieces", "StemsInPieces", "in_pieces"]

T = TypeVar("T")


class _Pause(Exception):
    """A segment not separated yet, after this attempt's one: pause here."""


class _Segment:
    def __init__(self, pool: Pieces, index: int, work: Callable[[], torch.Tensor]) -> None:
        self.pool = pool
        self.index = index
        self.work = work

    def result(self) -> torch.Tensor:
        return self.pool.result(self)


class Pieces:
    """The pool ``apply_model`` submits each segment's separation to (see above)."""

    def __init__(self) -> None:
        self.done: list[torch.Tensor] = []  # separated segments, in the order asked
        # Python's random state after each (HTDemucs draws from it in its forward).
        self.states_after: list[Any] = []
        self._submitted = 0
        self._fresh = 1  # segments this attempt may still separate

    def attempt(self) -> None:
        """A new attempt: the segments are asked for again from the first."""
        self._submitted = 0
        self._fresh = 1

    def submit(self, func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> _Segment:
        self._submitted += 1
        return _Segment(self, self._submitted - 1, lambda: func(*args, **kwargs))

    def result(self, segment: _Segment) -> torch.Tensor:
        if segment.index < len(self.done):
            # As if separated now: the same state of `random` follows.
            random.setstate(self.states_after[segment.index])
            return self.done[segment.index]
        if self._fresh == 0:
            raise _Pause
        assert segment.index == len(self.done), "segments are collected in order"
        self._fresh -= 1
        out = segment.work()
        self.done.append(out)
        self.states_after.append(random.getstate())
        return out

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """(``apply_model`` shuts its pool down when a segment raises.)"""


class StemsInPieces:
    """Takes over a ``ChromaStemConditioner``'s ``_get_stemmed_wav`` so that its
    Demucs runs in the current :class:`Pieces` pool (when one is set: the same
    separation, in one go, otherwise). The body is audiocraft's, plus the pool.
    One per conditioner (``of``), whatever the engines over the same model."""

    def __init__(self, conditioner: Any) -> None:
        self.conditioner = conditioner
        self.pool: Pieces | None = None
        conditioner._get_stemmed_wav = self.stemmed_wav

    @classmethod
    def of(cls, conditioner: Any) -> StemsInPieces:
        taken = getattr(conditioner._get_stemmed_wav, "__self__", None)
        return taken if isinstance(taken, cls) else cls(conditioner)

    def stemmed_wav(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        from demucs.apply import apply_model
        from demucs.audio import convert_audio

        conditioner = self.conditioner
        demucs = conditioner.demucs
        with torch.no_grad(), conditioner.autocast:
            wav = convert_audio(wav, sample_rate, demucs.samplerate, demucs.audio_channels)
            stems = apply_model(demucs, wav, device=conditioner.device, pool=self.pool)
            stems = stems[:, conditioner.stem_indices]  # the melodic stems
            mix: torch.Tensor = convert_audio(
                stems.sum(1), demucs.samplerate, conditioner.sample_rate, 1
            )
            return mix


def in_pieces(compute: Callable[[], T], stems: StemsInPieces | None) -> Generator[None, None, T]:
    """Run ``compute`` (a conditioning) with Demucs in pieces: a pause (``yield``)
    after each segment separated but the last; returns what ``compute`` returns.

    ``compute`` must start from the same state at each attempt (it sets Python's
    ``random`` state itself) and have no other lasting effect.
    """
    if stems is None:
        return compute()
    pool = Pieces()
    while True:
        pool.attempt()
        stems.pool = pool
        try:
            return compute()
        except _Pause:
            pass
        finally:
            stems.pool = None
        yield
