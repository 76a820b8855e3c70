"""Batched sampling of ``[B, K, V]`` logits, every row with its own parameters.

Each row (a request, or a classifier-free-guidance pair already combined) has its
own temperature, top-k, top-p and seed. The rules are
``LMModel._sample_next_token``'s: greedy at temperature 0, else top-p when set,
else top-k (0: the whole vocabulary).

The randomness is counter-based: the noise for row ``b``, codebook ``k`` and
token ``v`` is a hash of ``(seed_b, step_b, k, v)``, where ``step_b`` counts the
row's own sampling steps. A draw is ``argmax(p / E)`` with ``E`` exponential
noise, which picks ``v`` with probability ``p_v`` (the exponential race, the
same as Gumbel-max). No generator state is carried and nothing depends on which
other rows share the batch: a seed gives the same codes alone or beside any
other requests.

The row part of the key, ``(seed_b, step_b)``, is hashed on the host where both
are known, and the engines mix in each codebook's there too
(``RowSampling.draw_keys``: ``codebook_keys`` of ``row_keys``, by the row
kernel's library in one call where it is built); the step itself has fixed
shapes and no host sync, so it traces as one graph. Only the candidates are
hashed: where no row uses top-p (the usual case), the ``max(top_k)`` most
likely tokens, not the whole vocabulary; each token's noise depends on its id,
not on its rank, so the draw is the same whichever candidate set the batch
needs. Where every row keeps all of them (the same top-k throughout, the
usual case) the candidates need no order, and where no row is greedy no
argmax over the vocabulary is taken (``RowSampling.plan`` says what a batch
needs, from the host's copy of the parameters).

On a CPU the noise comes from the row kernel's C library in one pass (the same
floats bit for bit: the hash is integer arithmetic, and its 24 bits are exact
in float32), where the library's operations take a dozen passes over ``int64``
tensors, a fifth of a speech step's draw for eight streams; a traced step
(``torch.compile``) keeps the library's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt
import torch

from . import rowkernel
from .pipelining import to_device, upload

__all__ = [
    "DrawPlan",
    "RowSampling",
    "Warpers",
    "candidates_for",
    "codebook_keys",
    "counted_window",
    "counter_uniform",
    "finite_rows",
    "redraw_keys",
    "redraw_repeats",
    "row_keys",
    "sample",
    "sample_repeat_aware",
    "sample_warped",
    "warp",
    "warp_rows",
    "warpers",
]

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31, so that ``(x * c) & mask`` of a 32-bit x stays exact in int64.
_M1, _M2 = 0x21F0AAAD, 0x735A2D97
_GOLDEN = 0x9E3779B1

Ints = npt.NDArray[np.int64]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) of ``0 <= x < 2**32``, in int64."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def _mix_np(x: Ints) -> Ints:
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def row_keys(seed: Ints, step: Ints) -> Ints:
    """The 32-bit key of each row's draw: a hash of ``(seed, step)`` (int64 ``[B]``)."""
    seed = np.asarray(seed, dtype=np.int64)
    h = _mix_np(seed & _MASK32)
    h = _mix_np(h ^ (seed >> 32))
    return _mix_np(h ^ (np.asarray(step, dtype=np.int64) & _MASK32))


def codebook_keys(keys: Ints, codebooks: int) -> Ints:
    """``[B, K]``: the key of each row's draw for each codebook, from its row key
    (``row_keys``). ``_token_uniform`` mixes them from ``[B]`` row keys on the
    device; the engines make them on the host with the row keys (the same
    integers), which takes a dozen operations out of every step."""
    offsets = (np.arange(codebooks, dtype=np.int64) * _GOLDEN + 1) & _MASK32
    return _mix_np(np.asarray(keys, dtype=np.int64)[:, None] ^ offsets)


