"""A stream picked up from its codes (``generate.resume_codes``): what its
preparation costs, and how long one unit of it holds the other streams.

The engine in-process on the CPU (``--model``, the server's prefill time
budget ``--prefill-budget-ms``), one request of ``--seconds`` picked up from
``--known`` seconds of codes (drawn at random from the model's codebooks:
what they cost does not depend on what they are), its client having all of
their audio but the last ``--ahead`` seconds. Reported: the preparation's
units (how many, the longest: what the running streams wait for at most
between two steps, and their sum), and from the request to its first new
audio (preparation, prefill and steps); ``--known 0``: a request not picked
up, to its first audio; ``--melody SECONDS``: a melody model's request, with
a reference of noise that long. ``--before-path FOLDER`` runs another
commit's package (a folder holding a worktree's ``wavecast``) in turns with
this tree's, each in its own process.

    .venv/bin/python bench/bench_pickup.py --model random-musicgen-small --known 10 30 60
    .venv/bin/python bench/bench_pickup.py --model random-higgs-3b --known 0 --threads 2
    .venv/bin/python bench/bench_pickup.py --model tiny-musicgen-melody --melody 20 --known 40 100
    .venv/bin/python bench/bench_pickup.py --before-path /tmp/before-py --before-name REV

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_stream import machine

# One measurement, in its own process (so that another commit's package can run
# from its own path): prints a JSON object.
ONE = r"""
import json, sys, time
import numpy as np, torch
from wavecast.protocol import resolve_params
from wavecast.server.engines import load_engines
from wavecast.server.engines.base import EngineRequest

name, known, ahead, seconds, budget, threads, melody = sys.argv[1], *map(float, sys.argv[2:8])
torch.set_num_threads(int(threads))
engine = load_engines([name], "cpu", max_active=1, prefill_budget_ms=budget)[name]
info = engine.info
speech = info.family == "higgs"
rate = info.sample_rate
frame_rate = 25.0 if speech else 50.0
rows = int(known * frame_rate)
card = int(engine.decoder.card) - 2 if speech else int(engine.lm.card)
books = int(engine.num_codebooks) if speech else int(engine.lm.num_codebooks)
codes = np.random.default_rng(0).integers(0, card, (rows, books)).astype("<u2")
if speech:  # (a chunk's rows open with the stream BOS on codebooks not started yet)
    for k in range(books):
        codes[: k + 1, k] = card
    given = {"seed": 1, "max_new_tokens": int(seconds * frame_rate) + 8}
else:
    given = {"seed": 1, "duration": seconds}
params = resolve_params(info.params, given)
heard = max(0, int((known - ahead) * rate))
inputs = {}
if melody:  # (a reference of noise, at 44.1 kHz)
    import io, soundfile
    noise = np.random.default_rng(1).standard_normal(int(melody * 44100)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.2 * noise, 44100, format="WAV")
    inputs["melody"] = buffer.getvalue()
def request():
    kwargs = {"resume_codes": codes.tobytes()} if known else {}
    try:
        return EngineRequest("p", "picked up", params, inputs, resume=heard, **kwargs)
    except TypeError:  # (a revision whose engines make all of it again)
        return EngineRequest("p", "picked up", params, inputs, **kwargs)
engine.warm_up(1)
began = time.perf_counter()
units, job = [], None
steps = engine.prepare_steps(request())
while job is None:
    t = time.perf_counter()
    item = next(steps)
    units.append(time.perf_counter() - t)
    if not isinstance(item, (float, type(None))):
        job = item
prepared = time.perf_counter() - began
start = job.extra.get("from_sample", 0)
first = None
while first is None:
    out = engine.step([job])[0]
    if out.audio is not None and start + len(out.audio) > heard:
        first = time.perf_counter() - began
    start += 0 if out.audio is None else len(out.audio)
    if out.done:
        break
engine.finish(job)
print(json.dumps({"units": len(units), "longest": max(units), "sum": sum(units),
                  "prepared": prepared, "first": first}))
"""


def one(args: argparse.Namespace, path: str | None, known: float) -> dict[str, Any]:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-c", ONE, args.model, str(known), str(args.ahead)]
    command += [str(args.seconds or known + 5), str(args.prefill_budget_ms), str(args.threads)]
    command += [str(args.melody)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{path or 'this tree'}, {known:g} s known:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-musicgen-small")
    parser.add_argument("--known", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--ahead", type=float, default=0.5, help="codes past the audio had")
    parser.add_argument("--seconds", type=float, help="the stream's length (default: known + 5)")
    parser.add_argument("--prefill-budget-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--melody",
        type=float,
        default=0.0,
        help="a melody model's reference of this many seconds (noise; 0: none)",
    )
    parser.add_argument("--before-path", help="another commit's package folder")
    parser.add_argument("--before-name", default="before", help="what to call that commit")
    args = parser.parse_args()
    ways: list[tuple[str, str | None]] = [("this tree", None)]
    if args.before_path:
        ways.insert(0, (args.before_name, args.before_path))
    results: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for known in args.known:
            for name, path in ways:  # (in turns)
                result = one(args, path, known)
                results.setdefault((name, known), []).append(result)
                print(name, known, result, file=sys.stderr, flush=True)
    print(f"### a stream picked up from its codes: {args.model} on cpu\n")
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    print(f"- command: `python bench/bench_pickup.py {' '.join(sys.argv[1:])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {args.rounds} round(s) each, in turns; medians")
    print(
        f"- the client has all of the known codes' audio but the last {args.ahead:g} s; "
        f"prefill budget {args.prefill_budget_ms:g} ms a step"
        + (f"; a melody reference of {args.melody:g} s (noise)" if args.melody else "")
        + "\n"
    )
    print(
        "| revision | known | preparation units | longest unit | units' sum "
        "| from asking to the first new audio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for known in args.known:
        for name, _ in ways:
            rows = results[(name, known)]

            def median(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return statistics.median(float(row[key]) for row in rows)

            print(
                f"| {name} | {known:g} s | {median('units'):.0f} | {median('longest'):.3f} s "
                f"| {median('sum'):.2f} s | {median('first'):.2f} s |"
            )


if __name__ == "__main__":
    main()
