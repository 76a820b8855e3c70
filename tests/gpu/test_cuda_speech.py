"""GPU checks of the speech engine (marker `gpu`): skipped cleanly on machines without
CUDA. Nothing here imports audiocraft (see scripts/device-check)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import collect_audio

from wavecast.protocol import resolve_params
from wavecast.server.engines.base import EngineRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _speak(engine: Any, text: str, **given: Any) -> tuple[Any, np.ndarray]:
    params = resolve_params(engine.info.params, given)
    job = engine.prepare(EngineRequest("g", text, params))
    return job, collect_audio(engine, job)[:, 0]


def test_tiny_higgs_streams_exactly_on_cuda() -> None:
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs

    engine = HiggsEngine(load_higgs("tiny-higgs", None, "cuda"), name="tiny-higgs")
    job, streamed = _speak(
        engine,
        "[SPEAKER0] Hello.\n[SPEAKER1] Hi!",
        seed=1,
        max_new_tokens=40,
        chunk_method="speaker",
    )
    codes = engine.codes_of(job)
    with torch.no_grad():
        whole = engine.codec.decode(codes).audio_values[0, 0].float().cpu().numpy()
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= 1e-4


def test_random_higgs_3b_runs_on_cuda() -> None:
    """The released shapes (bfloat16 generator, float32 codec) on the GPU."""
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs

    engine = HiggsEngine(load_higgs("random-higgs-3b", None, "cuda"), name="random-higgs-3b")
    job, streamed = _speak(engine, "Hello there.", seed=1, max_new_tokens=40)
    codes = engine.codes_of(job)
    assert codes.shape == (1, 8, 40 - 8)
    with torch.no_grad():
        whole = engine.codec.decode(codes).audio_values[0, 0].float().cpu().numpy()
    assert np.abs(streamed - whole).max() <= 1e-3


def test_tiny_higgs_rows_in_a_batch_equal_their_solo_runs_on_cuda() -> None:
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs
    from wavecast.server.engines.testing.higgs_reference import HiggsReference

    loaded = load_higgs("tiny-higgs", None, "cuda")
    engine = HiggsEngine(loaded, name="tiny-higgs")
    reference = HiggsReference(loaded, name="tiny-higgs")
    texts = ["Hello there.", "[SPEAKER0] One.\n[SPEAKER1] Two.", "A third, longer voice."]
    given: dict[str, Any] = {"max_new_tokens": 30, "chunk_method": "speaker"}
    solo = []
    for i, text in enumerate(texts):
        job, _ = _speak(engine, text, seed=i, **given)
        solo.append(engine.codes_of(job))
        engine.finish(job)
    jobs = [
        engine.prepare(
            EngineRequest(f"r{i}", text, resolve_params(engine.info.params, {"seed": i, **given}))
        )
        for i, text in enumerate(texts)
    ]
    live = list(jobs)
    while live:
        outputs = engine.step(live)
        live = [job for job, out in zip(live, outputs, strict=True) if not out.done]
    for job, codes in zip(jobs, solo, strict=True):
        assert torch.equal(engine.codes_of(job), codes)
    # Greedy without the random redraw: the batched path equals the reference path.
    greedy: dict[str, Any] = {"temperature": 0.0, "ras_win_len": 0, "max_new_tokens": 30, "seed": 0}
    ours, _ = _speak(engine, texts[1], chunk_method="speaker", **greedy)
    theirs, _ = _speak(reference, texts[1], chunk_method="speaker", **greedy)
    assert torch.equal(engine.codes_of(ours), reference.codes_of(theirs))


def test_speech_steps_replayed_as_cuda_graphs_equal_eager_ones() -> None:
    """The speech engine's batched step as CUDA graphs: the same greedy codes as
    the eager step, for requests joining mid-run."""
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    results = []
    for cuda_graphs in (False, True):
        engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs)
        jobs = []
        for i, text in enumerate(["Hello there.", "[SPEAKER0] Hi.\n[SPEAKER1] Hey!", "Short."]):
            given = {"seed": i, "max_new_tokens": 30, "temperature": 0.0}
            if i == 1:
                given["chunk_method"] = "speaker"
            params = resolve_params(engine.info.params, given)
            jobs.append(engine.prepare(EngineRequest(f"s{i}", text, params)))
        running, steps = [jobs[0]], 0
        while running:
            if steps == 5:
                running += jobs[1:]
            outs = engine.step(running)
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
            steps += 1
        results.append([engine.codes_of(job) for job in jobs])
        if cuda_graphs:
            assert engine._graphs is not None and engine._graphs.recorded > 0
    for eager, graphed in zip(*results, strict=True):
        assert torch.equal(eager, graphed)


def _crowd(
    engine: Any, joins: tuple[int, ...], steps_before_cancel: int | None = None
) -> list[Any]:
    """Requests joining at ``joins`` steps, stepped to their end (two of them
    cancelled after ``steps_before_cancel`` steps, if given); their jobs."""
    texts = ["Hello there.", "[SPEAKER0] Hi.\n[SPEAKER1] Hey!", "Short.", "A longer line, said."]
    jobs = []
    for i in range(len(joins)):
        given: dict[str, Any] = {"seed": i, "max_new_tokens": 30}
        if i % 4 == 1:
            given["chunk_method"] = "speaker"
        params = resolve_params(engine.info.params, given)
        jobs.append(engine.prepare(EngineRequest(f"s{i}", texts[i % 4], params)))
    waiting = sorted(zip(joins, range(len(jobs)), strict=True))
    running: list[Any] = []
    steps = 0
    while waiting or running:
        while waiting and waiting[0][0] <= steps:
            running.append(jobs[waiting.pop(0)[1]])
        if running:
            outs = engine.step(running)
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
        steps += 1
        if steps == steps_before_cancel:
            for job in running[:2]:
                engine.finish(job)
            running = running[2:]
    return jobs


def test_speech_graphs_recorded_at_warm_up_serve_a_crowd_without_recording_again() -> None:
    """Warming up records every shape of up to ``max_active`` speech requests; four
    joining at different steps then replay only, and their codes (sampled, with
    the repetition-aware redraw) equal the eager engine's."""
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    eager = HiggsEngine(loaded, name="tiny-higgs")
    graphed = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True, max_active=4)
    graphed.warm_up()
    graphs = graphed._graphs
    assert graphs is not None and graphs.recorded == len(graphs) > 0
    recorded = graphs.recorded
    results = [[e.codes_of(job) for job in _crowd(e, (0, 3, 9, 20))] for e in (eager, graphed)]
    assert graphs.recorded == recorded and graphs.dropped == 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_finished_and_cancelled_speech_leaves_no_memory_behind(cuda_graphs: bool) -> None:
    """Crowds of speech requests (two cancelled half-way each time) leave the GPU's
    allocated memory where the first crowd left it; with graphs, where warm-up
    left it."""
    from wavecast.server.engines.higgs import HiggsEngine
    from wavecast.server.engines.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs, max_active=8)
    engine.warm_up()
    torch.cuda.synchronize()
    warm = torch.cuda.memory_allocated()
    after = []
    for _ in range(3):
        jobs = _crowd(engine, (0,) * 8, steps_before_cancel=15)
        for job in jobs:
            engine.finish(job)
        del jobs
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[0] and after[2] == after[0]
    if cuda_graphs:
        assert after[0] == warm
        assert engine._graphs is not None and engine._graphs.dropped == 0
