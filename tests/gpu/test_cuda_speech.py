"""GPU checks of the speech engine (marker `gpu`): skipped cleanly on machines without
CUDA. Nothing here imports audiocraft (see scripts/device-check)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    collect_audio,
    crowds_leave_memory_as_found,
    cuda_syncs_fail_in,
    graphs_at_warm_up_serve_as_eager,
    random_rules,
    step_together,
)

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
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    engine = HiggsEngine(load_higgs("tiny-higgs", None, "cuda"), name="tiny-higgs")
    assert engine.codec_streams.incremental is not None  # it passed its check on CUDA
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
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    engine = HiggsEngine(load_higgs("random-higgs-3b", None, "cuda"), name="random-higgs-3b")
    assert engine.codec_streams.incremental is not None
    job, streamed = _speak(engine, "Hello there.", seed=1, max_new_tokens=40)
    codes = engine.codes_of(job)
    assert codes.shape == (1, 8, 40 - 8)
    with torch.no_grad():
        whole = engine.codec.decode(codes).audio_values[0, 0].float().cpu().numpy()
    assert np.abs(streamed - whole).max() <= 1e-3


def test_tiny_higgs_rows_in_a_batch_equal_their_solo_runs_on_cuda() -> None:
    """In float32 (on CUDA a model loads in bfloat16 by default: there a batched
    product rounds its rows otherwise than a product of one row, by up to 0.1 in
    the logits, and sampled codes part)."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs
    from wavecast.server.engines.testing.higgs_reference import HiggsReference

    loaded = load_higgs("tiny-higgs", None, "cuda", dtype=torch.float32)
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
    step_together(engine, jobs)
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
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    results = []
    for cuda_graphs in (False, True):
        engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs)
        jobs = _speech_jobs(engine, 3, temperature=0.0)
        step_together(engine, jobs, (0, 5, 5))
        results.append([engine.codes_of(job) for job in jobs])
        if cuda_graphs:
            assert engine._graphs is not None and engine._graphs.recorded > 0
    for eager, graphed in zip(*results, strict=True):
        assert torch.equal(eager, graphed)


def _speech_jobs(engine: Any, count: int, **extra: Any) -> list[Any]:
    """``count`` speech requests, 30 frames at most each (a dialogue among them),
    with ``extra`` parameters."""
    texts = ["Hello there.", "[SPEAKER0] Hi.\n[SPEAKER1] Hey!", "Short.", "A longer line, said."]
    jobs = []
    for i in range(count):
        given: dict[str, Any] = {"seed": i, "max_new_tokens": 30, **extra}
        if i % 4 == 1:
            given["chunk_method"] = "speaker"
        params = resolve_params(engine.info.params, given)
        jobs.append(engine.prepare(EngineRequest(f"s{i}", texts[i % 4], params)))
    return jobs


def test_speech_graphs_recorded_at_warm_up_serve_a_crowd_without_recording_again() -> None:
    """Warming up records every shape of up to ``max_active`` speech requests; four
    joining at different steps then replay only, and their codes (sampled, with
    the repetition-aware redraw) equal the eager engine's."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    eager = HiggsEngine(loaded, name="tiny-higgs")
    graphed = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True, max_active=4)
    graphs_at_warm_up_serve_as_eager(eager, graphed, lambda e: _speech_jobs(e, 4))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_finished_and_cancelled_speech_leaves_no_memory_behind(cuda_graphs: bool) -> None:
    """Crowds of eight speech requests (two cancelled half-way) leave nothing
    behind in the GPU's memory (``crowds_leave_memory_as_found``)."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs, max_active=8)

    def crowd(_: int) -> list[Any]:
        jobs = _speech_jobs(engine, 8)
        step_together(engine, jobs, cancel_at=15)
        return jobs

    crowds_leave_memory_as_found(engine, crowd, cuda_graphs)


