"""A continuation clip's codes, computed a part at a time.

A continuation request's clip (up to the model's window, 30 s for the released
models) is encoded by the model's EnCodec before the request can start: its
SEANet encoder's convolutions, residual blocks and LSTM over the whole clip,
then the quantizer. As one call on the inference thread it held every running
stream for all of it (165 ms for 30 s on this project's CPU machines with the
tiny test model). ``encode_in_pieces`` runs the same operations in the same
order, a layer (or a residual block's activation or convolution) a part,
yielding between parts, so that the scheduler steps the running streams in
between (``prepare_steps``). Its codes are ``encode``'s, bit for bit.

Where the compression model is not audiocraft's EnCodec with a SEANet encoder
(the stereo models' interleaved wrapper, a DAC), it is encoded in one part, by
its own ``encode``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from torch import nn

__all__ = ["encode_in_pieces", "parts_of"]

Pieces = Generator[None, None, tuple[torch.Tensor, torch.Tensor | None]]


def encode_in_pieces(model: Any, wav: torch.Tensor) -> Pieces:
    """``model.encode(wav)`` (codes ``[B, K, n]`` and the scale), yielding between
    parts. ``wav``: ``[B, C, samples]`` at the model's rate."""
    if not _laid_out_as_expected(model):
        codes, scale = model.encode(wav)
        return codes, scale
    x, scale = model.preprocess(wav)
    for layer in model.encoder.model:
        yield
        if type(layer).__name__ == "SEANetResnetBlock":
            out = x
            for part in layer.block:
                out = part(out)
                yield
            x = layer.shortcut(x) + out
        else:
            x = layer(x)
    yield
    quantized: torch.Tensor = model.quantizer.encode(x)
    return quantized, scale


def parts_of(model: Any) -> int:
    """The pauses ``encode_in_pieces`` makes with ``model`` (whatever the clip's
    length: one a layer), a measure of its progress."""
    if not _laid_out_as_expected(model):
        return 0
    layers = model.encoder.model
    inner = sum(len(layer.block) for layer in layers if type(layer).__name__ == "SEANetResnetBlock")
    return len(layers) + inner + 1


def _laid_out_as_expected(model: Any) -> bool:
    """Whether ``model`` is audiocraft's ``EncodecModel`` with a SEANet encoder
    (a ``Sequential``, whose residual blocks hold theirs), in eval mode."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "model", None)
    return (
        type(model).__name__ == "EncodecModel"
        and type(encoder).__name__ == "SEANetEncoder"
        and isinstance(layers, nn.Sequential)
        and all(
            isinstance(getattr(layer, "block", None), nn.Sequential) and hasattr(layer, "shortcut")
            for layer in layers
            if type(layer).__name__ == "SEANetResnetBlock"
        )
        and not model.training
    )
