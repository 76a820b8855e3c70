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

The step is bound by the number of operations it launches, not by arithmetic
(a kernel launch on a GPU, the dispatcher on a CPU), so the weights are read
once at load into what the step needs: the K embedding tables as one table, the
K output heads as one matrix, the sinusoidal positions as a table, each layer's
norms and projections as plain tensors (the projections' weights transposed
once: ``Dense``). What every layer of a step would make again is made once a
step: the attention masks (``LayerMask``) and the cache's views (``StaticKV.layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from audiocraft.modules.transformer import create_sin_embedding
from torch import nn
from torch.nn import functional as F

from .. import fused
from ..dense import Attend, Dense, Packing, pack, step_attention
from ..kv import CacheRows, LayerMask, StaticKV, additive_mask
from ..pipelining import upload
from ..prefill import GroupAttention, packed, ragged

__all__ = ["MusicGenDecoder"]

Op = Callable[[torch.Tensor], torch.Tensor]


def _projections(attention: Any) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear]:
    """In-projection weight and bias ``[3D, D]`` (q, k, v) and the out-projection."""
    if attention.custom:
        return attention.in_proj_weight, attention.in_proj_bias, attention.out_proj
    mha = attention.mha
    return mha.in_proj_weight, mha.in_proj_bias, mha.out_proj


