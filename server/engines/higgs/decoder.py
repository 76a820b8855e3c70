"""HiggsAudio v2's decoder as one batched forward over a static KV cache.

The weights are transformers' (``HiggsAudioV2ForConditionalGeneration`` still
loads them, so hub names, local folders and the test models keep working); this
module computes what the model's forward computes, for a table of rows at once:
a Llama decoder (RMSNorm, rotary positions, grouped-query attention, SwiGLU)
whose every layer has two paths, one for text tokens and one for audio tokens
(the "dual FFN": its own norms and feed-forward block for audio positions).

``prefill`` feeds a prompt (text tokens, with reference audio behind its
``<|AUDIO_OUT|>`` placeholders) to a few rows from a given position on; there
both paths run, each on its own positions. ``decode`` feeds one audio frame to
every row of the table: in the decode phase every position is audio, so only
the audio path runs, with fixed shapes and no host sync.

The step is bound by the number of operations it launches, not by arithmetic,
so the weights are read once at load into what the step needs: the query, key
and value projections as one matrix, the gate and up projections as one (the
model's modules then hold views of them: the weights are not held twice), the
rotary tables, the audio embedding as one table, every projection's weight
transposed once (``Dense``). The attention mask and the cache's views are made
once a step, not in every layer (``LayerMask``, ``StaticKV.layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from .. import fused
from ..dense import Attend, Dense, Packing, pack, step_attention
from ..kv import CacheRows, LayerMask, StaticKV
from ..pipelining import upload
from ..prefill import GroupAttention, packed, ragged

__all__ = ["HiggsDecoder"]


@dataclass(frozen=True, slots=True)
class _Path:
    """One layer's norms and feed-forward block for text or for audio positions."""

    norm1: torch.Tensor
    norm2: torch.Tensor
    gate_up: Dense  # [2I, D]: the gate and up projections, one matrix
    down: Dense


