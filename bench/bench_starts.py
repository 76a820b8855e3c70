"""What a server start measures and chooses: ``wavecast serve`` started
``--starts`` times, and from each start's log, each model's codec chunks per
call (``fastest_rows``: the codec batch measured at warm-up), how many of its
codec layers the warm-up chose to run as matrix products (``choose_forms``), the
requests its table was readied for (``--max-active 0``: its own number, or the
server's where less) and its warm-up's time; and how long each start took until
the server listened (a restart's time without a server).

What a warm-up measures decides how every later stream is decoded, so it must
come out the same from one start to the next on the same machine: every start
here measures (``--remeasure``). Run it with an earlier revision's package first
on ``PYTHONPATH`` to compare. ``--kept``: the starts take turns, one measuring,
one taking what the starts before kept (``engines/measures.py``), each set of
starts its own rows; in a cache folder of their own (the row kernel built once
before them).

    .venv/bin/python bench/bench_starts.py --model tiny-musicgen --model tiny-higgs --starts 8
    .venv/bin/python bench/bench_starts.py --model random-musicgen-small --starts 3 --kept

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_stream import codec_batches, machine, one, speech_text, start_server, timed

import wavecast.server
from wavecast.clients import connect
from wavecast.server.engines import is_higgs_name

# Each model's codec chunks per call, forms, warm-up and table; the seconds until
# the server listened; each model's first crowd (median first audio, its wall).
Start = tuple[dict[str, tuple[int, str, float, str]], float, dict[str, tuple[float, float]]]


async def first_crowd(url: str, model: str, streams: int) -> tuple[float, float]:
    """The first requests after a start: ``streams`` at once (2 s of music, or 50
    frames of speech); their median first audio and the crowd's wall, in seconds."""

    async def speak(seed: int) -> dict[str, float]:
        async with connect(url) as client:
            start = time.perf_counter()
            stream = await client.speak(model, speech_text(seed), max_new_tokens=50, seed=seed)
            return await timed(stream, start)

    began = time.perf_counter()
    if is_higgs_name(model):
        runs = await asyncio.gather(*(speak(i) for i in range(streams)))
    else:
        runs = await asyncio.gather(*(one(url, model, "warm lofi", 2.0) for _ in range(streams)))
    return statistics.median(run["ttfa"] for run in runs), time.perf_counter() - began


