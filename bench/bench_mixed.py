"""A server with a MusicGen and a HiggsAudio model: does a crowd on one starve the other?

Both models are stepped every scheduler tick, each as one batch. This measures
one stream of each model alone, then the same stream while ``--crowd`` streams
of the other model run beside it (started together with it), through the
server (``wavecast serve``, its own process) and the real client:

    .venv/bin/python bench/bench_mixed.py --music tiny-musicgen --speech tiny-higgs

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_stream import freeze_heap, machine, start_server, timed

from wavecast.clients import connect
from wavecast.server.engines import resolve_device

SPEECH = "The sun rises in the east and sets in the west, as it has for thousands of years."
MUSIC = "warm lofi hip hop with soft keys"


async def one(url: str, model: str, speech: bool, seconds: float, seed: int) -> dict[str, float]:
    async with connect(url) as client:
        start = time.perf_counter()
        if speech:
            frames = round(seconds * 25)  # HiggsAudio's codec: 25 frames a second
            stream = await client.speak(model, SPEECH, max_new_tokens=frames, seed=seed)
        else:
            stream = await client.generate(model, MUSIC, duration=seconds, seed=seed)
        return await timed(stream, start)


async def bench(args: argparse.Namespace) -> None:
    rows: list[tuple[str, dict[str, float], str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server_args = argparse.Namespace(
            model=[args.music, args.speech],
            device=args.device,
            concurrency=[args.crowd + 1],
            threads=args.threads,
            admission="slots",
            codec_batch=0,  # (measured at warm-up)
            codec_windows=False,
        )
        process, url = start_server(server_args, Path(tmp) / "server.log")
        try:
            await one(url, args.music, False, 1.0, 0)  # warm up
            await one(url, args.speech, True, 1.0, 0)
            freeze_heap()
            for name, speech, other, other_speech in (
                (args.music, False, args.speech, True),
                (args.speech, True, args.music, False),
            ):
                alone = [await one(url, name, speech, args.seconds, i) for i in range(args.runs)]
                rows.append((f"{name}, alone", median(alone), ""))
                crowded = []
                crowd_rtf = []
                for i in range(args.runs):
                    results = await asyncio.gather(
                        one(url, name, speech, args.seconds, i),
                        *(
                            one(url, other, other_speech, args.seconds, 100 + j)
                            for j in range(args.crowd)
                        ),
                    )
                    crowded.append(results[0])
                    crowd_rtf.append(statistics.median(r["rtf"] for r in results[1:]))
                each = statistics.median(crowd_rtf)
                note = f"{args.crowd} x {other} beside it (each x{each:.2f})"
                rows.append((f"{name}, with a crowd", median(crowded), note))
        finally:
            process.terminate()
            process.wait(60)
    device = resolve_device(args.device)
    print(f"### mixed server: {args.music} + {args.speech} on {device}\n")
    print(f"- machine: {machine(device)}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; median of {args.runs} runs\n")
    print("| stream | time to first audio | real-time factor | beside it |")
    print("| --- | --- | --- | --- |")
    for label, r, note in rows:
        print(f"| {label} | {r['ttfa'] * 1000:.0f} ms | x{r['rtf']:.2f} | {note} |")


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--music", default="tiny-musicgen")
    parser.add_argument("--speech", default="tiny-higgs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--crowd", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