def _token_uniform(key: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1) for ``tokens`` ``[B, K, M]`` of rows keyed ``key``:
    ``[B]`` row keys, or ``[B, K]`` keys per codebook (``codebook_keys``)."""
    if key.dim() == 1:
        codebooks = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.int64)
        key = _mix(key[:, None] ^ ((codebooks * _GOLDEN + 1) & _MASK32))  # [B, K]
    kernel = _noise_kernel(key, tokens)
    if kernel is not None:
        noise = kernel.uniforms(key, tokens)
        if noise is not None:
            return noise
    bits = _mix(key[:, :, None] ^ ((tokens * _GOLDEN) & _MASK32))
    # The top 24 bits, centred, so that float32 holds them exactly and 0 and 1 never occur.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _noise_kernel(key: torch.Tensor, tokens: torch.Tensor | None) -> rowkernel.RowKernel | None:
    """The row kernel, where it makes this noise: ``[B, K]`` int64 keys and
    int64 tokens (None: a vocabulary's) on a CPU, outside a trace; else None."""
    if not ROW_KERNEL or key.dim() != 2 or key.dtype != torch.int64:
        return None
    if tokens is not None and (not tokens.is_cpu or tokens.dtype != torch.int64):
        return None
    return rowkernel.on_cpu(key)


# Whether the noise and the sort of the scores come from the row kernel on a
# CPU, and the draw keys from it on the host (tests turn it off to compare).
ROW_KERNEL = True


def _kernel() -> rowkernel.RowKernel | None:
    """The row kernel, where it is built and ``ROW_KERNEL`` is on: the noise's
    hashing, and a step's draw keys (a dozen numpy calls a hash, several hashes
    a step, each call costing more than its hashing)."""
    return rowkernel.built() if ROW_KERNEL else None


def counter_uniform(key: torch.Tensor, codebooks: int, vocab: int) -> torch.Tensor:
    """The noise of every token, ``[B, codebooks, vocab]``, for rows keyed ``key``
    (``[B, K]`` keys: by the row kernel without the tokens' ids written out,
    where it makes the noise)."""
    kernel = _noise_kernel(key, None)
    if kernel is not None and key.shape[1] == codebooks:
        noise = kernel.uniforms(key, None, vocab)
        if noise is not None:
            return noise
    tokens = torch.arange(vocab, device=key.device, dtype=torch.int64)
    return _token_uniform(key, tokens.expand(key.shape[0], codebooks, vocab))


@dataclass(frozen=True, slots=True)
class DrawPlan:
    """What ``sample`` must do for a batch (its keyword arguments)."""

    candidates: int  # tokens considered per row and codebook
    nucleus: bool  # some row uses top-p
    ranked: bool  # some row keeps fewer than the candidates: they must be in order
    greedy: bool  # some row is greedy

    def arguments(self) -> dict[str, Any]:
        """``sample``'s keyword arguments."""
        return {
            "candidates": self.candidates,
            "nucleus": self.nucleus,
            "ranked": self.ranked,
            "greedy": self.greedy,
        }


class RowParams(Protocol):
    """A request's sampling parameters, as the engines' request states hold them."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def seed(self) -> int: ...


class RowSampling:
    """Per-row sampling parameters for a table of ``rows`` rows.

    The parameters live on the device in ``[B]`` tensors, set when a request joins
    (in place, so that a captured step keeps reading the same storage); the seeds
    and step counters live on the host, which hashes them into each step's keys.
    With a ``vocab``, the table keeps transformers' warpers' parameters too, as
    ``warp_rows`` uses them (``warpers``: top-p 1 is off), derived when a row is
    set rather than in every step.
    """

    def __init__(self, rows: int, device: torch.device | str, vocab: int | None = None) -> None:
        self.vocab = vocab
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.zeros(rows, device=device)
        self.scale = _scale(self.temperature)
        self.warpers: Warpers | None = None
        if vocab is not None:  # (sharing ``scale``)
            made = warpers(self.temperature, self.top_k, self.top_p, vocab)
            self.warpers = made._replace(scale=self.scale)
        self.seed = np.zeros(rows, dtype=np.int64)
        self.step = np.zeros(rows, dtype=np.int64)
        # What each row needs of the candidates (see ``candidates_for``), and
        # whether it draws from top-p's nucleus.
        self.wants = np.zeros(rows, dtype=np.int64)
        self.nucleus = np.zeros(rows, dtype=bool)
        self.greedy = np.zeros(rows, dtype=bool)
        # ``plan``'s answers until a row is set (a batch asks the same every step).
        self._plans: dict[tuple[bytes, int], DrawPlan] = {}

    def set_row(
        self, row: int, *, temperature: float, top_k: int, top_p: float, seed: int, step: int = 0
    ) -> None:
        self.set_rows(
            [row], temperature=[temperature], top_k=[top_k], top_p=[top_p], seed=[seed], step=[step]
        )

    def set_rows(
        self,
        rows: Sequence[int],
        *,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        seed: Sequence[int],
        step: Sequence[int] | None = None,
    ) -> None:
        """Set several rows at once (the requests starting in a step: a few
        operations for all of them, not a few dozen a request)."""
        device = self.temperature.device
        # (Two copies, without waiting for a step in flight: the integers, the floats.)
        sent = upload({"index": list(rows), "top_k": list(top_k)}, device)
        index, k = sent["index"], sent["top_k"].to(self.top_k.dtype)
        floats = torch.tensor([*temperature, *top_p], dtype=torch.float64)
        t, p = to_device(floats, device, later=True).split(len(index))
        t, p = t.to(self.temperature.dtype), p.to(self.top_p.dtype)
        self.temperature[index] = t
        self.top_k[index] = k
        self.top_p[index] = p
        if self.warpers is None:
            self.scale[index] = _scale(t)
        else:  # (its scale is ``self.scale``)
            assert self.vocab is not None
            for table, value in zip(self.warpers, warpers(t, k, p, self.vocab), strict=True):
                table[index] = value
        host = np.asarray(list(rows), dtype=np.int64)
        temps, ks, ps = np.asarray(temperature), np.asarray(top_k), np.asarray(top_p)
        self.seed[host] = seed
        self.step[host] = 0 if step is None else step
        self._plans.clear()
        self.wants[host] = np.where(temps <= 0, 1, np.where((ps > 0) | (ks <= 0), -1, ks))
        self.nucleus[host] = (temps > 0) & (ps > 0)
        self.greedy[host] = temps <= 0

    def set_requests(
        self,
        rows: Sequence[int],
        requests: Sequence[RowParams],
        steps: Sequence[int] | None = None,
    ) -> None:
        """``set_rows`` from the parameters of the requests taking ``rows``
        (``steps``: the draws each one made before, where it picks a stream up)."""
        if len(rows) != len(requests):
            raise ValueError("one row per request")
        self.set_rows(
            rows,
            temperature=[r.temperature for r in requests],
            top_k=[r.top_k for r in requests],
            top_p=[r.top_p for r in requests],
            seed=[r.seed for r in requests],
            step=steps,
        )

    def grown(self, rows: int) -> RowSampling:
        """A table of ``rows`` rows holding this one's rows first."""
        bigger = RowSampling(rows, self.temperature.device, self.vocab)
        old = self.seed.shape[0]
        for name in ("temperature", "top_k", "top_p", "scale"):
            getattr(bigger, name)[:old] = getattr(self, name)
        if self.warpers is not None and bigger.warpers is not None:
            for name in ("kth", "floor", "greedy"):  # (the scale came with ``scale``)
                getattr(bigger.warpers, name)[:old] = getattr(self.warpers, name)
        for name in ("seed", "step", "wants", "nucleus", "greedy"):
            getattr(bigger, name)[:old] = getattr(self, name)
        return bigger

    def draw_keys(self, rows: int, codebooks: int) -> Ints:
        """The first ``rows`` rows' keys of this step's draw per codebook
        (``codebook_keys`` of ``keys``): ``[rows, codebooks]``."""
        kernel = _kernel()
        if kernel is not None:
            return kernel.draw_keys(self.seed[:rows], self.step[:rows], codebooks)[0]
        return codebook_keys(row_keys(self.seed[:rows], self.step[:rows]), codebooks)

    def draw_and_redraw_keys(self, rows: int, codebooks: int) -> tuple[Ints, Ints]:
        """``draw_keys``, and the keys of a second draw in the step
        (``codebook_keys`` of ``redraw_keys``)."""
        kernel = _kernel()
        if kernel is not None:
            return kernel.draw_keys(self.seed[:rows], self.step[:rows], codebooks)
        keys = row_keys(self.seed[:rows], self.step[:rows])
        return codebook_keys(keys, codebooks), codebook_keys(redraw_keys(keys), codebooks)

    def plan(self, rows: npt.NDArray[np.bool_], vocab: int) -> DrawPlan:
        """What a draw of the ``rows`` flagged (the first ``len(rows)`` of the
        table; the others' draws are not used) needs."""
        key = (rows.tobytes(), vocab)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:  # (bounded: the row sets a crowd goes through)
                self._plans.clear()
            plan = self._plans[key] = self._plan(rows, vocab)
        return plan

    def _plan(self, rows: npt.NDArray[np.bool_], vocab: int) -> DrawPlan:
        count = len(rows)
        wants = self.wants[:count][rows]
        candidates = candidates_for(wants, vocab)
        greedy = self.greedy[:count][rows]
        nucleus = bool(self.nucleus[:count][rows].any())
        # A sampled row keeps its top-k, the whole vocabulary (-1), or the candidates.
        kept = np.where(wants < 0, vocab, np.minimum(wants, candidates))
        ranked = nucleus or bool((~greedy & (kept < candidates)).any())
        return DrawPlan(candidates, nucleus, ranked, bool(greedy.any()))


def _scale(temperature: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]``: what each row's logits are divided by, its temperature
    (1 where greedy: its argmax is taken of the raw logits)."""
    greedy = temperature <= 0.0
    return torch.where(greedy, torch.ones_like(temperature), temperature)[:, None, None]


def candidates_for(wants: Ints, vocab: int) -> int:
    """How many of the most likely tokens a batch must consider.

    ``wants`` per row: its top-k, 1 when greedy, -1 when it needs the whole
    vocabulary (top-p, or top-k 0).
    """
    if wants.size == 0 or bool((wants < 0).any()):
        return vocab
    return int(min(vocab, max(1, int(wants.max()))))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    key: torch.Tensor,
    candidates: int | None = None,
    nucleus: bool = True,
    ranked: bool = True,
    greedy: bool = True,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row and codebook: ``[B, K, V]`` logits -> ``[B, K]`` int64.

    Args:
        logits: Raw scores.
        temperature: ``[B]``; 0 means greedy.
        top_k: ``[B]`` int64; 0 means the whole vocabulary.
        top_p: ``[B]``; used instead of top-k where > 0.
        key: ``[B]`` int64 row keys (``row_keys``: the seed and the row's step),
            or ``[B, K]`` keys per codebook (``codebook_keys`` of them).
        candidates: Tokens considered per row and codebook, at least every
            top-k row's k (``candidates_for``); None: the whole vocabulary,
            which top-p rows need.
        nucleus: Whether any row may use top-p (False skips its operations;
            ``RowSampling.nucleus`` says which rows do).
        ranked: Whether any row may keep fewer tokens than the candidates (False:
            every sampled row keeps them all, so they are taken in no order).
        greedy: Whether any row may be greedy (False skips the argmax).
        scale: ``[B, 1, 1]``: the rows' temperatures, 1 where greedy, made
            beforehand (``RowSampling.scale``); None: from ``temperature``.
    """
    batch, codebooks, vocab = logits.shape
    logits = logits.float()
    if scale is None:
        scale = _scale(temperature)
    probs = torch.softmax(logits / scale, dim=-1)
    m = vocab if candidates is None else min(candidates, vocab)
    ranked = ranked or nucleus
    # [B, K, M]: the M most likely, most likely first where the order matters.
    ordered, tokens = torch.topk(probs, m, dim=-1, sorted=ranked)
    kept = ordered
    if ranked:
        # How many of the most likely tokens stay: top-k, or top-p's nucleus
        # (audiocraft's rule: a token stays while the mass before it is at most p).
        keep = torch.where(top_k > 0, top_k.clamp(max=m), m)[:, None].expand(batch, codebooks)
        if nucleus:
            mass = ((torch.cumsum(ordered, dim=-1) - ordered) <= top_p[:, None, None]).sum(-1)
            keep = torch.where(top_p[:, None] > 0.0, mass, keep)
        threshold = ordered.gather(-1, (keep.clamp(min=1) - 1)[..., None])
        kept = torch.where(ordered >= threshold, ordered, 0.0)
    noise = _token_uniform(key, tokens)
    choice = torch.argmax(kept / -torch.log(noise), dim=-1, keepdim=True)
    drawn = tokens.gather(-1, choice)[..., 0]
    if not greedy:
        return drawn
    return torch.where((temperature <= 0.0)[:, None], torch.argmax(logits, dim=-1), drawn)


def finite_rows(scores: torch.Tensor) -> torch.Tensor:
    """``[B]``: whether every score of each row of ``scores`` ``[B, ...]`` is finite.

    A float32 sum over the last dimension is finite where every score is (NaN and
    infinities carry through it; no working model makes scores near float32's
    limit): one reduction, a tenth of the time or less of testing every score.
    A sum ``s`` is finite where ``s - s == 0`` (infinities and NaN make NaN):
    two operations where ``isfinite`` takes four.
    """
    total = scores.sum(-1, dtype=torch.float32)
    return ((total - total) == 0).flatten(1).all(-1)


def _race(probs: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A draw from ``probs`` ``[B, K, V]`` with every token's counter-based noise."""
    _, codebooks, vocab = probs.shape
    noise = counter_uniform(key, codebooks, vocab)
    return torch.argmax(probs / -torch.log(noise), dim=-1)


class Warpers(NamedTuple):
    """transformers' warpers' parameters per row, in the shapes ``warp_rows``
    uses them: derived once (``warpers``), when a row is set, not in every step."""

    scale: torch.Tensor  # [B, 1, 1] float32: the temperature, 1 where greedy
    kth: torch.Tensor  # [B, 1, 1] int64: top-k's k-th largest score's index in ascending order
    floor: torch.Tensor  # [B, 1, 1] float32: top-p's 1 - p; -1 where top-p is off
    greedy: torch.Tensor  # [B, 1] bool

    def head(self, rows: int) -> Warpers:
        """The first ``rows`` rows' parameters."""
        return Warpers(*(table[:rows] for table in self))


def warpers(
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, vocab: int
) -> Warpers:
    """Rows' ``Warpers`` from their parameters (``warp``'s).

    Where top-p is off the floor is -1, which no mass is at or below: the
    nucleus takes nothing from a row without testing which rows have one.
    """
    greedy = temperature <= 0.0
    k = torch.where((top_k > 0) & ~greedy, top_k.clamp(min=1, max=vocab), vocab)
    floor = torch.where((top_p < 1.0) & ~greedy, 1.0 - top_p, -1.0)
    return Warpers(
        _scale(temperature), (vocab - k)[:, None, None], floor[:, None, None], greedy[:, None]
    )


def warp(
    logits: torch.Tensor,
    forced: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """transformers' logits processors, per row: the scores ``generate`` draws from.

    A processor forcing tokens, then the temperature, top-k and top-p warpers
    (each where it applies, in that order): ``[B, K, V]`` float32, ``-inf``
    where a token is out.

    Args:
        logits: Raw scores ``[B, K, V]``.
        forced: ``[B, K]``: a token a codebook must take (-1: none), as a
            processor that sets every other score to ``-inf`` does.
        temperature: ``[B]``; 0 means greedy (no warpers).
        top_k: ``[B]`` int64; 0 means off.
        top_p: ``[B]``; 1 means off.
    """
    return warp_rows(logits, forced, warpers(temperature, top_k, top_p, logits.shape[-1]))


def warp_rows(logits: torch.Tensor, forced: torch.Tensor, rows: Warpers) -> torch.Tensor:
    """``warp``, with the rows' parameters derived beforehand (``warpers``)."""
    vocab = logits.shape[-1]
    scores = logits.float()
    ids = torch.arange(vocab, device=scores.device)
    forced = forced[..., None]
    scores = scores.masked_fill((forced >= 0) & (ids != forced), float("-inf"))
    scores = scores / rows.scale
    # One sort serves both warpers. Top-k: scores below the k-th largest go (ties
    # stay), as TopKLogitsWarper; in ascending order they are a prefix, so the
    # sorted scores stay sorted with them set to -inf.
    ascending = _ascending(scores)
    kth = ascending.gather(-1, rows.kth.expand(*scores.shape[:2], 1))
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    # Top-p: from the least likely up, tokens go while the mass so far is at most
    # 1 - p; the most likely always stays (TopPLogitsWarper). The mass grows, so
    # the tokens that go are a prefix: its length, at most all but the last.
    mass = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    gone = (mass <= rows.floor).sum(-1, keepdim=True).clamp(max=vocab - 1)
    threshold = ascending.gather(-1, gone)
    return scores.masked_fill(scores < torch.maximum(kth, threshold), float("-inf"))


def _ascending(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` sorted along the last dimension, ascending: by the row kernel on
    a CPU (where the library's comparison sort mispredicts its branches: 1.6-5x
    the kernel's time for rows of up to 512, ``bench/bench_sampling.py
    --sort``), else by the library's."""
    kernel = rowkernel.on_cpu(scores) if ROW_KERNEL else None
    if kernel is not None and scores.dtype == torch.float32:
        ordered = kernel.sort(scores)
        if ordered is not None:
            return ordered
    return torch.sort(scores, dim=-1).values


def sample_warped(
    logits: torch.Tensor,
    forced: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """One token per row and codebook, by transformers' rules (``warp``), then a
    counter-based draw (``argmax`` where greedy): ``[B, K]`` int64.

    Args:
        key: ``[B]`` int64 row keys (``row_keys``), or ``[B, K]`` (``codebook_keys``);
            the rest as ``warp``.
    """
    scores = warp(logits, forced, temperature, top_k, top_p)
    drawn = _race(torch.softmax(scores, dim=-1), key)
    return torch.where((temperature <= 0.0)[:, None], torch.argmax(scores, dim=-1), drawn)


def redraw_repeats(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    window: torch.Tensor,
    max_repeat: torch.Tensor,
    excluded: tuple[int, int],
    key: torch.Tensor,
) -> torch.Tensor:
    """Repetition-aware sampling: a token repeated too often is drawn again.

    Where codebook ``k``'s token appears at least ``max_repeat`` times in the
    row's window (stream markers ``excluded`` not counted), it is replaced by a
    draw from the raw ``logits`` (no temperature, no filtering), as HiggsAudio's
    generation loop does.

    Args:
        tokens: ``[B, K]`` the tokens drawn.
        logits: ``[B, K, V]`` raw scores.
        window: ``[B, W, K]`` each row's recent codes; -1 where a row's window is
            shorter (or off).
        max_repeat: ``[B]`` int64.
        excluded: Codes never counted as repeats (stream BOS and EOS).
        key: ``[B]`` int64 keys for the redraw (not those of the first draw), or
            ``[B, K]`` (``codebook_keys``).
    """
    redrawn = _race(torch.softmax(logits.float(), dim=-1), key)
    bos, eos = excluded
    counted = torch.where((window == bos) | (window == eos), -1, window)
    return _replace_repeats(tokens, redrawn, counted, max_repeat)


def counted_window(window: Ints, excluded: tuple[int, int]) -> Ints:
    """A repetition window ``[..., W, K]`` (on the host) as ``sample_repeat_aware``
    takes it: the codes never counted as repeats (``excluded``) set to -1."""
    first, second = excluded
    return np.where((window == first) | (window == second), -1, window)


def _replace_repeats(
    tokens: torch.Tensor, redrawn: torch.Tensor, window: torch.Tensor, max_repeat: torch.Tensor
) -> torch.Tensor:
    # Tokens are never -1: the window's -1s (no code, or not counted) never match.
    repeats = (window == tokens[:, None, :]).sum(dim=1)
    return torch.where(repeats >= max_repeat[:, None], redrawn, tokens)


def sample_repeat_aware(
    logits: torch.Tensor,
    forced: torch.Tensor,
    rows: Warpers,
    key: torch.Tensor,
    window: torch.Tensor,
    max_repeat: torch.Tensor,
    redraw_key: torch.Tensor,
) -> torch.Tensor:
    """``redraw_repeats`` of ``sample_warped``'s tokens, the same codes, with the
    two draws' noise, softmax and race computed together (one operation each for
    ``2B`` rows instead of two for ``B``: a step launches fewer).

    Args:
        rows: The rows' warpers (``warpers`` of ``warp``'s parameters).
        window: ``redraw_repeats``' window with the codes not counted set to -1
            (``counted_window``).
        redraw_key: The redraw's keys (``redraw_repeats``'s ``key``); the rest
            as ``sample_warped``'s and ``redraw_repeats``'.
    """
    scores = warp_rows(logits, forced, rows)
    both = torch.softmax(torch.cat([scores, logits.float()]), dim=-1)
    drawn, redrawn = _race(both, torch.cat([key, redraw_key])).chunk(2)
    tokens = torch.where(rows.greedy, torch.argmax(scores, dim=-1), drawn)
    return _replace_repeats(tokens, redrawn, window, max_repeat)


def redraw_keys(keys: Ints) -> Ints:
    """Keys for a second draw in the same step, independent of ``keys``."""
    return _mix_np(np.asarray(keys, dtype=np.int64) ^ 0x5BD1E995)
