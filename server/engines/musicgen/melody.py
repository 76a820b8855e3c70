"""A melody's chroma in pieces: Demucs a layer at a time, between decode steps.

A melody model conditions on the chroma of the melodic stems of its reference,
which audiocraft's ``ChromaStemConditioner`` separates with Demucs
(``demucs.apply.apply_model``) inside the condition provider. On a long reference
that separation costs seconds on a CPU and a good fraction of a second on a GPU:
run in one go on the inference thread, it would hold every other stream.

``in_pieces`` runs a conditioning in three steps:

1. the conditioning, up to the separation: :class:`StemsInPieces` (which takes
   over the conditioner's ``_get_stemmed_wav``) records what it is asked to
   separate, and the state of the request's draws then (``random``'s, from a
   generator of its own: ``separation.drawing``), and stops it there;
2. the separation, a part at a time (``separation.apply_in_parts``: a layer of
   a segment's Demucs per part), a pause (``yield``) after each, from that state
   (Demucs draws from it: a random shift, each segment's positional
   embedding);
3. the conditioning again, whole: the separation asked for is the one made,
   which comes back as it is, and leaves the draws as the separation did.

A silent row (the null half of a request's guidance pair, which the
conditioning separates beside its reference) is not separated: Demucs makes
silence of silence (its input is normalised by its own spread, zero, and its
output scaled back by it), and the other rows' stems are audiocraft's within
float rounding (a batch of one is split over the threads otherwise than one of
two: 1e-8 of the stems here; the chroma, and the codes, the same, tested):
half the work of every melody request.

Each part runs without gradients and in the conditioner's autocast, drawing
from the request's own generator (other requests' parts may run in the pauses,
and other threads draw from Python's ``random`` at any time); the stems, so the
conditioning, and the state of the request's draws after it are those of the
separation in one go from the same state exactly (tested). The
conditioning's other work (the text, the reference's resampling, the chroma)
runs twice, not once per part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch

from ..base import resampled_length
from ..pieces import measured
from .separation import apply_in_parts, drawing, draws, draws_known, parts_of, skip_draws

__all__ = ["StemsInPieces", "in_pieces"]

T = TypeVar("T")


class _Wanted(Exception):
    """The separation the conditioning asks for (its first run stops here)."""

    def __init__(self, wav: torch.Tensor, sample_rate: int, state: Any) -> None:
        super().__init__("a separation to make in parts")
        self.wav = wav
        self.sample_rate = sample_rate
        self.state = state  # the request's draws, as the separation begins


class _Made:
    """A separation made in parts, for the conditioning's second run."""

    def __init__(self, wanted: _Wanted, stems: torch.Tensor, state: Any) -> None:
        self.wanted = wanted
        self.stems = stems
        self.state = state  # the request's draws, as the separation left it


