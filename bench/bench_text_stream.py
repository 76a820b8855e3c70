"""Speech whose text comes as it is written, through the server: how soon a
sentence is heard once its text comes to a stream that waits for it.

N clients at once (``--concurrency``) each open a speech request with
``text_stream`` and its first sentence, then, each time its stream has spoken
all it had (no audio for ``--quiet-ms``), send the next sentence (the last with
``end``) and time it to its first audio: the row kept, the sentence's prompt
goes on from the stream's cache. Against it, in the same rounds, what a client
without ``text_stream`` does to speak a sentence the moment it has it: a new
request for that sentence alone (no context of the ones before it), timed to its
first audio. The server runs as its own process (``wavecast serve``):

    .venv/bin/python bench/bench_text_stream.py --concurrency 1 8 --crowds 3

``--in-process``: the engine alone, in this process, without the network or
the clients' arrival: N - 1 streams speaking a long text and one that waits
for its text, then gets its next sentence; the steps and the time to its first
audio, against a new request's for that sentence beside the same N - 1.

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench_stream import machine, start_server

from wavecast.clients import connect
from wavecast.protocol import Audio, Done

SENTENCES = [
    "The morning train was late again.",
    "Nobody on the platform seemed surprised.",
    "A pigeon walked between the benches like it owned them.",
    "Then the bell rang and the doors slid open.",
    "Everyone stepped in without a word.",
]


async def text_stream(url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One client: its first sentence's time to first audio (from ``generate``),
    and each later sentence's (from its ``text`` frame, sent once the stream
    went quiet)."""
    quiet = args.quiet_ms / 1000
    async with connect(url) as client:
        began = time.perf_counter()
        stream = await client.speak(
            args.model,
            SENTENCES[0] + " ",
            text_stream=True,
            max_new_tokens=args.max_new_tokens,
            seed=seed,
        )
        events = stream.__aiter__()
        first: float | None = None
        later: list[float] = []
        sent_at = began
        waiting_for = 0  # the sentence whose first audio is awaited
        pending = asyncio.ensure_future(anext(events))
        while True:
            done, _ = await asyncio.wait({pending}, timeout=quiet)
            if not done:  # (quiet: it has spoken all it had)
                if waiting_for == -1 and len(later) + 1 < len(SENTENCES):
                    index = len(later) + 1
                    await stream.send_text(SENTENCES[index] + " ", end=index == len(SENTENCES) - 1)
                    sent_at, waiting_for = time.perf_counter(), index
                continue
            event = pending.result()
            if isinstance(event, Done):
                assert event.status == "completed", event
                break
            if isinstance(event, Audio) and waiting_for >= 0:
                took = time.perf_counter() - sent_at
                if waiting_for == 0:
                    first = took
                else:
                    later.append(took)
                waiting_for = -1
            pending = asyncio.ensure_future(anext(events))
    assert first is not None and len(later) == len(SENTENCES) - 1
    return {"first": first, "later": later}


async def fresh(url: str, args: argparse.Namespace, seed: int, text: str) -> float:
    """A new request for one sentence alone: its time to first audio."""
    async with connect(url) as client:
        began = time.perf_counter()
        stream = await client.speak(args.model, text, max_new_tokens=args.max_new_tokens, seed=seed)
        took = None
        async for event in stream:
            if isinstance(event, Audio) and took is None:
                took = time.perf_counter() - began
        assert took is not None
        return took


async def bench(args: argparse.Namespace) -> None:
    results: dict[int, dict[str, list[float]]] = {
        k: {"first": [], "later": [], "fresh": []} for k in args.concurrency
    }
    with tempfile.TemporaryDirectory() as tmp:
        args.admission, args.codec_batch, args.codec_windows = "slots", 0, False
        args.max_active = max(args.concurrency)
        process, url = start_server(args, Path(tmp) / "server.log")
        try:
            await fresh(url, args, 0, SENTENCES[0])  # (warm)
            for _ in range(args.crowds):
                for k in args.concurrency:
                    runs = await asyncio.gather(*(text_stream(url, args, i) for i in range(k)))
                    results[k]["first"] += [run["first"] for run in runs]
                    results[k]["later"] += [t for run in runs for t in run["later"]]
                    for text in SENTENCES[1:]:
                        results[k]["fresh"] += await asyncio.gather(
                            *(fresh(url, args, i, text) for i in range(k))
                        )
        finally:
            process.terminate()
            process.wait(60)
    report(args, results)


