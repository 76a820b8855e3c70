"""Codec decoders made ready for serving, with the same output (bit for bit, but
for the activations on a CPU: ELU's negative samples within 1e-7, Snake's
within 2e-7 of its sine's size).

Streaming re-decodes windows of codes at every chunk, so a codec's decoder runs
far more often here than in a one-shot decode, and on a CPU its per-call waste
shows: ``for_serving`` removes it from a loaded decoder, in place.

* **Weight normalisation folded into the weights.** EnCodec's convolutions keep
  ``g`` and ``v`` and recompute ``w = g v / |v|`` before every call (a hook, or a
  parametrization); the weight is now computed once, the same tensor.
* **Activations without copies.** An ``ELU`` inside a ``Sequential``, after a
  module with weights (a convolution, an LSTM, a residual block: each makes a new
  tensor), reads a tensor that nothing else reads: it runs in place. DAC's
  ``Snake1d`` (``x + sin(a x)^2 / (a + 1e-9)``) made a new tensor for each of its
  five operations; ``Snake`` makes one and works in it, in the same order. On
  a CPU it runs in one pass by the row kernel's C library
  (``rowkernel.RowKernel.snake``, eight samples at a time, the squared sine
  from Cephes' sine polynomial): 2.2-3.1x faster, as close to a float64 Snake
  as torch's.
* **ELU from ``exp``, on a CPU.** torch's ELU kernel computes ``expm1`` on every
  sample, at 2.4 ns a sample on this project's CPUs. ``ELU`` computes
  ``x`` where it is above 0, else ``alpha (exp(x) - 1)``, in one pass by the row
  kernel's C library (``rowkernel.RowKernel.elu``, eight samples at a time:
  3.5-5.4x faster than the four passes below, 1.5-5.4x torch's; the positive samples
  unchanged, the negative within 1e-7 of torch's). Where that library is not
  built: ``max(x, 0) + alpha (exp(min(x, 0)) - 1)`` in four passes, 1.1-1.7x
  faster than torch's from about 10,000 samples; below 8,192 samples (a
  stream's first frames) torch's one operation costs less than four. A GPU's
  ELU is bound by memory: one pass, kept.

Measured on one CPU thread (the test shapes): EnCodec's decode 5-7% faster, DAC's
about 10%, from the first two; the tiny EnCodec's another 5-10% from the third
in four passes, and in one pass 0.7-0.8x that for eight streams' chunks of 25
frames (MusicGen-small's EnCodec, random weights: about 0.9x;
``bench/bench_codec.py``, ``bench/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import rowkernel

__all__ = ["ELU", "Prepared", "Snake", "for_serving"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``for_serving`` changed."""

    weights_folded: int = 0
    activations_in_place: int = 0
    snakes: int = 0
    elus: int = 0
    # Why the ELUs and Snakes do not run in one pass by the row kernel's library
    # (None: they do).
    kernel_missing: str | None = None

    @property
    def total(self) -> int:
        return self.weights_folded + self.activations_in_place + self.snakes + self.elus


