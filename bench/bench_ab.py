"""Two revisions' engine step, interleaved in one sitting (A/B on a noisy machine).

On a shared machine the speed drifts by tens of percent from minute to minute, so
two benchmark runs a minute apart compare the minutes, not the code. Here each
revision's engine is loaded once, in its own process, and they take turns: the
same N fresh requests stepped ``--steps`` times, one revision then the other
(then the other way round), ``--rounds`` times; the medians and the ratio.
Two processes of the same code can differ by several percent for as long as they
live (where their memory landed, what the allocator and the convolution library
chose): ``--launches N`` starts N fresh pairs one after the other and gives each
pair's ratio beside the ratio of all their turns' medians.
With ``--first-audio``, each turn is a crowd's start instead: N fresh requests
prepared at once and stepped until each has its first audio; the median stream's
time to it (``--varied-texts``: speech requests speak texts of different lengths).
With ``--codec-frames F``, each turn is ``--steps`` calls of the model's codec
alone (the tiny EnCodec for a MusicGen model, the tiny DAC for a speech model),
incremental, each decoding F new frames of N streams long under way.
With ``--server``, each revision is a ``wavecast serve`` (both listening at once,
the idle one costing nothing), and a turn is a crowd of each count of
``--streams`` through it, from clients connecting as ``bench_stream.py``'s do
(10 s of music, or ``bench_tts.py``'s 250 frames of speech, ``--varied-texts``
as there): the median stream's first audio and the aggregate real-time factor,
each revision's crowds against its crowd of one in the same turn, and the
tree's against the revision's turn by turn.

    .venv/bin/python bench/bench_ab.py --rev HEAD~2 --model tiny-musicgen --streams 1 8
    .venv/bin/python bench/bench_ab.py --rev aeea893 --model tiny-higgs --streams 1 8
    .venv/bin/python bench/bench_ab.py --rev HEAD --model tiny-higgs --codec-frames 8 --steps 50
    .venv/bin/python bench/bench_ab.py --rev HEAD~1 --model tiny-higgs --server --rounds 16

``--rev`` is checked out in a temporary git worktree (the working tree is the
other side); both run this checkout's ``bench_engine.py`` to load and step.
Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeAlias

ROOT = Path(__file__).resolve().parent.parent


def codec_worker(model: str, streams: int, threads: int, frames: int) -> None:
    """Build ``model``'s codec, incremental, its forms chosen as at warm-up; for
    each line on stdin (a call count), that many calls of ``frames`` new frames
    of ``streams`` streams long under way; print the milliseconds per call."""
    import torch
    from bench_codec import GEOMETRY, build

    from wavecast.server.engines import is_higgs_name
    from wavecast.server.engines.codec_incremental import incremental, steady_decode

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    name = "dac" if is_higgs_name(model) else "encodec"
    codec, _ = build(name, "cpu")
    codebooks, card, _, _ = GEOMETRY[name]
    inc = incremental(codec)
    assert inc is not None, name
    like = torch.zeros(())
    inc.choose_forms(like, streams, codebooks, frames)
    decode = steady_decode(inc, like, streams, codebooks)
    codes = torch.randint(0, card, (streams, codebooks, frames))
    for _ in range(20):
        decode(codes)
    print("ready", flush=True)
    for line in sys.stdin:
        calls = int(line)
        began = time.perf_counter()
        for _ in range(calls):
            decode(codes)
        print((time.perf_counter() - began) / calls * 1e3, flush=True)


def worker(model: str, streams: int, threads: int, varied: bool, dtype: str = "auto") -> None:
    """Load ``model`` and, for each line on stdin (a step count), step ``streams``
    fresh requests that many times; print the milliseconds per step. A line
    ``first``: prepare them and step until each has audio; print the median
    stream's milliseconds to its first audio."""
    import torch
    from bench_engine import load, request

    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    engine = load(model, "cpu", False, max_active=max(4, streams), dtype=dtype)
    duration = 30.0 if engine.info.family == "musicgen" else 60.0
    jobs: list = []

    turn = 0

    def fresh() -> list:
        nonlocal turn
        for job in jobs:
            engine.finish(job)
        turn += 1  # (varied texts: each turn's crowd starts one text further on)
        return [engine.prepare(request(engine, turn + i, duration, varied)) for i in range(streams)]

    jobs = fresh()
    for _ in range(50):
        engine.step(jobs)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "first":
            began = time.perf_counter()
            jobs = fresh()
            first: dict[int, float] = {}
            while len(first) < len(jobs):
                outputs = engine.step(jobs)
                now = time.perf_counter()
                for i, output in enumerate(outputs):
                    if output.audio is not None and i not in first:
                        first[i] = now - began
            print(statistics.median(first.values()) * 1e3, flush=True)
            continue
        steps = int(line)
        jobs = fresh()
        for _ in range(20):  # past the prefill and the first chunk
            engine.step(jobs)
        began = time.perf_counter()
        for _ in range(steps):
            engine.step(jobs)
        print((time.perf_counter() - began) / steps * 1e3, flush=True)


