"""GPU checks (marker `gpu`): skipped cleanly on machines without CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    collect_audio,
    crowds_leave_memory_as_found,
    cuda_syncs_fail_in,
    graphs_at_warm_up_serve_as_eager,
    step_together,
)

from wavecast.protocol import resolve_params
from wavecast.server.engines import fused
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.pipelining import Launched
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def fused_products(request: pytest.FixtureRequest) -> Iterator[bool]:
    """``fused.ENABLED`` as the test's parameter asks, for the engines it loads."""
    fused.ENABLED = bool(request.param)
    try:
        yield fused.ENABLED
    finally:
        fused.ENABLED = False


@pytest.mark.parametrize("fused_products", [False, True], indirect=True)
def test_tiny_model_streams_exactly_on_cuda(fused_products: bool) -> None:
    """Greedy codes equal audiocraft's, by the library's products or the fused
    ones (``fused``: the float16 products summed in another order)."""
    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    assert engine.codec_streams.incremental is not None  # it passed its check on CUDA
    assert (engine.decoder._fused is not None) == fused_products
    params = resolve_params(engine.info.params, {"duration": 2.0, "top_k": 1, "seed": 0})
    job = engine.prepare(EngineRequest("g", "gpu", params))
    chunks = collect_audio(engine, job)
    codes = engine.codes_of(job)
    model.set_generation_params(duration=2.0, top_k=1)
    _, reference = model.generate(["gpu"], return_tokens=True)
    assert torch.equal(codes, reference.cpu())
    full = model.compression_model.decode(reference, None)[0].transpose(0, 1).float().cpu().numpy()
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
        jobs = _music_jobs(engine, ["rock", "jazz", "ambient pads"])
        step_together(engine, jobs, (0, 7, 7))  # two more join: the table grows
        results.append([engine.codes_of(job) for job in jobs])
    assert graphed._graphs is not None and graphed._graphs.recorded > 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    model.set_generation_params(duration=1.0, top_k=1)
    _, reference = model.generate(["rock"], return_tokens=True)
    assert torch.equal(results[1][0], reference.cpu())


def test_graphs_recorded_at_warm_up_serve_a_crowd_without_recording_again() -> None:
    """Warming up records every shape of up to ``max_active`` requests; four
    requests joining at different steps then replay only (nothing recorded,
    nothing dropped) and their greedy codes equal the eager engine's."""
    model = build_tiny_musicgen(device="cuda")
    eager = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    graphed = MusicGenEngine(
        model, name="tiny-musicgen", test_model=True, cuda_graphs=True, max_active=4
    )
    prompts = ["rock", "jazz", "ambient pads", "drums"]
    graphs_at_warm_up_serve_as_eager(eager, graphed, lambda e: _music_jobs(e, prompts))


def test_asked_for_none_a_gpu_serves_as_many_as_fit_with_every_shape_recorded() -> None:
    """``max_active`` 0 (the server's default) on a GPU: the tiny model's tables
    fit 64 requests (``kv.AUTO_MOST``), and warming up records every shape for
    them (the rows of 1 to 64 guidance pairs) before the server would report
    ready; the time it takes is printed (``-s``)."""
    import time

    from wavecast.server.engines import kv

    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(
        model, name="tiny-musicgen", test_model=True, cuda_graphs=True, max_active=0
    )
    began = time.perf_counter()
    engine.warm_up()
    took = time.perf_counter() - began
    assert engine.max_active == kv.AUTO_MOST["cuda"] == 64
    graphs = engine.graphs
    assert graphs is not None and graphs.recorded >= 7  # (rows of 1, 2, 4 ... 64 pairs at least)
    print(f"warm-up for {engine.max_active} requests: {took:.1f} s, {graphs.recorded} graphs")


@pytest.mark.parametrize(
    ("cuda_graphs", "pipelined"), [(False, False), (True, False), (True, True)]
)
def test_finished_and_cancelled_requests_leave_no_memory_behind(
    cuda_graphs: bool, pipelined: bool
) -> None:
    """Crowds of eight requests (two cancelled half-way; pipelined, with their
    codes in flight) leave nothing behind in the GPU's memory
    (``crowds_leave_memory_as_found``)."""
    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(
        model,
        name="tiny-musicgen",
        test_model=True,
        cuda_graphs=cuda_graphs,
        max_active=8,
        pipelined=pipelined,
    )

    def crowd(index: int) -> list[Any]:
        given = {"duration": 1.0, "seed": 10 * index}
        jobs = _music_jobs(engine, ["memory"] * 8, **given)
        step_together(engine, jobs, cancel_at=20)
        return jobs

    crowds_leave_memory_as_found(engine, crowd, cuda_graphs)


