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

Where this machine can build ``rowkernel``'s product (an x86-64 CPU with AVX2
and a C compiler), ``pack`` gives it the steps (and prefills) of one to
``KERNEL_ROWS`` rows, before either of those: it reads the weight once for up to
eight rows, with no copy (four rows by that weight: 15 ms), and each row's
result is the same bit for bit whatever the call's other rows, one row
included. The packed copies, or oneDNN over the weights as they lie, then take
the steps of more rows, up to ``PACKED_ROWS``. A model run in bfloat16 gets the
kernel's bfloat16 product for its large weights' steps of one to
``HALF_ROWS`` rows (half the bytes of float32 to read; one row in 0.4-0.7x the
time of the library's bfloat16 product), the library's for more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.nn import functional as F

from . import rowkernel
from .kv import GiB, free_memory

__all__ = ["Attend", "Dense", "Packing", "pack", "step_attention"]

log = logging.getLogger(__name__)

# A decode step's attention: ``(q, k, v, additive mask) -> out``, as
# ``scaled_dot_product_attention`` with one query a row.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

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
# Rows of a step that the row kernel multiplies, where it is built: 1 to this many.
KERNEL_ROWS = rowkernel.MOST_ROWS
# The same for bfloat16 weights (a model run in bfloat16): one row in 0.4-0.7x
# the library's bfloat16 product's time, four in about the same, and from six
# the library's is the faster (``bench/bench_rows.py --dtype bfloat16``).
HALF_ROWS = 4


class Dense:
    """``F.linear(x, weight, bias)``; ``rows(x)`` for ``x`` of two dimensions."""

    __slots__ = ("bias", "fewest", "kernel", "packed", "plain", "rows", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        # The row kernel's product over this weight (``pack``), for products of
        # 1 to KERNEL_ROWS rows.
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
        # What oneDNN multiplies (``pack``): its blocked copy, or the weight itself;
        # for products of ``fewest`` to PACKED_ROWS rows.
        self.packed: torch.Tensor | None = None
        self.fewest = 2
        transposed = weight.t()
        self.plain: Callable[[torch.Tensor], torch.Tensor] = (
            partial(torch.mm, mat2=transposed)
            if bias is None
            else partial(torch.addmm, bias, mat2=transposed)
        )
        self.rows = self.plain

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None and self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // max(1, x.shape[-1])
        if self.kernel is not None and _kernel(rows, x.dtype):
            return self.kernel(x)
        if self.packed is not None and _few(rows, self.fewest):
            return _packed(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _route(self) -> None:
        self.rows = partial(_routed, self.plain, self.kernel, self.packed, self.bias, self.fewest)

    def _pack(self, *, copy: bool) -> None:
        if self.packed is not None:
            return
        weight = self.weight.detach()
        if copy:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.packed, self.fewest = weight, DIRECT_ROWS
        self._route()

    def _use(self, kernel: rowkernel.RowKernel) -> None:
        bias = None if self.bias is None else self.bias.detach().contiguous()
        self.kernel = partial(kernel.product, self.weight.detach(), bias)
        self._route()


def _most(dtype: torch.dtype) -> int:
    """The most rows of ``dtype`` a product by the row kernel takes."""
    return KERNEL_ROWS if dtype == torch.float32 else min(KERNEL_ROWS, HALF_ROWS)


def _kernel(rows: int, dtype: torch.dtype) -> bool:
    """Whether a product of ``rows`` rows of ``dtype`` goes through the row kernel."""
    return rows <= _most(dtype) and not torch.is_autocast_enabled("cpu")


def _few(rows: int, fewest: int) -> bool:
    """Whether a product of ``rows`` rows goes through oneDNN's product."""
    return fewest <= rows <= PACKED_ROWS and not torch.is_autocast_enabled("cpu")


def _packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def _routed(
    plain: Callable[[torch.Tensor], torch.Tensor],
    kernel: Callable[[torch.Tensor], torch.Tensor] | None,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None,
    fewest: int,
    x: torch.Tensor,
) -> torch.Tensor:
    rows = x.shape[0]
    if kernel is not None and _kernel(rows, x.dtype):
        return kernel(x)
    if packed is not None and _few(rows, fewest):
        return _packed(x, packed, bias)
    return plain(x)


@dataclass(frozen=True, slots=True)
class Packing:
    """What ``pack`` did: how many weights it packed, the bytes the copies
    take (or would have taken), why it packed none where it could have, how
    many weights oneDNN then multiplies as they lie (``direct``), how many
    the row kernel multiplies (``kernel``), or why it could not (``no_kernel``),
    and whether the steps attend by the row kernel (``attention``)."""

    weights: int
    bytes: int
    skipped: str | None = None
    direct: int = 0
    kernel: int = 0
    no_kernel: str | None = None
    attention: bool = False  # (the step's attention by the row kernel: ``step_attention``)
    wide: bool = False  # the row kernel's wide build (``rowkernel.load``)
    halves: int = 0  # bfloat16 weights the row kernel multiplies (1 to ``HALF_ROWS`` rows)

    @property
    def applied(self) -> bool:
        """Whether the row kernel or oneDNN multiplies any of the weights, or the
        row kernel attends."""
        return bool(self.weights or self.direct or self.kernel or self.halves or self.attention)

    def __str__(self) -> str:
        said = []
        if self.kernel:
            said.append(f"{self.kernel} weights multiplied by the row kernel")
            said[-1] += " (its wide build)" if self.wide else ""
            said[-1] += f" for steps of 1-{KERNEL_ROWS} rows"
        elif self.no_kernel:
            said.append(f"no row kernel: {self.no_kernel}")
        after = KERNEL_ROWS + 1 if self.kernel else None
        if self.weights:
            said.append(
                f"{self.weights} weights packed for steps of {after or 2}-{PACKED_ROWS} rows"
            )
            said[-1] += f" ({_size(self.bytes)} more)"
        elif self.skipped:
            said.append(f"weights not packed: {self.skipped}")
        if self.direct:
            said.append(f"{self.direct} weights multiplied by oneDNN as they lie")
            said[-1] += f" for steps of {after or DIRECT_ROWS}-{PACKED_ROWS} rows"
        if self.halves:
            said.append(f"{self.halves} bfloat16 weights multiplied by the row kernel")
            said[-1] += f" for steps of 1-{_most(torch.bfloat16)} rows"
        if self.attention:
            said.append("the steps' attention by the row kernel")
        return "; ".join(said) or "none packed (only large float32 weights on a CPU are)"

    def log(self, name: str) -> None:
        """Say in the log what was packed for model ``name``, or why nothing was."""
        if self.applied or self.skipped:
            log.info("%s: %s", name, self)


def _halves(weight: torch.Tensor) -> bool:
    """Whether the row kernel takes a bfloat16 weight's steps: as large as a
    packed float32 weight, and contiguous."""
    return bool(
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.numel() >= PACKED_FROM
        and weight.is_contiguous()
    )


def _packable(weight: torch.Tensor) -> bool:
    return bool(
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.numel() >= PACKED_FROM
    )


def step_attention(device: torch.device, dtype: torch.dtype, head_dim: int) -> Attend | None:
    """The row kernel's attention (``RowKernel.attend``) for the decode steps of
    a model on ``device`` in ``dtype`` with heads of ``head_dim``, where it is
    built and turned on (``KERNEL_ROWS``) and suits the model: float32 on a CPU,
    heads a multiple of 8 up to ``rowkernel.MOST_HEAD``; else None (the
    library's). It reads a row's keys and values once and skips
    the positions the mask leaves out, where the library's reads views of a
    cache at a fraction of the memory's speed (eight rows of 16 heads over 64
    positions: 0.47 against 1.1 ms a layer here; the test models' eight rows of
    two heads of 16 over 512: 54 against 113 µs; ``bench/bench_attention.py``)."""
    if device.type != "cpu" or dtype != torch.float32 or not KERNEL_ROWS:
        return None
    if head_dim % 8 or head_dim > rowkernel.MOST_HEAD:
        return None
    kernel = rowkernel.built()
    return None if kernel is None else kernel.attend


def _size(count: int) -> str:
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{count / 2**20:.0f} MiB"


def pack(denses: Iterable[Dense], available: Callable[[], int | None] | None = None) -> Packing:
    """Give the large float32 weights of ``denses`` on a CPU the row kernel's
    product for steps of 1 to ``KERNEL_ROWS`` rows, where it can be built, and a
    packed copy for the steps' products of a few rows (more than the kernel's),
    if the memory ``available`` (the system's, by default) holds the copies with
    room to spare (``MEMORY_SHARE``); else none (a model that barely fits keeps
    its memory), and oneDNN multiplies the weights as they lie for
    ``DIRECT_ROWS`` rows or more. Large bfloat16 weights get the row kernel for
    steps of 1 to ``HALF_ROWS`` rows (the library's product for more)."""
    denses = list(denses)
    halves = [dense for dense in denses if _halves(dense.weight)]
    chosen = [dense for dense in denses if _packable(dense.weight)]
    if not halves and not chosen:
        return Packing(0, 0)
    lying = [dense for dense in chosen if dense.weight.is_contiguous()]
    kernel = rowkernel.load() if KERNEL_ROWS else "turned off"
    if isinstance(kernel, rowkernel.RowKernel):
        for dense in [*halves, *lying]:
            dense._use(kernel)
        kernels = Packing(0, 0, kernel=len(lying), wide=kernel.wide, halves=len(halves))
    elif not chosen:
        return Packing(0, 0)  # (the library's bfloat16 products, as without it)
    else:
        kernels = Packing(0, 0, no_kernel=kernel)
    if not chosen:
        return kernels
    need = sum(dense.weight.numel() * dense.weight.element_size() for dense in chosen)
    if not torch.backends.mkldnn.is_available() or not hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    ):
        return replace(kernels, bytes=need, skipped="this torch has no oneDNN linear product")
    free = (available or partial(free_memory, "cpu"))()
    if free is None or need > MEMORY_SHARE * free:
        told = "unknown" if free is None else _size(free)
        for dense in lying:
            dense._pack(copy=False)
        skipped = f"the copies would take {_size(need)}, {told} available"
        return replace(kernels, bytes=need, skipped=skipped, direct=len(lying))
    for dense in chosen:
        dense._pack(copy=True)
    return replace(kernels, weights=len(chosen), bytes=need)
