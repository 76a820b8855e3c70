"""The tick's cost as a fixed part and a part per stream (``server/capacity.py``)."""

from __future__ import annotations

import time

import pytest
import torch

from wavecast.server.capacity import SURE, TickCosts, TickFit
from wavecast.server.engines.step_cost import context_cost

BUDGET = 0.016  # 80% of the 20 ms of audio a MusicGen step adds to a stream


def line(fixed: float, per_stream: float, *counts: int) -> list[tuple[float, int]]:
    return [(fixed + per_stream * n, n) for n in counts for _ in range(SURE)]


def fitted(ticks: list[tuple[float, int]]) -> TickFit:
    fit = TickFit.of(ticks)
    assert fit is not None
    return fit


def test_a_batched_step_is_a_fixed_part_and_a_part_per_stream() -> None:
    fit = fitted(line(0.006, 0.0008, 1, 3, 9))
    assert fit.fixed == pytest.approx(0.006) and fit.per_stream == pytest.approx(0.0008)
    assert fit.measured == 9 and fit.reach == 18
    assert fit.cost(12) == pytest.approx(0.0156)
    # 6 + 0.8 * 12 = 15.6 ms fits in 16; 13 streams (16.4 ms) would not.
    assert fit.most(BUDGET, 64) == 12
    assert fit.most(BUDGET, 10) == 10  # at most max_active
    assert fit.mean_streams == pytest.approx(13 / 3)


def test_one_crowd_measured_says_nothing_of_a_fixed_part() -> None:
    fit = fitted(line(0.0, 0.002, 1))
    assert (fit.fixed, fit.per_stream) == (0.0, pytest.approx(0.002))
    assert fit.cost(5) == pytest.approx(0.010)
    assert fit.most(BUDGET, 64) == 8


def test_the_line_is_trusted_to_twice_the_crowd_measured() -> None:
    # A step that costs 1 ms + 0.1 ms a stream, measured at 1 and 2 streams: the
    # line would allow 150; up to 4 it is trusted (1.4 ms), and beyond it the cost
    # is taken to grow in proportion to the streams: 16 / 1.4 * 4 = 45.7.
    fit = fitted(line(0.001, 0.0001, 1, 2))
    assert fit.reach == 4
    assert fit.cost(4) == pytest.approx(0.0014)
    assert fit.cost(8) == pytest.approx(0.0028)
    assert fit.most(BUDGET, 1000) == 45
    # Measured at 45, the line is trusted to 90 (10 ms), proportional beyond: 144;
    # measured at 90, to 180: the line's own 150.
    assert fitted(line(0.001, 0.0001, 1, 2, 45)).most(BUDGET, 1000) == 144
    assert fitted(line(0.001, 0.0001, 1, 2, 45, 90)).most(BUDGET, 1000) == 150


def test_where_the_line_is_unsure_the_cost_grows_in_proportion() -> None:
    # More streams measured cheaper (noise), or a line that would start below
    # zero: through the origin.
    cheaper = fitted([(0.004, 1), (0.003, 2)])
    assert cheaper.fixed == 0.0 and cheaper.per_stream == pytest.approx(0.010 / 5)
    assert cheaper.most(BUDGET, 1000) == 8
    steep = fitted([(0.001, 1), (0.010, 2)])
    assert steep.fixed == 0.0 and steep.per_stream == pytest.approx(0.021 / 5)
    assert steep.most(BUDGET, 1000) == 3
    # Crowds of 31 and 32 as a burst ends: their difference is noise, not a
    # slope; what a crowd costs, in proportion (not a free 64).
    ending = fitted([(0.0110, 32)] * 20 + [(0.0108, 31), (0.0109, 32), (0.0112, 31)])
    assert ending.fixed == 0.0
    assert ending.per_stream == pytest.approx(0.011 / 32, rel=0.01)
    assert ending.most(BUDGET, 1000) == 46


def test_a_model_too_slow_for_one_stream_keeps_none() -> None:
    assert fitted(line(0.0, 0.030, 1)).most(BUDGET, 8) == 0
    assert fitted(line(0.020, 0.001, 1, 2)).most(BUDGET, 8) == 0
    assert fitted(line(0.001, 0.001, 1)).most(BUDGET, 0) == 0


