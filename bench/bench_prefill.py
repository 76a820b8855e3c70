"""What a crowd of long prompts costs the streams already running.

In one process, as the scheduler runs them: ``--running`` requests stream; once
each has its first audio, ``--crowd`` requests with long prompts join at once
(MusicGen: continuations of ``--prompt-seconds`` of audio; speech: texts of
``--words`` words), prepared before the step they join (the scheduler prepares
them between steps, under its own budget). Reported: the longest step and the
median step from the join until every newcomer has its first audio (what each
running stream waits through between two frames; the longest also without its
codec calls, where the newcomers' first chunks go), how many steps that took,
and the newcomers' median time to first audio; with the engines' prefill time
budget (``--budget-ms``, the server's ``--prefill-budget-ms``) and without one
(positions only: at most ``prefill_budget`` positions a step).

    .venv/bin/python bench/bench_prefill.py --model tiny-musicgen --prompt-seconds 10
    .venv/bin/python bench/bench_prefill.py --model tiny-higgs --words 60

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
import soundfile
import torch
from bench_engine import load, request
from bench_stream import machine

from wavecast.protocol import resolve_params
from wavecast.server.engines import is_higgs_name
from wavecast.server.engines.base import Engine, EngineRequest

WORDS = (
    "the",
    "quiet",
    "harbour",
    "woke",
    "slowly",
    "as",
    "fishing",
    "boats",
    "returned",
    "with",
    "the",
    "tide",
    "and",
    "gulls",
    "argued",
    "over",
    "the",
    "nets",
    "while",
    "a",
    "bell",
    "rang",
    "somewhere",
    "beyond",
    "the",
    "hill",
)


def long_prompt(engine: Engine, index: int, args: argparse.Namespace) -> EngineRequest:
    if engine.info.family == "higgs":
        words = [WORDS[(index + i) % len(WORDS)] for i in range(args.words)]
        text = " ".join(words).capitalize() + "."
        params = resolve_params(engine.info.params, {"seed": index, "max_new_tokens": 100})
        return EngineRequest(f"c{index}", text, params)
    rate = engine.info.sample_rate
    rng = np.random.default_rng(index)
    clip = (0.1 * rng.standard_normal(int(args.prompt_seconds * rate))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, rate, format="WAV")
    params = resolve_params(
        engine.info.params, {"seed": index, "duration": args.prompt_seconds + 1.0}
    )
    return EngineRequest(f"c{index}", "strings", params, {"continuation": buffer.getvalue()})


def measure(engine: Engine, args: argparse.Namespace, seed: int) -> dict[str, float]:
    running = [engine.prepare(request(engine, seed * 100 + i, 30.0)) for i in range(args.running)]
    started: set[int] = set()
    while len(started) < len(running):
        for i, out in enumerate(engine.step(running)):
            if out.audio is not None:
                started.add(i)
    crowd = [engine.prepare(long_prompt(engine, seed * 100 + i, args)) for i in range(args.crowd)]
    jobs = [*running, *crowd]
    steps: list[float] = []
    first: dict[int, float] = {}
    began = time.perf_counter()
    apart: list[float] = []  # each step but its codec calls (the newcomers' first chunks)
    while len(first) < len(crowd):
        t = time.perf_counter()
        codec = engine.codec_seconds
        outputs = engine.step(jobs)
        now = time.perf_counter()
        steps.append(now - t)
        apart.append(now - t - (engine.codec_seconds - codec))
        for i, out in enumerate(outputs[len(running) :]):
            if out.audio is not None and i not in first:
                first[i] = now - began
            assert not out.done or out.error is None, out.error
    for job in jobs:
        engine.finish(job)
    return {
        "longest": max(steps),
        "apart": max(apart),
        "median": statistics.median(steps),
        "steps": len(steps),
        "first": statistics.median(first.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--running", type=int, default=4)
    parser.add_argument("--crowd", type=int, default=8)
    parser.add_argument("--prompt-seconds", type=float, default=10.0)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--budget-ms", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    rows = []
    for budget in (args.budget_ms, None):
        engine = load(
            args.model, "cpu", False, max_active=args.running + args.crowd, prefill_budget_ms=budget
        )
        measure(engine, args, 0)  # warm-up: the shapes a crowd meets
        runs = [measure(engine, args, seed + 1) for seed in range(args.runs)]
        rows.append((budget, {key: statistics.median(r[key] for r in runs) for key in runs[0]}))
        del engine
    what = (
        f"texts of {args.words} words"
        if is_higgs_name(args.model)
        else f"continuations of {args.prompt_seconds:g} s"
    )
    print(f"### a crowd of long prompts: {args.model}, {args.crowd} {what}\n")
    print(f"- machine: {machine('cpu')}, 1 torch thread")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; {args.running} streams running; "
        f"median of {args.runs} runs\n"
    )
    print(
        "| prefill budget | longest step (its codec calls left out) | median step "
        "| steps until every newcomer's first audio | newcomers' first audio (median) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for budget, r in rows:
        name = f"{budget:g} ms" if budget is not None else "none (positions only)"
        print(
            f"| {name} | {r['longest'] * 1e3:.1f} ms ({r['apart'] * 1e3:.1f} ms) "
            f"| {r['median'] * 1e3:.2f} ms "
            f"| {r['steps']:g} | {r['first'] * 1e3:.0f} ms |"
        )


if __name__ == "__main__":
    main()
