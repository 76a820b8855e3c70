"""Tiny random-weight MusicGen for tests and offline runs.

The real architecture (audiocraft's EnCodec with a SEANet autoencoder and RVQ,
the delay-pattern transformer LM with cross-attention on a T5 text encoder), at
tiny sizes and random weights, built in-process with no network. It makes noise
and is always announced as a test model. ``musicgen.loading.save_musicgen`` writes
one in audiocraft's checkpoint layout, which ``musicgen.loading.load_musicgen_dir``
reads.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from audiocraft.models import builders
from audiocraft.models.musicgen import MusicGen
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..musicgen.loading import lm_from_cfg, musicgen_model

__all__ = [
    "RANDOM_MUSICGEN_SCALES",
    "TINY_MUSICGEN",
    "TINY_MUSICGEN_MELODY",
    "TINY_MUSICGEN_STEREO",
    "TINY_NAMES",
    "build_random_musicgen",
    "build_tiny_musicgen",
    "tiny_demucs",
]

TINY_MUSICGEN = "tiny-musicgen"
TINY_MUSICGEN_STEREO = "tiny-musicgen-stereo"
TINY_MUSICGEN_MELODY = "tiny-musicgen-melody"
TINY_NAMES = (TINY_MUSICGEN, TINY_MUSICGEN_STEREO, TINY_MUSICGEN_MELODY)

# Shaped like facebook/musicgen-small's xp.cfg (32 kHz mono EnCodec at 50 Hz,
# 4 codebooks, delay pattern, T5 cross-attention), scaled down.
_TINY_CFG: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "sample_rate": 32000,
    "channels": 1,
    "compression_model": "encodec",
    "encodec": {
        "autoencoder": "seanet",
        "quantizer": "rvq",
        "sample_rate": 32000,
        "channels": 1,
        "causal": False,
        "renormalize": False,
    },
    "seanet": {
        "dimension": 16,
        "channels": 1,
        "causal": False,
        "n_filters": 4,
        "n_residual_layers": 1,
        "ratios": [8, 5, 4, 4],
        "activation": "ELU",
        "activation_params": {"alpha": 1.0},
        "norm": "weight_norm",
        "norm_params": {},
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 7,
        "dilation_base": 2,
        "pad_mode": "constant",
        "true_skip": True,
        "compress": 2,
        "lstm": 2,
        "disable_norm_outer_blocks": 0,
        "decoder": {
            "trim_right_ratio": 1.0,
            "final_activation": None,
            "final_activation_params": None,
        },
        "encoder": {},
    },
    "rvq": {
        "n_q": 4,
        "q_dropout": False,
        "bins": 64,
        "decay": 0.99,
        "kmeans_init": False,
        "kmeans_iters": 50,
        "threshold_ema_dead_code": 2,
        "orthogonal_reg_weight": 0.0,
        "orthogonal_reg_active_codes_only": False,
    },
    "lm_model": "transformer_lm",
    "codebooks_pattern": {
        "modeling": "delay",
        "delay": {"delays": [0, 1, 2, 3], "flatten_first": 0, "empty_initial": 0},
    },
    "transformer_lm": {
        "dim": 32,
        "num_heads": 2,
        "num_layers": 2,
        "hidden_scale": 4,
        "n_q": 4,
        "card": 64,
        "dropout": 0.0,
        "emb_lr": None,
        "activation": "gelu",
        "norm_first": True,
        "bias_ff": False,
        "bias_attn": False,
        "bias_proj": False,
        "past_context": None,
        "causal": True,
        "custom": False,
        "memory_efficient": True,
        "attention_as_float32": False,
        "layer_scale": None,
        "positional_embedding": "sin",
        "xpos": False,
        "checkpointing": "none",
        "weight_init": "gaussian",
        "depthwise_init": "current",
        "zero_bias_init": True,
        "norm": "layer_norm",
        "cross_attention": False,
        "qk_layer_norm": False,
        "qk_layer_norm_cross": False,
        "attention_dropout": None,
        "kv_repeat": 1,
        "two_step_cfg": False,
    },
    "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
    "attribute_dropout": {},
    "dataset": {"segment_duration": 30.0},
    "fuser": {
        "cross_attention_pos_emb": False,
        "cross_attention_pos_emb_scale": 1,
        "sum": [],
        "prepend": [],
        "cross": ["description"],
        "input_interpolate": [],
    },
    # Real checkpoints name a hub T5 here; tiny ones carry theirs in text_encoder/.
    "conditioners": {
        "description": {
            "model": "t5",
            "t5": {"name": "t5-base", "finetune": False, "word_dropout": 0.0},
        }
    },
}

_T5_CONFIG = {
    "vocab_size": 260,
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-style tokenizer over bytes: any text, any language, no download."""
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_demucs() -> Any:
    """HTDemucs (the architecture of ``htdemucs``) at a tiny size, random weights."""
    from demucs.htdemucs import HTDemucs

    return HTDemucs(
        sources=["drums", "bass", "other", "vocals"],
        audio_channels=2,
        channels=4,
        depth=3,  # (the transformer's sequences 4x shorter than at depth 2: 7x faster)
        nfft=512,
        t_layers=1,
        t_heads=2,
        t_hidden_scale=1.0,
        dconv_comp=2,
        samplerate=44100,
        segment=2,
    )


