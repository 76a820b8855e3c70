"""Engine outputs in the protocol's words: how often progress is said."""

from __future__ import annotations

import itertools

import numpy as np

from wavecast.protocol import Audio, ModelInfo, Progress
from wavecast.server.engines.base import StepOutput
from wavecast.server.outputs import PROGRESS_INTERVAL, RequestOutputs

INFO = ModelInfo(
    name="m", family="musicgen", description="", sample_rate=8000, channels=1,
    test_model=True, max_duration=10.0,
)  # fmt: skip


def progress(outputs: RequestOutputs, output: StepOutput, now: float) -> list[Progress]:
    return [m for m in outputs.messages(output, now) if isinstance(m, Progress)]


def run(
    steps: int, seconds_per_step: float, stages: tuple[str | None, ...] = (None,)
) -> list[Progress]:
    """Every message's progress of a request whose stages each take ``steps``
    steps, ``seconds_per_step`` apart; the last step of the last stage is done."""
    outputs = RequestOutputs("r", INFO, "pcm_s16le")
    said = []
    now = 0.0
    for s, stage in enumerate(stages):
        for i in range(1, steps + 1):
            now += seconds_per_step
            done = s == len(stages) - 1 and i == steps
            output = StepOutput(None, i / steps, i * 0.02, done=done, stage=stage)
            said += progress(outputs, output, now)
    return said


def test_a_slow_stream_hears_every_percent() -> None:
    said = run(1000, 0.1)  # 100 s for the stage
    fractions = [p.fraction for p in said]
    assert 95 <= len(said) <= 101  # (steps of 0.001 land on 1% give or take rounding)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(b - a >= 0.01 - 1e-9 for a, b in itertools.pairwise(fractions))


def test_a_fast_stream_hears_progress_about_twenty_times_a_second() -> None:
    said = run(2000, 0.001)  # 2 s for the stage, 2000 steps
    assert 2.0 / PROGRESS_INTERVAL - 2 <= len(said) <= 2.0 / PROGRESS_INTERVAL + 2
    assert said[0].fraction == 0.0005  # the stage's first step is said at once
    assert said[-1].fraction == 1.0


def test_each_stage_is_said_from_its_start_to_its_end() -> None:
    """A stage's first progress and its 1.0 are said however fast it ran (the
    live stream ends with 1.0 before Multi-Band Diffusion starts, which is not
    the request's last step)."""
    said = run(50, 0.001, stages=(None, "mbd"))
    for stage in (None, "mbd"):
        fractions = [p.fraction for p in said if p.stage == stage]
        assert fractions[0] == 0.02 and fractions[-1] == 1.0
        assert len(fractions) <= 3


def test_the_last_step_is_always_said() -> None:
    outputs = RequestOutputs("r", INFO, "pcm_s16le")
    assert progress(outputs, StepOutput(None, 0.5, 1.0), 0.0)
    assert not progress(outputs, StepOutput(None, 0.6, 1.2), 0.001)
    done = progress(outputs, StepOutput(None, 0.6, 1.2, done=True), 0.002)
    assert [p.fraction for p in done] == [0.6]


def test_audio_goes_out_at_once_whatever_the_progress() -> None:
    """A step's audio is said at once, between two progress messages too; a
    step with none, within the progress interval, says nothing."""
    outputs = RequestOutputs("r", INFO, "pcm_s16le")
    chunk = np.zeros((80, 1), dtype=np.float32)
    assert [type(m) for m in outputs.messages(StepOutput(None, 0.1, 0.1), 0.0)] == [Progress]
    assert outputs.messages(StepOutput(None, 0.2, 0.2), 0.001) == []
    said = outputs.messages(StepOutput(chunk, 0.3, 0.3), 0.002)
    assert [type(m) for m in said] == [Audio]
    assert outputs.messages(StepOutput(chunk[:0], 0.4, 0.4), 0.003) == []
    said = outputs.messages(StepOutput(chunk, 0.5, 0.5), 0.003 + PROGRESS_INTERVAL)
    assert [type(m) for m in said] == [Audio, Progress]
    assert [(m.seq, m.offset) for m in outputs.messages(StepOutput(chunk, 0.6, 0.6), 0.1)] == [
        (2, 160)
    ]
