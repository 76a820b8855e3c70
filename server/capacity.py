"""What a tick costs with more streams: the measure behind real-time admission.

A tick steps every running stream once, in one batched forward per model, so its
cost is mostly a fixed part (kernel launches, the host's work of a step) and a
part each stream adds (its rows of the forward, its attention over its own
cache, its sampling and codec). Taken as proportional to the streams (the mean
tick over the mean streams), one more stream seemed to add what one stream
alone costs, fixed part included: with the tiny model on the CPU, after single
requests had run, 32 requests arriving together were started a few at a time
over 5 s (the median one after 0.9 s), though all 32 then ran faster than real
time together (started within 0.2 s with ``--admission slots``).

``TickCosts`` keeps the recent ticks and fits ``fixed + per_stream * n`` to them
by least squares. The line is trusted up to twice the most streams measured
lately; beyond that the cost is taken to grow in proportion to the streams
(from the line's value there), which overestimates a batched step. So admission
can double the crowd it has measured at once, and goes further as larger crowds
are measured: a burst reaches the machine's real-time capacity in a few ticks,
and a slope that steepens with the crowd (a step leaving launch overhead for
arithmetic) is seen before it is relied on.

Two parts of a tick are counted apart, because a few ticks of a new crowd say
little of them:

* Its streams' contexts. A stream's step costs more as its context grows
  (attention reads every position of its window): 64 tiny-model streams' decode
  step took 2.7 ms at the start of their 10 s clips and 6.9 ms at the end, on
  the CPU. Measured while young, a crowd would be admitted whole and fall
  behind real time as it aged; the ticks are too noisy to learn the growth
  from, so each engine measures it once at warm-up (``Engine.context_cost``,
  ``engines/step_cost.py``: 0.008 ms a stream-second here). Each tick comes with
  what its streams' contexts cost (each model's streams at the longest context
  among them: what its batched step's attention spans), and admission adds each
  stream's back at the context it will reach (``TickFit.most``'s
  ``context_each``).
* Its codec calls. The engines decode every stream's due chunks in the same
  steps (one call for many), so one tick in ten or forty carries a crowd's
  codec work (100 ms for 79 tiny-model streams, where the others took 10 ms):
  the codec is counted as seconds per stream over the last thousand ticks
  (``Engine.codec_seconds``), whatever ticks the line's window holds.

The line is fitted to the ticks less both parts. With them, 96 tiny-model
requests at once (more than the 2-core CPU keeps in real time) start about 50,
each faster than real time, and the rest wait; measured as whole ticks, all 96
started and ran at 0.6x real time.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = ["TickCosts", "TickFit"]

SURE = 3  # ticks of a crowd that make it measured (``TickFit.measured``)


@dataclass(frozen=True, slots=True)
class TickFit:
    """The cost of a tick as a function of the streams in it, fitted to recent ticks."""

    fixed: float  # seconds a tick costs whatever its streams
    per_stream: float  # seconds each stream adds
    measured: int  # the most streams that SURE of the fitted ticks ran (at least)
    mean_tick: float  # the mean of the fitted ticks, seconds
    mean_streams: float  # the mean streams of the fitted ticks
    codec_per_stream: float = 0.0  # seconds of codec calls a stream costs a tick, on average

    @classmethod
    def of(cls, ticks: Iterable[tuple[float, int]]) -> TickFit | None:
        """The least-squares line through ``(seconds, streams)`` ticks (None without any).

        Where the crowds measured hardly differ (their spread under a tenth of
        their mean: one crowd, or 31 and 32 streams as a burst ends), the fixed
        part cannot be told apart from the noise: the cost is taken as
        proportional to the streams (through the origin), as it is where the
        line's slope comes out negative (noise: more streams cost no less) or its
        fixed part negative.
        """
        count = 0
        sum_n = sum_t = sum_nn = sum_nt = 0.0
        crowds = []
        for seconds, streams in ticks:
            count += 1
            sum_n += streams
            sum_t += seconds
            sum_nn += streams * streams
            sum_nt += streams * seconds
            crowds.append(streams)
        if count == 0 or sum_n <= 0:
            return None
        # The crowd measured: SURE ticks of it, not one (a hiccup of the machine).
        most = heapq.nlargest(SURE, crowds)[-1]
        mean_n, mean_t = sum_n / count, sum_t / count
        variance = sum_nn / count - mean_n * mean_n
        fixed = per_stream = -1.0
        if variance > (0.1 * mean_n) ** 2:
            per_stream = (sum_nt / count - mean_n * mean_t) / variance
            fixed = mean_t - per_stream * mean_n
        if per_stream < 0 or fixed < 0:
            # (Never below zero: ticks less an overestimated context cost may be.)
            fixed, per_stream = 0.0, max(0.0, sum_nt / sum_nn)
        return cls(fixed, per_stream, most, mean_t, mean_n)

    @property
    def reach(self) -> int:
        """The most streams the line is trusted for: twice the most measured."""
        return 2 * max(1, self.measured)

    def cost(self, streams: int, context: float = 0.0) -> float:
        """Estimated seconds of a tick of ``streams`` streams, ``context`` seconds
        of it their contexts' (``step_cost``: what their attention reads)."""
        reach = self.reach
        if streams <= reach:
            base = self.fixed + self.per_stream * streams
        else:
            base = (self.fixed + self.per_stream * reach) * streams / reach
        return base + self.codec_per_stream * streams + context

    def most(self, budget: float, limit: int, context_each: float = 0.0) -> int:
        """The most streams (at most ``limit``), each one's context costing
        ``context_each`` seconds a tick, whose tick is estimated to take at most
        ``budget`` seconds; 0 when not even one stream's does."""

        def fits(streams: int) -> bool:
            return self.cost(streams, streams * context_each) <= budget * (1 + 1e-9)

        if limit <= 0 or not fits(1):
            return 0
        low, high = 1, limit  # fits(low); the cost grows with the streams
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low