class Snake(nn.Module):  # type: ignore[misc]
    """DAC's Snake activation, ``x + sin(a x)^2 / (a + 1e-9)`` per channel, making
    one new tensor (transformers' ``Snake1d`` makes five): the same floats; or,
    by ``kernel`` (the row kernel's library, for float32 on a CPU), in one pass
    with a polynomial sine (within 2e-7 of the sine's size: as close to a
    float64 Snake as torch's)."""

    def __init__(self, alpha: nn.Parameter, kernel: rowkernel.RowKernel | None = None) -> None:
        super().__init__()
        self.alpha = alpha  # [1, C, 1]
        self.register_buffer("inverse", (alpha.detach() + 1e-9).reciprocal(), persistent=False)
        self.kernel = kernel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(shape[0], shape[1], -1)
        if self.kernel is not None:
            y = torch.empty(x.shape, dtype=torch.float32)
            if self.into(x, y):
                return y.reshape(shape)
        out = torch.mul(self.alpha, x)
        out.sin_().pow_(2).mul_(self.inverse).add_(x)
        return out.reshape(shape)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``forward(x)`` written into ``out`` (of ``x``'s shape ``[B, C, T]``,
        laid out as rows: a slice of the next convolution's padded input), by
        the kernel; False, nothing written, where the kernel does not take them."""
        kernel = self.kernel
        if kernel is None or (
            torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad)
        ):
            return False
        return kernel.snake_into(x, self.alpha, self.inverse, out)


class ELU(nn.ELU):  # type: ignore[misc]
    """``nn.ELU`` as ``x`` where it is above 0, else ``alpha (exp(x) - 1)``, in
    place if ``inplace``: in one pass by ``kernel`` (the row kernel's library,
    for contiguous float32 on a CPU, no gradient asked for), else as ``max(x, 0) + alpha (exp(min(x,
    0)) - 1)``: faster than torch's kernel (its ``expm1``) from about 10,000
    samples; below 8,192 samples torch's one operation is the faster (3-9 µs
    against 13-16 µs for four: a stream's first frames)."""

    def __init__(
        self, alpha: float = 1.0, inplace: bool = False, kernel: rowkernel.RowKernel | None = None
    ) -> None:
        super().__init__(alpha, inplace)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = x if self.inplace else torch.empty(x.shape, dtype=torch.float32)
            if self.into(x, y):
                return y
        if x.numel() < 8192:
            out: torch.Tensor = super().forward(x)
            return out
        negative = torch.clamp_max(x, 0).exp_().sub_(1)
        if self.alpha != 1.0:
            negative.mul_(self.alpha)
        out = x.clamp_min_(0) if self.inplace else x.clamp_min(0)
        return out.add_(negative)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``forward(x)`` written into ``out`` (of ``x``'s shape, laid out as
        rows: a slice of the next convolution's padded input; ``x`` itself is
        left as it is), by the kernel; False, nothing written, where the kernel
        does not take them."""
        kernel = self.kernel
        if kernel is None or (torch.is_grad_enabled() and x.requires_grad):
            return False
        return kernel.elu_into(x, self.alpha, out)


def for_serving(decoder: nn.Module) -> Prepared:
    """Fold weight norms, run activations in place where that is safe, use
    ``Snake`` for DAC's ``Snake1d``, and on a CPU ``ELU`` for ``nn.ELU`` (both
    by the row kernel's library there, where it is built), in ``decoder`` (for
    inference only: the folded weights no longer train as ``g`` and ``v``)."""
    on_cpu = all(p.device.type == "cpu" for p in decoder.parameters())
    built = rowkernel.load() if on_cpu else "not on a CPU"
    kernel = built if isinstance(built, rowkernel.RowKernel) else None
    folded = in_place = snakes = elus = 0
    for module in list(decoder.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded += 1
        elif hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            torch.nn.utils.remove_weight_norm(module)
            folded += 1
        if isinstance(module, nn.Sequential):
            for previous, layer in zip(module, list(module)[1:], strict=False):
                # (Not the first module, whose input is the caller's, nor one after
                # a module without weights, which may hand its input on.)
                makes_new = any(True for _ in previous.parameters())
                if isinstance(layer, nn.ELU) and makes_new and not layer.inplace:
                    layer.inplace = True
                    in_place += 1
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Snake1d" and isinstance(
                getattr(child, "alpha", None), nn.Parameter
            ):
                setattr(module, name, Snake(child.alpha, kernel))
                snakes += 1
            elif on_cpu and type(child) is nn.ELU:
                setattr(module, name, ELU(child.alpha, child.inplace, kernel))
                elus += 1
    missing = None if kernel is not None or not (elus or snakes) else str(built)
    return Prepared(folded, in_place, snakes, elus, missing)
