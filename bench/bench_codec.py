"""The codec alone: a chunk's decode, re-decoding a window or incrementally.

For each codec (the test models' tiny ones, and the released shapes with random
weights), how far the incremental decoder strays from the one-shot decode (the
check the engines run at load), and the time to decode chunks of ``n`` new
frames for ``B`` streams at once: as a window (left context, the chunk, the
held-back frames) or from each stream's state (streams long under way). Least
of ``--runs`` timings after a warm-up call.

    .venv/bin/python bench/bench_codec.py
    .venv/bin/python bench/bench_codec.py --codecs encodec-small dac-3b --streams 1 --frames 10 40

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from bench_stream import machine

from wavecast.server.engines.codec_decoders import for_serving
from wavecast.server.engines.codec_incremental import checked, incremental, steady_decode
from wavecast.server.scheduler import keep_freed_memory

Decode = Callable[[torch.Tensor], torch.Tensor]

# Name: (codebooks, cardinality, left context, held back) as the engines stream them.
GEOMETRY = {
    "encodec": (4, 64, 25, 4),
    "encodec-small": (4, 2048, 25, 4),
    "dac": (4, 64, 12, 11),
    "dac-3b": (8, 1024, 12, 11),
}


def build(name: str, device: str) -> tuple[torch.nn.Module, Decode]:
    if name.startswith("encodec"):
        from wavecast.server.engines.testing.musicgen import (
            build_random_musicgen,
            build_tiny_musicgen,
        )

        model = build_tiny_musicgen() if name == "encodec" else build_random_musicgen("small")
        music = model.compression_model.to(device)
        for_serving(music.decoder)
        return music, lambda codes: music.decode(codes, None)
    from wavecast.server.engines.higgs.loading import load_higgs
    from wavecast.server.engines.testing.higgs import build_random_higgs_codec

    speech = (
        load_higgs("tiny-higgs", None, device).codec
        if name == "dac"
        else build_random_higgs_codec(device)
    )
    for_serving(speech.acoustic_decoder)
    return speech, lambda codes: speech.decode(codes).audio_values


def least(call: Callable[[], object], runs: int, device: str) -> float:
    return timed(call, runs, device)[1]


def timed(call: Callable[[], object], runs: int, device: str) -> tuple[float, float]:
    """The first call's seconds (a shape's first: the convolution library
    prepares it), and the least of ``runs`` more."""
    times = []
    for _ in range(runs + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times[0], min(times[1:])


def describe(op: Any, x: torch.Tensor) -> str:
    """A layer as a row of ``--layers``: its kind, weights' shape and input."""
    kind = type(op).__name__.lstrip("_")
    module = getattr(op, "conv", None) or getattr(op, "lstm", None) or getattr(op, "fn", None)
    if module is not None and kind == "Pointwise":
        kind = type(module).__name__
    weight = getattr(module, "weight", None)
    shape = "" if weight is None else " " + "x".join(str(n) for n in weight.shape)
    return f"{kind}{shape} on {'x'.join(str(n) for n in x.shape)}"


def layer_times(inc: Any, call: Callable[[], object], runs: int) -> list[tuple[str, int, float]]:
    """Seconds of one ``call`` in each kind of layer (summed over the layers of
    one description, and how many there are; the least of ``runs`` calls each),
    and the rest (residual joins, the embedding), slowest first."""
    spent: dict[str, list[float]] = {}
    count: dict[str, set[int]] = {}  # the layers of each description
    wrapped = []
    for op in inc._ops:  # the chain's layers, in order
        if type(op).__name__ == "_Residual":  # (timed where it runs fused: its layers' time)

            def fused(
                x: torch.Tensor,
                state: Any,
                final: bool = False,
                op: Any = op,
                inner: Any = op.fused,
            ) -> Any:
                began = time.perf_counter()
                y = inner(x, state, final)
                if y is not None:
                    name = f"Residual unit (fused) {describe(op._parts[1], x)[5:]}"
                    spent.setdefault(name, [0.0])[-1] += time.perf_counter() - began
                    count.setdefault(name, set()).add(id(op))
                return y

            op.fused = fused
            wrapped.append(op)
            continue
        if type(op).__name__ == "_Chain":
            continue

        def run(
            x: torch.Tensor,
            state: Any,
            final: bool,
            op: Any = op,
            inner: Any = op.run,
            **given: Any,  # (a convolution's ``activation``, run into its input: its time)
        ) -> Any:
            began = time.perf_counter()
            y = inner(x, state, final, **given)
            name = describe(op, x)
            spent.setdefault(name, [0.0])[-1] += time.perf_counter() - began
            count.setdefault(name, set()).add(id(op))
            return y

        op.run = run
        wrapped.append(op)
    try:
        call()
        totals = []
        for _ in range(runs):
            for times in spent.values():
                times.append(0.0)
            began = time.perf_counter()
            call()
            totals.append(time.perf_counter() - began)
    finally:
        for op in wrapped:
            del op.__dict__["fused" if type(op).__name__ == "_Residual" else "run"]
    rows = sorted(
        ((name, len(count[name]), min(times[1:])) for name, times in spent.items()),
        key=lambda r: -r[2],
    )
    rest = min(totals) - sum(t for _, _, t in rows)
    rows.append(("the rest (joins of layer-by-layer residual blocks, the embedding)", 0, rest))
    return rows


