"""A decode step's products of a few rows as one kernel each, with the norm
before them and the activation and residual sum after them (CUDA, Triton).

On a GPU a decode step of a few rows is bound by its kernels' count and latency,
not by arithmetic or bytes: an H200's recorded step of musicgen-small at one
stream (two rows) ran 560 kernels in 1.94 ms, its 169 products averaging 5.4 µs
for two to eight MB of weights each (a tenth of the memory's speed), and its
73 layer norms, the casts of their outputs to float16 and the residual sums
another 600 µs (``bench/bench_fused.py --profile``). ``RowProduct`` is one
Triton kernel for ``residual + gelu(norm(x) @ w.T + bias)`` (each part where
the model has it): every program reads a slice of the weight's rows once for
all the step's rows, and the norm's statistics are computed where the product
reads its input, so a layer's two norms, their casts, the activation and the
three residual sums launch nothing of their own. The joint projection also
writes each row's key and value into the cache at the row's position
(``Store``), so the cache's writes (a scatter a layer, 4 µs each on the H200)
launch nothing either.

The speech step's layer (an H200's recorded step of random-higgs-3b: 763
kernels, 289 of them elementwise) goes in four: ``PairProduct`` computes two
products of the same normed rows together, the query, key and value projection
with the rotary positions applied to each head's two halves, or the gate and up
projection with ``silu(gate) * up`` (the rotated keys and the values written
into the cache as well); ``RowProduct`` the out and down
projections with their residual sums. The RMS norm is the model's (float32
statistics, rounded, then times its weight).

The floats are the separate operations' up to the product's order of
summation: the norm in float32 rounded to the weight's format (as autocast runs
MusicGen's layer norms, as the speech model rounds its own), the product summed
in float32 and rounded once with its bias, every operation after it rounding
once more, as the separate 16-bit operations do (in Triton's interpreter on a
CPU the speech step's logits and cache are the library step's, bit for bit
where the library's product sums in NumPy's order, else a rare value one
rounding apart: ``scripts/fused-on-cpu``). Each row's result is
the same whatever the other rows of the call: a program sums every row in the
same order, and the rows are only padded to ``BLOCK_M``.

For 16-bit models on CUDA where Triton is installed (it comes with PyTorch's
CUDA builds), for steps of up to ``FUSED_ROWS`` rows; more rows, a CPU, float32
and a machine without Triton keep the library's operations. Off until it is
measured in the engines' recorded steps (``ENABLED``, set before a model is
loaded; the benchmarks' ``--fused-products``): on an H200 the kernel alone beat
the library's operations for musicgen-small's products of two rows (a layer's
five: 34 against 52 µs) but not yet for large's (68 against 63 µs), before the
long products were split (``split_for``; ``bench/bench_products.py``). The
speech kernels have not run on a GPU yet.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "ENABLED",
    "FUSED_ROWS",
    "LAYER_NORM",
    "RMS_NORM",
    "Config",
    "Norm",
    "PairProduct",
    "RowProduct",
    "Store",
    "available",
    "fitting",
    "kernels",
    "split_for",
]

# Rows of a step that the fused product takes; more go by the library's.
FUSED_ROWS = 32
ENABLED = False


@functools.cache
def kernels() -> ModuleType | None:
    """The Triton kernels' module, or None where Triton cannot be imported."""
    try:
        from . import fused_kernels
    except ImportError:
        return None
    return fused_kernels


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device`` in ``dtype`` steps by ``RowProduct``."""
    if not ENABLED or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return kernels() is not None


# The norms before a product (``fused_kernels``' ``NORM``).
LAYER_NORM = 1
RMS_NORM = 2


@dataclass(frozen=True, slots=True)
class Norm:
    """A norm before the product: a layer norm's float32 weight and bias ``[K]``
    (``of``), or the speech model's RMS norm's weight in the model's format
    (``rms``; ``bias`` unused)."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    kind: int = LAYER_NORM

    @classmethod
    def of(cls, module: torch.nn.LayerNorm, device: torch.device) -> Norm:
        (size,) = module.normalized_shape
        weight = torch.ones(size, device=device) if module.weight is None else module.weight
        bias = torch.zeros(size, device=device) if module.bias is None else module.bias
        return cls(weight.detach().float(), bias.detach().float(), float(module.eps))

    @classmethod
    def rms(cls, weight: torch.Tensor, eps: float) -> Norm:
        return cls(weight.detach(), weight.detach(), float(eps), RMS_NORM)


@dataclass(frozen=True, slots=True)
class Store:
    """Where a joint projection's keys and values go besides its output: a
    layer's cache ``[2, R, H, L, d]`` (keys, then values; ``d`` contiguous), at
    each row's position (``[R]``), from its ``first`` key's column
    (``RowProduct``) or head (``PairProduct``) on."""

    cache: torch.Tensor
    positions: torch.Tensor
    first: int

    def strides(self) -> list[int]:
        """The cache's strides for key or value, row, head and position."""
        if self.cache.dim() != 5 or self.cache.stride(4) != 1:
            raise ValueError("a cache of [2, rows, heads, positions, d], d contiguous")
        return [int(self.cache.stride(i)) for i in range(4)]


