"""A decode step's device side fused by ``torch.compile`` (inductor), against the
step as the engines run it.

    .venv/bin/python bench/bench_fused.py --model tiny-higgs --streams 1 8
    python3 bench/bench_fused.py --model random-musicgen-small --device cuda --streams 1 8 32

The engines' graphed step (``_graphed_step``: every row's forward, the prefilled
rows' logits, guidance, the rows' sampling rules and draw) is what a CUDA graph
records; at small batches on a GPU its time is the launch and latency of its
hundreds of small kernels, which a compiler fusing them would cut. For each
crowd size, requests are stepped until every prompt is in and the step's last
inputs are kept; then that step is timed three ways on those inputs: the
engines' own path (on CUDA, the CUDA graph recorded at warm-up; on a CPU, the
same function eagerly), the function eagerly, and compiled by inductor for that
one shape (on CUDA recorded as a CUDA graph in turn, as the engines would). With
the compile's time, whether the codes are the same, and how far apart the
logits are. Prints a Markdown section for bench/RESULTS.md.

With ``--profile``, no compile: the step is run eagerly under torch's profiler
and its kernels (on a CPU, its operators) are listed, grouped by kind, with the
device time they take a step, against the recorded graph's time: whether a
step's time is its kernels' own or the gaps between them, and which kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from bench_engine import load, request, set_up
from bench_stream import machine

from wavecast.server.engines import fused as fused_products
from wavecast.server.engines import resolve_device
from wavecast.server.engines.base import Engine
from wavecast.server.engines.graphs import StepGraphs


class _Recording(StepGraphs):
    """The engine's graphs, keeping the last step's key and inputs."""

    last: tuple[Any, tuple[torch.Tensor, ...]] | None = None

    def __call__(self, key: Any, *inputs: torch.Tensor) -> Any:
        self.last = (key, tuple(x.clone() for x in inputs))
        return super().__call__(key, *inputs)


def last_step(engine: Engine, streams: int, steps: int) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """A crowd of ``streams`` requests stepped ``steps`` times; the key and inputs
    of the last step (every prompt in by then)."""
    graphs = getattr(engine, "_graphs", None)
    assert isinstance(graphs, StepGraphs), "the engine was loaded without graphs"
    graphs.__class__ = _Recording
    jobs = [engine.prepare(request(engine, i, 10.0, varied=True)) for i in range(streams)]
    try:
        for _ in range(steps):
            outs = engine.step(jobs)
            assert not any(out.done for out in outs), "a request ended before the steps did"
    finally:
        for job in jobs:
            engine.finish(job)
    assert isinstance(graphs, _Recording) and graphs.last is not None
    return graphs.last


def timed(
    call: Callable[[], Any], restore: Callable[[], None], cuda: bool, count: int
) -> list[float]:
    """Milliseconds per call, ``count`` calls (after warm-up ones), the state the
    step advances put back after each."""

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        restore()
        return elapsed * 1000

    for _ in range(10):
        once()
    return [once() for _ in range(count)]


class Step(NamedTuple):
    """A crowd's last step, ready to run again: its key and inputs, the graphed
    step eagerly, the engine's graphs, what puts back the state a step
    advances, and the engine's autocast."""

    key: Any
    inputs: tuple[torch.Tensor, ...]
    eager: Callable[[Sequence[torch.Tensor], Any], Any]
    graphs: StepGraphs
    restore: Callable[[], None]
    autocast: Any


def crowd_step(engine: Engine, streams: int, steps: int) -> Step:
    key, inputs = last_step(engine, streams, steps)
    inner: Any = engine  # (the engines' own parts, beyond the protocol)
    decoder = inner.decoder
    before = decoder.lengths.clone()
    rules = getattr(inner, "_rules", None)  # (speech: the rows' rules, which a step moves on)
    rules_before = None if rules is None else rules.state.clone()

    def restore() -> None:
        decoder.lengths.copy_(before)
        if rules is not None and rules_before is not None:
            rules.state.copy_(rules_before)

    autocast = getattr(engine, "autocast", contextlib.nullcontext)
    return Step(key, inputs, inner._graphed_step, inner._graphs, restore, autocast)


def measure(engine: Engine, streams: int, steps: int, cuda: bool, count: int) -> dict[str, Any]:
    key, inputs, step, graphs, restore, autocast = crowd_step(engine, streams, steps)
    with torch.no_grad(), autocast():
        own = graphs(key, *inputs)
        own = tuple(x.clone() for x in own)
        restore()
        own_ms = timed(lambda: graphs(key, *inputs), restore, cuda, count)
        eager_ms = timed(lambda: step(inputs, key), restore, cuda, count)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        fused = StepGraphs(compiled, lambda: None, record=cuda)
        fused.prepare([key], lambda _: inputs, label="fused")  # compiled (and recorded)
        out = tuple(x.clone() for x in fused(key, *inputs))
        restore()
        compile_s = time.perf_counter() - start
        fused_ms = timed(lambda: fused(key, *inputs), restore, cuda, count)
        torch._dynamo.reset()
    return {
        "key": key,
        "own": statistics.median(own_ms),
        "eager": statistics.median(eager_ms),
        "fused": statistics.median(fused_ms),
        "compile": compile_s,
        "codes": bool(torch.equal(own[0], out[0])),
        "logits": float((own[1].float() - out[1].float()).abs().max()),
    }