def test_a_fused_product_is_the_library_operations_and_each_row_its_own() -> None:
    """``fused.RowProduct`` (a layer norm, the product, GELU and a residual sum in
    one kernel) gives the library's operations' floats to within two units of
    float16's last place, and a row's result is the same bit for bit whatever
    the call's other rows (one row; twenty, in another block of rows); a product
    split in parts (``split_for``) too, call after call, its sum into a float32
    residual in float32."""
    from torch.nn import functional as F

    assert fused.kernels() is not None, "Triton comes with PyTorch's CUDA builds"
    torch.manual_seed(0)

    def within(got: torch.Tensor, want: torch.Tensor, part: torch.Tensor) -> bool:
        assert got.dtype == want.dtype
        scale = part.float().abs() + want.float().abs() + 2.0**-14
        return bool(((got.float() - want.float()).abs() <= 2 * 2.0**-10 * scale).all())

    k, n = 1024, 3072
    weight = (torch.randn(n, k, device="cuda") / k**0.5).half()
    ln = torch.nn.LayerNorm(k, device="cuda")
    x = torch.randn(20, k, device="cuda").half()
    residual = torch.randn(20, n, device="cuda").half()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        norm = fused.Norm.of(ln, ln.weight.device)
        product = fused.RowProduct(weight, norm=norm, gelu=True)
        assert product.config.split == 1
        got = product(x, residual)
        h = F.layer_norm(x.float(), (k,), norm.weight, norm.bias, norm.eps).half()
        activated = F.gelu(h @ weight.t())
        assert within(got, residual + activated, activated)
        assert torch.equal(product(x[:1], residual[:1]), got[:1])
        assert torch.equal(product(x[:2], residual[:2]), got[:2])
        plain = fused.RowProduct(weight)
        assert torch.equal(plain(x)[5:6], plain(x[5:6]))

        long = (torch.randn(k, 4 * k, device="cuda") / (4 * k) ** 0.5).half()
        split = fused.RowProduct(long)
        assert split.config.split == 4 and split.count is not None
        inputs = torch.randn(16, 4 * k, device="cuda").half()
        stream = torch.randn(16, k, device="cuda")  # a float32 residual stream
        got = split(inputs, stream)
        part = inputs @ long.t()
        assert within(got, stream + part, part)
        for _ in range(3):
            assert torch.equal(split(inputs, stream), got)
        assert torch.equal(split(inputs[3:4], stream[3:4]), got[3:4])
        assert int(split.count.count_nonzero()) == 0


def test_fused_steps_give_the_library_steps_codes() -> None:
    """The decoder's step by the fused products against the same step by the
    library's operations (``fused.ENABLED``): the same greedy codes for a crowd
    of three joining at different steps."""
    model = build_tiny_musicgen(device="cuda")
    results = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
        finally:
            fused.ENABLED = False
        assert (engine.decoder._fused is not None) == enabled
        jobs = _music_jobs(engine, ["rock", "jazz", "ambient pads"])
        step_together(engine, jobs, (0, 3, 7))
        results.append([engine.codes_of(job) for job in jobs])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def _music_jobs(engine: Any, prompts: list[str], **given: Any) -> list[Any]:
    """A request per prompt: greedy, the i-th ``1 + 0.5 i`` s long with seed ``i``
    (``given`` instead, where it says)."""
    jobs = []
    for i, prompt in enumerate(prompts):
        spec = {"duration": 1.0 + 0.5 * i, "top_k": 1, "seed": i}
        spec.update({k: v + i if k == "seed" else v for k, v in given.items()})
        params = resolve_params(engine.info.params, spec)
        jobs.append(engine.prepare(EngineRequest(f"r{i}", prompt, params)))
    return jobs