def test_a_16_bit_norm_on_cuda_is_the_models_to_a_bit_in_one_kernel() -> None:
    """The speech decoder's RMS norm of a 16-bit model on CUDA (torch's fused
    kernel, then the model's rounding and weight) gives the model's module's
    values to within one unit of bfloat16's last place, and launches fewer
    kernels than the module's formula."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2RMSNorm

    from wavecast.server.engines.higgs.decoder import HiggsDecoder

    torch.manual_seed(0)
    module = HiggsAudioV2RMSNorm(3072, eps=1e-5).to("cuda", torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_()
    x = (4 * torch.randn(8, 3072, device="cuda")).to(torch.bfloat16)
    ours = HiggsDecoder._rms(SimpleNamespace(eps=1e-5), x, module.weight)
    with torch.no_grad():
        theirs = module(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ulp = theirs.float().abs().clamp(min=1e-30) * 2.0**-7
    assert bool(((ours.float() - theirs.float()).abs() <= ulp).all())

    def kernels(call: Any) -> int:
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
            call()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    with torch.no_grad():
        fused = kernels(lambda: HiggsDecoder._rms(SimpleNamespace(eps=1e-5), x, module.weight))
        formula = kernels(lambda: module(x))
    assert fused < formula, (fused, formula)


def test_fused_speech_products_round_as_the_separate_operations() -> None:
    """``fused.PairProduct`` in bfloat16: the RMS norm, the query, key and value
    projection and the rotary positions in one kernel; the norm, the gate and up
    projection and ``silu(gate) * up`` in another. Each within the rounding of
    the separate operations' results (its sums go in another order), and each
    row's result the same bit for bit whatever the call's other rows."""
    from torch.nn import functional as F

    from wavecast.server.engines import fused
    from wavecast.server.engines.higgs.decoder import HiggsDecoder

    assert fused.kernels() is not None, "Triton comes with PyTorch's CUDA builds"
    torch.manual_seed(0)
    bf, dev = torch.bfloat16, "cuda"
    rows, dim, heads, kv_heads, d, inner, eps = 5, 1024, 8, 2, 128, 2048, 1e-5
    x = (3 * torch.randn(rows, dim, device=dev)).to(bf)
    gain = (torch.rand(dim, device=dev) + 0.5).to(bf)
    normed = HiggsDecoder._rms(SimpleNamespace(eps=eps), x, gain)
    norm = fused.Norm.rms(gain, eps)
    with torch.no_grad():
        weight = (torch.randn((heads + 2 * kv_heads) * d, dim, device=dev) / dim**0.5).to(bf)
        projected = (normed.float() @ weight.float().t()).to(bf)
        want = projected.view(rows, -1, 1, d).clone()
        angles = 6 * torch.rand(rows, d // 2, device=dev)
        cos = torch.cat([angles.cos(), angles.cos()], -1).to(bf)
        sin = torch.cat([-angles.sin(), angles.sin()], -1).to(bf)  # (the first half negated)
        rotated = want[:, : heads + kv_heads]
        HiggsDecoder._rotate(rotated, cos[:, None, None], sin[:, None, None], in_place=True)
        qkv = fused.PairProduct(weight, norm=norm, head_dim=d, rotated=heads + kv_heads)
        got = qkv(x, cos, sin)
        apart = (got.float() - want.view(rows, -1).float()).abs().max()
        assert float(apart) <= 2.0**-6 * float(projected.float().abs().max())
        assert torch.equal(qkv(x[2:3], cos[2:3], sin[2:3]), got[2:3])

        gate_up = (torch.randn(2 * inner, dim, device=dev) / dim**0.5).to(bf)
        gate, up = (normed.float() @ gate_up.float().t()).to(bf).chunk(2, dim=-1)
        want = F.silu(gate) * up
        glu = fused.PairProduct(gate_up, norm=norm, glu=True)
        got = glu(x)
        scale = float(gate.float().abs().max() * up.float().abs().max())
        assert float((got.float() - want.float()).abs().max()) <= 2.0**-6 * scale
        assert torch.equal(glu(x[:1]), got[:1])


def test_fused_speech_steps_give_the_library_steps_codes() -> None:
    """The speech decoder's step by the fused kernels (``fused.ENABLED``; the
    tiny model with heads of 32, which the kernels rotate) against the same
    step by the library's operations, in bfloat16: the same greedy codes for
    three requests joining at different steps."""
    from wavecast.server.engines import fused
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import HiggsModel
    from wavecast.server.engines.testing.higgs import build_tiny_higgs

    tiny = build_tiny_higgs(dtype=torch.bfloat16, head_dim=32)
    model, codec = tiny.model.to("cuda").eval(), tiny.codec.to("cuda").eval()
    loaded = HiggsModel(model, tiny.tokenizer, codec, True)
    results = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            engine = HiggsEngine(loaded, name="tiny-higgs")
        finally:
            fused.ENABLED = False
        assert (engine.decoder._fused is not None) == enabled
        jobs = _speech_jobs(engine, 3, temperature=0.0, ras_win_len=0)
        step_together(engine, jobs, (0, 4, 9))
        results.append([engine.codes_of(job) for job in jobs])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_recorded_speech_codec_calls_stream_the_one_shot_decode() -> None:
    """The speech codec's steady calls recorded as CUDA graphs (``RECORD_CALLS``):
    a crowd of three joining apart streams audio equal to the one-shot decode
    of its codes, and the calls were replayed graphs."""
    from wavecast.server.engines import codec_incremental
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    codec_incremental.RECORD_CALLS = True
    try:
        engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True)
    finally:
        codec_incremental.RECORD_CALLS = False
    inc = engine.codec_streams.incremental
    assert inc is not None
    jobs = _speech_jobs(engine, 3, max_new_tokens=60)
    audio = step_together(engine, jobs, (0, 4, 9))
    assert inc._recorded is not None
    assert any(r is not None and r.graph is not None for r in inc._recorded.values())
    for job in jobs:
        streamed = np.concatenate(audio[job.request.request_id])[:, 0]
        with torch.no_grad():
            whole = engine.codec.decode(engine.codes_of(job)).audio_values[0, 0].float().cpu()
        assert streamed.shape == tuple(whole.shape)
        assert np.abs(streamed - whole.numpy()).max() <= 1e-4


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_pipelined_speech_steps_on_cuda_are_the_plain_steps(cuda_graphs: bool) -> None:
    """``pipelined`` on CUDA (the codes read back through an event in the next
    call, the inputs from pinned memory, the codec on a stream of its own): a
    crowd joining apart, sampled with the repetition-aware redraw, draws the
    plain steps' codes and streams the one-shot decode of them."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda")
    results = []
    for pipelined in (False, True):
        engine = HiggsEngine(
            loaded, name="tiny-higgs", cuda_graphs=cuda_graphs, pipelined=pipelined
        )
        assert (engine._codec_place.stream is not None) == pipelined
        jobs = _speech_jobs(engine, 4)
        audio = step_together(engine, jobs, (0, 0, 4, 9))
        results.append((engine, jobs, audio))
    (plain, plain_jobs, _), (engine, jobs, audio) = results
    for ours, theirs in zip(jobs, plain_jobs, strict=True):
        codes = engine.codes_of(ours)
        assert torch.equal(codes, plain.codes_of(theirs))
        streamed = np.concatenate(audio[ours.request.request_id])[:, 0]
        with torch.no_grad():
            whole = engine.codec.decode(codes.cuda()).audio_values[0, 0].float().cpu().numpy()
        assert streamed.shape == whole.shape
        assert np.abs(streamed - whole).max() <= 1e-3


