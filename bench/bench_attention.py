"""A decode step's attention on a CPU: the library's against the row kernel's.

One query a row against the first ``span`` positions of each layer's cache
table (``[rows, heads, length, head]``, as ``StaticKV.layers`` views it), the
mask leaving out each row's positions past a length drawn below the span, for
the released models' heads (MusicGen-small and -large; the 3B speech model's,
in groups of three query heads a key/value head) and the test models'. For the
released models the layers are enough that what they read does not fit in the
CPU's caches, as a step finds them; each way goes over all of them in turn,
the least of ``--runs`` passes, the ways taking turns (the layers: enough that
a pass reads 128 MiB at the shortest span, where their tables fit in 3 GiB).
The test models' two layers sit in the caches, as in their steps: the least of
``WARM_RUNS`` passes. Also each way's largest difference from a float64
attention.

    .venv/bin/python bench/bench_attention.py
    .venv/bin/python bench/bench_attention.py --rows 2 8 --spans 64 512

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from bench_rows import in_turns, kernel_section
from torch.nn import functional as F

from wavecast.server.engines import rowkernel

# (name, query heads, key/value heads, head size, layers: None for enough
# that their tables outsize the caches, as a released model's do)
MODELS: list[tuple[str, int, int, int, int | None]] = [
    ("tiny-musicgen", 2, 2, 16, 2),
    ("tiny-higgs", 4, 2, 16, 2),
    ("MusicGen-small", 16, 16, 64, None),
    ("MusicGen-large", 32, 32, 64, None),
    ("HiggsAudio 3B", 24, 8, 128, None),
]
# Passes over a test model's two layers (in the CPU's caches) timed at least.
WARM_RUNS = 200
# Bytes a pass over the layers reads at least (past the CPU's caches, at the
# shortest span), and the most their tables may take.
LEAST_READ, MOST_BYTES = 128 << 20, 3 << 30


def library(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Each layer's attention by ``scaled_dot_product_attention``; the last."""
    out = q
    for k, v in pairs:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out


def ours(
    kernel: rowkernel.RowKernel,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Each layer's attention by the row kernel; the last."""
    out = q
    for k, v in pairs:
        out = kernel.attend(q, k, v, mask)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--spans", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--length", type=int, default=1506, help="positions a table holds")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    kernel = kernel_section("a decode step's attention, on a CPU", args.threads)
    print(f"- date: {time.strftime('%Y-%m-%d')}; tables of {args.length} positions")
    print(
        f"- µs a layer, the least of {args.runs} passes over layers whose reads "
        f"outsize the caches (the test models: of {WARM_RUNS} over their two layers, "
        "which the caches hold), the largest error against float64 in brackets\n"
    )
    print("| heads | rows | span | layers | library's | row kernel | kernel / library |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for name, heads, groups, size, fixed in MODELS:
        for rows in args.rows:
            table = 2 * rows * groups * args.length * size * 4
            read = table * min(min(args.spans), args.length) // args.length
            layers = fixed or max(2, min(-(-LEAST_READ // read), MOST_BYTES // table))
            runs = max(1, args.runs // 2) if fixed is None else WARM_RUNS
            keys = torch.randn(layers, rows, groups, args.length, size, generator=generator)
            values = torch.randn(layers, rows, groups, args.length, size, generator=generator)
            for span in args.spans:
                span = min(span, args.length)
                q = torch.randn(rows, 3, heads, 1, size, generator=generator)[:, 0]
                lengths = torch.randint(span // 2, span + 1, (rows,), generator=generator)
                keep = (torch.arange(span) < lengths[:, None]).view(rows, 1, 1, span)
                mask = torch.zeros(rows, 1, 1, span).masked_fill_(~keep, float("-inf"))
                pairs = [(keys[i, :, :, :span], values[i, :, :, :span]) for i in range(layers)]

                ways = [partial(library, pairs, q, mask), partial(ours, kernel, pairs, q, mask)]
                k, v = pairs[0]
                exact = F.scaled_dot_product_attention(
                    q.double(), k.double(), v.double(), attn_mask=mask.double(), enable_gqa=True
                )
                once = [library([(k, v)], q, mask), ours(kernel, [(k, v)], q, mask)]
                errors = [float((out - exact).abs().max()) for out in once]
                times = [t / layers for t in in_turns(ways, runs)]
                cells = [f"{t * 1e3:.0f} ({e:.0e})" for t, e in zip(times, errors, strict=True)]
                print(
                    f"| {name}: {heads} of {size} ({groups} for keys) | {rows} | {span} | "
                    f"{layers} | {cells[0]} | {cells[1]} | {times[1] / times[0]:.2f} |",
                    flush=True,
                )
            del keys, values


if __name__ == "__main__":
    main()
