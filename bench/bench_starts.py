"""What a server start measures and chooses: ``wavecast serve`` started
``--starts`` times, and from each start's log, each model's codec chunks per
call (``fastest_rows``: the codec batch measured at warm-up), how many of its
codec layers the warm-up chose to run as matrix products (``choose_forms``), the
requests its table was readied for (``--max-active 0``: its own number, or the
server's where less) and its warm-up's time; and how long each start took until
the server listened (a restart's time without a server).

What a warm-up measures decides how every later stream is decoded, so it must
come out the same from one start to the next on the same machine. Run it with
an earlier revision's package first on ``PYTHONPATH`` to compare.

    .venv/bin/python bench/bench_starts.py --model tiny-musicgen --model tiny-higgs --starts 8

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_stream import codec_batches, machine, start_server

import wavecast.server


def one_start(args: argparse.Namespace) -> tuple[dict[str, tuple[int, str, float, str]], float]:
    """Each model's codec chunks per call, codec layers as products (for one
    stream's calls / for more, of all; "-" where the log does not say), warm-up
    seconds and the requests its table was readied for, from one start; and the
    seconds from the process's start until it listened."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        process: subprocess.Popen[bytes] | None = None
        try:
            began = time.perf_counter()
            process, _ = start_server(args, log)
            listened = time.perf_counter() - began
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
    return {
        model: (
            batches[model],
            forms.get(model, "-"),
            float(warmed[model]),
            sized.get(model, str(args.max_active)),
        )
        for model in args.model
    }, listened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument(
        "--max-active", type=int, default=8, help="the server's --max-active (0: as many as fit)"
    )
    args = parser.parse_args()
    args.model = args.model or ["tiny-musicgen"]
    # What start_server passes to `wavecast serve`: the server's defaults otherwise.
    args.concurrency, args.threads, args.admission = [args.max_active], 0, "realtime"
    args.codec_batch, args.codec_windows = 0, False
    runs = [one_start(args) for _ in range(args.starts)]
    starts = [chosen for chosen, _ in runs]
    listened = sorted(seconds for _, seconds in runs)
    models = " + ".join(args.model)
    print(f"### what {args.starts} starts of the server chose: {models} on {args.device}\n")
    print(f"- machine: {machine(args.device)}")
    command = " ".join(f"--model {m}" for m in args.model)
    print(
        f"- command: `python bench/bench_starts.py {command} --starts {args.starts} "
        f"--max-active {args.max_active}`"
    )
    package = Path(wavecast.server.__file__).resolve().parents[1]
    print(f"- package: `{package}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}\n")
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


if __name__ == "__main__":
    main()