def start(package_root: Path | None, args: argparse.Namespace, streams: int) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if package_root is not None:
        env["PYTHONPATH"] = str(package_root)
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        args.model,
        "--streams",
        str(streams),
        "--threads",
        str(args.threads),
        *(["--varied-texts"] if args.varied_texts else []),
        *(["--codec-frames", str(args.codec_frames)] if args.codec_frames else []),
        "--dtype",
        args.dtype,
    ]
    cpus = None if args.cpu is None else {args.cpu}
    process = subprocess.Popen(
        command,
        preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=Path(__file__).parent,
    )
    assert process.stdout is not None
    while (line := process.stdout.readline()) and line.strip() != "ready":
        pass
    if not line:
        raise SystemExit("a worker did not start")
    return process


def timed(process: subprocess.Popen, steps: int | str) -> float:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{steps}\n")
    process.stdin.flush()
    return float(process.stdout.readline())


def compare(
    old_root: Path, args: argparse.Namespace, streams: int
) -> tuple[list[float], list[float]]:
    sides = {"rev": start(old_root, args, streams), "tree": start(None, args, streams)}
    times: dict[str, list[float]] = {"rev": [], "tree": []}
    try:
        for r in range(args.rounds):
            for side in ("rev", "tree") if r % 2 == 0 else ("tree", "rev"):
                what = "first" if args.first_audio else args.steps
                times[side].append(timed(sides[side], what))
    finally:
        for process in sides.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait(60)
    return times["rev"], times["tree"]


Turn: TypeAlias = "dict[int, tuple[float, float]]"


def compare_servers(old_root: Path, args: argparse.Namespace) -> tuple[list[Turn], list[Turn]]:
    """``--server``: both revisions served at once, crowds of each count through
    each in turns; per turn and count, the median stream's first audio (ms) and
    the aggregate real-time factor."""
    import asyncio

    import bench_tts
    from bench_engine import MUSIC
    from bench_stream import one, start_server

    from wavecast.server.engines import is_higgs_name

    served = argparse.Namespace(
        model=args.model,
        device="cpu",
        concurrency=args.streams,
        threads=args.threads,
        admission="realtime",
        codec_batch=0,
        codec_windows=False,
    )
    speech = is_higgs_name(args.model)
    # bench_tts.py's requests, as it makes them by default.
    spoken = argparse.Namespace(
        varied_texts=args.varied_texts,
        chunk_words=0,
        voice_seconds=0,
        max_new_tokens=250,
        sample_rate=None,
        format="pcm_s16le",
    )

    async def request(url: str, index: int) -> dict[str, float]:
        if not speech:
            return await one(url, args.model, MUSIC, 10.0)
        return await bench_tts.one(url, args.model, spoken, index)

    async def crowd(url: str, count: int) -> tuple[float, float]:
        began = time.perf_counter()
        runs = await asyncio.gather(*(request(url, i) for i in range(count)))
        wall = time.perf_counter() - began
        first = statistics.median(run["ttfa"] for run in runs) * 1e3
        return first, sum(run["audio"] for run in runs) / wall

    async def turns(urls: dict[str, str]) -> dict[str, list[Turn]]:
        for url in urls.values():  # warm-up: each count once
            for count in args.streams:
                await crowd(url, count)
        out: dict[str, list[Turn]] = {"rev": [], "tree": []}
        for r in range(args.rounds):
            for side in ("rev", "tree") if r % 2 == 0 else ("tree", "rev"):
                out[side].append({n: await crowd(urls[side], n) for n in args.streams})
        return out

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        servers = {
            "rev": start_server(
                served, Path(tmp) / "rev.log", {**env, "PYTHONPATH": str(old_root)}
            ),
            "tree": start_server(served, Path(tmp) / "tree.log", env),
        }
        try:
            got = asyncio.run(turns({side: url for side, (_, url) in servers.items()}))
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
            for process, _ in servers.values():
                process.wait(60)
    return got["rev"], got["tree"]


