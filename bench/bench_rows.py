"""A step's product of a few rows by one large float32 weight, on a CPU, four ways.

MKL's product (``F.linear``), oneDNN's over the weight as it lies, oneDNN's over a
packed copy, and the row kernel (``engines/rowkernel.py``), for the weight
shapes of the released models a CPU steps (MusicGen small and large, the 3B
speech model) and ``--rows`` rows. Least of ``--runs`` timings after a warm-up
call, the four taking turns; and each way's largest difference from a float64
product, against the output's largest value. ``--builds``: where this CPU has
AVX-512 (the server then runs the row kernel's wide build), its plain build
too, and whether the two give the same bits (with either dtype). ``--dtype
bfloat16``: the weight and rows in bfloat16 (a model run in bfloat16), the
library's product against the row kernel's. ``--builds --engine MODEL``:
MODEL's engine steps with its products by either build, in turns. ``--split``:
the row kernel's products on one thread and on ``--threads``, the work given
to the threads it keeps (as it runs) or to threads started for the call (as it
ran before, from the threshold it had then too), each weight read cold, as a
step reads it (copies of it cycled through, twice the last-level cache).

    .venv/bin/python bench/bench_rows.py
    .venv/bin/python bench/bench_rows.py --threads 2 --rows 1 4
    .venv/bin/python bench/bench_rows.py --builds --rows 1 2 4 8
    .venv/bin/python bench/bench_rows.py --dtype bfloat16 --rows 1 2 4 8
    .venv/bin/python bench/bench_rows.py --builds --engine random-higgs-3b --dtype bfloat16
    .venv/bin/python bench/bench_rows.py --split --threads 2 --rows 2 4

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from bench_stream import machine
from torch.nn import functional as F

from wavecast.server.engines import rowkernel

# (outputs, inputs): the 3B speech model's gate and up projections, its down
# projection, its query/key/value projection; MusicGen-large's feed-forward
# in and out; MusicGen-small's query/key/value projection.
SHAPES = [(16384, 3072), (3072, 8192), (5120, 3072), (8192, 2048), (2048, 8192), (3072, 1024)]


def least(run: Callable[[], object], runs: int) -> float:
    run()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def in_turns(ways: Sequence[Callable[[], object]], runs: int) -> list[float]:
    """Each way's least time (ms, ``least``), the ways taking turns, twice (a
    slow spell of the machine falls on all of them)."""
    times = [float("inf")] * len(ways)
    for _ in range(2):
        for i, way in enumerate(ways):
            times[i] = min(times[i], least(way, runs))
    return times


def kernel_section(title: str, threads: int) -> rowkernel.RowKernel:
    """Set torch's ``threads`` and build the row kernel (or exit saying why it
    could not be); print a section's ``title``, the machine and the command."""
    torch.set_num_threads(threads)
    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        sys.exit(f"no row kernel: {kernel}")
    print(f"### {title}\n")
    print(f"- machine: {machine('cpu')}, {threads} torch thread(s)")
    script = f"python bench/{Path(sys.argv[0]).name}"
    print(f"- command: `{' '.join([script, *sys.argv[1:]])}`")
    return kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--builds",
        action="store_true",
        help="the row kernel's plain build too, beside the wide one the server runs "
        "(where this CPU has AVX-512), and whether their results are the same bits",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the weight and rows in bfloat16 (a model run so), the library's "
        "product against the row kernel's",
    )
    parser.add_argument(
        "--engine",
        metavar="MODEL",
        help="with --builds: MODEL's engine steps (--streams of them, --dtype), its products "
        "by the row kernel's wide build and by its plain build, in turns",
    )
    parser.add_argument("--streams", type=int, default=4, help="with --engine")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the row kernel on one thread and on --threads, by its kept threads or by "
        "threads started for each call",
    )
    args = parser.parse_args()
    if args.split:
        split(args)
        return
    if args.engine:
        builds_in_engine(args)
        return
    if args.dtype == "bfloat16":
        halves(args)
        return
    kernel = kernel_section("a few rows by one float32 weight, on a CPU", args.threads)
    plain = plain_build(args, kernel)
    table_head(args, kernel, plain, "MKL | oneDNN, as it lies | oneDNN, packed copy | row kernel")
    generator = torch.Generator().manual_seed(0)
    for outputs, inputs in SHAPES:
        weight = torch.randn(outputs, inputs, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        exact_weight = weight.double()
        for rows in args.rows:
            x = torch.randn(rows, inputs, generator=generator)
            exact = x.double() @ exact_weight.T
            onednn = torch.ops.mkldnn._linear_pointwise
            ways: list[Callable[[], torch.Tensor]] = [
                partial(F.linear, x, weight),
                partial(onednn, x, weight, None, "none", [], ""),
                partial(onednn, x, packed, None, "none", [], ""),
                partial(kernel.product, weight, None, x),
            ]
            if plain is not None:
                ways.append(partial(plain.product, weight, None, x))
            table_row(args, f"{outputs:,} x {inputs:,} | {rows}", ways, exact, plain is not None)


def table_head(
    args: argparse.Namespace,
    kernel: rowkernel.RowKernel,
    plain: rowkernel.RowKernel | None,
    ways: str,
) -> None:
    """A products table's date, build and header (``ways``: its columns of times)."""
    print(f"- date: {time.strftime('%Y-%m-%d')}; least of {args.runs} calls, the ways in turns")
    print(f"- the row kernel: the {'wide' if kernel.wide else 'plain'} build")
    print("- ms a call (its largest error against float64, over the largest output)\n")
    header = f"| weight | rows | {ways} |"
    if plain is not None:
        header += " row kernel, plain build | the same bits |"
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")


def table_row(
    args: argparse.Namespace,
    label: str,
    ways: Sequence[Callable[[], torch.Tensor]],
    exact: torch.Tensor,
    builds: bool,
) -> None:
    """A products table's row: each way's time in turns and its error against
    ``exact``; with ``builds``, whether the last two ways give the same bits."""
    size = float(exact.abs().max())
    errors = [float((way().double() - exact).abs().max()) / size for way in ways]
    times = in_turns(ways, max(1, args.runs // 2))
    cells = [f"{t:.2f} ({e:.0e})" for t, e in zip(times, errors, strict=True)]
    if builds:
        cells.append("yes" if torch.equal(ways[-1](), ways[-2]()) else "**no**")
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def plain_build(
    args: argparse.Namespace, kernel: rowkernel.RowKernel
) -> rowkernel.RowKernel | None:
    """``--builds``: the row kernel's plain build beside the server's wide one."""
    if not args.builds:
        return None
    if not kernel.wide:
        sys.exit("the server's row kernel here is the plain build (no AVX-512): one build")
    plain = rowkernel.build(wide=False)
    if not isinstance(plain, rowkernel.RowKernel):
        sys.exit(f"no plain build: {plain}")
    return plain


def reachable(root: object) -> list[object]:
    """The project's objects (and its lists, tuples and dicts) reachable from
    ``root`` through others of them."""
    import gc

    seen, found, todo = {id(root)}, [], [root]
    while todo:
        obj = todo.pop()
        found.append(obj)
        for ref in gc.get_referents(obj):
            inside = isinstance(ref, list | tuple | dict)
            if (inside or type(ref).__module__.startswith("wavecast")) and id(ref) not in seen:
                seen.add(id(ref))
                todo.append(ref)
    return found


def builds_in_engine(args: argparse.Namespace) -> None:
    """``--engine MODEL --builds``: the engine's steps of ``--streams`` requests
    (their prompts in), every product the row kernel takes by the wide build
    (the server's) and by the plain one, in turns: ``--runs`` steps a turn,
    eight turns; the median step of each."""
    import statistics

    from bench_engine import load, request

    from wavecast.server.engines.dense import Dense

    kernel = kernel_section(f"the engine's steps by each build: {args.engine}", args.threads)
    plain = plain_build(args, kernel)
    if plain is None:
        sys.exit("--engine compares the builds: give --builds")
    engine = load(args.engine, "cpu", False, max_active=max(4, args.streams), dtype=args.dtype)
    torch.set_num_threads(args.threads)
    denses = [d for d in reachable(engine) if isinstance(d, Dense) and d.kernel is not None]
    jobs = [engine.prepare(request(engine, i, 60.0, False)) for i in range(args.streams)]
    with torch.no_grad():
        for _ in range(30):  # (past the prompts and the first chunks)
            engine.step(jobs)
        times: dict[str, list[float]] = {"wide": [], "plain": []}
        for turn in range(8):
            for name in ("wide", "plain") if turn % 2 == 0 else ("plain", "wide"):
                for dense in denses:
                    dense._use(kernel if name == "wide" else plain)
                for _ in range(args.runs):
                    began = time.perf_counter()
                    engine.step(jobs)
                    times[name].append((time.perf_counter() - began) * 1e3)
    for dense in denses:
        dense._use(kernel)
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; 8 turns of {args.runs} steps, "
        "the builds taking turns"
    )
    print(f"- {engine.info.dtype}; {len(denses)} products by the row kernel\n")
    print("| streams | the wide build: ms a step | the plain build | wide / plain |")
    print("| --- | --- | --- | --- |")
    wide, narrow = statistics.median(times["wide"]), statistics.median(times["plain"])
    print(f"| {args.streams} | {wide:.1f} | {narrow:.1f} | {wide / narrow:.2f} |")


def halves(args: argparse.Namespace) -> None:
    """``--dtype bfloat16``: the library's product (oneDNN's, in bfloat16) against
    the row kernel's, in turns; each one's error against float64's product of
    the same bfloat16 values."""
    kernel = kernel_section("a few rows by one bfloat16 weight, on a CPU", args.threads)
    plain = plain_build(args, kernel)
    table_head(args, kernel, plain, "the library (`F.linear`) | row kernel")
    generator = torch.Generator().manual_seed(0)
    for outputs, inputs in SHAPES:
        weight = torch.randn(outputs, inputs, generator=generator).bfloat16()
        for rows in args.rows:
            x = torch.randn(rows, inputs, generator=generator).bfloat16()
            exact = x.double() @ weight.double().T
            ways = [partial(F.linear, x, weight), partial(kernel.product, weight, None, x)]
            if plain is not None:
                ways.append(partial(plain.product, weight, None, x))
            table_row(args, f"{outputs:,} x {inputs:,} | {rows}", ways, exact, plain is not None)


# MusicGen-small's products (its query/key/value projection, its out and cross
# projections, its feed-forward in and out), and the 3B speech model's down
# projection.
SPLIT_SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (3072, 8192)]
BEFORE = 1 << 21  # PER_THREAD_PRODUCT before the kept threads


def split(args: argparse.Namespace) -> None:
    """``--split``: the row kernel's products of ``--rows`` rows, each weight
    read cold, on one thread and on ``--threads`` three ways, in turns."""
    threads = args.threads
    kernel = kernel_section(f"the row kernel's products on 1 and {threads} threads", threads)
    cache = 64 << 20  # (twice a 32 MB last-level cache)
    print(f"- date: {time.strftime('%Y-%m-%d')}; least of {args.runs} rounds, the ways in turns")
    print("- each call reads a weight not read since the cache was filled with others")
    print(f"- threads split a weight's outputs from {rowkernel.PER_THREAD_PRODUCT:,} elements each")
    print("- ms a call\n")
    print(
        f"| weight | rows | 1 thread | {threads}, started a call, split from {BEFORE:,} (before) "
        f"| {threads}, started a call | {threads}, kept (now) | now / before |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for outputs, inputs in SPLIT_SHAPES:
        copies = max(2, cache // (outputs * inputs * 4))
        weights = [torch.randn(outputs, inputs, generator=generator) for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, inputs, generator=generator)
            want = kernel.product(weights[0], None, x)

            now = rowkernel.PER_THREAD_PRODUCT
            ways = [
                partial(products, kernel, weights, x, 1, True, now),
                partial(products, kernel, weights, x, threads, False, BEFORE),
                partial(products, kernel, weights, x, threads, False, now),
                partial(products, kernel, weights, x, threads, True, now),
            ]
            times = [t / copies for t in in_turns(ways, max(1, args.runs // 2))]
            assert torch.equal(kernel.product(weights[0], None, x), want)
            cells = " | ".join(f"{t:.3f}" for t in times)
            print(
                f"| {outputs:,} x {inputs:,} | {rows} | {cells} | {times[3] / times[1]:.2f} |",
                flush=True,
            )


def products(
    kernel: rowkernel.RowKernel,
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    threads: int,
    pooled: bool,
    per: int,
) -> None:
    """``x`` by each of ``weights`` on ``threads`` threads, kept or started for
    each call (``pooled``), each thread with ``per`` elements of a weight or more."""
    was_threads, was_per = torch.get_num_threads(), rowkernel.PER_THREAD_PRODUCT
    torch.set_num_threads(threads)
    rowkernel.PER_THREAD_PRODUCT = per
    was_pooled = kernel.pooling(int(pooled))
    try:
        for weight in weights:
            kernel.product(weight, None, x)
    finally:
        kernel.pooling(was_pooled)
        rowkernel.PER_THREAD_PRODUCT = was_per
        torch.set_num_threads(was_threads)


if __name__ == "__main__":
    main()
