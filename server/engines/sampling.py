"""Batched sampling of ``[B, K, V]`` logits, every row with its own parameters.

Each row (a request, or a classifier-free-guidance pair already combined) has its
own temperature, top-k, top-p and seed, held in ``[B]`` tensors. The rules are
``LMModel._sample_next_token``'s: greedy at temperature 0, else top-p when set,
else top-k (0: the whole vocabulary).

The randomness is counter-based: the noise for row ``b``, codebook ``k`` and
token ``v`` is a hash of ``(seed_b, step_b, k, v)``, where ``step_b`` counts the
row's own sampling steps. A draw is ``argmax(p / E)`` with ``E`` exponential
noise, which picks ``v`` with probability ``p_v`` (the exponential race, the
same as Gumbel-max). No generator state is carried, nothing depends on which
other rows share the batch, and there is no host sync: a seed gives the same
codes alone or beside any other requests, and the step traces as one graph.
"""

from __future__ import annotations

import torch

__all__ = ["RowSampling", "counter_uniform", "sample"]

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` without leaving int64's range."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (``lowbias32``)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _mix32(h ^ _mix32((v + 0x9E3779B9) & _MASK32))


def counter_uniform(
    seed: torch.Tensor, step: torch.Tensor, codebooks: int, vocab: int
) -> torch.Tensor:
    """Uniform noise in (0, 1) of shape ``[B, codebooks, vocab]``.

    Args:
        seed: ``[B]`` int64 seeds (``0 <= seed < 2**63``).
        step: ``[B]`` int64 per-row step counters.
        codebooks: K.
        vocab: V.
    """
    device = seed.device
    h = _combine(_mix32(seed & _MASK32), (seed >> 32) & _MASK32)
    h = _combine(h, step & _MASK32)  # [B]
    k = torch.arange(codebooks, device=device, dtype=torch.int64)
    h = _combine(h[:, None], k[None, :])  # [B, K]
    v = torch.arange(vocab, device=device, dtype=torch.int64)
    bits = _combine(h[:, :, None], v[None, None, :])  # [B, K, V]
    # The top 24 bits, centred, so that float32 holds them exactly and 0 and 1 never occur.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


class RowSampling:
    """Per-row sampling parameters for a table of ``rows`` rows, on one device.

    Rows are set when a request joins; the tensors are updated in place so that
    a captured step keeps reading the same storage.
    """

    def __init__(self, rows: int, device: torch.device | str) -> None:
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.zeros(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.int64, device=device)
        self.step = torch.zeros(rows, dtype=torch.int64, device=device)

    def set_row(
        self, row: int, *, temperature: float, top_k: int, top_p: float, seed: int, step: int = 0
    ) -> None:
        self.temperature[row] = temperature
        self.top_k[row] = top_k
        self.top_p[row] = top_p
        self.seed[row] = seed
        self.step[row] = step


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Draw one token per row and codebook: ``[B, K, V]`` logits -> ``[B, K]`` int64.

    Args:
        logits: Raw scores.
        temperature: ``[B]``; 0 means greedy.
        top_k: ``[B]`` int64; 0 means the whole vocabulary.
        top_p: ``[B]``; used instead of top-k where > 0.
        seed: ``[B]`` int64.
        step: ``[B]`` int64 per-row counters (the caller advances them).
    """
    batch, codebooks, vocab = logits.shape
    logits = logits.float()
    greedy = temperature <= 0.0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / scale[:, None, None], dim=-1)
    ordered, _ = torch.sort(probs, dim=-1, descending=True)
    # How many of the most likely tokens stay: top-p's nucleus (audiocraft's rule:
    # a token stays while the mass before it is at most p), or top-k.
    nucleus = ((torch.cumsum(ordered, dim=-1) - ordered) <= top_p[:, None, None]).sum(-1)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = torch.where(top_p[:, None] > 0.0, nucleus, k[:, None].expand(batch, codebooks))
    threshold = ordered.gather(-1, (keep.clamp(min=1) - 1)[..., None])
    kept = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
    noise = counter_uniform(seed, step, codebooks, vocab)
    drawn = torch.argmax(kept / -torch.log(noise), dim=-1)
    return torch.where(greedy[:, None], torch.argmax(logits, dim=-1), drawn)
