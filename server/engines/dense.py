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

On a CPU, a matrix product of a few rows by a large float32 weight is bound by
reading the weight, and MKL's ``addmm`` reads it twice: it first copies the
weight into its blocked layout, at every call (a 3,072 x 1,024 weight times two
rows: 0.61 ms, where reading it once takes 0.28 ms). ``pack`` keeps, beside the
weight, a copy in oneDNN's blocked layout made once (the server packs once every
engine is warm: every model loaded, every key/value table reserved); a step of 2 to
``PACKED_ROWS`` rows (or a prefill of as many positions) multiplies that copy
(0.35 ms for the same two rows; 1.3-2x faster from two to sixteen rows), one
row keeps ``addmm`` (a matrix-vector product, which reads the weight once), and
so do more rows than that (bound by arithmetic, where MKL's product is the
faster). The packed product sums in another order: within float32 rounding of
``F.linear`` (about 1e-6 of the output's size), and each row's result the same
whatever the other rows of the call.

Where memory cannot hold the copies (a 3B-parameter model in float32 on a 24 GB
machine), oneDNN multiplies the weights as they lie, with no copy, for steps of
``DIRECT_ROWS`` to ``PACKED_ROWS`` rows: it reads the weight less often than
MKL's product does (four rows by a 16,384 x 3,072 weight: 24 ms, MKL's about
45, the packed copy's 17-19), and its floats are the packed copy's. Two rows
gain nothing there, and one row keeps ``addmm``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional as F

from .kv import GiB, free_memory

__all__ = ["Dense", "Packing", "pack"]

log = logging.getLogger(__name__)

# Weights of at least this many elements are packed (2 MiB in float32): below
# that, the packed product's own cost (about 20 µs a call here) is more than it
# saves.
PACKED_FROM = 1 << 19
# Rows of a step that go through the packed copy: 2 to this many.
PACKED_ROWS = 32
# Rows of a step that oneDNN multiplies by a weight left as it lies, where the
# copies do not fit: this many to PACKED_ROWS.
DIRECT_ROWS = 3
# Of the memory available when packing, what the packed copies may take.
MEMORY_SHARE = 0.5


class Dense:
    """``F.linear(x, weight, bias)``; ``rows(x)`` for ``x`` of two dimensions."""

    __slots__ = ("bias", "fewest", "packed", "rows", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        # What oneDNN multiplies (``pack``): its blocked copy, or the weight itself;
        # for products of ``fewest`` to PACKED_ROWS rows.
        self.packed: torch.Tensor | None = None
        self.fewest = 2
        transposed = weight.t()
        self.rows: Callable[[torch.Tensor], torch.Tensor] = (
            partial(torch.mm, mat2=transposed)
            if bias is None
            else partial(torch.addmm, bias, mat2=transposed)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and _few(x.numel() // max(1, x.shape[-1]), self.fewest):
            return _packed(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _pack(self, *, copy: bool) -> None:
        if self.packed is not None:
            return
        weight = self.weight.detach()
        if copy:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.packed, self.fewest = weight, DIRECT_ROWS
        self.rows = partial(_packed_rows, self.rows, self.packed, self.bias, self.fewest)


def _few(rows: int, fewest: int) -> bool:
    """Whether a product of ``rows`` rows goes through oneDNN's product."""
    return fewest <= rows <= PACKED_ROWS and not torch.is_autocast_enabled("cpu")


def _packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def _packed_rows(
    plain: Callable[[torch.Tensor], torch.Tensor],
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    fewest: int,
    x: torch.Tensor,
) -> torch.Tensor:
    return _packed(x, packed, bias) if _few(x.shape[0], fewest) else plain(x)


@dataclass(frozen=True, slots=True)
class Packing:
    """What ``pack`` did: how many weights it packed, the bytes the copies
    take (or would have taken), why it packed none where it could have, and
    how many weights oneDNN then multiplies as they lie (``direct``)."""

    weights: int
    bytes: int
    skipped: str | None = None
    direct: int = 0

    @property
    def applied(self) -> bool:
        """Whether oneDNN multiplies any of the weights (copies or as they lie)."""
        return bool(self.weights or self.direct)

    def __str__(self) -> str:
        said = []
        if self.weights:
            said.append(f"{self.weights} weights packed for steps of a few rows")
            said[-1] += f" ({_size(self.bytes)} more)"
        elif self.skipped:
            said.append(f"weights not packed: {self.skipped}")
        if self.direct:
            said.append(f"{self.direct} weights multiplied by oneDNN as they lie")
            said[-1] += f" for steps of {DIRECT_ROWS}-{PACKED_ROWS} rows"
        return "; ".join(said) or "none packed (only large float32 weights on a CPU are)"

    def log(self, name: str) -> None:
        """Say in the log what was packed for model ``name``, or why nothing was."""
        if self.applied or self.skipped:
            log.info("%s: %s", name, self)


def _packable(weight: torch.Tensor) -> bool:
    return bool(
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.numel() >= PACKED_FROM
    )


def _size(count: int) -> str:
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{count / 2**20:.0f} MiB"


def pack(denses: Iterable[Dense], available: Callable[[], int | None] | None = None) -> Packing:
    """Give the large float32 weights of ``denses`` on a CPU a packed copy for
    the steps' products of a few rows, if the memory ``available`` (the
    system's, by default) holds the copies with room to spare (``MEMORY_SHARE``);
    else none (a model that barely fits keeps its memory), and oneDNN multiplies
    the weights as they lie for ``DIRECT_ROWS`` rows or more."""
    chosen = [dense for dense in denses if _packable(dense.weight)]
    if not chosen:
        return Packing(0, 0)
    need = sum(dense.weight.numel() * dense.weight.element_size() for dense in chosen)
    if not torch.backends.mkldnn.is_available() or not hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    ):
        return Packing(0, need, "this torch has no oneDNN linear product")
    free = (available or partial(free_memory, "cpu"))()
    if free is None or need > MEMORY_SHARE * free:
        told = "unknown" if free is None else _size(free)
        direct = [dense for dense in chosen if dense.weight.is_contiguous()]
        for dense in direct:
            dense._pack(copy=False)
        skipped = f"the copies would take {_size(need)}, {told} available"
        return Packing(0, need, skipped, direct=len(direct))
    for dense in chosen:
        dense._pack(copy=True)
    return Packing(len(chosen), need)
