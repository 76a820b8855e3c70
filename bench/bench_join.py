"""What a crowd's first audio costs: N speech requests joining at once.

In one process: N speech requests (the varied texts of ``bench_stream``, or all
the same text with ``--same-text``; with ``--voice-seconds``, all in a named
voice of that many seconds, with its transcript) join at once and are stepped
together until each has its first audio; then they are finished. Each size is
measured ``--runs`` times, the sizes taking turns so that the machine's drift
falls on all of them. Reported: the prompt positions the decoder was fed (and
the prompts' own positions, and padded to the longest, as one call of padded
rows would compute them), the first step (the one that prefills the prompts the
budget holds and draws their first codes) and the time until every request
has its first audio, the least and the median.

The engine serves crowd after crowd, as a server does: with the prefix cache
(``--prefix-cache-mb``, 0: off), the beginning the requests share (the system
text, the voice) was kept by an earlier crowd, and each request prefills only
its own turn; with ``--cold``, each crowd finds none kept: its oldest request
prefills the beginning, the others wait for it, then copy it.

    .venv/bin/python bench/bench_join.py --model tiny-higgs --streams 1 8 16
    .venv/bin/python bench/bench_join.py --model tiny-higgs --voice-seconds 10

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_engine import load, request
from bench_stream import machine

from wavecast.server.engines.higgs.voices import Voice

TRANSCRIPT = "This is how I sound when I read a story aloud, slowly and clearly."


class Fed:
    """Prompt positions the decoder's prefill calls compute."""

    def __init__(self, engine: Any) -> None:
        self.positions = 0
        original = engine.decoder.prefill

        def counted(rows: list[int], tokens: torch.Tensor, *args: Any) -> Any:
            sizes = args[3] if len(args) > 3 else None
            self.positions += int(tokens.numel()) if sizes is None else int(sum(sizes))
            return original(rows, tokens, *args)

        engine.decoder.prefill = counted


def crowd(engine: Any, streams: int, args: argparse.Namespace, fed: Fed) -> dict[str, float]:
    """Seconds of the first step of ``streams`` requests joining together, and
    until each has its first audio; the positions fed, and the prompts'."""
    jobs = []
    for i in range(streams):
        given = request(engine, i, 1.0, not args.same_text)
        if args.voice_seconds:
            given = replace(given, params={**given.params, "voice": "bench"})
        jobs.append(engine.prepare(given))
    if args.cold and hasattr(engine, "prefixes"):
        engine.prefixes.clear()
    fed.positions = 0
    began = time.perf_counter()
    heard = [False] * streams
    first = 0.0
    while not all(heard):
        outputs = engine.step(jobs)
        if not first:
            first = time.perf_counter() - began
            sizes = [len(job.state.utterance.ids) for job in jobs]
        for i, output in enumerate(outputs):
            heard[i] = heard[i] or output.audio is not None or output.done
    audio = time.perf_counter() - began
    for job in jobs:
        engine.finish(job)
    return {
        "first": first,
        "audio": audio,
        "fed": fed.positions,
        "own": sum(sizes),
        "padded": len(sizes) * max(sizes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--same-text", action="store_true", help="every request says the same")
    parser.add_argument(
        "--voice-seconds", type=float, default=0.0, help="a named voice this long (0: none)"
    )
    parser.add_argument("--prefix-cache-mb", type=float, default=256.0)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="each crowd finds no beginning kept: the oldest prefills it, the others wait",
    )
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    speech: dict[str, Any] = {}
    if args.voice_seconds:
        t = np.arange(int(16000 * args.voice_seconds)) / 16000
        sound = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
        speech["voices"] = {"bench": Voice("bench", Path("bench.wav"), TRANSCRIPT, sound, 16000)}
    from wavecast.server.engines.higgs.engine import HiggsEngine

    if "prefix_cache" in inspect.signature(HiggsEngine).parameters:
        speech["prefix_cache"] = int(args.prefix_cache_mb * 2**20)
    engine: Any = load(
        args.model, "cpu", False, max_active=max(args.streams), dtype=args.dtype, **speech
    )
    if engine.info.family != "higgs":
        raise SystemExit("bench_join measures speech requests")
    fed = Fed(engine)
    for streams in args.streams:  # (warm: the shapes' first calls; the beginnings kept)
        crowd(engine, streams, args, fed)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.streams}
    for _ in range(args.runs):
        for streams in args.streams:
            runs[streams].append(crowd(engine, streams, args, fed))
    texts = "the same text" if args.same_text else "texts of different lengths"
    voice = f", a named voice of {args.voice_seconds:g} s" if args.voice_seconds else ""
    kept = "beginnings kept" if speech.get("prefix_cache") else "no prefix cache"
    kept = "each crowd's beginning prefilled by its oldest" if args.cold else kept
    print(f"### a crowd joining: {args.model}, {texts}{voice}; {kept}\n")
    print(f"- machine: {machine('cpu')}, 1 torch thread")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {args.runs} runs, the sizes taking turns\n")
    print(
        "| requests | positions fed (the prompts'; padded) | first step, least / median "
        "| every first audio, least / median |"
    )
    print("| --- | --- | --- | --- |")
    for streams in args.streams:
        rows = runs[streams]
        fed_n, own, padded = (
            int(statistics.median(r[k] for r in rows)) for k in ("fed", "own", "padded")
        )
        first = [r["first"] * 1000 for r in rows]
        audio = [r["audio"] * 1000 for r in rows]
        print(
            f"| {streams} | {fed_n} ({own}; {padded}) "
            f"| {min(first):.2f} / {statistics.median(first):.2f} ms "
            f"| {min(audio):.1f} / {statistics.median(audio):.1f} ms |"
        )


if __name__ == "__main__":
    main()
