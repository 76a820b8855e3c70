"""The Triton kernel of ``fused.RowProduct`` (imported only where Triton is).

One program computes ``BLOCK_N`` outputs of every row (at most ``BLOCK_M``): it
reads its ``BLOCK_N`` rows of the weight once, whatever the number of input
rows, and the inputs (a few rows, in the L2 cache) as often as it needs them.
"""

import triton
import triton.language as tl


@triton.jit
def _finish(
    acc,
    rows,
    cols,
    row_ok,
    col_ok,
    w_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    stride_r,
    stride_o,
    BIAS: tl.constexpr,
    GELU: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    """The sums ``acc`` rounded to the weight's format with their bias, then
    GELU, then the residual's sum (in float32, rounded to the output's format)."""
    half = w_ptr.dtype.element_ty
    if BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = acc.to(half)
    if GELU:
        f = y.to(tl.float32)
        y = (0.5 * f * (1.0 + tl.math.erf(f * 0.7071067811865476))).to(half)
    ok = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
        y = r.to(tl.float32) + y.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok
    )


@triton.jit
def rows_product(
    x_ptr,
    w_ptr,
    bias_ptr,
    gamma_ptr,
    beta_ptr,
    residual_ptr,
    out_ptr,
    partial_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_r,
    stride_o,
    stride_p,
    eps,
    NORM: tl.constexpr,
    BIAS: tl.constexpr,
    GELU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out = residual + gelu(norm(x) @ w.T + bias)``, each part where asked.

    ``norm``: a layer norm over ``x``'s ``K`` columns in float32 (statistics and
    affine), rounded to the weight's format, as autocast runs the models' layer
    norms before a product. The product sums in float32 and rounds once to the
    weight's format (with its bias); the GELU rounds once more; the residual
    sum is in float32, rounded to the output's format (the residual's).

    ``SPLIT`` > 1: program ``(n, s)`` sums the ``s``-th of ``SPLIT`` parts of
    ``K`` into ``partial[s]`` (float32, ``[SPLIT, BLOCK_M, N]``, rows
    ``stride_p`` apart); the last of a column block's programs to finish (a
    counter per block, ``count``) adds the parts in order (the same sums
    whichever program finishes last) and finishes, then sets the counter back
    to zero for the next call.
    """
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows[:, None] * stride_x
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (ks[None, :] < K)
            x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
        mean = total / K
        spread = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (ks[None, :] < K)
            x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - mean[:, None], 0.0)
            spread += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(spread / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + cols[:, None] * stride_w
    share = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    low = part * share
    high = tl.minimum(low + share, K)
    for start in range(low, high, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < high
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            gamma = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        x = x.to(w_ptr.dtype.element_ty)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if SPLIT == 1:
        _finish(
            acc, rows, cols, row_ok, col_ok, w_ptr, bias_ptr, residual_ptr, out_ptr,
            stride_r, stride_o, BIAS, GELU, RESIDUAL,
        )  # fmt: skip
    else:
        place = rows[:, None] * stride_p + cols[None, :]
        tl.store(partial_ptr + part * BLOCK_M * stride_p + place, acc, mask=col_ok[None, :])
        # (acq_rel: the part stored before the count, the count read before the parts)
        ticket = tl.atomic_add(count_ptr + pid, 1)
        if ticket == SPLIT - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for p in range(SPLIT):
                acc += tl.load(
                    partial_ptr + p * BLOCK_M * stride_p + place,
                    mask=col_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
            _finish(
                acc, rows, cols, row_ok, col_ok, w_ptr, bias_ptr, residual_ptr, out_ptr,
                stride_r, stride_o, BIAS, GELU, RESIDUAL,
            )  # fmt: skip
            tl.atomic_xchg(count_ptr + pid, 0)
