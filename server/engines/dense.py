"""A linear layer's weights as a decode step applies them.

``F.linear`` on a ``[rows, D]`` input is ``addmm(bias, x, weight.t())`` (``mm``
without a bias), and it transposes the weight (a view, but an operation the
dispatcher runs) at every call: a step of a 24-layer model makes a hundred such
views, each costing what a small kernel's launch costs on a CPU. ``Dense.rows``
is that ``addmm`` or ``mm`` bound to a transposed view taken once, when the
weights are read (a ``functools.partial``: no Python frame between the step and
the operation): the same operation on the same tensors, so the same floats.
Calling a ``Dense`` is ``F.linear``, for inputs of any shape (a prefill's
``[rows, S, D]``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.nn import functional as F

__all__ = ["Dense"]


class Dense:
    """``F.linear(x, weight, bias)``; ``rows(x)`` for ``x`` of two dimensions."""

    __slots__ = ("bias", "rows", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        transposed = weight.t()
        self.rows: Callable[[torch.Tensor], torch.Tensor] = (
            partial(torch.mm, mat2=transposed)
            if bias is None
            else partial(torch.addmm, bias, mat2=transposed)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
