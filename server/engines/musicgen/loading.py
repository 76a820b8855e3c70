"""Loading MusicGen models by name: a Hugging Face name, a local folder, or a test
model.

``facebook/musicgen-*`` loads through audiocraft; a local checkpoint folder in
audiocraft's layout (``state_dict.bin`` and ``compression_state_dict.bin``, each
with ``xp.cfg`` and ``best_state``) too, and a ``text_encoder/`` folder beside
them, when present, supplies T5 instead of the hub (``save_musicgen`` writes that
layout). Test models (``tiny-musicgen``, ``random-musicgen-large``, ...) are built
by ``engines.testing``: random weights, always announced as test models.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from audiocraft.models import builders
from audiocraft.models.encodec import CompressionModel
from audiocraft.models.lm import LMModel
from audiocraft.models.musicgen import MusicGen
from audiocraft.modules.chroma import ChromaExtractor
from audiocraft.modules.conditioners import (
    ChromaStemConditioner,
    T5Conditioner,
    TextConditioner,
    WaveformConditioner,
)
from audiocraft.utils.autocast import TorchAutocast
from omegaconf import OmegaConf
from transformers import (
    PreTrainedTokenizerFast,
    T5EncoderModel,
)

__all__ = [
    "TEXT_ENCODER_DIR",
    "OfflineT5Conditioner",
    "fresh_autocast",
    "lm_from_cfg",
    "load_musicgen",
    "load_musicgen_dir",
    "musicgen_model",
    "save_musicgen",
    "use_dtype",
    "weights_left_unset",
]

TEXT_ENCODER_DIR = "text_encoder"


def load_musicgen(
    name: str, device: str, dtype: torch.dtype | None = None
) -> tuple[MusicGen, bool]:
    """Load a MusicGen model by name, its language model in ``dtype`` (by default
    as audiocraft loads it: float16 on CUDA, float32 on a CPU; ``use_dtype``).

    Args:
        name: ``tiny-musicgen``, ``tiny-musicgen-stereo``, ``tiny-musicgen-melody``,
            ``random-musicgen-{small,medium,large}`` (real
            shapes, random weights: for benchmarks), a local checkpoint directory,
            or a Hugging Face name such as ``facebook/musicgen-small``.
        device: torch device string.
        dtype: The language model's format.

    Returns:
        The model and whether it is a random-weight test model.
    """
    model, test_model = _load_musicgen(name, device)
    if dtype is not None:
        use_dtype(model, dtype)
    return model, test_model


# torch.nn.init's initializers, each of which fills its tensor in place; and the
# helpers they call (a module that imported an initializer by name, as torch's
# MultiheadAttention does, calls it through them).
_INITIALIZERS = (
    "_no_grad_uniform_",
    "_no_grad_normal_",
    "_no_grad_trunc_normal_",
    "_no_grad_fill_",
    "_no_grad_zero_",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


@contextlib.contextmanager
def weights_left_unset() -> Iterator[None]:
    """``torch.nn.init``'s initializers leave their tensors as they are, while a
    model whose every weight is loaded next is built: audiocraft's builders draw
    each weight at random first, which on a CPU took 10-15 s of MusicGen-small's
    load (its language model's 420 million; ``bench/bench_load.py``), and
    several times that for the larger ones; the loads that follow are strict,
    so no weight is left unset. Process-wide while it lasts: the models are
    loaded on one thread, and nothing else makes modules meanwhile."""
    kept = {
        name: getattr(torch.nn.init, name) for name in _INITIALIZERS if hasattr(torch.nn.init, name)
    }

    def unset(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in kept:
            setattr(torch.nn.init, name, unset)
        yield
    finally:
        for name, initializer in kept.items():
            setattr(torch.nn.init, name, initializer)


def _load_musicgen(name: str, device: str) -> tuple[MusicGen, bool]:
    from ..testing import musicgen as testing

    if name in testing.TINY_NAMES:
        stereo, melody = name == testing.TINY_MUSICGEN_STEREO, name == testing.TINY_MUSICGEN_MELODY
        return testing.build_tiny_musicgen(device=device, stereo=stereo, melody=melody), True
    if name.startswith("random-musicgen-") and name[16:] in testing.RANDOM_MUSICGEN_SCALES:
        return testing.build_random_musicgen(name[16:], device=device), True
    path = Path(name).expanduser()
    if path.is_dir():
        model = load_musicgen_dir(path, device=device)
        return model, model.lm.cfg.get("wavecast_test_model", False) is True
    with weights_left_unset():  # (each loader loads its weights strictly)
        return MusicGen.get_pretrained(name, device=device), False


def use_dtype(model: MusicGen, dtype: torch.dtype) -> None:
    """Run ``model``'s language model in ``dtype`` as audiocraft runs it on CUDA
    in float16: its transformer, embeddings and heads hold ``dtype`` weights and
    run under autocast to it; the conditioners keep their weights (autocast runs
    them in ``dtype`` too). float32: no autocast. The codec is left alone."""
    for name, child in model.lm.named_children():
        if name not in ("condition_provider", "fuser"):
            child.to(dtype)
    model.autocast = TorchAutocast(
        enabled=dtype != torch.float32, device_type=model.device.type, dtype=dtype
    )


def fresh_autocast(model: MusicGen) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A new context of ``model``'s autocast at each call. Its own ``model.autocast``
    is one ``torch.autocast`` object, which, entered again before it is left (a
    step that conditions a newcomer), leaves autocast on for good when left."""
    inner = getattr(model.autocast, "autocast", None)  # (None: autocast disabled)
    if inner is None:
        return contextlib.nullcontext
    device, dtype = inner.device, inner.fast_dtype
    return lambda: torch.autocast(device, dtype=dtype)


def _offline_demucs() -> Any:
    # A melody checkpoint saved in this layout holds no Demucs: the test models'.
    from ..testing.musicgen import tiny_demucs

    return tiny_demucs()


class OfflineT5Conditioner(T5Conditioner):  # type: ignore[misc]
    """audiocraft's T5 text conditioner over a T5 encoder given in memory.

    ``T5Conditioner.__init__`` fetches T5 from the hub by name; this builds the
    same module (T5 encoder, output projection, attention mask handling) around
    an encoder and tokenizer that are already loaded.
    """

    def __init__(
        self,
        t5: T5EncoderModel,
        tokenizer: PreTrainedTokenizerFast,
        output_dim: int,
        device: str,
    ) -> None:
        TextConditioner.__init__(self, t5.config.d_model, output_dim)
        self.device = device
        self.name = "offline-t5"
        self.finetune = False
        self.word_dropout = 0.0
        self.autocast = TorchAutocast(enabled=False)
        self.t5_tokenizer = tokenizer
        self.__dict__["t5"] = t5.eval().to(device)
        self.normalize_text = False


class OfflineChromaStemConditioner(ChromaStemConditioner):  # type: ignore[misc]
    """audiocraft's chroma-of-stems melody conditioner over a Demucs given in memory.

    ``ChromaStemConditioner.__init__`` fetches ``htdemucs`` by name; this builds
    the same module (Demucs stem separation, chroma extractor, projection).
    """

    def __init__(
        self,
        demucs: Any,
        output_dim: int,
        sample_rate: int,
        n_chroma: int,
        radix2_exp: int,
        duration: float,
        device: str,
        **kwargs: Any,
    ) -> None:
        WaveformConditioner.__init__(self, dim=n_chroma, output_dim=output_dim, device=device)
        self.autocast = TorchAutocast(
            enabled=device != "cpu", device_type=self.device, dtype=torch.float32
        )
        self.sample_rate = sample_rate
        self.match_len_on_eval = True
        self._use_masking = False
        self.duration = duration
        self.__dict__["demucs"] = demucs.eval().to(device)
        sources: list[str] = demucs.sources
        self.stem_indices = torch.LongTensor([sources.index("vocals"), sources.index("other")]).to(
            device
        )
        self.chroma = ChromaExtractor(
            sample_rate=sample_rate, n_chroma=n_chroma, radix2_exp=radix2_exp, **kwargs
        ).to(device)
        self.chroma_len = self._get_chroma_len()
        self.eval_wavs = None
        self.cache = None


_STAND_IN = {"model": "lut", "lut": {"n_bins": 4, "dim": 4, "tokenizer": "noop"}}


def lm_from_cfg(
    cfg: Any, text_encoder: Path | tuple[T5EncoderModel, Any], demucs: Any = None
) -> LMModel:
    """Build the LM with audiocraft's builder, T5 (and Demucs) given offline."""
    build_cfg = copy.deepcopy(cfg)
    # The builder would fetch T5 (and Demucs) by name: build with lookup-table
    # stand-ins, then put the real conditioners in their place before any weights
    # are loaded.
    build_cfg.conditioners.description = OmegaConf.create(_STAND_IN)
    melody = "self_wav" in cfg.conditioners
    if melody:
        build_cfg.conditioners.self_wav = OmegaConf.create(_STAND_IN)
    lm = builders.get_lm_model(build_cfg)
    if melody:
        chroma_cfg = dict(OmegaConf.to_container(cfg.conditioners.self_wav.chroma_stem))
        for unused in ("match_len_on_eval", "eval_wavs", "n_eval_wavs", "cache_path"):
            chroma_cfg.pop(unused, None)
        lm.condition_provider.conditioners["self_wav"] = OfflineChromaStemConditioner(
            demucs if demucs is not None else _offline_demucs(),
            output_dim=cfg.transformer_lm.dim,
            duration=float(cfg.dataset.segment_duration),
            device=str(cfg.device),
            **chroma_cfg,
        ).to(cfg.device)
    if isinstance(text_encoder, Path):
        t5 = T5EncoderModel.from_pretrained(text_encoder)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(text_encoder)
    else:
        t5, tokenizer = text_encoder
    lm.condition_provider.conditioners["description"] = OfflineT5Conditioner(
        t5, tokenizer, output_dim=cfg.transformer_lm.dim, device=str(cfg.device)
    ).to(cfg.device)
    lm.cfg = cfg
    return lm.eval()


def musicgen_model(name: str, compression: Any, lm: LMModel, window: float) -> MusicGen:
    # MusicGen.__init__ checks its default extend_stride (18 s) against the
    # window, so short test windows are set after construction.
    model = MusicGen(name, compression, lm, max_duration=max(window, 30.0))
    if window < 30.0:
        model.max_duration = window
        model.set_generation_params(duration=window, extend_stride=round(window * 0.6, 3))
    return model


def save_musicgen(model: MusicGen, directory: Path) -> None:
    """Write ``model`` in audiocraft's checkpoint layout under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    lm_cfg = OmegaConf.to_container(model.lm.cfg, resolve=True)
    compression: CompressionModel = model.compression_model
    compression = getattr(compression, "model", compression)  # the mono codec of a stereo model
    torch.save(
        {"xp.cfg": OmegaConf.to_yaml(lm_cfg), "best_state": model.lm.state_dict()},
        directory / "state_dict.bin",
    )
    comp_cfg = OmegaConf.to_container(compression.cfg, resolve=True)
    torch.save(
        {"xp.cfg": OmegaConf.to_yaml(comp_cfg), "best_state": compression.state_dict()},
        directory / "compression_state_dict.bin",
    )
    conditioner = model.lm.condition_provider.conditioners["description"]
    conditioner.t5.save_pretrained(directory / TEXT_ENCODER_DIR)
    conditioner.t5_tokenizer.save_pretrained(directory / TEXT_ENCODER_DIR)


def load_musicgen_dir(directory: Path, device: str = "cpu") -> MusicGen:
    """Load a local checkpoint directory.

    Uses audiocraft's loaders; a ``text_encoder/`` folder, when present, supplies
    T5 instead of the hub.
    """
    from audiocraft.models import loaders

    with weights_left_unset():  # (audiocraft's loaders load their weights strictly)
        compression = loaders.load_compression_model(str(directory), device=device)
    text_encoder = directory / TEXT_ENCODER_DIR
    if text_encoder.is_dir():
        pkg = loaders.load_lm_model_ckpt(str(directory))
        cfg = OmegaConf.create(pkg["xp.cfg"])
        cfg.device = device
        cfg.dtype = "float32" if device == "cpu" else "float16"
        # (A melody checkpoint in this layout holds no Demucs: made as it is, drawn.)
        demucs = _offline_demucs() if "self_wav" in cfg.conditioners else None
        with weights_left_unset():  # (its weights loaded next, strictly; T5's its own)
            lm = lm_from_cfg(cfg, text_encoder, demucs)
        lm.load_state_dict(pkg["best_state"], strict=True)
    else:
        with weights_left_unset():
            lm = loaders.load_lm_model(str(directory), device=device)
    name = directory.name
    window = float(lm.cfg.dataset.segment_duration)
    return musicgen_model(name, compression, lm.eval(), window)
