"""The engine core alone: N MusicGen requests stepped together in this process.

What the batched decode step buys, without the network, the event loop or a
client sharing the machine's cores: wall time per step, aggregate real-time
factor against one request alone, and the time to each request's first audio
when N arrive at once (preparation, prefill and the steps before the first
chunk).

    .venv/bin/python bench/bench_engine.py --model tiny-musicgen --streams 1 8 16

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_stream import machine, sync

from wavecast.protocol import resolve_params
from wavecast.server.engines import resolve_device
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.musicgen import MusicGenEngine, load_musicgen


def run(engine: MusicGenEngine, streams: int, duration: float, device: str) -> dict[str, float]:
    """Prepare ``streams`` requests at once and step them all to the end."""
    sync(device)
    start = time.perf_counter()
    jobs = [
        engine.prepare(
            EngineRequest(
                f"r{i}",
                "warm lofi hip hop with soft keys",
                resolve_params(engine.info.params, {"duration": duration, "seed": i}),
            )
        )
        for i in range(streams)
    ]
    first: list[float] = []
    steps = 0
    while jobs:
        outputs = engine.step(jobs)
        steps += 1
        now = time.perf_counter()
        for job, output in list(zip(jobs, outputs, strict=True)):
            if output.audio is not None and job.extra.get("first") is None:
                job.extra["first"] = now - start
                first.append(now - start)
            if output.done:
                engine.finish(job)
                jobs.remove(job)
    sync(device)
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "steps": steps,
        "rtf": streams * duration / wall,
        "ttfa": statistics.median(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    model, _ = load_musicgen(args.model, device)
    engine = MusicGenEngine(model, name=args.model, test_model=True)
    run(engine, max(args.streams), min(args.duration, 1.0), device)  # warm up
    results = {}
    for n in args.streams:
        runs = [run(engine, n, args.duration, device) for _ in range(args.runs)]
        results[n] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"### engine core in-process: {args.model} on {device}, {args.duration:g} s clips\n")
    print(f"- machine: {machine(device)}, {threads} torch thread(s)")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; median of {args.runs} runs\n")
    print("| streams | time to first audio | ms per step | aggregate real-time factor |")
    print("| --- | --- | --- | --- |")
    one = results.get(1)
    for n, r in results.items():
        ratio = f" ({r['rtf'] / one['rtf']:.2f}x one stream)" if one and n != 1 else ""
        ttfa = f"{r['ttfa'] * 1000:.0f} ms"
        if one and n != 1:
            ttfa += f" ({r['ttfa'] / one['ttfa']:.1f}x)"
        print(f"| {n} | {ttfa} | {r['wall'] / r['steps'] * 1000:.2f} | x{r['rtf']:.2f}{ratio} |")


if __name__ == "__main__":
    main()
