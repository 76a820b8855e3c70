"""The generators' number format (``--dtype``).

Each family ships a format per device: on CUDA, HiggsAudio's weights in
bfloat16 and MusicGen's in float16 under autocast (audiocraft's choice); on a
CPU, float32. ``--dtype`` overrides it for the generator (its weights, its
key/value cache, its attention); the codecs always decode in float32, and
sampling always draws from float32 logits.

A CPU with AMX or AVX-512 BF16 multiplies bfloat16 matrices at the cost of
reading them: a 3B generator's step over four requests then costs little more
than over one (bench/RESULTS.md), where in float32 it costs over twice as much.
"""

from __future__ import annotations

import logging

import torch

from ..config import DTYPES
from .base import ModelLoadError

__all__ = ["dtype_name", "model_dtype", "native_bfloat16"]

log = logging.getLogger(__name__)

_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(choice: str, device: str) -> torch.dtype | None:
    """The format ``choice`` (one of ``DTYPES``) names on ``device`` (``cpu``,
    ``cuda[:N]``); None for ``auto``: as the family's loader loads it."""
    if choice == "auto":
        return None
    if choice not in _NAMED:
        raise ModelLoadError(f"--dtype {choice!r}: expected one of {', '.join(DTYPES)}")
    dtype = _NAMED[choice]
    if dtype == torch.bfloat16 and device == "cpu" and not native_bfloat16():
        log.warning(
            "--dtype bfloat16: this CPU has neither AMX nor AVX-512 BF16; its "
            "bfloat16 arithmetic is emulated and slower than float32"
        )
    return dtype


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (oneDNN's own check)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
