"""The garbage collector against a loaded server: what a full collection costs
with the models loaded, with the heap frozen (as the server freezes it once its
models are warmed up) and without; and through the server, the first requests
after a start.

    .venv/bin/python bench/bench_gc.py --model tiny-musicgen --model tiny-higgs
    .venv/bin/python bench/bench_gc.py --model tiny-musicgen --starts 5

A full collection visits every object the collector tracks; with torch,
transformers and audiocraft imported and the models built that is half a million
objects, and the interpreter is held while it runs (every stream stalls). The
first part loads the models as the server does, in this process, and times
``gc.collect()`` before and after ``gc.freeze()``. The second starts
``wavecast serve`` ``--starts`` times and times each start's first requests (a
10 s clip each, one after another): time to first audio and the longest wait
between two audio messages. Run it with an earlier revision's package first on
``PYTHONPATH`` to compare.

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_engine import request
from bench_stream import machine, start_server

from wavecast.clients import connect
from wavecast.protocol import Audio
from wavecast.server.engines.base import Engine


def collections(rounds: int) -> list[float]:
    """Seconds of ``rounds`` full collections."""
    took = []
    for _ in range(rounds):
        start = time.perf_counter()
        gc.collect()
        took.append(time.perf_counter() - start)
    return took


class Pauses:
    """The collections that run while ``with``-in: (generation, seconds) each."""

    def __enter__(self) -> Pauses:
        self.seen: list[tuple[int, float]] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seen.append((info["generation"], time.perf_counter() - self._start))

    def full(self) -> str:
        full = [seconds for generation, seconds in self.seen if generation == 2]
        if not full:
            return "none"
        return f"{len(full)}, the longest {max(full) * 1000:.0f} ms"


def serve_requests(engines: dict[str, Engine], count: int, duration: float) -> float:
    """``count`` requests to each model, one after another, as the inference
    thread runs them; the longest step (or preparation) in seconds."""
    longest = 0.0
    for engine in engines.values():
        for index in range(count):
            start = time.perf_counter()
            job = engine.prepare(request(engine, index, duration))
            longest = max(longest, time.perf_counter() - start)
            done = False
            while not done:
                start = time.perf_counter()
                done = engine.step([job])[0].done
                longest = max(longest, time.perf_counter() - start)
            engine.finish(job)
    return longest


def in_process(
    names: list[str], device: str, rounds: int, count: int, duration: float
) -> list[str]:
    """Load and warm up as the server does; serve ``count`` requests with the heap
    as loaded, time full collections; freeze; the same again."""
    from wavecast.server.engines import load_engines

    engines = load_engines(names, device)
    for engine in engines.values():
        engine.warm_up()
    for engine in engines.values():
        engine.pack_weights()  # (as the server does)
    rows = []
    for frozen in (False, True):
        if frozen:
            gc.collect()
            gc.freeze()
        with Pauses() as pauses:
            longest = serve_requests(engines, count, duration)
        walked = len(gc.get_objects())
        took = collections(rounds)
        label = f"frozen ({gc.get_freeze_count():,} objects)" if frozen else "as loaded"
        rows.append(
            f"| {label} | {pauses.full()} | {longest * 1000:.0f} ms | {walked:,} | "
            f"{statistics.median(took) * 1000:.2f} ms, {max(took) * 1000:.2f} ms |"
        )
    gc.unfreeze()
    return [
        f"{count} requests of {duration:g} s to each model, one after another, in process:\n",
        "| heap | full collections while serving | longest step | objects a full "
        "collection walks | a full collection (median, max) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]


async def first_requests(url: str, model: str, count: int) -> list[tuple[float, float]]:
    """Each request's time to first audio and longest gap between audio messages."""
    out = []
    async with connect(url) as client:
        for index in range(count):
            start = time.perf_counter()
            stream = await client.generate(model, "a start", duration=10.0, seed=index)
            first = None
            last = start
            gap = 0.0
            async for event in stream:
                if isinstance(event, Audio):
                    now = time.perf_counter()
                    if first is None:
                        first = now - start
                    else:
                        gap = max(gap, now - last)
                    last = now
            assert first is not None
            out.append((first, gap))
    return out


def through_server(args: argparse.Namespace) -> list[str]:
    rows: list[list[tuple[float, float]]] = []
    for _ in range(args.starts):
        with tempfile.TemporaryDirectory() as tmp:
            process, url = start_server(args, Path(tmp) / "server.log")
            try:
                rows.append(asyncio.run(first_requests(url, args.model[0], args.requests)))
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    lines = [
        "| request after the start | time to first audio (median, max) | "
        "longest wait between chunks (median, max) |",
        "| --- | --- | --- |",
    ]
    for index in range(args.requests):
        firsts = [row[index][0] * 1000 for row in rows]
        gaps = [row[index][1] * 1000 for row in rows]
        lines.append(
            f"| {index + 1} | {statistics.median(firsts):.0f} ms, {max(firsts):.0f} ms | "
            f"{statistics.median(gaps):.0f} ms, {max(gaps):.0f} ms |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="collections timed each way")
    parser.add_argument("--starts", type=int, default=0, help="server starts (0: none)")
    parser.add_argument("--requests", type=int, default=3, help="requests timed per start")
    parser.add_argument("--served", type=int, default=3, help="requests served in process")
    parser.add_argument("--duration", type=float, default=20.0, help="in process: seconds")
    args = parser.parse_args()
    args.model = args.model or ["tiny-musicgen"]
    # What start_server passes to `wavecast serve`: the server's defaults.
    args.concurrency, args.threads, args.admission = [4], 0, "realtime"
    args.codec_batch, args.codec_windows = 0, False
    torch.set_num_threads(1)
    models = " + ".join(args.model)
    print(f"### the garbage collector with {models} loaded on {args.device}\n")
    print(f"- machine: {machine(args.device)}")
    command = " ".join(f"--model {m}" for m in args.model)
    print(f"- command: `python bench/bench_gc.py {command} --starts {args.starts}`")
    print("- threads: 1 (the server's default here)")
    print(f"- date: {date.today()}\n")
    if args.starts:
        for line in through_server(args):
            print(line)
        print()
    for line in in_process(args.model, args.device, args.rounds, args.served, args.duration):
        print(line)


if __name__ == "__main__":
    main()
