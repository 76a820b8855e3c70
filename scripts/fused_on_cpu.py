"""The fused kernels (``server/engines/fused.py``) checked on a CPU, by Triton's
interpreter (``scripts/fused-on-cpu`` sets it up): each decode step by the fused
kernels against the same step by the library's operations, on the tiny models
in 16 bits, and the split products call after call.

The interpreter sums a tile's products as NumPy's BLAS does. Where the
library's product on this CPU sums in the same order (so it did on a machine
with AVX-512), the speech step (bfloat16, its own roundings) gives the library
step's logits and key/value cache bit for bit; where it does not, a float32
sum may round to the neighbouring bfloat16 (on a machine with AVX2 alone: one
logit of 3,168, by one rounding). Each value is checked to be the library's or
its neighbour, and the count of neighbours printed. MusicGen's step under
float16 autocast is compared within float16's rounding (the library's layer
norm and GELU are not NumPy's): its logits and cache, and its greedy codes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import voiced_prompt

from wavecast.server.engines import fused
from wavecast.server.engines.higgs.decoder import HiggsDecoder
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel
from wavecast.server.engines.musicgen.decoder import MusicGenDecoder
from wavecast.server.engines.musicgen.loading import lm_from_cfg
from wavecast.server.engines.testing import musicgen as tiny_music
from wavecast.server.engines.testing.higgs import build_tiny_higgs


def both_ways(
    decoder: Any, steps: Callable[[], list[torch.Tensor]], *contexts: Callable[[], Any]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` by the library's operations, then by the fused kernels, each
    from the decoder's cache as it is now (inside ``contexts``): each way's
    results stacked, and its cache after."""
    start = (decoder.kv._both.clone(), decoder.lengths.clone())
    fused_layers = decoder._fused
    results = []
    for way in (None, fused_layers):
        decoder.kv._both.copy_(start[0])
        decoder.lengths.copy_(start[1])
        decoder._fused = way
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            results.append((torch.stack(steps()), decoder.kv._both.clone()))
    return results


def on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """``fused.available`` on a CPU too (the interpreter runs the kernels)."""
    return fused.ENABLED and dtype in (torch.float16, torch.bfloat16)


def split_products() -> None:
    """Split products: near the float32 product, the same bits call after call,
    and each row's the same alone; their counters back at zero."""
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for rows, n, k in [(2, 64, 2048), (20, 48, 4096)]:
            weight = (torch.randn(n, k) / k**0.5).to(dtype)
            product = fused.RowProduct(weight)
            assert product.config.split > 1 and product.count is not None
            x = torch.randn(rows, k).to(dtype)
            stream = torch.randn(rows, n)  # a float32 residual stream
            got = product(x, stream)
            want = stream + (x.float() @ weight.float().t()).to(dtype).float()
            assert float((got - want).abs().max()) <= 2.0**-6 * float(want.abs().max())
            assert torch.equal(product(x, stream), got)
            assert torch.equal(product(x[1:2], stream[1:2]), got[1:2])
            assert int(product.count.count_nonzero()) == 0
    print("split products: as the library's, the same call after call")


def speech_step() -> None:
    """The tiny speech model (heads of 32) in bfloat16: six steps of four rows
    (two sitting out, one every other step) by either way, from the same
    prefilled cache: the same logits and cache, bit for bit."""
    tiny = build_tiny_higgs(dtype=torch.bfloat16, head_dim=32)
    loaded = HiggsModel(tiny.model.eval(), tiny.tokenizer, tiny.codec.eval(), True)
    model, k, bos = loaded.model, int(loaded.model.config.num_codebooks), 64
    ids, audio, frames = voiced_prompt(HiggsEngine(loaded, name="tiny-higgs"), k, bos)
    decoder = HiggsDecoder(model, rows=4, length=512)
    assert decoder._fused is not None
    tokens = ids[0].numpy()
    config = model.config
    is_audio = (tokens == config.audio_token_id) | (tokens == config.audio_delay_token_id)
    with torch.no_grad():
        for row in (1, 2):
            decoder.prefill([row], ids, audio[0], is_audio[None], 0)

    def steps() -> list[torch.Tensor]:
        logits = []
        for step, frame in enumerate(frames[:6]):
            generator = torch.Generator().manual_seed(step)
            codes = torch.randint(0, bos, (4, k), generator=generator)
            codes[1] = frame
            active = torch.tensor([False, True, step % 2 == 0, False])
            logits.append(decoder.decode(codes, active, span=len(tokens) + 16)[1:3])
        return logits

    results = both_ways(decoder, steps, torch.no_grad)
    (library, library_cache), (ours, our_cache) = results
    apart = [neighbours(ours, library), neighbours(our_cache, library_cache)]
    if apart == [0, 0]:
        print("speech step: the library step's logits and cache, bit for bit")
        return
    print(
        f"speech step: the library step's logits and cache but {apart[0]} of "
        f"{library.numel()} logits and {apart[1]} of {library_cache.numel()} cached "
        "values, each one bfloat16 rounding apart (the float32 sums' order: this "
        "CPU's BLAS is not NumPy's)"
    )


def neighbours(ours: torch.Tensor, library: torch.Tensor) -> int:
    """How many of ``ours`` (bfloat16) are not ``library``'s: each of those must
    be one rounding from it (the next bfloat16 up or down)."""
    assert ours.dtype == library.dtype == torch.bfloat16 and ours.shape == library.shape
    differ = ours != library
    # Same-signed bfloat16 values in order are consecutive integers as int16.
    a, b = ours[differ], library[differ]
    steps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    assert bool(((a > 0) == (b > 0)).all() and (steps == 1).all()), (a, b)
    return int(differ.sum())


def music_step() -> None:
    """The tiny MusicGen built as on CUDA (float16 layers, float32 heads and
    embeddings) under float16 autocast: six steps of four rows by either way,
    from the same conditions."""
    cfg = OmegaConf.create(tiny_music._TINY_CFG)
    cfg.dtype, cfg.device = "float16", "cpu"
    text = (T5EncoderModel(T5Config(**tiny_music._T5_CONFIG)), tiny_music._byte_tokenizer())
    lm = lm_from_cfg(cfg, text)
    with torch.no_grad():
        decoder = MusicGenDecoder(lm, rows=4, length=64, cross_length=8, dtype=torch.float16)
        assert decoder._fused is not None
        with torch.autocast("cpu", dtype=torch.float16):
            decoder.set_conditions([0, 1, 2, 3], torch.randn(4, 5, decoder.dim), [5, 3, 2, 1])

    def steps() -> list[torch.Tensor]:
        logits = []
        generator = torch.Generator().manual_seed(1)
        for step in range(6):
            codes = torch.randint(0, decoder.card, (4, decoder.codebooks), generator=generator)
            active = torch.tensor([True, True, step % 2 == 0, True])
            logits.append(decoder.decode(codes, active, span=16).float())
        return logits

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.float16)

    (library, library_cache), (ours, our_cache) = both_ways(decoder, steps, torch.no_grad, autocast)
    apart = float((ours - library).abs().max() / library.abs().max())
    assert apart <= 2e-3, apart
    assert torch.equal(ours.argmax(-1), library.argmax(-1))
    cache = float((our_cache - library_cache).abs().max() / library_cache.abs().max())
    assert cache <= 2e-3, cache
    print(
        f"music step: within {apart:.1e} of the library step's logits ({cache:.1e} its "
        "cache's), the same greedy codes"
    )


def main() -> None:
    fused.ENABLED = True
    fused.available = on_cpu  # type: ignore[assignment]
    split_products()
    speech_step()
    music_step()


if __name__ == "__main__":
    main()