KINDS = (  # (kind, words in a kernel's or operator's name), the first that matches
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    (
        "products",
        (
            "gemm",
            "gemv",
            "cutlass",
            "xmma",
            "nvjet",
            "splitk",
            "matmul",
            "addmm",
            "aten::mm",
            "bmm",
            "linear",
        ),
    ),
    ("sort, top-k", ("sort", "radix", "topk", "scan", "cumsum")),
    ("norms", ("norm",)),
    ("indexing", ("index", "scatter", "gather", "embedding", "where", "copy", "cat")),
    ("copies, fills", ("memcpy", "memset", "fill", "zero")),
    ("reductions", ("reduce", "max", "sum", "argmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "add", "mul", "div", "exp")),
)


def kind(name: str) -> str:
    lowered = name.lower()
    for label, words in KINDS:
        if any(word in lowered for word in words):
            return label
    return "other"


def profile(engine: Engine, streams: int, steps: int, cuda: bool, count: int) -> dict[str, Any]:
    """The step eagerly under torch's profiler: its kernels (on a CPU, its
    operators) per step, by kind and by name, with their time a step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    key, inputs, step, graphs, restore, autocast = crowd_step(engine, streams, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), autocast():
        own_ms = statistics.median(timed(lambda: graphs(key, *inputs), restore, cuda, count))
        eager_ms = statistics.median(timed(lambda: step(inputs, key), restore, cuda, count))
        calls = 20
        with profiler(activities=activities) as prof:
            for _ in range(calls):
                step(inputs, key)
                restore()
            if cuda:
                torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        if not cuda and (event.device_type != DeviceType.CPU or event.cpu_parent is not None):
            continue
        us = event.time_range.elapsed_us() if cuda else event.cpu_time_total
        by_name.setdefault(event.name, []).append(us)
    # (restore's own copy is in the profile too: a step's share of it is small)
    names = sorted(by_name, key=lambda n: -sum(by_name[n]))
    by_kind: dict[str, list[float]] = {}
    for name in names:
        by_kind.setdefault(kind(name), []).extend(by_name[name])
    return {
        "key": key,
        "own": own_ms,
        "eager": eager_ms,
        "count": sum(len(v) for v in by_name.values()) / calls,
        "busy": sum(sum(v) for v in by_name.values()) / calls / 1000,
        "kinds": [(k, len(v) / calls, sum(v) / calls) for k, v in by_kind.items()],
        "names": [(n, len(by_name[n]) / calls, sum(by_name[n]) / calls) for n in names[:15]],
    }


def heading(
    title: str, args: argparse.Namespace, engine: Engine, device: str, threads: str, runs: str
) -> None:
    """A section's title and its machine, command, date and step."""
    print(f"### {title}: {args.model} on {device} ({engine.info.dtype})\n")
    print(f"- machine: {machine(device)}{threads}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {runs}")
    print(f"- the step timed: the crowd's step {args.steps + 1} (every prompt in)")


def print_profile(args: argparse.Namespace, engine: Engine, device: str, cuda: bool) -> None:
    what = "kernels" if cuda else "operators (outermost)"
    own = "the recorded CUDA graph" if cuda else "the engines' path, weights unpacked"
    heading(f"the step's {what}", args, engine, device, "", "20 eager calls under torch's profiler")
    for n in args.streams:
        r = profile(engine, n, args.steps, cuda, args.calls)
        print(
            f"\n{n} stream(s), step shape {r['key']}: {own} {r['own']:.3f} ms, eagerly "
            f"{r['eager']:.3f} ms; {r['count']:.0f} {what} a step, together "
            f"{r['busy']:.3f} ms\n"
        )
        print(f"| kind | {what} a step | µs a step | share |")
        print("| --- | --- | --- | --- |")
        for label, number, us in sorted(r["kinds"], key=lambda x: -x[2]):
            share = 100 * us / (1000 * r["busy"])
            print(f"| {label} | {number:.0f} | {us:.0f} | {share:.0f}% |")
        print(f"\n| the most costly {what} | a step | µs a step |")
        print("| --- | --- | --- |")
        for name, number, us in r["names"]:
            short = name if len(name) <= 70 else name[:67] + "..."
            print(f"| `{short.replace('|', '/')}` | {number:.0f} | {us:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=24, help="steps before the one timed")
    parser.add_argument("--calls", type=int, default=200, help="timed calls of each way")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1)")
    parser.add_argument(
        "--profile", action="store_true", help="the step's kernels under the profiler, no compile"
    )
    parser.add_argument(
        "--fused-products",
        action="store_true",
        help="the step's products fused with their norms and sums (Triton; off by default)",
    )
    args = parser.parse_args()
    fused_products.ENABLED = args.fused_products
    threads = set_up(args.threads)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    # (On a CPU the engines pack their weights for the row kernel and oneDNN,
    # which inductor cannot trace: unpacked here, the step's torch operations.)
    engine = load(
        args.model, device, False, cuda_graphs=True, max_active=max(args.streams), pack=False
    )
    if args.profile:
        print_profile(args, engine, device, cuda)
        return
    own = "the recorded CUDA graph" if cuda else "the engines' path, weights unpacked"
    fused = "inductor, recorded as a CUDA graph" if cuda else "inductor"
    heading(
        "the step's device side fused",
        args,
        engine,
        device,
        f", {threads} torch thread(s)",
        f"median of {args.calls} calls each",
    )
    print()
    print(
        f"| streams | step shape | {own}, ms | eagerly, ms | {fused}, ms "
        "| compile (s) | same codes | logits apart (max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.streams:
        r = measure(engine, n, args.steps, cuda, args.calls)
        print(
            f"| {n} | {r['key']} | {r['own']:.3f} | {r['eager']:.3f} | {r['fused']:.3f} "
            f"| {r['compile']:.1f} | {'yes' if r['codes'] else 'no'} | {r['logits']:.1e} |"
        )


if __name__ == "__main__":
    main()
