"""A burst after quiet: N requests at once, after single requests, through the server.

With ``--admission realtime`` (the default) a request starts only while the
measured ticks say every running stream stays faster than real time. What that
measure makes of a burst shows here: after ``--singles`` requests one at a time
(the server has measured only crowds of one), ``--burst`` requests arrive
together; for each, when it started (``started``) and its first audio came,
and the slowest stream's real-time factor
(its audio over the time from its start to its end: its speed once it runs;
the wait before is in ``started``). ``--admission slots`` starts them all at
once whatever the speed: the reference.

    .venv/bin/python bench/bench_burst.py --model tiny-musicgen --burst 32
    .venv/bin/python bench/bench_burst.py --model tiny-musicgen --burst 32 --admission realtime

Each admission mode runs in its own server process (``wavecast serve``); the
``capacity`` of ``/v1/info`` after the burst is printed too. Prints a Markdown
section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_stream import freeze_heap, machine, start_server

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Started
from wavecast.server.engines import resolve_device


async def requests(url: str, model: str, duration: float, indices: range) -> list[dict[str, float]]:
    """``indices`` requests on one connection, at once."""
    async with connect(url) as client:
        return list(
            await asyncio.gather(*(one(client, model, duration, index) for index in indices))
        )


async def one(client: Any, model: str, duration: float, index: int) -> dict[str, float]:
    began = time.perf_counter()
    stream = await client.generate(model, f"warm lofi hip hop {index}", duration=duration)
    result = {"audio": 0.0}
    async for event in stream:
        now = time.perf_counter() - began
        if isinstance(event, Started):
            result["started"] = now
        elif isinstance(event, Audio) and "first" not in result:
            result["first"] = now
        elif isinstance(event, Done):
            assert event.status == "completed", event
            assert event.stats is not None
            result["audio"] = event.stats.audio_seconds
    result["wall"] = time.perf_counter() - began
    return result


PER_CONNECTION = 8  # the server's default --max-requests-per-connection


def info(url: str) -> dict[str, Any]:
    base = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
    with urllib.request.urlopen(base + "/v1/info", timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


async def burst(args: argparse.Namespace, admission: str) -> tuple[list[dict[str, float]], Any]:
    server_args = argparse.Namespace(
        model=args.model,
        device=args.device,
        concurrency=[args.max_active],
        threads=0,
        admission=admission,
        codec_batch=0,
        codec_windows=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(server_args, Path(tmp) / "server.log")
        try:
            for i in range(args.singles):
                await requests(url, args.model, args.single_duration, range(-1 - i, -i))
            freeze_heap()
            each = PER_CONNECTION
            results = [
                result
                for group in await asyncio.gather(
                    *(
                        requests(
                            url, args.model, args.duration, range(i, min(i + each, args.burst))
                        )
                        for i in range(0, args.burst, each)
                    )
                )
                for result in group
            ]
            capacity = info(url)["scheduler"]["capacity"]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return results, capacity


def row(admission: str, results: list[dict[str, float]]) -> str:
    started = sorted(r["started"] for r in results)
    first = sorted(r["first"] for r in results)
    slowest = min(r["audio"] / (r["wall"] - r["started"]) for r in results)
    return (
        f"| {admission} "
        f"| {statistics.median(started) * 1e3:.0f} ms, {started[-1] * 1e3:.0f} ms "
        f"| {statistics.median(first) * 1e3:.0f} ms, {first[-1] * 1e3:.0f} ms "
        f"| x{slowest:.2f} | {max(r['wall'] for r in results):.2f} s |"
    )


async def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    rows, capacities = [], []
    for admission in args.admission:
        results, capacity = await burst(args, admission)
        rows.append(row(admission, results))
        capacities.append((admission, capacity))
    print(
        f"### a burst of {args.burst} after {args.singles} single requests: "
        f"{args.model} on {device}, {args.duration:g} s clips\n"
    )
    print(f"- machine: {machine(device)}")
    print(f"- command: `python bench/bench_burst.py {' '.join(args.argv)}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; --max-active {args.max_active}\n")
    print(
        "| admission | started (median, last) | first audio (median, last) "
        "| slowest stream, once started | last done |"
    )
    print("| --- | --- | --- | --- | --- |")
    for line in rows:
        print(line)
    print()
    for admission, capacity in capacities:
        print(f"`/v1/info` capacity after the burst ({admission}): `{json.dumps(capacity)}`\n")


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--burst", type=int, default=32, help="requests at once (8 a connection)")
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--single-duration", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-active", type=int, default=64)
    parser.add_argument(
        "--admission", nargs="+", default=["realtime", "slots"], choices=("realtime", "slots")
    )
    parsed = parser.parse_args()
    parsed.argv = sys.argv[1:]
    asyncio.run(main(parsed))