def test_the_speech_rules_on_cuda_are_the_cpus() -> None:
    """The rules read and moved on by torch's operations on CUDA (as a recorded
    step runs them) give what the CPU's steps give (the row kernel's, where it
    is built), for rows in every state."""
    on_cpu = random_rules(4, 64, 65, 20)
    for theirs, ours in zip(on_cpu, random_rules(4, 64, 65, 20, device="cuda"), strict=True):
        results = []
        for rules, rows, window, ras_len, stepped, tokens in (theirs, ours):
            forced, recent = rules.forced(rows, ras_len, window)
            rules.take(rows, stepped, tokens)
            results.append([forced.cpu(), recent.cpu(), rules.state.cpu()])
        for cpu, cuda in zip(*results, strict=True):
            assert torch.equal(cuda, cpu)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_pipelined_speech_step_waits_for_nothing_on_cuda(cuda_graphs: bool) -> None:
    """A pipelined step's host part runs while the step it launched computes;
    under ``torch.cuda``'s sync debug mode (an error where anything waits for
    the device) a crowd's steps, warmed up, wait for nothing but the last
    step's codes (an event) and the codec's audio (on its own stream), through
    requests joining apart,
    prompts fed in pieces under a time budget, a dialogue's next chunks
    opened, beginnings kept (their finiteness known later) and copied. The
    codes still equal the plain steps'."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs
    from wavecast.server.engines.pipelining import Launched

    loaded = load_higgs("tiny-higgs", None, "cuda")
    codes = []
    for pipelined in (False, True):
        engine = HiggsEngine(
            loaded,
            name="tiny-higgs",
            cuda_graphs=cuda_graphs,
            pipelined=pipelined,
            prefill_chunk=24,
            prefill_budget_ms=5.0,
        )
        engine.warm_up()
        jobs = _speech_jobs(engine, 6)
        if pipelined:
            exempt = [(engine, "_decode_due"), (Launched, "wait")]
            with cuda_syncs_fail_in(engine, "step", exempt):
                step_together(engine, jobs, (0, 0, 2, 5, 9, 14))
        else:
            step_together(engine, jobs, (0, 0, 2, 5, 9, 14))
        codes.append([engine.codes_of(job) for job in jobs])
    for plain, piped in zip(*codes, strict=True):
        assert torch.equal(piped, plain)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_speech_stream_picked_up_from_its_codes_on_cuda_goes_on_as_it_went(
    cuda_graphs: bool,
) -> None:
    """In float32 (in bfloat16 the known rows' prefill rounds otherwise than the
    steps that drew them did, and a sampled stream may take another turn after
    the cut), pipelined, eagerly and replayed as graphs: a dialogue picked up
    within its second chunk draws the rows the whole run drew after the known
    ones, and streams its audio."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda", dtype=torch.float32)
    engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs, pipelined=True)
    text = "[SPEAKER0] Hi.\n[SPEAKER1] Hey!\n[SPEAKER0] Bye."
    given = {"seed": 3, "max_new_tokens": 20, "chunk_method": "speaker", "temperature": 1.0}
    params = resolve_params(engine.info.params, given)

    def run(job: Any) -> tuple[list[list[int]], np.ndarray]:
        """A job alone to its end: the rows its outputs sent, its audio."""
        rows, audio = [], []
        while True:
            out = engine.step([job])[0]
            rows += out.codes or []
            audio += [] if out.audio is None else [out.audio]
            if out.done:
                return rows, np.concatenate(audio)[:, 0]

    whole_job = engine.prepare(EngineRequest("w", text, params))
    rows, heard = run(whole_job)
    assert len(rows) == 60
    known = np.asarray(rows[:27], "<u2").tobytes()
    job = engine.prepare(EngineRequest("p", text, params, resume_codes=known))
    after, streamed = run(job)
    assert after == rows[27:]
    assert torch.equal(engine.codes_of(job), engine.codes_of(whole_job))
    assert streamed.shape == heard.shape and np.abs(streamed - heard).max() <= 1e-3


