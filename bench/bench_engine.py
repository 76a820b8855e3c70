"""The engine core alone: N requests stepped together in this process.

What the batched decode step buys, without the network, the event loop or a
client sharing the machine's cores: wall time per step, aggregate real-time
factor against one request alone, and the time to each request's first audio
when N arrive at once (preparation, prefill and the steps before the first
chunk); the longest step (every stream waits through it: a crowd's prefill,
say), and the longest of those in which streams ended; of each step, the time
in the codec and in the requests' bookkeeping (the rest: the forward and
sampling), and the codec calls.

    .venv/bin/python bench/bench_engine.py --model tiny-musicgen --streams 1 8 16
    .venv/bin/python bench/bench_engine.py --model tiny-higgs --streams 1 8 16
    .venv/bin/python bench/bench_engine.py --model tiny-higgs --reference  # each alone
    .venv/bin/python bench/bench_engine.py --model tiny-musicgen --baseline  # vs audiocraft
    .venv/bin/python bench/bench_engine.py --streams 8 16 --stagger 7  # arriving apart

Speech models speak a fixed text for ``--duration`` seconds' worth of frames
(random weights speak until ``max_new_tokens``). ``--reference``: the speech
engine's per-request path (transformers' forward, one request at a time).
``--baseline`` (MusicGen): audiocraft's ``MusicGen.generate`` of the same number
of clips as one static batch, in the same run with the same threads (its audio
comes only at the end, and its requests must start together).

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from bench_stream import baseline, freeze_heap, machine, speech_text, sync

from wavecast.protocol import ParamValue, resolve_params
from wavecast.server.config import DTYPES
from wavecast.server.engines import codec_incremental, fused, is_higgs_name, resolve_device
from wavecast.server.engines.base import Engine, EngineRequest
from wavecast.server.engines.precision import model_dtype
from wavecast.server.scheduler import keep_freed_memory

SPEECH = "The sun rises in the east and sets in the west, as it has for thousands of years."
MUSIC = "warm lofi hip hop with soft keys"


def request(engine: Engine, index: int, duration: float, varied: bool = False) -> EngineRequest:
    given: dict[str, ParamValue] = {"seed": index}
    if engine.info.family == "higgs":
        given["max_new_tokens"] = round(duration * engine.frame_rate)
        prompt = speech_text(index) if varied else SPEECH
    else:
        given["duration"] = duration
        prompt = MUSIC
    return EngineRequest(f"r{index}", prompt, resolve_params(engine.info.params, given))


class Parts:
    """Where an engine's steps go, while ``with``-in: the batched decode step's
    forward (``decoder.decode``) and draw (``_draw``: guidance, sampling, the
    finiteness check), its codec decodes (the ``_decode_due`` of each step and
    the calls it makes, with the chunks in each, the ending streams' last ones
    included) and its per-request bookkeeping (``_advance``); the rest is the
    steps' inputs and outputs, and the first steps' conditioning and prefill.
    (Host time: on a GPU, asynchronous work shows where something waits for it;
    with CUDA graphs the forward and the draw are one replay, counted in neither.)"""

    PARTS = ("forward", "draw", "codec", "bookkeeping")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.calls = 0
        self.chunks = 0

    def __enter__(self) -> Parts:
        engine: Any = self.engine
        self._patched: list[tuple[Any, str, Any]] = []
        decoder = getattr(engine, "decoder", None)
        if decoder is not None:
            self._time(decoder, "decode", "forward")
        self._time(engine, "_draw", "draw")
        self._time(engine, "_decode_due", "codec")
        self._time(engine, "_advance", "bookkeeping")
        streams = getattr(engine, "codec_streams", None)
        if streams is not None and streams.incremental is not None:
            self._count(streams.incremental, "decode")
        elif hasattr(engine, "_decode"):
            self._count(engine, "_decode")
            if streams is not None:
                self._count(streams, "decode")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, before in reversed(self._patched):
            if before is None:
                delattr(owner, name)  # the class's method again
            else:
                setattr(owner, name, before)

    def _time(self, owner: Any, name: str, part: str) -> None:
        if not hasattr(owner, name):
            return
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - began

        self._patch(owner, name, timed)

    def _count(self, owner: Any, name: str) -> None:
        method = getattr(owner, name)

        def counted(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.chunks += int(codes.shape[0])
            return method(codes, *args, **kwargs)

        self._patch(owner, name, counted)

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._patched.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, replacement)


def run(
    engine: Engine,
    streams: int,
    duration: float,
    device: str,
    stagger: int = 0,
    varied: int | None = None,
) -> dict[str, float]:
    """Prepare ``streams`` requests at once (or one every ``stagger`` steps) and
    step them all to the end. ``varied``: speech requests speak the varied texts,
    the first this one of them (None: all the same text)."""
    with Parts(engine) as parts:
        result = _run(engine, streams, duration, device, stagger, varied)
    steps = result["steps"]
    for part, seconds in parts.seconds.items():
        result[part] = seconds / steps
    result["calls"] = parts.calls / steps
    result["per_call"] = parts.chunks / max(1, parts.calls)
    return result


def _run(
    engine: Engine, streams: int, duration: float, device: str, stagger: int, varied: int | None
) -> dict[str, float]:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    offset = varied or 0
    waiting = [request(engine, offset + i, duration, varied is not None) for i in range(streams)]
    jobs = []
    first: list[float] = []
    first_steps: list[int] = []  # steps from a stream's join to its first audio
    each: list[float] = []  # every stream's real-time factor (its audio / its time)
    steps = 0
    longest = 0.0  # the longest step: what every stream waits through at once
    ending = 0.0  # the longest of those in which a stream ended
    steady = 0.0  # the longest of those in which no stream began or ended its audio
    samples = 0
    rate = engine.info.sample_rate
    while jobs or waiting:
        while waiting and (not stagger or steps % stagger == 0 or not jobs):
            job = engine.prepare(waiting.pop(0))
            job.extra["joined"] = time.perf_counter()
            job.extra["joined_step"] = steps
            jobs.append(job)
            if stagger:
                break
        began = time.perf_counter()
        outputs = engine.step(jobs)
        steps += 1
        now = time.perf_counter()
        longest = max(longest, now - began)
        if any(output.done for output in outputs):
            ending = max(ending, now - began)
        elif all(
            output.audio is None or job.extra.get("first") is not None
            for job, output in zip(jobs, outputs, strict=True)
        ):
            steady = max(steady, now - began)
        for job, output in list(zip(jobs, outputs, strict=True)):
            joined = job.extra["joined"] if stagger else start
            if output.audio is not None:
                samples += output.audio.shape[0]
                job.extra["samples"] = job.extra.get("samples", 0) + output.audio.shape[0]
                if job.extra.get("first") is None:
                    job.extra["first"] = now - joined
                    first.append(now - joined)
                    first_steps.append(steps - job.extra["joined_step"])
            if output.done:
                each.append(job.extra.get("samples", 0) / rate / (now - joined))
                engine.finish(job)
                jobs.remove(job)
    sync(device)
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "steps": steps,
        "rtf": samples / rate / wall,
        "slowest": min(each),
        "ttfa": statistics.median(first),
        "ttfa_steps": statistics.median(first_steps),
        "longest": longest,
        "ending": ending,
        "steady": steady,
        "memory": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def load(
    name: str,
    device: str,
    reference: bool,
    cuda_graphs: bool = False,
    max_active: int = 4,
    codec_batch: int = 0,
    codec_windows: bool = False,
    dtype: str = "auto",
    max_new_tokens: int = 2048,
    prefill_budget_ms: float | None = None,
    pack: bool = True,
    pipelined: bool = False,
    **speech: Any,
) -> Engine:
    """The engine, warmed up as the server warms it (with graphs: every shape of
    up to ``max_active`` requests recorded; the codec batch measured unless given;
    the generator in ``dtype``, as ``--dtype``; the C heap keeping freed memory
    and the Python heap frozen after warm-up, as the server's; on a CPU its large
    float32 weights packed, unless not ``pack``; the steps ``pipelined``, as
    ``--pipelined-steps``). ``speech``: more of the speech engine's arguments
    (voices, prefix_cache)."""
    keep_freed_memory()
    engine: Engine
    if is_higgs_name(name):
        from wavecast.server.engines.higgs.engine import HiggsEngine
        from wavecast.server.engines.higgs.loading import load_higgs
        from wavecast.server.engines.testing.higgs_reference import HiggsReference

        loaded = load_higgs(name, None, device, model_dtype(dtype, device))
        kind = HiggsReference if reference else HiggsEngine
        engine = kind(
            loaded,
            name=name,
            cuda_graphs=cuda_graphs,
            max_active=max_active,
            codec_batch=codec_batch or None,
            codec_windows=codec_windows,
            max_new_tokens=max_new_tokens,
            prefill_budget_ms=prefill_budget_ms,
            pipelined=pipelined,
            **speech,
        )
    else:
        from wavecast.server.engines.musicgen.engine import MusicGenEngine, StreamSettings
        from wavecast.server.engines.musicgen.loading import load_musicgen

        model, _ = load_musicgen(name, device, model_dtype(dtype, device))
        engine = MusicGenEngine(
            model,
            name=name,
            test_model=True,
            cuda_graphs=cuda_graphs,
            max_active=max_active,
            stream=StreamSettings(codec_batch=codec_batch, codec_windows=codec_windows),
            prefill_budget_ms=prefill_budget_ms,
            pipelined=pipelined,
        )
    engine.warm_up()
    if pack:
        engine.pack_weights()  # (as the server does once every engine is warm)
    freeze_heap()
    return engine


def set_up(threads: int) -> int:
    """Lines printed as they come, no gradients, and torch's threads: ``threads``,
    or (0) one fewer than the cores; how many."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_grad_enabled(False)
    threads = threads or max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(threads)
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="the generator's format, as the server's"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=2048,
        help="speech: the largest max_new_tokens a request may ask for, as the server's "
        "flag (it sizes the table whose memory is checked at load)",
    )
    parser.add_argument("--reference", action="store_true", help="speech: each request alone")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="the batched decode step as CUDA graphs"
    )
    parser.add_argument(
        "--codec-batch",
        type=int,
        default=0,
        help="codec chunks per call at most (default: measured at warm-up, as the server)",
    )
    parser.add_argument(
        "--stagger",
        type=int,
        default=0,
        help="requests join one every this many steps (default: all at once); "
        "times to first audio and real-time factors count from each one's join",
    )
    parser.add_argument(
        "--codec-windows",
        action="store_true",
        help="re-decode windows of codes, not the incremental codec decoder (to compare)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no crowd of the benchmark's own before the runs: the first is the first "
        "crowd after the engine's warm-up, as a server's first",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="MusicGen: audiocraft's generate on the same batches, in the same run",
    )
    parser.add_argument(
        "--varied-texts",
        action="store_true",
        help="speech: the requests speak eight texts of different lengths (run r's "
        "i-th request the (r + i)-th), not all the same one",
    )
    parser.add_argument(
        "--fused-products",
        action="store_true",
        help="on CUDA in 16 bits: the decode steps' products with their norms, rotary "
        "positions, activations and residual sums as fused kernels (server.engines.fused; "
        "off by default)",
    )
    parser.add_argument(
        "--codec-graphs",
        action="store_true",
        help="with --cuda-graphs: the codec's steady calls recorded as CUDA graphs too "
        "(codec_incremental.RECORD_CALLS; off by default)",
    )
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="each step launched before the last one's outputs are handled, as the "
        "server's --pipelined-steps (off by default)",
    )
    args = parser.parse_args()
    fused.ENABLED = args.fused_products
    codec_incremental.RECORD_CALLS = args.codec_graphs
    threads = set_up(args.threads)
    device = resolve_device(args.device)
    began = time.perf_counter()
    engine = load(
        args.model,
        device,
        args.reference,
        args.cuda_graphs,
        max(args.streams),
        args.codec_batch,
        args.codec_windows,
        args.dtype,
        args.max_new_tokens,
        pipelined=args.pipelined,
    )
    loaded = time.perf_counter() - began
    resident = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    if not args.cold:
        run(engine, max(args.streams), min(args.duration, 1.0), device)  # warm up
    path = " (reference path: each request alone)" if args.reference else ""
    path += " (decode step as CUDA graphs)" if args.cuda_graphs else ""
    path += f" (one request joining every {args.stagger} steps)" if args.stagger else ""
    path += " (texts of different lengths)" if args.varied_texts else ""
    title = f"{args.model}{path} on {device} ({engine.info.dtype}), {args.duration:g} s clips"
    print(f"### engine core in-process: {title}\n")
    print(f"- machine: {machine(device)}, {threads} torch thread(s)")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; median of {args.runs} runs")
    if args.cold:
        print("- the first run is the engine's first crowd after its warm-up")
    graphs = getattr(engine, "_graphs", None)
    if graphs is not None:
        print(
            f"- decode step shapes ready: {len(graphs)}; CUDA graphs recorded at load "
            f"and warm-up: {graphs.recorded}"
        )
    streams = getattr(engine, "codec_streams", None)
    mode = "windows" if streams is None or streams.incremental is None else "incremental"
    print(f"- codec decoding: {mode}; chunks per call at most: {engine.codec_batch} (warm-up)")
    print(f"- load and warm-up: {loaded:.1f} s")
    pipelined = getattr(engine, "pipelined", False)
    print(f"- steps pipelined (launched before the last one's outputs are handled): {pipelined}")
    print(f"- step weights: {engine.decoder.packing}")
    if device.startswith("cuda"):
        fusing = getattr(engine.decoder, "_fused", None) is not None
        print(f"- products fused with their norms and sums (Triton): {'yes' if fusing else 'no'}")
        inc = getattr(streams, "incremental", None)
        recording = inc is not None and inc._recorded is not None
        print(f"- codec calls recorded as CUDA graphs: {'yes' if recording else 'no'}")
        print(f"- GPU memory after warm-up: {resident:.2f} GiB")
    print()
    memory = " GPU memory (peak) |" if device.startswith("cuda") else ""
    model = getattr(engine, "model", None)
    with_baseline = args.baseline and engine.info.family == "musicgen" and model is not None
    versus = " audiocraft `generate`, same batch |" if with_baseline else ""
    print(
        "| streams | time to first audio, its step "
        "| ms per step (longest; where streams end; where none starts or ends) "
        "| per stream (slowest) "
        "| aggregate real-time factor | of a step: forward, draw, codec, bookkeeping "
        f"| codec calls per step (chunks each) |{memory}{versus}"
    )
    extra = (" --- |" if memory else "") + (" --- |" if versus else "")
    print("| --- | --- | --- | --- | --- | --- | --- |" + extra)
    # Each row as soon as it is measured: a run stopped at a time limit (a lent
    # device's) keeps the rows before it.
    one = None
    for n in args.streams:
        runs = [
            run(engine, n, args.duration, device, args.stagger, r if args.varied_texts else None)
            for r in range(args.runs)
        ]
        r = {key: statistics.median(each[key] for each in runs) for key in runs[0]}
        if with_baseline:
            walls = baseline(model, MUSIC, args.duration, args.runs, device, batch=n)
            r["baseline"] = n * args.duration / statistics.median(walls)
        if n == 1:
            one = r
        ratio = f" ({r['rtf'] / one['rtf']:.2f}x one stream)" if one and n != 1 else ""
        ttfa = f"{r['ttfa'] * 1000:.0f} ms"
        if one and n != 1:
            ttfa += f" ({r['ttfa'] / one['ttfa']:.1f}x)"
        ttfa += f", step {r['ttfa_steps']:g}"
        peak = f" {r['memory']:.2f} GiB |" if memory else ""
        if versus:
            peak += f" x{r['baseline']:.2f} (wavecast: {r['rtf'] / r['baseline']:.2f}x) |"
        parts = ", ".join(f"{r[part] * 1000:.2f}" for part in Parts.PARTS) + " ms"
        calls = f"{r['calls']:.2f} ({r['per_call']:.1f})"
        print(
            f"| {n} | {ttfa} | {r['wall'] / r['steps'] * 1000:.2f} "
            f"({r['longest'] * 1000:.1f}; {r['ending'] * 1000:.1f}; {r['steady'] * 1000:.1f}) "
            f"| x{r['slowest']:.2f} "
            f"| x{r['rtf']:.2f}{ratio} | {parts} | {calls} |{peak}"
        )
    if graphs is not None:
        print(
            f"\nCUDA graphs recorded in all: {graphs.recorded}; every graph dropped "
            f"{graphs.dropped} times (the cache grew)"
        )
    inc = getattr(streams, "incremental", None)
    if inc is not None and inc._recorded is not None:
        shapes = inc._recorded.values()
        graphed = sum(1 for r in shapes if r is not None and r.graph is not None)
        print(f"codec calls' shapes recorded: {graphed} of {inc.recorded} kept")


if __name__ == "__main__":
    main()
