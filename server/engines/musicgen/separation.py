"""Demucs' separation a part at a time: ``demucs.apply.apply_model`` and
``HTDemucs.forward`` as generators that pause between layers.

A melody's reference is separated into stems by Demucs (``htdemucs``), which
cuts it into overlapping segments of 7.8 s and runs the whole network on each:
on a GPU a few tens of milliseconds a segment, on a CPU seconds. Run as one
unit of preparation, a segment held every running stream that long.

``apply_in_parts`` is ``apply_model``'s body (with the arguments audiocraft
gives it: one random shift, segments a quarter overlapping), and for HTDemucs
``forward_in_parts`` is ``HTDemucs.forward``'s, with a pause (``yield``) after
each part: the spectrogram and the inputs' normalisation, each encoder layer
(of both branches), each layer of the cross-branch transformer (each branch's
apart), each decoder layer, the masking and the
inverse spectrogram. The operations are the library's, on the same tensors in
the same order, through the same modules: the stems equal ``apply_model``'s
bit for bit (tested), and Python's ``random`` (one draw for the shift, one
for each segment's positional embedding) is drawn from in the same order. A
model of another kind (Demucs v2 or v3, a subclass) runs its forward as one
part.

The caller runs each part in the conditioner's contexts (no gradients, its
autocast), not across the pauses: between them the scheduler steps the other
streams.

Demucs' modules draw from ``random`` as their module's global; here that name
is ``draws``, which draws from the generator a thread has set (``drawing``: a
request's own, on the inference thread), and from Python's ``random``
elsewhere. Other threads draw from Python's ``random`` whenever they run (the
event loop's keepalive pings do, every connection's every 20 s), which they
may while a part's operations let go of the interpreter: drawing from the
process's generator, a request's shift would be the one its seed gives only
when no ping came at the wrong moment.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Generator, Iterator
from typing import Any

import demucs.apply
import demucs.transformer
import torch
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from demucs.utils import center_trim
from einops import rearrange
from torch.nn import functional as F

__all__ = [
    "apply_in_parts",
    "drawing",
    "draws",
    "draws_known",
    "forward_in_parts",
    "parts_of",
    "skip_draws",
]

Parts = Generator[None, None, torch.Tensor]

# (The library's, untyped.)
TensorChunk: Any = demucs.apply.TensorChunk
tensor_chunk: Any = demucs.apply.tensor_chunk
create_2d_sin_embedding: Any = demucs.transformer.create_2d_sin_embedding


class _Drawing(threading.local):
    generator: random.Random | None = None  # this thread's (None: Python's ``random``)


_drawing = _Drawing()


class _Draws:
    """``random`` as Demucs' modules see it (see the module's docstring)."""

    def __getattr__(self, name: str) -> Any:
        generator = _drawing.generator
        return getattr(random if generator is None else generator, name)


draws: Any = _Draws()
demucs.apply.random = draws  # type: ignore[attr-defined]
demucs.transformer.random = draws  # type: ignore[attr-defined]


@contextlib.contextmanager
def drawing(state: Any) -> Iterator[random.Random]:
    """Demucs' draws on this thread, for the block, from a generator of its own
    started in ``state`` (``random.getstate()``'s form); the generator."""
    generator = random.Random()
    generator.setstate(state)
    outer, _drawing.generator = _drawing.generator, generator
    try:
        yield generator
    finally:
        _drawing.generator = outer


def apply_in_parts(
    model: Any,
    mix: Any,
    shifts: int = 1,
    split: bool = True,
    overlap: float = 0.25,
    transition_power: float = 1.0,
    device: torch.device | str | None = None,
    segment: float | None = None,
) -> Parts:
    """``demucs.apply.apply_model(model, mix, shifts, split, overlap,
    transition_power, device=device, segment=segment)``, a part at a time (see
    the module's docstring); the stems ``[B, S, C, T]``."""
    device = mix.device if device is None else torch.device(device)
    if isinstance(model, BagOfModels):
        estimates: Any = 0.0
        totals = [0.0] * len(model.sources)
        for sub_model, model_weights in zip(model.models, model.weights, strict=True):
            original_model_device = next(iter(sub_model.parameters())).device
            sub_model.to(device)
            out = yield from apply_in_parts(
                sub_model, mix, shifts, split, overlap, transition_power, device, segment
            )
            sub_model.to(original_model_device)
            for k, inst_weight in enumerate(model_weights):
                out[:, k, :, :] *= inst_weight
                totals[k] += inst_weight
            estimates += out
            del out
        assert isinstance(estimates, torch.Tensor)
        for k in range(estimates.shape[1]):
            estimates[:, k, :, :] /= totals[k]
        return estimates

    model.to(device)
    model.eval()
    assert transition_power >= 1, "transition_power < 1 leads to weird behavior."
    batch, channels, length = mix.shape
    if shifts:
        max_shift = int(0.5 * model.samplerate)
        chunk = tensor_chunk(mix)
        padded_mix = chunk.padded(length + 2 * max_shift)
        shifted_sum: Any = 0.0
        for _ in range(shifts):
            offset = draws.randint(0, max_shift)
            shifted = TensorChunk(padded_mix, offset, length + max_shift - offset)
            shifted_out = yield from apply_in_parts(
                model, shifted, 0, split, overlap, transition_power, device, segment
            )
            shifted_sum += shifted_out[..., max_shift - offset :]
        shifted_sum /= shifts
        assert isinstance(shifted_sum, torch.Tensor)
        return shifted_sum
    if split:
        out = torch.zeros(batch, len(model.sources), channels, length, device=mix.device)
        sum_weight = torch.zeros(length, device=mix.device)
        whole = model.segment if segment is None else segment
        assert whole is not None and whole > 0.0
        segment_length = int(model.samplerate * whole)
        stride = int((1 - overlap) * segment_length)
        weight = torch.cat(
            [
                torch.arange(1, segment_length // 2 + 1, device=device),
                torch.arange(segment_length - segment_length // 2, 0, -1, device=device),
            ]
        )
        assert len(weight) == segment_length
        weight = (weight / weight.max()) ** transition_power
        for offset in range(0, length, stride):
            piece = TensorChunk(mix, offset, segment_length)
            chunk_out = yield from apply_in_parts(
                model, piece, 0, False, overlap, transition_power, device, segment
            )
            chunk_length = chunk_out.shape[-1]
            window = slice(offset, offset + segment_length)
            out[..., window] += (weight[:chunk_length] * chunk_out).to(mix.device)
            sum_weight[window] += weight[:chunk_length].to(mix.device)
        assert sum_weight.min() > 0
        out /= sum_weight
        return out
    if isinstance(model, HTDemucs) and segment is not None:
        valid_length = int(segment * model.samplerate)
    elif hasattr(model, "valid_length"):
        valid_length = model.valid_length(length)
    else:
        valid_length = length
    padded = tensor_chunk(mix).padded(valid_length).to(device)
    separated = yield from forward_in_parts(model, padded)
    trimmed: torch.Tensor = center_trim(separated, length)
    return trimmed


def draws_known(model: Any) -> bool:
    """Whether ``skip_draws`` knows what a separation by ``model`` draws: its
    forward is ``forward_in_parts``' (HTDemucs in evaluation), or each of a
    bag's models' is."""
    if isinstance(model, BagOfModels):
        return all(draws_known(sub) for sub in model.models)
    return type(model) is HTDemucs and not model.training


def skip_draws(model: Any, length: int) -> None:
    """Draw from ``draws`` what ``apply_in_parts(model, mix)`` draws for a mix
    of ``length`` samples (its defaults: one random shift, segments a quarter
    overlapping), in the same order, without separating it: each model's
    shift, then one draw for each segment's positional embedding (the
    cross-branch transformer's, where it has one and embeds by sines). For a
    model that ``draws_known``; a test holds it to the separation."""
    for sub_model in model.models if isinstance(model, BagOfModels) else [model]:
        max_shift = int(0.5 * sub_model.samplerate)
        shifted = length + max_shift - draws.randint(0, max_shift)
        stride = int(0.75 * int(sub_model.samplerate * sub_model.segment))
        cross = sub_model.crosstransformer
        for _ in range(0, shifted, stride):
            if cross and cross.emb == "sin":
                draws.randrange(cross.sin_random_shift + 1)


def parts_of(
    model: Any,
    length: int,
    shifts: int = 1,
    split: bool = True,
    overlap: float = 0.25,
    segment: float | None = None,
) -> int:
    """The pauses ``apply_in_parts`` makes for a mix of ``length`` samples, at
    most: its random shift may leave a segment out (a measure of its progress)."""
    if isinstance(model, BagOfModels):
        return sum(parts_of(sub, length, shifts, split, overlap, segment) for sub in model.models)
    if shifts:
        longest = length + int(0.5 * model.samplerate)  # (the shift's offset at its least)
        return shifts * parts_of(model, longest, 0, split, overlap, segment)
    if split:
        segment_length = int(model.samplerate * (model.segment if segment is None else segment))
        stride = int((1 - overlap) * segment_length)
        each = parts_of(model, segment_length, 0, False, overlap, segment)
        return len(range(0, length, stride)) * each
    if type(model) is not HTDemucs or model.training:
        return 0
    cross = model.crosstransformer
    layers = 2 * cross.num_layers if cross else 0
    return 1 + len(model.encoder) + layers + len(model.decoder)


def forward_in_parts(model: Any, mix: torch.Tensor) -> Parts:
    """``model(mix)``: for HTDemucs in evaluation, its forward a layer at a time
    (see the module's docstring); any other model in one part."""
    if type(model) is not HTDemucs or model.training:
        out: torch.Tensor = model(mix)
        return out
    length = mix.shape[-1]
    length_pre_pad = None
    training_length = length
    if model.use_train_segment:
        training_length = int(model.segment * model.samplerate)
        if mix.shape[-1] < training_length:
            length_pre_pad = mix.shape[-1]
            mix = F.pad(mix, (0, training_length - length_pre_pad))
    z = model._spec(mix)
    mag = model._magnitude(z).to(mix.device)
    x = mag
    batch, _, frequencies, frames = x.shape
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) / (1e-5 + std)
    xt = mix
    meant = xt.mean(dim=(1, 2), keepdim=True)
    stdt = xt.std(dim=(1, 2), keepdim=True)
    xt = (xt - meant) / (1e-5 + stdt)
    yield

    saved, saved_t, lengths, lengths_t = [], [], [], []
    for idx, encode in enumerate(model.encoder):
        lengths.append(x.shape[-1])
        inject = None
        if idx < len(model.tencoder):
            lengths_t.append(xt.shape[-1])
            tenc = model.tencoder[idx]
            xt = tenc(xt)
            if not tenc.empty:
                saved_t.append(xt)
            else:
                inject = xt
        x = encode(x, inject)
        if idx == 0 and model.freq_emb is not None:
            frs = torch.arange(x.shape[-2], device=x.device)
            emb = model.freq_emb(frs).t()[None, :, :, None].expand_as(x)
            x = x + model.freq_emb_scale * emb
        saved.append(x)
        yield

    if model.crosstransformer:
        if model.bottom_channels:
            _, _, f, _ = x.shape
            x = rearrange(x, "b c f t-> b c (f t)")
            x = model.channel_upsampler(x)
            x = rearrange(x, "b c (f t)-> b c f t", f=f)
            xt = model.channel_upsampler_t(xt)
        x, xt = yield from _cross_in_parts(model.crosstransformer, x, xt)
        if model.bottom_channels:
            x = rearrange(x, "b c f t-> b c (f t)")
            x = model.channel_downsampler(x)
            x = rearrange(x, "b c (f t)-> b c f t", f=f)
            xt = model.channel_downsampler_t(xt)

    for idx, decode in enumerate(model.decoder):
        skip = saved.pop(-1)
        x, pre = decode(x, skip, lengths.pop(-1))
        offset = model.depth - len(model.tdecoder)
        if idx >= offset:
            tdec = model.tdecoder[idx - offset]
            length_t = lengths_t.pop(-1)
            if tdec.empty:
                assert pre.shape[2] == 1, pre.shape
                pre = pre[:, :, 0]
                xt, _ = tdec(pre, None, length_t)
            else:
                skip = saved_t.pop(-1)
                xt, _ = tdec(xt, skip, length_t)
        yield
    assert not saved and not lengths_t and not saved_t

    sources = len(model.sources)
    x = x.view(batch, sources, -1, frequencies, frames)
    x = x * std[:, None] + mean[:, None]
    x_device = x.device
    moved = x.device.type in ("mps", "xpu")
    if moved:  # (the library's: no complex numbers there)
        x = x.cpu()
    zout = model._mask(z, x)
    x = model._ispec(zout, training_length)
    if moved:
        x = x.to(x_device)
    xt = xt.view(batch, sources, -1, training_length)
    xt = xt * stdt[:, None] + meant[:, None]
    x = xt + x
    if length_pre_pad:
        x = x[..., :length_pre_pad]
    return x


def _cross_in_parts(
    cross: Any, x: torch.Tensor, xt: torch.Tensor
) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
    """``CrossTransformerEncoder.forward(x, xt)``, a pause after each branch's
    layer (the time branch's takes the frequency branch's input, kept)."""
    _, c, fr, t1 = x.shape
    pos_emb_2d = create_2d_sin_embedding(c, fr, t1, x.device, cross.max_period)
    pos_emb_2d = rearrange(pos_emb_2d, "b c fr t1 -> b (t1 fr) c")
    x = rearrange(x, "b c fr t1 -> b (t1 fr) c")
    x = cross.norm_in(x)
    x = x + cross.weight_pos_embed * pos_emb_2d
    b, c, t2 = xt.shape
    xt = rearrange(xt, "b c t2 -> b t2 c")
    pos_emb = cross._get_pos_embedding(t2, b, c, x.device)
    pos_emb = rearrange(pos_emb, "t2 b c -> b t2 c")
    xt = cross.norm_in_t(xt)
    xt = xt + cross.weight_pos_embed * pos_emb
    for idx in range(cross.num_layers):
        if idx % 2 == cross.classic_parity:
            x = cross.layers[idx](x)
            yield
            xt = cross.layers_t[idx](xt)
        else:
            old_x = x
            x = cross.layers[idx](x, xt)
            yield
            xt = cross.layers_t[idx](xt, old_x)
        yield
    x = rearrange(x, "b (t1 fr) c -> b c fr t1", t1=t1)
    xt = rearrange(xt, "b t2 c -> b c t2")
    return x, xt
