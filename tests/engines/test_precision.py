"""The generators in 16-bit formats (``--dtype``), on the CPU with the tiny models.

CUDA runs them so by default (HiggsAudio in bfloat16, MusicGen in float16 under
autocast); here the same code paths run on a CPU in bfloat16: our decoders
against the libraries' own forward in the same format, the codecs still in
float32 (streamed audio equal to a one-shot float32 decode), the caches in the
format (half the memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import collect_audio, model_forward, voiced_prompt

from wavecast.protocol import resolve_params
from wavecast.server.engines import ModelLoadError, load_engines
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.higgs.decoder import HiggsDecoder
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.kv import StaticKV
from wavecast.server.engines.precision import model_dtype

K = 4  # tiny-higgs codebooks
BOS = 64


@pytest.fixture(scope="module")
def speech16() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu", torch.bfloat16)


@pytest.fixture(scope="module")
def music16() -> Any:
    return load_engines(["tiny-musicgen"], "cpu", dtype="bfloat16")["tiny-musicgen"]


def test_the_format_each_choice_means() -> None:
    assert model_dtype("auto", "cpu") is None  # as the family's loader loads it
    assert model_dtype("auto", "cuda:1") is None
    assert model_dtype("float32", "cuda") == torch.float32
    assert model_dtype("bfloat16", "cpu") == torch.bfloat16
    assert model_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelLoadError, match=r"float64.*auto, float32, bfloat16, float16"):
        model_dtype("float64", "cpu")


def test_a_step_writes_the_same_either_way() -> None:
    """A decode step's keys and values go in with ``scatter_`` (float32) or with
    ``index_put_`` (16-bit on a CPU, where ``scatter_`` is thousands of times
    slower): the same places, the same values."""
    positions = torch.tensor([3, 0, 7])  # three of the table's four rows step
    key, value = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    caches = {}
    for dtype in (torch.float32, torch.bfloat16):
        kv = StaticKV(3, 2, 8, rows=4, length=10, device="cpu", dtype=dtype)
        kv.step_writer(positions)(1, key, value)
        caches[dtype] = kv
    full, half = caches[torch.float32], caches[torch.bfloat16]
    assert torch.equal(half.k, full.k.to(torch.bfloat16))
    assert torch.equal(half.v, full.v.to(torch.bfloat16))
    assert torch.equal(full.k[1, torch.arange(3), :, positions], key[:, :, 0])
    assert torch.equal(full.v[1, torch.arange(3), :, positions], value[:, :, 0])
    assert int(full.k.count_nonzero()) == int(full.v.count_nonzero()) == 3 * 2 * 8


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


# -- speech ------------------------------------------------------------------------


def test_speech_weights_and_cache_in_bfloat16(speech16: HiggsModel) -> None:
    model = speech16.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The rotary frequencies stay float32, as transformers loads them (a 16-bit
    # copy would turn positions a thousand on by radians).
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in speech16.codec.parameters()} == {torch.float32}
    engine = HiggsEngine(speech16, name="tiny-higgs")
    assert (engine.info.dtype, engine.info.device) == ("bfloat16", "cpu")
    assert engine.decoder.kv.k.dtype == engine.decoder.kv.v.dtype == torch.bfloat16
    full = HiggsDecoder(load_higgs("tiny-higgs", None, "cpu").model, rows=4, length=256)
    half = HiggsDecoder(model, rows=4, length=256)
    assert half.bytes_for(rows=8, length=512) * 2 == full.bytes_for(rows=8, length=512)


def test_speech_decoder_in_bfloat16_matches_the_model_forward(speech16: HiggsModel) -> None:
    """Our decoder against transformers' own forward, both in bfloat16: within half
    of what the format itself costs (the same forward in float32 against it), so a
    part of ours computed in a coarser format than transformers' would show."""
    model = speech16.model
    exact = load_higgs("tiny-higgs", None, "cpu").model
    ids, audio, frames = voiced_prompt(HiggsEngine(speech16, name="tiny-higgs"), K, BOS)
    reference = model_forward(model, ids, audio, frames)
    full = model_forward(exact, ids, audio, frames)
    decoder = HiggsDecoder(model, rows=2, length=512)
    tokens = ids[0].numpy()
    is_audio = (tokens == model.config.audio_token_id) | (
        tokens == model.config.audio_delay_token_id
    )
    ours = [decoder.prefill([1], ids, audio[0], is_audio[None], 0)[0]]
    for frame in frames:
        codes_in = torch.randint(0, BOS, (2, K))
        codes_in[1] = frame
        ours.append(decoder.decode(codes_in, torch.tensor([False, True]), span=len(tokens) + 8)[1])
    for step, (got, want, exact_logits) in enumerate(zip(ours, reference, full, strict=True)):
        assert got.dtype == torch.bfloat16
        cost = relative_error(want, exact_logits)  # what bfloat16 itself costs
        assert 0 < cost < 0.05, step
        # (Here they are equal bit for bit; another CPU's kernels may round apart.)
        assert relative_error(got, want) <= cost / 2, step