def one_start(args: argparse.Namespace, kept: bool = False) -> Start:
    """Each model's codec chunks per call, codec layers as products (for one
    stream's calls / for more, of all; "-" where the log does not say), warm-up
    seconds and the requests its table was readied for, from one start (which
    measures, or with ``kept`` takes what the starts before kept); and the
    seconds from the process's start until it listened; with ``--crowd``, each
    model's first crowd (``first_crowd``), the models one after the other."""
    args.server_extra = [] if kept else ["--remeasure"]
    crowds: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        process: subprocess.Popen[bytes] | None = None
        try:
            began = time.perf_counter()
            process, url = start_server(args, log, args.env)
            listened = time.perf_counter() - began
            for model in args.model if args.crowd else []:
                crowds[model] = asyncio.run(first_crowd(url, model, args.crowd))
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
        text = log.read_text()
    batches = codec_batches(text)
    forms = {
        model: f"{one} / {more} of {layers}"
        for model, one, layers, more in re.findall(
            r"(\S+): codec layers as matrix products: (\d+) of (\d+) "
            r"for one stream's calls, (\d+) for more",
            text,
        )
    }
    warmed = dict(re.findall(r"(\S+) warmed up in ([\d.]+) s", text))
    # The requests each model's table was readied for: its own number (``kv.room_for``),
    # or the server's where that is less and the warm-up says so.
    sized = dict(re.findall(r"(\S+): up to (\d+) requests at once", text))
    sized.update(re.findall(r"(\S+): its table for (\d+) requests", text))
    return (
        {
            model: (
                batches[model],
                forms.get(model, "-"),
                float(warmed[model]),
                sized.get(model, str(args.max_active)),
            )
            for model in args.model
        },
        listened,
        crowds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument(
        "--max-active", type=int, default=8, help="the server's --max-active (0: as many as fit)"
    )
    parser.add_argument(
        "--crowd", type=int, default=0, help="each model's first crowd after a start: this many"
    )
    parser.add_argument(
        "--kept",
        action="store_true",
        help="starts taking the measures kept, in turns with starts measuring",
    )
    args = parser.parse_args()
    args.model = args.model or ["tiny-musicgen"]
    # What start_server passes to `wavecast serve`: the server's defaults otherwise.
    # (the crowd's connections: the server's limit per address is the largest count + 1)
    args.concurrency = [max(args.max_active, args.crowd)]
    args.threads, args.admission = 0, "realtime"
    args.codec_batch, args.codec_windows = 0, False
    with tempfile.TemporaryDirectory() as cache:
        args.env = None
        if args.kept:  # (a folder of their own, the row kernel built in it first)
            args.env = {**os.environ, "WAVECAST_CACHE_DIR": cache}
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from wavecast.server.engines import rowkernel; rowkernel.load()",
                ],
                env=args.env,
                check=True,
            )
            one_start(args)  # (the measures kept for the turns)
        ways = [False, True] if args.kept else [False]
        runs: dict[bool, list[Start]] = {way: [] for way in ways}
        for _ in range(args.starts):
            for way in ways:
                runs[way].append(one_start(args, way))
    models = " + ".join(args.model)
    print(f"### what {args.starts} starts of the server chose: {models} on {args.device}\n")
    print(f"- machine: {machine(args.device)}")
    command = " ".join(f"--model {m}" for m in args.model)
    print(
        f"- command: `python bench/bench_starts.py {command} --starts {args.starts} "
        f"--max-active {args.max_active}{' --kept' if args.kept else ''}"
        f"{f' --crowd {args.crowd}' if args.crowd else ''}`"
    )
    package = Path(wavecast.server.__file__).resolve().parents[1]
    print(f"- package: `{package}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}")
    for way in ways:
        said = "taking the measures kept" if way else "measuring (`--remeasure`)"
        print(f"\n#### {args.starts} starts {said}\n")
        report(args, runs[way])


def report(args: argparse.Namespace, runs: list[Start]) -> None:
    starts = [chosen for chosen, _, _ in runs]
    listened = sorted(seconds for _, seconds, _ in runs)
    print(
        "| model | readied for (requests): starts | codec chunks per call: starts "
        "| codec layers as products (one stream / more): starts | warm-up (median, max) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for model in args.model:
        caps = Counter(start[model][0] for start in starts)
        counts = ", ".join(f"{cap}: {n}" for cap, n in sorted(caps.items()))
        chosen = Counter(start[model][1] for start in starts)
        forms = ", ".join(f"{form}: {n}" for form, n in sorted(chosen.items()))
        times = sorted(start[model][2] for start in starts)
        readied = Counter(start[model][3] for start in starts)
        sizes = ", ".join(f"{size}: {n}" for size, n in sorted(readied.items()))
        middle, slowest = times[len(times) // 2], times[-1]
        print(f"| {model} | {sizes} | {counts} | {forms} | {middle:.1f} s, {slowest:.1f} s |")
    print(
        f"\nFrom the process's start until the server listened: median "
        f"{listened[len(listened) // 2]:.1f} s, {listened[0]:.1f}-{listened[-1]:.1f} s."
    )
    for model in args.model if args.crowd else []:
        firsts = sorted(crowds[model][0] * 1000 for _, _, crowds in runs)
        walls = sorted(crowds[model][1] for _, _, crowds in runs)
        print(
            f"{model}'s first crowd of {args.crowd} after each start: median first audio "
            f"{firsts[len(firsts) // 2]:.0f} ms ({firsts[0]:.0f}-{firsts[-1]:.0f}), "
            f"the crowd's wall {walls[len(walls) // 2]:.2f} s ({walls[0]:.2f}-{walls[-1]:.2f})."
        )


if __name__ == "__main__":
    main()
