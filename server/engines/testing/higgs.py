"""Tiny random-weight HiggsAudio v2 for tests and offline runs.

transformers' native ``HiggsAudioV2ForConditionalGeneration`` (a Llama-style
decoder with a second, audio feed-forward path and an 8-codebook delay-pattern
audio head) and its ``HiggsAudioV2TokenizerModel`` codec (DAC acoustic encoder
and decoder, HuBERT semantic features, residual VQ), at tiny sizes with random
weights, built in-process with no network. The text tokenizer is byte-level
(any language) with the special tokens the HiggsAudio prompt format uses. It
makes noise and is always announced as a test model.

``save_tiny_higgs`` writes the three parts in the layout of the released
checkpoints (a generation model folder with its tokenizer, and a separate codec
folder), so the loading code under test is the one that loads the real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DacConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
    HubertConfig,
    PreTrainedTokenizerFast,
)

from ..higgs.loading import CODEC_DIR, TEST_MARKER

__all__ = [
    "RANDOM_HIGGS_3B",
    "SPECIAL_TOKENS",
    "TEST_NAMES",
    "TINY_HIGGS",
    "TinyHiggs",
    "build_random_higgs",
    "build_random_higgs_codec",
    "build_tiny_higgs",
    "save_tiny_higgs",
]

TINY_HIGGS = "tiny-higgs"
# The released 3B model's shape with random weights: for speed measurements.
RANDOM_HIGGS_3B = "random-higgs-3b"
TEST_NAMES = (TINY_HIGGS, RANDOM_HIGGS_3B)

# The special tokens of the HiggsAudio v2 prompt format (Llama 3 headers plus the
# scene and audio markers; the delay token is a reserved Llama 3 special token).
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
    "<|audio_out_bos|>",
    "<|AUDIO_OUT|>",
    "<|audio_eos|>",
    "<|reserved_special_token_6|>",
    "<|finetune_right_pad_id|>",
)

_CODEC_CODEBOOK = 64
_SEED = 1234


class TinyHiggs:
    """The three parts of a tiny model: generator, text tokenizer, codec."""

    def __init__(
        self,
        model: HiggsAudioV2ForConditionalGeneration,
        tokenizer: PreTrainedTokenizerFast,
        codec: HiggsAudioV2TokenizerModel,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (any script), plus the prompt format's special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )


def _tiny_codec() -> HiggsAudioV2TokenizerModel:
    # The released codec's shape: 24 kHz, hop 960 (25 frames/s), HuBERT features
    # at 16 kHz downsampled to the same 25 Hz; here 4 codebooks of 64 entries.
    ratios = [8, 5, 4, 2, 3]
    acoustic = DacConfig(
        encoder_hidden_size=4,
        decoder_hidden_size=32,
        downsampling_ratios=ratios,
        upsampling_ratios=ratios,
        codebook_size=_CODEC_CODEBOOK,
        n_codebooks=4,
        codebook_dim=8,
    )
    semantic = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
    )
    config = HiggsAudioV2TokenizerConfig(
        acoustic_model_config=acoustic,
        semantic_model_config=semantic,
        codebook_size=_CODEC_CODEBOOK,
        codebook_dim=16,
        # 4 codebooks: 1000 * 0.6 // (25 frames/s * 6 bits)
        target_bandwidths=[0.6],
        sample_rate=24000,
    )
    codec = HiggsAudioV2TokenizerModel(config).eval()
    _random_codebooks(codec, "cpu")
    return codec


def _random_codebooks(codec: HiggsAudioV2TokenizerModel, device: str) -> None:
    """Released codebooks are trained; zero-initialised ones would make silence."""
    gen = torch.Generator(device=device).manual_seed(_SEED)
    with torch.no_grad():
        for layer in codec.quantizer.quantizers:
            codebook = layer.codebook
            codebook.embed.copy_(torch.randn(codebook.embed.shape, generator=gen, device=device))
            codebook.embed_avg.copy_(codebook.embed)
            codebook.cluster_size.fill_(1.0)


def _token_config(tokenizer: PreTrainedTokenizerFast, codec_codebook: int) -> dict[str, int]:
    """The generator config's token ids: the tokenizer's special tokens, and the
    audio head's vocabulary (the codec's plus stream BOS and EOS)."""
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}
    return {
        "pad_token_id": ids["<|finetune_right_pad_id|>"],
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|eot_id|>"],
        "audio_token_id": ids["<|AUDIO_OUT|>"],
        "audio_bos_token_id": ids["<|audio_out_bos|>"],
        "audio_delay_token_id": ids["<|reserved_special_token_6|>"],
        "codebook_size": codec_codebook + 2,
        "audio_stream_bos_id": codec_codebook,
        "audio_stream_eos_id": codec_codebook + 1,
    }


def build_tiny_higgs(
    *, quiet_eos: bool = True, dtype: torch.dtype | None = None, head_dim: int = 16
) -> TinyHiggs:
    """Build the tiny model (deterministic: the same weights every time).

    Args:
        quiet_eos: Make stream EOS rare (see ``_quiet_eos``); without it the
            random head ends most utterances within a second.
        dtype: The generator's format: float32's weights rounded to it (the
            rotary frequencies stay float32, as transformers loads them).
        head_dim: Each attention head's width (32 or more for the fused decode
            step's kernels on CUDA, ``fused``).
    """
    torch.manual_seed(_SEED)
    tokenizer = _byte_tokenizer()
    codec = _tiny_codec()
    config = HiggsAudioV2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=8192,
        # Larger than the default 0.02, so that the context (text, voices, earlier
        # chunks) visibly steers what the random model generates.
        initializer_range=0.08,
        num_codebooks=int(codec.config.num_quantizers),
        **_token_config(tokenizer, _CODEC_CODEBOOK),
    )
    model = HiggsAudioV2ForConditionalGeneration(config).eval()
    if quiet_eos:
        _quiet_eos(model)
    if dtype is not None:
        _cast(model, dtype)
    return TinyHiggs(model, tokenizer, codec)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, but its float32 buffers (the rotary frequencies, which
    a 16-bit copy would shift by radians a thousand positions on) stay float32."""
    kept = [(name, b) for name, b in model.named_buffers() if b.dtype == torch.float32]
    model.to(dtype)
    for name, buffer in kept:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer


