"""A decode step's products of a few rows: the library's operations against the
fused kernel (``fused.RowProduct``), each recorded as a CUDA graph.

    python3 bench/bench_products.py --shapes small large --rows 2 16

For each product of a MusicGen layer at the released sizes (small: 1024 wide,
4096 in its feed-forward; large: 2048 and 8192), in float16: the operations the
step launches for it (layer norm in float32, the cast, the product, GELU, the
residual sum, as the model has them) and the one fused kernel, with each of a
few launch configurations. A CUDA graph of 50 calls is recorded and replayed, so
the times are the kernels' own (as in a recorded step), not their launches. With
how far the fused result is from the library's (in units of float16's last
place at the output's size). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from bench_stream import machine
from torch.nn import functional as F

from wavecast.server.engines import fused

SHAPES = {"small": (1024, 4096), "large": (2048, 8192), "medium": (1536, 6144)}
CONFIGS = [
    fused.Config(),
    fused.Config(split=1),
    fused.Config(16, 256, 4, 3),
    fused.Config(32, 512, 4, 3),
    fused.Config(64, 256, 8, 3),
]
CALLS = 50


class Product(NamedTuple):
    name: str
    n: int
    k: int
    norm: bool
    gelu: bool
    residual: bool


def products(dim: int, ff: int) -> list[Product]:
    return [
        Product("norm, q k v", 3 * dim, dim, True, False, False),
        Product("out, residual", dim, dim, False, False, True),
        Product("norm, cross q", dim, dim, True, False, False),
        Product("norm, ff1, GELU", ff, dim, True, True, False),
        Product("ff2, residual", dim, ff, False, False, True),
        Product("norm, heads (4 x 2048)", 4 * 2048, dim, True, False, False),
    ]


def graphed_time(call: Callable[[], torch.Tensor]) -> float:
    """µs a call, from a CUDA graph of CALLS calls replayed (median of 5)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / (10 * CALLS) * 1e6)
    return statistics.median(times)


def measure(p: Product, rows: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The library's time, each configuration's, and how far apart they are."""
    weight = (torch.randn(p.n, p.k, device=device) / p.k**0.5).to(dtype)
    ln = torch.nn.LayerNorm(p.k, device=device)
    ln.weight.normal_()
    ln.bias.normal_()
    norm = fused.Norm.of(ln) if p.norm else None
    x = torch.randn(rows, p.k, device=device).to(dtype)
    residual = torch.randn(rows, p.n, device=device).to(dtype) if p.residual else None

    def library() -> torch.Tensor:
        h = x
        if norm is not None:
            h = F.layer_norm(h.float(), (p.k,), norm.weight, norm.bias, norm.eps).to(dtype)
        y = torch.mm(h, weight.t())
        if p.gelu:
            y = F.gelu(y)
        return y if residual is None else residual + y

    want = library()
    ulp = want.float().abs().max() * 2.0**-10
    cells = [f"{graphed_time(library):.1f}"]
    apart = 0.0
    for config in CONFIGS:
        product = fused.RowProduct(weight, norm=norm, gelu=p.gelu, config=config)
        got = product(x, residual)
        apart = max(apart, float((got.float() - want.float()).abs().max() / ulp))
        cells.append(f"{graphed_time(partial(product, x, residual)):.1f}")
    return [*cells, f"{apart:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "large"], choices=SHAPES)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 16])
    args = parser.parse_args()
    if not torch.cuda.is_available() or fused.kernels() is None:
        sys.exit("needs CUDA and Triton")
    print("### a step's products: the library's operations against one fused kernel\n")
    print(f"- machine: {machine('cuda')}")
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; float16; µs a call, {CALLS} calls a CUDA graph")
    heads = " | ".join(
        f"{c.block_n}x{c.block_k} w{c.warps} s{c.stages} {f'p{c.split}' if c.split else 'p-'}"
        for c in CONFIGS
    )
    print(
        "- fused configurations: outputs x inputs a pass, warps, stages, parts "
        f"(p-: `split_for`'s; the first is the default): {heads}\n"
    )
    print(f"| shape | product | rows | library | {heads} | apart (ulp) |")
    print("| --- | --- | --- | --- |" + " --- |" * len(CONFIGS) + " --- |")
    torch.manual_seed(0)
    with torch.no_grad():
        for shape in args.shapes:
            for p in products(*SHAPES[shape]):
                for rows in args.rows:
                    cells = measure(p, rows, torch.device("cuda"), torch.float16)
                    print(f"| {shape} | {p.name} | {rows} | {' | '.join(cells)} |")
                    sys.stdout.flush()


if __name__ == "__main__":
    main()
