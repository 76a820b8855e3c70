"""Real-time factor and time to first audio through the server, against
audiocraft's own ``MusicGen.generate`` on the same model in the same run.

The server runs as its own process (``wavecast serve``), as in production, so
that the measuring client does not share its interpreter.

    .venv/bin/python bench/bench_stream.py --model tiny-musicgen --duration 10
    .venv/bin/python bench/bench_stream.py --model random-musicgen-small --device cuda

Prints a Markdown section for bench/RESULTS.md. Times on the client side are from
sending ``generate`` to the first ``audio`` frame and to ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from wavecast.clients import connect
from wavecast.protocol import Audio, Done
from wavecast.server.engines import resolve_device


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def baseline(
    model: Any, prompt: str, duration: float, runs: int, device: str, batch: int = 1
) -> list[float]:
    """Wall seconds of audiocraft's MusicGen.generate (tokens and decode) of
    ``batch`` clips at once."""
    top_k = min(250, int(model.lm.card))  # the server's default, as the stream uses
    model.set_generation_params(duration=duration, top_k=top_k, cfg_coef=3.0)
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        model.generate([prompt] * batch)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# Eight texts of different lengths (6 to 31 words), for a crowd whose prompts
# differ as real ones do (``--varied-texts`` of the speech benchmarks): request
# ``i`` speaks the ``i % 8``-th.
SPEECH_TEXTS = (
    "Good morning, and welcome back to the show.",
    "Please hold the line.",
    "The train to the coast leaves from platform four at a quarter past nine, "
    "and the next one an hour later.",
    "I never thought I would say this, but the soup was better yesterday.",
    "Turn left at the bakery.",
    "Every evening the old lighthouse keeper climbed the stairs, polished the great "
    "lens, and watched the ships slip past the rocks until the sun came up again.",
    "Thank you for calling; your order has shipped and should arrive on Thursday.",
    "We will meet again soon, my friend, when the rain stops.",
)


def speech_text(index: int) -> str:
    """The text request ``index`` of a varied crowd speaks."""
    return SPEECH_TEXTS[index % len(SPEECH_TEXTS)]


async def timed(stream: Any, start: float) -> dict[str, float]:
    """Read a request's stream to its end: time to first audio, wall time, the
    audio made (the server's count) and the real-time factor, from ``start``."""
    first = None
    audio = 0.0
    async for event in stream:
        if isinstance(event, Audio) and first is None:
            first = time.perf_counter() - start
        if isinstance(event, Done):
            assert event.status == "completed", event
            assert event.stats is not None
            audio = event.stats.audio_seconds
    wall = time.perf_counter() - start
    assert first is not None
    return {"ttfa": first, "wall": wall, "audio": audio, "rtf": audio / wall}


async def one(url: str, model: str, prompt: str, duration: float) -> dict[str, float]:
    async with connect(url) as client:
        start = time.perf_counter()
        stream = await client.generate(model, prompt, duration=duration)
        return await timed(stream, start)


def print_header(title: str, command: str, device: str = "cpu") -> None:
    """A RESULTS.md section's heading: its title, the machine, the command, the date."""
    print(f"### {title}")
    print()
    print(f"- machine: {machine(device)}")
    print(f"- command: `{command}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}")
    print()


@contextlib.contextmanager
def tiny_server(models: list[str]) -> Iterator[str]:
    """``wavecast serve`` of ``models`` (the tiny test models) on the CPU, for one
    request at a time; its stream URL while the block runs."""
    args = argparse.Namespace(
        model=models, device="cpu", concurrency=[1], threads=0, admission="realtime",
        codec_batch=0, codec_windows=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(args, Path(tmp) / "server.log")
        try:
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def start_server(
    args: argparse.Namespace, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``wavecast serve`` as ``args`` say (in ``env``: this process's by default),
    its log in ``log``; the process and its stream URL once it listens."""
    most = max(args.concurrency)  # (--max-active by default: the largest crowd at once)
    command = [
        sys.executable,
        "-m",
        "wavecast.clients.cli",
        "serve",
        *(
            part
            for model in (args.model if isinstance(args.model, list) else [args.model])
            for part in ("--model", model)
        ),
        "--device",
        args.device,
        "--port",
        "0",
        "--max-active",
        str(asked if (asked := getattr(args, "max_active", None)) is not None else most),
        # Every client of the benchmark comes from this one address.
        "--max-connections-per-ip",
        str(most + 1),
        "--max-connections",
        str(max(256, most + 1)),
        "--threads",
        str(args.threads),
        "--admission",
        args.admission,
        "--codec-batch",
        str(args.codec_batch),
        *(["--codec-windows"] if args.codec_windows else []),
        *(["--pipelined-steps"] if getattr(args, "pipelined_steps", False) else []),
        *getattr(args, "server_extra", []),
        "--log-file",
        str(log),
    ]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        match = (
            re.search(r"ws://127\.0\.0\.1:(\d+)/v1/stream", log.read_text())
            if (log.exists())
            else None
        )
        if match:
            return process, match.group(0)
        if process.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    raise SystemExit("the server did not start in time")


async def bench(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    from wavecast.server.engines.musicgen.loading import load_musicgen  # (speech: no audiocraft)

    model, _ = load_musicgen(args.model, device)
    base = baseline(model, args.prompt, args.duration, args.runs, device)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    def run(url: str, index: int) -> Awaitable[Run]:
        duration = min(args.duration, 2.0) if index < 0 else args.duration
        return one(url, args.model, args.prompt, duration)

    seq, conc = await measure_server(args, run)

    report(
        f"{args.model} on {device}, {args.duration:g} s clips, {args.runs} runs (median)",
        device,
        ("audiocraft `MusicGen.generate`", "audiocraft"),
        base,
        args.duration,
        ("wavecast stream, 1 client", seq),
        conc,
        args.threads,
        getattr(args, "server_cpu", None),
        getattr(args, "server_codec", None),
        getattr(args, "client_cpu", None),
    )


Run = dict[str, float]
Crowd = tuple[list[Run], float]  # a crowd's runs and its wall time


async def measure_server(
    args: argparse.Namespace, run: Callable[[str, int], Awaitable[Run]]
) -> tuple[list[Run], dict[int, list[Crowd]]]:
    """Start ``wavecast serve``; ``run(url, -1)`` warms it up, then ``args.runs``
    runs one after another, then ``args.crowds`` rounds of ``k`` at once for each
    ``k`` in ``args.concurrency``, the counts taking turns (the ``i``-th client of a
    crowd starting ``i * args.stagger_ms`` ms after the first, if given)."""
    conc: dict[int, list[Crowd]] = {k: [] for k in args.concurrency}
    apart = args.stagger_ms / 1000

    async def later(url: str, index: int) -> Run:
        await asyncio.sleep(index * apart)
        return await run(url, index)

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        process, url = start_server(args, log)
        try:
            await run(url, -1)
            freeze_heap()  # (the clients' process holds what the baseline loaded)
            before = thread_cpu(process.pid)
            clients, began = time.process_time(), time.perf_counter()
            seq = [await run(url, index) for index in range(args.runs)]
            for _ in range(args.crowds):
                for k in args.concurrency:
                    start = time.perf_counter()
                    results = await asyncio.gather(*(later(url, index) for index in range(k)))
                    conc[k].append((list(results), time.perf_counter() - start))
            after = thread_cpu(process.pid)
            args.server_cpu = (after[0] - before[0], after[1] - before[1])
            args.client_cpu = (time.process_time() - clients, time.perf_counter() - began)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        batches = codec_batches(log.read_text())
        args.server_codec = ", ".join(f"{model} {n}" for model, n in batches.items()) or None
    return seq, conc


def codec_batches(log: str) -> dict[str, int]:
    """Each model's codec chunks per call, as a server's log says its warm-up chose."""
    return {model: int(n) for model, n in re.findall(r"(\S+): codec chunks per call: (\d+)", log)}


def freeze_heap() -> None:
    """What is alive now stays out of the garbage collector's walk, as the server
    keeps its own after warm-up: a full collection over the loaded libraries (and
    a baseline's model) stalls the process for up to ~300 ms on a CPU core: in a
    benchmark's clients, one crowd's first audio measured late; in an engine run
    in process, one step. What an earlier call froze is walked again first, so
    what was dropped since is collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds a process's threads have used so far (Linux): its main thread
    (the server's event loop), and all the others (the inference thread, workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if task.name == str(pid):
            main += seconds
        else:
            others += seconds
    return main, others


def report(
    title: str,
    device: str,
    baseline_names: tuple[str, str],
    base: list[float],
    audio_seconds: float,
    single: tuple[str, list[Run]],
    conc: dict[int, list[Crowd]],
    server_threads: int = 0,
    server_cpu: tuple[float, float] | None = None,
    server_codec: str | None = None,
    client_cpu: tuple[float, float] | None = None,
) -> None:
    """Print a RESULTS.md section: the baseline's wall times, then the runs (and
    the codec chunks per call each model's warm-up measured, from its log)."""
    med = statistics.median
    base_rtf = audio_seconds / med(base)
    label, seq = single
    seq_rtf = med(r["rtf"] for r in seq)
    print(f"### {title}\n")
    print(f"- machine: {machine(device)}")
    print(
        f"- CPU threads: the baseline {torch.get_num_threads()} (torch's default), the server "
        f"{server_threads or max(1, len(os.sched_getaffinity(0)) - 1)}"
        + (" (its default: one core is left to the network)" if not server_threads else "")
    )
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    crowds = len(next(iter(conc.values()), []))
    print(f"- date: {time.strftime('%Y-%m-%d')}")
    if server_codec:
        print(f"- the server's codec chunks per call (measured at its warm-up): {server_codec}")
    if crowds > 1:
        print(
            f"- each concurrent row: {crowds} crowds, the counts taking turns; the median "
            "crowd's first audio (its median stream's) and aggregate, the slowest stream "
            "and latest first audio of all"
        )
    print()
    print("| path | time to first audio | wall | real-time factor |")
    print("| --- | --- | --- | --- |")
    print(
        f"| {baseline_names[0]} | {med(base):.3f} s (all at the end) | "
        f"{med(base):.3f} s | x{base_rtf:.2f} |"
    )
    print(
        f"| {label} | {med(r['ttfa'] for r in seq) * 1000:.0f} ms | "
        f"{med(r['wall'] for r in seq):.3f} s | x{seq_rtf:.2f} |"
    )
    seq_ttfa = med(r["ttfa"] for r in seq)
    for k, crowds in conc.items():
        # Each crowd's median stream's first audio and its aggregate; the median
        # crowd's of both (the slowest stream and the latest first audio: of all).
        ttfa = med(med(r["ttfa"] for r in results) for results, _ in crowds)
        latest = max(r["ttfa"] for results, _ in crowds for r in results)
        slowest = min(r["rtf"] for results, _ in crowds for r in results)
        aggregate = med(sum(r["audio"] for r in results) / wall for results, wall in crowds)
        wall = med(wall for _, wall in crowds)
        print(
            f"| wavecast, {k} concurrent | {ttfa * 1000:.0f} ms ({ttfa / seq_ttfa:.1f}x one "
            f"stream's; max {latest * 1000:.0f} ms) | {wall:.3f} s | "
            f"x{slowest:.2f} per stream (slowest), "
            f"x{aggregate:.2f} aggregate ({aggregate / seq_rtf:.2f}x one stream) |"
        )
    paired = in_rounds(conc)
    if paired:
        print(
            "\nEach round's crowd against the crowd of one in the same round (they take "
            "turns: a slow spell of the machine falls on both), the median of the rounds' "
            "ratios and their range:"
        )
        for k, (aggregate, first) in paired.items():
            print(
                f"- {k} concurrent: aggregate {med(aggregate):.2f}x "
                f"({min(aggregate):.2f}-{max(aggregate):.2f}), first audio "
                f"{med(first):.2f}x ({min(first):.2f}-{max(first):.2f})"
            )
    print(f"\nwavecast / {baseline_names[1]} real-time factor, 1 client: {seq_rtf / base_rtf:.2f}")
    if server_cpu is not None:
        print(
            f"\nThe server's CPU time over these runs: the event loop's thread "
            f"{server_cpu[0]:.2f} s, the other threads (inference) {server_cpu[1]:.2f} s"
        )
    if client_cpu is not None:
        print(
            f"\nThe clients' process (this one) over the same runs: {client_cpu[0]:.2f} s of "
            f"CPU in {client_cpu[1]:.2f} s"
        )


def in_rounds(conc: dict[int, list[Crowd]]) -> dict[int, tuple[list[float], list[float]]]:
    """For each crowd size but one, each round's aggregate real-time factor and
    median first audio over those of the round's crowd of one (empty without a
    crowd of one, or with a single round)."""
    ones = conc.get(1, [])
    if len(ones) < 2:
        return {}
    med = statistics.median

    def aggregate(crowd: Crowd) -> float:
        results, wall = crowd
        return sum(r["audio"] for r in results) / wall

    def first(crowd: Crowd) -> float:
        return med(r["ttfa"] for r in crowd[0])

    return {
        k: (
            [aggregate(c) / aggregate(one) for c, one in zip(crowds, ones, strict=True)],
            [first(c) / first(one) for c, one in zip(crowds, ones, strict=True)],
        )
        for k, crowds in conc.items()
        if k != 1
    }


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The served side's settings (``start_server``) and the clients' arrival."""
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads")
    parser.add_argument("--admission", default="realtime", help="the server's --admission")
    parser.add_argument(
        "--max-active",
        type=int,
        default=None,
        help="the server's --max-active (default: the largest crowd; 0: the server's "
        "own default, as many as fit)",
    )
    parser.add_argument(
        "--codec-batch", type=int, default=0, help="the server's --codec-batch (0: measured)"
    )
    parser.add_argument(
        "--codec-windows", action="store_true", help="the server's --codec-windows (to compare)"
    )
    parser.add_argument(
        "--pipelined-steps", action="store_true", help="the server's --pipelined-steps"
    )
    parser.add_argument(
        "--crowds",
        type=int,
        default=3,
        help="each concurrency's crowd this many times, the counts taking turns "
        "(medians over them)",
    )
    parser.add_argument(
        "--stagger-ms",
        type=float,
        default=0.0,
        help="concurrent clients start this far apart (default: all at once); each one's "
        "times count from its own start",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--prompt", default="warm lofi hip hop with soft keys")
    add_server_arguments(parser)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
