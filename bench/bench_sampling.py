"""A step's draw alone: classifier-free guidance, sampling and the finiteness
check of B MusicGen slots (pairs of rows) over the released models' 2048-token
vocabulary, as the engine plans it (``RowSampling.plan``) against everything
ranked, greedy argmax and every score tested (what each step did before plans).

    .venv/bin/python bench/bench_sampling.py --slots 1 8 32
    .venv/bin/python bench/bench_sampling.py --sort

The logits are random; the codes of both ways are checked equal. ``--sort``:
the speech sampler's sort of a step's scores (``warp_rows``: rows x codebooks
x vocabulary), the library's against the row kernel's, each call on scores it
has not sorted before (a comparison sort's branches learn a row sorted again
and again), and the whole of ``warp`` with either. Prints a Markdown section
for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from functools import partial

import numpy as np
import torch
from bench_stream import machine

from wavecast.server.engines import rowkernel, sampling
from wavecast.server.engines.sampling import RowSampling, finite_rows, sample

CODEBOOKS, VOCAB = 4, 2048


def draw(
    logits: torch.Tensor, cfg: torch.Tensor, table: RowSampling, keys: torch.Tensor, planned: bool
) -> torch.Tensor:
    slots = cfg.shape[0]
    cond, uncond = logits[0::2], logits[1::2]
    guided = uncond + (cond - uncond) * cfg[:, None, None]
    if planned:
        plan = table.plan(np.ones(slots, dtype=bool), VOCAB).arguments()
        finite = finite_rows(guided)
    else:
        plan = {"candidates": int(table.wants[:slots].max()), "nucleus": False}
        finite = torch.isfinite(guided).flatten(1).all(1)
    tokens = sample(
        guided,
        table.temperature[:slots],
        table.top_k[:slots],
        table.top_p[:slots],
        keys,
        **plan,
    )
    return torch.cat([tokens, finite[:, None].to(tokens.dtype)], 1)


def timed(fn: object, rounds: int, calls: int) -> float:
    """Median seconds per call over ``rounds`` rounds of ``calls`` calls."""
    assert callable(fn)
    fn()
    each = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        each.append((time.perf_counter() - start) / calls)
    return statistics.median(each)


# (rows, codebooks, vocabulary): the tiny speech model's steps of one and eight
# rows, and wider vocabularies.
SORTED = [(1, 4, 66), (8, 4, 66), (8, 8, 256), (8, 8, 512)]


def fresh(shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    """``count`` random score tensors of ``shape`` (ties and forced tokens' -inf)."""
    out = []
    for _ in range(count):
        scores = torch.round(torch.randn(shape) * 64) / 16
        scores[..., 0] = float("-inf")
        out.append(scores)
    return out


def each_once(fn: object, inputs: list[torch.Tensor], rounds: int) -> float:
    """Median over ``rounds`` of the seconds per call of ``fn`` on each input once."""
    assert callable(fn)
    each = []
    for _ in range(rounds):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        each.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(each)


def sorts(args: argparse.Namespace) -> None:
    kernel = rowkernel.built()
    if kernel is None:
        raise SystemExit(f"no row kernel: {rowkernel.load()}")
    print("### the speech sampler's sort: the library's and the row kernel's\n")
    print(f"- machine: {machine('cpu')}, 1 torch thread")
    print("- command: `python bench/bench_sampling.py --sort`")
    print(f"- date: {date.today()}; each call on new scores; median of {args.rounds}\n")
    print(
        "| rows x codebooks x vocabulary | torch.sort | row kernel | ratio "
        "| warp, torch's sort | warp, the kernel's | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in SORTED:
        inputs = fresh(shape, 400)
        rows = shape[0]
        forced = torch.full(shape[:2], -1)
        params = (torch.full((rows,), 0.7), torch.full((rows,), 50), torch.full((rows,), 0.95))

        def warp(
            x: torch.Tensor, forced: torch.Tensor = forced, params: tuple = params
        ) -> torch.Tensor:
            return sampling.warp(x, forced, *params)

        library = each_once(lambda x: torch.sort(x, dim=-1).values, inputs, args.rounds)
        ours = each_once(kernel.sort, inputs, args.rounds)
        sampling.ROW_KERNEL = False
        warp_library = each_once(warp, inputs, args.rounds)
        sampling.ROW_KERNEL = True
        warp_ours = each_once(warp, inputs, args.rounds)
        name = " x ".join(map(str, shape))
        print(
            f"| {name} | {library * 1e6:.1f} us | {ours * 1e6:.1f} us | {ours / library:.2f} "
            f"| {warp_library * 1e6:.1f} us | {warp_ours * 1e6:.1f} us "
            f"| {warp_ours / warp_library:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--sort", action="store_true", help="the speech sampler's sort instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.sort:
        sorts(args)
        return
    print("### a step's draw: MusicGen slots over a 2048-token vocabulary\n")
    print(f"- machine: {machine('cpu')}, 1 torch thread")
    print(f"- command: `python bench/bench_sampling.py --slots {' '.join(map(str, args.slots))}`")
    print(f"- date: {date.today()}; top-k {args.top_k} for every slot; median of {args.rounds}\n")
    print("| slots | everything ranked, every score tested | as planned | planned / before |")
    print("| --- | --- | --- | --- |")
    for slots in args.slots:
        table = RowSampling(slots, "cpu")
        for slot in range(slots):
            table.set_row(slot, temperature=1.0, top_k=args.top_k, top_p=0.0, seed=slot)
        logits = torch.randn(2 * slots, CODEBOOKS, VOCAB) * 3
        cfg = torch.full((slots,), 3.0)
        keys = torch.from_numpy(table.draw_keys(slots, CODEBOOKS))
        before = draw(logits, cfg, table, keys, planned=False)
        assert torch.equal(draw(logits, cfg, table, keys, planned=True), before)
        old, new = (
            timed(partial(draw, logits, cfg, table, keys, planned), args.rounds, args.calls)
            for planned in (False, True)
        )
        print(f"| {slots} | {old * 1000:.3f} ms | {new * 1000:.3f} ms | {new / old:.2f} |")


if __name__ == "__main__":
    main()