def chosen(inc: Any, like: torch.Tensor, args: argparse.Namespace, codebooks: int) -> str:
    """Each convolution's form chosen as the server chooses it at warm-up (for
    the most streams and frames asked for), unless ``--library-forms``; what
    was chosen."""
    if args.library_forms:
        return "every convolution as the library's"
    forms = inc.choose_forms(like, max(args.streams), codebooks, max(args.frames))
    if not (forms.product_one or forms.product_many or forms.kernel_one or forms.kernel_many):
        return "every convolution as the library's (measured)"
    return (
        f"convolutions as matrix products: {forms.product_one} of {forms.layers} "
        f"for one stream, {forms.product_many} for more; by the row kernel: "
        f"{forms.kernel_one} and {forms.kernel_many}; residual units fused: "
        f"{forms.fused_one} and {forms.fused_many} of {forms.units} "
        f"(chosen in {forms.seconds:.1f} s)"
    )


def begin(args: argparse.Namespace, title: str, runs: str) -> torch.Tensor:
    """Set torch (and the C heap, as the server does) up for the runs and print
    the section's heading; a tensor of the device (``like``)."""
    keep_freed_memory()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    print(f"### {title}\n")
    print(f"- machine: {machine(args.device)}, {args.threads} torch thread(s)")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; least of {args.runs} {runs}\n")
    return torch.zeros((), device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=["encodec", "dac"], choices=GEOMETRY)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--frames", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--library-forms",
        action="store_true",
        help="every convolution as the library's kernel, none as a matrix product or by "
        "the row kernel (the server chooses each one's form at warm-up on a CPU: choose_forms)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="the incremental decoder's time by layer instead, for each streams x frames",
    )
    args = parser.parse_args()
    if args.layers:
        layers(args)
        return
    like = begin(args, "codec decode per chunk: windows and incremental", "timings")
    print(
        "| codec | streams x new frames | window | incremental (its shape's first call) "
        "| per frame: both |"
    )
    print("| --- | --- | --- | --- | --- |")
    notes = []
    for name in args.codecs:
        model, decode = build(name, args.device)
        codebooks, card, left, hold = GEOMETRY[name]
        inc = incremental(model)
        assert inc is not None, name
        forms = chosen(inc, like, args, codebooks)
        error = checked(inc, decode, like, codebooks=codebooks, cardinality=card)
        notes.append(
            f"- {name}: incremental vs one-shot decode, largest error over largest "
            f"sample {error:.1e}; lookahead {inc.lookahead} frames; {forms}"
        )
        for streams in args.streams:
            steady = steady_decode(inc, like, streams, codebooks)
            for frames in args.frames:
                new = torch.randint(0, card, (streams, codebooks, frames), device=args.device)
                window = torch.randint(
                    0, card, (streams, codebooks, left + frames + hold), device=args.device
                )
                w = least(partial(decode, window), args.runs, args.device)
                first, i = timed(partial(steady, new), args.runs, args.device)
                per = 1e6 / (streams * frames)
                print(
                    f"| {name} | {streams} x {frames} | {w * 1e3:.2f} ms "
                    f"| {i * 1e3:.2f} ms ({first * 1e3:.2f} ms) "
                    f"| {w * per:.0f} µs, {i * per:.0f} µs |"
                )
    print()
    print("\n".join(notes))


def layers(args: argparse.Namespace) -> None:
    like = begin(args, "codec decode by layer: incremental", "calls per layer")
    for name in args.codecs:
        model, _ = build(name, args.device)
        codebooks, card, _, _ = GEOMETRY[name]
        inc = incremental(model)
        assert inc is not None, name
        print(f"{name}: {chosen(inc, like, args, codebooks)}\n")
        for streams in args.streams:
            steady = steady_decode(inc, like, streams, codebooks)
            for frames in args.frames:
                new = torch.randint(0, card, (streams, codebooks, frames), device=args.device)
                rows = layer_times(inc, partial(steady, new), args.runs)
                total = sum(t for _, _, t in rows)
                print(f"{name}, {streams} streams x {frames} new frames: {total * 1e3:.2f} ms\n")
                print("| layer (weights on input) | layers | ms, all of them | share |")
                print("| --- | --- | --- | --- |")
                for layer, n, t in rows:
                    print(f"| {layer} | {n or ''} | {t * 1e3:.2f} | {t / total:.0%} |")
                print()


if __name__ == "__main__":
    main()
