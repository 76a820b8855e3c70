"""One client's many requests and another's one, through the server: how long the
one waits.

A client (its address, as a trusted proxy names it) sends ``--flood`` requests at
once, filling the server's ``--max-active`` slots and much of its queue; a
moment later another client sends one. Reported: when the latecomer's request
started and its first audio came (from sending it), and when the flood's
requests did, median and last. Requests start in turns among clients
(``fair_order`` in server/scheduler.py); where they started in the order they
came, the latecomer waited for the whole flood ahead of it.

    .venv/bin/python bench/bench_fair.py --model tiny-musicgen --flood 32 --rounds 3

The server runs as its own process (``wavecast serve``, ``--admission slots``,
``--forwarded-allow-ips 127.0.0.1``). Prints a Markdown section for
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_stream import machine, start_server
from websockets.asyncio.client import connect as ws_connect

from wavecast.protocol import Audio, Done, Generate, Started, decode, encode
from wavecast.server.engines import resolve_device

PER_CONNECTION = 8  # the server's default --max-requests-per-connection


async def client(
    url: str, address: str, model: str, duration: float, ids: list[str]
) -> dict[str, dict[str, float]]:
    """``ids`` sent at once on one connection from ``address``: each one's times
    (seconds from sending) to ``started`` and to its first audio, and its status."""
    times: dict[str, dict[str, float]] = {rid: {} for rid in ids}
    async with ws_connect(
        url, additional_headers={"X-Forwarded-For": address}, max_size=None
    ) as ws:
        await ws.recv()  # the greeting
        began = time.perf_counter()
        for rid in ids:
            frame = Generate(
                id=rid, model=model, prompt=f"lofi {rid}", params={"duration": duration}
            )
            await ws.send(encode(frame))
        left = set(ids)
        while left:
            message = decode(await ws.recv())
            rid = getattr(message, "id", None)
            if rid not in times:
                continue
            now = time.perf_counter() - began
            if isinstance(message, Started):
                times[rid]["started"] = now
            elif isinstance(message, Audio) and "first" not in times[rid]:
                times[rid]["first"] = now
            elif isinstance(message, Done):
                times[rid]["completed"] = float(message.status == "completed")
                left.discard(rid)
    return times


async def round_(url: str, args: argparse.Namespace, index: int) -> dict[str, Any]:
    flood_ids = [f"r{index}-flood-{i}" for i in range(args.flood)]
    groups = [flood_ids[i : i + PER_CONNECTION] for i in range(0, len(flood_ids), PER_CONNECTION)]
    flood = [
        asyncio.ensure_future(client(url, "10.0.0.1", args.model, args.duration, group))
        for group in groups
    ]
    await asyncio.sleep(args.after)
    late = await client(url, "10.0.0.2", args.model, args.duration, [f"r{index}-late"])
    floods: dict[str, dict[str, float]] = {}
    for times in await asyncio.gather(*flood):
        floods.update(times)
    return {"late": next(iter(late.values())), "flood": list(floods.values())}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


async def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    server_args = argparse.Namespace(
        model=args.model,
        device=args.device,
        concurrency=[args.max_active],
        threads=0,
        admission="slots",
        codec_batch=0,
        codec_windows=False,
        server_extra=["--forwarded-allow-ips", "127.0.0.1", "--max-queue", str(args.max_queue)],
    )
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(server_args, Path(tmp) / "server.log")
        try:
            await round_(url, args, -1)  # (warm-up)
            for index in range(args.rounds):
                rounds.append(await round_(url, args, index))
        finally:
            process.terminate()
            process.wait(60)
    late = [r["late"] for r in rounds if "started" in r["late"]]
    late_started = ms(statistics.median(t["started"] for t in late)) if late else "-"
    late_first = ms(statistics.median(t["first"] for t in late)) if late else "-"
    flood = [t for r in rounds for t in r["flood"] if "started" in t]
    refused = sum(1 for r in rounds for t in r["flood"] if not t.get("completed"))
    flood_started = sorted(t["started"] for t in flood)
    flood_first = sorted(t["first"] for t in flood)
    print(
        f"### one client's {args.flood} requests and another's one: {args.model} on {device}, "
        f"{args.duration:g} s clips\n"
    )
    print(f"- machine: {machine(device)}")
    print(f"- command: `python bench/bench_fair.py {' '.join(sys.argv[1:])}`")
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; --max-active {args.max_active}, --max-queue "
        f"{args.max_queue}, --admission slots; the one sent {args.after:g} s after the many; "
        f"{args.rounds} rounds (medians)\n"
    )
    print("| requests | started (median; last) | first audio (median; last) | not completed |")
    print("| --- | --- | --- | ---: |")
    print(
        f"| the one | {late_started} | {late_first} | "
        f"{sum(1 for r in rounds if not r['late'].get('completed'))} of {args.rounds} (busy) |"
    )
    print(
        f"| the many | {ms(statistics.median(flood_started))}; {ms(flood_started[-1])} "
        f"| {ms(statistics.median(flood_first))}; {ms(flood_first[-1])} "
        f"| {refused} of {args.flood * args.rounds} (busy) |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--max-active", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=0.5, help="seconds between them")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
