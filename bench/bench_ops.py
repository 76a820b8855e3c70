"""Operations a step: what an engine's decode step asks of torch, counted.

On a CPU every operation is a trip through the dispatcher (a few microseconds
each, whatever its size); on a GPU without graphs, most are a kernel launch.
With the tiny test models, and with real ones at small batches on a GPU, that
count, not the arithmetic, sets the step time. Unlike a timing, the count does
not drift with the machine's speed: one run tells what a change removed.

N requests are prepared and stepped until every one decodes; then one step is
counted, operation by operation (views included), by the part of the step that
asked: the decoder's forward, the draw (guidance, sampling, the finiteness
check), the codec, and the rest (the step's inputs and outputs). The first
step with a codec call is counted too (``codec`` column: its codec's), and a
step's own count leaves its codec calls out. The last column counts the first
step of N requests starting together, all of it (their conditioning, prefill
and first draw: what a crowd's first audio waits through, besides the steps
that follow).

    .venv/bin/python bench/bench_ops.py --model tiny-musicgen --streams 1 8
    .venv/bin/python bench/bench_ops.py --model tiny-higgs --streams 1 8

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from bench_engine import load, request
from bench_stream import machine
from torch.utils._python_dispatch import TorchDispatchMode

PARTS = ("forward", "draw", "codec", "rest")


class Counted(TorchDispatchMode):  # type: ignore[misc]
    """Counts every operation dispatched, under the part of the step running
    (and by name, the codec's left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "rest"
        self.counts: Counter[str] = Counter()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[self.part] += 1
        if self.part != "codec":
            self.names[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def attribute(owner: Any, name: str, part: str, mode: dict[str, Counted | None]) -> None:
    """Count ``owner.name``'s operations under ``part`` while a count runs."""
    method: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter = mode["on"]
        if counter is None:
            return method(*args, **kwargs)
        before, counter.part = counter.part, part
        try:
            return method(*args, **kwargs)
        finally:
            counter.part = before

    setattr(owner, name, counted)


def count(engine: Any, streams: int) -> tuple[Counter[str], Counter[str], int]:
    """Counted steps of ``streams`` requests under way, until one makes a codec
    call: the first step's counts by part and by operation, and the codec's
    operations in the step with a call."""
    mode: dict[str, Counted | None] = {"on": None}
    attribute(engine.decoder, "decode", "forward", mode)
    attribute(engine, "_draw", "draw", mode)
    attribute(engine, "_decode_due", "codec", mode)
    jobs = []
    try:
        jobs = [engine.prepare(request(engine, i, 10.0)) for i in range(streams)]
        for _ in range(40):  # every request past its prompt and its first audio
            engine.step(jobs)
        first: Counted | None = None
        for _ in range(200):
            counter = Counted()
            mode["on"] = counter
            with counter:
                engine.step(jobs)
            mode["on"] = None
            first = first or counter
            if counter.counts["codec"]:
                return first.counts, first.names, counter.counts["codec"]
        raise RuntimeError("no codec call in 200 steps")
    finally:
        for owner, name in ((engine.decoder, "decode"), (engine, "_draw"), (engine, "_decode_due")):
            if name in vars(owner):
                delattr(owner, name)
        for job in jobs:  # (their rows free for the next count's: the table does not grow)
            engine.finish(job)


def first_step(engine: Any, streams: int) -> int:
    """Operations of the first step of ``streams`` requests starting together
    (their conditioning, their prompts' prefill, their first draw: what a crowd's
    first audio waits through), counted on a second such crowd (the first met
    its shapes first)."""
    total = 0
    for _ in range(2):
        jobs = [engine.prepare(request(engine, i, 10.0)) for i in range(streams)]
        counter = Counted()
        with counter:
            engine.step(jobs)
        total = sum(counter.counts.values())
        for job in jobs:
            engine.finish(job)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--top", type=int, default=8, help="the most frequent operations shown")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    engine = load(args.model, "cpu", False, max_active=max(args.streams))
    print(f"### operations a step: {args.model}\n")
    print(f"- machine: {machine('cpu')}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; counts do not depend on the machine's speed\n")
    print(
        "| streams | a step: forward, draw, rest (all) | with a codec call: its codec "
        "| most frequent | their first step, starting together |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n in args.streams:
        parts, names, codec = count(engine, n)
        step = parts["forward"] + parts["draw"] + parts["rest"]
        top = ", ".join(f"{name} {k}" for name, k in names.most_common(args.top))
        print(
            f"| {n} | {parts['forward']}, {parts['draw']}, {parts['rest']} ({step}) "
            f"| {codec} | {top} | {first_step(engine, n)} |"
        )


if __name__ == "__main__":
    main()