def build_tiny_musicgen(
    seed: int = 0,
    device: str = "cpu",
    *,
    stereo: bool = False,
    melody: bool = False,
    window: float = 30.0,
) -> MusicGen:
    """Build the tiny random-weight MusicGen (same weights for the same seed).

    Args:
        seed: Weight seed.
        device: torch device.
        stereo: Shaped like musicgen-stereo-*: a mono EnCodec applied to each
            channel, 8 interleaved codebooks, delays ``[0, 0, 1, 1, 2, 2, 3, 3]``.
        melody: Shaped like musicgen-melody: the chroma of Demucs' melodic stems
            of a reference clip, prepended to the LM's input.
        window: Longest audio of one LM run (the released models: 30 s); longer
            requests go on in windows.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = OmegaConf.create(_TINY_CFG)
        cfg.device = device
        cfg.dataset.segment_duration = window
        compression = builders.get_compression_model(cfg).eval()
        compression.cfg = copy.deepcopy(cfg)
        if stereo:
            cfg.channels = 2
            cfg.interleave_stereo_codebooks = {"use": True, "per_timestep": False}
            cfg.transformer_lm.n_q = 8
            cfg.codebooks_pattern.delay.delays = [0, 0, 1, 1, 2, 2, 3, 3]
        if melody:
            cfg.conditioners.self_wav = {
                "model": "chroma_stem",
                "chroma_stem": {
                    "sample_rate": 32000,
                    "n_chroma": 12,
                    "radix2_exp": 12,
                    "argmax": True,
                    "match_len_on_eval": True,
                    "eval_wavs": None,
                    "n_eval_wavs": 0,
                    "cache_path": None,
                },
            }
            cfg.fuser.prepend = ["self_wav"]
        t5 = T5EncoderModel(T5Config(**_T5_CONFIG))
        lm = lm_from_cfg(cfg, (t5, _byte_tokenizer()), tiny_demucs() if melody else None)
    name = TINY_MUSICGEN_STEREO if stereo else TINY_MUSICGEN_MELODY if melody else TINY_MUSICGEN
    # MusicGen wraps the compression model for stereo, as lm.cfg asks.
    return musicgen_model(name, compression, lm, window)


# Real MusicGen shapes (facebook/musicgen-small/-medium/-large) for benchmarks:
# LM scale, and T5 (t5-base) and EnCodec 32 kHz at their real sizes.
RANDOM_MUSICGEN_SCALES: dict[str, dict[str, int]] = {
    "small": {"dim": 1024, "num_heads": 16, "num_layers": 24},
    "medium": {"dim": 1536, "num_heads": 24, "num_layers": 48},
    "large": {"dim": 2048, "num_heads": 32, "num_layers": 48},
}
_T5_BASE = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def build_random_musicgen(scale: str, device: str = "cpu", seed: int = 0) -> MusicGen:
    """MusicGen at a real size with random weights (``random-musicgen-small`` etc.).

    For measuring speed where the real weights cannot be downloaded: the work per
    step is the real model's; the sound is noise.
    """
    cfg = OmegaConf.create(_TINY_CFG)
    cfg.device = device
    cfg.seanet.n_filters = 64
    cfg.seanet.dimension = 128
    cfg.rvq.bins = 2048
    cfg.transformer_lm.card = 2048
    for key, value in RANDOM_MUSICGEN_SCALES[scale].items():
        cfg.transformer_lm[key] = value
    t5_cfg = dict(_T5_BASE)
    t5_cfg["vocab_size"] = max(t5_cfg["vocab_size"], 260)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device != "cpu":
            cfg.dtype = "float16"
        compression = builders.get_compression_model(cfg).eval()
        compression.cfg = cfg
        t5 = T5EncoderModel(T5Config(**t5_cfg))
        lm = lm_from_cfg(cfg, (t5, _byte_tokenizer()))
    name = f"random-musicgen-{scale}"
    return MusicGen(name, compression, lm, max_duration=30.0)
