"""GPU checks (marker `gpu`): skipped cleanly on machines without CUDA."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from wavecast.protocol import resolve_params
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.musicgen import MusicGenEngine
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_tiny_model_streams_exactly_on_cuda() -> None:
    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    params = resolve_params(engine.info.params, {"duration": 2.0, "top_k": 1, "seed": 0})
    job = engine.prepare(EngineRequest("g", "gpu", params))
    chunks = _collect(engine, job)
    codes = engine.codes_of(job)
    model.set_generation_params(duration=2.0, top_k=1)
    _, reference = model.generate(["gpu"], return_tokens=True)
    assert torch.equal(codes, reference)
    full = model.compression_model.decode(codes, None)[0].transpose(0, 1).float().cpu().numpy()
    assert np.abs(chunks - full).max() <= 1e-3


def _collect(engine: Any, job: Any) -> np.ndarray:
    """Step a job to its end; its audio ``[frames, channels]``."""
    chunks = []
    while True:
        out = engine.step([job])[0]
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            return np.concatenate(chunks)


def _speak(engine: Any, text: str, **given: Any) -> tuple[Any, np.ndarray]:
    params = resolve_params(engine.info.params, given)
    job = engine.prepare(EngineRequest("g", text, params))
    return job, _collect(engine, job)[:, 0]


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


def test_decode_steps_replayed_as_cuda_graphs_equal_eager_ones() -> None:
    """``cuda_graphs``: the decode step recorded once per shape and replayed gives
    the codes of the eager step (greedy: audiocraft's), for requests joining at
    different steps (the table grows: graphs are dropped and recorded again)."""
    model = build_tiny_musicgen(device="cuda")
    eager = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    graphed = MusicGenEngine(model, name="tiny-musicgen", test_model=True, cuda_graphs=True)
    results = []
    for engine in (eager, graphed):
        jobs = []
        for i, prompt in enumerate(["rock", "jazz", "ambient pads"]):
            given = {"duration": 1.0 + 0.5 * i, "top_k": 1, "seed": i}
            params = resolve_params(engine.info.params, given)
            jobs.append(engine.prepare(EngineRequest(f"r{i}", prompt, params)))
        running = [jobs[0]]
        steps = 0
        while running:
            if steps == 7:
                running += jobs[1:]  # two more join: the table grows
            outs = engine.step(running)
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
            steps += 1
        results.append([engine.codes_of(job) for job in jobs])
    assert graphed._graphs is not None and graphed._graphs.recorded > 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    model.set_generation_params(duration=1.0, top_k=1)
    _, reference = model.generate(["rock"], return_tokens=True)
    assert torch.equal(results[1][0], reference)


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


def test_graphs_recorded_at_warm_up_serve_a_crowd_without_recording_again() -> None:
    """Warming up records every shape of up to ``max_active`` requests; four
    requests joining at different steps then replay only (nothing recorded,
    nothing dropped) and their greedy codes equal the eager engine's."""
    model = build_tiny_musicgen(device="cuda")
    eager = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    graphed = MusicGenEngine(
        model, name="tiny-musicgen", test_model=True, cuda_graphs=True, max_active=4
    )
    graphed.warm_up()
    graphs = graphed._graphs
    assert graphs is not None and graphs.recorded == len(graphs) > 0
    recorded = graphs.recorded
    results = []
    for engine in (eager, graphed):
        jobs = []
        for i, prompt in enumerate(["rock", "jazz", "ambient pads", "drums"]):
            given = {"duration": 1.0 + 0.5 * i, "top_k": 1, "seed": i}
            params = resolve_params(engine.info.params, given)
            jobs.append(engine.prepare(EngineRequest(f"r{i}", prompt, params)))
        running, steps = [jobs[0]], 0
        while running:
            if steps in (3, 9, 20):
                running.append(jobs[(3, 9, 20).index(steps) + 1])
            outs = engine.step(running)
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
            steps += 1
        results.append([engine.codes_of(job) for job in jobs])
    assert graphs.recorded == recorded and graphs.dropped == 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_finished_and_cancelled_requests_leave_no_memory_behind(cuda_graphs: bool) -> None:
    """Crowds of requests (some cancelled half-way) leave the GPU's allocated
    memory where the first crowd left it: nothing is kept per request; with
    graphs, where warm-up left it (the table and graphs are made once)."""
    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(
        model, name="tiny-musicgen", test_model=True, cuda_graphs=cuda_graphs, max_active=8
    )
    engine.warm_up()
    torch.cuda.synchronize()
    warm = torch.cuda.memory_allocated()
    after = []
    for crowd in range(3):
        jobs = []
        for i in range(8):
            given = {"duration": 1.0, "seed": 10 * crowd + i}
            params = resolve_params(engine.info.params, given)
            jobs.append(engine.prepare(EngineRequest(f"c{crowd}-{i}", "memory", params)))
        running, steps = list(jobs), 0
        while running:
            outs = engine.step(running)
            steps += 1
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
            if steps == 20:  # two cancelled half-way
                for job in running[:2]:
                    engine.finish(job)
                running = running[2:]
        for job in jobs:
            engine.finish(job)
        del jobs, running
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[0] and after[2] == after[0]
    if cuda_graphs:
        assert after[0] == warm
        assert engine._graphs is not None and engine._graphs.dropped == 0
