"""Multi-Band Diffusion (audiocraft) as resumable steps.

``MultiBandDiffusion.tokens_to_wav`` runs every band's whole reverse diffusion
in one call. Here the same computation (``NoiseSchedule.generate_subsampled``
for each band, then ``re_eq`` against the EnCodec decode) advances one
diffusion step per call, so the scheduler can interleave it with other
requests and cancel it between two steps. Noise comes from the request's own
generator, drawn in the same order as audiocraft draws from the global one.
"""

from __future__ import annotations

from typing import Any

import torch
from audiocraft.models.multibanddiffusion import MultiBandDiffusion
from audiocraft.modules.diffusion_schedule import NoiseSchedule, betas_from_alpha_bar

__all__ = ["MBD_STEPS", "MBDRun", "load_mbd_musicgen"]

# audiocraft's default sub-sampled chain: 1000 -> 0 in strides of 50.
MBD_STEPS: list[int] = [*list(range(1000))[::-50], 0]


def load_mbd_musicgen(device: str) -> Any:
    """The released MBD for MusicGen (from the hub)."""
    return MultiBandDiffusion.get_mbd_musicgen(device=device)


class MBDRun:
    """One ``tokens_to_wav`` computation, one diffusion step at a time."""

    def __init__(self, mbd: Any, tokens: torch.Tensor, generator: torch.Generator) -> None:
        self.mbd = mbd
        self.generator = generator
        self.reference = mbd.codec_model.decode(tokens)  # EnCodec decode, for re_eq
        self.condition = mbd.get_emb(tokens)
        self.out = torch.zeros(self.reference.size(), device=mbd.device)
        self.band = -1
        self.index = 0
        self.total = len(mbd.DPs) * (len(MBD_STEPS) - 1)
        self.done_steps = 0
        self._next_band()

    @property
    def fraction(self) -> float:
        return self.done_steps / self.total

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(
            like.shape, generator=self.generator, device=like.device, dtype=like.dtype
        )

    def _next_band(self) -> None:
        self.band += 1
        self.index = 0
        if self.band >= len(self.mbd.DPs):
            return
        schedule: NoiseSchedule = self.mbd.DPs[self.band].schedule
        self.alpha_bar = schedule.get_alpha_bar(step=schedule.num_steps - 1)
        subsampled = (1 - schedule.betas).cumprod(dim=0)[list(reversed(MBD_STEPS))].cpu()
        self.betas = betas_from_alpha_bar(subsampled)
        self.current = self._noise(self.out) * schedule.noise_scale

    def step(self) -> torch.Tensor | None:
        """One reverse-diffusion step; at the very end, the equalised waveform."""
        process = self.mbd.DPs[self.band]
        schedule: NoiseSchedule = process.schedule
        idx, step = self.index, MBD_STEPS[self.index]
        with torch.no_grad():
            estimate = process.model(self.current, step, condition=self.condition).sample
            estimate = estimate * schedule.noise_scale
        alpha = 1 - self.betas[-1 - idx]
        previous = (
            self.current - (1 - alpha) / (1 - self.alpha_bar).sqrt() * estimate
        ) / alpha.sqrt()
        previous_alpha_bar = schedule.get_alpha_bar(MBD_STEPS[idx + 1])
        if step == MBD_STEPS[-2]:
            sigma2: Any = 0
            previous_alpha_bar = torch.tensor(1.0)
        else:
            sigma2 = (1 - previous_alpha_bar) / (1 - self.alpha_bar) * (1 - alpha)
        if sigma2 > 0:
            previous += sigma2**0.5 * self._noise(previous) * schedule.noise_scale
        if schedule.clip:
            previous = previous.clamp(-schedule.clip, schedule.clip)
        self.current = previous
        self.alpha_bar = previous_alpha_bar
        if step == 0:
            previous *= schedule.rescale
        self.index += 1
        self.done_steps += 1
        if self.index == len(MBD_STEPS) - 1:
            self.out += schedule.sample_processor.return_sample(previous)
            self._next_band()
            if self.band >= len(self.mbd.DPs):
                result: torch.Tensor = self.mbd.re_eq(wav=self.out, ref=self.reference)
                return result
        return None
