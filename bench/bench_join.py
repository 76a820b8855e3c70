"""What a crowd's first step costs: N requests joining at once.

In one process: N speech requests (the varied texts of ``bench_stream``, or all
the same text with ``--same-text``) are prepared and stepped once together, the
step that feeds their whole prompts (the prefill budget holds them) and draws
their first codes; then they are finished. Each size is measured ``--runs``
times, the sizes taking turns so that the machine's drift falls on all of
them; reported are the least and the median of the first step, and the prompt
positions it fed (with the padding a call of rows padded to the longest would
feed). A crowd's first audio waits through this step and the ones after it.

    .venv/bin/python bench/bench_join.py --model tiny-higgs --streams 1 8 16

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from bench_engine import load, request
from bench_stream import machine


def first_step(engine: Any, streams: int, same: bool) -> tuple[float, int, int]:
    """Seconds of the first step of ``streams`` requests joining together, and
    the prompt positions they feed (own, and padded to the longest)."""
    jobs = [engine.prepare(request(engine, i, 1.0, not same)) for i in range(streams)]
    began = time.perf_counter()
    engine.step(jobs)
    seconds = time.perf_counter() - began
    sizes = [len(job.state.utterance.ids) for job in jobs]
    for job in jobs:
        engine.finish(job)
    return seconds, sum(sizes), len(sizes) * max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--same-text", action="store_true", help="every request says the same")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine: Any = load(args.model, "cpu", False, max_active=max(args.streams), dtype=args.dtype)
    if engine.info.family != "higgs":
        raise SystemExit("bench_join measures speech requests")
    for streams in args.streams:  # (warm: the shapes' first calls)
        first_step(engine, streams, args.same_text)
    times: dict[int, list[float]] = {n: [] for n in args.streams}
    fed: dict[int, tuple[int, int]] = {}
    for _ in range(args.runs):
        for streams in args.streams:
            seconds, own, padded = first_step(engine, streams, args.same_text)
            times[streams].append(seconds)
            fed[streams] = (own, padded)
    texts = "the same text" if args.same_text else "texts of different lengths"
    print(f"### a crowd's first step: {args.model}, {texts}\n")
    print(f"- machine: {machine('cpu')}, 1 torch thread")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {args.runs} runs, the sizes taking turns\n")
    print("| requests | prompt positions (padded to the longest) | first step, least | median |")
    print("| --- | --- | --- | --- |")
    for streams in args.streams:
        own, padded = fed[streams]
        least = min(times[streams]) * 1000
        median = statistics.median(times[streams]) * 1000
        print(f"| {streams} | {own} ({padded}) | {least:.2f} ms | {median:.2f} ms |")


if __name__ == "__main__":
    main()
