"""MusicGen's transformer LM as one batched forward over a static KV cache.

The weights are audiocraft's (``LMModel`` still loads them, so hub names, local
folders and the test models keep working); this module only computes what
``LMModel.forward`` computes in streaming mode, for a table of rows at once:
summed codebook embeddings, sinusoidal positions per row, causal self-attention
against ``StaticKV``, cross-attention on each row's conditioning (its keys and
values computed once, when the row is loaded), the feed-forward blocks and the K
output heads. Classifier-free guidance runs as two rows of the table (the
conditional and the unconditional one) that always step together.

``prefill`` feeds several positions of a few rows (a new request, a long-form
window, a continuation prompt, a melody's prepended chroma); ``decode`` feeds one
position of every row of the table with fixed shapes and no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from audiocraft.modules.transformer import create_sin_embedding
from torch.nn import functional as F

from .kv import StaticKV

__all__ = ["MusicGenDecoder"]


def _projections(attention: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.nn.Linear]:
    """In-projection weight and bias ``[3D, D]`` (q, k, v) and the out-projection."""
    if attention.custom:
        return attention.in_proj_weight, attention.in_proj_bias, attention.out_proj
    mha = attention.mha
    return mha.in_proj_weight, mha.in_proj_bias, mha.out_proj


def _slice(bias: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:end]


class MusicGenDecoder:
    """Batched streaming forward of an audiocraft ``LMModel``.

    Args:
        lm: The loaded LM (eval mode).
        rows: Initial rows of the table (it grows in powers of two).
        length: Initial positions per row (grows when a row needs more).
        cross_length: Initial conditioning positions per row.
        dtype: Cache dtype (the autocast dtype on CUDA, else the weights').
    """

    def __init__(
        self, lm: Any, *, rows: int, length: int, cross_length: int, dtype: torch.dtype
    ) -> None:
        transformer = lm.transformer
        if transformer.positional_embedding != "sin":
            raise ValueError("only sinusoidal positions are supported")
        self.lm = lm
        self.transformer = transformer
        self.layers = list(transformer.layers)
        first = self.layers[0].self_attn
        for layer in self.layers:
            attention = layer.self_attn
            if not layer.norm_first or attention.rope is not None or attention.kv_repeat != 1:
                raise ValueError("unsupported transformer layout")
            if attention.past_context is not None or attention.qk_layer_norm:
                raise ValueError("unsupported attention options")
        self.dim = int(lm.dim)
        self.heads = int(first.num_heads)
        self.head_dim = self.dim // self.heads
        self.codebooks = int(lm.num_codebooks)
        device = next(iter(lm.parameters())).device
        self.device = device
        n = len(self.layers)
        self.kv = StaticKV(
            n, self.heads, self.head_dim, rows=rows, length=length, device=device, dtype=dtype
        )
        self.cross = StaticKV(
            n, self.heads, self.head_dim, rows=rows, length=cross_length, device=device, dtype=dtype
        )
        self.cross_lengths = torch.ones(rows, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.has_cross = any(layer.cross_attention is not None for layer in self.layers)

    @property
    def rows(self) -> int:
        return self.kv.rows

    def ensure(self, *, rows: int = 0, length: int = 0, cross_length: int = 0) -> None:
        """Room for ``rows`` rows, ``length`` positions and ``cross_length`` conditions."""
        self.kv.grow(rows=rows, length=length)
        self.cross.grow(rows=rows, length=cross_length)
        extra = self.kv.rows - self.lengths.shape[0]
        if extra > 0:
            self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(extra)])
            self.cross_lengths = torch.cat([self.cross_lengths, self.cross_lengths.new_ones(extra)])

    # -- loading a row -------------------------------------------------------------

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed codebook embeddings of ``[R, K, S]`` codes: ``[R, S, D]``."""
        emb = self.lm.emb
        total: torch.Tensor = emb[0](codes[:, 0])
        for k in range(1, self.codebooks):
            total = total + emb[k](codes[:, k])
        return total

    def set_conditions(self, rows: list[int], source: torch.Tensor | None) -> None:
        """Cross-attention keys and values of ``source`` ``[R, C, D]`` for ``rows``."""
        if not self.has_cross:
            return
        assert source is not None, "this model cross-attends to its conditioning"
        length = int(source.shape[1])
        self.ensure(cross_length=length)
        index = torch.tensor(rows, device=self.device)
        positions = torch.arange(length, device=self.device).expand(len(rows), length)
        for i, layer in enumerate(self.layers):
            weight, bias, _ = _projections(layer.cross_attention)
            d = self.dim
            k = F.linear(source, weight[d : 2 * d], _slice(bias, d, 2 * d))
            v = F.linear(source, weight[2 * d :], _slice(bias, 2 * d, 3 * d))
            self.cross.write(i, index, positions, self._heads(k), self._heads(v))
        self.cross_lengths[index] = max(length, 1)

    def prefill(self, rows: list[int], inputs: torch.Tensor) -> torch.Tensor:
        """Feed ``inputs`` ``[R, S, D]`` (embeddings) to ``rows`` from position 0.

        Returns the logits ``[R, K, card]`` of the last position.
        """
        count, steps, _ = inputs.shape
        self.ensure(length=steps)
        index = torch.tensor(rows, device=self.device)
        positions = torch.arange(steps, device=self.device).expand(count, steps)
        hidden = self._forward(inputs, index, positions, keys=steps, whole=False)
        self.lengths[index] = steps
        return self._logits(hidden[:, -1:])[:, :, 0]

    # -- the decode step -----------------------------------------------------------

    def decode(
        self, codes: torch.Tensor, active: torch.Tensor, span: int | None = None
    ) -> torch.Tensor:
        """One position for every row: ``[rows, K]`` codes -> ``[rows, K, card]`` logits.

        Rows where ``active`` is False compute too (fixed shapes) but do not advance.
        ``span``: attend over the first ``span`` positions only (more than any
        active row's length; a few fixed values keep the shapes static per value).
        """
        rows = self.rows
        span = self.kv.length if span is None else min(span, self.kv.length)
        index = torch.arange(rows, device=self.device)
        positions = self.lengths.clamp(max=span - 1)[:, None]
        hidden = self._forward(
            self.embed(codes[:, :, None]), index, positions, keys=span, whole=True
        )
        self.lengths += active.to(self.lengths.dtype)
        return self._logits(hidden)[:, :, 0]

    # -- internals -----------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, S, D]`` -> ``[R, H, S, d]``."""
        count, steps, _ = x.shape
        return x.view(count, steps, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        count, _, steps, _ = x.shape
        return x.transpose(1, 2).reshape(count, steps, self.dim)

    def _forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        *,
        keys: int,
        whole: bool,
    ) -> torch.Tensor:
        """The transformer on ``x`` ``[R, S, D]`` at ``positions`` ``[R, S]`` of ``rows``.

        ``keys`` limits attention to the first positions of the cache. With ``whole``
        the rows are the whole table in order (decode) and read the cache in place;
        otherwise (prefill) they gather theirs.
        """
        transformer = self.transformer
        pos_emb = create_sin_embedding(
            positions[..., None], self.dim, max_period=transformer.max_period, dtype=x.dtype
        )
        x = x + transformer.positional_scale * pos_emb
        span = keys
        self_mask = (
            torch.arange(span, device=self.device)[None, None, None, :]
            <= positions[:, None, :, None]
        )
        cross_mask = None
        if self.has_cross:
            cross_span = self.cross.length
            lengths = self.cross_lengths if whole else self.cross_lengths[rows]
            cross_mask = (
                torch.arange(cross_span, device=self.device)[None, None, None, :]
                < lengths[:, None, None, None]
            )
        d = self.dim
        for i, layer in enumerate(self.layers):
            weight, bias, out_proj = _projections(layer.self_attn)
            qkv = F.linear(layer.norm1(x), weight, bias)
            q, k, v = (self._heads(part) for part in qkv.split(d, dim=-1))
            self.kv.write(i, rows, positions, k, v)
            if whole:
                keys_i, values_i = self.kv.k[i][:, :, :span], self.kv.v[i][:, :, :span]
            else:
                keys_i = self.kv.k[i][rows, :, :span]
                values_i = self.kv.v[i][rows, :, :span]
            attended = F.scaled_dot_product_attention(
                q, keys_i.to(q.dtype), values_i.to(q.dtype), attn_mask=self_mask
            )
            x = x + layer.layer_scale_1(out_proj(self._merge(attended)))
            if layer.cross_attention is not None:
                weight, bias, out_proj = _projections(layer.cross_attention)
                q = self._heads(F.linear(layer.norm_cross(x), weight[:d], _slice(bias, 0, d)))
                if whole:
                    keys_i, values_i = self.cross.k[i], self.cross.v[i]
                else:
                    keys_i, values_i = self.cross.k[i][rows], self.cross.v[i][rows]
                attended = F.scaled_dot_product_attention(
                    q, keys_i.to(q.dtype), values_i.to(q.dtype), attn_mask=cross_mask
                )
                x = x + layer.layer_scale_cross(out_proj(self._merge(attended)))
            x = x + layer.layer_scale_2(layer._ff_block(layer.norm2(x)))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, S, D]`` -> ``[R, K, S, card]``, as ``LMModel.forward``."""
        lm = self.lm
        if lm.out_norm:
            hidden = lm.out_norm(hidden)
        return torch.stack([lm.linears[k](hidden) for k in range(self.codebooks)], dim=1)