def in_process(args: argparse.Namespace) -> None:
    """``--in-process``: the engine's own time to a waiting stream's next
    sentence's first audio, beside N - 1 streams speaking, against a new
    request's for the same sentence."""
    import torch

    from wavecast.server.engines import resolve_device
    from wavecast.server.engines.base import EngineRequest, Job
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    device = resolve_device(args.device)
    engine = HiggsEngine(load_higgs(args.model, None, device), name=args.model)
    engine.warm_up(max(args.concurrency))
    params = {spec.name: spec.default for spec in engine.info.params}
    params.update(max_new_tokens=args.max_new_tokens)
    long = {**params, "max_new_tokens": 10 * args.max_new_tokens}

    def to_first_audio(jobs: list[Job], job: Job) -> tuple[int, float]:
        began, steps = time.perf_counter(), 0
        while True:
            steps += 1
            if engine.step([*jobs, job])[-1].audio is not None:
                return steps, time.perf_counter() - began

    rows: dict[int, dict[str, list[float]]] = {}
    with torch.no_grad():
        for k in args.concurrency:
            got: dict[str, list[float]] = {"waited": [], "fresh": [], "steps": []}
            for round_ in range(args.crowds):
                others = [
                    engine.prepare(EngineRequest(f"o{i}", " ".join(SENTENCES), long))
                    for i in range(k - 1)
                ]
                first = SENTENCES[0] + " "
                job = engine.prepare(
                    EngineRequest("w", first, {**params, "seed": round_}, text_stream=True)
                )
                while not engine.waiting(job):
                    engine.step([*others, job])
                for _ in range(3):  # (it waits, the others speak)
                    engine.step(others)
                for text in SENTENCES[1:]:
                    engine.add_text(job, text + " ", flush=False, end=False)
                    steps, took = to_first_audio(others, job)
                    got["waited"].append(took)
                    got["steps"].append(steps)
                    while not engine.waiting(job):
                        engine.step([*others, job])
                    alone = {**params, "seed": round_}
                    fresh = engine.prepare(EngineRequest("f", text, alone))
                    steps, took = to_first_audio(others, fresh)
                    got["fresh"].append(took)
                    got["steps"].append(steps)
                    engine.finish(fresh)
                for done in [*others, job]:
                    engine.finish(done)
            rows[k] = got
    print(f"#### a text as it is written: {args.model}, the engine in process\n")
    print(f"- machine: {machine(device)}, {torch.get_num_threads()} torch thread(s)")
    print(
        f"- command: `python bench/bench_text_stream.py --in-process --model {args.model} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --crowds {args.crowds} "
        f"--max-new-tokens {args.max_new_tokens}`"
    )
    print(
        f"- date: {date.today().isoformat()}; {len(SENTENCES) - 1} sentences a round, "
        f"{args.crowds} rounds; medians\n"
    )
    print(
        "| streams in the step | steps to first audio | a sentence sent to a stream that "
        "waits: first audio | a new request for it: first audio |"
    )
    print("| --- | --- | --- | --- |")
    for k, got in rows.items():
        steps = sorted(set(int(n) for n in got["steps"]))
        waited = 1000 * statistics.median(got["waited"])
        fresh = 1000 * statistics.median(got["fresh"])
        print(f"| {k} | {', '.join(map(str, steps))} | {waited:.1f} ms | {fresh:.1f} ms |")


def report(args: argparse.Namespace, results: dict[int, dict[str, list[float]]]) -> None:
    def ms(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{1000 * statistics.median(ordered):.0f} ms (max {1000 * ordered[-1]:.0f})"

    command = "python bench/bench_text_stream.py " + " ".join(
        [
            f"--model {args.model}",
            f"--concurrency {' '.join(map(str, args.concurrency))}",
            f"--crowds {args.crowds}",
            f"--max-new-tokens {args.max_new_tokens}",
            f"--quiet-ms {args.quiet_ms:g}",
        ]
    )
    print(f"#### a text as it is written: {args.model} through the server\n")
    threads = args.threads or "its default"
    print(f"- machine: {machine('cpu')}; the server's --threads {threads}")
    print(f"- command: `{command}`")
    print(
        f"- date: {date.today().isoformat()}; {len(SENTENCES)} sentences a stream, "
        f"max_new_tokens {args.max_new_tokens} a sentence; medians over every stream "
        f"of {args.crowds} crowds\n"
    )
    print(
        "| streams at once | first sentence: first audio (from generate) "
        "| a later sentence, sent to a stream that waits: its first audio "
        "| a new request for that sentence alone: first audio |"
    )
    print("| --- | --- | --- | --- |")
    for k, got in results.items():
        print(f"| {k} | {ms(got['first'])} | {ms(got['later'])} | {ms(got['fresh'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--crowds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads")
    parser.add_argument(
        "--quiet-ms",
        type=float,
        default=300.0,
        help="a stream without audio this long has spoken all it had: its next sentence goes",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="the engine alone, in this process"
    )
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
