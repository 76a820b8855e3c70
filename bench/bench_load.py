"""A MusicGen checkpoint folder's load: its weights left unset until loaded (as
the server loads it) against drawn at random first (as audiocraft's builders
draw them), in turns.

The model (``--model``: a test model's shapes, random weights) is saved once in
audiocraft's layout in a temporary folder (``save_musicgen``), then loaded
``--rounds`` times each way (``load_musicgen_dir``).

    .venv/bin/python bench/bench_load.py --model random-musicgen-small --rounds 3

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_stream import machine

from wavecast.server.engines.musicgen import loading
from wavecast.server.engines.musicgen.loading import load_musicgen, save_musicgen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-musicgen-small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unset = loading.weights_left_unset
    seconds: dict[str, list[float]] = {"left unset (now)": [], "drawn first (before)": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        model, _ = load_musicgen(args.model, "cpu")
        save_musicgen(model, folder)
        del model
        for _ in range(args.rounds):
            for way in seconds:
                loading.weights_left_unset = (
                    unset if way.startswith("left") else contextlib.nullcontext
                )  # type: ignore[assignment]
                try:
                    began = time.perf_counter()
                    loaded = loading.load_musicgen_dir(folder)
                    seconds[way].append(time.perf_counter() - began)
                    del loaded
                finally:
                    loading.weights_left_unset = unset
    print(f"### a checkpoint folder's load: {args.model}'s shapes\n")
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    print(f"- command: `python bench/bench_load.py --model {args.model} --rounds {args.rounds}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {args.rounds} loads each way, in turns\n")
    print("| weights | median | range |")
    print("| --- | --- | --- |")
    for way, times in seconds.items():
        print(f"| {way} | {statistics.median(times):.1f} s | {min(times):.1f}-{max(times):.1f} s |")


if __name__ == "__main__":
    main()