def test_speech_in_bfloat16_streams_its_codes_exactly(speech16: HiggsModel) -> None:
    """The codec decodes in float32 whatever the generator's format: the stream is a
    one-shot decode of the request's codes."""
    engine = HiggsEngine(speech16, name="tiny-higgs")
    params = {spec.name: spec.default for spec in engine.info.params}
    params.update(seed=3, max_new_tokens=40)
    job = engine.prepare(EngineRequest("r", "One two three, four five.", params))
    streamed = collect_audio(engine, job)[:, 0]
    codes = engine.codes_of(job)
    assert codes.shape == (1, K, 40 - K)
    whole = engine.codec.decode(codes).audio_values[0, 0].numpy()
    assert streamed.shape == whole.shape
    assert np.abs(whole).max() > 1e-3
    assert np.abs(streamed - whole).max() <= 1e-4


# -- music -------------------------------------------------------------------------


def music_run(engine: Any, seed: int, **params: Any) -> tuple[Any, list[np.ndarray], torch.Tensor]:
    """A request stepped alone to its end: the job, its audio, its first step's logits."""
    resolved = resolve_params(engine.info.params, {"duration": 1.5, "seed": seed, **params})
    job = engine.prepare(EngineRequest("m", "warm strings", resolved))
    seen: list[torch.Tensor] = []
    engine.logits_observer = lambda rows: seen.append(rows["m"].clone())
    chunks = []
    try:
        while True:
            out = engine.step([job])[0]
            if out.audio is not None:
                chunks.append(out.audio)
            if out.done:
                break
    finally:
        engine.logits_observer = None
    return job, chunks, seen[0]


def test_music_in_bfloat16(engine: Any, music16: Any) -> None:
    """As audiocraft runs MusicGen on CUDA in float16: the transformer's weights in
    the format and the steps under autocast to it, the conditioners' and the
    codec's weights in float32. The first step's logits follow float32's as closely
    as the format allows; the stream is a one-shot float32 decode of its codes."""
    assert (music16.info.dtype, music16.info.device) == ("bfloat16", "cpu")
    assert engine.info.dtype == "float32"
    lm = music16.lm
    assert {p.dtype for p in lm.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lm.condition_provider.parameters()} == {torch.float32}
    assert {p.dtype for p in music16.model.compression_model.parameters()} == {torch.float32}
    assert music16.decoder.kv.k.dtype == torch.bfloat16
    assert music16.codec_streams.incremental is not None  # exact enough to stream

    _, _, exact = music_run(engine, seed=5)
    job, chunks, logits = music_run(music16, seed=5)
    # (The steps' autocast nests, a newcomer's conditioning inside a step: each
    # context is its own, and leaves autocast as it found it.)
    assert not torch.is_autocast_enabled("cpu")
    assert 0 < relative_error(logits, exact) < 0.05
    streamed = np.concatenate(chunks)
    codes = music16.codes_of(job)
    assert codes.shape == (1, 4, 75)
    full = music16.model.compression_model.decode(codes, None)[0].transpose(0, 1).numpy()
    assert streamed.shape == full.shape
    assert np.abs(streamed - full).max() <= 1e-4
    assert len(chunks) > 3
