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
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["TickCosts", "TickFit"]


@dataclass(frozen=True, slots=True)
class TickFit:
    """The cost of a tick as a function of the streams in it, fitted to recent ticks."""

    fixed: float  # seconds a tick costs whatever its streams
    per_stream: float  # seconds each stream adds
    measured: int  # the most streams one of the fitted ticks ran
    mean_tick: float  # the mean of the fitted ticks, seconds
    mean_streams: float  # the mean streams of the fitted ticks

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
        most = 0
        for seconds, streams in ticks:
            count += 1
            sum_n += streams
            sum_t += seconds
            sum_nn += streams * streams
            sum_nt += streams * seconds
            most = max(most, streams)
        if count == 0 or sum_n <= 0:
            return None
        mean_n, mean_t = sum_n / count, sum_t / count
        variance = sum_nn / count - mean_n * mean_n
        fixed = per_stream = -1.0
        if variance > (0.1 * mean_n) ** 2:
            per_stream = (sum_nt / count - mean_n * mean_t) / variance
            fixed = mean_t - per_stream * mean_n
        if per_stream < 0 or fixed < 0:
            fixed, per_stream = 0.0, sum_nt / sum_nn
        return cls(fixed, per_stream, most, mean_t, mean_n)

    @property
    def reach(self) -> int:
        """The most streams the line is trusted for: twice the most measured."""
        return 2 * max(1, self.measured)

    def cost(self, streams: int) -> float:
        """Estimated seconds of a tick of ``streams`` streams."""
        reach = self.reach
        if streams <= reach:
            return self.fixed + self.per_stream * streams
        return (self.fixed + self.per_stream * reach) * streams / reach

    def most(self, budget: float, limit: int) -> int:
        """The most streams (at most ``limit``) whose tick is estimated to take at
        most ``budget`` seconds; 0 when not even one stream's does."""
        if limit <= 0 or self.cost(1) > budget:
            return 0
        reach = self.reach
        if self.per_stream > 0:
            on_line = math.floor((budget - self.fixed) / self.per_stream + 1e-9)
            if on_line <= reach:
                return max(1, min(limit, on_line))
        at_reach = self.cost(reach)
        beyond = reach if at_reach <= 0 else math.floor(budget * reach / at_reach + 1e-9)
        return max(1, min(limit, max(reach, beyond)))


class TickCosts:
    """The recent ticks (at most ``window``) and their fit, kept until the next tick."""

    def __init__(self, window: int = 256) -> None:
        self._ticks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._fit: TickFit | None = None

    def add(self, seconds: float, streams: int) -> None:
        """A tick of ``streams`` streams took ``seconds``."""
        self._ticks.append((seconds, streams))
        self._fit = None

    def fit(self) -> TickFit | None:
        """The fit to the recent ticks; None before the first."""
        if self._fit is None and self._ticks:
            self._fit = TickFit.of(self._ticks)
        return self._fit
