"""How much prompt a step prefills: the budget, and which prompts' chunks go in.

Both engines feed the prompts not yet in the cache between decode steps, a chunk
of each at a time, in one call padded to the longest chunk (the decoders take a
start and a length per row). What a step may feed is a number of positions the
decoder computes, padding included: a cap, or, with a time budget
(``--prefill-budget-ms``), what that time buys at the speed measured on the
calls so far, so that a crowd of long prompts delays the running streams by
about the budget per step, never by the crowd's whole prompts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch

from .base import attempt

T = TypeVar("T")
R = TypeVar("R")


def ragged(
    start: int | Sequence[int], sizes: Sequence[int] | None, count: int, steps: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A prefill call's rows: each one's first position and how many of the
    call's ``steps`` positions are its own (the rest are padding), from the
    decoders' ``start`` (one for all, or per row) and ``sizes`` (None: all)."""
    starts = np.broadcast_to(np.asarray(start, dtype=np.int64), (count,))
    own = np.full(count, steps, dtype=np.int64) if sizes is None else np.asarray(sizes)
    assert own.shape == (count,) and bool((own >= 1).all() and (own <= steps).all())
    return starts, own


def last_own(hidden: torch.Tensor, own: npt.NDArray[np.int64]) -> torch.Tensor:
    """``hidden`` ``[R, S, D]`` at each row's last own position: ``[R, D]``."""
    if bool((own == hidden.shape[1]).all()):
        return hidden[:, -1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, torch.from_numpy(own - 1).to(hidden.device)]


class PrefillBudget:
    """Positions a step may prefill.

    A call's time is taken as a fixed part (its launches, the per-layer work a
    call pays whatever its size) plus a part per position, fitted over the last
    calls; a budget from time per position alone would take the fixed part of
    the small calls (a step's one-position prompts) as the price of every
    position, and feed a crowd's long prompts a few positions a step.

    Args:
        positions: The most positions per step (what bounds a call's activations;
            at least one).
        seconds: A time budget per step (None: ``positions`` only).
        device: Where the calls run (on CUDA the measure waits for the work).
        clock: The clock the calls are timed with.
    """

    # Calls the fit looks back over.
    WINDOW = 16

    def __init__(
        self,
        positions: int,
        seconds: float | None,
        device: torch.device,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.positions = max(1, positions)
        self.seconds = seconds
        self.device = device
        self.clock = clock
        self._calls: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)

    def now(self) -> int:
        """Positions this step may prefill: the cap, or what the time budget buys
        at the measured speed (once there is a measurement)."""
        if self.seconds is None or not self._calls:
            return self.positions
        fixed, per_position = self.cost()
        bought = int(max(0.0, self.seconds - fixed) / max(per_position, 1e-9))
        return max(1, min(self.positions, bought))

    def cost(self) -> tuple[float, float]:
        """Seconds a call costs: ``(fixed, per position)``, from the last calls (a
        least-squares line where their sizes differ enough to tell the two apart;
        else all per position)."""
        sizes = np.array([n for n, _ in self._calls], dtype=np.float64)
        times = np.array([t for _, t in self._calls], dtype=np.float64)
        if sizes.max() >= 2 * sizes.min():
            slope, intercept = np.polyfit(sizes, times, 1)
            if slope > 0 and intercept >= 0:
                return float(intercept), float(slope)
        return 0.0, float(times.sum() / sizes.sum())

    def measure(self, positions: int, began: float) -> None:
        """A call of ``positions`` positions that began at ``began`` has returned."""
        if self.seconds is None:
            return
        if self.device.type == "cuda":  # the work, not its launch
            torch.cuda.synchronize(self.device)
        self._calls.append((max(1, positions), self.clock() - began))


def choose(
    waiting: Sequence[tuple[T, int]], budget: int, rows: int = 1
) -> tuple[list[tuple[T, int]], int]:
    """The chunks one call feeds, and their padded width.

    ``waiting``: each prompt's next chunk size, oldest first; ``rows``: decoder
    rows per prompt (2 where guidance pairs them). The oldest always goes in (cut
    to the budget if need be); each other one if the call, padded to its longest
    chunk, still fits the budget with it; one that does not is passed over for
    shorter ones behind it.
    """
    chosen: list[tuple[T, int]] = []
    width = 0
    for item, size in waiting:
        if not chosen:
            size = min(size, max(1, budget // rows))
        elif (len(chosen) + 1) * rows * max(width, size) > budget:
            continue
        chosen.append((item, size))
        width = max(width, size)
    return chosen, width


def feed(
    chosen: list[tuple[T, int]],
    width: int,
    call: Callable[[list[tuple[T, int]], int], Sequence[R]],
    failures: dict[int, BaseException],
    budget: PrefillBudget,
    rows: int = 1,
) -> list[R | None]:
    """``call(chosen, width)``: one result per chunk, the call timed into
    ``budget``. If it raises, each chunk is fed again alone, so that one prompt's
    failure ends only its request (``failures``, by ``id``); its result is None."""
    began = budget.clock()
    try:
        results: list[R | None] = list(call(chosen, width))
    except Exception as exc:
        if len(chosen) == 1:
            failures[id(chosen[0][0])] = exc
            return [None]
        return [
            attempt(failures, [item], lambda one: call(one, one[0][1])[0], [(item, size)])
            for item, size in chosen
        ]
    budget.measure(len(chosen) * rows * width, began)
    return results
