"""GPU checks (marker `gpu`): skipped cleanly on machines without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import collect_audio

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
    chunks = collect_audio(engine, job)
    codes = engine.codes_of(job)
    model.set_generation_params(duration=2.0, top_k=1)
    _, reference = model.generate(["gpu"], return_tokens=True)
    assert torch.equal(codes, reference)
    full = model.compression_model.decode(codes, None)[0].transpose(0, 1).float().cpu().numpy()
    assert np.abs(chunks - full).max() <= 1e-3


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
