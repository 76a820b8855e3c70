"""What an uploaded voice's encoding costs the speech streams already running.

A speech request with an uploaded voice (a reference clip to clone) has it
encoded by the model's audio tokenizer before it can start. The scheduler
prepares new requests between decode steps; this runs the same alternation in
one process (one unit of preparation, then one decode step of the running
streams) and reports the longest gap between two decode steps while the
request is prepared, in two ways:

- ``one go``: the whole preparation at once (``prepare``: the tokenizer's work
  in one call, as before it was cut into parts);
- ``pieces``: ``prepare_steps`` as the engine gives it (a convolution, a
  HuBERT layer or an activation of the tokenizer's a unit).

    .venv/bin/python bench/bench_voice.py --reference-seconds 10 60

The tiny test model (its tokenizer has the released one's layout, scaled down).

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile
from bench_melody import alternate, alternation
from bench_stream import machine

from wavecast.protocol import resolve_params
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import load_higgs


def reference(seconds: float) -> bytes:
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal(int(24000 * seconds))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, 24000, format="WAV")
    return buffer.getvalue()


def measure(engine: HiggsEngine, streams: int, ref: bytes, pieces: bool) -> dict[str, float]:
    params = resolve_params(engine.info.params, {"max_new_tokens": 2048, "seed": 1})
    text = "A long story, told slowly. " * 20
    running = [engine.prepare(EngineRequest(f"r{i}", text, params)) for i in range(streams)]
    for _ in range(30):  # every stream past its prefill
        engine.step(running)
    short = resolve_params(engine.info.params, {"max_new_tokens": 20, "seed": 2})
    checked = EngineRequest("v", "Hello.", short, {"reference": ref})
    # Decoded as the worker pool does before the request is queued.
    voiced = EngineRequest("v", "Hello.", short, {"reference": ref}, decoded=engine.check(checked))
    return alternate(engine, running, voiced, pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-seconds", type=float, nargs="+", default=[10.0, 60.0])
    args = alternation(parser)
    engine = HiggsEngine(load_higgs("tiny-higgs", None, "cpu"), name="tiny-higgs", max_active=8)
    engine.warm_up()
    rows = []
    for seconds in args.reference_seconds:
        ref = reference(seconds)
        for pieces in [False, True] * args.rounds:
            result = measure(engine, args.streams, ref, pieces)
            rows.append((seconds, "pieces" if pieces else "one go", result))
    print(f"### an uploaded voice encoded beside {args.streams} running speech streams: tiny-higgs")
    print()
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    seconds_given = " ".join(f"{s:g}" for s in args.reference_seconds)
    print(
        f"- command: `python bench/bench_voice.py --reference-seconds {seconds_given} "
        f"--streams {args.streams} --rounds {args.rounds}`"
    )
    print(f"- date: {time.strftime('%Y-%m-%d')}; each way {args.rounds} time(s), alternately")
    print()
    print("| voice | preparation | units | longest gap between steps | step (median) | total |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for seconds, name, r in rows:
        print(
            f"| {seconds:g} s | {name} | {r['units']:.0f} | {r['max_gap_ms']:.0f} ms "
            f"| {r['step_ms']:.1f} ms | {r['total_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