def test_the_window_keeps_the_recent_ticks() -> None:
    recent = line(0.006, 0.0008, 3, 9)
    costs = TickCosts(window=len(recent))
    assert costs.fit() is None
    for seconds, streams in line(0.0, 0.002, 1) * 2:
        costs.add(seconds, streams)
    first = costs.fit()
    assert first is not None and first.measured == 1
    assert costs.fit() is first  # kept until the next tick
    for seconds, streams in recent:
        costs.add(seconds, streams)
    later = costs.fit()
    assert later is not None and later is not first
    # Only the recent ticks count: the crowds of 3 and 9, on their line.
    assert later.fixed == pytest.approx(0.006) and later.per_stream == pytest.approx(0.0008)


def test_each_stream_is_counted_at_the_context_it_will_reach() -> None:
    fit = fitted(line(0.006, 0.0008, 1, 3, 9))
    # Each stream's context will cost 0.2 ms a tick: 6 + (0.8 + 0.2) * n <= 16.
    assert fit.cost(10, 10 * 0.0002) == pytest.approx(0.016)
    assert fit.most(BUDGET, 64, context_each=0.0002) == 10
    assert fit.most(BUDGET, 64, context_each=0.011) == 0  # not even one


def test_the_line_is_fitted_to_the_ticks_less_their_context_and_codec() -> None:
    # A step of 6 ms + 0.8 ms a stream, plus 0.1 ms a stream for each second of
    # context (the crowd aging), plus a codec call for every stream one tick in
    # ten (1 ms a stream): what the crowd costs on average is the line plus 0.1
    # ms a stream of codec, whatever ticks the window holds.
    costs = TickCosts()
    for streams in (1, 3, 9):
        for step in range(40):
            context = streams * 0.0001 * step / 50
            codec = 0.001 * streams if step % 10 == 9 else 0.0
            costs.add(0.006 + 0.0008 * streams + context + codec, streams, context, codec)
    fit = costs.fit()
    assert fit is not None
    assert fit.fixed == pytest.approx(0.006) and fit.per_stream == pytest.approx(0.0008)
    assert fit.codec_per_stream == pytest.approx(0.0001)
    assert fit.cost(10) == pytest.approx(0.006 + 0.0009 * 10)
    # (The mean tick is what the ticks took, all parts in.)
    assert fit.mean_tick > 0.006 + 0.0008 * 13 / 3


def test_a_decode_step_times_its_context_per_stream_and_second() -> None:
    class Decoder:
        """A step that takes 20 microseconds per attended position."""

        codebooks = 4

        def decode(self, codes: torch.Tensor, active: torch.Tensor, span: int | None) -> None:
            assert codes.shape == (16, 4) and not bool(active.any())
            time.sleep(2e-5 * (span or 0))

    cost = context_cost(
        Decoder(),
        rows=16,
        rows_per_stream=2,
        short=64,
        long=512,
        frame_rate=50.0,
        device=torch.device("cpu"),
        repeats=3,
    )
    # 448 positions more (8.96 s at 50 a second) for 8 streams: 8.96 ms more a step.
    assert cost == pytest.approx(0.00896 / (8 * 8.96), rel=0.3)


def test_one_tick_of_a_larger_crowd_is_not_yet_a_measure_of_it() -> None:
    ticks = line(0.001, 0.0001, 1, 2) + [(0.0015, 40)] * (SURE - 1)
    assert fitted(ticks).measured == 2
    assert fitted([*ticks, (0.0015, 40)]).measured == 40


def test_the_codec_is_averaged_over_its_own_longer_window() -> None:
    costs = TickCosts(window=2, codec_window=4)
    for codec in (0.010, 0.0, 0.0, 0.0):  # a crowd of 2's codec call, then none
        costs.add(0.003 + codec, 2, codec=codec)
    fit = costs.fit()
    assert fit is not None and fit.codec_per_stream == pytest.approx(0.010 / 8)
    assert fit.fixed + fit.per_stream * 2 == pytest.approx(0.003)  # the line: the rest
    costs.add(0.003, 2)  # the call leaves the codec's window
    fit = costs.fit()
    assert fit is not None and fit.codec_per_stream == 0.0