@pytest.mark.parametrize(
    ("cuda_graphs", "pipelined"), [(False, False), (True, False), (True, True)]
)
def test_text_as_it_is_written_on_cuda_makes_the_whole_texts_rows(
    cuda_graphs: bool, pipelined: bool
) -> None:
    """In float32, eagerly and replayed as graphs, plain and pipelined: a text
    sent a sentence at a time, each once the stream waits for it (its row kept
    and out of the steps meanwhile), draws the rows of the whole text given at
    once, and every frame's audio goes out as it waits."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    loaded = load_higgs("tiny-higgs", None, "cuda", dtype=torch.float32)
    engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs, pipelined=pipelined)
    engine.warm_up(2)
    sentences = ["One two three.", "Four five six.", "Seven eight nine."]
    given = {"seed": 5, "max_new_tokens": 30, "chunk_method": "word", "chunk_max_word_num": 3}
    params = resolve_params(engine.info.params, given)

    def until_waiting_or_done(job: Any, rows: list[Any], audio: list[int]) -> bool:
        while not engine.waiting(job):
            out = engine.step([job])[0]
            rows += out.codes or []
            audio[0] += 0 if out.audio is None else len(out.audio)
            if out.done:
                return True
        return False

    whole = engine.prepare(EngineRequest("w", " ".join(sentences), params))
    expected: list[Any] = []
    assert until_waiting_or_done(whole, expected, [0])
    engine.finish(whole)
    job = engine.prepare(EngineRequest("t", sentences[0] + " ", params, text_stream=True))
    rows: list[Any] = []
    heard = [0]
    for i, sentence in enumerate(sentences[1:]):
        assert not until_waiting_or_done(job, rows, heard)
        assert heard[0] == job.state.produced * engine.hop  # (none held back)
        engine.add_text(job, sentence, flush=i == 0, end=i == 1)
    assert until_waiting_or_done(job, rows, heard)
    engine.finish(job)
    assert rows == expected
