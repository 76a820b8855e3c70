"""A codec decoder's convolutions on a CPU: the library's, the matrix product, the row kernel's.

Each layer as the incremental codec runs it (``codec_incremental``'s ``_Conv``
and ``_ConvTranspose``, from an ``nn.Conv1d`` or ``nn.ConvTranspose1d`` of the
shape, random weights) on the input a call of ``B`` streams' ``n`` new frames
gives it, three ways taking turns: the convolution library's kernel
(``direct``), one matrix product over shifted copies of the input
(``product``) and the row kernel's convolution (``by_kernel``), the forms
``IncrementalCodec.choose_forms`` races at warm-up. The shapes are the tiny
EnCodec's (the test models') and the released 32 kHz EnCodec's (MusicGen's:
64 filters, upsampling 8, 5, 4, 4) at 640 samples a frame. Also each way's
largest difference from a float64 convolution.

    .venv/bin/python bench/bench_conv.py
    .venv/bin/python bench/bench_conv.py --streams 1 8 --frames 25
    .venv/bin/python bench/bench_conv.py --builds

``--builds``: where the CPU has AVX-512 (the server then runs the row kernel's
wide build, whose codec calls hold sixteen samples a vector where the plain
build's hold eight), the codec calls of the test models' eight-stream steps
(``BUILD_CALLS``: the tiny DAC's residual units, the tiny EnCodec's residual
blocks and transposed convolutions, as the engines call them) by each build,
taking turns, and whether the two give the same bits.

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from bench_rows import in_turns, kernel_section
from torch import nn

from wavecast.server.engines import rowkernel
from wavecast.server.engines.codec_incremental import _Conv, _ConvTranspose, _Formed

# (codec, "conv" or "transposed", outputs, inputs, taps, dilation or stride,
# input samples a frame)
SHAPES: list[tuple[str, str, int, int, int, int, int]] = [
    ("tiny EnCodec", "conv", 1, 4, 7, 1, 640),
    ("tiny EnCodec", "conv", 2, 4, 3, 1, 640),
    ("tiny EnCodec", "conv", 4, 2, 1, 1, 640),
    ("tiny EnCodec", "conv", 4, 8, 3, 1, 160),
    ("tiny EnCodec", "conv", 8, 16, 3, 1, 40),
    ("tiny EnCodec", "transposed", 4, 8, 8, 4, 160),
    ("tiny EnCodec", "transposed", 8, 16, 8, 4, 40),
    ("tiny EnCodec", "transposed", 16, 32, 10, 5, 8),
    ("EnCodec 32 kHz", "conv", 1, 64, 7, 1, 640),
    ("EnCodec 32 kHz", "conv", 32, 64, 3, 1, 640),
    ("EnCodec 32 kHz", "conv", 64, 32, 1, 1, 640),
    ("EnCodec 32 kHz", "transposed", 64, 128, 8, 4, 160),
]


# The calls of the test models' steps with eight streams (their shapes as the
# engines made them: eight chunks a call): (codec, "unit" or "transposed",
# streams, channels in, samples, channels out or inside, taps, dilation or
# phases, ELU).
BUILD_CALLS: list[tuple[str, str, int, int, int, int, int, int, bool]] = [
    ("tiny DAC", "unit", 8, 1, 30720, 1, 7, 9, False),
    ("tiny DAC", "unit", 8, 2, 10240, 2, 7, 3, False),
    ("tiny DAC", "unit", 8, 4, 5120, 4, 7, 1, False),
    ("tiny DAC", "unit", 8, 8, 1280, 8, 7, 3, False),
    ("tiny DAC", "unit", 8, 16, 256, 16, 7, 9, False),
    ("tiny DAC", "transposed", 8, 2, 10242, 3, 2, 3, False),
    ("tiny DAC", "transposed", 8, 4, 5122, 4, 2, 2, False),
    ("tiny DAC", "transposed", 8, 8, 1282, 16, 2, 4, False),
    ("tiny DAC", "transposed", 8, 16, 258, 40, 2, 5, False),
    ("tiny EnCodec", "unit", 8, 4, 25600, 2, 3, 1, True),
    ("tiny EnCodec", "unit", 8, 8, 6400, 4, 3, 1, True),
    ("tiny EnCodec", "unit", 8, 16, 1600, 8, 3, 1, True),
    ("tiny EnCodec", "unit", 8, 32, 320, 16, 3, 1, True),
    ("tiny EnCodec", "transposed", 8, 8, 6402, 16, 2, 4, False),
    ("tiny EnCodec", "transposed", 8, 16, 1602, 32, 2, 4, False),
    ("tiny EnCodec", "transposed", 8, 32, 322, 80, 2, 5, False),
]


def builds(runs: int, threads: int) -> None:
    """The codec calls of ``BUILD_CALLS`` by the row kernel's plain build and
    by its wide one, in turns; and whether the two give the same bits."""
    kernel_section("the codec's calls by the row kernel's two builds, on a CPU", threads)
    plain, wide = rowkernel.build(wide=False), rowkernel.build(wide=True)
    if isinstance(plain, str) or isinstance(wide, str):
        raise SystemExit(f"both builds are needed: {plain if isinstance(plain, str) else wide}")
    print(f"- date: {time.strftime('%Y-%m-%d')}; least of {runs} calls, the builds in turns")
    print("- ms a call\n")
    print(
        "| codec | call | plain build (8 lanes) | wide build (16 lanes) | wide / plain "
        "| same bits |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for codec, kind, streams, inputs, n, outputs, taps, step, elu in BUILD_CALLS:
        x = torch.randn(streams, inputs, n, generator=generator)
        if kind == "unit":
            span = (taps - 1) * step
            units = []
            for width, into, out in ((taps, inputs, outputs), (1, outputs, inputs)):
                alpha = torch.rand(into, generator=generator) * 3 + 0.05
                if elu:
                    alpha = torch.full((into,), float(alpha[0]))
                weight = torch.randn(out, into, width, generator=generator)
                reach = step if width > 1 else 1
                inverse = (alpha + 1e-9).reciprocal()
                bias = torch.randn(out, generator=generator)
                units.append(rowkernel.Unit(alpha, inverse, weight, bias, reach, elu))
            buffer = torch.randn(streams, inputs, span, generator=generator)
            waiting = torch.randn(streams, inputs, 3 * step, generator=generator)
            calls = [partial(k.residual_unit, x, buffer, waiting, *units) for k in (plain, wide)]
            what = (
                f"residual unit, {inputs} -> {outputs} -> {inputs}, {taps} taps, "
                f"dilation {step}, {'ELU' if elu else 'Snake'}, {streams} x {n} samples"
            )
        else:
            weight = torch.randn(outputs, inputs, taps, generator=generator)
            bias = torch.randn(outputs, generator=generator)
            calls = [partial(k.conv_prepared, x, weight, bias, 1, step) for k in (plain, wide)]
            what = (
                f"transposed, {inputs} -> {outputs // step} in {step} phases, "
                f"{streams} x {n} samples"
            )
        results = [call() for call in calls]
        flat = [
            r if isinstance(r, torch.Tensor) else torch.cat([t.flatten() for t in r])
            for r in results
        ]
        same = torch.equal(flat[0], flat[1])
        times = in_turns(calls, runs)
        print(
            f"| {codec} | {what} | {times[0]:.3f} | {times[1]:.3f} | "
            f"{times[1] / times[0]:.2f} | {'yes' if same else 'NO'} |",
            flush=True,
        )


def layer(kind: str, outputs: int, inputs: int, taps: int, step: int) -> _Formed:
    """The incremental codec's layer of the shape, random weights."""
    op: _Formed
    if kind == "conv":
        conv = nn.Conv1d(inputs, outputs, taps, dilation=step)
        reach = (taps - 1) * step
        op = _Conv(conv, reach - reach // 2, reach // 2)
    else:
        transposed = nn.ConvTranspose1d(inputs, outputs, taps, stride=step)
        overlap = taps - step
        op = _ConvTranspose(transposed, overlap - overlap // 2, overlap // 2)
    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--frames", type=int, nargs="+", default=[25])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--builds",
        action="store_true",
        help="the test models' codec calls by the row kernel's plain build and its wide one",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.builds:
        builds(args.runs, args.threads)
        return
    kernel = kernel_section("a codec decoder's convolutions, on a CPU", args.threads)
    print(f"- date: {time.strftime('%Y-%m-%d')}; least of {args.runs} calls, the ways in turns")
    print("- ms a call (its largest error against float64, over the largest output)\n")
    print(
        "| codec | layer | streams x frames | library's | matrix product | row kernel "
        "| kernel / library |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(0)
    for codec, kind, outputs, inputs, taps, step, rate in SHAPES:
        op = layer(kind, outputs, inputs, taps, step)
        op.kernel = kernel
        assert op.prepare()
        weight = op.conv.weight.detach()
        bias = op.conv.bias
        what = (
            f"{inputs} -> {outputs}, {taps} taps"
            + (f", dilation {step}" if kind == "conv" and step > 1 else "")
            + (f", stride {step} (transposed)" if kind == "transposed" else "")
        )
        for streams in args.streams:
            for frames in args.frames:
                n = frames * rate + ((taps - 1) * step if kind == "conv" else 0)
                x = torch.randn(streams, inputs, n, generator=generator)
                if kind == "conv":
                    exact = nn.functional.conv1d(
                        x.double(), weight.double(), None, dilation=step
                    ) + (0 if bias is None else bias.double().view(1, -1, 1))
                else:  # (the layer's full output, without the bias)
                    exact = nn.functional.conv_transpose1d(x.double(), weight.double(), stride=step)
                ways = [op.direct, op.product, op.by_kernel]
                scale = float(exact.abs().max())
                errors = [float((way(x).double() - exact).abs().max()) / scale for way in ways]
                times = in_turns([partial(way, x) for way in ways], args.runs)
                cells = [f"{t:.3f} ({e:.0e})" for t, e in zip(times, errors, strict=True)]
                print(
                    f"| {codec} | {what} | {streams} x {frames} | {cells[0]} | {cells[1]} | "
                    f"{cells[2]} | {times[2] / times[0]:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
