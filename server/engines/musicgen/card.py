"""What a MusicGen model offers clients: its parameters, ranges and capabilities."""

from __future__ import annotations

from wavecast.protocol import ModelInfo, ParamSpec

from ..base import SEED_SPEC

__all__ = ["model_card"]


def model_card(
    *,
    name: str,
    test_model: bool,
    window: float,
    max_duration: float,
    frame_rate: float,
    card: int,
    sample_rate: int,
    channels: int,
    melody: bool,
    mbd: bool,
    device: str = "",
    dtype: str = "",
    codebooks: int | None = None,
) -> ModelInfo:
    """The model's ``ModelInfo`` (the greeting's entry).

    Args:
        window: Seconds of one LM run; beyond it (up to ``max_duration``) long form.
        card: Codebook size (``top_k``'s range).
        codebooks: Codes a timestep has (the ``codes`` sent with the audio).
        melody: A melody model (conditions on a reference's chroma).
        mbd: Multi-Band Diffusion is loaded for it.
        device, dtype: Where it runs, and its language model's format.
    """
    long_form = max_duration > window
    params = [
        ParamSpec(
            "duration",
            "float",
            min(10.0, window),
            0.1,
            max_duration,
            description="seconds of audio to generate (with continuation: in all)",
        ),
        ParamSpec(
            "top_k",
            "int",
            min(250, card),
            0,
            card,
            description="sample among the k most likely tokens (0: all)",
        ),
        ParamSpec(
            "top_p",
            "float",
            0.0,
            0.0,
            1.0,
            description="nucleus sampling threshold (0: use top_k)",
        ),
        ParamSpec(
            "temperature",
            "float",
            1.0,
            0.0,
            10.0,
            description="softmax temperature (0: greedy)",
        ),
        ParamSpec(
            "cfg_coef",
            "float",
            3.0,
            0.0,
            30.0,
            description="classifier-free guidance strength",
        ),
        SEED_SPEC,
        ParamSpec(
            "include_prompt",
            "bool",
            False,
            description="with continuation: stream the prompt's audio too",
        ),
    ]
    if mbd:
        params.append(
            ParamSpec(
                "mbd",
                "bool",
                False,
                description="also render a Multi-Band Diffusion version (higher quality, "
                "sent when generation ends)",
            )
        )
    capabilities = ["text", "continuation"]
    if long_form:
        stride = min(18.0, round(window * 0.6, 3))
        params.append(
            ParamSpec(
                "extend_stride",
                "float",
                stride,
                round(window * 0.1, 3),
                round(window - 1.0 / frame_rate, 3),
                description="long form: seconds each new window moves on by",
            )
        )
        capabilities.append("long_form")
    if melody:
        capabilities.insert(1, "melody")
    if channels == 2:
        capabilities.append("stereo")
    if mbd:
        capabilities.append("mbd")
    capabilities.append("codes")  # (its streams are picked up from their codes)
    label = (
        "random-weight test model, makes noise"
        if test_model
        else "text and melody to music"
        if melody
        else "text to music"
    )
    return ModelInfo(
        name=name,
        family="musicgen",
        description=f"MusicGen {name} ({label})",
        sample_rate=sample_rate,
        channels=channels,
        test_model=test_model,
        max_duration=max_duration,
        params=tuple(params),
        capabilities=tuple(capabilities),
        device=device,
        dtype=dtype,
        codebooks=codebooks,
    )
