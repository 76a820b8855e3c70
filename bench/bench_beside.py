"""What one heavy speech request costs the streams beside it, through the server.

A client speaks one short text after another (the neighbour); once it runs, a
second client sends one heavy request (a text of many short sentences, a
sentence a chunk, by default: each chunk a turn of the conversation, whose
prompt holds every one spoken before it) and reads it to its end. Printed: the
heavy request's wall time, and, while it ran, the neighbour's real-time factor
and how far apart its audio messages came (the longest, the 99th percentile,
the median).

    .venv/bin/python bench/bench_beside.py
    .venv/bin/python bench/bench_beside.py --text "Yes. " --repeat 1990 --max-new-tokens 5
    .venv/bin/python bench/bench_beside.py --text "." --repeat 9990 --chunk-method sentence

The server runs as its own process (``wavecast serve``) on the CPU, with its
defaults (the preparation and prefill budgets among them). Prints a Markdown
section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_stream import machine, start_server

from wavecast.clients import connect
from wavecast.protocol import Audio

NEIGHBOUR = "Hello there, this is the stream beside it. " * 3


async def measure(url: str, args: argparse.Namespace) -> tuple[str, float, float, list[float]]:
    """The heavy request's status and wall time; the neighbour's audio seconds
    a wall second meanwhile, and the times between its audio messages."""
    gaps: list[float] = []
    audio = [0.0]
    stop = asyncio.Event()

    async def neighbour(client: Any) -> None:
        while not stop.is_set():
            stream = await client.generate(
                args.model, NEIGHBOUR, params={"max_new_tokens": 2000}, seed=1
            )
            last = None
            async for event in stream:
                if isinstance(event, Audio):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    audio[0] += len(event.data) / 4 / event.channels / event.sample_rate

    async with connect(url) as beside, connect(url) as client:
        task = asyncio.ensure_future(neighbour(beside))
        await asyncio.sleep(1.0)
        gaps.clear()
        heard, start = audio[0], time.perf_counter()
        params = {"chunk_method": args.chunk_method, "max_new_tokens": args.max_new_tokens}
        stream = await client.generate(args.model, args.text * args.repeat, params=params)
        result = await stream.collect()
        wall = time.perf_counter() - start
        rate = (audio[0] - heard) / wall
        stop.set()
        await task
    return result.status, wall, rate, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--text", default="Yes. ", help="the heavy request's text, repeated")
    parser.add_argument("--repeat", type=int, default=1990)
    parser.add_argument("--chunk-method", default="sentence")
    parser.add_argument("--max-new-tokens", type=int, default=5)
    args = parser.parse_args()
    served = argparse.Namespace(
        model=[args.model], device="cpu", concurrency=[2], threads=0, admission="realtime",
        codec_batch=0, codec_windows=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(served, Path(tmp) / "server.log")
        try:
            status, wall, rate, gaps = asyncio.run(measure(url, args))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    gaps.sort()
    print(f"### one heavy request beside a stream: {args.model} on cpu\n")
    print(f"- machine: {machine('cpu')}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}")
    print(
        f"- the heavy request: {args.text!r} x {args.repeat}, chunk_method "
        f"{args.chunk_method}, max_new_tokens {args.max_new_tokens}\n"
    )
    print(f"- the heavy request: {status} in {wall:.1f} s")
    print(
        f"- the stream beside it meanwhile: x{rate:.2f} real time; its audio messages "
        f"{gaps[-1] * 1000:.0f} ms apart at most, {gaps[int(len(gaps) * 0.99)] * 1000:.0f} ms "
        f"at the 99th percentile, {statistics.median(gaps) * 1000:.0f} ms at the median "
        f"({len(gaps)} gaps)"
    )


if __name__ == "__main__":
    main()