@dataclass(frozen=True, slots=True)
class Config:
    """A launch's blocks: outputs a program computes, inputs summed per pass,
    warps, pipeline stages; ``split``: programs summing parts of the inputs for
    the same outputs (0: by ``split_for``)."""

    block_n: int = 32
    block_k: int = 256
    warps: int = 4
    stages: int = 3
    split: int = 0


# Programs a launch should have at least (an H100 or H200 has 132 multiprocessors),
# and the fewest inputs a part of a split product sums.
PROGRAMS = 128
LEAST_PART = 1024
# Bytes a program's pipelined tiles (weight rows and input rows, 16-bit, a copy
# per stage) may take of its multiprocessor's shared memory (227 KB on an H100
# or H200; the rest left to the compiler's own).
SHARED = 160 * 1024
PAIR_STAGES = 3


def fitting(block_k: int, rows: int, stages: int) -> int:
    """``block_k``, halved until ``stages`` copies of ``rows`` rows of it fit in
    ``SHARED`` (fixed per product, whatever a call's rows: a row's sums then go
    in the same order in every call)."""
    while block_k > 32 and rows * block_k * 2 * stages > SHARED:
        block_k //= 2
    return block_k


def split_for(n: int, k: int, block_n: int) -> int:
    """Parts to split the inputs of a product with ``n`` outputs and ``k`` inputs
    into, a power of two: until the launch has ``PROGRAMS`` programs, each part
    ``LEAST_PART`` inputs at least (musicgen-small's second feed-forward product,
    1,024 outputs of 4,096 inputs, by blocks of 32: four parts, 128 programs)."""
    programs = -(-n // block_n)
    split = 1
    while programs * split < PROGRAMS and k // (2 * split) >= LEAST_PART:
        split *= 2
    return split


def _block_m(rows: int) -> int:
    """Rows padded to 16 (the matrix units' least) or the next power of two."""
    return max(16, 1 << (rows - 1).bit_length())


class RowProduct:
    """``residual + gelu(norm(x) @ weight.T + bias)`` for ``x`` ``[rows, K]``.

    The output is in the weight's format, or the residual's where there is one
    (a float32 residual stream stays float32, as a 16-bit product added to it
    under autocast leaves it).

    Args:
        weight: ``[N, K]``, its rows contiguous. A weight not in ``dtype`` (a
            model's float32 weights under autocast) is copied into it once, as
            autocast casts it at every call.
        bias: ``[N]`` or None.
        norm: A layer norm of ``x`` first, or None.
        gelu: Apply GELU (erf's) to the product.
        dtype: The product's format (16-bit).
    """

    __slots__ = ("bias", "config", "count", "gelu", "norm", "partial", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        norm: Norm | None = None,
        gelu: bool = False,
        dtype: torch.dtype | None = None,
        config: Config | None = None,
    ) -> None:
        self.weight, self.bias = weight, bias = _in_format(weight, bias, dtype)
        self.norm = norm
        self.gelu = gelu
        n, k = weight.shape
        c = config or Config()
        if not c.split:
            c = replace(c, split=split_for(int(n), int(k), c.block_n))
        most = _block_m(FUSED_ROWS)
        self.config = c = replace(c, block_k=fitting(c.block_k, c.block_n + most, c.stages))
        # A split product's parts (every row a call may have) and its blocks' counters.
        self.partial: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        if c.split > 1:
            self.partial = torch.empty(c.split * most * n, device=weight.device)
            self.count = torch.zeros(-(-n // c.block_n), dtype=torch.int32, device=weight.device)

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, store: Store | None = None
    ) -> torch.Tensor:
        module, x = _ready(x)
        rows, k = x.shape
        w, c = self.weight, self.config
        n = int(w.shape[0])
        dtype = w.dtype if residual is None else residual.dtype
        out = torch.empty(rows, n, dtype=dtype, device=x.device)
        block_m = _block_m(rows)
        if c.split > 1 and block_m > _block_m(FUSED_ROWS):
            raise ValueError(f"a split product takes at most {FUSED_ROWS} rows")
        norm = self.norm
        _launch(
            module.rows_product[(-(-n // c.block_n), c.split)],
            x,
            w,
            self.bias,
            norm,
            [None if norm is None else norm.bias, residual, out, self.partial, self.count],
            [rows, n, k, x.stride(0), w.stride(0), _stride(residual), out.stride(0), n],
            store,
            [0, 0] if store is None else _head_sizes(store),
            GELU=self.gelu,
            RESIDUAL=residual is not None,
            SPLIT=c.split,
            BLOCK_M=block_m,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            num_warps=c.warps,
            num_stages=c.stages,
        )
        return out


def _in_format(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` (rows contiguous) and ``bias`` in ``dtype`` (16-bit; by default
    the weight's), copied where they are not."""
    dtype = dtype or weight.dtype
    if weight.dim() != 2 or dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("a 16-bit product of a matrix")
    weight = weight.detach().to(dtype)
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return weight, None if bias is None else bias.detach().to(dtype)


def _ready(x: torch.Tensor) -> tuple[ModuleType, torch.Tensor]:
    """The kernels' module, and ``x`` with its rows contiguous."""
    module = kernels()
    assert module is not None, "Triton is not installed"
    return module, x if x.stride(1) == 1 else x.contiguous()


def _stride(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.stride(0)


def _head_sizes(store: Store) -> list[int]:
    """A joint projection's keys' width ``H * d`` and ``d``, from its cache."""
    _, _, heads, _, d = store.cache.shape
    return [int(heads * d), int(d)]


def _launch(
    kernel: Any,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    norm: Norm | None,
    pointers: list[torch.Tensor | None],
    scalars: list[int],
    store: Store | None,
    sizes: list[int],
    **constants: Any,
) -> None:
    """``kernel(x, w, bias, norm's weight, *pointers, cache, positions,
    *scalars, store's first, *sizes, cache's strides, eps, NORM, BIAS, STORE,
    **constants)``; ``w`` where a pointer is None (the kernel does not read
    it), zeros for the store's first and strides where there is none."""
    given = [bias, None if norm is None else norm.weight, *pointers]
    given += [None, None] if store is None else [store.cache, store.positions]
    first, strides = (0, [0] * 4) if store is None else (store.first, store.strides())
    kernel(
        x,
        w,
        *(w if p is None else p for p in given),
        *scalars,
        first,
        *sizes,
        *strides,
        1e-5 if norm is None else norm.eps,
        NORM=0 if norm is None else norm.kind,
        BIAS=bias is not None,
        STORE=store is not None,
        **constants,
    )


class PairProduct:
    """Two products of the same normed rows, finished together (``[rows, K]``
    inputs): a gate and its up projection, ``silu(gate) * up`` (``glu``: the
    weight's first half of rows the gates', its second the ups'; ``[rows, N / 2]``
    out); or the queries', keys' and values' projection with the rotary
    positions applied to the queries and keys (``head_dim``, ``rotated`` heads:
    ``[rows, N]`` out, each row rotated by its ``cos`` and ``sin`` ``[rows,
    head_dim]``, the sines' first half negated). Each result rounds as the
    separate 16-bit operations do (``fused_kernels.rows_pair_product``)."""

    __slots__ = ("bias", "block_k", "block_n", "glu", "head_dim", "norm", "rotated", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        glu: bool = False,
        head_dim: int = 0,
        rotated: int = 0,
        norm: Norm | None = None,
        dtype: torch.dtype | None = None,
        config: Config | None = None,
    ) -> None:
        n = int(weight.shape[0])
        if glu and n % 2:
            raise ValueError("a gate and up projection has an even number of rows")
        if not glu and (not self.suits(head_dim) or n % head_dim):
            raise ValueError("heads of a multiple of 32, filling the rows")
        if norm is not None and norm.kind != RMS_NORM:
            raise ValueError("a pair of products takes the RMS norm (Norm.rms)")
        self.weight, self.bias = _in_format(weight, bias, dtype)
        self.norm = norm
        self.glu = glu
        self.head_dim = head_dim
        self.rotated = rotated
        c = config or Config()
        self.block_n = c.block_n if glu else head_dim // 2
        most = _block_m(FUSED_ROWS)
        self.block_k = fitting(c.block_k, 2 * self.block_n + most, PAIR_STAGES)

    @staticmethod
    def suits(head_dim: int) -> bool:
        """Whether heads of ``head_dim`` can be rotated in the kernel: halves of a
        multiple of 16 (the matrix units' least)."""
        return head_dim % 32 == 0

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        store: Store | None = None,
    ) -> torch.Tensor:
        module, x = _ready(x)
        rows, k = x.shape
        w = self.weight
        n = int(w.shape[0])
        out = torch.empty(rows, n // 2 if self.glu else n, dtype=w.dtype, device=x.device)
        if self.glu:
            pair, programs = n // 2, -(-(n // 2) // self.block_n)
        else:
            pair, programs = self.head_dim // 2, n // self.head_dim
            assert cos is not None and sin is not None and cos.stride() == sin.stride()
        _launch(
            module.rows_pair_product[(programs,)],
            x,
            w,
            self.bias,
            self.norm,
            [cos, sin, out],
            [rows, k, pair, self.rotated, x.stride(0), w.stride(0), _stride(cos), out.stride(0)],
            store,
            [0 if store is None else int(store.cache.shape[2])],
            GLU=self.glu,
            BLOCK_M=_block_m(rows),
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            num_warps=4,
            num_stages=PAIR_STAGES,
        )
        return out
