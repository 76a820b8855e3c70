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
as MKL's (a few 1e-7 of the output's size). Where the CPU has AVX-512, its 32
vector registers hold larger blocks (the wide build: six weight rows by four
input rows, 24 sums; each output still summed the same way, so the same bits
as the plain build): four rows by that weight 0.85x the plain build's time,
eight 0.75x, four rows by MusicGen-small's 3,072 x 1,024 weight 0.6x. A model
run in bfloat16 has the same product over bfloat16 weights and rows
(``rows_product16``: each value widened to float32 exactly, the same sums,
each output rounded to bfloat16): half the bytes to read, so one row in
0.4-0.7x the time of the library's bfloat16 product, and (in the wide build,
by the same blocks of six) two to four rows in 0.75-1.0x; ``dense`` gives it
steps of up to four rows (from five, the library's, with its bfloat16
arithmetic, is the faster).

The same library holds a decode step's attention (``RowKernel.attend``): one
query a row against its keys and values, which a step reads as views of a
cache (a row's first positions of a longer table). The library's attention
reads such views at a fraction of the memory's speed (eight rows of 16 heads
over 64 positions of a 1,506-position table: 1.1 ms a layer); this one reads
each (row, head)'s positions once, in order, eight at a time (their scores in
the lanes of one vector, then their exponentials, by a polynomial, in one),
and skips the blocks of eight the mask leaves out (0.47 ms;
``bench/bench_attention.py``: 0.36-0.58x the library's time for the released
models' heads, 0.41-0.97x for the test models' heads of 16). The weighted
values are summed in registers, every index a constant, where sums indexed by
a loop (the first form) lay in memory: 0.8-0.9x its time, the same bits. A
row's result does not depend on the others of the call, nor on how far the
span reaches past its positions.

It also holds the codec decoders' activations, each in one pass over its
samples, eight at a time (sixteen in the wide build) (``RowKernel.elu``:
EnCodec's ELU, ``e^x - 1`` by the attention's polynomial; ``RowKernel.snake``:
DAC's Snake, its squared sine from Cephes' sine polynomial alone), where torch
makes four or five passes (``codec_decoders``),
over rows of a wider tensor too, read or written (``row_layout``: a
transposed convolution's output without its tail, which fell back to torch's
passes when the activations took only contiguous tensors; the next
convolution's padded input, which they write into instead of a tensor then
joined), and
their convolutions over few outputs (``RowKernel.conv``: eight samples (sixteen
in the wide build) in the lanes of a vector, up to four outputs at a time,
every weight broadcast once a block, the sums in registers; a transposed
convolution's phases, of stride 2 or a multiple of 4, stored in place from
them): oneDNN's kernel takes 2-7x
its time for one to four outputs over long inputs (``bench/bench_conv.py``:
the released EnCodec's last layer, 64 channels into one, 2.3-4.5x; the tiny
EnCodec's 2.4-7x), and ``codec_incremental`` takes it where it measures it
fastest; and their residual blocks' joins (``RowKernel.join_add``: the waiting
samples and the skip path's added to the block's in one pass, where torch's
joins and adds make eight operations); and a whole residual unit in one call
(``RowKernel.residual_unit``: DAC's Snake, convolution, Snake, one-tap
convolution and join, or EnCodec's with ELU, over tiles of time whose
intermediates stay in a few kilobytes, where each layer made a pass over
memory: the same floats as the layers by these kernels; the tiny DAC's steady
call 0.58x its time for one stream, 0.78x for eight). A codec's call runs
some sixty such layers over a few samples each, where the checks around a
kernel cost as much as the kernel: ``elu_into``, ``snake_into``,
``conv_prepared`` and ``residual_unit`` read each layout once and trust what
the codec made once (its weights). These codec calls are written once over
vectors of ``LANES`` samples (``_CODEC_LANES``) and built for eight (AVX2) and,
in the wide build, sixteen (AVX-512), which the calls then take: every lane's
operations are the same in both, so the two builds decode the same bits, and
the wide one's residual units take 0.58-0.75x the plain one's time for eight
streams of the test codecs' shapes, a transposed convolution's phases
0.62-0.97x (``bench/bench_conv.py --builds``).

And the sampler's integer hashing, bit for bit: a step's draw keys
(``RowKernel.draw_keys``, where numpy makes a few dozen calls on a handful of
integers) and every candidate token's counter-based noise
(``RowKernel.uniforms``, where torch makes a dozen passes over ``int64``
tensors); and the speech sampler's sort of a step's scores (``RowKernel.sort``:
torch's stable sort's values, bit for bit, each value's place counted by
comparisons eight at a time, where torch's comparison sort mispredicts its
branches on every new row: 14 us for eight rows of four codebooks of 66
scores, torch's 65; rows of 512, 0.53x its time: ``bench/bench_sampling.py
--sort``).

