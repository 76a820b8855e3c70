"""Codec decoders run incrementally: every stream's chunks, decoded from its own
state and batched with other streams', join into the one-shot decode of its codes."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from helpers import count_codec_calls, step_together
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from wavecast.server.engines import codec_incremental, codec_stream, rowkernel
from wavecast.server.engines.base import StepOutput
from wavecast.server.engines.codec_decoders import for_serving
from wavecast.server.engines.codec_incremental import (
    Forms,
    IncrementalCodec,
    _Conv,
    _ConvTranspose,
    _Formed,
    _Pointwise,
    _Residual,
    checked,
    incremental,
)
from wavecast.server.engines.codec_stream import (
    CodecStreams,
    IncrementalStream,
    StreamGeometry,
    decode_batched,
)
from wavecast.server.engines.higgs.loading import load_higgs
from wavecast.server.engines.musicgen.engine import MusicGenEngine, StreamSettings
from wavecast.server.engines.testing.musicgen import _TINY_CFG, build_tiny_musicgen

Decode = Callable[[torch.Tensor], torch.Tensor]


def _encodec() -> tuple[torch.nn.Module, Decode, int]:
    codec = build_tiny_musicgen(seed=4).compression_model
    for_serving(codec.decoder)
    return codec, lambda codes: codec.decode(codes, None), 4


def _stereo() -> tuple[torch.nn.Module, Decode, int]:
    codec = build_tiny_musicgen(seed=4, stereo=True).compression_model
    for_serving(codec.model.decoder)
    return codec, lambda codes: codec.decode(codes, None), 8


def _causal_encodec() -> tuple[torch.nn.Module, Decode, int]:
    from audiocraft.models import builders

    cfg = OmegaConf.create(_TINY_CFG)
    cfg.seanet.causal = cfg.encodec.causal = True
    cfg.seanet.true_skip = False  # (a convolution on the skip path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        codec = builders.get_compression_model(cfg).eval()
    for_serving(codec.decoder)
    return codec, lambda codes: codec.decode(codes, None), 4


def _dac() -> tuple[torch.nn.Module, Decode, int]:
    codec = load_higgs("tiny-higgs", None, "cpu").codec
    for_serving(codec.acoustic_decoder)
    return codec, lambda codes: codec.decode(codes).audio_values, 4


CODECS = {"encodec": _encodec, "stereo": _stereo, "causal": _causal_encodec, "dac": _dac}


@pytest.fixture(scope="module", params=list(CODECS))
def codec(request: Any) -> tuple[IncrementalCodec, Decode, int]:
    model, decode, codebooks = CODECS[request.param]()
    built = incremental(model)
    assert built is not None, request.param
    return built, decode, codebooks


def _codes(streams: int, codebooks: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (streams, codebooks, frames), generator=gen)


def test_streams_in_pieces_decoded_together_equal_the_one_shot_decode(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    """Four streams: two pushed in the same pieces (their chunks share calls), two
    in pieces of their own, one of them primed with a prompt."""
    inc, decode, k = codec
    frames, prompt = 120, 30
    codes = _codes(4, k, prompt + frames, seed=1)
    streams = [
        IncrementalStream(inc, torch.zeros(()), first_frames=1, chunk_frames=c, left_context=left)
        for c, left in ((5, 0), (5, 0), (3, 0), (7, prompt))
    ]
    streams[3].prime(codes[3:, :, :prompt])
    gen = torch.Generator().manual_seed(2)
    sizes = [torch.randint(1, 6, (frames,), generator=gen).tolist() for _ in range(3)]
    sizes.insert(1, sizes[0])
    at = [prompt] * 4
    audio: list[list[np.ndarray]] = [[] for _ in streams]
    shared = 0
    for step in range(frames):
        due = []
        for i, stream in enumerate(streams):
            if at[i] >= prompt + frames:
                continue
            n = sizes[i][step]
            plan = stream.plan_push(codes[i : i + 1, :, at[i] : at[i] + n])
            at[i] += n
            if plan is not None:
                due.append((i, plan))
        wavs = decode_batched(decode, [plan for _, plan in due])
        keys = [plan.state.key for _, plan in due if plan.state is not None]
        shared += len(keys) - len(set(keys))
        for (i, plan), wav in zip(due, wavs, strict=True):
            audio[i].append(streams[i].complete(plan, wav))
    assert shared >= 5  # the first two streams' chunks went in the same calls
    hop = inc.hop
    for i, stream in enumerate(streams):
        tail = stream.flush()  # (None: nothing owed, as a causal decoder may have)
        assert stream.flush() is None
        streamed = np.concatenate([*audio[i], *([] if tail is None else [tail])])
        start = prompt if i < 3 else 0
        whole = decode(codes[i : i + 1, :, start:])[0].transpose(0, 1).numpy()
        if i == 3:
            whole = whole[prompt * hop :]  # the prompt primes the decoder, unheard
        assert streamed.shape == whole.shape == (frames * hop, whole.shape[1])
        peak = np.abs(whole).max()
        assert peak > 0 and np.abs(streamed - whole).max() <= 1e-5 * peak, i


def _in_pieces(inc: IncrementalCodec, codes: torch.Tensor, pieces: tuple[int, ...]) -> torch.Tensor:
    """The audio of every stream of ``codes`` ``[B, K, T]`` decoded from fresh
    states in ``pieces`` frames at a time, then the rest, final."""
    states = [inc.start(torch.zeros(())) for _ in range(codes.shape[0])]
    out, at = [], 0
    for n in pieces:
        out.append(inc.decode(codes[:, :, at : at + n], states))
        at += n
    out.append(inc.decode(codes[:, :, at:], states, final=True))
    return torch.cat(out, -1)


def test_activations_written_into_the_next_convolutions_input_change_no_sample(
    codec: tuple[IncrementalCodec, Decode, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An activation before a convolution with a buffer writes its samples
    straight into the convolution's padded input (by the row kernel, where it
    is built): two streams' chunks in uneven pieces, the last one final, are
    the same bits as with every activation making its own tensor, joined."""
    inc, _, k = codec
    codes = _codes(2, k, 40, seed=5)
    pieces = (1, inc.lookahead + 1, 3, 10)

    def streamed() -> torch.Tensor:
        return _in_pieces(inc, codes, pieces)

    written = []
    into = _Pointwise.into

    def counted(self: _Pointwise, x: torch.Tensor, out: torch.Tensor) -> bool:
        done = into(self, x, out)
        written.append(done)
        return done

    monkeypatch.setattr(_Pointwise, "into", counted)
    fused = streamed()
    if isinstance(rowkernel.load(), rowkernel.RowKernel):
        assert written and all(written)  # (every such pair, every call)
    monkeypatch.setattr(_Pointwise, "into", lambda self, x, out: False)
    assert torch.equal(fused, streamed())


