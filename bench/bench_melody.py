"""What a melody request's analysis (or a continuation's encoding) costs the
streams already running.

A melody model separates its reference's melodic stems with Demucs before the
request can start; a continuation's clip is encoded by EnCodec
(``--upload continuation``: the tiny text model, a 30 s window). The scheduler
prepares new requests between decode steps; this runs the same alternation in
one process (one unit of preparation, then one decode step of the running
streams) and reports the longest gap between two decode steps while the
request is prepared, in two ways:

- ``one go``: the whole preparation as one unit (the separation, or the
  encoding, in one call);
- ``pieces``: ``prepare_steps`` as the engine gives it (one Demucs segment per
  unit; a continuation: a layer of EnCodec's encoder per unit).

    .venv/bin/python bench/bench_melody.py --reference-seconds 60 --demucs htdemucs

``--demucs tiny``: the test model's tiny Demucs; ``htdemucs``: HTDemucs at the
shape of the released ``htdemucs`` (random weights). The music model is the tiny
melody test model either way (for a continuation, the tiny text model).

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Any

import numpy as np
import soundfile
import torch
from bench_stream import machine

from wavecast.protocol import resolve_params
from wavecast.server.engines.base import Engine, EngineRequest, Job
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen


def full_size_demucs() -> Any:
    from demucs.htdemucs import HTDemucs

    # The released htdemucs: HTDemucs' defaults, 7.8 s segments.
    return HTDemucs(sources=["drums", "bass", "other", "vocals"], segment=7.8).eval()


def reference(seconds: float) -> bytes:
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal((int(44100 * seconds), 2))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, 44100, format="WAV")
    return buffer.getvalue()


def measure(
    engine: MusicGenEngine, streams: int, ref: bytes, pieces: bool, role: str = "melody"
) -> dict[str, float]:
    params = resolve_params(engine.info.params, {"duration": engine.max_duration, "seed": 1})
    running = [engine.prepare(EngineRequest(f"r{i}", "running", params)) for i in range(streams)]
    for _ in range(20):  # every stream past its prefill
        engine.step(running)
    # (A continuation's prompt is shorter than its duration and the window.)
    short = resolve_params(engine.info.params, {"duration": 2.0 if role == "melody" else 30.0})
    checked = EngineRequest("m", "hum", short, {role: ref})
    # Decoded as the worker pool does before the request is queued.
    melody = EngineRequest("m", "hum", short, {role: ref}, decoded=engine.check(checked))
    return alternate(engine, running, melody, pieces)


def alternate(
    engine: Engine, running: list[Job], request: EngineRequest, pieces: bool
) -> dict[str, float]:
    """Prepare ``request`` beside the ``running`` streams (a unit of its
    preparation, then one of their steps; or all of it at once), then finish
    them all: the units, the longest gap between two steps, the median step,
    the time in all."""
    steps: list[float] = []
    gaps: list[float] = []
    units = 0
    start = time.perf_counter()
    last = start
    job: Job | None = None
    if pieces:
        for item in engine.prepare_steps(request):
            units += 1
            if isinstance(item, Job):
                job = item
            before = time.perf_counter()
            engine.step(running)
            now = time.perf_counter()
            steps.append(now - before)
            gaps.append(now - last)
            last = now
    else:
        job = engine.prepare(request)
        units = 1
        before = time.perf_counter()
        engine.step(running)
        now = time.perf_counter()
        steps.append(now - before)
        gaps.append(now - last)
    total = time.perf_counter() - start
    assert job is not None
    for done in [*running, job]:
        engine.finish(done)
    return {
        "units": units,
        "max_gap_ms": 1000 * max(gaps),
        "step_ms": 1000 * statistics.median(steps),
        "total_s": total,
    }


def alternation(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments, with those of an upload prepared beside running
    streams (``alternate``): the streams, torch's threads (set, and autograd
    off) and the rounds."""
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="each way, alternately")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-seconds", type=float, default=60.0)
    parser.add_argument("--demucs", choices=("tiny", "htdemucs"), default="htdemucs")
    parser.add_argument("--upload", choices=("melody", "continuation"), default="melody")
    args = alternation(parser)
    melody = args.upload == "melody"
    model = build_tiny_musicgen(melody=melody, window=30.0)
    if melody and args.demucs == "htdemucs":
        model.lm.condition_provider.conditioners["self_wav"].demucs = full_size_demucs()
    engine = MusicGenEngine(model, name="tiny", test_model=True, max_duration=30.0)
    ref = reference(args.reference_seconds)
    rows = []
    for pieces in [False, True] * args.rounds:
        result = measure(engine, args.streams, ref, pieces, args.upload)
        rows.append(("pieces" if pieces else "one go", result))
    what = f"melody analysis ({args.demucs} Demucs)" if melody else "a continuation's encoding"
    print(f"### {what} beside {args.streams} running streams")
    print()
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    print(
        f"- command: `python bench/bench_melody.py --reference-seconds "
        f"{args.reference_seconds:g} --demucs {args.demucs} --upload {args.upload} "
        f"--streams {args.streams} --rounds {args.rounds}`"
    )
    print(f"- date: {time.strftime('%Y-%m-%d')}; each way {args.rounds} time(s), alternately")
    print()
    print("| preparation | units | longest gap between steps | step (median) | total |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(
            f"| {name} | {r['units']:.0f} | {r['max_gap_ms']:.0f} ms | {r['step_ms']:.1f} ms "
            f"| {r['total_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
