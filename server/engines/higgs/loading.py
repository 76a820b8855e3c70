"""Loading HiggsAudio v2 models by name: a Hugging Face name, a local folder, or a
test model.

A hub name or a folder loads through transformers, with its audio tokenizer
(``audio_tokenizer/`` beside it, or the released one). Test models (``tiny-higgs``,
``random-higgs-3b``) are built by ``engines.testing``: random weights, always
announced as test models. MusicGen models load through audiocraft, in
``musicgen.loading`` (which a server of speech models alone never imports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "CODEC_DIR",
    "DEFAULT_CODEC",
    "TEST_MARKER",
    "HiggsModel",
    "is_higgs_name",
    "load_higgs",
]

DEFAULT_CODEC = "bosonai/higgs-audio-v2-tokenizer"
CODEC_DIR = "audio_tokenizer"
# Marks a saved folder as random weights, so that it is announced as a test model.
TEST_MARKER = "WAVECAST_TEST_MODEL"


# -- HiggsAudio v2 -------------------------------------------------------------------


def is_higgs_name(name: str) -> bool:
    """Whether a ``--model`` value names a HiggsAudio v2 model."""
    from ..testing.higgs import TEST_NAMES

    if name in TEST_NAMES or "higgs-audio" in name.lower():
        return True
    config = Path(name) / "config.json"
    if config.is_file():
        try:
            return '"higgs_audio_v2"' in config.read_text(encoding="utf-8")
        except OSError:
            return False
    return False


@dataclass(frozen=True, slots=True)
class HiggsModel:
    """A loaded generator, its text tokenizer and its audio codec."""

    model: HiggsAudioV2ForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    codec: HiggsAudioV2TokenizerModel
    test_model: bool


def load_higgs(
    name: str, codec_name: str | None, device: str, dtype: torch.dtype | None = None
) -> HiggsModel:
    """Load ``tiny-higgs``, a hub name or a local folder (with ``audio_tokenizer/``).

    Args:
        name: The generation model.
        codec_name: The audio tokenizer; by default ``NAME/audio_tokenizer`` for a
            folder that has one, else the released codec.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: The generator's weights (the codec's stay float32); by default
            bfloat16 on CUDA, float32 on a CPU.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from ..testing import higgs as testing

    if name in testing.TEST_NAMES:
        tiny = (
            testing.build_tiny_higgs(dtype=dtype)
            if name == testing.TINY_HIGGS
            else testing.build_random_higgs(device, dtype)
        )
        model, tokenizer, codec = tiny.model, tiny.tokenizer, tiny.codec
        test_model = True
    else:
        if codec_name is None:
            local = Path(name) / CODEC_DIR
            codec_name = str(local) if local.is_dir() else DEFAULT_CODEC
        model = HiggsAudioV2ForConditionalGeneration.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
        codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_name)
        test_model = (Path(name) / TEST_MARKER).is_file()
    model = model.to(device).eval()
    codec = codec.to(device).eval()
    return HiggsModel(model, tokenizer, codec, test_model)
