"""A step's products and attention on a CPU, in C: a few rows by a large weight, reading it once.

A decode step multiplies a few rows (one per stream, two for a guidance pair) by
every large weight of the model, and on a CPU that product is bound by reading
the weight from memory: one row (MKL's matrix-vector product) reads it once. The
libraries' products of two to eight rows by a weight as it lies read it about
once per row (four rows by a 16,384 x 3,072 weight: MKL's 50-60 ms, oneDNN's
24-31, where one row costs 11-12); oneDNN's packed copy reads it once, but takes
as much memory again, which a 3B-parameter model in float32 does not leave.

This module's kernel streams the weight once for up to eight rows: a few of
the weight's rows at a time (eight for one input row, four for more) are
multiplied by every input row while they are in cache (past four input rows, in
more passes over them), eight lanes of fused multiply-adds per output, summed
at the end. Four rows by that weight take 15 ms, eight 22, one 11 where MKL's
takes 13-14 (``bench/bench_rows.py``; from sixteen rows oneDNN's are the
faster). Where four of the weight's rows fit in the first-level cache beside
the input rows (MusicGen-small's inputs of 1,024), the passes fetch the next
four rows ahead, while the arithmetic runs: 10-25% less for three to eight
rows. Each output is summed in the same order whatever the call's other
rows, so a row's result does not depend on its neighbours, or on how many they
are (one row included): bit for bit. Against a float64 product it is as close
as MKL's (a few 1e-7 of the output's size).

The same library holds a decode step's attention (``RowKernel.attend``): one
query a row against its keys and values, which a step reads as views of a
cache (a row's first positions of a longer table). The library's attention
reads such views at a fraction of the memory's speed (eight rows of 16 heads
over 64 positions of a 1,506-position table: 1.1 ms a layer); this one reads
each (row, head)'s positions once, in order, and skips those the mask leaves
out (0.58 ms; ``bench/bench_attention.py``: 0.4-0.8x the library's time for the
released models' heads). A row's result does not depend on the others of the call.

It is C (AVX2 and FMA), compiled with the machine's C compiler when first asked
for (about a second), and checked against float64 products before it is used;
where there is no compiler, no such CPU or the check fails, ``load`` says why
and the libraries' products stay. The work is split over torch's threads for a
weight large enough to pay for starting them. The call releases the GIL
(``ctypes``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch.nn import functional as F

__all__ = ["MOST_HEAD", "MOST_ROWS", "RowKernel", "load"]

log = logging.getLogger(__name__)

# Rows a call multiplies at once (the kernel's blocks: one to eight).
MOST_ROWS = 8
# Elements of the weight a thread of its own must have to be worth starting
# (for attention: of the keys it reads).
PER_THREAD = 1 << 21
# The longest head the attention kernel takes (its registers hold one query).
MOST_HEAD = 256

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

int rows_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

typedef struct {
    const float *w, *x, *bias;
    float *y;
    long n0, n1, K, ldx, ldy, M;
} task_t;

/* R input rows by WR rows of the weight from row n: every output is summed
   the same way (lane j adds k = j mod 8 in order, then the lanes), whatever R
   and WR, so a row's result does not depend on the others of the call.
   Meanwhile rows p0 to p1 of `next` are fetched into the cache. */
#define BLOCK(R, WR) \
static void blk_##R##_##WR(const task_t *t, const float *x, float *y, long n, __m256i tail, \
                           const float *next, int p0, int p1) { \
    const long K = t->K, K8 = K & ~7L; \
    const float *w = t->w + n * K; \
    __m256 a[WR][R]; \
    for (int i = 0; i < WR; i++) for (int m = 0; m < R; m++) a[i][m] = _mm256_setzero_ps(); \
    for (long k = 0; k < K8; k += 8) { \
        if (!(k & 15)) \
            for (int i = p0; i < p1; i++) \
                _mm_prefetch((const char *)(next + i * K + k), _MM_HINT_T0); \
        __m256 v[WR]; \
        for (int i = 0; i < WR; i++) v[i] = _mm256_loadu_ps(w + i * K + k); \
        for (int m = 0; m < R; m++) { \
            __m256 xm = _mm256_loadu_ps(x + m * t->ldx + k); \
            for (int i = 0; i < WR; i++) a[i][m] = _mm256_fmadd_ps(v[i], xm, a[i][m]); \
        } \
    } \
    if (K8 < K) { \
        __m256 v[WR]; \
        for (int i = 0; i < WR; i++) v[i] = _mm256_maskload_ps(w + i * K + K8, tail); \
        for (int m = 0; m < R; m++) { \
            __m256 xm = _mm256_maskload_ps(x + m * t->ldx + K8, tail); \
            for (int i = 0; i < WR; i++) a[i][m] = _mm256_fmadd_ps(v[i], xm, a[i][m]); \
        } \
    } \
    for (int m = 0; m < R; m++) for (int i = 0; i < WR; i++) { \
        float s = hsum(a[i][m]); \
        y[m * t->ldy + n + i] = t->bias ? s + t->bias[n + i] : s; \
    } \
}
/* Enough weight rows at once to keep the loads in flight, few enough that the
   sums stay in registers. */
BLOCK(1, 8) BLOCK(1, 4) BLOCK(2, 4) BLOCK(3, 4) BLOCK(4, 4)
BLOCK(1, 1) BLOCK(2, 1) BLOCK(3, 1) BLOCK(4, 1) BLOCK(5, 1) BLOCK(6, 1) BLOCK(7, 1) BLOCK(8, 1)

typedef void (*block_t)(const task_t *, const float *, float *, long, __m256i,
                        const float *, int, int);
static const block_t fours[5] = {0, blk_1_4, blk_2_4, blk_3_4, blk_4_4};
static const block_t singles[9] = {0, blk_1_1, blk_2_1, blk_3_1, blk_4_1,
                                   blk_5_1, blk_6_1, blk_7_1, blk_8_1};

/* Four weight rows of at most NEAR floats stay in the first-level cache
   beside the input rows' stretch: past four input rows, they go by twos over
   the same weight rows, and the passes after the first fetch the next four
   (a pass alone, during it). Longer rows go by four, then the rest, and the
   hardware's own fetching keeps up with them better than asking. */
#define NEAR 1024

static void *run(void *arg) {
    const task_t *t = arg;
    int lanes[8];
    for (int j = 0; j < 8; j++) lanes[j] = j < (t->K & 7L) ? -1 : 0;
    const __m256i tail = _mm256_loadu_si256((const __m256i *)lanes);
    const int near = t->K <= NEAR;
    for (long r = 0; r < t->M; r += 8) {
        const int R = t->M - r < 8 ? (int)(t->M - r) : 8;
        const float *x = t->x + r * t->ldx;
        float *y = t->y + r * t->ldy;
        long n = t->n0;
        if (R == 1)
            for (; n + 8 <= t->n1; n += 8) blk_1_8(t, x, y, n, tail, 0, 0, 0);
        else {
            const int each = R <= 4 ? R : near ? 2 : 4, passes = (R + each - 1) / each;
            for (; n + 4 <= t->n1; n += 4) {
                const float *next = t->w + (n + 4) * t->K;
                const int fetch = near && n + 8 <= t->n1;
                for (int q = 0; q < passes; q++) {
                    const int rows = R - q * each < each ? R - q * each : each;
                    int p0 = 0, p1 = 0;
                    if (fetch && passes == 1) p1 = 4;
                    else if (fetch && q > 0) {
                        p0 = 4 * (q - 1) / (passes - 1);
                        p1 = 4 * q / (passes - 1);
                    }
                    const long at = (long)q * each;
                    fours[rows](t, x + at * t->ldx, y + at * t->ldy, n, tail, next, p0, p1);
                }
            }
        }
        for (; n < t->n1; n++) singles[R](t, x, y, n, tail, 0, 0, 0);
    }
    return 0;
}

/* y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for m < M, n < N: w is [N, K] and
   contiguous, x's rows ldx floats apart, y's ldy; the outputs split over up to
   `threads` threads (a thread that cannot start: its share runs here). */
void rows_product(const float *w, const float *x, const float *bias, float *y,
                  long N, long K, long M, long ldx, long ldy, int threads) {
    task_t tasks[16];
    pthread_t ids[16];
    int started[16] = {0};
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    const long share = ((N + threads - 1) / threads + 7) & ~7L;
    int parts = 0;
    for (long n0 = 0; n0 < N; n0 += share, parts++)
        tasks[parts] = (task_t){w, x, bias, y, n0, n0 + share < N ? n0 + share : N, K, ldx, ldy, M};
    for (int i = 1; i < parts; i++) started[i] = pthread_create(&ids[i], 0, run, &tasks[i]) == 0;
    run(&tasks[0]);
    for (int i = 1; i < parts; i++) {
        if (started[i]) pthread_join(ids[i], 0);
        else run(&tasks[i]);
    }
}

/* One query's attention for (row, head) pairs p0 to p1: the scores against
   the row's keys (the head's group's), each the head's D lanes summed as a
   product's are, scaled, plus the mask; their softmax's weights (exp of each
   less the largest, over their sum) by the values. A position whose mask is
   -inf is not read at all; a pair with none left gives zeros. */
typedef struct {
    const float *q, *k, *v, *mask;
    float *out;
    long p0, p1, H, group, S, D, qb, qh, kb, kh, ks, vb, vh, vs, mb;
    float scale;
} heads_t;

static void *attend_run(void *arg) {
    const heads_t *t = arg;
    float *s = malloc(sizeof(float) * (t->S > 0 ? t->S : 1));
    if (!s) return (void *)1;
    const long D8 = t->D / 8;
    for (long p = t->p0; p < t->p1; p++) {
        const long b = p / t->H, h = p % t->H, g = h / t->group;
        const float *q = t->q + b * t->qb + h * t->qh, *m = t->mask + b * t->mb;
        const float *k = t->k + b * t->kb + g * t->kh, *v = t->v + b * t->vb + g * t->vh;
        __m256 qv[32], acc[32];
        for (long i = 0; i < D8; i++) qv[i] = _mm256_loadu_ps(q + 8 * i);
        float top = -INFINITY;
        for (long j = 0; j < t->S; j++) {
            if (m[j] == -INFINITY) {
                s[j] = -INFINITY;
                continue;
            }
            const float *kj = k + j * t->ks;
            __m256 a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kj));
            for (long i = 1; i < D8; i++)
                a = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kj + 8 * i), a);
            s[j] = hsum(a) * t->scale + m[j];
            if (s[j] > top) top = s[j];
        }
        for (long i = 0; i < D8; i++) acc[i] = _mm256_setzero_ps();
        float total = 0;
        if (top != -INFINITY)
            for (long j = 0; j < t->S; j++) {
                if (s[j] == -INFINITY) continue;
                const float e = expf(s[j] - top);
                const __m256 ev = _mm256_set1_ps(e);
                const float *vj = v + j * t->vs;
                total += e;
                for (long i = 0; i < D8; i++)
                    acc[i] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(vj + 8 * i), acc[i]);
            }
        const __m256 scale = _mm256_set1_ps(total > 0 ? 1.0f / total : 0.0f);
        float *o = t->out + p * t->D;
        for (long i = 0; i < D8; i++) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(acc[i], scale));
    }
    free(s);
    return 0;
}

/* out[b, h] (contiguous [B, H, D]) for q [B, H, D], k and v [B, H / group, S,
   D], mask [B, S] (rows mb floats apart), each D floats contiguous, D a
   multiple of 8 up to 256; pairs split over up to `threads` threads. 0, or 1
   where memory for the scores ran out. */
int attend(const float *q, const float *k, const float *v, const float *mask, float *out,
           long B, long H, long group, long S, long D, long qb, long qh, long kb, long kh,
           long ks, long vb, long vh, long vs, long mb, float scale, int threads) {
    heads_t tasks[16];
    pthread_t ids[16];
    int started[16] = {0}, failed = 0;
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    const long pairs = B * H, share = (pairs + threads - 1) / threads;
    int parts = 0;
    if (pairs <= 0) return 0;
    for (long p0 = 0; p0 < pairs; p0 += share, parts++)
        tasks[parts] = (heads_t){q, k, v, mask, out, p0, p0 + share < pairs ? p0 + share : pairs,
                                 H, group, S, D, qb, qh, kb, kh, ks, vb, vh, vs, mb, scale};
    for (int i = 1; i < parts; i++)
        started[i] = pthread_create(&ids[i], 0, attend_run, &tasks[i]) == 0;
    failed |= attend_run(&tasks[0]) != 0;
    for (int i = 1; i < parts; i++) {
        void *result = 0;
        if (started[i]) pthread_join(ids[i], &result);
        else result = attend_run(&tasks[i]);
        failed |= result != 0;
    }
    return failed;
}
"""


