"""The prefill budget: what a step may feed, and which prompts' chunks go in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wavecast.server.engines.prefill import PrefillBudget, choose, feed, packed

CPU = torch.device("cpu")


def timed(budget: PrefillBudget, now: list[float], positions: int, seconds: float) -> None:
    began = now[0]
    now[0] += seconds
    budget.measure(positions, began)


def test_a_calls_fixed_part_is_not_charged_per_position() -> None:
    """Calls cost 3 ms plus 10 µs a position: after a small call and a large one,
    a 20 ms budget buys (20 - 3) / 0.01 = 1700 positions, not what the small
    call's time per position (385 µs) would say (51)."""
    now = [0.0]
    budget = PrefillBudget(4096, 0.020, CPU, clock=lambda: now[0])
    assert budget.now() == 4096  # no measurement yet: the cap
    timed(budget, now, 8, 0.003 + 8e-5)
    assert budget.now() == 51  # one size: all per position
    timed(budget, now, 512, 0.003 + 512e-5)
    assert budget.now() == pytest.approx(1700, abs=2)
    fixed, per_position = budget.cost()
    assert fixed == pytest.approx(0.003) and per_position == pytest.approx(1e-5)


def test_the_cap_and_the_floor_hold() -> None:
    now = [0.0]
    budget = PrefillBudget(1000, 0.020, CPU, clock=lambda: now[0])
    timed(budget, now, 10, 1e-4)
    timed(budget, now, 100, 1e-3)
    assert budget.now() == 1000  # the time would buy 2000
    slow = PrefillBudget(1000, 0.020, CPU, clock=lambda: now[0])
    timed(slow, now, 10, 0.5)
    assert slow.now() == 1  # at least one position
    untimed = PrefillBudget(1000, None, CPU, clock=lambda: now[0])
    timed(untimed, now, 10, 0.5)
    assert untimed.now() == 1000  # positions only


def test_a_call_whose_fixed_part_is_over_half_the_budget_costs_twice_it() -> None:
    """A large model on a CPU (random-musicgen-small's prefill here: 155 ms a
    call, whatever its size, and 5.6 ms a position): a 20 ms budget would buy
    no position, and one a step would feed a long prompt at a call's whole
    price each; a call of 310 ms feeds 27, half of its time."""
    now = [0.0]
    budget = PrefillBudget(4096, 0.020, CPU, clock=lambda: now[0])
    timed(budget, now, 1, 0.155 + 0.0056)
    timed(budget, now, 64, 0.155 + 64 * 0.0056)
    assert budget.now() == 27
    # A long prompt fed at that size call after call: the last calls are too
    # alike to tell the fixed part from the rest, which stays as found (all
    # per position, 11 ms each, the budget would buy one).
    for _ in range(PrefillBudget.WINDOW):
        timed(budget, now, 27, 0.155 + 27 * 0.0056)
    assert budget.now() == 27


def test_old_calls_leave_the_fit() -> None:
    """The fit looks at the last calls only: the machine got twice as slow."""
    now = [0.0]
    budget = PrefillBudget(100_000, 0.020, CPU, clock=lambda: now[0])
    for n in (10, 1000) * 8:
        timed(budget, now, n, 0.001 + n * 1e-5)
    assert budget.now() == pytest.approx(1900, abs=2)
    for n in (10, 1000) * 8:
        timed(budget, now, n, 0.002 + n * 2e-5)
    assert budget.now() == pytest.approx(900, abs=2)


def test_choose_takes_the_oldest_and_what_fits_beside_it() -> None:
    """A call costs its chunks' own positions (the decoder computes no padding)."""
    waiting = [("a", 100), ("b", 300), ("c", 80), ("d", 90), ("e", 100)]
    # The oldest, cut to the budget.
    assert choose(waiting, 60) == ([("a", 60)], 60)
    # b fits beside a in 400 positions, then nothing more does.
    assert choose(waiting, 400) == ([("a", 100), ("b", 300)], 300)
    # In 399, b is passed over for the shorter ones behind it.
    assert choose(waiting, 399) == ([("a", 100), ("c", 80), ("d", 90), ("e", 100)], 100)
    # Two decoder rows a request (guidance pairs).
    assert choose(waiting, 500, rows=2) == ([("a", 100), ("c", 80)], 100)
    assert choose(waiting, 100, rows=2) == ([("a", 50)], 50)


def test_packed_lays_rows_out_without_their_padding() -> None:
    """Rows of one start and size together, in the order they first appear; each
    packed position's place among the padded ones, its row and position."""
    starts = np.array([0, 5, 0, 2], dtype=np.int64)
    own = np.array([3, 2, 3, 1], dtype=np.int64)
    layout = packed(starts, own, 4)
    assert [(g.rows, g.first, g.own, g.start) for g in layout.groups] == [
        ((0, 2), 0, 3, 0),
        ((1,), 6, 2, 5),
        ((3,), 8, 1, 2),
    ]
    assert layout.index.tolist() == [0, 1, 2, 8, 9, 10, 4, 5, 12]
    assert layout.row.tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 3]
    assert layout.position.tolist() == [0, 1, 2, 0, 1, 2, 5, 6, 2]
    assert layout.last.tolist() == [2, 7, 5, 8]
    assert not layout.whole
    same = packed(np.array([4, 4]), np.array([3, 3]), 3)
    assert same.whole and same.index.tolist() == list(range(6))
    assert same.position.tolist() == [4, 5, 6, 4, 5, 6]


def test_feed_retries_alone_and_fails_only_the_culprit() -> None:
    now = [0.0]
    budget = PrefillBudget(4096, 0.020, CPU, clock=lambda: now[0])
    calls: list[list[str]] = []

    def call(chosen: list[tuple[str, int]], width: int) -> list[str]:
        calls.append([item for item, _ in chosen])
        now[0] += 0.001
        if any(item == "bad" for item, _ in chosen):
            raise RuntimeError("one prompt breaks the call")
        return [f"{item}:{width}" for item, _ in chosen]

    failures: dict[int, BaseException] = {}
    chosen = [("a", 5), ("bad", 7), ("c", 3)]
    results = feed(chosen, 7, call, failures, budget)
    assert results == ["a:5", None, "c:3"]
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    assert list(failures) == [id("bad")]
    assert budget.now() == 4096  # a failed call is not measured
    assert feed([("a", 5), ("c", 3)], 5, call, failures, budget) == ["a:5", "c:5"]
    assert budget.now() < 4096