PathOp = Callable[[_Path, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class _Fused:
    """One layer's decode step as four fused kernels (``fused``): the audio
    path's first norm, the query, key and value projection, the rotary
    positions and the cache's write; the out projection and its residual sum; the second norm, the
    gate and up projection and ``silu(gate) * up``; the down projection and its
    residual sum."""

    qkv: fused.PairProduct
    out: fused.RowProduct
    gate_up: fused.PairProduct
    down: fused.RowProduct


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The library's attention, each group of query heads on its key/value head."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv: Dense  # [Dq + 2 Dkv, D]
    out: Dense
    text: _Path
    audio: _Path


def _cat_bias(*biases: torch.Tensor | None) -> torch.Tensor | None:
    if any(b is None for b in biases):
        return None
    return torch.cat([b for b in biases if b is not None])


def _joined(*linears: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of ``linears`` as one matrix, which the modules then
    share: each module's weight becomes a view of it, so the model keeps working
    and holds its weights once."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = _cat_bias(*(linear.bias for linear in linears))
    start = 0
    for linear in linears:
        rows = int(linear.weight.shape[0])
        linear.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _path(norm1: Any, norm2: Any, mlp: Any) -> _Path:
    gate_up, gate_up_bias = _joined(mlp.gate_proj, mlp.up_proj)
    return _Path(
        norm1=norm1.weight,
        norm2=norm2.weight,
        gate_up=Dense(gate_up, gate_up_bias),
        down=Dense(mlp.down_proj.weight, mlp.down_proj.bias),
    )


class HiggsDecoder(CacheRows):
    """Batched forward of a ``HiggsAudioV2ForConditionalGeneration``.

    Args:
        model: The loaded model (eval mode).
        rows: Initial rows of the table (it grows in powers of two).
        length: Initial positions per row (grows when a row needs more).
    """

    def __init__(self, model: Any, *, rows: int, length: int) -> None:
        with torch.no_grad():
            self._load(model, rows=rows, length=length)

    def _load(self, model: Any, *, rows: int, length: int) -> None:
        config = model.config
        if str(config.hidden_act) != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r}")
        inner = model.model
        self.model = model
        self.dim = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.dim // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.codebooks = int(config.num_codebooks)
        self.card = int(config.codebook_size)
        first = inner.embed_tokens.weight
        self.device = first.device
        self.dtype = first.dtype
        self.layers = []
        for layer in inner.layers:
            attn = layer.self_attn
            qkv, qkv_bias = _joined(attn.q_proj, attn.k_proj, attn.v_proj)
            self.layers.append(
                _Layer(
                    qkv=Dense(qkv, qkv_bias),
                    out=Dense(attn.o_proj.weight, attn.o_proj.bias),
                    text=_path(layer.input_layernorm, layer.post_attention_layernorm, layer.mlp),
                    audio=_path(
                        layer.audio_input_layernorm,
                        layer.audio_post_attention_layernorm,
                        layer.audio_mlp,
                    ),
                )
            )
        self._embed_text = first
        self._embed_audio = inner.embed_audio_tokens.embed_audio_tokens.weight
        self._audio_offsets = torch.arange(self.codebooks, device=self.device) * self.card
        self._final_norm = inner.norm.weight
        self._head = Dense(model.audio_lm_head.weight)
        self._rotary = inner.rotary_emb
        # The rotary table [L, d]: cosines, and sines with the first half negated
        # (``_rotate``); and the same as [L, 1, 1, d], for a decode step's rows.
        self._cos = torch.zeros(0, self.head_dim, device=self.device, dtype=self.dtype)
        self._sin = self._cos
        self._cos_rows, self._sin_rows = self._cos[:, None, None], self._sin[:, None, None]
        self._steps = torch.zeros(0, dtype=torch.int64, device=self.device)  # position indices
        self.kv = StaticKV(
            len(self.layers),
            self.kv_heads,
            self.head_dim,
            rows=rows,
            length=length + 1,
            device=self.device,
            dtype=self.dtype,
        )
        self._rope_table(self.kv.length)
        # The decode steps' layers as fused kernels (``fused``: 16-bit on CUDA).
        self._fused: list[_Fused] | None = None
        self._fused_head: fused.RowProduct | None = None
        if fused.available(self.device, self.dtype) and fused.PairProduct.suits(self.head_dim):
            eps, rotated = self.eps, self.heads + self.kv_heads
            self._fused = [
                _Fused(
                    qkv=fused.PairProduct(
                        layer.qkv.weight,
                        layer.qkv.bias,
                        norm=fused.Norm.rms(layer.audio.norm1, eps),
                        head_dim=self.head_dim,
                        rotated=rotated,
                    ),
                    out=fused.RowProduct(layer.out.weight, layer.out.bias),
                    gate_up=fused.PairProduct(
                        layer.audio.gate_up.weight,
                        layer.audio.gate_up.bias,
                        norm=fused.Norm.rms(layer.audio.norm2, eps),
                        glu=True,
                    ),
                    down=fused.RowProduct(layer.audio.down.weight, layer.audio.down.bias),
                )
                for layer in self.layers
            ]
            self._fused_head = fused.RowProduct(
                self._head.weight, norm=fused.Norm.rms(self._final_norm, eps)
            )
        self.packing = Packing(0, 0)
        # The step's attention: the library's until ``pack_weights`` (the row
        # kernel's, where it suits).
        self._attend: Attend | None = None

    def pack_weights(self) -> Packing:
        """Pack the large weights a step multiplies (``dense.pack``), once: the
        audio path's (text runs only in prefills). The steps then attend by the
        row kernel where it suits (``dense.step_attention``)."""
        if not self.packing.applied:
            stepped = [self._head]
            for layer in self.layers:
                stepped += [layer.qkv, layer.out, layer.audio.gate_up, layer.audio.down]
            self._attend = step_attention(self.device, self.dtype, self.head_dim)
            self.packing = replace(pack(stepped), attention=self._attend is not None)
        return self.packing

    def storage(self) -> tuple[Any, ...]:
        """What identifies where the step's tensors live: it changes exactly when
        the cache (or the rotary table) grows and its tensors move."""
        return (tuple(self.kv.k.shape), self._cos.shape[0])

    def ensure(self, *, rows: int = 0, length: int = 0) -> None:
        """Room for ``rows`` rows and ``length`` positions. Positions grow by half
        at least: a long dialogue's context (each chunk's prompt holds the ones
        spoken) grows the cache, copying it and dropping any recorded graphs, a
        few times rather than at every chunk."""
        self.kv.grow(rows=rows, length=self._grown(length) + 1)
        self._rope_table(self.kv.length)

    def _grown(self, length: int) -> int:
        return max(length, self.length + self.length // 2) if length > self.length else length

    def bytes_for(self, *, rows: int, length: int) -> int:
        """Bytes of the cache ``ensure`` would hold for these (at least what it holds)."""
        return self.kv.bytes_for(max(rows, self.rows), max(self._grown(length) + 1, self.kv.length))

    def _rope_table(self, length: int) -> None:
        """The rotary cosines and sines of positions ``0 .. length - 1``, as the
        model's own rotary module computes them (whatever its scaling rule)."""
        if self._cos.shape[0] >= length:
            return
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = self._rotary(probe, positions)
        half = self.head_dim // 2
        self._cos, self._sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
        self._cos_rows, self._sin_rows = self._cos[:, None, None], self._sin[:, None, None]
        self._steps = positions[0]

    # -- the two phases --------------------------------------------------------------

    def embed_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """Summed codebook embeddings of ``[..., K]`` codes: ``[..., D]``."""
        return F.embedding(codes + self._audio_offsets, self._embed_audio).sum(dim=-2)

    def prefill(
        self,
        rows: list[int],
        tokens: torch.Tensor | npt.NDArray[np.int64],
        audio: torch.Tensor | npt.NDArray[np.int64] | None,
        is_audio: npt.NDArray[np.bool_],
        start: int | Sequence[int],
        sizes: Sequence[int] | None = None,
        shared: Sequence[tuple[int, Sequence[int], int]] = (),
    ) -> torch.Tensor:
        """Feed ``tokens`` ``[R, S]`` to ``rows``, each at its own place.

        Rows of different lengths go in one call: a row's positions past its
        ``sizes`` are padding, which the forward leaves out (``packed``: the
        rows' own positions one after the other, so that the products cost
        what the rows feed, and attention runs per group of rows of one start
        and size, over their own positions only, causal from the start of a row).

        What comes from the host (the tokens and codes where they are there,
        where each position goes) goes to the device in one copy, without
        waiting for a step in flight.

        Args:
            tokens: Text token ids; at audio positions and padding a placeholder
                (any id).
            audio: The codes ``[N, K]`` of the audio positions, in order (row by row).
            is_audio: ``[R, S]``, on the host: which positions are audio (padding
                is not).
            start: The first position of each row (it holds that many already),
                or one for all.
            sizes: The positions of each row that are its own (``S`` if None).
            shared: ``(row, targets, length)``: the ``targets`` rows open with
                what ``row`` (one of ``rows``, fed from its start) feeds in its
                first ``length`` positions: each layer's keys and values of
                those positions are copied into them before they attend (the
                targets start at ``length``).

        Returns the logits ``[R, K, card]`` of each row's last position.
        """
        count, steps = tokens.shape
        starts, own = ragged(start, sizes, count, steps)
        self.ensure(length=int((starts + own).max()))
        layout = packed(starts, own, steps)
        device = self.device
        audible = is_audio.reshape(-1)  # of the padded positions, row by row
        spoken = audible if layout.whole else audible[layout.index]
        packed_audio = np.flatnonzero(spoken)
        packed_text = np.flatnonzero(~spoken)
        host: dict[str, npt.ArrayLike | torch.Tensor] = {
            "tokens": tokens,
            "index": layout.index,
            "audio_at": packed_audio,
            "text_at": packed_text,
            "last": layout.last,
            "rows": rows,
            "lengths": starts + own,
            **GroupAttention.inputs(layout, rows),
        }
        for i, (_, targets, _) in enumerate(shared):
            host[f"copy{i}"] = list(targets)
        if packed_audio.size:
            assert audio is not None and audio.shape[0] == packed_audio.size
            # ``audio`` is in the rows' order; the packed positions group rows.
            order = (np.cumsum(audible) - 1)[layout.index[packed_audio]]
            if not bool((order == np.arange(order.size)).all()):
                host["order"] = order
            host["audio"] = audio
        sent = upload(host, device)
        flat = sent["tokens"].view(-1)
        if not layout.whole:
            flat = flat.index_select(0, sent["index"])
        x = F.embedding(flat, self._embed_text)  # [T, D]
        audio_at, text_at = sent["audio_at"], sent["text_at"]
        if packed_audio.size:
            codes = sent["audio"]
            if "order" in sent:
                codes = codes[sent["order"]]
            x = x.index_copy(0, audio_at, self.embed_audio(codes))
        positions = sent["positions"]
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [T, 1, d]
        attention = GroupAttention(layout, rows, device, sent)
        cache_k, cache_v = self.kv.k, self.kv.v
        copies = [(row, sent[f"copy{i}"], length) for i, (row, _, length) in enumerate(shared)]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Store layer ``i``'s keys and values ``[T, H_kv, d]``; each group's
            attention, packed: ``[T, H * d]``."""
            attention.store(cache_k[i], cache_v[i], k, v)
            for row, targets, length in copies:
                cache_k[i][targets, :, :length] = cache_k[i][row, :, :length]
                cache_v[i][targets, :, :length] = cache_v[i][row, :, :length]
            return attention(q, cache_k[i], cache_v[i])

        def route(f: PathOp, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
            """``f(path, h)`` on each position, with its own path's weights."""
            if not packed_text.size:
                return f(layer.audio, h)
            if not packed_audio.size:
                return f(layer.text, h)
            text = f(layer.text, h.index_select(0, text_at))
            voiced = f(layer.audio, h.index_select(0, audio_at))
            out = h.new_empty((h.shape[0], text.shape[-1]))
            out.index_copy_(0, text_at, text)
            out.index_copy_(0, audio_at, voiced)
            return out

        hidden = self._forward(x, cos, sin, attend, route)
        self.lengths[sent["rows"]] = sent["lengths"].to(self.lengths.dtype)
        return self._logits(hidden[sent["last"]])

    def decode(self, codes: torch.Tensor, active: torch.Tensor, span: int | None = None) -> Any:
        """One audio frame for the first ``B`` rows: ``[B, K]`` codes -> ``[B, K, card]``.

        ``B`` (from the inputs' shape) is the table's rows, or fewer: the rows in
        use are the first ones, and a step over a few of them after a crowd has
        gone costs what a few rows cost (a handful of sizes, powers of two, keep
        the shapes static per size). Rows where ``active`` is False compute too
        but do not advance, and write their keys and values to the cache's last
        position, which holds no row's data; they attend to their first position
        only. ``span``: attend over the first ``span`` positions only (more than
        any active row's length).
        """
        rows = int(codes.shape[0])
        span = self.length if span is None else min(span, self.length)
        lengths = self.lengths[:rows]
        # An active row attends up to its new position; one sitting out, to its
        # first only (its output is not used: it need not read its whole span).
        seen = torch.where(active, lengths.clamp(max=span - 1), 0)  # [B]
        positions = torch.where(active, seen, self.length)
        # One position per row: the hidden state is ``[R, D]`` all through; the
        # queries and keys are rotated together, as one ``[R, H + H_kv, 1, d]`` view.
        x = self.embed_audio(codes)
        cos, sin = self._cos_rows[positions], self._sin_rows[positions]  # [R, 1, 1, d]
        mask = LayerMask((self._steps[:span] <= seen[:, None]).view(rows, 1, 1, span))
        attended_self = self.kv.layers(rows, span)
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        attend = self._attend
        if attend is None or torch.is_autocast_enabled("cpu"):
            attend = _grouped
        if self._fused is not None and rows <= fused.FUSED_ROWS:
            turns = (cos.view(rows, d), sin.view(rows, d))
            return self._fused_decode(x, active, positions, turns, mask, attend, attended_self)
        write = self.kv.step_pair_writer(positions)
        for i, layer in enumerate(self.layers):
            audio = layer.audio
            qkv = layer.qkv.rows(self._rms(x, audio.norm1)).view(rows, heads + 2 * kv_heads, 1, d)
            # The queries and keys rotated in place: the rotated key then lies
            # beside the value, and both go into the cache in one write.
            self._rotate(qkv[:, : heads + kv_heads], cos, sin, in_place=True)
            q = qkv[:, :heads]
            write(i, qkv[:, heads:].view(rows, 2, kv_heads, 1, d))
            keys, values = attended_self[i]
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            attended = attend(q, keys, values, mask.for_(q))
            x = x + layer.out.rows(attended.reshape(rows, heads * d))
            x = x + self._feed_forward(audio, x)
        lengths += active.to(lengths.dtype)
        return self._logits(x)

    def _fused_decode(
        self,
        x: torch.Tensor,
        active: torch.Tensor,
        positions: torch.Tensor,
        turns: tuple[torch.Tensor, torch.Tensor],
        mask: LayerMask,
        attend: Attend,
        attended_self: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """``decode``'s layers by the fused kernels (``_Fused``): the same
        operations, the norms, rotations, activations and residual sums inside
        the products, each row's rotated key and its value written into the
        cache at its ``positions`` by the projection's kernel (``turns``: each
        row's rotary cosines and sines ``[R, d]``; ``attended_self``: each
        layer's keys and values to attend)."""
        assert self._fused is not None and self._fused_head is not None
        rows = int(x.shape[0])
        heads, d = self.heads, self.head_dim
        cos, sin = turns
        caches = self.kv.pair_views(rows)
        for i, layer in enumerate(self._fused):
            store = fused.Store(caches[i], positions, heads)
            q = layer.qkv(x, cos, sin, store)[:, : heads * d].view(rows, heads, 1, d)
            keys, values = attended_self[i]
            attended = attend(q, keys, values, mask.for_(q))
            x = layer.out(attended.reshape(rows, heads * d), x)
            x = layer.down(layer.gate_up(x), x)
        self.lengths[:rows] += active.to(self.lengths.dtype)
        logits = self._fused_head(x)
        return logits.view(rows, self.codebooks, self.card)

    # -- internals ---------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``HiggsAudioV2RMSNorm``: float32 statistics, the weight in the model's dtype.

        A 16-bit model on CUDA normalizes by torch's fused kernel (one kernel
        where the formula launches five; a step of the 3B model has 57 norms),
        in float32 as the model does, then rounds and takes the weight as it
        does. Its sums go in another order, so a value may differ in its last
        bit (a test on CUDA bounds it)."""
        if x.dtype == torch.float32:  # (the same operations, less the conversions)
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)))
        h = x.float()
        if h.is_cuda:
            h = F.rms_norm(h, (h.shape[-1],), None, self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False
    ) -> torch.Tensor:
        """The model's ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)``
        is ``cat(-x2, x1)`` of ``x``'s halves: here ``cat(x2, x1)`` (a roll) times
        the sines with their first half negated (the rotary table's): the same
        products, since a sign flips exactly (four operations, not seven). With
        ``in_place``, into ``x`` itself (the same operations and values)."""
        turned = x.roll(x.shape[-1] // 2, -1) * sin
        if in_place:
            return x.mul_(cos).add_(turned)
        return x * cos + turned

    def _norm1(self, path: _Path, h: torch.Tensor) -> torch.Tensor:
        return self._rms(h, path.norm1)

    def _feed_forward(self, path: _Path, h: torch.Tensor) -> torch.Tensor:
        """The feed-forward block on ``h`` ``[N, D]`` (a decode step's rows, a
        prefill's positions of one path) or ``[R, S, D]``."""
        flat = h.dim() == 2
        gate_up = path.gate_up.rows if flat else path.gate_up
        down = path.down.rows if flat else path.down
        gate, up = gate_up(self._rms(h, path.norm2)).chunk(2, dim=-1)
        return down(F.silu(gate) * up)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        route: Callable[[PathOp, _Layer, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The decoder layers on ``x`` ``[T, D]`` (a prefill's positions, packed).

        ``attend(i, q, k, v)`` stores layer ``i``'s new keys and values and returns
        the attention's output ``[T, H * d]``; ``route(f, layer, h)`` applies
        ``f(path, h)`` to each position with its path's weights (text or audio).
        """
        count = x.shape[0]
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            normed = route(self._norm1, layer, x)
            qkv = layer.qkv(normed).view(count, heads + 2 * kv_heads, d)
            qk, v = qkv.split((heads + kv_heads, kv_heads), dim=1)
            q, k = self._rotate(qk, cos, sin).split((heads, kv_heads), dim=1)
            x = x + layer.out(attend(i, q, k, v))
            x = x + route(self._feed_forward, layer, x)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, D]`` -> ``[R, K, card]``."""
        logits = self._head.rows(self._rms(hidden, self._final_norm))
        return logits.view(hidden.shape[0], self.codebooks, self.card)