def test_residual_joins_by_the_row_kernel_change_no_sample(
    codec: tuple[IncrementalCodec, Decode, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A residual block's output and its waiting samples by the row kernel
    (``RowKernel.join_add``, one pass) are the same bits as torch's joins and
    adds: two streams' chunks in uneven pieces (fewer samples than wait, and
    more), the last one final."""
    inc, _, k = codec
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        pytest.skip(f"no row kernel here: {kernel}")
    codes = _codes(2, k, 40, seed=6)
    pieces = (1, 1, inc.lookahead + 1, 3, 10)
    residuals = [op for op in inc._ops if isinstance(op, _Residual)]
    assert residuals

    def streamed(join: rowkernel.RowKernel | None) -> torch.Tensor:
        for op in residuals:
            monkeypatch.setattr(op, "kernel", join)
        return _in_pieces(inc, codes, pieces)

    joins = []
    join_add = rowkernel.RowKernel.join_add

    def counted(self: rowkernel.RowKernel, *args: torch.Tensor) -> Any:
        done = join_add(self, *args)
        joins.append(done is not None)
        return done

    monkeypatch.setattr(rowkernel.RowKernel, "join_add", counted)
    joined = streamed(kernel)
    assert joins and all(joins)  # (every block, every call)
    assert torch.equal(joined, streamed(None))


@pytest.mark.parametrize(("name", "count"), [("dac", 15), ("encodec", 4), ("stereo", 4)])
def test_residual_units_fused_change_no_sample(
    name: str, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Residual units fused (``RowKernel.residual_unit``: DAC's with Snake,
    EnCodec's with ELU and half the channels inside, stereo's two rows a
    stream) decode the same bits as their layers by the row kernel one after
    the other: two streams' chunks in uneven pieces, the last one final. A
    unit runs fused once its layers are past their start-up samples, the
    stream's end included; the streams still decode the one-shot decode."""
    kernel = _kernel()
    model, decode, k = CODECS[name]()
    inc = incremental(model)
    assert inc is not None
    for op in _formed(inc, kernel):
        op.one = op.many = "kernel"
    units = [op for op in inc._ops if isinstance(op, _Residual)]
    for op in units:
        op.kernel = kernel
    assert len(units) == count and all(op.prepare() for op in units)
    fused_calls: list[bool] = []
    finals: list[bool] = []
    fused = _Residual.fused

    def counted(
        self: _Residual, x: torch.Tensor, state: Any, final: bool = False
    ) -> torch.Tensor | None:
        out = fused(self, x, state, final)
        fused_calls.append(out is not None)
        if final:
            finals.append(out is not None)
        return out

    monkeypatch.setattr(_Residual, "fused", counted)
    codes = _codes(2, k, 60, seed=8)
    pieces = (1, 1, inc.lookahead + 1, 3, 10, 2)

    def streamed(on: bool) -> torch.Tensor:
        for op in units:
            op.one = op.many = on
        return _in_pieces(inc, codes, pieces)

    together = streamed(True)
    assert any(fused_calls) and not all(fused_calls)  # (the start-up runs the layers)
    assert finals and all(finals)
    assert torch.equal(together, streamed(False))
    for op in units:
        op.one = op.many = True
    assert checked(inc, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5
    inc.direct_forms()
    assert not any(op.one or op.many for op in units)


def test_a_residual_block_with_a_layer_on_its_skip_path_runs_its_layers() -> None:
    """A block whose skip path has a layer of its own (a SEANet without
    ``true_skip``) has no fused form."""
    _kernel()
    model, _, _ = _causal_encodec()
    inc = incremental(model)
    assert inc is not None
    units = [op for op in inc._ops if isinstance(op, _Residual)]
    assert units and all(op.shortcut is not None for op in units)
    forms = inc.choose_forms(torch.zeros(()), 2, 4, 8)
    assert forms.units == 0 and not any(op.one or op.many for op in units)


def test_each_residual_unit_is_fused_where_measured_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``choose_forms`` times each residual unit fused against its layers (their
    forms chosen), for one stream's calls and for more: fused where that takes
    under 95% of the layers' time (the times stood in for here: the real ones
    depend on the machine); the choice reaches ``Forms``. Without the row
    kernel, nothing is fused."""
    _kernel()  # (skips where the row kernel's library is not built)
    model, _, k = _dac()
    inc = incremental(model)
    assert inc is not None
    units = [op for op in inc._ops if isinstance(op, _Residual)]
    race = codec_incremental._race

    def times(forms: Any, x: torch.Tensor, clock: Any) -> list[float]:
        names = [form.__name__ for form in forms]
        if names != ["fused", "layers"]:
            return race(forms, x, clock)  # (the convolutions: their own times)
        (unit,) = {
            id(cell.cell_contents)
            for form in forms
            for cell in form.__closure__ or ()
            if isinstance(cell.cell_contents, _Residual)
        }
        index = [id(op) for op in units].index(unit)
        one = x.shape[0] == 1
        # Even units: fused much faster for one stream; every third: for more;
        # unit 1: only 4% faster (not enough).
        if index == 1:
            return [0.96, 1.0]
        if (index % 2 == 0) if one else (index % 3 == 0):
            return [0.5, 1.0]
        return [1.2, 1.0]

    monkeypatch.setattr(codec_incremental, "_race", times)
    forms = inc.choose_forms(torch.zeros(()), 4, k, 8)
    for index, op in enumerate(units):
        assert op.one == (index % 2 == 0 and index != 1), index
        assert op.many == (index % 3 == 0 and index != 1), index
    assert (forms.units, forms.fused_one, forms.fused_many) == (15, 8, 5)
    monkeypatch.setattr(rowkernel, "built", lambda: None)
    forms = inc.choose_forms(torch.zeros(()), 4, k, 8)
    assert (forms.units, forms.fused_one, forms.fused_many) == (0, 0, 0)
    assert not any(op.one or op.many for op in units)


def test_the_speech_codecs_input_comes_from_code_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """HiggsAudio v2's codec input of a frame is the sum of its codes' rows of
    ``code_tables`` (each codebook through its projection and ``fc2``): the
    library's lookups, products and sums to float rounding, without calling
    them; tables too large for ``MOST_TABLE_BYTES`` leave the library's, and
    either way the streams decode the one-shot decode."""
    model, decode, k = _dac()
    tables = codec_incremental.code_tables(model)
    assert tables is not None and tables.shape[:2] == (k, 64)
    codes = _codes(3, k, 9, seed=11)
    quantized = model.quantizer.decode(codes.transpose(0, 1))
    library = model.fc2(quantized.transpose(1, 2)).transpose(1, 2)
    inc = incremental(model)
    assert inc is not None

    def refused(*args: Any) -> None:
        raise AssertionError("the library's quantizer was called")

    with monkeypatch.context() as patched:
        patched.setattr(model.quantizer, "decode", refused)
        tabled = inc._embed(codes)
    assert checked(inc, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5
    assert tabled.shape == library.shape
    assert (tabled - library).abs().max() <= 1e-6 * library.abs().max()
    monkeypatch.setattr(codec_incremental, "MOST_TABLE_BYTES", tables.numel() * 4 - 1)
    assert codec_incremental.code_tables(model) is None
    plain = incremental(model)
    assert plain is not None
    assert torch.equal(plain._embed(codes), library)
    assert checked(plain, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5


def test_a_streams_state_stays_the_same_size(codec: tuple[IncrementalCodec, Decode, int]) -> None:
    inc, _, k = codec
    state = inc.start(torch.zeros(()))
    codes = _codes(1, k, 10, seed=3)
    keys = []
    for _ in range(30):
        inc.decode(codes, [state])
        keys.append(state.key)
    assert len(set(keys[2:])) == 1  # after the start's padding, a fixed shape
    size = sum(t.numel() for s in state.slots if s is not None for t in s.tensors)
    assert size < 200 * 10 * inc.hop  # bounded by the layers' context, not the stream


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    peak = float(b.abs().max())
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * max(peak, 1e-6)


def test_streams_regrouped_from_call_to_call_decode_as_each_alone(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    """Five streams decoded in changing company (all again, reversed, split in
    two calls, a pair from two earlier calls, all from three): each one's audio
    is what it makes decoded alone. A call of the streams the last one decoded,
    in the same order, takes their stacked states as they are."""
    inc, _, k = codec
    like = torch.zeros(())
    together = [inc.start(like) for _ in range(5)]
    alone = [inc.start(like) for _ in range(5)]
    codes = _codes(5, k, 200, seed=9)
    at = [0] * 5
    calls = [
        [[0, 1, 2, 3, 4]],
        [[0, 1, 2, 3, 4]],
        [[4, 3, 2, 1, 0]],
        [[0, 2], [1, 3, 4]],
        [[1, 0], [3], [2, 4]],
        [[0, 1, 2, 3, 4]],
    ]
    for step, groups in enumerate(calls):
        n = inc.lookahead + 2 if step == 0 else 3
        final = step == len(calls) - 1
        if step in (1, 5):
            stack = together[0].stack
            reused = [s for s in inc._gather(together) if s is not None]
            own = [s for s in stack.slots if s is not None]
            same = all(a.tensors[0] is b.tensors[0] for a, b in zip(reused, own, strict=True))
            assert same == (step == 1)  # (step 5 gathers from three stacks)
        for group in groups:
            piece = torch.cat([codes[i : i + 1, :, at[i] : at[i] + n] for i in group])
            wav = inc.decode(piece, [together[i] for i in group], final=final)
            for row, i in enumerate(group):
                solo = inc.decode(codes[i : i + 1, :, at[i] : at[i] + n], [alone[i]], final=final)
                assert _close(wav[row : row + 1], solo), (step, i)
        for i in range(5):
            at[i] += n
    assert len({s.stack.key for s in together}) == 1


@pytest.mark.parametrize("most", [32, 2])
def test_recorded_calls_decode_as_the_calls_themselves(
    codec: tuple[IncrementalCodec, Decode, int], most: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``record_calls`` (on CUDA, a steady call of each shape recorded as a CUDA
    graph; here its buffers run eagerly): streams in changing company (the same
    ones again, reordered, split, regrouped, frames of another size, their
    end) get the audio of the decoder's own calls, bit for bit. A call of the
    streams the last one of its shape decoded, in order, takes the states
    where the recording left them; a call of others first gives the streams
    still there a copy of their own (the pairs of steps 6 to 8). With room for
    two shapes only, the ones used last are kept and the rest recorded again."""
    monkeypatch.setattr(codec_incremental, "MOST_RECORDED", most)
    inc, _, k = codec
    recorded = IncrementalCodec(inc._root, inc._embed, hop=inc.hop, rows=inc.rows)
    recorded.record_calls(record=False)
    like = torch.zeros(())
    plain = [inc.start(like) for _ in range(5)]
    ours = [recorded.start(like) for _ in range(5)]
    codes = _codes(5, k, 400, seed=11)
    at = [0] * 5
    every = [0, 1, 2, 3, 4]
    calls = [
        (inc.lookahead + 2, [every]),
        (3, [every]),
        (3, [every]),
        (3, [every]),
        (3, [[4, 3, 2, 1, 0]]),
        (4, [[0, 2], [1, 3, 4]]),
        (4, [[1, 3], [0, 2, 4]]),
        (4, [[0, 2]]),
        (3, [[1, 0], [3], [2, 4]]),
        (3, [every]),
        (3, [every]),
    ]
    for step, (n, groups) in enumerate(calls):
        final = step == len(calls) - 1
        for group in groups:
            piece = torch.cat([codes[i : i + 1, :, at[i] : at[i] + n] for i in group])
            want = inc.decode(piece, [plain[i] for i in group], final=final)
            got = recorded.decode(piece, [ours[i] for i in group], final=final)
            assert torch.equal(got, want), (step, group)
            for i in group:
                at[i] += n
        assert recorded.recorded <= most
        if step == 3:  # the same streams as the call before, of the same shape
            assert recorded._recorded is not None
            entry = recorded._recorded[(ours[0].key, 5, n)]
            assert entry is not None
            held = [s for s in entry.inputs if s is not None]
            own = [s for s in ours[0].stack.slots if s is not None]
            assert all(a.tensors[0] is b.tensors[0] for a, b in zip(held, own, strict=True))
    assert min(most, 4) <= recorded.recorded <= most


def test_a_call_that_fails_leaves_the_streams_states_as_they_were(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    """A layer failing half-way through a call of the streams last decoded
    together (their stacked states taken as they are) changes none of their
    states: decoded again, they carry on as streams that never saw the call."""
    inc, _, k = codec
    like = torch.zeros(())
    states = [inc.start(like) for _ in range(3)]
    twins = [inc.start(like) for _ in range(3)]
    codes = _codes(3, k, 40, seed=10)
    n = inc.lookahead + 2
    for group in (states, twins):
        inc.decode(codes[:, :, :n], group)
    last = inc._ops[-1]

    def fail(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("the last layer failed")

    last.run = fail  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="last layer"):
            inc.decode(codes[:, :, n : n + 4], states)
    finally:
        del last.run
    again = inc.decode(codes[:, :, n : n + 4], states)
    assert torch.equal(again, inc.decode(codes[:, :, n : n + 4], twins))


def test_a_failed_codec_call_fails_only_its_own_streams(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    """A step's due chunks in two calls (two window shapes: the third stream's
    first chunk comes after two frames of context), the second failing: its
    stream ends with an error, and the first call's streams keep the audio that
    call made (not decoded again from the states it had moved on)."""
    inc, _, k = codec
    like = torch.zeros(())
    codes = _codes(3, k, 40, seed=11)
    n = inc.lookahead + 3
    primed = 2

    def pushed() -> list[tuple[IncrementalStream, Any]]:
        out = []
        for i in range(3):
            stream = IncrementalStream(inc, like, first_frames=1)
            given = codes[i : i + 1]
            if i == 2:
                stream.prime(given[:, :, :primed])
                given = given[:, :, primed:]
            out.append((stream, stream.plan_push(given[:, :, :n])))
        return out

    alone = [stream.complete_alone(plan) for stream, plan in pushed()]
    run = inc.decode

    def failing(batch: torch.Tensor, states: Any, **kwargs: Any) -> torch.Tensor:
        if batch.shape[-1] == primed + inc.lookahead + 1:
            raise RuntimeError("this call fails")
        return run(batch, states, **kwargs)

    inc.decode = failing  # type: ignore[method-assign]
    try:
        outputs = [StepOutput(audio=None, fraction=0.0, seconds=0.0) for _ in range(3)]
        due = [(out, stream, plan) for out, (stream, plan) in zip(outputs, pushed(), strict=True)]
        codec_stream.complete_due(inc.decode, due)
    finally:
        del inc.decode
    assert outputs[2].error is not None and outputs[2].done
    for output, solo in zip(outputs[:2], alone[:2], strict=True):
        assert output.error is None and output.audio is not None
        assert np.allclose(output.audio, solo, atol=1e-6)


def test_the_first_audio_waits_only_for_the_decoders_lookahead(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    inc, _, k = codec
    stream = IncrementalStream(inc, torch.zeros(()), first_frames=2, chunk_frames=4)
    codes = _codes(1, k, 40, seed=4)
    for n in range(1, 40):
        plan = stream.plan_push(codes[..., n - 1 : n])
        if plan is not None:
            break
    assert n == 2 + inc.lookahead
    chunk = stream.complete_alone(plan)
    assert 2 * inc.hop <= len(chunk) < 3 * inc.hop


def test_a_misread_layer_is_caught_at_load(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer read with its padding off by one sample strays by far more than
    rounding: the engine's streams decode windows instead, and say so."""
    model, decode, k = _encodec()
    good = incremental(model)
    assert good is not None
    assert checked(good, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5

    def misread(codec: Any) -> IncrementalCodec | None:
        built = incremental(codec)
        assert built is not None
        conv = next(op for op in built._ops if isinstance(op, _Conv) and op.right)
        conv.left, conv.right = conv.left + 1, conv.right - 1  # one sample late
        return built

    monkeypatch.setattr(codec_stream, "incremental", misread)
    geometry = StreamGeometry(25, 4, 1, 10, 50, 50.0)
    with caplog.at_level(logging.WARNING):
        streams = CodecStreams(
            model, decode, torch.zeros(()), geometry, hop=640, codebooks=k, cardinality=64, name="m"
        )
    assert streams.incremental is None
    assert "windows" in caplog.text
    assert not isinstance(streams.stream(), IncrementalStream)


def test_an_incremental_decoder_that_fails_its_check_gives_windows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, decode, k = _encodec()

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("a kernel this device lacks")

    built = incremental(model)
    assert built is not None
    monkeypatch.setattr(built, "decode", broken)
    monkeypatch.setattr(codec_stream, "incremental", lambda codec: built)
    geometry = StreamGeometry(25, 4, 1, 10, 50, 50.0)
    with caplog.at_level(logging.WARNING):
        streams = CodecStreams(
            model, decode, torch.zeros(()), geometry, hop=640, codebooks=k, cardinality=64, name="m"
        )
    assert streams.incremental is None and "failed its check" in caplog.text


def test_a_codec_it_cannot_run_incrementally_streams_windows() -> None:
    """Reflect padding reads samples from the far side of a chunk's end: no
    incremental decoder; the engine decodes windows, and the audio is still the
    one-shot decode's."""
    model = build_tiny_musicgen(seed=6)
    for module in model.compression_model.decoder.modules():
        if type(module).__name__ == "StreamableConv1d":
            module.pad_mode = "reflect"
    assert incremental(model.compression_model) is None
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    assert engine.codec_streams.incremental is None
    _windows_stream_the_one_shot_decode(engine)


def test_windows_when_asked_stream_the_one_shot_decode_too() -> None:
    model = build_tiny_musicgen(seed=6)
    settings = StreamSettings(codec_windows=True)
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True, stream=settings)
    assert engine.codec_streams.incremental is None
    _windows_stream_the_one_shot_decode(engine)


def _windows_stream_the_one_shot_decode(engine: MusicGenEngine) -> None:
    from wavecast.protocol import resolve_params
    from wavecast.server.engines.base import EngineRequest

    params = resolve_params(engine.info.params, {"duration": 2.0, "seed": 1})
    job = engine.prepare(EngineRequest("w", "drums", params))
    chunks = []
    while True:
        (out,) = engine.step([job])
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            break
    streamed = np.concatenate(chunks)
    whole = engine.model.compression_model.decode(engine.codes_of(job), None)[0].T.numpy()
    assert len(chunks) > 3 and streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= 1e-4


def test_the_codec_windows_flag_reaches_both_engines() -> None:
    import argparse

    from wavecast.server.cli import add_serve_arguments, config_from_args
    from wavecast.server.engines import load_engines

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert not config_from_args(parser.parse_args([])).models.codec_windows
    config = config_from_args(parser.parse_args(["--codec-windows"]))
    assert config.models.codec_windows
    engines = load_engines(["tiny-musicgen", "tiny-higgs"], "cpu", codec_windows=True)
    for engine in engines.values():
        assert engine.codec_streams.incremental is None, engine.info.name  # type: ignore[attr-defined]
    for engine in load_engines(["tiny-musicgen", "tiny-higgs"], "cpu").values():
        assert engine.codec_streams.incremental is not None, engine.info.name  # type: ignore[attr-defined]


def _crowd(
    engine: Any, model: str, count: int, *, frames: int, speech: str = "Hello there."
) -> list[Any]:
    """``count`` jobs of ``model``: 3 s of calm piano, or ``speech`` in at most
    ``frames`` frames; seeds 0, 1, …"""
    from wavecast.protocol import resolve_params
    from wavecast.server.engines.base import EngineRequest

    long = {"duration": 3.0} if model == "tiny-musicgen" else {"max_new_tokens": frames}
    text = "calm piano" if model == "tiny-musicgen" else speech
    params = engine.info.params
    return [
        engine.prepare(EngineRequest(f"r{i}", text, resolve_params(params, {**long, "seed": i})))
        for i in range(count)
    ]


def _each_the_one_shot_decode(
    engine: Any, model: str, jobs: list[Any], audio: dict[str, list[Any]]
) -> None:
    """Each job's streamed chunks join into the one-shot decode of its codes."""
    for job in jobs:
        streamed = np.concatenate(audio[job.request.request_id])
        codes = engine.codes_of(job)
        if model == "tiny-higgs":
            whole = engine.codec.decode(codes).audio_values[0].T.numpy()
        else:
            whole = engine.model.compression_model.decode(codes, None)[0].T.numpy()
        assert streamed.shape == whole.shape
        assert np.abs(streamed - whole).max() <= 1e-5 * max(1e-3, np.abs(whole).max())


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_streams_that_start_apart_decode_their_chunks_together(model: str) -> None:
    """Four requests joining 3-4 steps apart: after their first chunks, the shared
    cadence has their new frames due on the same steps, so most codec calls carry
    several streams; each stream's audio is still its one-shot decode."""
    from wavecast.server.engines import load_engines

    engine: Any = load_engines([model], "cpu", max_chunk_frames=10, codec_batch=8)[model]
    jobs = _crowd(engine, model, 4, frames=120)
    calls = count_codec_calls(engine)
    audio = step_together(engine, jobs, joins=[0, 3, 7, 10])
    firsts_and_tails = 2 * len(jobs)
    together = sum(1 for rows in calls if rows > 1)
    assert together >= (len(calls) - firsts_and_tails) // 2, calls
    _each_the_one_shot_decode(engine, model, jobs, audio)


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_an_engine_whose_codec_calls_are_recorded_streams_the_same_audio(model: str) -> None:
    """An engine's codec with its steady calls recorded (``record_calls``; here
    eagerly, on the recordings' buffers) in a crowd joining apart, some of its
    streams cancelled: every chunk the same as the plain codec's, bit for bit,
    and each stream's audio its one-shot decode."""
    from wavecast.server.engines import load_engines

    chunks = []
    for record in (False, True):
        engine: Any = load_engines([model], "cpu", max_chunk_frames=10, codec_batch=8)[model]
        inc = engine.codec_streams.incremental
        if record:
            inc.record_calls(record=False)
        jobs = _crowd(engine, model, 5, frames=120)
        audio = step_together(engine, jobs, joins=[0, 0, 3, 7, 10], cancel_at=40, cancel=1)
        chunks.append([np.concatenate(audio[job.request.request_id]) for job in jobs])
        if record:
            assert inc.recorded >= 2
            _each_the_one_shot_decode(engine, model, jobs[1:], audio)
    for plain, recorded in zip(*chunks, strict=True):
        assert np.array_equal(plain, recorded)


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_a_crowd_arriving_a_step_apart_gets_its_first_chunks_in_one_call(model: str) -> None:
    """Three requests, then three more a step later (a crowd's requests arrive
    over a few milliseconds): the first three's first chunks wait a step for the
    others', and all six go to the codec in one call; each stream's audio is
    still its one-shot decode."""
    from wavecast.server.engines import load_engines

    engine: Any = load_engines([model], "cpu", codec_batch=8)[model]
    jobs = _crowd(engine, model, 6, frames=60)
    calls = count_codec_calls(engine)
    first_at: dict[str, int] = {}
    audio: dict[str, list[Any]] = {job.request.request_id: [] for job in jobs}
    running: list[Any] = []
    step = 0
    while step < 2 or running:
        running += jobs[:3] if step == 0 else jobs[3:] if step == 1 else []
        outs = engine.step(running)
        for job, out in zip(running, outs, strict=True):
            if out.audio is not None:
                first_at.setdefault(job.request.request_id, step)
                audio[job.request.request_id].append(out.audio)
        running = [job for job, out in zip(running, outs, strict=True) if not out.done]
        step += 1
    assert len(set(first_at.values())) == 1, first_at
    assert calls[0] == len(jobs), calls
    _each_the_one_shot_decode(engine, model, jobs, audio)


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_streams_beyond_a_codec_call_decode_on_steps_of_their_own(model: str) -> None:
    """Eight requests at once with two chunks per codec call: after their first
    chunks, no step decodes more than two streams' chunks (four calls' worth on
    one step every few, before), the calls still carry two, and each stream's
    audio is its one-shot decode."""
    from wavecast.server.engines import load_engines

    engine: Any = load_engines([model], "cpu", max_chunk_frames=40, codec_batch=2)[model]
    jobs = _crowd(engine, model, 8, frames=120, speech="Hello there, how are you today?")
    calls = count_codec_calls(engine)
    audio: dict[str, list[Any]] = {job.request.request_id: [] for job in jobs}
    later_per_step = []  # streams with a chunk past their first, not their last
    running = list(jobs)
    while running:
        outs = engine.step(running)
        later = 0
        for job, out in zip(running, outs, strict=True):
            chunks = audio[job.request.request_id]
            if out.audio is not None:
                later += bool(chunks) and not out.done
                chunks.append(out.audio)
        later_per_step.append(later)
        running = [job for job, out in zip(running, outs, strict=True) if not out.done]
    assert max(later_per_step) == 2, later_per_step
    assert sum(1 for rows in calls if rows == 2) > len(calls) // 2, calls
    _each_the_one_shot_decode(engine, model, jobs, audio)


def test_first_chunks_a_step_apart_go_in_one_call(
    codec: tuple[IncrementalCodec, Decode, int],
) -> None:
    """Two streams of one cadence, the second a frame behind: the first one's
    first chunk, due a step before the other's, waits that step (once), and
    both go in one call, of its frames and not one more (the frame it gained
    waiting goes with its next chunk). A stream that would wait for one that
    then gets no frame waits no longer; two do not wait for one; none waits
    beside one that waited; one alone never waits. Each stream's audio is the
    one-shot decode of its codes."""
    inc, decode, k = codec
    like = torch.zeros(())
    first = inc.lookahead + 3  # (a stream's first chunk: 3 frames)
    frames = first + 24
    codes = _codes(3, k, frames + 1, seed=13)
    calls: list[int] = []
    run = inc.decode

    def counted(batch: torch.Tensor, states: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return run(batch, states, **kwargs)

    def step(
        streams: list[IncrementalStream], pushes: list[int | None], audio: list[list[Any]]
    ) -> None:
        """Stream ``i`` pushes its frame ``pushes[i]`` (None: none); the due
        chunks, less those that wait, decode together, into ``audio[i]``."""
        due = []
        for i, (stream, at) in enumerate(zip(streams, pushes, strict=True)):
            if at is None:
                continue
            plan = stream.plan_push(codes[i : i + 1, :, at : at + 1])
            if plan is not None:
                due.append((StepOutput(audio=None, fraction=0.0, seconds=0.0), stream, plan, i))
        kept = codec_stream.wait_for_firsts([(out, s, plan) for out, s, plan, _ in due])
        codec_stream.complete_due(inc.decode, kept)
        for out, _, _, i in due:
            if out.audio is not None:
                audio[i].append(out.audio)

    inc.decode = counted  # type: ignore[method-assign]
    try:
        cadence = codec_stream.Cadence(8)
        a, b = (IncrementalStream(inc, like, first_frames=3, cadence=cadence) for _ in range(2))
        audio: list[list[Any]] = [[], []]
        # a pushes frames 0 .. ; b starts a step later.
        for t in range(first):
            step([a, b], [t, t - 1 if t else None], audio)
        assert audio == [[], []] and calls == []  # a was due: it waited for b
        step([a, b], [first, first - 1], audio)
        assert calls == [2] and all(len(chunks) == 1 for chunks in audio)
        assert [len(chunks[0]) for chunks in audio] == [len(audio[0][0])] * 2
        for t in range(first + 1, frames):
            step([a, b], [t, t - 1], audio)
        for i, stream in enumerate((a, b)):
            plan = stream.plan_flush()
            assert plan is not None
            audio[i].append(stream.complete_alone(plan))
            pushed = frames if i == 0 else frames - 1
            whole = decode(codes[i : i + 1, :, :pushed])[0].T.numpy()
            streamed = np.concatenate(audio[i])
            assert streamed.shape == whole.shape
            assert np.abs(streamed - whole).max() <= 1e-5 * max(1e-3, np.abs(whole).max())

        # b lacks a frame when a is due, then gets none: a waits one step only.
        calls.clear()
        cadence = codec_stream.Cadence(8)
        a, b = (IncrementalStream(inc, like, first_frames=3, cadence=cadence) for _ in range(2))
        audio = [[], []]
        for t in range(first):
            step([a, b], [t, t - 1 if t else None], audio)
        step([a, b], [first, None], audio)
        assert calls == [1] and len(audio[0]) == 1 and audio[1] == []

        # Two due, one a frame behind: the two go now (the wait would cost two
        # streams a step each to spare one a call).
        calls.clear()
        cadence = codec_stream.Cadence(8)
        a, c, b = (IncrementalStream(inc, like, first_frames=3, cadence=cadence) for _ in range(3))
        audio = [[], [], []]
        for t in range(first):
            step([a, c, b], [t, t, t - 1 if t else None], audio)
        assert calls == [2] and [len(chunks) for chunks in audio] == [1, 1, 0]

        # Three a step apart each: the first waits for the second; then the
        # second goes with it (their call is made anyway), not waiting for the
        # third, which goes on its own step.
        calls.clear()
        cadence = codec_stream.Cadence(8)
        a, b, c = (IncrementalStream(inc, like, first_frames=3, cadence=cadence) for _ in range(3))
        audio = [[], [], []]
        for t in range(first + 1):
            step([a, b, c], [t, t - 1 if t else None, t - 2 if t > 1 else None], audio)
        assert calls == [2] and [len(chunks) for chunks in audio] == [1, 1, 0]
        step([a, b, c], [first + 1, first, first - 1], audio)
        assert calls == [2, 1] and [len(chunks) for chunks in audio] == [1, 1, 1]

        # Alone, a first chunk goes as soon as it can.
        calls.clear()
        alone = IncrementalStream(inc, like, first_frames=3, cadence=codec_stream.Cadence(8))
        audio = [[]]
        for t in range(first):
            step([alone], [t], audio)
        assert calls == [1] and len(audio[0]) == 1
    finally:
        del inc.decode


def test_the_cadence_groups_streams_by_a_calls_chunks() -> None:
    """Streams join the first group with room (all one group while the call's
    chunks are not known); groups decode on different steps of the period,
    whatever the chunk size; a stream that ends, or is dropped, frees its place."""
    from wavecast.server.engines.codec_stream import Cadence

    cadence = Cadence(10)
    assert [cadence.join() for _ in range(5)] == [0] * 5
    cadence = Cadence(10, rows=2)
    assert [cadence.join() for _ in range(5)] == [0, 0, 1, 1, 2]
    cadence.leave(0)
    assert cadence.join() == 0
    for size in (10, 20, 40):  # each group on its own step of the period
        steps = []
        for group in range(10):
            due = []
            for step in range(size):
                cadence.step = step
                if cadence.due(size, group):
                    due.append(step % 10)
            assert len(due) == 1
            steps += due
        assert sorted(steps) == list(range(10)), steps
    assert [cadence.phase(g) for g in range(4)] == [0, 5, 2, 7]
    full = Cadence(2, rows=1)
    assert [full.join() for _ in range(4)] == [0, 1, 0, 1]  # past the period: the least full

    codec = incremental(_encodec()[0])
    assert codec is not None
    like = torch.zeros(())
    cadence = Cadence(8, rows=1)
    first = IncrementalStream(codec, like, cadence=cadence)
    second = IncrementalStream(codec, like, cadence=cadence)
    assert (first._group, second._group) == (0, 1)
    del first
    assert IncrementalStream(codec, like, cadence=cadence)._group == 0


def test_no_chunk_size_is_due_where_the_period_is_not() -> None:
    """``may_be_due`` rules a step out only where no chunk size (the period
    times a power of two) is due for the group."""
    from wavecast.server.engines.codec_stream import Cadence

    for period in (1, 3, 8, 10):
        cadence = Cadence(period)
        for step in range(4 * period * 8):
            cadence.step = step
            for group in range(period + 2):
                due = [cadence.due(period << j, group) for j in range(4)]
                if not cadence.may_be_due(group):
                    assert not any(due), (period, step, group)
                else:
                    assert due[0], (period, step, group)


@pytest.mark.parametrize("kind", ["incremental", "cadence", "windows"])
def test_frames_pushed_as_ints_stream_what_arrays_do(kind: str) -> None:
    """A stream fed frames one at a time as ints (``plan_push_frame``, as a
    speech step pushes them), among pushes of arrays, plans the same windows
    and streams the same samples as one fed the same frames as arrays only."""
    from wavecast.server.engines.codec_stream import Cadence, StreamDecoder

    model, decode, _ = _encodec()
    codec = incremental(model)
    assert codec is not None
    codes = _codes(1, 4, 90, seed=7)
    rng = np.random.default_rng(7)
    sizes: list[int] = []
    while sum(sizes) < 90:
        sizes.append(min(90 - sum(sizes), 1 if rng.random() < 0.8 else int(rng.integers(0, 4))))
    now = [0.0]  # (the clock: later chunks grow while a stream is ahead)

    def stream(cadence: Cadence | None) -> StreamDecoder:
        settings: dict[str, Any] = {
            "left_context": 6,
            "first_frames": 2,
            "chunk_frames": 4,
            "max_chunk_frames": 16,
            "frame_rate": 50.0,
            "clock": lambda: now[0],
        }
        if kind == "windows":
            return StreamDecoder(decode, codec.hop, holdback=2, **settings)
        return IncrementalStream(codec, torch.zeros(()), cadence=cadence, **settings)

    cadences = [Cadence(4) if kind == "cadence" else None for _ in range(2)]
    arrays, ints = stream(cadences[0]), stream(cadences[1])
    streamed: list[list[np.ndarray]] = [[], []]
    at = 0
    for n in sizes:
        now[0] += 0.01
        piece = codes[..., at : at + n]
        at += n
        plans = [arrays.plan_push(piece)]
        if n == 1:
            plans.append(ints.plan_push_frame(piece[0, :, 0].tolist()))
        else:
            plans.append(ints.plan_push(piece))
        assert (plans[0] is None) == (plans[1] is None)
        for out, each, plan in zip(streamed, (arrays, ints), plans, strict=True):
            if plan is not None:
                out.append(each.complete_alone(plan))
        if plans[0] is not None and plans[1] is not None:
            assert (plans[0].start, plans[0].end) == (plans[1].start, plans[1].end)
            assert torch.equal(plans[0].window, plans[1].window)
        for cadence in cadences:
            if cadence is not None:
                cadence.tick()
    for out, each in zip(streamed, (arrays, ints), strict=True):
        tail = each.flush()
        out.append(np.zeros((0, 1), np.float32) if tail is None else tail)
    assert len(streamed[0]) == len(streamed[1]) > 3
    for first, second in zip(*streamed, strict=True):
        assert np.array_equal(first, second)


def test_loading_keeps_more_convolution_shapes_prepared(monkeypatch: Any) -> None:
    """``load_engines`` raises oneDNN's count of prepared primitives (its
    default, 1,024, holds a codec's layers in a few call shapes only) where the
    environment does not set one, and leaves a count that is set."""
    from wavecast.server.engines import ONEDNN_PRIMITIVES, load_engines

    name = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
    monkeypatch.delenv(name, raising=False)
    load_engines(["tiny-musicgen"], "cpu")
    assert os.environ[name] == str(ONEDNN_PRIMITIVES) and ONEDNN_PRIMITIVES > 1024
    monkeypatch.setenv(name, "2048")
    load_engines(["tiny-musicgen"], "cpu")
    assert os.environ[name] == "2048"


def test_resolving_the_device_asks_cuda_for_every_kernel_at_start(monkeypatch: Any) -> None:
    """Resolving the device, before anything starts CUDA, asks CUDA to load the
    kernels of torch's libraries at once (``CUDA_MODULE_LOADING``), not on
    their first use in a first crowd's steps; a value set outside stays."""
    from wavecast.server.engines import CUDA_MODULE_LOADING, resolve_device

    name = "CUDA_MODULE_LOADING"
    monkeypatch.delenv(name, raising=False)
    assert resolve_device("cpu") == "cpu"
    assert os.environ[name] == CUDA_MODULE_LOADING == "EAGER"
    monkeypatch.setenv(name, "LAZY")
    resolve_device("auto")
    assert os.environ[name] == "LAZY"


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_warm_up_makes_the_codec_call_shapes_a_crowd_takes(model: str) -> None:
    """At warm-up an engine makes each codec call shape its streams will take
    once (a first chunk, and each chunk size of the cadence, in calls of 1 to
    ``codec_batch`` chunks): a crowd's first chunks, and most of its chunks
    after them, come in shapes made before (a convolution library's first call
    of a shape costs several of the next)."""
    from wavecast.server.engines import load_engines

    engine: Any = load_engines([model], "cpu", max_chunk_frames=20, codec_batch=4)[model]
    inc = engine.codec_streams.incremental
    calls: list[tuple[tuple[int, ...], bool]] = []
    run = inc.decode

    def recording(codes: torch.Tensor, states: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((tuple(codes.shape), bool(kwargs.get("final"))))
        return run(codes, states, **kwargs)

    inc.decode = recording
    engine.warm_up()
    made = {shape for shape, _ in calls}
    calls.clear()
    jobs = _crowd(engine, model, 4, frames=75)
    step_together(engine, jobs, joins=[0, 0, 0, 6])
    first = calls[0][0]
    assert first[0] == 3 and first in made  # the three first chunks
    taken = [shape for shape, final in calls if not final]  # (the ends: one stream's rest)
    missing = [shape for shape in taken if shape not in made]
    assert len(taken) >= 6 and len(missing) <= len(taken) // 4, (missing, taken)


@pytest.fixture(scope="module")
def encodec() -> tuple[IncrementalCodec, Decode]:
    model, decode, _ = _encodec()
    built = incremental(model)
    assert built is not None
    return built, decode


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    prompt=st.integers(0, 40),
    left=st.integers(0, 30),
    first=st.integers(1, 6),
    chunk=st.integers(1, 12),
    pushes=st.lists(st.integers(0, 9), min_size=1, max_size=40),
)
def test_any_prompt_chunking_and_pushes_stream_the_one_shot_decode(
    encodec: tuple[IncrementalCodec, Decode],
    prompt: int,
    left: int,
    first: int,
    chunk: int,
    pushes: list[int],
) -> None:
    """Whatever the prompt (primed with its last ``left`` frames), the chunk
    schedule and the pushes' sizes (empty ones too), the chunks and the tail
    are the one-shot decode of the primed frames and the new ones, less the
    primed frames' audio."""
    inc, decode = encodec
    frames = sum(pushes)
    codes = _codes(1, 4, prompt + frames, seed=prompt * 131 + frames)
    stream = IncrementalStream(
        inc, torch.zeros(()), left_context=left, first_frames=first, chunk_frames=chunk
    )
    if prompt:
        stream.prime(codes[..., :prompt])
    pieces, at = [], prompt
    for n in pushes:
        out = stream.push(codes[..., at : at + n])
        at += n
        if out is not None:
            pieces.append(out)
    tail = stream.flush()
    assert stream.flush() is None
    pieces += [] if tail is None else [tail]
    primed = min(prompt, left)
    if frames == 0:
        assert not pieces or sum(len(p) for p in pieces) == 0
        return
    whole = decode(codes[..., prompt - primed :])[0].T.numpy()[primed * inc.hop :]
    streamed = np.concatenate(pieces)
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= 1e-5 * max(1e-3, float(np.abs(whole).max()))


def _formed(inc: IncrementalCodec, kernel: rowkernel.RowKernel | None = None) -> list[_Formed]:
    """The layers with forms, prepared (for the row kernel's too, given one)."""
    ops = [op for op in inc._ops if isinstance(op, _Formed)]
    for op in ops:
        op.kernel = kernel
    return [op for op in ops if op.prepare()]


def _kernel() -> rowkernel.RowKernel:
    """The row kernel, which this project's machines build (``test_step_parts``
    says where it may be missing)."""
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        pytest.skip(f"no row kernel here: {kernel}")
    return kernel


@pytest.mark.parametrize("form", ["product", "by_kernel"])
def test_each_convolution_in_each_form_equals_the_librarys(
    codec: tuple[IncrementalCodec, Decode, int], form: str
) -> None:
    """Every convolution and transposed convolution of the four decoders (taps,
    dilations, strides, biases as they come), on inputs of one and three rows,
    from the shortest to longer ones: the product's output, and the row
    kernel's, is the library's, to float rounding."""
    inc, _, _ = codec
    formed = _formed(inc, _kernel() if form == "by_kernel" else None)
    kinds = {type(op) for op in formed}
    assert kinds == {_Conv, _ConvTranspose}
    gen = torch.Generator().manual_seed(3)
    try:
        for op in formed:
            conv = op.conv
            least = 1
            if isinstance(op, _Conv):
                least = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
            for rows, n in ((1, least), (3, least + 1), (3, least + 37)):
                x = torch.randn(rows, conv.in_channels, n, generator=gen)
                direct, other = op.direct(x), getattr(op, form)(x)
                assert other.shape == direct.shape, (op, rows, n)
                scale = direct.abs().max().clamp_min(1e-6)
                assert (other - direct).abs().max() <= 1e-5 * scale, (op, rows, n)
    finally:
        _formed(inc)


@pytest.mark.parametrize("form", ["product", "kernel"])
def test_streams_with_every_convolution_in_one_form_equal_the_one_shot_decode(
    codec: tuple[IncrementalCodec, Decode, int], form: str
) -> None:
    inc, decode, k = codec
    try:
        for op in _formed(inc, _kernel() if form == "kernel" else None):
            op.one = op.many = form
        assert checked(inc, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5
    finally:
        inc.direct_forms()
        _formed(inc)
    assert all(op.one == op.many == "direct" for op in _formed(inc))


@pytest.mark.parametrize("kernel", [False, True])
def test_each_convolution_takes_the_fastest_form_for_one_stream_and_for_more(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice follows the times (stood in for here: the real ones depend on
    the machine): the fastest form, if 5% faster than the library's or more,
    for calls of one stream's rows and for calls of more apart; the row
    kernel's only where its library is built; a layer whose call takes over
    20 ms keeps the library's, untimed; the calls then run the chosen forms."""
    from wavecast.server.engines import codec_incremental

    built = _kernel() if kernel else None
    monkeypatch.setattr(rowkernel, "load", lambda: built or "not built here")
    model, _, k = _stereo()  # two rows a stream: "one stream" is a batch of 2
    inc = incremental(model)
    assert inc is not None
    formed = _formed(inc)
    large = formed[0]
    raced: list[tuple[int, int]] = []

    def times(index: int, one: bool) -> list[float]:
        """The library's, the product's and the kernel's times: odd layers the
        product fastest for one stream, every third for more; every fourth the
        kernel for one stream, every fourth but one for more (where there is no
        kernel, the product then 10% faster than the library); layer 2 the
        product and the kernel only 4% and 3% faster (not enough)."""
        if index == 2:
            return [1.0, 0.96, 0.97]
        if index % 2 == 1 if one else index % 3 == 0:
            return [1.0, 0.5, 0.6]
        if index % 4 == (0 if one else 1):
            return [1.0, 0.9, 0.4]
        return [1.0, 1.5, 1.2]

    def expected(index: int, one: bool) -> str:
        direct, product, by_kernel = times(index, one)
        fastest = min(product, by_kernel) if kernel else product
        if index == 0 or fastest >= 0.95 * direct:
            return "direct"
        return "kernel" if kernel and by_kernel < product else "product"

    def race(forms: Any, x: torch.Tensor, clock: Any) -> list[float]:
        if [form.__name__ for form in forms] == ["fused", "layers"]:
            return [1.0, 1.0]  # (the residual units: not fused, their layers run)
        op = forms[0].__self__
        assert [form.__name__ for form in forms] == ["direct", "product", "by_kernel"][: 2 + kernel]
        index = formed.index(op)
        raced.append((index, x.shape[0]))
        return times(index, x.shape[0] == 2)[: len(forms)]

    def seconds(form: Any, x: torch.Tensor, clock: Any) -> float:
        return 0.5 if getattr(form, "__self__", None) is large else 1e-4

    monkeypatch.setattr(codec_incremental, "_race", race)
    monkeypatch.setattr(codec_incremental, "_seconds", seconds)
    forms = inc.choose_forms(torch.zeros(()), 4, k, 10)
    assert sorted({rows for _, rows in raced}) == [2, 8]  # one stream, four
    assert 0 not in {index for index, _ in raced}  # the large layer: untimed
    for index, op in enumerate(formed):
        assert op.one == expected(index, True), index
        assert op.many == expected(index, False), index
    assert forms.layers == len(formed)
    assert forms.product_one == sum(op.one == "product" for op in formed) > 0
    assert forms.product_many == sum(op.many == "product" for op in formed) > 0
    assert forms.kernel_one == sum(op.one == "kernel" for op in formed)
    assert forms.kernel_many == sum(op.many == "kernel" for op in formed)
    assert (forms.kernel_one > 0 and forms.kernel_many > 0) == kernel
    raced.clear()
    inc.choose_forms(torch.zeros(()), 40, k, 10)  # a crowd is timed at 16 streams at most
    assert sorted({rows for _, rows in raced}) == [2, 32]

    ran: dict[int, list[str]] = {}
    methods = {"direct": "direct", "product": "product", "kernel": "by_kernel"}
    for index, op in enumerate(formed):
        for name in methods.values():
            inner = getattr(op, name)

            def spy(x: torch.Tensor, inner: Any = inner, at: int = index, name: str = name) -> Any:
                ran.setdefault(at, []).append(name)
                return inner(x)

            monkeypatch.setattr(op, name, spy)
    for streams in (1, 3):
        ran.clear()
        states = [inc.start(torch.zeros(())) for _ in range(streams)]
        inc.decode(_codes(streams, k, 12, seed=streams), states)
        for index, op in enumerate(formed):
            want = op.one if streams == 1 else op.many
            assert set(ran[index]) == {methods[want]}, (streams, index)


def test_convolutions_as_products_that_stray_are_put_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked against the one-shot decode after the choice, as at load: a
    product that strays (a weight matrix misread) puts every layer back to the
    library's, and the log says so."""
    model, decode, k = _encodec()
    geometry = StreamGeometry(25, 4, 1, 10, 50, 50.0)
    streams = CodecStreams(
        model, decode, torch.zeros(()), geometry, hop=640, codebooks=k, cardinality=64, name="m"
    )
    inc = streams.incremental
    assert inc is not None

    def all_products(*args: Any, **kwargs: Any) -> Forms:
        formed = _formed(inc)
        for op in formed:
            op.one = op.many = "product"
        assert formed[-1].matrix is not None
        formed[-1].matrix = formed[-1].matrix * 1.5
        return Forms(len(formed), len(formed), len(formed), 0.0)

    monkeypatch.setattr(inc, "choose_forms", all_products)
    with caplog.at_level(logging.WARNING):
        streams.choose_forms(4)
    assert "as products off by" in caplog.text
    assert all(op.one == op.many == "direct" for op in _formed(inc))
    assert checked(inc, decode, torch.zeros(()), codebooks=k, cardinality=64) < 1e-5


@pytest.mark.parametrize("model", ["tiny-musicgen", "tiny-higgs"])
def test_warm_up_chooses_the_codec_layers_forms(
    model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the machine's times choose, the streams still decode the one-shot decode."""
    from wavecast.server.engines import load_engines

    engine: Any = load_engines([model], "cpu", max_chunk_frames=20, codec_batch=2)[model]
    with caplog.at_level(logging.INFO):
        engine.warm_up()
    assert "codec layers as matrix products" in caplog.text
    streams = engine.codec_streams
    error = checked(
        streams.incremental,
        streams.decode,
        streams.like,
        codebooks=streams.codebooks,
        cardinality=streams.cardinality,
    )
    assert error < 1e-5


def test_off_the_cpu_the_convolutions_stay_the_librarys() -> None:
    """A GPU's convolutions are its library's: nothing timed, no matrix made
    (a ``meta`` tensor stands in for a GPU's here)."""
    model, _, k = _encodec()
    inc = incremental(model)
    assert inc is not None
    forms = inc.choose_forms(torch.zeros((), device="meta"), 4, k, 10)
    assert forms == Forms(14, 0, 0, 0.0)
    convolutions = [op for op in inc._ops if isinstance(op, _Formed)]
    assert len(convolutions) == 14
    assert all(op.matrix is None and op.one == "direct" for op in convolutions)
