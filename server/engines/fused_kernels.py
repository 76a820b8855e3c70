"""The Triton kernels of ``fused`` (imported only where Triton is).

One program computes ``BLOCK_N`` outputs of every row (at most ``BLOCK_M``): it
reads its ``BLOCK_N`` rows of the weight once, whatever the number of input
rows, and the inputs (a few rows, in the L2 cache) as often as it needs them.

``NORM``: the norm before the product, computed where the product reads its
input: 0 none; 1 a layer norm in float32 (statistics and affine), rounded to
the weight's format, as autocast runs MusicGen's layer norms; 2 the speech
model's RMS norm (float32 statistics, the normalized input rounded to the
model's format, then times the weight, rounded again).
"""

import triton
import triton.language as tl


@triton.jit
def _statistics(
    x_rows, row_ok, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Each row's mean (a layer norm's; else zeros) and reciprocal deviation."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM == 1:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (ks[None, :] < K)
            x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
        mean = total / K
    if NORM != 0:
        spread = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (ks[None, :] < K)
            x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - mean[:, None], 0.0)
            spread += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(spread / K + eps)
    return mean, rstd


@triton.jit
def _inputs(
    x_rows,
    row_ok,
    ks,
    k_ok,
    mean,
    rstd,
    gamma_ptr,
    beta_ptr,
    half: tl.constexpr,
    NORM: tl.constexpr,
):
    """The inputs ``ks`` of every row, normed, in the product's format ``half``."""
    x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if NORM == 1:
        gamma = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
    if NORM == 2:
        gamma = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * rstd[:, None]).to(x_rows.dtype.element_ty).to(tl.float32)
        x = gamma[None, :] * x
    return x.to(half)


@triton.jit
def _finish(
    acc, rows, cols, row_ok, col_ok, w_ptr, bias_ptr, residual_ptr, out_ptr, stride_r, stride_o,
    cache_ptr, positions_ptr, first, width, head_dim, s_which, s_row, s_head, s_position,
    BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """The sums ``acc`` rounded to the weight's format with their bias, then
    GELU, then the residual's sum (in float32, rounded to the output's format);
    with ``STORE``, the keys' and values' columns into the cache too
    (``_store``)."""
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
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=ok)
    if STORE:
        place = cols - first
        head = (place % width) // head_dim
        _store(
            y, rows, row_ok, ok & (place >= 0)[None, :], place // width, head, place % head_dim,
            cache_ptr, positions_ptr, s_which, s_row, s_head, s_position,
        )  # fmt: skip