def _slice(bias: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if bias is None else bias[start:end]


def _norm(module: nn.Module) -> Op:
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        if weight is not None and weight.dtype != torch.float32:
            # 16-bit weights: in float32, as CUDA's autocast runs audiocraft's
            # layer norms (a CPU's autocast leaves them to fail on mixed formats).
            weight = weight.float()
            bias = None if bias is None else bias.float()
            return lambda x: F.layer_norm(x.float(), shape, weight, bias, eps)
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    op: Op = module
    return op


def _scale(module: nn.Module) -> Op | None:
    """A layer-scale module, or None where it is the identity."""
    return None if isinstance(module, nn.Identity) else module


@dataclass(frozen=True, slots=True)
class _Layer:
    """One transformer layer's weights, read once."""

    norm1: Op
    qkv: Dense
    out: Dense
    scale1: Op | None
    norm2: Op
    ff1: Dense
    activation: Op
    ff2: Dense
    scale2: Op | None
    # Cross-attention (None where the layer has none): query, key/value and out projections.
    norm_cross: Op | None = None
    q: Dense | None = None
    kv: Dense | None = None
    cross_out: Dense | None = None
    scale_cross: Op | None = None

    @classmethod
    def of(cls, layer: Any, dim: int) -> _Layer:
        weight, bias, out = _projections(layer.self_attn)
        cross: dict[str, Any] = {}
        if layer.cross_attention is not None:
            c_weight, c_bias, c_out = _projections(layer.cross_attention)
            cross = {
                "norm_cross": _norm(layer.norm_cross),
                "q": Dense(c_weight[:dim], _slice(c_bias, 0, dim)),
                "kv": Dense(c_weight[dim:], _slice(c_bias, dim, 3 * dim)),
                "cross_out": Dense(c_out.weight, c_out.bias),
                "scale_cross": _scale(layer.layer_scale_cross),
            }
        return cls(
            norm1=_norm(layer.norm1),
            qkv=Dense(weight, bias),
            out=Dense(out.weight, out.bias),
            scale1=_scale(layer.layer_scale_1),
            norm2=_norm(layer.norm2),
            ff1=Dense(layer.linear1.weight, layer.linear1.bias),
            activation=layer.activation,
            ff2=Dense(layer.linear2.weight, layer.linear2.bias),
            scale2=_scale(layer.layer_scale_2),
            **cross,
        )


@dataclass(frozen=True, slots=True)
class _Fused:
    """One layer's products of a step as ``fused.RowProduct``: each with the norm
    before it (``qkv``, ``q``, ``ff1``), the GELU after it (``ff1``, where the
    model's activation is GELU), or the residual sum after it (``out``,
    ``cross_out``, ``ff2``); ``qkv`` writes the cache's keys and values too."""

    qkv: fused.RowProduct
    out: fused.RowProduct
    ff1: fused.RowProduct
    ff2: fused.RowProduct
    q: fused.RowProduct | None
    cross_out: fused.RowProduct | None
    # The model's activation, where it is not GELU (applied between ff1 and ff2).
    activation: Op | None

    @classmethod
    def of(cls, layer: _Layer, modules: Any, dtype: torch.dtype) -> _Fused | None:
        """``layer``'s fused products in ``dtype`` (the step's autocast format),
        or None where the layer is not the shape they compute (layer scales,
        norms other than layer norms)."""
        norms = [modules.norm1, modules.norm2]
        if layer.norm_cross is not None:
            norms.append(modules.norm_cross)
        if any(type(norm) is not nn.LayerNorm for norm in norms):
            return None
        if (layer.scale1, layer.scale2, layer.scale_cross) != (None, None, None):
            return None
        gelu = layer.activation is F.gelu
        device = layer.qkv.weight.device

        def of(dense: Dense, **options: Any) -> fused.RowProduct:
            return fused.RowProduct(dense.weight, dense.bias, dtype=dtype, **options)

        q = cross_out = None
        if layer.q is not None and layer.cross_out is not None:
            q = of(layer.q, norm=fused.Norm.of(modules.norm_cross, device))
            cross_out = of(layer.cross_out)
        return cls(
            qkv=of(layer.qkv, norm=fused.Norm.of(modules.norm1, device)),
            out=of(layer.out),
            ff1=of(layer.ff1, norm=fused.Norm.of(modules.norm2, device), gelu=gelu),
            ff2=of(layer.ff2),
            q=q,
            cross_out=cross_out,
            activation=None if gelu else layer.activation,
        )


class MusicGenDecoder(CacheRows):
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
        # The tensors read from the weights are plain tensors, not parts of an
        # autograd graph.
        with torch.no_grad():
            self._load(lm, rows=rows, length=length, cross_length=cross_length, dtype=dtype)

    def _load(
        self, lm: Any, *, rows: int, length: int, cross_length: int, dtype: torch.dtype
    ) -> None:
        transformer = lm.transformer
        if transformer.positional_embedding != "sin":
            raise ValueError("only sinusoidal positions are supported")
        self.lm = lm
        self.transformer = transformer
        layers = list(transformer.layers)
        first = layers[0].self_attn
        for layer in layers:
            attention = layer.self_attn
            if not layer.norm_first or attention.rope is not None or attention.kv_repeat != 1:
                raise ValueError("unsupported transformer layout")
            if attention.past_context is not None or attention.qk_layer_norm:
                raise ValueError("unsupported attention options")
            if attention.attention_as_float32:
                raise ValueError("unsupported attention options")
        self.dim = int(lm.dim)
        self.heads = int(first.num_heads)
        self.head_dim = self.dim // self.heads
        self.codebooks = int(lm.num_codebooks)
        self.card = int(lm.card)
        self.layers = [_Layer.of(layer, self.dim) for layer in layers]
        device = next(iter(lm.parameters())).device
        self.device = device
        self.dtype = dtype
        # The K embedding tables as one (codebook k's token t at row k * (card + 1) + t),
        # the K output heads as one matrix.
        tables = [lm.emb[k].weight for k in range(self.codebooks)]
        self._emb = torch.cat(tables)
        self._emb_offsets = (
            torch.arange(self.codebooks, device=device) * int(tables[0].shape[0])
        ).view(1, -1, 1)
        linears = [lm.linears[k] for k in range(self.codebooks)]
        biases = [lin.bias for lin in linears]
        self._head = Dense(
            torch.cat([lin.weight for lin in linears]),
            None if biases[0] is None else torch.cat(biases),
        )
        self._out_norm: Op | None = _norm(lm.out_norm) if lm.out_norm else None
        # The steps' products as fused kernels (``fused``; 16-bit on CUDA), where
        # every layer is their shape: ``None`` otherwise.
        self._fused: list[_Fused] | None = None
        self._fused_head: fused.RowProduct | None = None
        if fused.available(device, dtype):
            pairs = zip(self.layers, layers, strict=True)
            each = [_Fused.of(mine, theirs, dtype) for mine, theirs in pairs]
            out_norm = lm.out_norm
            if (out_norm is None or type(out_norm) is nn.LayerNorm) and None not in each:
                self._fused = [f for f in each if f is not None]
                # (audiocraft keeps the heads in float32 under float16 autocast,
                # which casts them at every step: here once.)
                self._fused_head = fused.RowProduct(
                    self._head.weight,
                    self._head.bias,
                    norm=None if out_norm is None else fused.Norm.of(out_norm, device),
                    dtype=dtype,
                )
        self._pos_scale = float(transformer.positional_scale)
        # The sinusoidal positions, scaled, and position indices (masks compare them).
        self._positions = torch.zeros(0, self.dim, device=device, dtype=self._emb.dtype)
        # The rows' additive cross-attention masks ``[rows, 1, 1, C]`` (0 up to each
        # row's conditioning length, -inf after), by the queries' dtype: they
        # change only when a row's conditions are set, which updates them in place
        # (a recorded step reads the same storage).
        self._cross_masks: dict[torch.dtype, torch.Tensor] = {}
        self._steps = torch.zeros(0, dtype=torch.int64, device=device)
        n = len(self.layers)
        self.kv = StaticKV(
            n, self.heads, self.head_dim, rows=rows, length=length + 1, device=device, dtype=dtype
        )
        # The conditioning's keys and values; a fresh row attends to one (zero) position.
        self.cross = StaticKV(
            n,
            self.heads,
            self.head_dim,
            rows=rows,
            length=cross_length,
            device=device,
            dtype=dtype,
            fill=1,
        )
        self.has_cross = any(layer.kv is not None for layer in self.layers)
        self._tables()
        self.packing = Packing(0, 0)
        # The step's attention: the library's until ``pack_weights`` (the row
        # kernel's, where it suits).
        self._attend: Attend | None = None

    def pack_weights(self) -> Packing:
        """Pack the large weights a step multiplies (``dense.pack``), once; the
        conditioning's ``kv`` too (a request's first step projects its few
        positions). The steps then attend by the row kernel where it suits
        (``dense.step_attention``)."""
        if not self.packing.applied:
            stepped = [self._head]
            for layer in self.layers:
                stepped += [layer.qkv, layer.out, layer.ff1, layer.ff2]
                stepped += [d for d in (layer.q, layer.kv, layer.cross_out) if d is not None]
            self._attend = step_attention(self.device, self.dtype, self.head_dim)
            self.packing = replace(pack(stepped), attention=self._attend is not None)
        return self.packing

    def storage(self) -> tuple[Any, ...]:
        """What identifies where the step's tensors live: it changes exactly when
        the cache (or the position table) grows and its tensors move."""
        return (tuple(self.kv.k.shape), tuple(self.cross.k.shape), self._positions.shape[0])

    @property
    def cross_lengths(self) -> torch.Tensor:
        """``[rows]``: how many conditioning positions each row attends to."""
        return self.cross.lengths

    def clear(self, rows: list[int]) -> None:
        """Zero ``rows``' keys and values, their own and their conditions' (a failed
        request's, before its rows are reused: a NaN it left at a position that the
        next request masks still reaches it, as a masked value times a zero weight)."""
        self.kv.clear(rows)
        self.cross.clear(rows)

    def ensure(self, *, rows: int = 0, length: int = 0, cross_length: int = 0) -> None:
        """Room for ``rows`` rows, ``length`` positions and ``cross_length`` conditions."""
        self.kv.grow(rows=rows, length=length + 1)
        self.cross.grow(rows=rows, length=cross_length)
        self._tables()

    def bytes_for(self, *, rows: int, length: int, cross_length: int) -> int:
        """Bytes of the caches ``ensure`` would hold for these (at least what they hold)."""
        kv = self.kv.bytes_for(max(rows, self.rows), max(length + 1, self.kv.length))
        cross = self.cross.bytes_for(max(rows, self.rows), max(cross_length, self.cross.length))
        return kv + cross

    def _tables(self) -> None:
        """The scaled sinusoidal embedding of positions ``0 .. T - 1`` (``[T, D]``) and
        the indices ``0 .. max(T, C) - 1``, for the cache's ``T`` positions and ``C``
        conditions."""
        length = self.kv.length
        if self._positions.shape[0] < length:
            positions = torch.arange(length, device=self.device).view(1, length, 1)
            table = create_sin_embedding(
                positions, self.dim, max_period=self.transformer.max_period, dtype=self._emb.dtype
            )
            self._positions = self._pos_scale * table[0]
        steps = max(length, self.cross.length)
        if self._steps.shape[0] < steps:
            self._steps = torch.arange(steps, device=self.device)

    # -- loading a row -------------------------------------------------------------

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed codebook embeddings of ``[R, K, S]`` codes: ``[R, S, D]``."""
        looked_up = F.embedding(codes + self._emb_offsets, self._emb)  # [R, K, S, D]
        if looked_up.dtype == torch.float32:
            # One reduction, which adds the codebooks in order as the model does
            # (in float32; a 16-bit one rounds once at the end, where the model
            # rounds after every add).
            return looked_up.sum(1)
        total = looked_up[:, 0]
        for k in range(1, self.codebooks):
            total = total + looked_up[:, k]
        return total

    def set_conditions(
        self, rows: list[int], source: torch.Tensor | None, lengths: Sequence[int] | None = None
    ) -> None:
        """Cross-attention keys and values of ``source`` ``[R, C, D]`` for ``rows``.

        ``lengths``: each row's own conditions, the first ones of its ``C`` (None:
        all ``C``); past them, padding, which the row's mask keeps out. So the
        conditions of several requests go in one call (a crowd's first step: one
        projection a layer for all, not one a request).
        """
        if not self.has_cross:
            return
        assert source is not None, "this model cross-attends to its conditioning"
        length = int(source.shape[1])
        self.ensure(cross_length=length)
        sent = upload(
            {"rows": rows, "lengths": [max(n, 1) for n in lengths or [length] * len(rows)]},
            self.device,
        )
        index = sent["rows"]
        positions = torch.arange(length, device=self.device).expand(len(rows), length)
        for i, layer in enumerate(self.layers):
            assert layer.kv is not None
            k, v = layer.kv(source).split(self.dim, dim=-1)
            self.cross.write(i, index, positions, self._heads(k), self._heads(v))
        self.cross_lengths[index] = sent["lengths"].to(self.cross_lengths.dtype)
        for dtype, table in self._cross_masks.items():
            if self._fits_cross(table):
                table[index] = self._additive_cross(self.cross_lengths[index], dtype)

    def _cross_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Every row's additive cross-attention mask in ``dtype`` (made anew when
        the conditions' cache has grown)."""
        table = self._cross_masks.get(dtype)
        if table is None or not self._fits_cross(table):
            table = self._cross_masks[dtype] = self._additive_cross(self.cross_lengths, dtype)
        return table

    def _fits_cross(self, table: torch.Tensor) -> bool:
        rows, conditions = int(table.shape[0]), int(table.shape[-1])
        return rows == self.cross.rows and conditions == self.cross.length

    def _additive_cross(self, lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[R, 1, 1, C]``: 0 where a row of ``lengths`` attends, -inf elsewhere."""
        conditions = self.cross.length
        keep = (self._steps[:conditions] < lengths[:, None]).view(-1, 1, 1, conditions)
        return additive_mask(keep, dtype)

    def prefill(
        self,
        rows: list[int],
        inputs: torch.Tensor,
        start: int | Sequence[int] = 0,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Feed ``inputs`` ``[R, S, D]`` (embeddings) to ``rows``, each at its own place.

        A long prompt goes in as several calls, each continuing where the last
        one stopped. Rows of different lengths go in one call: a row's positions
        past its ``sizes`` are padding, which the forward leaves out (``packed``:
        the rows' own positions one after the other; self-attention per group of
        rows of one place and size, causal from a row's start; cross-attention
        per group too). ``start``: each row's first position, or one for all.
        Returns the logits ``[R, K, card]`` of each row's last position.
        """
        count, steps, _ = inputs.shape
        starts, own = ragged(start, sizes, count, steps)
        self.ensure(length=int((starts + own).max()))
        layout = packed(starts, own, steps)
        device = self.device
        # The call's host inputs, in one copy.
        sent = upload(
            {
                "index": layout.index,
                "last": layout.last,
                "rows": rows,
                "lengths": starts + own,
                **GroupAttention.inputs(layout, rows),
            },
            device,
        )
        x = inputs.reshape(count * steps, -1)
        if not layout.whole:
            x = x.index_select(0, sent["index"])
        x = x + self._positions[sent["positions"]].to(x.dtype)  # [T, D]
        attention = GroupAttention(layout, rows, device, sent)
        cache_k, cache_v = self.kv.k, self.kv.v
        heads, d = self.heads, self.head_dim

        def attend_self(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Store layer ``i``'s keys and values (``[T, D]``); the groups'
            attention, packed: ``[T, D]``."""
            attention.store(cache_k[i], cache_v[i], k.view(-1, heads, d), v.view(-1, heads, d))
            return attention(q.view(-1, heads, d), cache_k[i], cache_v[i])

        cross = None
        if self.has_cross:
            conditions = self.cross.length
            masks = [
                LayerMask(
                    (self._steps[:conditions] < self.cross_lengths[held][:, None]).view(
                        -1, 1, 1, conditions
                    )
                )
                for _, held, _ in attention.parts
            ]

            def cross(i: int, q: torch.Tensor) -> torch.Tensor:
                """Each group's queries ``[T, D]`` against its rows' conditions."""

                def conditioned(
                    g: int, queries: torch.Tensor, held: torch.Tensor | slice, _: Any
                ) -> torch.Tensor:
                    attended: torch.Tensor = F.scaled_dot_product_attention(
                        queries,
                        self.cross.k[i][held].to(q.dtype),
                        self.cross.v[i][held].to(q.dtype),
                        attn_mask=masks[g].for_(queries),
                    )
                    return attended

                return attention.each(q.view(-1, heads, d), conditioned)

        hidden = self._forward(x, attend_self, cross)
        self.lengths[sent["rows"]] = sent["lengths"].to(self.lengths.dtype)
        last = hidden[sent["last"]]
        return self._logits(last[:, None])[:, :, 0]

    # -- the decode step -----------------------------------------------------------

    def decode(
        self, codes: torch.Tensor, active: torch.Tensor, span: int | None = None
    ) -> torch.Tensor:
        """One position for the first ``B`` rows: ``[B, K]`` codes -> ``[B, K, card]``.

        ``B`` (from the inputs' shape) is the table's rows, or fewer: the rows in
        use are the first ones, and a step over a few of them after a crowd has
        gone costs what a few rows cost (a handful of sizes, powers of two, keep
        the shapes static per size). Rows where ``active`` is False compute too
        (fixed shapes) but do not advance, and write their keys and values to
        the cache's last position, which holds no row's data (an idle row, or
        one whose prompt is still being prefilled, keeps its cache intact); they
        attend to their first position only. ``span``: attend over the first
        ``span`` positions only (more than any active row's length; a few fixed
        values keep the shapes static per value).
        """
        rows = int(codes.shape[0])
        span = self.length if span is None else min(span, self.length)
        lengths = self.lengths[:rows]
        # An active row attends up to its new position; one sitting out, to its
        # first only (its output is not used: it need not read its whole span).
        seen = torch.where(active, lengths.clamp(max=span - 1), 0)  # [R]
        positions = torch.where(active, seen, self.length)
        # One position per row: the hidden state is ``[R, D]`` all through, and a
        # row's query, keys and values are views of its projections (no copies).
        x = self.embed(codes[:, :, None])[:, 0]
        x = x + self._positions[positions].to(x.dtype)
        steps = self._steps
        self_mask = LayerMask((steps[:span] <= seen[:, None]).view(rows, 1, 1, span))
        attended_self = self.kv.layers(rows, span)
        attended_cross = self.cross.layers(rows)
        attend = self._attend
        if attend is None or torch.is_autocast_enabled("cpu"):
            attend = F.scaled_dot_product_attention
        if self._fused is not None and rows <= fused.FUSED_ROWS:
            views = (attended_self, attended_cross)
            return self._fused_decode(x, active, positions, self_mask, attend, views)
        write = self.kv.step_pair_writer(positions)
        cross_mask: torch.Tensor | None = None
        heads = (rows, self.heads, 1, self.head_dim)
        same = x.dtype == self.dtype
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv.rows(layer.norm1(x)).view(rows, 3, *heads[1:])
            q = qkv[:, 0]
            write(i, qkv[:, 1:])  # (the row's key and value, side by side)
            keys, values = attended_self[i]
            if not same:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            attended = attend(q, keys, values, self_mask.for_(q))
            h = layer.out.rows(attended.reshape(rows, self.dim))
            x = x + (h if layer.scale1 is None else layer.scale1(h))
            if layer.norm_cross is not None:
                assert layer.q is not None and layer.cross_out is not None
                q = layer.q.rows(layer.norm_cross(x)).view(heads)
                keys, values = attended_cross[i]
                if not same:
                    keys, values = keys.to(q.dtype), values.to(q.dtype)
                if cross_mask is None or cross_mask.dtype != q.dtype:
                    cross_mask = self._cross_mask(q.dtype)[:rows]
                attended = attend(q, keys, values, cross_mask)
                h = layer.cross_out.rows(attended.reshape(rows, self.dim))
                x = x + (h if layer.scale_cross is None else layer.scale_cross(h))
            h = layer.ff2.rows(layer.activation(layer.ff1.rows(layer.norm2(x))))
            x = x + (h if layer.scale2 is None else layer.scale2(h))
        lengths += active.to(lengths.dtype)
        if self._out_norm is not None:
            x = self._out_norm(x)
        logits = self._head.rows(x)
        return logits.view(rows, self.codebooks, self.card)

    def _fused_decode(
        self,
        x: torch.Tensor,
        active: torch.Tensor,
        positions: torch.Tensor,
        self_mask: LayerMask,
        attend: Attend,
        views: tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], ...],
    ) -> torch.Tensor:
        """``decode``'s layers by the fused products (``_Fused``): the same
        operations, the norms, activations and residual sums inside them, each
        row's key and value written into the cache at its ``positions`` by the
        projection's kernel (``views``: each layer's keys and values to attend,
        its own and its conditions')."""
        assert self._fused is not None and self._fused_head is not None
        rows = int(x.shape[0])
        heads = (rows, self.heads, 1, self.head_dim)
        attended_self, attended_cross = views
        caches = self.kv.pair_views(rows)
        cross_mask: torch.Tensor | None = None
        for i, layer in enumerate(self._fused):
            store = fused.Store(caches[i], positions, self.dim)
            q = layer.qkv(x, store=store)[:, : self.dim].view(heads)
            keys, values = attended_self[i]
            attended = attend(q, keys, values, self_mask.for_(q))
            x = layer.out(attended.reshape(rows, self.dim), x)
            if layer.q is not None and layer.cross_out is not None:
                q = layer.q(x).view(heads)
                keys, values = attended_cross[i]
                if cross_mask is None:
                    cross_mask = self._cross_mask(q.dtype)[:rows]
                attended = attend(q, keys, values, cross_mask)
                x = layer.cross_out(attended.reshape(rows, self.dim), x)
            h = layer.ff1(x)
            if layer.activation is not None:
                h = layer.activation(h)
            x = layer.ff2(h, x)
        self.lengths[:rows] += active.to(self.lengths.dtype)
        logits = self._fused_head(x)
        return logits.view(rows, self.codebooks, self.card)

    # -- internals -----------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, S, D]`` -> ``[R, H, S, d]``."""
        count, steps, _ = x.shape
        return x.view(count, steps, self.heads, self.head_dim).transpose(1, 2)

    def _forward(
        self,
        x: torch.Tensor,
        attend_self: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        cross: Callable[[int, torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        """The transformer layers on ``x`` ``[T, D]`` (a prefill's positions,
        packed, positions already added).

        ``attend_self(i, q, k, v)`` stores layer ``i``'s new keys and values and
        returns the self-attention's output ``[T, D]``; ``cross(i, q)`` the
        cross-attention's over the conditioning of each position's row.
        """
        d = self.dim
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.norm1(x)).split(d, dim=-1)
            h = layer.out(attend_self(i, q, k, v))
            x = x + (h if layer.scale1 is None else layer.scale1(h))
            if layer.norm_cross is not None:
                assert cross is not None
                assert layer.q is not None and layer.cross_out is not None
                h = layer.cross_out(cross(i, layer.q(layer.norm_cross(x))))
                x = x + (h if layer.scale_cross is None else layer.scale_cross(h))
            h = layer.ff2(layer.activation(layer.ff1(layer.norm2(x))))
            x = x + (h if layer.scale2 is None else layer.scale2(h))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, S, D]`` -> ``[R, K, S, card]``, as ``LMModel.forward``."""
        if self._out_norm is not None:
            hidden = self._out_norm(hidden)
        count, steps, _ = hidden.shape
        logits = self._head(hidden)
        return logits.view(count, steps, self.codebooks, self.card).transpose(1, 2)
