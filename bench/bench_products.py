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
place at the output's size). ``--speech``: the speech step's products at the
3B shape too, in bfloat16: the decoder's own operations against the fused
kernels (``PairProduct``: the RMS norm, the product and the rotary positions,
or ``silu(gate) * up``). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from bench_stream import machine
from torch.nn import functional as F

from wavecast.server.engines import fused

SHAPES = {"small": (1024, 4096), "large": (2048, 8192), "medium": (1536, 6144)}
CONFIGS = [
    fused.Config(),
    fused.Config(split=1),
    fused.Config(16, 256, 4, 3),
    fused.Config(16, 512, 4, 3),
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
    norm = fused.Norm.of(ln, ln.weight.device) if p.norm else None
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


# The speech model's decode step at the released 3B shape: width, heads, key/value
# heads, head width, feed-forward width, output rows (8 codebooks of 1,026).
SPEECH = (3072, 24, 8, 128, 8192, 8 * 1026)
SPEECH_PRODUCTS = [
    "norm, q k v, rotary",
    "out, residual",
    "norm, gate and up, silu(gate) * up",
    "down, residual",
    "norm, heads",
]


def measure_speech(name: str, rows: int, device: torch.device) -> list[str]:
    """One of the speech step's products in bfloat16 (``SPEECH_PRODUCTS``): the
    decoder's own operations against the fused kernel (default configuration,
    then 128 inputs a pass), and how far apart (units of bfloat16's last
    place at the output's largest)."""
    from types import SimpleNamespace

    from wavecast.server.engines.higgs.decoder import HiggsDecoder

    dim, heads, kv_heads, d, inner, out_rows = SPEECH
    bf = torch.bfloat16
    rms = SimpleNamespace(eps=1e-5)
    x = (3 * torch.randn(rows, dim, device=device)).to(bf)
    gain = (torch.rand(dim, device=device) + 0.5).to(bf)
    norm = fused.Norm.rms(gain, 1e-5)
    angles = 6 * torch.rand(rows, d // 2, device=device)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(bf)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(bf)
    n = {0: (heads + 2 * kv_heads) * d, 1: dim, 2: 2 * inner, 3: dim, 4: out_rows}
    k = {0: dim, 1: heads * d, 2: dim, 3: inner, 4: dim}
    which = SPEECH_PRODUCTS.index(name)
    weight = (torch.randn(n[which], k[which], device=device) / k[which] ** 0.5).to(bf)
    inputs = x if k[which] == dim else torch.randn(rows, k[which], device=device).to(bf)
    library: Callable[[], torch.Tensor]
    ways: list[partial[torch.Tensor]] = []
    if which == 0:

        def library() -> torch.Tensor:
            qkv = torch.mm(HiggsDecoder._rms(rms, x, gain), weight.t()).view(rows, -1, 1, d)
            rotated = qkv[:, : heads + kv_heads]
            HiggsDecoder._rotate(rotated, cos[:, None, None], sin[:, None, None], in_place=True)
            return qkv.view(rows, -1)

        for block_k in (256, 128):
            config = fused.Config(block_k=block_k)
            product = fused.PairProduct(
                weight, norm=norm, head_dim=d, rotated=heads + kv_heads, config=config
            )
            ways.append(partial(product, x, cos, sin))
    elif which == 2:

        def library() -> torch.Tensor:
            gate, up = torch.mm(HiggsDecoder._rms(rms, x, gain), weight.t()).chunk(2, dim=-1)
            return F.silu(gate) * up

        for block_k in (256, 128):
            glu = fused.PairProduct(
                weight, norm=norm, glu=True, config=fused.Config(block_k=block_k)
            )
            ways.append(partial(glu, x))
    elif which == 4:

        def library() -> torch.Tensor:
            return torch.mm(HiggsDecoder._rms(rms, x, gain), weight.t())

        for block_k in (256, 128):
            head = fused.RowProduct(weight, norm=norm, config=fused.Config(block_k=block_k))
            ways.append(partial(head, x))
    else:
        residual = x

        def library() -> torch.Tensor:
            return residual + torch.mm(inputs, weight.t())

        for block_k in (256, 128):
            plain = fused.RowProduct(weight, config=fused.Config(block_k=block_k))
            ways.append(partial(plain, inputs, residual))
    want = library()
    ulp = want.float().abs().max() * 2.0**-7
    apart = max(float((way().float() - want.float()).abs().max() / ulp) for way in ways)
    cells = [f"{graphed_time(library):.1f}"]
    for way in ways:
        product: Any = way.func  # (its inputs a pass, as it fits the shared memory)
        block_k = (
            product.block_k if isinstance(product, fused.PairProduct) else product.config.block_k
        )
        cells.append(f"{graphed_time(way):.1f} ({block_k})")
    return [*cells, f"{apart:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "large"], choices=SHAPES)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 16])
    parser.add_argument(
        "--speech",
        action="store_true",
        help="also the speech step's products at the 3B shape, in bfloat16",
    )
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
        if not args.speech:
            return
        print("\n#### the speech step's products (3B shape, bfloat16)\n")
        columns = "the decoder's | fused (inputs a pass) | the same, 128 asked"
        print(f"| product | rows | {columns} | apart (ulp) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in SPEECH_PRODUCTS:
            for rows in args.rows:
                cells = measure_speech(name, rows, torch.device("cuda"))
                print(f"| {name} | {rows} | {' | '.join(cells)} |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
