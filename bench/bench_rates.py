"""What a stream at another rate than its model's costs, and when it is heard.

A request may ask for its audio at another rate (``sample_rate``); the
inference thread resamples each chunk as it comes (``server.audio.Resampler``,
soxr). Two parts:

- in process, for each pair of rates: the resampler's CPU time per second of
  audio, and what it gives out of a stream's first chunks (it works in blocks:
  a small first chunk may give nothing, its samples coming with the next).
  Beside it, a polyphase filter of the same kind as soxr's (a Kaiser-windowed
  sinc, flat to 88% of the lower rate's Nyquist frequency, -100 dB past it;
  scipy's ``upfirdn``), which gives out every sample its inputs complete:
  what a stream would gain in its first audio, and what it would cost;
- through a server (``wavecast serve``, the tiny test models): one stream's
  first audio (from ``started``) and real-time factor at the model's rate and
  at others, the requests taking turns.

    .venv/bin/python bench/bench_rates.py --runs 15

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from typing import Any

import numpy as np
from bench_stream import print_header, tiny_server

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Started
from wavecast.server.audio import Resampler

PAIRS = [
    (24000, 8000),
    (24000, 16000),
    (24000, 48000),
    (32000, 16000),
    (32000, 44100),
    (32000, 48000),
]
FIRST_CHUNK_SECONDS = (0.02, 0.04)  # the engines' first chunks are a frame or two


class Polyphase:
    """Every output sample its inputs complete, at once (the comparison)."""

    def __init__(self, source: int, target: int, channels: int) -> None:
        from scipy.signal import firwin

        common = math.gcd(source, target)
        self.up, self.down = target // common, source // common
        wider = max(self.up, self.down)
        self.half = -(-48 * wider // self.down) * self.down  # 48 zero crossings
        self.taps = firwin(2 * self.half + 1, 0.93 / wider, window=("kaiser", 10.0)) * self.up
        span = -(-(2 * self.half + 1) // self.up)
        zeros = -(-(span + 1) // self.down) * self.down
        self.start, self.inputs = -zeros, np.zeros((zeros, channels))
        self.received = self.made = 0

    def push(self, audio: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        from scipy.signal import upfirdn

        self.received += audio.shape[0]
        self.inputs = np.concatenate([self.inputs, audio])
        end = max(self.made, (self.up * self.received - self.half - 1) // self.down + 1)
        if end == self.made:
            return self.inputs[:0]
        out = upfirdn(self.taps, self.inputs, up=self.up, down=self.down, axis=0)
        first = self.made + (self.half - self.start * self.up) // self.down
        out = out[first : first + end - self.made]
        self.made = end
        keep = ((end * self.down - self.half) // self.up - 1) // self.down * self.down
        if keep > self.start:
            self.inputs, self.start = self.inputs[keep - self.start :], keep
        return out


def in_process(pairs: list[tuple[int, int]], chunk: float) -> list[str]:
    rng = np.random.default_rng(0)
    rows = []
    for source, target in pairs:
        audio = (0.3 * rng.standard_normal((source * 10, 1))).astype(np.float32)
        step = int(source * chunk)
        costs = {}
        for name, make in (("soxr", Resampler), ("polyphase", Polyphase)):
            resampler = make(source, target, 1)
            began = time.perf_counter()
            for at in range(0, audio.shape[0], step):
                resampler.push(audio[at : at + step])
            costs[name] = (time.perf_counter() - began) / 10 * 1e3  # ms per second of audio
        firsts = []
        for seconds in FIRST_CHUNK_SECONDS:
            frames = int(source * seconds)
            gave = [
                make(source, target, 1).push(audio[:frames]).shape[0] / target * 1e3
                for make in (Resampler, Polyphase)
            ]
            firsts.append(f"{seconds * 1e3:g} ms: {gave[0]:.1f} / {gave[1]:.1f} ms")
        rows.append(
            f"| {source} -> {target} | {costs['soxr']:.2f} | {costs['polyphase']:.2f} | "
            f"{'; '.join(firsts)} |"
        )
    return rows


async def one(url: str, model: str, rate: int | None, seed: int) -> tuple[float, float]:
    """One request's first audio after ``started`` (ms) and real-time factor."""
    async with connect(url) as client:
        if model == "tiny-higgs":
            stream = await client.speak(
                model, "Hello there, how are you?", max_new_tokens=120, seed=seed, sample_rate=rate
            )
        else:
            stream = await client.generate(model, "x", duration=4.0, seed=seed, sample_rate=rate)
        started = first = None
        async for event in stream:
            if isinstance(event, Started):
                started = time.perf_counter()
            elif isinstance(event, Audio) and first is None and started is not None:
                first = time.perf_counter() - started
            elif isinstance(event, Done):
                assert event.status == "completed" and event.stats is not None, event
                assert first is not None
                return first * 1e3, event.stats.real_time_factor
    raise AssertionError("no done")


async def through_server(args: argparse.Namespace) -> list[str]:
    plan = {"tiny-musicgen": [None, 16000, 44100, 48000], "tiny-higgs": [None, 8000, 16000, 48000]}
    results: dict[tuple[str, int | None], list[tuple[float, float]]] = {}
    with tiny_server(list(plan)) as url:
        for model in plan:
            await one(url, model, None, 0)  # (warm)
        for run in range(args.runs):
            for model, rates in plan.items():
                for rate in rates:  # taking turns
                    results.setdefault((model, rate), []).append(await one(url, model, rate, run))
    rows = []
    for (model, rate), runs in results.items():
        first = statistics.median(r[0] for r in runs)
        speed = statistics.median(r[1] for r in runs)
        rows.append(f"| {model} | {rate or 'its own'} | {first:.1f} | x{speed:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="requests per model and rate")
    parser.add_argument("--chunk", type=float, default=0.1, help="seconds a chunk, in process")
    args = parser.parse_args()
    print_header(
        "audio at another rate than the model's",
        f"python bench/bench_rates.py --runs {args.runs} --chunk {args.chunk:g}",
    )
    print(
        f"In process, 10 s of mono noise in chunks of {args.chunk:g} s; the first chunk "
        "of a stream, and what each resampler gives out of it (soxr / polyphase):"
    )
    print()
    print("| rates (Hz) | soxr: ms per s of audio | polyphase: ms per s | first chunk: given out |")
    print("| --- | ---: | ---: | --- |")
    print("\n".join(in_process(PAIRS, args.chunk)))
    print()
    print(
        f"Through the server (tiny models, one request at a time, {args.runs} each, "
        "the rates taking turns; medians):"
    )
    print()
    print("| model | rate asked for | first audio after `started` (ms) | real-time factor |")
    print("| --- | --- | ---: | ---: |")
    print("\n".join(asyncio.run(through_server(args))))


if __name__ == "__main__":
    main()