def report_servers(
    revision: str, args: argparse.Namespace, rev: list[Turn], tree: list[Turn]
) -> None:
    from bench_stream import machine

    texts = " (texts of different lengths)" if args.varied_texts else ""
    print(f"### through the server, {revision} against the working tree: {args.model}{texts}\n")
    print(f"- machine: {machine('cpu')}, the servers' --threads {args.threads}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; {args.rounds} turns, each a crowd of each "
        "count through each server, alternating; medians of the turns\n"
    )
    one = min(args.streams)
    print(
        f"| streams | {revision}: first audio | tree: first audio | tree / {revision} "
        f"| {revision}: aggregate | tree: aggregate | tree / {revision} "
        f"| {revision}: against {one} (aggregate, first audio) | tree: against {one} |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def med(values: list[float]) -> float:
        return statistics.median(values)

    for n in args.streams:
        a = med([t[n][0] for t in rev])
        b = med([t[n][0] for t in tree])
        ratio_first = med([new[n][0] / old[n][0] for old, new in zip(rev, tree, strict=True)])
        x = med([t[n][1] for t in rev])
        y = med([t[n][1] for t in tree])
        ratio_agg = med([new[n][1] / old[n][1] for old, new in zip(rev, tree, strict=True)])
        against = [
            f"{med([t[n][1] / t[one][1] for t in side]):.2f}x, "
            f"{med([t[n][0] / t[one][0] for t in side]):.2f}x"
            for side in (rev, tree)
        ]
        print(
            f"| {n} | {a:.1f} ms | {b:.1f} ms | {ratio_first:.3f} | x{x:.2f} | x{y:.2f} "
            f"| {ratio_agg:.3f} | {against[0]} | {against[1]} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the revision to compare the tree with")
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cpu",
        type=int,
        help="run both sides on this core only (the machine's cores may not run alike)",
    )
    parser.add_argument(
        "--launches", type=int, default=1, help="fresh pairs of processes, one after the other"
    )
    parser.add_argument(
        "--first-audio",
        action="store_true",
        help="time a crowd's start (the median stream's first audio), not steady steps",
    )
    parser.add_argument(
        "--varied-texts", action="store_true", help="speech: texts of different lengths"
    )
    parser.add_argument(
        "--codec-frames",
        type=int,
        default=0,
        help="time the model's codec alone instead: calls (--steps a turn) of this many "
        "new frames a stream",
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="through each revision's server: crowds of each count of --streams in turns",
    )
    parser.add_argument(
        "--dtype", default="auto", help="the engine step's generator dtype (engines.precision)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.codec_frames:
            codec_worker(args.model, args.streams[0], args.threads, args.codec_frames)
        else:
            worker(args.model, args.streams[0], args.threads, args.varied_texts, args.dtype)
        return
    from bench_stream import machine

    if args.server and min(args.streams) != 1:
        raise SystemExit("--server compares each crowd with a crowd of one: --streams 1 …")
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if not revision:
        raise SystemExit(f"no revision {args.rev!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", str(tree), revision], cwd=ROOT, check=True
        )
        try:
            # The package is imported as ``wavecast``: a folder holding a link of that name.
            (Path(tmp) / "root").mkdir()
            (Path(tmp) / "root" / "wavecast").symlink_to(tree)
            if args.server:
                served = compare_servers(Path(tmp) / "root", args)
            else:
                rows = [
                    (n, [compare(Path(tmp) / "root", args, n) for _ in range(args.launches)])
                    for n in args.streams
                ]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    if args.server:
        report_servers(revision, args, *served)
        return
    what = "a crowd's first audio" if args.first_audio else "engine step"
    if args.codec_frames:
        what = f"codec calls of {args.codec_frames} new frames a stream"
    texts = " (texts of different lengths)" if args.varied_texts else ""
    texts += "" if args.dtype == "auto" else f", {args.dtype}"
    print(f"### {what}, {revision} against the working tree: {args.model}{texts}\n")
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    turns = "crowds started" if args.first_audio else f"{args.steps} steps"
    if args.codec_frames:
        turns = f"{args.steps} calls"
    launches = f" in each of {args.launches} pairs of processes" if args.launches > 1 else ""
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; {args.rounds} turns each of {turns}, "
        f"alternating{launches}; median (least) of all turns\n"
    )
    unit = "ms to the median stream's first audio" if args.first_audio else "ms per step"
    if args.codec_frames:
        unit = "ms per call"
    each = " | each pair's" if args.launches > 1 else ""
    print(f"| streams | {revision}: {unit} | tree: {unit} | tree / {revision}{each} |")
    print("| --- | --- | --- | --- |" + (" --- |" if each else ""))
    for n, pairs in rows:
        old = [t for rev, _ in pairs for t in rev]
        new = [t for _, tree in pairs for t in tree]
        a, b = statistics.median(old), statistics.median(new)
        line = f"| {n} | {a:.3f} ({min(old):.3f}) | {b:.3f} ({min(new):.3f}) | {b / a:.2f} |"
        if each:
            ratios = [statistics.median(tree) / statistics.median(rev) for rev, tree in pairs]
            line += " " + ", ".join(f"{r:.2f}" for r in ratios) + " |"
        print(line)


if __name__ == "__main__":
    main()
