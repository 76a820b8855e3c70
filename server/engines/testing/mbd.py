"""A tiny random-weight Multi-Band Diffusion for the test MusicGen models."""

from __future__ import annotations

from typing import Any

import torch
from audiocraft.models import builders
from audiocraft.models.multibanddiffusion import DiffusionProcess, MultiBandDiffusion
from audiocraft.modules.diffusion_schedule import NoiseSchedule
from omegaconf import OmegaConf

__all__ = ["build_tiny_mbd"]

# Shaped like facebook/multiband-diffusion's mbd_musicgen_32khz bands, scaled down.
_TINY_BAND_CFG: dict[str, Any] = {
    "channels": 1,
    "schedule": {
        "beta_t0": 1.0e-5,
        "beta_t1": 2.5e-2,
        "beta_exp": 7.5,
        "num_steps": 1000,
        "variance": "beta",
        "clip": 5.0,
        "rescale": 1.0,
        "repartition": "power",
        "noise_scale": 1.0,
    },
    "diffusion_unet": {
        "hidden": 4,
        "depth": 2,
        "growth": 2.0,
        "max_channels": 64,
        "emb_all_layers": False,
        "cross_attention": False,
        "bilstm": False,
        "transformer": False,
        "codec_dim": None,
    },
    "processor": {
        "use": True,
        "name": "multi_band_processor",
        "n_bands": 4,
        "num_samples": 10000,
        "power_std": 1.0,
    },
}


def build_tiny_mbd(codec_model: Any, device: str = "cpu", seed: int = 0, bands: int = 4) -> Any:
    """MBD for a (tiny) MusicGen: ``bands`` random-weight diffusion U-Nets built from
    a config shaped like the released one, over the model's own EnCodec."""
    DPs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(bands):
            cfg = OmegaConf.create(_TINY_BAND_CFG)
            cfg.diffusion_unet.codec_dim = int(codec_model.quantizer.dimension)
            model = builders.get_diffusion_model(cfg).to(device).eval()
            processor = builders.get_processor(cfg.processor, sample_rate=codec_model.sample_rate)
            # Statistics as if fitted (the released ones are in its checkpoint): zero mean,
            # audio bands with std 0.1 mapped to unit-variance noise.
            processor.counts.fill_(processor.num_samples)
            processor.sum_x2.fill_(processor.num_samples * 0.01)
            processor.sum_target_x2.fill_(processor.num_samples)
            processor = processor.to(device)
            schedule_cfg = dict(OmegaConf.to_container(cfg.schedule))
            schedule = NoiseSchedule(**schedule_cfg, sample_processor=processor, device=device)
            DPs.append(DiffusionProcess(model=model, noise_schedule=schedule))
    return MultiBandDiffusion(DPs=DPs, codec_model=codec_model)