class TickCosts:
    """The recent ticks (at most ``window``) and their fit, kept until the next tick.

    Each tick comes with the part of it its streams' contexts cost (the engines'
    measure) and the part spent in codec calls: the line is fitted to the rest.
    The codec's part is counted apart, as seconds per stream over the last
    ``codec_window`` ticks: the engines decode every stream's due chunks in the
    same steps (one call for many), so that one tick in ten or forty carries a
    crowd's codec work (100 ms for 79 tiny-model streams on the CPU, where the
    others take 10), and a few ticks of a new crowd say nothing of it.
    """

    def __init__(self, window: int = 256, codec_window: int = 1024) -> None:
        self._ticks: collections.deque[tuple[float, int, float, float]] = collections.deque(
            maxlen=window
        )
        self._codec: collections.deque[tuple[float, int]] = collections.deque(maxlen=codec_window)
        self._codec_sums = [0.0, 0]  # the codec window's seconds and streams, kept as it moves
        self._fit: TickFit | None = None

    def add(self, seconds: float, streams: int, context: float = 0.0, codec: float = 0.0) -> None:
        """A tick of ``streams`` streams took ``seconds``: ``context`` of them for
        the streams' contexts, ``codec`` in codec calls."""
        self._ticks.append((seconds, streams, context, codec))
        sums = self._codec_sums
        if len(self._codec) == self._codec.maxlen:
            gone, gone_streams = self._codec[0]
            sums[0] -= gone
            sums[1] -= gone_streams
        self._codec.append((codec, streams))
        sums[0] += codec
        sums[1] += streams
        self._fit = None

    def fit(self) -> TickFit | None:
        """The fit to the recent ticks (less their contexts' and codec's parts);
        None before the first."""
        if self._fit is None and self._ticks:
            base = TickFit.of((t - x - c, n) for t, n, x, c in self._ticks)
            if base is not None:
                seconds, streams = self._codec_sums
                codec = max(0.0, seconds) / max(1, streams)
                mean = sum(t for t, _, _, _ in self._ticks) / len(self._ticks)
                self._fit = replace(base, mean_tick=mean, codec_per_stream=codec)
        return self._fit
