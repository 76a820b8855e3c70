"""A voice reference's codes, computed a part at a time.

An uploaded voice (up to ``--max-upload-seconds``) is encoded by the speech
model's audio tokenizer: HuBERT's features of the clip (its convolutions, then
each transformer layer over the whole clip), the acoustic DAC encoder's blocks,
then the quantizer. Run as one call on the inference thread, a minute's clip
held every running stream for the whole of it (680 ms on this project's CPU
machines with the tiny test model). ``encode_in_pieces`` runs the same
operations in the same order, one part at a time (a convolution, a layer, an
activation), yielding between parts, so that the scheduler steps the running
streams in between (``prepare_steps``). Its codes are the tokenizer's
``encode``'s, bit for bit (the same operations on the same tensors).

Where the tokenizer is not laid out as this expects (another semantic model or
acoustic encoder), it is encoded in one part, by its own ``encode``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["encode_in_pieces", "parts_of"]

Pieces = Generator[None, None, torch.Tensor]


def encode_in_pieces(codec: Any, audio: torch.Tensor) -> Pieces:
    """``codec.encode(audio).audio_codes`` (``[1, K, n]``), yielding between
    parts. ``audio``: ``[1, 1, samples]`` at the codec's rate."""
    if not _laid_out_as_expected(codec):
        codes: torch.Tensor = codec.encode(audio).audio_codes
        return codes
    config = codec.config
    semantic = yield from _semantic_features(codec, audio)
    e_semantic = codec.encoder_semantic.conv(semantic.transpose(1, 2))
    for block in codec.encoder_semantic.conv_blocks:
        yield
        e_semantic = block(e_semantic)
    yield
    acoustic = codec.acoustic_encoder
    # As the tokenizer: padded where the acoustic frames would not match the semantic ones.
    if codec._get_conv1d_output_lengths(audio.shape[2], acoustic) != e_semantic.shape[2]:
        x = acoustic.conv1(F.pad(audio, (codec.pad, codec.pad)))
    else:
        x = acoustic.conv1(audio)
    for block in acoustic.block:
        for unit in (block.res_unit1, block.res_unit2, block.res_unit3):
            x = yield from _residual_unit(unit, x)
        yield
        x = block.snake1(x)
        yield
        x = block.conv1(x)
    yield
    x = acoustic.conv2(acoustic.snake1(x))
    embeddings = torch.cat([x.to(e_semantic.device), e_semantic], dim=1)
    embeddings = codec.fc(embeddings.transpose(1, 2)).transpose(1, 2)
    codes = codec.quantizer.encode(embeddings, config.target_bandwidths[-1])
    return codes.transpose(0, 1)


def parts_of(codec: Any) -> int:
    """The pauses ``encode_in_pieces`` makes with ``codec`` (whatever the clip's
    length: one a layer), a measure of its progress."""
    if not _laid_out_as_expected(codec):
        return 0
    hubert = codec.semantic_model
    semantic = len(hubert.feature_extractor.conv_layers) + len(hubert.encoder.layers) + 2
    blocks = codec.acoustic_encoder.block
    return semantic + len(codec.encoder_semantic.conv_blocks) + 1 + 14 * len(blocks) + 1


def _residual_unit(unit: Any, hidden: torch.Tensor) -> Pieces:
    """DAC's residual unit (``DacResidualUnit.forward``), an operation a part: at
    the clip's full rate each is a large part of the encoder's work."""
    yield
    out = unit.snake1(hidden)
    yield
    out = unit.conv1(out)
    yield
    out = unit.snake2(out)
    yield
    out = unit.conv2(out)
    padding = (hidden.shape[-1] - out.shape[-1]) // 2
    if padding > 0:
        hidden = hidden[..., padding:-padding]
    return hidden + out


def _semantic_features(codec: Any, audio: torch.Tensor) -> Pieces:
    """The tokenizer's ``_extract_semantic_features``: HuBERT's hidden states
    (the input of its first layer and each layer's output), averaged, at the
    codec's frame rate; a convolution or a layer a part."""
    from transformers.masking_utils import create_bidirectional_mask

    config = codec.config
    values = audio
    if config.sample_rate != config.semantic_sample_rate:
        import torchaudio.functional as AF

        values = AF.resample(values, config.sample_rate, config.semantic_sample_rate)
    values = F.pad(values[:, 0, :], (160, 160))
    hubert = codec.semantic_model
    hidden = values[:, None]
    for conv in hubert.feature_extractor.conv_layers:
        yield
        hidden = conv(hidden)
    yield
    hidden = hubert.feature_projection(hidden.transpose(1, 2))
    hidden = hubert._mask_hidden_states(hidden)
    encoder = hubert.encoder
    mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=None
    )
    hidden = hidden + encoder.pos_conv_embed(hidden).to(hidden.device)
    if not hubert.config.do_stable_layer_norm:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    states = [hidden]
    for layer in encoder.layers:
        yield
        out = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    yield
    features = torch.stack([state.to(values.device) for state in states], dim=1).mean(dim=1)
    if config.semantic_downsample_factor > 1:
        features = features[:, :: config.semantic_downsample_factor, :]
    return features


def _laid_out_as_expected(codec: Any) -> bool:
    """Whether the tokenizer has the parts ``encode_in_pieces`` runs, in eval mode
    (HuBERT's layer drop and masking are training's)."""
    hubert: Any = getattr(codec, "semantic_model", None)
    acoustic: Any = getattr(codec, "acoustic_encoder", None)
    semantic: Any = getattr(codec, "encoder_semantic", None)
    try:
        parts_there = (
            type(hubert).__name__ == "HubertModel"
            and len(hubert.feature_extractor.conv_layers) > 0
            and hasattr(hubert.encoder, "pos_conv_embed")
            and all(hasattr(semantic, name) for name in ("conv", "conv_blocks"))
            and all(hasattr(acoustic, name) for name in ("conv1", "block", "snake1", "conv2"))
            and all(
                hasattr(block, name)
                for block in acoustic.block
                for name in ("res_unit1", "res_unit2", "res_unit3", "snake1", "conv1")
            )
            and all(
                hasattr(unit, name)
                for block in acoustic.block
                for unit in (block.res_unit1, block.res_unit2, block.res_unit3)
                for name in ("snake1", "conv1", "snake2", "conv2")
            )
        )
    except AttributeError:
        return False
    return bool(parts_there) and not codec.training and not hubert.training