class StemsInPieces:
    """Takes over a ``ChromaStemConditioner``'s ``_get_stemmed_wav``: while a
    conditioning is run by ``in_pieces``, it stops it at the separation, or gives
    back the separation made in parts; otherwise the separation is audiocraft's,
    in one go. One per conditioner (``of``), whatever the engines over the same
    model."""

    def __init__(self, conditioner: Any) -> None:
        self.conditioner = conditioner
        self._stop = False  # the first run: stop at the separation
        self._made: _Made | None = None  # the second run: this one
        conditioner._get_stemmed_wav = self.stemmed_wav

    @classmethod
    def of(cls, conditioner: Any) -> StemsInPieces:
        taken = getattr(conditioner._get_stemmed_wav, "__self__", None)
        return taken if isinstance(taken, cls) else cls(conditioner)

    def stemmed_wav(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """The melodic stems of ``wav``, mixed down at the conditioner's rate."""
        made = self._made
        if made is not None and _same(made.wanted, wav, sample_rate):
            self._made = None  # (once)
            draws.setstate(made.state)
            return made.stems
        if self._stop:
            raise _Wanted(wav, sample_rate, draws.getstate())
        from demucs.apply import apply_model
        from demucs.audio import convert_audio

        conditioner = self.conditioner
        demucs = conditioner.demucs
        # audiocraft's ``_get_stemmed_wav``, for the rows that sound.
        with torch.no_grad(), conditioner.autocast:
            rows = _sounding(wav)
            sounding = wav if rows is None else wav[rows]
            sounding = convert_audio(
                sounding, sample_rate, demucs.samplerate, demucs.audio_channels
            )
            stems = apply_model(demucs, sounding, device=conditioner.device)
            return _placed(self._mixed(stems), rows, wav.shape[0])

    def separate(self, wanted: _Wanted) -> Generator[float, None, _Made]:
        """``stemmed_wav`` of what ``wanted`` asks, a part at a time (each in the
        conditioner's contexts, drawing from the request's generator); each
        pause says how much of it is done (0 to 1, 1 not included: the parts
        are counted beforehand, at most as many as it takes)."""
        conditioner = self.conditioner
        demucs = conditioner.demucs
        rows = _sounding(wanted.wav)
        length = math.ceil(wanted.wav.shape[-1] * demucs.samplerate / wanted.sample_rate)
        # (The pauses before the separation and after it, and its own.)
        total = 3 + parts_of(demucs, length)

        def separation() -> Generator[None, None, torch.Tensor]:
            from demucs.audio import convert_audio

            yield  # (after the conditioning's first run, in the same unit)
            sounding = wanted.wav if rows is None else wanted.wav[rows]
            sounding = convert_audio(
                sounding, wanted.sample_rate, demucs.samplerate, demucs.audio_channels
            )
            yield
            stems = yield from apply_in_parts(demucs, sounding, device=conditioner.device)
            yield
            return _placed(self._mixed(stems), rows, wanted.wav.shape[0])

        def in_contexts() -> Generator[None, None, _Made]:
            state = wanted.state
            parts = separation()
            while True:
                with torch.no_grad(), conditioner.autocast, drawing(state) as generator:
                    try:
                        next(parts)
                    except StopIteration as made:
                        return _Made(wanted, made.value, generator.getstate())
                    state = generator.getstate()
                yield

        return (yield from measured(in_contexts(), total))

    def draws_after(self, compute: Callable[[], tuple[Any, Any]]) -> Any | None:
        """The state of the request's draws after ``in_pieces(compute, self)``
        (``compute`` returns its result and that state), drawn as its separation
        draws them, not made (``separation.skip_draws``: none of Demucs'
        layers run); None where its model's draws are not known
        (``draws_known``)."""
        demucs = self.conditioner.demucs
        if not draws_known(demucs):
            return None
        wanted = self.until_separation(compute)
        if not isinstance(wanted, _Wanted):
            return wanted[1]  # (nothing to separate)
        # The mix's length at Demucs' rate, as ``separate`` resamples it.
        length = resampled_length(
            int(wanted.wav.shape[-1]), int(wanted.sample_rate), int(demucs.samplerate)
        )
        with drawing(wanted.state) as generator:
            skip_draws(demucs, length)
            return generator.getstate()

    def _mixed(self, stems: torch.Tensor) -> torch.Tensor:
        from demucs.audio import convert_audio

        conditioner = self.conditioner
        stems = stems[:, conditioner.stem_indices]  # the melodic stems
        mix: torch.Tensor = convert_audio(
            stems.sum(1), conditioner.demucs.samplerate, conditioner.sample_rate, 1
        )
        return mix

    def until_separation(self, compute: Callable[[], T]) -> T | _Wanted:
        """``compute()``, or the separation it asks for (stopped there)."""
        self._stop = True
        try:
            return compute()
        except _Wanted as wanted:
            return wanted
        finally:
            self._stop = False

    def with_separation(self, made: _Made, compute: Callable[[], T]) -> T:
        """``compute()``, given the separation ``made``."""
        self._made = made
        try:
            return compute()
        finally:
            self._made = None


def _sounding(wav: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``wav`` ``[B, C, T]`` with a sample other than zero, where
    some rows have none (a melody's null half: silence); None where every row
    sounds, or none does (then all of them are separated, as the library does:
    the same draws from ``random``)."""
    loud = wav.flatten(1).ne(0).any(1)
    count = int(loud.sum())
    if count in (0, wav.shape[0]):
        return None
    return loud.nonzero()[:, 0]


def _placed(mix: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The stems' mix of the sounding ``rows`` (``_sounding``) in a batch of
    ``batch`` rows, the silent ones silent."""
    if rows is None:
        return mix
    whole = mix.new_zeros(batch, *mix.shape[1:])
    whole[rows] = mix
    return whole


def _same(wanted: _Wanted, wav: torch.Tensor, sample_rate: int) -> bool:
    """Whether ``wav`` at ``sample_rate`` is the separation ``wanted``."""
    return wanted.sample_rate == sample_rate and torch.equal(wanted.wav, wav)


def in_pieces(
    compute: Callable[[], T], stems: StemsInPieces | None
) -> Generator[float | None, None, T]:
    """Run ``compute`` (a conditioning) with Demucs in pieces: a pause (``yield``)
    after each part of the separation, with the part of it done (see
    ``StemsInPieces.separate``), then one more; returns what ``compute`` returns.

    ``compute`` must start from the same state at each run (it sets the state
    of its draws itself: ``separation.drawing``) and have no other lasting
    effect.
    """
    if stems is None:
        return compute()
    first = stems.until_separation(compute)
    if not isinstance(first, _Wanted):
        return first  # (nothing to separate)
    made = yield from stems.separate(first)
    yield None
    return stems.with_separation(made, compute)
