"""Engine outputs in the protocol's words: how often progress is said."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from wavecast.protocol import Audio, ModelInfo, Progress
from wavecast.server.audio import resample, warm_resample_start
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


def test_a_stream_at_another_rate_is_the_whole_resampled_however_cut() -> None:
    """A request at another rate than its model's: each chunk is resampled as it
    comes, what soxr holds back comes out with the live stream's last step, and
    the chunks join into the whole live stream resampled at once, bit for bit;
    the Multi-Band Diffusion version is resampled whole, to the same length."""
    rng = np.random.default_rng(5)
    stereo = replace(INFO, sample_rate=32000, channels=2)
    for rate in (8000, 44100, 48000):
        live = (rng.standard_normal((32000, 2)) * 0.3).astype(np.float32)
        outputs = RequestOutputs("r", stereo, "pcm_f32le", rate)
        cuts = np.sort(rng.choice(np.arange(1, live.shape[0]), size=20, replace=False))
        said: list[Audio] = []
        held = live[:0]
        for i, chunk in enumerate(np.split(live, cuts)):
            held = np.concatenate([held, chunk])
            if i % 3 == 0:  # a step with no audio: its samples come with the next
                step = StepOutput(None, 0.5, 0.5)
            else:
                step, held = StepOutput(held, 0.5, 0.5), live[:0]
            said += [m for m in outputs.messages(step, float(i)) if isinstance(m, Audio)]
        # The live stream ends (its last chunk already sent); diffusion renders.
        last = StepOutput(held if held.size else None, 1.0, 1.0, stage="mbd")
        said += [m for m in outputs.messages(last, 99.0) if isinstance(m, Audio)]
        version = (rng.standard_normal(live.shape) * 0.3).astype(np.float32)
        rendition = outputs.messages(
            StepOutput(None, 1.0, 1.0, done=True, stage="mbd", rendition=version), 100.0
        )
        assert all(m.sample_rate == rate and m.channels == 2 for m in said)
        assert [m.seq for m in said] == list(range(len(said)))
        assert [m.offset for m in said] == list(
            itertools.accumulate([0] + [m.frames for m in said[:-1]])
        )
        streamed = np.frombuffer(b"".join(m.data for m in said), "<f4").reshape(-1, 2)
        whole = resample(live, 32000, rate)
        assert streamed.shape == whole.shape == (rate, 2)
        assert np.array_equal(streamed, whole)
        assert outputs.stats(submitted_at=0, started_at=0, now=2).samples == rate
        assert outputs.stats(submitted_at=0, started_at=0, now=2).audio_seconds == 1.0
        other = [m for m in rendition if isinstance(m, Audio) and m.rendition == "mbd"]
        assert [m.offset for m in other] == [0]  # a second: one chunk
        assert np.array_equal(
            np.frombuffer(other[0].data, "<f4").reshape(-1, 2), resample(version, 32000, rate)
        )


def test_a_stream_at_its_models_rate_is_not_resampled() -> None:
    chunk = np.linspace(-1, 1, 80, dtype=np.float32)[:, None]
    for rate in (0, INFO.sample_rate):
        outputs = RequestOutputs("r", INFO, "pcm_f32le", rate)
        assert outputs.resampler is None and outputs.sample_rate == INFO.sample_rate
        (audio,) = [
            m for m in outputs.messages(StepOutput(chunk, 0.5, 0.5), 0.0) if isinstance(m, Audio)
        ]
        assert audio.data == chunk.tobytes() and audio.sample_rate == INFO.sample_rate


def test_a_stream_picked_up_at_another_rate_is_resampled_from_a_little_before_the_cut() -> None:
    """A stream picked up at another rate than its model's, its audio made
    again from ``warm_resample_start``'s frame (floored to a codec frame, as an
    engine does): from the first frame its client lacks, the chunks are the
    whole stream resampled, to a float's rounding, at the same offsets, and as
    long; begun at the stream's start, bit for bit."""
    rng = np.random.default_rng(7)
    stereo = replace(INFO, sample_rate=32000, channels=2)
    live = (rng.standard_normal((3 * 32000, 2)) * 0.3).astype(np.float32)
    for rate in (8000, 8001, 11025, 12345, 16000, 44100, 48000, 192000):
        whole = resample(live, 32000, rate)
        for heard in (0, 1, rate // 2 + 7, 2 * rate + 12_345 % rate, whole.shape[0] - 1):
            start = warm_resample_start(32000, rate, heard) // 640 * 640
            assert 0 <= start <= max(0, heard * 32000 // rate - 3200)  # (0.1 s before)
            outputs = RequestOutputs("r", stereo, "pcm_f32le", rate, skip=heard)
            outputs.begin_at(start)
            rest = live[start:]
            cuts = np.sort(rng.choice(np.arange(1, rest.shape[0]), size=9, replace=False))
            said: list[Audio] = []
            chunks = np.split(rest, cuts)
            for i, chunk in enumerate(chunks):
                step = StepOutput(chunk, 0.5, 0.5, done=i == len(chunks) - 1)
                said += [m for m in outputs.messages(step, float(i)) if isinstance(m, Audio)]
            assert said[0].offset == heard
            assert [m.offset for m in said] == list(
                itertools.accumulate([heard] + [m.frames for m in said[:-1]])
            )
            streamed = np.frombuffer(b"".join(m.data for m in said), "<f4").reshape(-1, 2)
            assert streamed.shape == whole[heard:].shape
            if start == 0:
                assert np.array_equal(streamed, whole[heard:])
            else:
                assert np.abs(streamed - whole[heard:]).max() < 2e-6
            assert outputs.stats(submitted_at=0, started_at=0, now=2).samples == whole.shape[0]
