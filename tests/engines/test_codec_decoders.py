"""Codec decoders prepared for serving decode the same audio: bit for bit, but
for the activations on a CPU (ELU's negative samples, ``exp(x) - 1`` for
``expm1(x)``: 1e-7; Snake's polynomial sine, by the row kernel's library)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.dac.modeling_dac import Snake1d

from wavecast.server.engines import rowkernel
from wavecast.server.engines.codec_decoders import ELU, Snake, for_serving
from wavecast.server.engines.higgs.loading import load_higgs
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.rowkernel import random_units
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen


def _codes(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, 4, frames), generator=torch.Generator().manual_seed(seed))


def test_encodec_decodes_the_same_audio_after_preparation() -> None:
    codec = build_tiny_musicgen(seed=2).compression_model
    before = copy.deepcopy(codec)
    elus = sum(type(m) is nn.ELU for m in codec.decoder.modules())
    prepared = for_serving(codec.decoder)
    # Every weight-normed convolution folded; the ELUs after a module with weights
    # in place; every ELU computed from ``exp`` (on a CPU).
    assert prepared.weights_folded == 14 and prepared.activations_in_place == 9
    assert prepared.elus == elus == 13
    built = isinstance(rowkernel.load(), rowkernel.RowKernel)
    assert (prepared.kernel_missing is None) == built
    assert all((m.kernel is not None) == built for m in codec.decoder.modules() if type(m) is ELU)
    assert not any(hasattr(module, "weight_g") for module in codec.decoder.modules())
    assert not any(type(m) is nn.ELU for m in codec.decoder.modules())
    blocks = [m for m in codec.decoder.modules() if type(m).__name__ == "SEANetResnetBlock"]
    assert blocks and all(not block.block[0].inplace for block in blocks)  # its input is reused
    for batch, frames, seed in ((1, 7, 0), (3, 39, 1), (2, 79, 2)):
        codes = _codes(batch, frames, seed)
        now, then = codec.decode(codes, None), before.decode(codes, None)
        assert (now - then).abs().max() <= 1e-6 * then.abs().max()
    assert for_serving(codec.decoder).total == 0  # once is enough


def test_elu_from_exp_equals_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Without the row kernel's library.) Positive samples exactly, negative
    ones within 1e-7 (any alpha); in place only when asked; torch's own kernel
    for small inputs, ``exp`` for large."""
    exps = []
    exp = torch.Tensor.exp_

    def counted(self: torch.Tensor) -> torch.Tensor:
        exps.append(self.numel())
        return exp(self)

    monkeypatch.setattr(torch.Tensor, "exp_", counted)
    for length in (500, 5000):
        x = torch.cat(
            [
                torch.randn(3, 4, length) * 4,
                torch.tensor([0.0, -0.0, -1e-8, 1e-8, -30.0])[None, None].expand(3, 4, -1),
            ],
            -1,
        )
        for alpha in (1.0, 0.3):
            exps.clear()
            want = nn.functional.elu(x, alpha)
            kept = x.clone()
            got = ELU(alpha)(x)
            assert exps == ([] if length == 500 else [x.numel()])
            assert torch.equal(x, kept)
            assert torch.equal(got[x > 0], want[x > 0])
            assert (got - want).abs().max() <= 1e-7
            inside = x.clone()
            out = ELU(alpha, inplace=True)(inside)
            assert out.data_ptr() == inside.data_ptr() and torch.equal(out, got)