It is C (AVX2 and FMA), compiled with the machine's C compiler when first asked
for (about a second), and checked against float64 products before it is used;
where there is no compiler, no such CPU or the check fails, ``load`` says why
and the libraries' products stay. The work is split over torch's threads
where it is large enough: a product's weight of a quarter of a million
elements or more (``PER_THREAD_PRODUCT``), the attention's keys and a codec
unit's samples of a few million (``PER_THREAD``). The threads are kept for
the kernels, started once (a pool, in C): a part reaches a kept thread in a
few microseconds, where starting a thread for it took tens, which a weight of
a million elements (MusicGen-small's 1,024 x 1,024) did not pay for. Two
threads now multiply two rows by such a weight, read cold as a step reads it,
in 0.58-0.64x the time the call took before, and by MusicGen-small's
query/key/value weight in 0.54-0.57x (``bench/bench_rows.py --split``); a
step gains it only where torch's OpenMP threads do not spin on the same cores
after their own work (``bench/RESULTS.md``). The call releases the GIL
(``ctypes``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
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

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

__all__ = [
    "MOST_HEAD",
    "MOST_ROWS",
    "RowKernel",
    "Unit",
    "build",
    "built",
    "load",
    "on_cpu",
    "row_layout",
]

log = logging.getLogger(__name__)

# Rows a call multiplies at once (the kernel's blocks: one to eight).
MOST_ROWS = 8
# Elements a thread must have of a call's work for the call to use it: of the
# keys the attention reads, of a codec unit's or convolution's work.
PER_THREAD = 1 << 21
# Elements of a product's weight each thread must have (a weight of twice as
# many is split over two): each thread's part then some tens of microseconds'
# reading, where a kept thread takes its part in a few (see the pool in
# SOURCE; ``bench/bench_rows.py --split``).
PER_THREAD_PRODUCT = 1 << 17
# Samples a thread of its own must have for an activation (ELU, Snake) to be
# worth starting it.
PER_THREAD_ELU = 1 << 16
# The longest head the attention kernel takes (its registers hold one query).
MOST_HEAD = 256
# The longest rows the sort takes (it compares every pair of a row's values).
MOST_SORTED = 512

# The codec's activations and convolutions over vectors of LANES floats,
# made twice in SOURCE: eight lanes, and sixteen in the wide build.
_CODEC_LANES = r"""
/* e^x for each lane, x at most 0 (below -87.3 as -87.3): a polynomial on x
   less its nearest multiple of ln 2, times that power of two (Cephes' expf,
   within two units of the last place). */
static inline VF FN(exp)(VF x) {
    x = V_MAX(x, V_SET1(-87.3365f));
    const VF n = V_ROUND(V_MUL(x, V_SET1(1.44269504088896341f)));
    VF r = V_FNMADD(n, V_SET1(0.693359375f), x);
    r = V_FNMADD(n, V_SET1(-2.12194440e-4f), r);
    VF p = V_SET1(1.9875691500e-4f);
    p = V_FMADD(p, r, V_SET1(1.3981999507e-3f));
    p = V_FMADD(p, r, V_SET1(8.3334519073e-3f));
    p = V_FMADD(p, r, V_SET1(4.1665795894e-2f));
    p = V_FMADD(p, r, V_SET1(1.6666665459e-1f));
    p = V_FMADD(p, r, V_SET1(5.0000001201e-1f));
    p = V_FMADD(p, V_MUL(r, r), V_ADD(r, V_SET1(1.0f)));
    const VI e = VI_ADD(V_ROUND_I(n), VI_SET1(127));
    return V_MUL(p, VI_AS_F(VI_SHL(e, 23)));
}

/* ELU: x where x > 0 (or NaN), else alpha (e^x - 1). */
static inline VF FN(elu)(VF v, VF alpha) {
    const VF zero = V_ZERO(), one = V_SET1(1.0f);
    const VF negative = V_MUL(alpha, V_SUB(FN(exp)(V_MIN(v, zero)), one));
    return V_BLEND(negative, v, V_GT(v, zero));
}

/* sin^2 of each lane, from Cephes' sinf: the argument less its nearest even
   multiple of pi/4, in three parts, then its sine r by a polynomial; sin^2 is
   r^2, or 1 - r^2 where the octant's is the cosine (cos^2 = 1 - sin^2 of the
   same part: one polynomial, not two); within 2e-7 for |x| up to 8192; a
   lane beyond (or NaN) by the C library's sinf, squared (each lane's the
   same whatever the others: a vector of eight lanes or of sixteen). */
static inline VF FN(sin2)(VF x) {
    const VF absolute = V_ABS(x);
    VF ax = absolute;
    VI j = V_TRUNC_I(V_MUL(ax, V_SET1(1.27323954473516f)));
    j = VI_AND(VI_ADD(j, VI_SET1(1)), VI_SET1(~1));
    const VF y = VI_TO_F(j);
    const VI two = VI_SET1(2);
    const VC cosine = VI_EQ(VI_AND(j, two), two);
    ax = V_FMADD(y, V_SET1(-0.78515625f), ax);
    ax = V_FMADD(y, V_SET1(-2.4187564849853515625e-4f), ax);
    ax = V_FMADD(y, V_SET1(-3.77489497744594108e-8f), ax);
    const VF z = V_MUL(ax, ax);
    VF s = V_SET1(-1.9515295891e-4f);
    s = V_FMADD(s, z, V_SET1(8.3321608736e-3f));
    s = V_FMADD(s, z, V_SET1(-1.6666654611e-1f));
    s = V_FMADD(V_MUL(s, z), ax, ax);
    const VF s2 = V_MUL(s, s);
    VF out = V_BLEND(s2, V_SUB(V_SET1(1.0f), s2), cosine);
    if (V_ANY(V_GT(absolute, V_SET1(8192.0f)))) {
        float v[LANES], o[LANES];
        V_STORE(v, x);
        V_STORE(o, out);
        for (int i = 0; i < LANES; i++) {
            if (fabsf(v[i]) <= 8192.0f) continue;
            const float sine = sinf(v[i]);
            o[i] = sine * sine;
        }
        out = V_LOAD(o);
    }
    return out;
}

/* DAC's Snake: x + sin(a x)^2 inverse. */
static inline VF FN(snake)(VF v, VF a, VF inverse) {
    return V_ADD(V_MUL(FN(sin2)(V_MUL(a, v)), inverse), v);
}

/* An activation over m samples of a row, x to y (either may be the other):
   DAC's Snake (alpha and inverse), or ELU (alpha; kind 1); LANES at a time,
   the last few in a masked block. */
static void FN(act_span)(int kind, const float *x, float *y, long m, float alpha,
                         float inverse) {
    const VF a = V_SET1(alpha), inv = V_SET1(inverse);
    const long whole = m - m % LANES;
    if (kind == 1) {
        for (long i = 0; i < whole; i += LANES) V_STORE(y + i, FN(elu)(V_LOAD(x + i), a));
        if (whole < m) {
            const VM last = V_BELOW(m - whole);
            V_STOREM(y + whole, last, FN(elu)(V_LOADM(x + whole, last), a));
        }
        return;
    }
    for (long i = 0; i < whole; i += LANES) V_STORE(y + i, FN(snake)(V_LOAD(x + i), a, inv));
    if (whole < m) {
        const VM last = V_BELOW(m - whole);
        V_STOREM(y + whole, last, FN(snake)(V_LOADM(x + whole, last), a, inv));
    }
}

/* A block's sums are k = o V + v (output o0 + o, samples LANES v to LANES v +
   LANES - 1 of the block), k < O_ V (at most 9), in registers: every index
   below is a constant (the macros list them all; those past O_ V, or past
   the block's vectors or outputs, are left out at compile time, their
   indices kept in bounds by the remainders), for a loop over them would keep
   the sums in memory, a store for every multiply-add. */
#define CONV_X(V, J, LOAD) if ((J) < (V)) xv[(J) % (V)] = LOAD((J) % (V));
#define CONV_XS(V, LOAD) \
    CONV_X(V, 0, LOAD) CONV_X(V, 1, LOAD) CONV_X(V, 2, LOAD) CONV_X(V, 3, LOAD) \
    CONV_X(V, 4, LOAD) CONV_X(V, 5, LOAD) CONV_X(V, 6, LOAD) CONV_X(V, 7, LOAD)
#define CONV_W(O_, J) if ((J) < (O_)) wv[(J) % (O_)] = V_BCAST(wp + (J) % (O_) * CU);
#define CONV_FMA(O_, V, K) \
    if ((K) < (O_) * (V)) \
        a[(K) % ((O_) * (V))] = \
            V_FMADD(wv[(K) / (V) % (O_)], xv[(K) % (V)], a[(K) % ((O_) * (V))]);
#define CONV_EACH(F, O_, V) \
    F(O_, V, 0) F(O_, V, 1) F(O_, V, 2) F(O_, V, 3) F(O_, V, 4) F(O_, V, 5) F(O_, V, 6) \
    F(O_, V, 7) F(O_, V, 8)
#define CONV_LOAD(v) V_LOAD(xp + LANES * (v))
#define CONV_MASKED(v) V_LOADM(xp + LANES * (v), m[v])

/* The sums of a block over every input channel and tap, each vector of
   samples read by LOAD (a whole block, or a last one masked). */
#define CONV_SUMS(O_, V, LOAD) \
    for (long i = 0; i < C; i++) \
        for (long u = 0; u < U; u++) { \
            const float *xp = x + i * xc + u * d, *wp = w + i * U + u; \
            VF xv[V], wv[O_]; \
            CONV_XS(V, LOAD) \
            CONV_W(O_, 0) CONV_W(O_, 1) CONV_W(O_, 2) CONV_W(O_, 3) \
            CONV_EACH(CONV_FMA, O_, V) \
        }

#define CONV_INIT(O_, V, K) \
    if ((K) < (O_) * (V)) \
        a[(K) % ((O_) * (V))] = V_SET1(c->bias ? c->bias[o0 + (K) / (V)] : 0.0f);
#define CONV_STORE(O_, V, K) \
    if ((K) < (O_) * (V)) \
        V_STORE(y + (o0 + (K) / (V)) * n + LANES * ((K) % (V)), a[(K) % ((O_) * (V))]);
#define CONV_MASKSTORE(O_, V, K) \
    if ((K) < (O_) * (V)) \
        V_STOREM(y + (o0 + (K) / (V)) * n + LANES * ((K) % (V)), m[(K) % (V)], \
                 a[(K) % ((O_) * (V))]);

/* Outputs o0 to o0 + O_ - 1 of a block of V vectors of samples (``left``
   samples from the block's first on, masked past the last): into y's rows n
   floats apart; or, where the task interleaves, each output row o S + r as
   phase r of row o of y, which points at the block's
   first sample t of its stream's rows ([O / S, n S]): CONV_PHASES. */
#define CONV(O_, V) \
static void FN(conv_##O_##_##V)(const conv_t *c, const float *x, float *y, long n, long o0, \
                                long left) { \
    const long C = c->C, U = c->U, d = c->d, xc = c->xc, CU = C * U; \
    const float *w = c->w + o0 * CU; \
    VF a[(O_) * (V)]; \
    VM m[V]; \
    for (int v = 0; v < V; v++) m[v] = V_BELOW(left - LANES * v); \
    CONV_EACH(CONV_INIT, O_, V) \
    if (left >= LANES * V) { \
        CONV_SUMS(O_, V, CONV_LOAD) \
    } else { \
        CONV_SUMS(O_, V, CONV_MASKED) \
    } \
    if (c->interleave) { \
        CONV_PHASES(O_, V) \
    } else if (left >= LANES * V) { \
        CONV_EACH(CONV_STORE, O_, V) \
    } else { \
        CONV_EACH(CONV_MASKSTORE, O_, V) \
    } \
}
CONV(1, 8)
CONV(2, 4)
CONV(3, 3)
CONV(1, 2)
CONV(2, 2)
CONV(3, 2)
CONV(4, 2)

/* Outputs 0 to O - 1 of the block of samples from x's first on (``left`` of
   them, the block's LANES vectors masked past the last), into y (rows ldy
   floats apart). */
static void FN(conv_block)(const conv_t *c, const float *x, float *y, long ldy, long left) {
    for (long o = 0; o < c->O;) {
        const long more = c->O - o;
        if (c->vectors == 8) { FN(conv_1_8)(c, x, y, ldy, o, left); o += 1; }
        else if (c->vectors == 4) { FN(conv_2_4)(c, x, y, ldy, o, left); o += 2; }
        else if (c->vectors == 3) { FN(conv_3_3)(c, x, y, ldy, o, left); o += 3; }
        else if (more >= 4) { FN(conv_4_2)(c, x, y, ldy, o, left); o += 4; }
        else if (more == 3) { FN(conv_3_2)(c, x, y, ldy, o, left); o += 3; }
        else if (more == 2) { FN(conv_2_2)(c, x, y, ldy, o, left); o += 2; }
        else { FN(conv_1_2)(c, x, y, ldy, o, left); o += 1; }
    }
}

/* The blocks of outputs 0 to O - 1 of samples 0 to m - 1 of one stream: x's
   rows c->xc floats apart, y's ldy; as `conv` makes them (the same sums). */
static void FN(conv_span)(const conv_t *c, const float *x, float *y, long ldy, long m) {
    const long span = (long)LANES * c->vectors;
    for (long t = 0; t < m; t += span) FN(conv_block)(c, x + t, y + t, ldy, m - t);
}

/* conv's work item: its blocks p0 to p1 (block p: stream p / blocks, its
   samples from (p % blocks) span on). */
static void *FN(conv_run)(void *arg) {
    const conv_t *c = arg;
    const long span = (long)LANES * c->vectors, S = c->S, n = c->n;
    if (S == 1) {
        for (long p = c->p0; p < c->p1; p++) {
            const long b = p / c->blocks, t = (p % c->blocks) * span;
            FN(conv_block)(c, c->x + b * c->xb + t, c->y + b * c->O * n + t, n, n - t);
        }
        return 0;
    }
    if (c->interleave) {  /* each block's phases stored in place from its sums */
        for (long p = c->p0; p < c->p1; p++) {
            const long b = p / c->blocks, t = (p % c->blocks) * span;
            FN(conv_block)(c, c->x + b * c->xb + t, c->y + b * c->O * n + t * S, n, n - t);
        }
        return 0;
    }
    /* Each block's phases into a buffer, then each phase's samples S apart. */
    float *z = malloc(sizeof(float) * c->O * span);
    if (!z) return (void *)1;
    for (long p = c->p0; p < c->p1; p++) {
        const long b = p / c->blocks, t = (p % c->blocks) * span;
        const long count = n - t < span ? n - t : span;
        FN(conv_block)(c, c->x + b * c->xb + t, z, span, n - t);
        for (long q = 0; q < c->O; q++) {
            float *y = c->y + (b * (c->O / S) + q / S) * n * S + t * S + q % S;
            const float *from = z + q * span;
            for (long j = 0; j < count; j++) y[j * S] = from[j];
        }
    }
    free(z);
    return 0;
}

static void *FN(unit_run)(void *arg) {
    const unit_t *u = arg;
    const long C = u->C, H = u->H, S = u->S, T = u->T, lda = T + S, n = u->n, h = u->h;
    float *scratch = malloc(sizeof(float) * (C * lda + H * T + C * T));
    if (!scratch) return (void *)1;
    float *A = scratch, *G = A + C * lda, *Y = G + H * T;
    const conv_t first = {A, u->w1, u->b1, G, 0, 0, 0, H, C, u->U, u->d, 0, 0, lda, 1,
                          vectors_for(H), 0};
    const conv_t second = {G, u->w2, u->b2, Y, 0, 0, 0, C, H, 1, 1, 0, 0, T, 1,
                           vectors_for(C), 0};
    for (long p = u->p0; p < u->p1; p++) {
        const long b = p / u->segments, t0 = (p % u->segments) * u->share;
        const long t1 = t0 + u->share < n ? t0 + u->share : n;
        const float *x = u->x + b * u->xb, *buffer = u->buffer + b * C * S;
        const float *waiting = u->waiting + b * C * h;
        float *out = u->out + b * C * n;
        for (long tt = t0; tt < t1; tt += T) {
            const long m = tt + T < t1 ? T : t1 - tt;
            /* A[c, j] = padded[tt + j], j < m + S: kept from the last tile, or made. */
            const long kept = tt > t0 ? S : 0;
            for (long c = 0; c < C; c++) {
                float *a = A + c * lda;
                if (kept) memmove(a, a + T, sizeof(float) * S);
                long j = kept;
                for (; j < m + S && tt + j < S; j++) a[j] = buffer[c * S + tt + j];
                if (j < m + S)
                    FN(act_span)(u->kind, x + c * u->xc + tt + j - S, a + j, m + S - j,
                                 u->a1[c], u->i1[c]);
            }
            FN(conv_span)(&first, A, G, T, m);
            for (long c = 0; c < H; c++)
                FN(act_span)(u->kind, G + c * T, G + c * T, m, u->a2[c], u->i2[c]);
            FN(conv_span)(&second, G, Y, T, m);
            for (long c = 0; c < C; c++) {
                const float *yr = Y + c * T, *xr = x + c * u->xc, *wr = waiting + c * h;
                float *o = out + c * n + tt;
                long t = 0;
                for (; t < m && tt + t < h; t++) o[t] = wr[tt + t] + yr[t];
                for (; t < m; t++) o[t] = xr[tt + t - h] + yr[t];
            }
        }
    }
    free(scratch);
    return 0;
}
"""

SOURCE = (
    r"""
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int rows_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
#ifdef WIDE
           && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
#endif
        ;
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

/* The sums of R input rows (x, t->ldx floats apart) by WR rows of a weight
   (w, K apart): a[i][m], lane j adding k = j mod 8 in order. A weight's 8
   values are loaded by LOAD, its last K - K8 by TAIL; FETCH runs first at
   each k. */
#define SUMS(R, WR, LOAD, TAIL, FETCH) \
    __m256 a[WR][R]; \
    for (int i = 0; i < WR; i++) for (int m = 0; m < R; m++) a[i][m] = _mm256_setzero_ps(); \
    for (long k = 0; k < K8; k += 8) { \
        FETCH \
        __m256 v[WR]; \
        for (int i = 0; i < WR; i++) v[i] = LOAD(w + i * K + k); \
        for (int m = 0; m < R; m++) { \
            __m256 xm = _mm256_loadu_ps(x + m * t->ldx + k); \
            for (int i = 0; i < WR; i++) a[i][m] = _mm256_fmadd_ps(v[i], xm, a[i][m]); \
        } \
    } \
    if (K8 < K) { \
        __m256 v[WR]; \
        for (int i = 0; i < WR; i++) v[i] = TAIL(w + i * K + K8); \
        for (int m = 0; m < R; m++) { \
            __m256 xm = _mm256_maskload_ps(x + m * t->ldx + K8, tail); \
            for (int i = 0; i < WR; i++) a[i][m] = _mm256_fmadd_ps(v[i], xm, a[i][m]); \
        } \
    }
#define LOAD32(p) _mm256_loadu_ps(p)
#define TAIL32(p) _mm256_maskload_ps(p, tail)

/* R input rows by WR rows of the weight from row n: every output is summed
   the same way (SUMS, then the lanes), whatever R and WR, so a row's result
   does not depend on the others of the call. Meanwhile rows p0 to p1 of
   `next` are fetched into the cache. */
#define BLOCK(R, WR) \
static void blk_##R##_##WR(const task_t *t, const float *x, float *y, long n, __m256i tail, \
                           const float *next, int p0, int p1) { \
    const long K = t->K, K8 = K & ~7L; \
    const float *w = t->w + n * K; \
    SUMS(R, WR, LOAD32, TAIL32, \
         if (!(k & 15)) for (int i = p0; i < p1; i++) \
             _mm_prefetch((const char *)(next + i * K + k), _MM_HINT_T0);) \
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
#ifdef WIDE
/* Where the CPU has 32 vector registers (AVX-512VL; the vectors still of
   eight lanes, and every output summed as above), six weight rows by up to four
   input rows keep their 24 sums in registers: each weight load serves four
   input rows, each input load six weight rows. Five to eight input rows go by
   four, then the rest, over the same six weight rows. */
BLOCK(1, 6) BLOCK(2, 6) BLOCK(3, 6) BLOCK(4, 6)
static const block_t sixes[5] = {0, blk_1_6, blk_2_6, blk_3_6, blk_4_6};
#endif
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
#ifdef WIDE
        else
            for (; n + 6 <= t->n1; n += 6) {
                sixes[R < 4 ? R : 4](t, x, y, n, tail, 0, 0, 0);
                if (R > 4) sixes[R - 4](t, x + 4 * t->ldx, y + 4 * t->ldy, n, tail, 0, 0, 0);
            }
#else
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
#endif
        for (; n < t->n1; n++) singles[R](t, x, y, n, tail, 0, 0, 0);
    }
    return 0;
}

/* `parts` tasks (`size` bytes apart from `tasks`) by `fn`: the first here,
   the others on threads of their own, started for the call (one that cannot
   start: here, after). Nonzero if any returned nonzero. */
static int run_started(void *(*fn)(void *), char *at, size_t size, int parts) {
    pthread_t ids[16];
    int started[16] = {0}, failed = 0;
    for (int i = 1; i < parts; i++) started[i] = pthread_create(&ids[i], 0, fn, at + i * size) == 0;
    failed |= fn(at) != 0;
    for (int i = 1; i < parts; i++) {
        void *result = 0;
        if (started[i]) pthread_join(ids[i], &result);
        else result = fn(at + i * size);
        failed |= result != 0;
    }
    return failed;
}

/* The pool: threads started once (as many as a call has asked for, up to 15),
   each with a mailbox the caller posts its part into. A worker spins on its
   mailbox for a while after each part (a step's calls come microseconds apart),
   then sleeps on its condition until the next post. One caller at a time: a
   call that finds the pool in use (another thread's) starts threads of its own,
   as do calls in a child process forked from one with a pool. */
#define POOL 15
#define SPINS 4000
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t posted;
    _Atomic long post;      /* bumped for each part posted */
    int sleeping;           /* (under lock) */
    void *(*fn)(void *);
    void *task;
} mailbox_t;
static struct {
    pthread_mutex_t busy;   /* held by the caller using the pool */
    pthread_mutex_t lock;   /* with `finished` */
    pthread_cond_t finished;
    _Atomic int remaining;  /* parts posted and not yet finished */
    _Atomic int failed;
    int workers;            /* started, under `busy` */
    int pid;                /* the process that started them */
    mailbox_t boxes[POOL];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *worker(void *arg) {
    mailbox_t *box = arg;
    long seen = 0;
    for (;;) {
        long post;
        int spins = 0;
        while ((post = atomic_load_explicit(&box->post, memory_order_acquire)) == seen) {
            if (++spins < SPINS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&box->lock);
            box->sleeping = 1;
            while ((post = atomic_load_explicit(&box->post, memory_order_acquire)) == seen)
                pthread_cond_wait(&box->posted, &box->lock);
            box->sleeping = 0;
            pthread_mutex_unlock(&box->lock);
            break;
        }
        seen = post;
        if (box->fn(box->task)) atomic_store(&pool.failed, 1);
        if (atomic_fetch_sub_explicit(&pool.remaining, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.finished);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return 0;
}

/* Workers enough for `parts` parts (under `busy`); whether there are. */
static int enough_workers(int parts) {
    if (pool.workers > 0 && pool.pid != getpid()) return 0; /* forked: theirs are gone */
    pool.pid = getpid();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (pool.workers < parts - 1) {
        mailbox_t *box = &pool.boxes[pool.workers];
        pthread_mutex_init(&box->lock, 0);
        pthread_cond_init(&box->posted, 0);
        atomic_store(&box->post, 0);
        box->sleeping = 0;
        pthread_t id;
        if (pthread_create(&id, &attr, worker, box) != 0) break;
        pool.workers++;
    }
    pthread_attr_destroy(&attr);
    return pool.workers >= parts - 1;
}

static _Atomic int pooling = 1;

/* Whether calls use the pool (1, as they start) or start threads of their own
   (0: the way before the pool, for measuring); the setting before. */
int use_pool(int on) { return atomic_exchange(&pooling, on != 0); }

/* Run `parts` tasks (`size` bytes apart from `tasks`) by `fn`: the first here,
   the others on the pool's threads (or on threads of their own: see the pool).
   Nonzero if any returned nonzero. */
static int run_parts(void *(*fn)(void *), void *tasks, size_t size, int parts) {
    char *at = tasks;
    if (parts <= 0) return 0;
    if (parts == 1) return fn(at) != 0;
    if (parts > POOL + 1 || !atomic_load(&pooling) || pthread_mutex_trylock(&pool.busy) != 0)
        return run_started(fn, at, size, parts);
    if (!enough_workers(parts)) {
        pthread_mutex_unlock(&pool.busy);
        return run_started(fn, at, size, parts);
    }
    atomic_store(&pool.failed, 0);
    atomic_store_explicit(&pool.remaining, parts - 1, memory_order_release);
    for (int i = 1; i < parts; i++) {
        mailbox_t *box = &pool.boxes[i - 1];
        box->fn = fn;
        box->task = at + i * size;
        atomic_fetch_add_explicit(&box->post, 1, memory_order_release);
        pthread_mutex_lock(&box->lock);
        if (box->sleeping) pthread_cond_signal(&box->posted);
        pthread_mutex_unlock(&box->lock);
    }
    int failed = fn(at) != 0;
    int spins = 0;
    while (atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0) {
        if (++spins < SPINS) {
            _mm_pause();
            continue;
        }
        pthread_mutex_lock(&pool.lock);
        while (atomic_load_explicit(&pool.remaining, memory_order_acquire) > 0)
            pthread_cond_wait(&pool.finished, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    failed |= atomic_load(&pool.failed);
    pthread_mutex_unlock(&pool.busy);
    return failed;
}

/* y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for m < M, n < N: w is [N, K] and
   contiguous, x's rows ldx floats apart, y's ldy; the outputs split over up to
   `threads` threads (a thread that cannot start: its share runs here). */
void rows_product(const float *w, const float *x, const float *bias, float *y,
                  long N, long K, long M, long ldx, long ldy, int threads) {
    task_t tasks[16];
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    const long share = ((N + threads - 1) / threads + 7) & ~7L;
    int parts = 0;
    for (long n0 = 0; n0 < N; n0 += share, parts++)
        tasks[parts] = (task_t){w, x, bias, y, n0, n0 + share < N ? n0 + share : N, K, ldx, ldy, M};
    run_parts(run, tasks, sizeof tasks[0], parts);
}

/* The same product over bfloat16 weights, inputs and outputs (a model run in
   bfloat16): each bfloat16 widened to float32 exactly (its bits shifted up),
   the products and sums in float32 as above, in the same order whatever the
   call's other rows; each output rounded to bfloat16 at the end (to nearest,
   ties to even, as torch rounds). The weight is half the bytes to read. */
static inline __m256 wide8(const unsigned short *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256 wide_tail(const unsigned short *p, long n) {
    unsigned short b[8] = {0};
    for (long i = 0; i < n; i++) b[i] = p[i];
    return wide8(b);
}
static inline unsigned short narrow(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

typedef struct {
    const unsigned short *w;
    const float *x;
    const unsigned short *bias;
    unsigned short *y;
    long n0, n1, K, ldx, ldy, M;
} task16_t;

#define LOAD16(p) wide8(p)
#define TAIL16(p) wide_tail(p, K - K8)
#define BLOCK16(R, WR) \
static void blk16_##R##_##WR(const task16_t *t, const float *x, unsigned short *y, long n, \
                             __m256i tail) { \
    const long K = t->K, K8 = K & ~7L; \
    const unsigned short *w = t->w + n * K; \
    SUMS(R, WR, LOAD16, TAIL16, ) \
    for (int m = 0; m < R; m++) for (int i = 0; i < WR; i++) { \
        float s = hsum(a[i][m]); \
        if (t->bias) { \
            const unsigned int b = (unsigned int)t->bias[n + i] << 16; \
            float bf; \
            __builtin_memcpy(&bf, &b, 4); \
            s += bf; \
        } \
        y[m * t->ldy + n + i] = narrow(s); \
    } \
}
BLOCK16(1, 8) BLOCK16(2, 4) BLOCK16(3, 4) BLOCK16(4, 4)
BLOCK16(1, 1) BLOCK16(2, 1) BLOCK16(3, 1) BLOCK16(4, 1)
typedef void (*block16_t)(const task16_t *, const float *, unsigned short *, long, __m256i);
static const block16_t fours16[5] = {0, 0, blk16_2_4, blk16_3_4, blk16_4_4};
static const block16_t singles16[5] = {0, blk16_1_1, blk16_2_1, blk16_3_1, blk16_4_1};
#ifdef WIDE
/* As the float32 product's wide blocks: six weight rows by up to four input
   rows, and five to eight input rows by four then the rest over the same six
   weight rows (the weight read once for eight rows, not twice). */
BLOCK16(1, 6) BLOCK16(2, 6) BLOCK16(3, 6) BLOCK16(4, 6)
static const block16_t sixes16[5] = {0, blk16_1_6, blk16_2_6, blk16_3_6, blk16_4_6};
#define GROUP16 8
#else
#define GROUP16 4
#endif

/* Input rows GROUP16 at a time (one: eight weight rows a block), each group
   over every weight row: by fours in the plain build, by sixes in the wide. */
static void *run16(void *arg) {
    const task16_t *t = arg;
    int lanes[8];
    for (int j = 0; j < 8; j++) lanes[j] = j < (t->K & 7L) ? -1 : 0;
    const __m256i tail = _mm256_loadu_si256((const __m256i *)lanes);
    for (long r = 0; r < t->M; r += GROUP16) {
        const int R = t->M - r < GROUP16 ? (int)(t->M - r) : GROUP16;
        const int first = R < 4 ? R : 4;
        const float *x = t->x + r * t->ldx;
        unsigned short *y = t->y + r * t->ldy;
        long n = t->n0;
        if (R == 1)
            for (; n + 8 <= t->n1; n += 8) blk16_1_8(t, x, y, n, tail);
#ifdef WIDE
        else
            for (; n + 6 <= t->n1; n += 6) {
                sixes16[first](t, x, y, n, tail);
                if (R > 4) sixes16[R - 4](t, x + 4 * t->ldx, y + 4 * t->ldy, n, tail);
            }
#else
        else
            for (; n + 4 <= t->n1; n += 4) fours16[R](t, x, y, n, tail);
#endif
        for (; n < t->n1; n++) {
            singles16[first](t, x, y, n, tail);
            if (R > 4) singles16[R - 4](t, x + 4 * t->ldx, y + 4 * t->ldy, n, tail);
        }
    }
    return 0;
}

void rows_product16(const unsigned short *w, const float *x,
                    const unsigned short *bias, unsigned short *y, long N, long K, long M,
                    long ldx, long ldy, int threads) {
    task16_t tasks[16];
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    const long share = ((N + threads - 1) / threads + 7) & ~7L;
    int parts = 0;
    for (long n0 = 0; n0 < N; n0 += share, parts++)
        tasks[parts] =
            (task16_t){w, x, bias, y, n0, n0 + share < N ? n0 + share : N, K, ldx, ldy, M};
    run_parts(run16, tasks, sizeof tasks[0], parts);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for each lane, x at most 0 (exp_8: with the codec's activations,
   below). */
static inline __m256 exp_8(__m256 x);

typedef struct {
    const float *q, *k, *v, *mask;
    float *out;
    long p0, p1, H, group, S, D, qb, qh, kb, kh, ks, vb, vh, vs, mb;
    float scale;
} heads_t;

/* The dot products of the query with the n (at most 8) keys from k, ks
   floats apart, in the lanes of one vector (the rest 0): each key's D floats
   multiplied and added lane by lane, then the lanes in pairs, fours and eights
   (the same for every lane). */
static inline __attribute__((always_inline)) __m256
dots8(const __m256 *qv, const float *k, long ks, const long D8, const int n) {
    __m256 a[8];
    for (int p = 0; p < 8; p++) {
        if (p >= n) { a[p] = _mm256_setzero_ps(); continue; }
        a[p] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k + p * ks));
    }
    for (long i = 1; i < D8; i++)
        for (int p = 0; p < 8; p++)
            if (p < n) a[p] = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k + p * ks + 8 * i), a[p]);
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Positions j to j + n's scores (dots8, scaled, plus their mask mj): -inf
   where the mask is, the keys not read where it is -inf for all eight. */
static inline __attribute__((always_inline)) __m256
scores8(const __m256 *qv, const float *k, long ks, __m256 mj, __m256 scale, const long D8,
        const int n) {
    const __m256 none = _mm256_set1_ps(-INFINITY), out = _mm256_cmp_ps(mj, none, _CMP_EQ_OQ);
    if (_mm256_movemask_ps(out) == 0xff) return none;
    return _mm256_blendv_ps(_mm256_fmadd_ps(dots8(qv, k, ks, D8, n), scale, mj), none, out);
}

/* Position j + P's value, where its weight is not 0, into sum P mod U of
   each of the chunk's first `count` vectors (at most VN): the sums lie in a,
   VN to a sum (VALUE_SUMS). */
#define VALUE_VECTOR(U, VN, P, V_) \
    if (V_ < VN && V_ < count) \
        a[(P) % (U) * (VN) + (V_)] = \
            _mm256_fmadd_ps(ev, _mm256_loadu_ps(vp + 8 * (V_)), a[(P) % (U) * (VN) + (V_)]);
#define VALUE(U, VN, P, ALL) \
    if (ALL || s[j + P] != 0.0f) { \
        const __m256 ev = _mm256_broadcast_ss(s + j + P); \
        const float *vp = vj + P * t->vs; \
        VALUE_VECTOR(U, VN, P, 0) VALUE_VECTOR(U, VN, P, 1) VALUE_VECTOR(U, VN, P, 2) \
        VALUE_VECTOR(U, VN, P, 3) VALUE_VECTOR(U, VN, P, 4) VALUE_VECTOR(U, VN, P, 5) \
        VALUE_VECTOR(U, VN, P, 6) VALUE_VECTOR(U, VN, P, 7) \
    }
/* A block's eight positions (ALL: every weight known not to be 0). */
#define VALUE_BLOCK(U, VN, ALL) { \
        VALUE(U, VN, 0, ALL) VALUE(U, VN, 1, ALL) VALUE(U, VN, 2, ALL) VALUE(U, VN, 3, ALL) \
        VALUE(U, VN, 4, ALL) VALUE(U, VN, 5, ALL) VALUE(U, VN, 6, ALL) VALUE(U, VN, 7, ALL) \
    }
#define VALUE_OUT(U, VN, V_) \
    if (V_ < VN && V_ < count) { \
        __m256 b = a[V_]; \
        if (U == 2) b = _mm256_add_ps(b, a[VN + V_]); \
        if (U == 4) \
            b = _mm256_add_ps(_mm256_add_ps(b, a[VN + V_]), \
                              _mm256_add_ps(a[2 * VN + V_], a[3 * VN + V_])); \
        _mm256_storeu_ps(o + 8 * (c + V_), _mm256_mul_ps(b, inv)); \
    }

/* The weights s (0 for a position left out) by the values, for the head's
   vectors c to c + count (count at most VN): position j in sum j mod U of
   each, U VN sums in registers (every index a constant: no loop runs over
   them); blocks of eight positions whose weights are all 0 not read, those
   whose weights are none of them 0 without a test a position. Then
   each vector's sums in pairs, times inv, into o. */
#define VALUE_SUMS(U, VN) \
static inline __attribute__((always_inline)) void \
value_sums_##U##_##VN(const heads_t *t, const float *s, const float *v, long S, long c, \
                      long count, __m256 inv, float *o) { \
    const __m256 zero = _mm256_setzero_ps(); \
    __m256 a[8] = {zero, zero, zero, zero, zero, zero, zero, zero}; \
    for (long j = 0; j < S; j += 8) { \
        const int kept = \
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), zero, _CMP_NEQ_UQ)); \
        const float *vj = v + j * t->vs + 8 * c; \
        if (kept == 0xff) VALUE_BLOCK(U, VN, 1) \
        else if (kept) VALUE_BLOCK(U, VN, 0) \
    } \
    VALUE_OUT(U, VN, 0) VALUE_OUT(U, VN, 1) VALUE_OUT(U, VN, 2) VALUE_OUT(U, VN, 3) \
    VALUE_OUT(U, VN, 4) VALUE_OUT(U, VN, 5) VALUE_OUT(U, VN, 6) VALUE_OUT(U, VN, 7) \
}
/* Short heads: four sums of two vectors (more multiply-adds in flight);
   heads of four vectors: two sums; longer ones: one sum of eight at a time. */
VALUE_SUMS(4, 2) VALUE_SUMS(2, 4) VALUE_SUMS(1, 8)

/* One query's attention for (row, head) pair p (s: room for its scores):
   the scores against the row's keys (the head's group's) eight positions at
   a time, scaled, plus the mask; their softmax's weights (e^x of each less
   the largest, eight at a time) by the values (VALUE_SUMS: in up to four
   interleaved sums of each of the head's vectors, in registers). A block of
   eight positions the mask leaves all out is not read; in the others a
   left-out position's score is -inf whatever its key holds, and its value is
   not read. A pair with none left gives zeros. Each position is summed the
   same way wherever it lies in its block, so a row's result does not depend
   on the span either. */
static inline __attribute__((always_inline)) void
one_pair(const heads_t *t, long p, float *s, const long D8) {
    const long S = t->S, S8 = S & ~7L;
    const long b = p / t->H, h = p % t->H, g = h / t->group;
    const float *q = t->q + b * t->qb + h * t->qh, *m = t->mask + b * t->mb;
    const float *k = t->k + b * t->kb + g * t->kh, *v = t->v + b * t->vb + g * t->vh;
    const __m256 none = _mm256_set1_ps(-INFINITY), scale = _mm256_set1_ps(t->scale);
    __m256 qv[D8];
    for (long i = 0; i < D8; i++) qv[i] = _mm256_loadu_ps(q + 8 * i);
    __m256 top = none;
    long j = 0;
    for (; j < S8; j += 8) {
        const __m256 sj = scores8(qv, k + j * t->ks, t->ks, _mm256_loadu_ps(m + j), scale, D8, 8);
        _mm256_storeu_ps(s + j, sj);
        top = _mm256_max_ps(top, sj);
    }
    if (j < S) {  /* the last few: the rest of their block as left out */
        const int n = (int)(S - j);
        float mt[8];
        for (int i = 0; i < 8; i++) mt[i] = i < n ? m[j + i] : -INFINITY;
        const __m256 sj = scores8(qv, k + j * t->ks, t->ks, _mm256_loadu_ps(mt), scale, D8, n);
        _mm256_storeu_ps(s + j, sj); /* (s holds S rounded up to 8) */
        top = _mm256_max_ps(top, sj);
    }
    const float most = hmax(top);
    float *o = t->out + p * t->D;
    if (most == -INFINITY) {
        for (long i = 0; i < D8; i++) _mm256_storeu_ps(o + 8 * i, _mm256_setzero_ps());
        return;
    }
    const __m256 topv = _mm256_set1_ps(most);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j < S; j += 8) {
        const __m256 sj = _mm256_loadu_ps(s + j);
        const __m256 out = _mm256_cmp_ps(sj, none, _CMP_EQ_OQ);
        const __m256 e = _mm256_andnot_ps(out, exp_8(_mm256_sub_ps(sj, topv)));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
    if (D8 <= 2) value_sums_4_2(t, s, v, S, 0, D8, inv, o);
    else if (D8 == 4) value_sums_2_4(t, s, v, S, 0, 4, inv, o);
    else
        for (long c = 0; c < D8; c += 8) value_sums_1_8(t, s, v, S, c, D8 - c, inv, o);
}

/* Pairs p0 to p1, the usual heads (8 to 128 floats) each in code of its own. */
static void *attend_run(void *arg) {
    const heads_t *t = arg;
    float *s = malloc(sizeof(float) * ((t->S + 7) / 8 * 8 + 8));
    if (!s) return (void *)1;
    const long D8 = t->D / 8;
    for (long p = t->p0; p < t->p1; p++) {
        switch (D8) {
        case 1: one_pair(t, p, s, 1); break;
        case 2: one_pair(t, p, s, 2); break;
        case 4: one_pair(t, p, s, 4); break;
        case 8: one_pair(t, p, s, 8); break;
        case 16: one_pair(t, p, s, 16); break;
        default: one_pair(t, p, s, D8);
        }
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
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    const long pairs = B * H, share = (pairs + threads - 1) / threads;
    int parts = 0;
    for (long p0 = 0; p0 < pairs; p0 += share, parts++)
        tasks[parts] = (heads_t){q, k, v, mask, out, p0, p0 + share < pairs ? p0 + share : pairs,
                                 H, group, S, D, qb, qh, kb, kh, ks, vb, vh, vs, mb, scale};
    return run_parts(attend_run, tasks, sizeof tasks[0], parts);
}

/* A decode step's keys and values into a cache table: for each row r, kind
   k (0: the key, 1: the value) and head h, the d floats at src + r sr + k sk
   + h sh to dst + k dk + r dr + h dh + positions[r] dp (each d floats in a
   row, in both). 0; or 1, nothing written, where a position is not below
   length. */
int put_pairs(const float *src, float *dst, const long *positions, long rows, long heads,
              long d, long sr, long sk, long sh, long dk, long dr, long dh, long dp,
              long length) {
    for (long r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= length) return 1;
    for (long r = 0; r < rows; r++)
        for (long k = 0; k < 2; k++)
            for (long h = 0; h < heads; h++)
                memcpy(dst + k * dk + r * dr + h * dh + positions[r] * dp,
                       src + r * sr + k * sk + h * sh, sizeof(float) * d);
    return 0;
}

/* The lanes below `count` (a last block's mask for maskload and maskstore). */
static inline __m256i lanes_below(long count) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int k = count < 0 ? 0 : count > 8 ? 8 : (int)count;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), index);
}

/* The sampler's counter-based noise (sampling._token_uniform, bit for bit):
   for pair p (a row's codebook) keyed keys[p] and token t (tokens[p * M + j],
   or j where tokens is NULL), the 32-bit hash of keys[p] ^ (t * GOLDEN mod
   2^32) (xorshift-multiply), its top 24 bits, centred, as a float in (0, 1):
   out[p * M + j]. Eight tokens at a time, in 32-bit lanes, which hold every
   value of the 64-bit arithmetic it mirrors while a key is below 2^32; 1
   (nothing written past the pair) for a key that is not. */
static inline __m256i mix8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x21F0AAAD));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x735A2D97));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

int uniforms(const long *keys, const long *tokens, float *out, long pairs, long M) {
    const __m256i golden = _mm256_set1_epi32((int)0x9E3779B1u);
    const __m256 half = _mm256_set1_ps(0.5f), unit = _mm256_set1_ps(1.0f / 16777216.0f);
    for (long p = 0; p < pairs; p++) {
        if (keys[p] < 0 || keys[p] > 0xFFFFFFFFL) return 1;
        const __m256i key = _mm256_set1_epi32((int)(unsigned)keys[p]);
        const long *t = tokens ? tokens + p * M : 0;
        float *o = out + p * M;
        for (long j = 0; j < M; j += 8) {
            __m256i ids;
            if (t) {
                int low[8];
                for (int i = 0; i < 8; i++) low[i] = j + i < M ? (int)(unsigned)t[j + i] : 0;
                ids = _mm256_loadu_si256((const __m256i *)low);
            } else {
                ids = _mm256_add_epi32(_mm256_set1_epi32((int)j),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            }
            const __m256i bits = mix8(_mm256_xor_si256(key, _mm256_mullo_epi32(ids, golden)));
            const __m256 u = _mm256_mul_ps(
                _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8)), half), unit);
            if (j + 8 <= M) _mm256_storeu_ps(o + j, u);
            else _mm256_maskstore_ps(o + j, lanes_below(M - j), u);
        }
    }
    return 0;
}

/* The sampler's sort (sampling.warp_rows' ascending scores): each of `rows`
   rows of n floats (x, rows ldx apart) in ascending order into out (rows n
   apart), as torch.sort's values with stable=True, bit for bit: NaN last,
   -0 and +0 equal, equal values in the order they came. Each value's place is
   counted (the values below it, and the equal ones before it), eight at a
   time, by comparisons of integer keys in the floats' order: no branch
   depends on the values, where a comparison sort's mispredicted branches cost
   torch 2 us a row of 66. n^2 / 8 comparisons a row: 1 (nothing written) past
   512 values, where the library's sort is the faster. */
static inline int order_key(float v) {
    int b;
    __builtin_memcpy(&b, &v, 4);
    if ((b & 0x7FFFFFFF) > 0x7F800000) return 0x7FFFFFFF;  /* NaN, any sign: last */
    if (b == (int)0x80000000) return 0;                      /* -0 as +0 */
    return b ^ ((b >> 31) & 0x7FFFFFFF);
}

static inline int hsum_int(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

int sort_rows(const float *x, float *out, long rows, long n, long ldx) {
    if (n > 512) return 1;
    int keys[512 + 8];
    const long padded = (n + 7) & ~7L;
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float *o = out + r * n;
        for (long j = 0; j < n; j++) keys[j] = order_key(xr[j]);
        for (long j = n; j < padded; j++) keys[j] = 0x7FFFFFFF;  /* below no value */
        for (long i = 0; i < n; i++) {
            const __m256i ki = _mm256_set1_epi32(keys[i]);
            const long block = i & ~7L;
            __m256i count = _mm256_setzero_si256();
            for (long j = 0; j < block; j += 8) {  /* before i: below or equal */
                const __m256i kj = _mm256_loadu_si256((const __m256i *)(keys + j));
                count = _mm256_sub_epi32(
                    count, _mm256_or_si256(_mm256_cmpgt_epi32(ki, kj), _mm256_cmpeq_epi32(ki, kj)));
            }
            const __m256i kb = _mm256_loadu_si256((const __m256i *)(keys + block));
            const __m256i before =
                _mm256_and_si256(_mm256_cmpeq_epi32(ki, kb), lanes_below(i - block));
            count = _mm256_sub_epi32(count, _mm256_or_si256(_mm256_cmpgt_epi32(ki, kb), before));
            for (long j = block + 8; j < padded; j += 8) {  /* after i: below */
                const __m256i kj = _mm256_loadu_si256((const __m256i *)(keys + j));
                count = _mm256_sub_epi32(count, _mm256_cmpgt_epi32(ki, kj));
            }
            o[hsum_int(count)] = xr[i];
        }
    }
    return 0;
}

/* sampling._mix_np on one int64: a shift of a negative value is arithmetic, a
   product wraps (only its low 32 bits are kept), as numpy's int64. */
static inline long mix64(long x) {
    x ^= x >> 16;
    x = (long)(((unsigned long)x * 0x21F0AAADUL) & 0xFFFFFFFFUL);
    x ^= x >> 15;
    x = (long)(((unsigned long)x * 0x735A2D97UL) & 0xFFFFFFFFUL);
    return x ^ (x >> 15);
}

/* A step's draw keys (sampling.row_keys, then codebook_keys; with redraw, the
   codebook keys of redraw_keys too), bit for bit: out[r * K + k] for rows r
   of seed and step. */
void draw_keys(const long *seed, const long *step, long rows, long K, long *out,
               long *redraw) {
    for (long r = 0; r < rows; r++) {
        long h = mix64(seed[r] & 0xFFFFFFFFL);
        h = mix64(h ^ (seed[r] >> 32));
        h = mix64(h ^ (step[r] & 0xFFFFFFFFL));
        const long again = redraw ? mix64(h ^ 0x5BD1E995L) : 0;
        for (long k = 0; k < K; k++) {
            const long offset = (long)(((unsigned long)k * 0x9E3779B1UL + 1) & 0xFFFFFFFFUL);
            out[r * K + k] = mix64(h ^ offset);
            if (redraw) redraw[r * K + k] = mix64(again ^ offset);
        }
    }
}

/* A residual block's join (codec_incremental's): row r of the samples waiting
   (w: held of them, rows ldw apart) followed by the skip path's (s: m, rows
   lds apart) is z; out[r, t] = z[t] + y[r, t] for t < n (y's rows ldy apart;
   out contiguous, n a row), and rest[r] is z past n (contiguous, held + m - n
   a row): the samples that wait for the next call. Each sum is one float add,
   as torch's. */
void join_add(const float *w, const float *s, const float *y, float *out, float *rest,
              long rows, long held, long m, long n, long ldw, long lds, long ldy) {
    const long left = held + m - n;
    for (long r = 0; r < rows; r++) {
        const float *wr = w + r * ldw, *sr = s + r * lds, *yr = y + r * ldy;
        float *o = out + r * n, *q = rest + r * left;
        const long first = n < held ? n : held;
        for (long t = 0; t < first; t++) o[t] = wr[t] + yr[t];
        for (long t = first; t < n; t++) o[t] = sr[t - held] + yr[t];
        for (long t = n; t < held; t++) q[t - n] = wr[t];
        for (long t = n > held ? n : held; t < held + m; t++) q[t - n] = sr[t - held];
    }
}

/* A convolution over time, stride 1: z[b, o, t] = bias[o] + sum over i < C
   and u < U of w[o, i, u] x[b, i, t + u d], for t < n; x's rows (b, i) lie
   xb and xc floats apart, w is [O, C, U]. With S = 1, y is z, contiguous
   [B, O, n]; with S > 1 (a transposed convolution's phases), y is contiguous
   [B, O / S, n S] and y[b, o, t S + r] = z[b, o S + r, t]. The samples go in
   lanes, LANES to a vector (8; 16 in the wide build), V vectors a block, the
   outputs O_ at a time: every
   output is the same sum in the same order wherever its sample and stream
   lie (a block's missing samples are masked off, not read). */
typedef struct {
    const float *x, *w, *bias;
    float *y;
    long p0, p1, blocks, O, C, U, d, n, xb, xc, S;
    int vectors;
    int interleave;  /* S is 2 or a multiple of 4: phases stored in place (put2_*, put4_*) */
} conv_t;

/* Samples j < count (at most 8) of two phases (a0: r, a1: r + 1) into y[j S +
   r], S = 2: 2 count floats in a row. */
static inline void put2_8(float *y, __m256 a0, __m256 a1, long count) {
    const __m256 lo = _mm256_unpacklo_ps(a0, a1), hi = _mm256_unpackhi_ps(a0, a1);
    const __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20);
    const __m256 second = _mm256_permute2f128_ps(lo, hi, 0x31);
    if (count >= 8) {
        _mm256_storeu_ps(y, first);
        _mm256_storeu_ps(y + 8, second);
    } else {
        _mm256_maskstore_ps(y, lanes_below(2 * count), first);
        _mm256_maskstore_ps(y + 8, lanes_below(2 * count - 8), second);
    }
}

/* Samples j < count (at most 8) of four phases (a0 to a3: r to r + 3) into
   y[j S + r] (S a multiple of 4): each sample's four floats in a row. */
static inline void put4_8(float *y, long S, __m256 a0, __m256 a1, __m256 a2, __m256 a3,
                          long count) {
    const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    /* u[k]: samples k (low half) and k + 4 (high half), four phases each. */
    const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                         _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
    if (S == 4) {
        const __m256 out[4] = {_mm256_permute2f128_ps(u[0], u[1], 0x20),
                               _mm256_permute2f128_ps(u[2], u[3], 0x20),
                               _mm256_permute2f128_ps(u[0], u[1], 0x31),
                               _mm256_permute2f128_ps(u[2], u[3], 0x31)};
        for (int k = 0; k < 4; k++) {
            if (count >= 8) _mm256_storeu_ps(y + 8 * k, out[k]);
            else _mm256_maskstore_ps(y + 8 * k, lanes_below(4 * count - 8 * k), out[k]);
        }
        return;
    }
    for (long j = 0; j < count && j < 8; j++) {
        const __m256 v = u[j & 3];
        _mm_storeu_ps(y + j * S, j < 4 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1));
    }
}

/* A residual unit of a codec decoder, steady (codec_incremental's _Residual
   over an activation, a convolution of U taps d apart from C channels to H,
   the activation, a convolution of one tap from H to C: DAC's residual units
   (Snake), EnCodec's residual blocks (ELU)): out[b, c, t] = z[c, t] + y[c, t]
   for t < n, where z is the waiting samples (h) then x's, and y the block
   over the first convolution's input: the buffer (S = (U - 1) d activated
   samples) then the activation of x. Tile by tile of time, every
   intermediate in a few kilobytes: the same floats as the layers one after
   the other by this library (the activation, `conv`'s sums, the join's
   adds). Work item p: stream p / segments, its outputs in the segment's share
   of n. a1 and i1 (C each), a2 and i2 (H each): the activations' parameters
   per channel (ELU: its alpha, inverse unread). */
typedef struct {
    const float *x, *buffer, *waiting, *a1, *i1, *w1, *b1, *a2, *i2, *w2, *b2;
    float *out;
    long p0, p1, segments, share, C, H, U, d, n, S, h, xb, xc, T;
    int kind;
} unit_t;

static inline int vectors_for(long outputs) {
    return outputs == 1 ? 8 : outputs == 2 ? 4 : outputs == 3 ? 3 : 2;
}

/* The codec's activations and convolutions, written once over vectors of
   LANES floats (the macros below): built for eight lanes (AVX2), and in the
   wide build for sixteen too (AVX-512), which the calls then take. Every
   lane's operations are the same in both, in the same order, so a sample
   comes out the same, bit for bit, whatever the vectors' width: a wide
   build's codec decodes what a plain one's does. */
#define FN(name) FN_(name, LANES)
#define FN_(name, lanes) FN__(name, lanes)
#define FN__(name, lanes) name##_##lanes
#define LANES 8
#define VF __m256
#define VI __m256i
#define VM __m256i          /* a load's or store's mask */
#define VC __m256           /* a comparison's lanes, for V_BLEND */
#define V_SET1(f) _mm256_set1_ps(f)
#define V_ZERO() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_LOADM(p, m) _mm256_maskload_ps(p, m)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_STOREM(p, m, v) _mm256_maskstore_ps(p, m, v)
#define V_BELOW(count) lanes_below(count)
#define V_BCAST(p) _mm256_broadcast_ss(p)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_SUB(a, b) _mm256_sub_ps(a, b)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_MIN(a, b) _mm256_min_ps(a, b)
#define V_MAX(a, b) _mm256_max_ps(a, b)
#define V_FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_FNMADD(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define V_ROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_ABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define V_GT(a, b) _mm256_cmp_ps(a, b, _CMP_NLE_UQ)  /* not a <= b: NaN too */
#define V_ANY(c) _mm256_movemask_ps(c)
#define V_BLEND(a, b, c) _mm256_blendv_ps(a, b, c)  /* b where c, else a */
#define V_TRUNC_I(x) _mm256_cvttps_epi32(x)
#define V_ROUND_I(x) _mm256_cvtps_epi32(x)
#define VI_TO_F(i) _mm256_cvtepi32_ps(i)
#define VI_AS_F(i) _mm256_castsi256_ps(i)
#define VI_SET1(k) _mm256_set1_epi32(k)
#define VI_ADD(a, b) _mm256_add_epi32(a, b)
#define VI_AND(a, b) _mm256_and_si256(a, b)
#define VI_EQ(a, b) _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, b))
#define VI_SHL(i, k) _mm256_slli_epi32(i, k)
/* Phases stored in place (see CONV): outputs O and O + 1 (O even) of vector
   VV, S = 2; outputs 0 to 3 of vector VV, S a multiple of 4 (put2_8, put4_8,
   and the wide build's put2_16, put4_16: the same floats, in place). */
#define CONV_PUT2(O_, V, O, VV) \
    if ((O) + 1 < (O_) && (VV) < (V) && left > LANES * (VV)) \
        FN(put2)(y + ((o0 + (O)) / S) * row + (o0 + (O)) % S + 2 * LANES * (VV), \
                 a[((O) * (V) + (VV)) % ((O_) * (V))], \
                 a[(((O) + 1) * (V) + (VV)) % ((O_) * (V))], left - LANES * (VV));
#define CONV_PUT4(O_, V, VV) \
    if ((O_) == 4 && (VV) < (V) && left > LANES * (VV)) \
        FN(put4)(y + (o0 / S) * row + o0 % S + LANES * (VV) * S, S, a[(VV) % ((O_) * (V))], \
                 a[((V) + (VV)) % ((O_) * (V))], a[(2 * (V) + (VV)) % ((O_) * (V))], \
                 a[(3 * (V) + (VV)) % ((O_) * (V))], left - LANES * (VV));
#define CONV_PUTS(O_, V, F, ...) \
    F(O_, V, __VA_ARGS__ 0) F(O_, V, __VA_ARGS__ 1) F(O_, V, __VA_ARGS__ 2) \
    F(O_, V, __VA_ARGS__ 3) F(O_, V, __VA_ARGS__ 4) F(O_, V, __VA_ARGS__ 5) \
    F(O_, V, __VA_ARGS__ 6) F(O_, V, __VA_ARGS__ 7)
#define CONV_PHASES(O_, V) \
    const long S = c->S, row = c->n * S; \
    if (S == 2) { \
        CONV_PUTS(O_, V, CONV_PUT2, 0, ) \
        CONV_PUTS(O_, V, CONV_PUT2, 2, ) \
    } else { \
        CONV_PUTS(O_, V, CONV_PUT4, ) \
    }
"""
    + _CODEC_LANES
    + r"""
#ifdef WIDE
/* The same, sixteen lanes a vector (AVX-512F). */
static inline __mmask16 below16(long count) {
    return count <= 0 ? 0 : count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
}

/* put2_8's, sixteen samples: samples j < count (at most 16) of two phases
   (a0: r, a1: r + 1) into y[j S + r], S = 2. unpacklo and unpackhi leave
   each 128-bit lane holding two samples' pairs (lane l: samples 4 l, 4 l + 1,
   and 4 l + 2, 4 l + 3); the lanes are then put in order. */
static inline void put2_16(float *y, __m512 a0, __m512 a1, long count) {
    const __m512 lo = _mm512_unpacklo_ps(a0, a1), hi = _mm512_unpackhi_ps(a0, a1);
    const __m512 first = _mm512_shuffle_f32x4(_mm512_shuffle_f32x4(lo, hi, 0x44),
                                              _mm512_shuffle_f32x4(lo, hi, 0x44), 0xD8);
    const __m512 second = _mm512_shuffle_f32x4(_mm512_shuffle_f32x4(lo, hi, 0xEE),
                                               _mm512_shuffle_f32x4(lo, hi, 0xEE), 0xD8);
    if (count >= 16) {
        _mm512_storeu_ps(y, first);
        _mm512_storeu_ps(y + 16, second);
    } else {
        _mm512_mask_storeu_ps(y, below16(2 * count), first);
        _mm512_mask_storeu_ps(y + 16, below16(2 * count - 16), second);
    }
}

/* put4_8's, sixteen samples: samples j < count (at most 16) of four phases
   (a0 to a3: r to r + 3) into y[j S + r] (S a multiple of 4). u[k]'s 128-bit
   lane l holds sample 4 l + k's four phases. */
static inline void put4_16(float *y, long S, __m512 a0, __m512 a1, __m512 a2, __m512 a3,
                           long count) {
    const __m512 t0 = _mm512_unpacklo_ps(a0, a1), t1 = _mm512_unpackhi_ps(a0, a1);
    const __m512 t2 = _mm512_unpacklo_ps(a2, a3), t3 = _mm512_unpackhi_ps(a2, a3);
    const __m512 u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
                         _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE)};
    if (S == 4) {
        /* out[l]: samples 4 l to 4 l + 3, lane l of each u in turn. */
        const __m512 v0 = _mm512_shuffle_f32x4(u[0], u[1], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(u[2], u[3], 0x44);
        const __m512 v2 = _mm512_shuffle_f32x4(u[0], u[1], 0xEE);
        const __m512 v3 = _mm512_shuffle_f32x4(u[2], u[3], 0xEE);
        const __m512 out[4] = {_mm512_shuffle_f32x4(v0, v1, 0x88),
                               _mm512_shuffle_f32x4(v0, v1, 0xDD),
                               _mm512_shuffle_f32x4(v2, v3, 0x88),
                               _mm512_shuffle_f32x4(v2, v3, 0xDD)};
        for (int k = 0; k < 4; k++) {
            if (count >= 16) _mm512_storeu_ps(y + 16 * k, out[k]);
            else _mm512_mask_storeu_ps(y + 16 * k, below16(4 * count - 16 * k), out[k]);
        }
        return;
    }
    float w[4][16];
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(w[k], u[k]);
    for (long j = 0; j < count && j < 16; j++) memcpy(y + j * S, &w[j & 3][4 * (j >> 2)], 16);
}
#undef LANES
#undef VF
#undef VI
#undef VM
#undef VC
#undef V_SET1
#undef V_ZERO
#undef V_LOAD
#undef V_LOADM
#undef V_STORE
#undef V_STOREM
#undef V_BELOW
#undef V_BCAST
#undef V_ADD
#undef V_SUB
#undef V_MUL
#undef V_MIN
#undef V_MAX
#undef V_FMADD
#undef V_FNMADD
#undef V_ROUND
#undef V_ABS
#undef V_GT
#undef V_ANY
#undef V_BLEND
#undef V_TRUNC_I
#undef V_ROUND_I
#undef VI_TO_F
#undef VI_AS_F
#undef VI_SET1
#undef VI_ADD
#undef VI_AND
#undef VI_EQ
#undef VI_SHL
#define LANES 16
#define VF __m512
#define VI __m512i
#define VM __mmask16
#define VC __mmask16
#define V_SET1(f) _mm512_set1_ps(f)
#define V_ZERO() _mm512_setzero_ps()
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_LOADM(p, m) _mm512_maskz_loadu_ps(m, p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_STOREM(p, m, v) _mm512_mask_storeu_ps(p, m, v)
#define V_BELOW(count) below16(count)
#define V_BCAST(p) _mm512_set1_ps(*(p))
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_SUB(a, b) _mm512_sub_ps(a, b)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_MIN(a, b) _mm512_min_ps(a, b)
#define V_MAX(a, b) _mm512_max_ps(a, b)
#define V_FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_FNMADD(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define V_ROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define V_ABS(x) _mm512_abs_ps(x)
#define V_GT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ)
#define V_ANY(c) (c)
#define V_BLEND(a, b, c) _mm512_mask_blend_ps(c, a, b)
#define V_TRUNC_I(x) _mm512_cvttps_epi32(x)
#define V_ROUND_I(x) _mm512_cvtps_epi32(x)
#define VI_TO_F(i) _mm512_cvtepi32_ps(i)
#define VI_AS_F(i) _mm512_castsi512_ps(i)
#define VI_SET1(k) _mm512_set1_epi32(k)
#define VI_ADD(a, b) _mm512_add_epi32(a, b)
#define VI_AND(a, b) _mm512_and_si512(a, b)
#define VI_EQ(a, b) _mm512_cmpeq_epi32_mask(a, b)
#define VI_SHL(i, k) _mm512_slli_epi32(i, k)
"""
    + _CODEC_LANES
    + r"""

#endif

/* The codec's calls take the widest build's: WIDEST(act_span) is act_span_16
   in the wide build, act_span_8 in the plain one. */
#ifdef WIDE
#define WIDEST(name) name##_16
#define WIDEST_LANES 16
#else
#define WIDEST(name) name##_8
#define WIDEST_LANES 8
#endif

/* ELU: y = x where x > 0 (or NaN), else alpha (e^x - 1), for rows r0 to r1
   of n floats, ldx and ldy floats apart (y may be x). */
typedef struct {
    const float *x;
    float *y;
    long r0, r1, n, ldx, ldy;
    float alpha;
} elu_t;

static void *elu_run(void *arg) {
    const elu_t *t = arg;
    for (long r = t->r0; r < t->r1; r++)
        WIDEST(act_span)(1, t->x + r * t->ldx, t->y + r * t->ldy, t->n, t->alpha, 0.0f);
    return 0;
}

/* DAC's Snake: y = x + sin(a x)^2 inverse, a and inverse per channel, for
   rows r0 to r1 of T samples (row r in channel r mod C), ldx and ldy floats
   apart; y may be x. */
typedef struct {
    const float *x, *alpha, *inverse;
    float *y;
    long r0, r1, T, C, ldx, ldy;
} snake_t;

static void *snake_run(void *arg) {
    const snake_t *t = arg;
    for (long r = t->r0; r < t->r1; r++)
        WIDEST(act_span)(0, t->x + r * t->ldx, t->y + r * t->ldy, t->T, t->alpha[r % t->C],
                         t->inverse[r % t->C]);
    return 0;
}

/* The rows (ldx and ldy floats apart) in up to `threads` parts. */
void snake(const float *x, float *y, const float *alpha, const float *inverse, long rows,
           long T, long C, long ldx, long ldy, int threads) {
    snake_t tasks[16];
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    const long share = (rows + threads - 1) / threads;
    int parts = 0;
    for (long r = 0; r < rows; r += share, parts++) {
        const long end = r + share < rows ? r + share : rows;
        tasks[parts] = (snake_t){x, alpha, inverse, y, r, end, T, C, ldx, ldy};
    }
    run_parts(snake_run, tasks, sizeof tasks[0], parts);
}

/* Blocks of samples of every stream, split over up to `threads` threads:
   one output a block of eight vectors, two of four, three of three, more
   four at a time over two (vectors of the widest build's lanes). 0, or 1
   where memory for a block's phases ran out. */
int conv(const float *x, const float *w, const float *bias, float *y, long B, long O, long C,
         long U, long d, long n, long xb, long xc, long S, int threads) {
    conv_t tasks[16];
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    /* In place where a block's outputs O_ at a time hold whole groups of phases
       of a row: pairs (S = 2: O_ is even for every O = 2 C_out) or fours (S a
       multiple of 4: O_ is 4, as O is). */
    const int interleave = S == 2 || (S > 1 && S % 4 == 0);
    const int vectors = vectors_for(O);
    const long span = (long)WIDEST_LANES * vectors;
    const long blocks = (n + span - 1) / span, items = B * blocks;
    const long share = (items + threads - 1) / threads;
    int parts = 0;
    for (long p = 0; p < items; p += share, parts++)
        tasks[parts] = (conv_t){x, w, bias, y, p, p + share < items ? p + share : items,
                                blocks, O, C, U, d, n, xb, xc, S, vectors, interleave};
    return run_parts(WIDEST(conv_run), tasks, sizeof tasks[0], parts);
}

/* The rows of n floats in up to `threads` parts: of rows, or of one row's
   floats (a multiple of 16 each). */
void elu(const float *x, float *y, long rows, long n, long ldx, long ldy, float alpha,
         int threads) {
    elu_t tasks[16];
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    int parts = 0;
    if (rows == 1) {
        const long share = ((n + threads - 1) / threads + 15) & ~15L;
        for (long i = 0; i < n; i += share, parts++)
            tasks[parts] = (elu_t){x + i, y + i, 0, 1, i + share < n ? share : n - i, 0, 0, alpha};
    } else {
        const long share = (rows + threads - 1) / threads;
        for (long r = 0; r < rows; r += share, parts++) {
            const long end = r + share < rows ? r + share : rows;
            tasks[parts] = (elu_t){x, y, r, end, n, ldx, ldy, alpha};
        }
    }
    run_parts(elu_run, tasks, sizeof tasks[0], parts);
}

/* The unit's output (out: [B, C, n] contiguous) and its new state: the
   buffer's last S activated samples (next: [B, C, S]) and the joined samples
   past n (rest: [B, C, h]); x's streams xb floats apart, its channels xc;
   buffer and waiting contiguous. Streams, and parts of them, over up to
   `threads` threads. 0, or 1 where memory ran out. */
int residual_unit(const float *x, const float *buffer, const float *waiting, const float *a1,
                  const float *i1, const float *w1, const float *b1, const float *a2,
                  const float *i2, const float *w2, const float *b2, float *out, float *next,
                  float *rest, long B, long C, long H, long U, long d, long n, long h, long xb,
                  long xc, int kind, int threads) {
    const long S = (U - 1) * d, wider = C > H ? C : H;
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
    long T = (4096 / wider) & ~63L;
    T = T < 64 ? 64 : T > 2048 ? 2048 : T;
    const long segments = B >= threads ? 1 : (threads + B - 1) / B;
    long share = ((n + segments - 1) / segments + 63) & ~63L;
    share = share < 64 ? 64 : share;
    const long per = (n + share - 1) / share, items = B * per;
    unit_t tasks[16];
    const long each = (items + threads - 1) / threads;
    int parts = 0;
    for (long p = 0; p < items; p += each, parts++)
        tasks[parts] = (unit_t){x, buffer, waiting, a1, i1, w1, b1, a2, i2, w2, b2, out,
                                p, p + each < items ? p + each : items, per, share, C, H, U, d,
                                n, S, h, xb, xc, T, kind};
    if (run_parts(WIDEST(unit_run), tasks, sizeof tasks[0], parts)) return 1;
    for (long b = 0; b < B; b++)
        for (long c = 0; c < C; c++) {
            const float *xr = x + b * xb + c * xc, *wr = waiting + (b * C + c) * h;
            const float *br = buffer + (b * C + c) * S;
            float *q = next + (b * C + c) * S, *r = rest + (b * C + c) * h;
            /* The activated input's last S: the buffer's tail, then the activation of x. */
            const long old = S > n ? S - n : 0;
            for (long j = 0; j < old; j++) q[j] = br[n + j];
            WIDEST(act_span)(kind, xr + n - (S - old), q + old, S - old, a1[c], i1[c]);
            /* The joined samples past n. */
            for (long j = 0; j < h; j++) r[j] = n + j < h ? wr[n + j] : xr[n + j - h];
        }
    return 0;
}

/* The speech rules of a step (higgs.rules.RowRules, exactly), on rows of
   `width` int64 (state: bos[K], drawn, eos[K], delay, last[K], window[64 * K]),
   for `rows` rows. rules_read: forced[r, k] is stream BOS where bos >= drawn,
   stream EOS where eos - delay <= 0 (over BOS), -1 elsewhere; recent[r] the
   window's last W rows, those older than ras_len[r] rows -1. rules_take: the
   rows with stepped[r] take tokens[r]: drawn + 1, eos - delay, delay once a
   code is stream EOS, last = tokens, the window moved on by one row (the
   tokens at or above markers_from, the stream markers, as -1). */
void rules_read(const long *state, long rows, long width, long K, const long *ras_len,
                long W, long bos_id, long eos_id, long *forced, long *recent) {
    const long window = width - (3 * K + 2);
    for (long r = 0; r < rows; r++) {
        const long *row = state + r * width;
        const long drawn = row[K], delay = row[2 * K + 1];
        for (long k = 0; k < K; k++) {
            long f = row[k] >= drawn ? bos_id : -1;
            if (row[K + 1 + k] - delay <= 0) f = eos_id;
            forced[r * K + k] = f;
        }
        const long *w = row + 3 * K + 2 + window - W * K;
        long *o = recent + r * W * K;
        const long keep = ras_len[r] < W ? ras_len[r] : W;
        for (long j = 0; j < W; j++)
            for (long k = 0; k < K; k++)
                o[j * K + k] = j >= W - keep ? w[j * K + k] : -1;
    }
}

void rules_take(long *state, long rows, long width, long K, const unsigned char *stepped,
                const long *tokens, long eos_id, long markers_from) {
    const long window = width - (3 * K + 2);
    for (long r = 0; r < rows; r++) {
        if (!stepped[r]) continue;
        long *row = state + r * width;
        const long *t = tokens + r * K;
        long ended = 0;
        for (long k = 0; k < K; k++) ended |= t[k] == eos_id;
        row[K] += 1;
        for (long k = 0; k < K; k++) row[K + 1 + k] -= row[2 * K + 1];
        if (ended) row[2 * K + 1] = 1;
        long *w = row + 3 * K + 2;
        for (long k = 0; k < K; k++) row[2 * K + 2 + k] = t[k];
        for (long j = 0; j < window - K; j++) w[j] = w[j + K];
        for (long k = 0; k < K; k++) w[window - K + k] = t[k] >= markers_from ? -1 : t[k];
    }
}
"""
)


def row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``x`` ``[..., T]`` as rows of its ``T`` last-dimension samples, each
    contiguous, every row ``ld`` floats after the last (as a contiguous
    tensor's, or a slice of its last dimension's): ``(rows, T, ld)``; None
    where it is not laid out so."""
    if x.dim() == 0:
        return None
    samples = int(x.shape[-1])
    if samples and x.is_contiguous():  # (the common case, at once)
        return x.numel() // samples, samples, samples
    if samples > 1 and x.stride(-1) != 1:
        return None
    if x.dim() == 3 and samples:  # (a codec layer's [B, C, T], at once)
        batch, channels, _ = x.shape
        batch_stride, ld, _ = x.stride()
        if channels == 1:
            ld = batch_stride if batch != 1 else samples
        elif batch != 1 and batch_stride != ld * channels:
            return None
        return (batch * channels, samples, ld) if ld >= samples else None
    rows = x.numel() // samples if samples else 0
    # The dimensions before the last, but those of size 1 (whose strides say
    # nothing), innermost first: each a whole number of the next's rows.
    outer = [
        (int(size), int(stride))
        for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True)
        if size != 1
    ]
    if not outer:
        return rows, samples, samples
    ld = expected = outer[0][1]
    for size, stride in outer:
        if stride != expected:
            return None
        expected *= size
    if ld < samples:
        return None
    return rows, samples, ld


def _not_rows(x: torch.Tensor, y: torch.Tensor) -> str:
    """Why an activation's ``out`` ``y`` is refused for ``x``."""
    return f"out {tuple(y.shape)} {y.dtype} of strides {y.stride()} for x {tuple(x.shape)}"


def _rows_of(x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``x`` and ``out`` (of its shape) as rows of float32 samples on the CPU:
    ``(rows, T, ld, ld of out)``; None where they are not laid out so."""
    if x.dtype != torch.float32 or out.dtype != torch.float32 or out.shape != x.shape:
        return None
    if not (x.is_cpu and out.is_cpu):
        return None
    layout, written = row_layout(x), row_layout(out)
    if layout is None or written is None:
        return None
    return (*layout, written[2])


def _threads(work: int, per_thread: int) -> int:
    """Torch's threads, as many as ``work`` gives each ``per_thread`` of it (one at least)."""
    available: int = torch.get_num_threads()
    return max(1, min(available, work // per_thread))


@dataclass(frozen=True, slots=True)
class Unit:
    """An activation and the convolution after it, as ``RowKernel.residual_unit``
    reads them: DAC's Snake (``alpha`` and ``inverse`` per input channel) or,
    with ``elu``, ELU (its alpha in ``alpha`` for every input channel,
    ``inverse`` unread), contiguous float32; the convolution's ``weight``
    ``[O, C, U]`` and ``bias`` (``O``, or None) contiguous float32, its
    ``dilation``."""

    alpha: torch.Tensor
    inverse: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dilation: int = 1
    elu: bool = False


def random_units(
    channels: int,
    hidden: int,
    taps: int,
    dilation: int,
    elu: bool,
    generator: torch.Generator | None = None,
) -> list[Unit]:
    """A codec's residual unit's two convolutions with their activations, random:
    ``channels`` to ``hidden`` over ``taps`` taps ``dilation`` apart, then one
    tap back to ``channels``; DAC's Snake (an alpha per channel) or EnCodec's
    ELU (one alpha). (The row kernel's check at load, and the tests.)"""
    units = []
    for inputs, outputs, width in ((channels, hidden, taps), (hidden, channels, 1)):
        alpha = torch.rand(inputs, generator=generator) * 3 + 0.05
        if elu:
            alpha = torch.full((inputs,), float(alpha[0]))
        units.append(
            Unit(
                alpha,
                (alpha + 1e-9).reciprocal(),
                torch.randn(outputs, inputs, width, generator=generator),
                torch.randn(outputs, generator=generator),
                dilation if width > 1 else 1,
                elu,
            )
        )
    return units


@dataclass(frozen=True, slots=True)
class PairTable:
    """A cache's layers' tables as a decode step writes its keys and values into
    them (``RowKernel.pair_table``): the kernel's call, each layer's table,
    the step's ``[R, 2, H, 1, d]``, the positions a table holds and its strides."""

    pairs: Callable[..., int]
    places: list[int]
    shape: tuple[int, int, int, int, int]
    length: int
    strides: tuple[int, int, int, int]

    def writer(self, positions: torch.Tensor) -> Callable[[int, torch.Tensor], None] | None:
        """A step's write of its rows' keys and values into each layer's table,
        each row's at its position (``positions`` ``[R]``): ``write(layer, pair)``
        for ``pair`` ``[R, 2, H, 1, d]``, float32 on the CPU with its ``d`` floats
        contiguous (a joint projection's output, as it lies), copied as they
        are (``scatter_``'s floats, where torch's scatter works out every
        float's place). None where ``positions`` is not ``[R]`` int64 on the
        CPU; a position outside the tables raises ``IndexError`` at the write,
        which then writes nothing."""
        rows, _, heads, _, size = self.shape
        if positions.shape != (rows,) or positions.dtype != torch.long or not positions.is_cpu:
            return None
        at = positions.contiguous()
        shape, length, places, put = self.shape, self.length, self.places, self.pairs
        dk, dr, dh, dp = self.strides

        def write(layer: int, pair: torch.Tensor) -> None:
            if pair.shape != shape or pair.dtype != torch.float32 or pair.stride(4) != 1:
                raise ValueError(f"a step's keys and values {tuple(pair.shape)}, not {shape}")
            sr, sk, sh, _, _ = pair.stride()
            if put(
                pair.data_ptr(),
                places[layer],
                at.data_ptr(),
                rows,
                heads,
                size,
                sr,
                sk,
                sh,
                dk,
                dr,
                dh,
                dp,
                length,
            ):
                raise IndexError(f"a row's position outside the cache's {length}: {at.tolist()}")

        return write


@dataclass(frozen=True, slots=True)
class RowKernel:
    """The compiled kernels: ``product`` is ``F.linear``, reading the weight once
    for every ``MOST_ROWS`` rows; ``attend`` is a decode step's attention;
    ``elu`` is ``F.elu`` and ``snake`` DAC's Snake, each in one pass (codec
    decoders' activations); ``conv`` is ``F.conv1d`` with samples in the lanes
    (codec decoders' convolutions); ``join_add`` a residual block's join and
    add."""

    function: Callable[..., None]
    attention: Callable[..., int]
    activation: Callable[..., None]
    snakes: Callable[..., None]
    convolution: Callable[..., int]
    noise: Callable[..., int]
    keyed: Callable[..., None]
    joined: Callable[..., None]
    function16: Callable[..., None]
    reads_rules: Callable[..., None]
    takes_rules: Callable[..., None]
    sorting: Callable[..., int]
    unit: Callable[..., int]
    pairs: Callable[..., int]
    pooling: Callable[[int], int]  # ``use_pool`` (see the pool in SOURCE)
    wide: bool = False  # the wide build (``WIDE_FLAGS``): the products' larger blocks

    def product(
        self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor:
        """``x @ weight.T + bias`` for a float32 ``x`` (``[rows, K]``, or any
        shape ending in ``K``), ``weight`` contiguous ``[N, K]`` float32 on the
        CPU; or all three bfloat16 (the products and sums in float32, each
        output rounded to bfloat16)."""
        dtype = x.dtype
        if dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
            raise TypeError(f"the row kernel multiplies float32 on a CPU, not {x.dtype} {x.device}")
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            raise TypeError(f"the row kernel's weight and bias must be {dtype}, as the input")
        shape = x.shape
        if x.dim() != 2 or x.stride(-1) != 1:
            x = x.reshape(-1, shape[-1]).contiguous()
        rows, size = x.shape
        outputs = weight.shape[0]
        y = torch.empty(rows, outputs, dtype=dtype)
        if dtype == torch.bfloat16:
            x = x.float()  # (widened once, exactly, not by every block)
        if rows:
            threads = _threads(weight.numel(), PER_THREAD_PRODUCT)
            (self.function if dtype == torch.float32 else self.function16)(
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
        if not (q.dtype == k.dtype == v.dtype == mask.dtype == torch.float32) or not (
            q.is_cpu and k.is_cpu and v.is_cpu and mask.is_cpu
        ):
            raise TypeError(
                "the attention kernel reads float32 on a CPU, not "
                + ", ".join(f"{t.dtype} {t.device}" for t in (q, k, v, mask))
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
        q, k, v, mask = [t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v, mask)]
        qs, ks, vs, ms = q.stride(), k.stride(), v.stride(), mask.stride()
        out = torch.empty(rows, heads, 1, size)
        work = rows * heads * positions * size
        threads = _threads(work, PER_THREAD)
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
            qs[0],
            qs[1],
            ks[0],
            ks[1],
            ks[2],
            vs[0],
            vs[1],
            vs[2],
            ms[0],
            size**-0.5,
            threads,
        ):
            raise MemoryError("no memory for the attention kernel's scores")
        return out

    def elu(
        self, x: torch.Tensor, alpha: float = 1.0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.elu(x, alpha)`` into ``out`` (a new contiguous tensor, ``x``
        itself, or any tensor of its shape laid out as rows: a slice of a wider
        one, say the next convolution's padded input) for a float32 ``x`` on the
        CPU laid out as rows (``row_layout``: contiguous, or a slice of the last
        dimension of a contiguous tensor, as a codec layer's output trimmed of
        its tail): one pass, ``e^x - 1`` for ``expm1`` (within 1e-7 where ``x``
        is below 0; the rest the same)."""
        layout = row_layout(x) if x.dtype == torch.float32 and x.is_cpu else None
        if layout is None:
            raise TypeError(
                f"the ELU kernel reads float32 rows on a CPU, not {x.dtype} {x.device} "
                f"of strides {x.stride()}"
            )
        y = torch.empty(x.shape, dtype=torch.float32) if out is None else out
        if not self.elu_into(x, alpha, y):  # (``x`` is: ``out`` is not laid out as rows)
            raise ValueError(_not_rows(x, y))
        return y

    def elu_into(self, x: torch.Tensor, alpha: float, out: torch.Tensor) -> bool:
        """``elu(x, alpha, out)`` where ``x`` and ``out`` (of its shape) are float32
        rows on the CPU (``row_layout``); False, nothing written, where they are
        not. (A codec's activation writing into the next convolution's input:
        each layout read once.)"""
        layout = _rows_of(x, out)
        if layout is None:
            return False
        rows, samples, ld, ldy = layout
        if ld == ldy == samples:  # (both contiguous: one row, the threads share it out)
            rows, samples, ld, ldy = 1, rows * samples, 0, 0
        threads = _threads(rows * samples, PER_THREAD_ELU)
        self.activation(x.data_ptr(), out.data_ptr(), rows, samples, ld, ldy, alpha, threads)
        return True

    def snake_into(
        self, x: torch.Tensor, alpha: torch.Tensor, inverse: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """``snake(x, alpha, inverse, out)`` where ``x`` and ``out`` (of its
        shape, ``[B, C, T]``) are float32 rows on the CPU (``row_layout``) and
        ``alpha`` and ``inverse`` ``C`` contiguous float32 each; False, nothing
        written, where they are not. (A codec's activation writing into the
        next convolution's input: each layout read once.)"""
        layout = _rows_of(x, out)
        channels = x.shape[1] if x.dim() == 3 else -1
        if layout is None or channels < 0:
            return False
        for t in (alpha, inverse):
            if t.dtype != torch.float32 or not t.is_cpu or t.numel() != channels:
                return False
            if not t.is_contiguous():
                return False
        rows, samples, ld, ldy = layout
        threads = _threads(x.numel(), PER_THREAD_ELU)
        self.snakes(
            x.data_ptr(),
            out.data_ptr(),
            alpha.data_ptr(),
            inverse.data_ptr(),
            rows,
            samples,
            channels,
            ld,
            ldy,
            threads,
        )
        return True

    def conv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dilation: int = 1,
        phases: int = 1,
    ) -> torch.Tensor:
        """``F.conv1d(x, weight, bias, dilation=dilation)`` (stride 1, no
        padding, one group) for float32 on the CPU: ``x`` ``[B, C, t]`` with its
        samples contiguous, ``weight`` ``[O, C, U]``; the output ``z`` ``[B, O,
        n]``, ``n = t - (U - 1) dilation``. With ``phases`` ``S`` > 1 (a
        transposed convolution of stride ``S`` as ``S`` phases: output rows
        ``o S + r``), each ``S`` rows interleaved: ``[B, O / S, n S]``, sample
        ``t S + r`` of row ``o`` is ``z[:, o S + r, t]``. Each output sample
        is the same sum in the same order wherever it lies (its stream, its
        place in time), so a stream's result does not depend on the call's
        others."""
        for t in (x, weight) if bias is None else (x, weight, bias):
            if t.dtype != torch.float32 or not t.is_cpu:
                raise TypeError(
                    f"the convolution kernel reads float32 on a CPU, not {t.dtype} {t.device}"
                )
        if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != x.shape[1]:
            raise ValueError(
                f"the convolution kernel takes x [B, C, t] and a weight [O, C, U], not "
                f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
            )
        outputs = weight.shape[0]
        if bias is not None and (bias.numel() != outputs or not bias.is_contiguous()):
            raise ValueError(f"a bias of {tuple(bias.shape)} for {outputs} outputs")
        if dilation < 1 or phases < 1 or outputs % phases:
            raise ValueError(f"dilation {dilation}, {phases} phases of {outputs} outputs")
        return self.conv_prepared(x, weight.contiguous(), bias, dilation, phases)

    def join_add(
        self, waiting: torch.Tensor, skip: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A residual block's output: ``cat([waiting, skip], -1)[..., :n] + y``
        (``y`` ``[B, C, n]``, ``n`` at most the two's samples), and the joined
        samples past ``n`` (what waits for the next call), new contiguous
        tensors, in one pass; each sum the same float add as torch's. None
        where the three are not float32 rows on the CPU (``row_layout``) of one
        shape but for their samples."""
        if not waiting.dtype == skip.dtype == y.dtype == torch.float32:
            return None
        if not (waiting.is_cpu and skip.is_cpu and y.is_cpu) or y.dim() != 3:
            return None
        if waiting.shape[:2] != y.shape[:2] or skip.shape[:2] != y.shape[:2]:
            return None
        rows_w, rows_s, rows_y = row_layout(waiting), row_layout(skip), row_layout(y)
        held, m, n = waiting.shape[2], skip.shape[2], y.shape[2]
        if rows_w is None or rows_s is None or rows_y is None or n > held + m:
            return None
        ldw, lds, ldy = rows_w[2], rows_s[2], rows_y[2]
        batch, channels = y.shape[:2]
        out = torch.empty(batch, channels, n)
        rest = torch.empty(batch, channels, held + m - n)
        self.joined(
            waiting.data_ptr(),
            skip.data_ptr(),
            y.data_ptr(),
            out.data_ptr(),
            rest.data_ptr(),
            batch * channels,
            held,
            m,
            n,
            ldw,
            lds,
            ldy,
        )
        return out, rest

    def pair_table(self, tables: list[torch.Tensor]) -> PairTable | None:
        """Each layer's cache table, ``tables[layer]`` ``[2, R, H, length, d]``
        (the keys, then the values), as a decode step's writes take them
        (``PairTable.writer``); checked once, where a step makes its writer
        (a cache keeps it while its tensors stay). None where the tables are
        not float32 views on the CPU of one layout with their ``d`` floats
        contiguous."""
        first = tables[0] if tables else None
        if first is None or first.dim() != 5:
            return None
        layout = (first.shape, first.stride())
        for table in tables:
            if table.dtype != torch.float32 or not table.is_cpu or table.stride(4) != 1:
                return None
            if (table.shape, table.stride()) != layout:
                return None
        _, rows, heads, length, size = first.shape
        dk, dr, dh, dp, _ = first.stride()
        return PairTable(
            self.pairs,
            [table.data_ptr() for table in tables],
            (rows, 2, heads, 1, size),
            length,
            (dk, dr, dh, dp),
        )

    def residual_unit(
        self,
        x: torch.Tensor,
        buffer: torch.Tensor,
        waiting: torch.Tensor,
        first: Unit,
        second: Unit,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A codec's residual unit's steady call, in one pass over tiles of time:
        ``cat([waiting, x], -1)[..., :n] + y`` (``x`` ``[B, C, n]``, ``n`` > 0),
        where ``y`` is ``second``'s convolution (one tap, ``H`` channels to
        ``C``) of its activation of ``first``'s convolution (``U`` taps ``d``
        apart, ``C`` to ``H``) of its padded input: ``buffer`` (the last ``(U -
        1) d`` activated samples) then ``first``'s activation of ``x``; and the
        unit's new state: the padded input's last ``(U - 1) d`` samples and the
        joined samples past ``n``. DAC's residual units (Snake) and EnCodec's
        residual blocks (ELU). The same floats as ``snake`` or ``elu``,
        ``conv``, the activation, ``conv`` and ``join_add`` one after the
        other, where each layer's samples make a pass over memory (a codec's
        last layers: a megabyte each for eight streams), and here stay in a
        few kilobytes. None where the tensors are not float32 on the CPU, ``x``
        rows of contiguous samples, ``buffer`` and ``waiting`` contiguous, of
        the unit's shapes."""
        if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 3 or not x.shape[2]:
            return None
        if x.stride(2) != 1 or first.elu != second.elu:
            return None
        batch, channels, n = x.shape
        hidden, taps = first.weight.shape[0], first.weight.shape[2]
        span, held = (taps - 1) * first.dilation, waiting.shape[-1]
        for t, shape in ((buffer, (batch, channels, span)), (waiting, (batch, channels, held))):
            if t.dtype != torch.float32 or not t.is_cpu or tuple(t.shape) != shape:
                return None
            if not t.is_contiguous():
                return None
        if first.weight.shape[1] != channels or second.weight.shape != (channels, hidden, 1):
            return None
        if first.alpha.numel() != channels or second.alpha.numel() != hidden:
            return None
        out = torch.empty(batch, channels, n)
        new = torch.empty(batch, channels, span)
        rest = torch.empty(batch, channels, held)
        work = batch * n * channels * hidden * (taps + 1)
        if self.unit(
            x.data_ptr(),
            buffer.data_ptr(),
            waiting.data_ptr(),
            first.alpha.data_ptr(),
            first.inverse.data_ptr(),
            first.weight.data_ptr(),
            None if first.bias is None else first.bias.data_ptr(),
            second.alpha.data_ptr(),
            second.inverse.data_ptr(),
            second.weight.data_ptr(),
            None if second.bias is None else second.bias.data_ptr(),
            out.data_ptr(),
            new.data_ptr(),
            rest.data_ptr(),
            batch,
            channels,
            hidden,
            taps,
            first.dilation,
            n,
            held,
            x.stride(0),
            x.stride(1),
            int(first.elu),
            _threads(work, PER_THREAD),
        ):
            raise MemoryError("no memory for the residual unit's tiles")
        return out, new, rest

    def conv_prepared(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dilation: int = 1,
        phases: int = 1,
    ) -> torch.Tensor:
        """``conv`` for a caller holding its weight and bias as the kernel reads
        them (float32 on the CPU, contiguous, of matching sizes: a codec layer's,
        made once), and ``x`` float32 on the CPU: only ``x`` is checked (a
        codec's call runs some thirty convolutions of a few samples, where
        ``conv``'s checks cost as much as the kernel)."""
        if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 3:
            raise TypeError(f"the convolution kernel reads x [B, C, t] float32 on a CPU, not {x}")
        if x.stride(2) != 1:
            x = x.contiguous()
        outputs, channels, taps = weight.shape
        batch = x.shape[0]
        n = max(0, x.shape[2] - (taps - 1) * dilation)
        y = torch.empty(batch, outputs // phases, n * phases)
        if batch and n and outputs:
            work = batch * n * outputs * channels * taps
            if self.convolution(
                x.data_ptr(),
                weight.data_ptr(),
                None if bias is None else bias.data_ptr(),
                y.data_ptr(),
                batch,
                outputs,
                channels,
                taps,
                dilation,
                n,
                x.stride(0),
                x.stride(1),
                phases,
                _threads(work, PER_THREAD),
            ):
                raise MemoryError("no memory for the convolution kernel's phases")
        return y

    def snake(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor,
        inverse: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DAC's Snake, ``x + sin(alpha x)^2 inverse`` (``inverse`` is ``1 /
        (alpha + 1e-9)``), into ``out`` (a new contiguous tensor, or any tensor
        of ``x``'s shape laid out as rows, as ``elu``'s), in one pass: ``x``
        ``[B, C, T]`` float32 on the CPU laid out as rows (``row_layout``:
        contiguous, or a slice of the last dimension of a contiguous tensor),
        ``alpha`` and ``inverse`` ``C`` contiguous floats each (``[1, C, 1]``).
        The squared sine by a polynomial (``1 - sin^2`` of the reduced
        argument where its octant's is the cosine): within 2e-7 of a float64
        Snake (of the sine's size, where its argument is at most 8,192), as
        torch's."""
        layout = row_layout(x) if x.dtype == torch.float32 and x.is_cpu else None
        for t in (alpha, inverse):
            if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                layout = None
        if layout is None:
            raise TypeError(
                f"the Snake kernel reads float32 rows on a CPU, not {x.dtype} {x.device} "
                f"of strides {x.stride()}"
            )
        if x.dim() != 3 or alpha.numel() != x.shape[1] or inverse.numel() != x.shape[1]:
            raise ValueError(
                f"the Snake kernel takes x [B, C, T] and C alphas, not x {tuple(x.shape)}, "
                f"alpha {tuple(alpha.shape)}, inverse {tuple(inverse.shape)}"
            )
        y = torch.empty(x.shape, dtype=torch.float32) if out is None else out
        if not self.snake_into(x, alpha, inverse, y):  # (the rest is: ``out`` is not rows)
            raise ValueError(_not_rows(x, y))
        return y

    def uniforms(
        self, keys: torch.Tensor, tokens: torch.Tensor | None, vocab: int = 0
    ) -> torch.Tensor | None:
        """``sampling._token_uniform``'s noise, bit for bit, in one pass: ``keys``
        ``[B, K]`` (each below 2^32, as ``codebook_keys`` makes them) and
        ``tokens`` ``[B, K, M]`` int64 on the CPU, or None for tokens ``0 ..
        vocab - 1`` of every row and codebook: float32 ``[B, K, M]``. None
        where a key is out of that range (the library's operations then)."""
        batch, codebooks = keys.shape
        if tokens is not None:
            tokens = tokens.contiguous()
            vocab = int(tokens.shape[-1])
        keys = keys.contiguous()
        out = torch.empty(batch, codebooks, vocab)
        if self.noise(
            keys.data_ptr(),
            None if tokens is None else tokens.data_ptr(),
            out.data_ptr(),
            batch * codebooks,
            vocab,
        ):
            return None
        return out

    def sort(self, x: torch.Tensor) -> torch.Tensor | None:
        """``torch.sort(x, dim=-1, stable=True).values`` of float32 ``x`` on the
        CPU, bit for bit, without the indices; None where a row is longer than
        ``MOST_SORTED`` (the library's sort then)."""
        if x.dtype != torch.float32 or not x.is_cpu:
            raise TypeError(f"the row kernel sorts float32 on a CPU, not {x.dtype} {x.device}")
        n = int(x.shape[-1]) if x.dim() else 1
        if n > MOST_SORTED:
            return None
        x = x.contiguous()
        out = torch.empty(x.shape)
        if x.numel() and self.sorting(x.data_ptr(), out.data_ptr(), x.numel() // n, n, n):
            return None
        return out

    def draw_keys(
        self, seed: npt.NDArray[np.int64], step: npt.NDArray[np.int64], codebooks: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """A step's draw keys for rows of ``seed`` and ``step`` (int64 on the
        host): ``sampling.codebook_keys`` of ``sampling.row_keys``, and of their
        ``redraw_keys``, both ``[rows, codebooks]``, bit for bit, in one call
        (numpy takes a few dozen, each of which costs more than the hashing)."""
        seed = np.ascontiguousarray(seed, dtype=np.int64)
        step = np.ascontiguousarray(step, dtype=np.int64)
        rows = len(seed)
        both = np.empty((2, rows, codebooks), dtype=np.int64)  # (a pointer costs a microsecond)
        at = both.ctypes.data
        self.keyed(seed.ctypes.data, step.ctypes.data, rows, codebooks, at, at + both[0].nbytes)
        return both[0], both[1]

    def read_rules(
        self,
        state: torch.Tensor,
        shape: tuple[int, int, int],
        ras_len: torch.Tensor,
        ids: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``higgs.rules.RowRules.forced`` in one call, for ``shape``'s first
        ``rows`` rows of ``state`` (contiguous int64 on the CPU), its ``K``
        codebooks and ``window``; ``ids`` the stream BOS and EOS."""
        rows, k, window = shape
        forced = torch.empty(rows, k, dtype=torch.int64)
        recent = torch.empty(rows, window, k, dtype=torch.int64)
        ras_len = ras_len.contiguous()
        self.reads_rules(
            state.data_ptr(),
            rows,
            state.shape[1],
            k,
            ras_len.data_ptr(),
            window,
            ids[0],
            ids[1],
            forced.data_ptr(),
            recent.data_ptr(),
        )
        return forced, recent

    def take_rules(
        self,
        state: torch.Tensor,
        rows: int,
        stepped: torch.Tensor,
        tokens: torch.Tensor,
        eos: int,
        markers_from: int,
    ) -> None:
        """``higgs.rules.RowRules.take`` in one call (``stepped`` bool, ``tokens``
        int64 ``[rows, K]``)."""
        stepped, tokens = stepped.contiguous(), tokens.contiguous()
        k = int(tokens.shape[1])
        self.takes_rules(
            state.data_ptr(),
            rows,
            state.shape[1],
            k,
            stepped.data_ptr(),
            tokens.data_ptr(),
            eos,
            markers_from,
        )


def built() -> RowKernel | None:
    """The kernel (``load``), or None where it could not be built."""
    kernel = load()
    return kernel if isinstance(kernel, RowKernel) else None


def on_cpu(tensor: torch.Tensor) -> RowKernel | None:
    """The kernel for work on ``tensor`` in a step: where ``tensor`` is on a CPU,
    outside a trace (a traced step keeps torch's operations), and it is built."""
    if not tensor.is_cpu or torch.compiler.is_compiling():
        return None
    return built()


# What the wide build adds to the plain one's flags: the CPU's 32 vector
# registers (AVX-512VL) for the products' larger blocks (``WIDE`` in SOURCE).
WIDE_FLAGS = ("-mavx512f", "-mavx512vl", "-DWIDE")


@cache
def load() -> RowKernel | str:
    """The kernel, compiled and checked once a process; or why there is none.

    Where torch finds AVX-512 on this CPU, the wide build (``build``): the same
    results, bit for bit, by blocks that keep more sums in registers (four rows
    by a 3,072 x 1,024 weight in about 0.6x the plain build's time, eight by a
    16,384 x 3,072 one 0.75x: ``bench/bench_rows.py --builds``); the plain one
    where the wide one cannot be built, run or checked."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        wide = build(wide=True)
        if isinstance(wide, RowKernel):
            return wide
        log.debug("the row kernel's wide build: %s", wide)
    return build(wide=False)


def build(wide: bool) -> RowKernel | str:
    """The kernel's wide build (``WIDE_FLAGS``: for a CPU with AVX-512VL) or its
    plain one (AVX2 and FMA), compiled and checked (``_check``); or why there is
    none. (``load`` chooses, once a process.)"""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc) to build it"
    library = _build(compiler, WIDE_FLAGS if wide else ())
    if isinstance(library, str):
        return library
    if not library.rows_usable():
        return "this CPU has no AVX-512VL" if wide else "this CPU has no AVX2 and FMA"
    return _kernel_of(library, wide)


def _build(compiler: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | str:
    """SOURCE compiled with ``flags`` besides AVX2's and FMA's, and loaded; or
    why it could not be. A build is kept in the cache folder (``cache_folder``)
    under a name from what made it (``_build_key``): a process that finds it
    there loads it (a server's start, 6 s sooner on a 2-core machine) rather
    than compile it again."""
    command = [compiler, "-O3", "-mavx2", "-mfma", *flags, "-fPIC", "-shared", "-pthread"]
    folder = cache_folder()
    kept = folder / f"rows-{_build_key(command)}.so" if folder is not None else None
    if kept is not None and kept.is_file():
        try:
            return ctypes.CDLL(str(kept))
        except OSError as exc:  # (not a library: built again, in its place)
            log.debug("the row kernel's kept build %s: %s", kept, exc)
    with tempfile.TemporaryDirectory(prefix="wavecast-rows-") as scratch:
        source, built = Path(scratch, "rows.c"), Path(scratch, "rows.so")
        source.write_text(SOURCE)
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
        if kept is not None:
            _keep(built, kept)
        return ctypes.CDLL(str(built))  # mapped: the file may go


def cache_folder() -> Path | None:
    """Where builds are kept: ``WAVECAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/wavecast``
    (``~/.cache/wavecast``); None where ``WAVECAST_CACHE_DIR`` is empty (keep
    nothing) or no home is known."""
    named = os.environ.get("WAVECAST_CACHE_DIR")
    if named is not None:
        return Path(named) if named else None
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not base:
        home = os.path.expanduser("~")
        if home == "~":
            return None
        base = os.path.join(home, ".cache")
    return Path(base, "wavecast")


def _build_key(command: list[str]) -> str:
    """What a build depends on, hashed: the source, the compiler's command and its
    version (an upgraded compiler builds anew)."""
    try:
        version = subprocess.run(
            [command[0], "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    said = "\0".join([SOURCE, *command, version, platform.machine()])
    return hashlib.sha256(said.encode()).hexdigest()[:24]


def _keep(built: Path, kept: Path) -> None:
    """A copy of ``built`` at ``kept``, whole or not at all (a copy beside it,
    renamed): processes that build at once each put a whole one there. A folder
    that cannot be written keeps nothing."""
    beside = kept.with_name(f"{kept.name}.{os.getpid()}.part")
    try:
        kept.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(built, beside)
        os.replace(beside, kept)
    except OSError as exc:
        log.debug("the row kernel's build was not kept in %s: %s", kept.parent, exc)
        with contextlib.suppress(OSError):
            beside.unlink()


def _kernel_of(library: ctypes.CDLL, wide: bool = False) -> RowKernel | str:
    """The built ``library``'s kernels, checked (``_check``); or what was wrong."""
    function = library.rows_product
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 5 + [ctypes.c_int]
    attention = library.attend
    attention.restype = ctypes.c_int
    attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 14
    attention.argtypes += [ctypes.c_float, ctypes.c_int]
    activation = library.elu
    activation.restype = None
    activation.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4
    activation.argtypes += [ctypes.c_float, ctypes.c_int]
    snakes = library.snake
    snakes.restype = None
    snakes.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 5 + [ctypes.c_int]
    convolution = library.conv
    convolution.restype = ctypes.c_int
    convolution.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 9 + [ctypes.c_int]
    noise = library.uniforms
    noise.restype = ctypes.c_int
    noise.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
    keyed = library.draw_keys
    keyed.restype = None
    keyed.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2
    joined = library.join_add
    joined.restype = None
    joined.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 7
    halves = library.rows_product16
    halves.restype = None
    halves.argtypes = function.argtypes
    read_rules = library.rules_read
    read_rules.restype = None
    read_rules.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p]
    read_rules.argtypes += [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2
    take_rules = library.rules_take
    take_rules.restype = None
    take_rules.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2
    take_rules.argtypes += [ctypes.c_long] * 2
    sorting = library.sort_rows
    sorting.restype = ctypes.c_int
    sorting.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    unit = library.residual_unit
    unit.restype = ctypes.c_int
    unit.argtypes = [ctypes.c_void_p] * 14 + [ctypes.c_long] * 9 + [ctypes.c_int] * 2
    pairs = library.put_pairs
    pairs.restype = ctypes.c_int
    pairs.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 11
    pooling = library.use_pool
    pooling.restype = ctypes.c_int
    pooling.argtypes = [ctypes.c_int]
    kernel = RowKernel(
        function,
        attention,
        activation,
        snakes,
        convolution,
        noise,
        keyed,
        joined,
        halves,
        read_rules,
        take_rules,
        sorting,
        unit,
        pairs,
        pooling,
        wide,
    )
    wrong = _check(kernel)
    return f"it gave wrong results ({wrong})" if wrong else kernel


def _check(kernel: RowKernel) -> str | None:
    """Whether the kernel's products are float64's, to float32 rounding, for
    every block and tail it has (odd outputs, inputs not a multiple of 8, rows
    short enough to be fetched ahead and longer), and its attention float64's
    (heads in groups, masked positions), and its ELU and Snake float64's; or
    what was wrong."""
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
            halves = (weight.bfloat16(), bias.bfloat16(), x[:rows].bfloat16())
            exact16 = halves[2].double() @ halves[0].double().T + halves[1].double()
            got = kernel.product(*halves)
            error = float((got.double() - exact16).abs().max())
            if got.dtype != torch.bfloat16 or not error <= 2**-8 * float(exact16.abs().max()):
                return f"{rows} rows of {size} in bfloat16: off by {error:.3g}"
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
    x = torch.cat([torch.randn(1021, generator=generator) * 30, torch.tensor([0.0, -1e-30])])
    for alpha in (1.0, 0.5):
        exact = F.elu(x.double(), alpha).float()
        error = float((kernel.elu(x, alpha) - exact).abs().max())
        if not error <= 1e-6:
            return f"ELU: off by {error:.3g}"
    x = torch.randn(2, 3, 1021, generator=generator) * 3
    x[0, 0, :3] = torch.tensor([1e4, -2e5, 0.0])  # (beyond 8,192: the C library's sine)
    alpha = torch.rand(1, 3, 1, generator=generator) * 3 + 0.05
    inverse = (alpha + 1e-9).reciprocal()
    argument = (alpha * x).double()  # (in float32, as the kernel takes it)
    exact = (x.double() + argument.sin().pow(2) / (alpha.double() + 1e-9)).float()
    error = float(
        ((kernel.snake(x, alpha, inverse) - exact).abs() / exact.abs().clamp(min=1)).max()
    )
    if not error <= 1e-6:
        return f"Snake: off by {error:.3g}"
    # Sorts of rows with ties, signed zeros, infinities and NaN of either sign.
    for n in (1, 7, 8, 66, MOST_SORTED):
        x = torch.round(torch.randn(3, n, generator=generator) * 2) / 2
        x[0, : n // 2] = -0.0
        x[1, ::3] = float("nan")
        x[2, ::4] = float("-inf")
        x[2, 1::5] = -float("nan")
        x[2, 2::7] = float("inf")
        got = kernel.sort(x)
        exact = torch.sort(x, dim=-1, stable=True).values
        if got is None or not torch.equal(got.view(torch.int32), exact.view(torch.int32)):
            return f"a sort of {n} values: not torch's"
    # A residual join, its waiting samples fewer and more than the output's.
    skip = torch.randn(2, 3, 30, generator=generator)[..., 3:20]  # (rows 30 apart)
    for held, n in ((5, 3), (5, 12), (0, 17)):
        waiting = torch.randn(2, 3, held, generator=generator)
        y = torch.randn(2, 3, n, generator=generator)
        joined = torch.cat([waiting, skip], -1)
        got = kernel.join_add(waiting, skip, y)
        if got is None or not (
            torch.equal(got[0], joined[..., :n] + y) and torch.equal(got[1], joined[..., n:])
        ):
            return f"a residual join of {held} waiting samples: not torch's"
    # A residual unit, steady: the same floats as its layers one after the other,
    # over tiles (two, for the one channel), fewer samples than the buffer's
    # and than those waiting, a strided input; Snake (C to C), ELU (C to C / 2).
    for channels, hidden, dilation, n, held, elu in (
        (1, 1, 3, 2100, 9, False),
        (3, 3, 1, 20, 3, False),
        (5, 5, 9, 7, 27, False),
        (4, 2, 1, 45, 1, True),
    ):
        x = torch.randn(2, channels + 1, n, generator=generator)[:, 1:] * 3
        span = (6 if not elu else 2) * dilation
        buffer = torch.randn(2, channels, span, generator=generator)
        waiting = torch.randn(2, channels, held, generator=generator)
        first, second = random_units(
            channels, hidden, span // dilation + 1, dilation, elu, generator
        )

        def act(x: torch.Tensor, unit: Unit) -> torch.Tensor:
            if unit.elu:
                return kernel.elu(x, float(unit.alpha[0]))
            return kernel.snake(x, unit.alpha, unit.inverse)

        fused = kernel.residual_unit(x, buffer, waiting, first, second)
        padded = torch.cat([buffer, act(x, first)], -1)
        inner = kernel.conv(padded, first.weight, first.bias, dilation)
        y = kernel.conv(act(inner, second), second.weight, second.bias)
        joined = kernel.join_add(waiting, x, y)
        if fused is None or joined is None:
            return f"a residual unit of {channels} channels: refused"
        expected = (joined[0], padded[..., padded.shape[-1] - span :], joined[1])
        if not all(torch.equal(a, b) for a, b in zip(fused, expected, strict=True)):
            return f"a residual unit of {channels} channels: not its layers' floats"
    # Every block's width (one to five outputs), a dilation, a strided input, and
    # lengths that end inside a block and on its edge.
    for outputs, channels, taps, dilation, length in (
        (1, 4, 7, 1, 91),
        (2, 3, 3, 3, 70),
        (3, 5, 1, 1, 48),
        (5, 2, 2, 2, 33),
    ):
        x = torch.randn(2, channels + 1, length, generator=generator)[:, 1:]
        weight = torch.randn(outputs, channels, taps, generator=generator)
        bias = torch.randn(outputs, generator=generator)
        exact = F.conv1d(x.double(), weight.double(), bias.double(), dilation=dilation)
        error = float((kernel.conv(x, weight, bias, dilation) - exact).abs().max())
        if not error <= 1e-5 * max(1.0, float(exact.abs().max())):
            return f"convolution of {outputs} outputs: off by {error:.3g}"
        if outputs % 2 == 0:  # as two phases, interleaved
            phased = kernel.conv(x, weight, bias, dilation, phases=2)
            interleaved = (
                exact.view(2, outputs // 2, 2, -1).transpose(2, 3).reshape(2, outputs // 2, -1)
            )
            error = float((phased - interleaved).abs().max())
            if not error <= 1e-5 * max(1.0, float(exact.abs().max())):
                return f"convolution of {outputs} outputs in two phases: off by {error:.3g}"
    return None