@dataclass(frozen=True, slots=True)
class RowKernel:
    """The compiled kernels: ``product`` is ``F.linear``, reading the weight once
    for every ``MOST_ROWS`` rows; ``attend`` is a decode step's attention."""

    function: Callable[..., None]
    attention: Callable[..., int]

    def product(
        self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor:
        """``x @ weight.T + bias`` for a float32 ``x`` (``[rows, K]``, or any
        shape ending in ``K``), ``weight`` contiguous ``[N, K]`` float32 on the
        CPU."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"the row kernel multiplies float32 on a CPU, not {x.dtype} {x.device}")
        shape = x.shape
        if x.dim() != 2 or x.stride(-1) != 1:
            x = x.reshape(-1, shape[-1]).contiguous()
        rows, size = x.shape
        outputs = weight.shape[0]
        y = torch.empty(rows, outputs)
        if rows:
            threads = max(1, min(torch.get_num_threads(), weight.numel() // PER_THREAD))
            self.function(
                weight.data_ptr(),
                x.data_ptr(),
                None if bias is None else bias.data_ptr(),
                y.data_ptr(),
                outputs,
                size,
                rows,
                x.stride(0),
                outputs,
                threads,
            )
        return y if len(shape) == 2 else y.view(*shape[:-1], outputs)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
        enable_gqa=True)`` for one query a row: ``q`` ``[B, H, 1, D]``, ``k``
        and ``v`` ``[B, H_kv, S, D]`` (``H`` a multiple of ``H_kv``; views of a
        cache, as they lie), ``mask`` additive ``[B, 1, 1, S]``; float32 on the
        CPU, ``D`` a multiple of 8 up to ``MOST_HEAD``. Positions the mask
        makes -inf are not read; a row with none left gives zeros, as the
        library's does."""
        for tensor in (q, k, v, mask):
            if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
                raise TypeError(
                    f"the attention kernel reads float32 on a CPU, not {tensor.dtype} "
                    f"{tensor.device}"
                )
        rows, heads, queries, size = q.shape
        groups, positions = k.shape[1], k.shape[2]
        if (
            queries != 1
            or size % 8
            or size > MOST_HEAD
            or heads % groups
            or k.shape != v.shape
            or k.shape[0] != rows
            or k.shape[3] != size
            or mask.shape != (rows, 1, 1, positions)
        ):
            raise ValueError(
                f"the attention kernel takes one query a row and heads of a multiple of 8 "
                f"up to {MOST_HEAD}, not q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}, mask {tuple(mask.shape)}"
            )
        q, k, v, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, mask))
        out = torch.empty(rows, heads, 1, size)
        work = rows * heads * positions * size
        threads = max(1, min(torch.get_num_threads(), work // PER_THREAD))
        if self.attention(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            mask.data_ptr(),
            out.data_ptr(),
            rows,
            heads,
            heads // groups,
            positions,
            size,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            mask.stride(0),
            size**-0.5,
            threads,
        ):
            raise MemoryError("no memory for the attention kernel's scores")
        return out


@cache
def load() -> RowKernel | str:
    """The kernel, compiled and checked once a process; or why there is none."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc) to build it"
    with tempfile.TemporaryDirectory(prefix="wavecast-rows-") as folder:
        source, built = Path(folder, "rows.c"), Path(folder, "rows.so")
        source.write_text(SOURCE)
        command = [compiler, "-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread"]
        try:
            done = subprocess.run(
                [*command, "-o", str(built), str(source)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{compiler} failed to run: {exc}"
        if done.returncode != 0:
            log.debug("the row kernel did not compile:\n%s", done.stderr)
            lines = done.stderr.strip().splitlines()
            return f"{compiler} could not build it ({lines[-1] if lines else done.returncode})"
        library = ctypes.CDLL(str(built))  # mapped: the file may go
    if not library.rows_usable():
        return "this CPU has no AVX2 and FMA"
    function = library.rows_product
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 5 + [ctypes.c_int]
    attention = library.attend
    attention.restype = ctypes.c_int
    attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 14
    attention.argtypes += [ctypes.c_float, ctypes.c_int]
    kernel = RowKernel(function, attention)
    wrong = _check(kernel)
    return f"it gave wrong results ({wrong})" if wrong else kernel


def _check(kernel: RowKernel) -> str | None:
    """Whether the kernel's products are float64's, to float32 rounding, for
    every block and tail it has (odd outputs, inputs not a multiple of 8, rows
    short enough to be fetched ahead and longer), and its attention float64's
    (heads in groups, masked positions); or what was wrong."""
    generator = torch.Generator().manual_seed(0)
    for size in (203, 1029):
        weight = torch.randn(37, size, generator=generator)
        bias = torch.randn(37, generator=generator)
        x = torch.randn(MOST_ROWS, size, generator=generator)
        exact = (x.double() @ weight.double().T + bias.double()).float()
        for rows in range(1, MOST_ROWS + 1):
            got = kernel.product(weight, bias, x[:rows])
            error = float((got - exact[:rows]).abs().max())
            if not error <= 1e-4 * max(1.0, float(exact.abs().max())):
                return f"{rows} rows of {size}: off by {error:.3g}"
    for size in (8, 64, 136):
        q = torch.randn(3, 4, 1, size, generator=generator)
        k, v = torch.randn(2, 3, 2, 21, size, generator=generator).unbind(0)
        keep = torch.arange(21) < torch.tensor([[1], [9], [21]])
        mask = torch.zeros(3, 1, 1, 21).masked_fill_(~keep.view(3, 1, 1, 21), float("-inf"))
        exact = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=mask.double(), enable_gqa=True
        )
        error = float((kernel.attend(q, k, v, mask) - exact).abs().max())
        if not error <= 1e-5:
            return f"attention over heads of {size}: off by {error:.3g}"
    return None
