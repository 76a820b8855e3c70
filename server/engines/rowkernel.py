"""A product of a few rows by a large float32 weight on a CPU, reading the weight once.

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

It is C (AVX2 and FMA), compiled with the machine's C compiler when first asked
for (about a second), and checked against a float64 product before it is used;
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

__all__ = ["MOST_ROWS", "RowKernel", "load"]

log = logging.getLogger(__name__)

# Rows a call multiplies at once (the kernel's blocks: one to eight).
MOST_ROWS = 8
# Elements of the weight a thread of its own must have to be worth starting.
PER_THREAD = 1 << 21

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>

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
"""


@dataclass(frozen=True, slots=True)
class RowKernel:
    """The compiled kernel: ``product`` is ``F.linear``, reading the weight once
    for every ``MOST_ROWS`` rows."""

    function: Callable[..., None]

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
    kernel = RowKernel(function)
    wrong = _check(kernel)
    return f"it gave wrong products ({wrong})" if wrong else kernel


def _check(kernel: RowKernel) -> str | None:
    """Whether the kernel's products are float64's, to float32 rounding, for
    every block and tail it has (odd outputs, inputs not a multiple of 8, rows
    short enough to be fetched ahead and longer)."""
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
    return None