@triton.jit
def _store(
    y, rows, row_ok, ok, which, head, within, cache_ptr, positions_ptr,
    s_which, s_row, s_head, s_position,
):  # fmt: skip
    """Columns of a joint projection's rows into a layer's key/value cache
    ``[2, R, H, L, d]`` (``d`` contiguous), at each row's position: a column
    ``which`` (0 key, 1 value) of head ``head``, ``within`` its ``d``."""
    at = tl.load(positions_ptr + rows, mask=row_ok, other=0)
    to = cache_ptr + which[None, :] * s_which + rows[:, None] * s_row + head[None, :] * s_head
    to += at[:, None] * s_position + within[None, :]
    tl.store(to, y.to(cache_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rows_product(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, residual_ptr, out_ptr, partial_ptr, count_ptr,
    cache_ptr, positions_ptr,
    M, N, K, stride_x, stride_w, stride_r, stride_o, stride_p,
    first, width, head_dim, s_which, s_row, s_head, s_position, eps,
    NORM: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out = residual + gelu(norm(x) @ w.T + bias)``, each part where asked.

    The product sums in float32 and rounds once to the weight's format (with
    its bias); the GELU rounds once more; the residual sum is in float32,
    rounded to the output's format (the residual's).

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
    half = w_ptr.dtype.element_ty
    x_rows = x_ptr + rows[:, None] * stride_x
    mean, rstd = _statistics(x_rows, row_ok, K, eps, NORM, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = w_ptr + cols[:, None] * stride_w
    share = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    low = part * share
    high = tl.minimum(low + share, K)
    for start in range(low, high, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < high
        x = _inputs(x_rows, row_ok, ks, k_ok, mean, rstd, gamma_ptr, beta_ptr, half, NORM)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if SPLIT == 1:
        _finish(
            acc, rows, cols, row_ok, col_ok, w_ptr, bias_ptr, residual_ptr, out_ptr,
            stride_r, stride_o, cache_ptr, positions_ptr, first, width, head_dim,
            s_which, s_row, s_head, s_position, BIAS, GELU, RESIDUAL, STORE,
        )  # fmt: skip
    else:
        place = rows[:, None] * stride_p + cols[None, :]
        tl.store(partial_ptr + part * BLOCK_M * stride_p + place, acc, mask=col_ok[None, :])
        # Every thread's part stored before the count (a barrier, then the
        # atomic's release), the count read before the parts (its acquire).
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
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
                stride_r, stride_o, cache_ptr, positions_ptr, first, width, head_dim,
                s_which, s_row, s_head, s_position, BIAS, GELU, RESIDUAL, STORE,
            )  # fmt: skip
            tl.atomic_xchg(count_ptr + pid, 0)


@triton.jit
def _times(a, b, half: tl.constexpr):
    """``a * b`` of two values in ``half``, rounded to it (as a 16-bit product)."""
    return (a.to(tl.float32) * b.to(tl.float32)).to(half)


@triton.jit
def _plus(a, b, half: tl.constexpr):
    return (a.to(tl.float32) + b.to(tl.float32)).to(half)


@triton.jit
def rows_pair_product(
    x_ptr, w_ptr, bias_ptr, gamma_ptr, cos_ptr, sin_ptr, out_ptr, cache_ptr, positions_ptr,
    M, K, pair, rotated, stride_x, stride_w, stride_c, stride_o,
    kv_first, kv_heads, s_which, s_row, s_head, s_position, eps,
    NORM: tl.constexpr, BIAS: tl.constexpr, GLU: tl.constexpr, STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Two products of the same normed inputs, of weight rows ``a`` and
    ``a + pair``, finished together (each rounded to the weight's format first,
    with its bias; every operation after rounds once, as the separate 16-bit
    operations do).

    ``GLU``: ``silu(a) * b`` (a gate and its up projection, ``pair`` apart), into
    the output's columns ``a``: program ``n`` computes columns ``n * BLOCK_N``
    on.

    Else rotary positions: program ``h`` computes head ``h``'s two halves
    (``BLOCK_N`` = ``pair`` = half a head) into the same columns; heads below
    ``rotated`` (the queries' and keys') are rotated by each row's ``cos`` and
    ``sin`` (``[M, 2 * BLOCK_N]``, the sines' first half negated):
    ``(a, b) * cos + (b, a) * sin``. With ``STORE``, the heads from
    ``kv_first`` on (``kv_heads`` keys', then as many values') into a layer's
    key/value cache ``[2, R, H, L, d]`` too, at each row's position.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    if GLU:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < pair
    else:
        cols = pid * 2 * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols >= 0
    row_ok = rows < M
    half = w_ptr.dtype.element_ty
    x_rows = x_ptr + rows[:, None] * stride_x
    mean, rstd = _statistics(x_rows, row_ok, K, eps, NORM, BLOCK_M, BLOCK_K)
    first = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    second = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_first = w_ptr + cols[:, None] * stride_w
    w_second = w_first + pair * stride_w
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = _inputs(x_rows, row_ok, ks, k_ok, mean, rstd, gamma_ptr, gamma_ptr, half, NORM)
        w_ok = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_first + ks[None, :], mask=w_ok, other=0.0)
        first = tl.dot(x, tl.trans(w), first)
        w = tl.load(w_second + ks[None, :], mask=w_ok, other=0.0)
        second = tl.dot(x, tl.trans(w), second)
    if BIAS:
        first += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        second += tl.load(bias_ptr + pair + cols, mask=col_ok, other=0.0).to(tl.float32)
    a = first.to(half)
    b = second.to(half)
    ok = row_ok[:, None] & col_ok[None, :]
    if GLU:
        f = a.to(tl.float32)
        gated = (f / (1.0 + tl.exp(-f))).to(half)
        y = _times(gated, b, half)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=ok)
    else:
        if pid < rotated:
            halves = tl.arange(0, BLOCK_N)
            at = rows[:, None] * stride_c + halves[None, :]
            cos_a = tl.load(cos_ptr + at, mask=ok, other=0.0)
            cos_b = tl.load(cos_ptr + at + BLOCK_N, mask=ok, other=0.0)
            sin_a = tl.load(sin_ptr + at, mask=ok, other=0.0)
            sin_b = tl.load(sin_ptr + at + BLOCK_N, mask=ok, other=0.0)
            turned_a = _times(b, sin_a, half)
            turned_b = _times(a, sin_b, half)
            a = _plus(_times(a, cos_a, half), turned_a, half)
            b = _plus(_times(b, cos_b, half), turned_b, half)
        places = out_ptr + rows[:, None] * stride_o + cols[None, :]
        tl.store(places, a, mask=ok)
        tl.store(places + BLOCK_N, b, mask=ok)
        if STORE:
            _store_head(
                a, b, pid - kv_first, kv_heads, rows, row_ok, ok, cache_ptr, positions_ptr,
                s_which, s_row, s_head, s_position, BLOCK_N,
            )  # fmt: skip


@triton.jit
def _store_head(
    a, b, index, kv_heads, rows, row_ok, ok, cache_ptr, positions_ptr,
    s_which, s_row, s_head, s_position, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """A head's halves ``a``, ``b`` into a layer's key/value cache at each row's
    position, where it is a key's or value's (``index``: the heads' from the
    first key's on, ``kv_heads`` keys' then as many values'; negative: a
    query's, stored nowhere)."""
    if index >= 0:
        which = index // kv_heads
        head = index % kv_heads
        at = tl.load(positions_ptr + rows, mask=row_ok, other=0)
        halves = tl.arange(0, BLOCK_N)
        to = cache_ptr + which * s_which + head * s_head + rows[:, None] * s_row
        to += at[:, None] * s_position + halves[None, :]
        tl.store(to, a.to(cache_ptr.dtype.element_ty), mask=ok)
        tl.store(to + BLOCK_N, b.to(cache_ptr.dtype.element_ty), mask=ok)