def test_recorded_codec_calls_stream_the_one_shot_decode() -> None:
    """The codec's steady calls recorded as CUDA graphs (``RECORD_CALLS``, with
    the steps' graphs): a crowd of three joining apart streams audio equal to
    the one-shot decode of its codes, and the calls were replayed graphs."""
    from wavecast.server.engines import codec_incremental

    model = build_tiny_musicgen(device="cuda")
    codec_incremental.RECORD_CALLS = True
    try:
        engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True, cuda_graphs=True)
    finally:
        codec_incremental.RECORD_CALLS = False
    inc = engine.codec_streams.incremental
    assert inc is not None
    jobs = _music_jobs(engine, ["rock", "jazz", "ambient pads"], duration=3.0)
    audio = step_together(engine, jobs, (0, 4, 9))
    assert inc._recorded is not None
    assert any(r is not None and r.graph is not None for r in inc._recorded.values())
    for job in jobs:
        streamed = np.concatenate(audio[job.request.request_id])
        codes = engine.codes_of(job).cuda()
        whole = model.compression_model.decode(codes, None)[0].transpose(0, 1).float().cpu()
        assert streamed.shape == tuple(whole.shape)
        assert np.abs(streamed - whole.numpy()).max() <= 1e-3


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_pipelined_steps_on_cuda_draw_the_plain_steps_codes(cuda_graphs: bool) -> None:
    """``pipelined`` on CUDA (the inputs from pinned memory without waiting, the
    codes read back through an event a step later, the codes in flight fed on
    the device, the codec on a stream of its own; eagerly and replayed as
    graphs): a crowd joining apart, greedy and sampled, draws the plain steps'
    codes and streams the one-shot decode."""
    model = build_tiny_musicgen(device="cuda")
    engines = [
        MusicGenEngine(
            model,
            name="tiny-musicgen",
            test_model=True,
            cuda_graphs=cuda_graphs,
            pipelined=pipelined,
        )
        for pipelined in (False, True)
    ]
    assert engines[0]._codec_place.stream is None and engines[1]._codec_place.stream is not None
    results = []
    for engine in engines:
        jobs = _music_jobs(engine, ["rock", "jazz", "ambient pads"], duration=2.0)
        params = resolve_params(engine.info.params, {"duration": 1.5, "top_k": 50, "seed": 7})
        jobs.append(engine.prepare(EngineRequest("sampled", "sampled", params)))
        audio = step_together(engine, jobs, (0, 3, 9, 9))
        results.append((jobs, audio))
    for plain, piped in zip(results[0][0], results[1][0], strict=True):
        assert torch.equal(engines[1].codes_of(piped), engines[0].codes_of(plain))
    for job in results[1][0]:
        streamed = np.concatenate(results[1][1][job.request.request_id])
        codes = engines[1].codes_of(job).cuda()
        whole = model.compression_model.decode(codes, None)[0].transpose(0, 1).float().cpu()
        assert streamed.shape == tuple(whole.shape)
        assert np.abs(streamed - whole.numpy()).max() <= 1e-3


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_pipelined_step_waits_for_nothing_on_cuda(cuda_graphs: bool) -> None:
    """A pipelined step's host part runs while the step it launched computes;
    under ``torch.cuda``'s sync debug mode (an error where anything waits for
    the device) a crowd's steps, warmed up, wait for nothing but the last
    step's codes (an event) and the codec's audio (on its own stream), through
    requests joining apart
    (their new rows' sampling and guidance set), prompts fed in pieces under a
    time budget, long-form windows' re-prefills. Left out: the text encoder
    (transformers' T5 reads its mask on the host; once a request). The codes
    still equal the plain steps'."""
    model = build_tiny_musicgen(device="cuda", window=2.0)
    codes = []
    for pipelined in (False, True):
        engine = MusicGenEngine(
            model,
            name="tiny-2s",
            test_model=True,
            max_duration=12.0,
            cuda_graphs=cuda_graphs,
            pipelined=pipelined,
            prefill_chunk=8,
            prefill_budget_ms=5.0,
        )
        engine.warm_up()
        jobs = _music_jobs(engine, ["rock", "jazz", "ambient pads", "drums"], duration=4.5)
        exempt = [(engine.conditioning, "together"), (engine.conditioning, "one")]
        exempt += [(engine, "_decode_due"), (Launched, "wait")]
        if pipelined:
            with cuda_syncs_fail_in(engine, "step", exempt):
                step_together(engine, jobs, (0, 3, 9, 60))
        else:
            step_together(engine, jobs, (0, 3, 9, 60))
        codes.append([engine.codes_of(job) for job in jobs])
    for plain, piped in zip(*codes, strict=True):
        assert torch.equal(piped, plain)