def _quiet_eos(model: HiggsAudioV2ForConditionalGeneration, *, pinned: bool = False) -> None:
    """Make stream EOS unlikely, so the test model speaks until ``max_new_tokens``.

    A random head picks EOS about once in ``codebook_size`` draws per codebook,
    which ends most utterances within a second. Every embedding gets a small
    positive first coordinate, which survives to the last norm, and each
    codebook's EOS row a large negative weight on it: EOS falls about 25 logits
    below every other code. Top-k sampling never reaches it, and neither does
    the unfiltered redraw of repetition-aware sampling (about 1e-12 a draw; a
    gap of 4, as a weight of -1 gave, let one utterance in twenty end early).

    ``pinned`` (the released depth): 28 random layers add to that coordinate
    as much as to any other, so what reaches the last norm has a sign and a size
    that depend on the random draw (built on CUDA, the 3B model favoured EOS in
    most codebooks from the first free step). Pinned, no layer writes the
    coordinate (its output projections' row for it is zero), so it reaches the
    last norm as the embedding set it, and the EOS weight on it is large enough
    for any norm of the rest.
    """
    config = model.config
    k, card = int(config.num_codebooks), int(config.codebook_size)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 2.0
        model.model.embed_audio_tokens.embed_audio_tokens.weight[:, 0] = 2.0 / k
        head = model.audio_lm_head.weight.view(k, card, -1)
        head[:, int(config.audio_stream_eos_id), 0] = -1024.0 if pinned else -8.0
        if pinned:
            for name, module in model.model.layers.named_modules():
                if name.endswith(("o_proj", "down_proj")):  # what writes the residual
                    module.weight[0] = 0.0


def save_tiny_higgs(tiny: TinyHiggs, folder: Path) -> tuple[Path, Path]:
    """Write ``folder/`` (model and tokenizer) and ``folder/audio_tokenizer/``.

    Returns:
        The model folder and the codec folder, as ``--model`` and
        ``--higgs-codec`` take them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    codec_dir = folder / CODEC_DIR
    tiny.codec.save_pretrained(codec_dir)
    (folder / TEST_MARKER).write_text("random weights: this model makes noise\n")
    return folder, codec_dir


def build_random_higgs(device: str, dtype: torch.dtype | None = None) -> TinyHiggs:
    """HiggsAudio v2 at the released shapes (the 3B generator: 28 layers of 3072
    with the dual audio FFN, 8 codebooks of 1024; the codec: DAC 64/1024 with
    HuBERT-base semantic features), random weights, built on ``device``.

    The byte-level tokenizer stands in for Llama 3's; the embedding keeps the
    released vocabulary size, so every matrix has its real shape. The generator
    is built in ``dtype`` (by default bfloat16 on CUDA, float32 on a CPU).
    """
    torch.manual_seed(_SEED)
    tokenizer = _byte_tokenizer()
    with torch.device(device):
        codec = build_random_higgs_codec(device)
    config = HiggsAudioV2Config(
        max_position_embeddings=8192,
        num_codebooks=int(codec.config.num_quantizers),
        **_token_config(tokenizer, 1024),
    )
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its format: no float32 copy of 3B first
    try:
        with torch.device(device):
            model = HiggsAudioV2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    _quiet_eos(model, pinned=True)
    return TinyHiggs(model, tokenizer, codec)


def build_random_higgs_codec(device: str = "cpu") -> HiggsAudioV2TokenizerModel:
    """The released audio tokenizer's shapes (DAC 64/1024, HuBERT-base semantic
    features, 8 codebooks of 1024 at 25 frames a second), random weights."""
    ratios = [8, 5, 4, 2, 3]
    codec_config = HiggsAudioV2TokenizerConfig(
        acoustic_model_config=DacConfig(
            encoder_hidden_size=64,
            decoder_hidden_size=1024,
            downsampling_ratios=ratios,
            upsampling_ratios=ratios,
            codebook_size=1024,
        ),
        semantic_model_config=HubertConfig(mask_time_prob=0.0),
        codebook_size=1024,
        codebook_dim=64,
        target_bandwidths=[0.5, 1, 1.5, 2],  # 8 codebooks at 25 frames a second
        sample_rate=24000,
    )
    with torch.device(device):
        codec = HiggsAudioV2TokenizerModel(codec_config).eval()
        _random_codebooks(codec, device)
    return codec