@pytest.mark.parametrize("length", [3, 500, 5001])
def test_elu_by_the_row_kernel_equals_torchs(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive samples (and NaN) exactly, negative ones within 1e-7 of torch's
    (any alpha), whatever their place (the last few of an odd count included),
    on one thread or several; in place only when asked; a view of another
    layout, or an input whose gradient is asked for, goes the other way."""
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        pytest.skip(f"no row kernel here: {kernel}")
    torch.manual_seed(0)
    specials = torch.tensor([0.0, -0.0, -1e-8, 1e-8, -30.0, -100.0, float("nan"), float("inf")])
    x = torch.cat([torch.randn(3, 4, length) * 4, specials[None, None].expand(3, 4, -1)], -1)
    for alpha in (1.0, 0.3):
        want = nn.functional.elu(x, alpha)
        kept = x.clone()
        got = ELU(alpha, kernel=kernel)(x)
        assert torch.equal(x.nan_to_num(), kept.nan_to_num())
        above = ~(x <= 0)  # (NaN too)
        assert torch.equal(got[above].isnan(), want[above].isnan())
        assert torch.equal(got[above].nan_to_num(), want[above].nan_to_num())
        assert (got[x <= 0] - want[x <= 0]).abs().max() <= 1e-7
        inside = x.clone()
        out = ELU(alpha, inplace=True, kernel=kernel)(inside)
        assert out.data_ptr() == inside.data_ptr()
        assert torch.equal(out.nan_to_num(), got.nan_to_num())
        strided = x.transpose(1, 2)
        other_way = ELU(alpha)(strided).nan_to_num()
        assert torch.equal(ELU(alpha, kernel=kernel)(strided).nan_to_num(), other_way)
        # Rows of a wider tensor (a transposed convolution's output without its
        # tail): by the kernel, the same floats as the rows alone, into a new
        # tensor or in place, the samples past them untouched.
        wide = torch.cat([x, torch.randn(3, 4, 5)], -1)
        rows = wide[..., : x.shape[-1]]
        assert not rows.is_contiguous() and rowkernel.row_layout(rows) is not None
        assert torch.equal(ELU(alpha, kernel=kernel)(rows).nan_to_num(), got.nan_to_num())
        past = wide[..., x.shape[-1] :].clone()
        out = ELU(alpha, inplace=True, kernel=kernel)(rows)
        assert out.data_ptr() == wide.data_ptr() and torch.equal(wide[..., x.shape[-1] :], past)
        assert torch.equal(out.nan_to_num(), got.nan_to_num())
        # Into rows of a wider tensor (a convolution's padded input, its buffer
        # before them): the same floats there, the rest untouched, x too.
        padded = torch.randn(3, 4, 2 + x.shape[-1] + 1)
        around = padded.clone()
        assert ELU(alpha, kernel=kernel).into(x, padded[..., 2:-1])
        assert torch.equal(padded[..., 2:-1].nan_to_num(), got.nan_to_num())
        assert torch.equal(padded[..., :2], around[..., :2])
        assert torch.equal(padded[..., -1:], around[..., -1:])
        assert torch.equal(x.nan_to_num(), kept.nan_to_num())
        assert not ELU(alpha).into(x, padded[..., 2:-1])  # (no kernel: nothing written)
        across = torch.empty(3, x.shape[-1], 4).transpose(1, 2)  # (x's shape, not as rows)
        assert not ELU(alpha, kernel=kernel).into(x, across)
        threads = torch.get_num_threads()
        monkeypatch.setattr(rowkernel, "PER_THREAD_ELU", 1)
        try:
            torch.set_num_threads(3)  # (parts of a multiple of eight samples)
            assert torch.equal(ELU(alpha, kernel=kernel)(x).nan_to_num(), got.nan_to_num())
        finally:
            torch.set_num_threads(threads)
    with torch.enable_grad():
        leaf = x[0].clone().requires_grad_()
        by_kernel, other_way = ELU(kernel=kernel)(leaf), ELU()(leaf)  # (the same way)
        assert by_kernel.requires_grad
        assert torch.equal(by_kernel.nan_to_num(), other_way.nan_to_num())


def test_elu_stays_torchs_off_the_cpu() -> None:
    """On another device torch's ELU is one pass over memory, and is kept (the
    decoder's weights on the ``meta`` device stand in for a GPU's here)."""
    decoder = nn.Sequential(nn.Conv1d(2, 2, 3), nn.ELU(), nn.Conv1d(2, 2, 3)).to("meta")
    prepared = for_serving(decoder)
    assert prepared.elus == 0 and prepared.activations_in_place == 1
    assert type(decoder[1]) is nn.ELU


@pytest.mark.parametrize("kernel", [True, False])
def test_dac_decodes_the_same_audio_after_preparation(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit with the Snakes' five operations in one tensor; within 1e-6
    of the largest sample with the row kernel's (where it is built)."""
    if not kernel:
        monkeypatch.setattr(rowkernel, "load", lambda: "turned off")
    built = isinstance(rowkernel.load(), rowkernel.RowKernel)
    codec = load_higgs("tiny-higgs", None, "cpu").codec
    before = copy.deepcopy(codec)
    prepared = for_serving(codec.acoustic_decoder)
    snakes = [m for m in codec.acoustic_decoder.modules() if isinstance(m, Snake)]
    assert prepared.snakes == len(snakes) > 0
    assert all((m.kernel is not None) == built for m in snakes)
    assert (prepared.kernel_missing is None) == built
    assert not any(isinstance(m, Snake1d) for m in codec.acoustic_decoder.modules())
    for batch, frames, seed in ((1, 5, 0), (3, 31, 1), (2, 73, 2)):
        codes = _codes(batch, frames, seed)
        with torch.no_grad():
            now, then = codec.decode(codes).audio_values, before.decode(codes).audio_values
        if built:
            assert (now - then).abs().max() <= 1e-6 * then.abs().max()
        else:
            assert torch.equal(now, then)
    assert for_serving(codec.acoustic_decoder).total == 0


