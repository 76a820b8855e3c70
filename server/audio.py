"""PCM conversion of float audio (PROTOCOL.md §4.5)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["to_pcm"]


def to_pcm(audio: npt.NDArray[np.float32], fmt: str) -> bytes:
    """Interleave ``[frames, channels]`` float audio into little-endian PCM bytes."""
    if fmt == "pcm_f32le":
        return np.ascontiguousarray(audio, dtype="<f4").tobytes()
    if fmt == "pcm_s16le":
        scaled = np.rint(np.clip(audio, -1.0, 1.0) * 32767.0)
        return np.ascontiguousarray(scaled, dtype="<i2").tobytes()
    raise ValueError(f"unknown PCM format {fmt!r}")
