"""What a HiggsAudio v2 model offers clients: its parameters, ranges and capabilities."""

from __future__ import annotations

from collections.abc import Sequence

from wavecast.protocol import ModelInfo, ParamSpec

from ..base import SEED_SPEC
from .prompt import CHUNK_METHODS
from .utterance import MAX_RAS_WINDOW

__all__ = ["model_card"]


def model_card(
    *,
    name: str,
    test_model: bool,
    sample_rate: int,
    frame_rate: float,
    codebooks: int,
    card: int,
    max_new_tokens: int,
    max_duration: float,
    voices: Sequence[str],
    scenes: Sequence[str],
    device: str = "",
    dtype: str = "",
) -> ModelInfo:
    """The model's ``ModelInfo`` (the greeting's entry).

    Args:
        frame_rate: Audio frames a second (a decoding step makes one).
        codebooks: Codebooks per frame (the delay pattern's first rows make none).
        card: Codebook size (``top_k``'s range).
        max_new_tokens: Largest ``max_new_tokens`` a request may ask for.
        voices, scenes: The names configured.
        device, dtype: Where it runs, and its generator's format.
    """
    default_scene = "quiet_indoor" if "quiet_indoor" in scenes else ""
    scene_names = ", ".join(scenes) or "none configured"
    params = (
        ParamSpec(
            "voice",
            "str",
            "",
            description="named voice (GET /v1/voices); for dialogue one per speaker, "
            "comma-separated: SPEAKER0,SPEAKER1 (empty: the model picks)",
        ),
        ParamSpec(
            "reference_text",
            "str",
            "",
            description="transcript of inputs.reference (better cloning when given)",
        ),
        ParamSpec(
            "reference_1_text",
            "str",
            "",
            description="transcript of inputs.reference_1 (SPEAKER1's voice)",
        ),
        ParamSpec(
            "scene",
            "str",
            default_scene,
            description=f"scene name ({scene_names}) or a free-text description",
        ),
        ParamSpec("temperature", "float", 0.7, 0.0, 2.0, description="0: greedy"),
        ParamSpec("top_k", "int", 50, 0, card, description="0: all tokens"),
        ParamSpec("top_p", "float", 0.95, 0.0, 1.0, description="nucleus sampling"),
        ParamSpec(
            "max_new_tokens",
            "int",
            min(2048, max_new_tokens),
            1,
            max_new_tokens,
            description=(
                f"decoding steps per chunk at most (a step makes a frame, "
                f"{frame_rate:g} a second, after the first {codebooks - 1})"
            ),
        ),
        SEED_SPEC,
        ParamSpec(
            "ras_win_len",
            "int",
            7,
            0,
            MAX_RAS_WINDOW,
            description="repetition-aware sampling window in frames (0: off)",
        ),
        ParamSpec(
            "ras_win_max_num_repeat",
            "int",
            2,
            1,
            64,
            description="repeats within the window that trigger resampling",
        ),
        ParamSpec(
            "chunk_method",
            "str",
            "none",
            choices=CHUNK_METHODS,
            description="split long texts by speaker turn or by word count",
        ),
        ParamSpec("chunk_max_word_num", "int", 200, 1, 10000, description="word chunks"),
        ParamSpec("chunk_max_num_turns", "int", 1, 1, 100, description="speaker chunks"),
        ParamSpec(
            "generation_chunk_buffer_size",
            "int",
            None,
            1,
            1000,
            description="spoken chunks kept as context (empty: all)",
        ),
    )
    label = "random-weight test model, makes noise" if test_model else "text to speech"
    return ModelInfo(
        name=name,
        family="higgs",
        description=f"HiggsAudio v2 {name} ({label})",
        sample_rate=sample_rate,
        channels=1,
        test_model=test_model,
        max_duration=max_duration,
        params=params,
        capabilities=(
            "tts",
            "voices",
            "reference",
            "scene",
            "dialogue",
            "codes",
            "text_stream",
            "captions",
        ),
        codebooks=codebooks,
        voices=tuple(voices),
        scenes=tuple(scenes),
        device=device,
        dtype=dtype,
    )