def test_snake_equals_transformers_snake() -> None:
    original = Snake1d(6)
    with torch.no_grad():
        original.alpha.copy_(torch.rand(1, 6, 1) * 3 + 0.05)
    x = torch.randn(2, 6, 50)
    kept = x.clone()
    assert torch.equal(Snake(original.alpha)(x), original(x))
    assert torch.equal(x, kept)  # its input untouched


@pytest.mark.parametrize("length", [3, 50, 4001])
def test_snake_by_the_row_kernel_is_as_close_to_float64_as_torchs(
    length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within 2e-7 of a float64 Snake of the same (float32) arguments, of the
    sine's size and the sum's (as torch's), whatever a sample's place (the last
    few of a row included), arguments past 8,192 too, on one thread or
    several; its input untouched; while gradients are on, or for a view of
    another layout, the five operations."""
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        pytest.skip(f"no row kernel here: {kernel}")
    torch.manual_seed(0)
    original = Snake1d(6)
    with torch.no_grad():
        original.alpha.copy_(torch.rand(1, 6, 1) * 3 + 0.05)
    x = torch.randn(2, 6, length) * 4
    x[0, 0, :3] = torch.tensor([1e4, -3e5, 0.0])[:length]
    kept = x.clone()
    fast, plain = Snake(original.alpha, kernel), Snake(original.alpha)
    with torch.no_grad():
        got, theirs = fast(x), original(x)
        alpha = original.alpha.double()
        argument = (original.alpha * x).double()  # (in float32, as both take it)
        exact = x.double() + argument.sin().pow(2) / (alpha + 1e-9)
        # The sine squared's size (at most this) and the sum's rounding.
        scale = (1 / (alpha + 1e-9)).clamp(min=1) + exact.abs()
        assert float(((got.double() - exact) / scale).abs().max()) <= 2e-7
        assert float(((theirs.double() - exact) / scale).abs().max()) <= 2e-7
        assert torch.equal(x, kept)
        strided = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(fast(strided), plain(strided))
        # Rows of a wider tensor (a transposed convolution's output without its
        # tail): by the kernel, the same floats as the rows alone.
        rows = torch.cat([x, torch.randn(2, 6, 9)], -1)[..., :length]
        assert not rows.is_contiguous() and rowkernel.row_layout(rows) is not None
        assert torch.equal(fast(rows), got) and fast(rows).is_contiguous()
        # Into rows of a wider tensor (a convolution's padded input): the same
        # floats there, the rest untouched.
        padded = torch.randn(2, 6, 3 + length)
        around = padded.clone()
        assert fast.into(x, padded[..., 3:])
        assert torch.equal(padded[..., 3:], got) and torch.equal(padded[..., :3], around[..., :3])
        assert not plain.into(x, padded[..., 3:])
        # One channel's rows (a size-1 dimension: its stride says nothing).
        one = Snake(original.alpha[:, :1], kernel)
        alone = torch.cat([x[:, :1], torch.randn(2, 1, 3)], -1)[..., :length].reshape(2, 1, -1)
        assert rowkernel.row_layout(alone) == (2, length, length + 3)
        assert torch.equal(one(alone), one(alone.contiguous()))
        threads = torch.get_num_threads()
        monkeypatch.setattr(rowkernel, "PER_THREAD_ELU", 1)
        try:
            torch.set_num_threads(3)  # (parts of whole rows)
            assert torch.equal(fast(x), got)
        finally:
            torch.set_num_threads(threads)
    with torch.enable_grad():
        assert torch.equal(fast(x), plain(x))


@pytest.mark.parametrize(
    ("channels", "hidden", "taps", "dilation", "n", "held", "threads", "elu"),
    [
        (1, 1, 7, 9, 5000, 27, 1, False),
        (2, 2, 7, 3, 70, 9, 1, False),
        (3, 3, 7, 1, 5, 3, 1, False),
        (16, 16, 7, 9, 40, 27, 1, False),
        (4, 4, 7, 1, 900, 3, 3, False),
        (8, 4, 3, 1, 300, 1, 1, True),
        (2, 1, 3, 2, 3000, 2, 2, True),
    ],
)
def test_a_residual_unit_by_the_row_kernel_is_its_layers_bit_for_bit(
    channels: int,
    hidden: int,
    taps: int,
    dilation: int,
    n: int,
    held: int,
    threads: int,
    elu: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A residual unit's steady call in one pass (``RowKernel.residual_unit``:
    DAC's, Snake and the same channels throughout; EnCodec's, ELU and half the
    channels inside) is the same floats as its layers by the kernel one after
    the other (the activation, the convolution, the activation, the one-tap
    convolution, the join), with its new state (the padded input's last
    samples, those waiting): over several tiles of time, fewer new samples
    than the buffer holds, an input that is rows of a wider tensor, a call
    split over threads; and it refuses what it does not take (None)."""
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        pytest.skip(f"no row kernel here: {kernel}")
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(3, channels, n + 5, generator=gen)[..., 2 : n + 2] * 3
    span = (taps - 1) * dilation
    buffer = torch.randn(3, channels, span, generator=gen)
    waiting = torch.randn(3, channels, held, generator=gen)
    first, second = random_units(channels, hidden, taps, dilation, elu, gen)

    def act(x: torch.Tensor, unit: rowkernel.Unit) -> torch.Tensor:
        if unit.elu:
            return kernel.elu(x, float(unit.alpha[0]))
        return kernel.snake(x, unit.alpha, unit.inverse)

    padded = torch.cat([buffer, act(x, first)], -1)
    inner = kernel.conv(padded, first.weight, first.bias, dilation)
    y = kernel.conv(act(inner, second), second.weight, second.bias)
    joined = kernel.join_add(waiting, x, y)
    assert joined is not None
    count = torch.get_num_threads()
    monkeypatch.setattr(rowkernel, "PER_THREAD", 1)
    try:
        torch.set_num_threads(threads)
        fused = kernel.residual_unit(x, buffer, waiting, first, second)
    finally:
        torch.set_num_threads(count)
    assert fused is not None
    out, new, rest = fused
    assert torch.equal(out, joined[0]) and torch.equal(rest, joined[1])
    assert torch.equal(new, padded[..., -span:])
    assert kernel.residual_unit(x.double(), buffer, waiting, first, second) is None
    assert kernel.residual_unit(x, buffer[..., 1:], waiting, first, second) is None
    assert kernel.residual_unit(x[..., :0], buffer, waiting, first, second) is None
    assert kernel.residual_unit(x, buffer, waiting, second, first) is None


def test_an_activation_whose_input_is_read_elsewhere_keeps_it() -> None:
    first = nn.Sequential(nn.ELU(), nn.Conv1d(2, 2, 1), nn.ELU(), nn.Identity(), nn.ELU())
    assert for_serving(first).activations_in_place == 1
    assert [m.inplace for m in first if isinstance(m, nn.ELU)] == [False, True, False]
    x = torch.randn(1, 2, 9)
    kept = x.clone()
    first(x)
    assert torch.equal(x, kept)


def test_the_engine_prepares_its_codec() -> None:
    model = build_tiny_musicgen(seed=6)
    MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    assert not any(hasattr(m, "weight_g") for m in model.compression_model.decoder.modules())
