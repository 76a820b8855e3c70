"""Codec decoders run incrementally: each layer keeps what its next input needs.

A codec decoder (EnCodec's SEANet, DAC) is a chain of convolutions, transposed
convolutions, LSTMs, residual blocks and pointwise activations over time. None
of them needs the whole sequence at once:

* a convolution of ``pl + pr + 1`` taps (zero padding ``pl`` left, ``pr`` right)
  keeps its last ``pl + pr`` input samples; each new input sample completes one
  output, ``pr`` samples late; at the end of the stream it reads ``pr`` zeros;
* a transposed convolution keeps the partial sums of the samples the next input
  still adds to (its overlap), and trims its padding from the stream's ends;
* an LSTM keeps its hidden and cell state;
* a residual block keeps the skip path's samples until the block's output for
  them arrives.

``IncrementalCodec`` builds such a chain from a loaded decoder, and decodes new
frames of many streams in one call, each stream's layers continuing from its own
``CodecState``. The audio equals a one-shot decode of all the stream's codes to
float rounding, at the cost of decoding each frame once (re-decoding windows
with left and right context costs 1.5-4x that), and audio leaves as soon as no
later code can change it (``lookahead`` frames behind the newest).

On a CPU each convolution runs as the library's kernel, as one matrix product
over shifted copies of its input, or by the row kernel's C library
(``rowkernel.RowKernel.conv``: samples in the lanes, a few outputs at a time),
whichever ``choose_forms`` measured fastest at warm-up for its shape (oneDNN's
kernels for a few channels and a batch of streams take 2-7x the product's time,
and for a few outputs over long inputs 2-7x the C library's,
``bench/bench_conv.py``; for wide layers the library's are the faster), the
same audio to float rounding. A residual unit (an activation, a convolution,
the activation, a one-tap convolution, the join: DAC's and EnCodec's) also
runs as one call of the C library over tiles of time (``_Residual``), where
that measured faster: the same floats as its layers by the C library.

Layers it does not know (reflect padding, group normalisation, strides in a
plain convolution …) make ``incremental`` return None: the engine then decodes
windows instead (``codec_stream.StreamDecoder``).

On a GPU a call of a few frames is its hundreds of small kernels' launches (an
H200: 2.2 ms for musicgen-small's EnCodec, 5.6 ms for the 3B speech model's
DAC, a call of eight frames for one stream). ``record_calls`` records a steady
call of each shape (the streams' states' shapes, the number of streams and of
frames) as a CUDA graph, with the streams' states in buffers of its own that
each replay reads and writes over, so a crowd's steady calls launch once each
and copy nothing; the first calls of a stream (its start-up samples) and its
last stay eager. Off until measured on a GPU (``RECORD_CALLS``).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import codec_decoders, graphs, rowkernel

__all__ = [
    "MOST_RECORDED",
    "MOST_TABLE_BYTES",
    "RECORD_CALLS",
    "CodecState",
    "Forms",
    "IncrementalCodec",
    "Unsupported",
    "checked",
    "code_tables",
    "incremental",
    "steady_decode",
]

log = logging.getLogger(__name__)

# Engines whose steps are CUDA graphs record their codec's steady calls too
# (``IncrementalCodec.record_calls``): off until measured on a GPU (the
# benchmarks' ``--codec-graphs``).
RECORD_CALLS = False
# Recorded shapes kept (each holds its streams' states: the 3B speech model's
# DAC 0.54 MB a stream, musicgen-small's EnCodec 0.06 MB).
MOST_RECORDED = 32

_Tensors = tuple[torch.Tensor, ...]


class Unsupported(ValueError):
    """A decoder layer that cannot run incrementally (exactly)."""


@dataclass(slots=True)
class _Slot:
    """One layer's state for one stream or a batch of them: its tensors, and the
    output samples it has still to drop at the stream's start (its share of the
    padding)."""

    tensors: _Tensors
    skip: int


class _Op:
    """A layer over time: ``run`` maps new input samples ``[B, C, n]`` to the
    output samples they complete, given and updating its ``_Slot``; with
    ``final``, the stream ends after them (the right padding is read)."""

    index = -1  # the op's slot in a stream's state (``_number``)
    batch_dim = 0  # the streams' dimension in the op's tensors
    lookahead = 0.0  # input samples an output waits for
    rate = 1  # output samples per input sample

    def begin(self, x: torch.Tensor) -> _Slot | None:
        """The state of a new stream (``x``: an empty input, for dtype and device)."""
        return None

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        raise NotImplementedError

    def ops(self) -> list[_Op]:
        return [self]


def _check_weight(conv: nn.Module) -> None:
    # An old-style weight norm recomputes ``weight`` only in its forward hook,
    # which a functional call skips (``codec_decoders.for_serving`` folds it).
    if hasattr(conv, "weight_g") or hasattr(conv, "weight_v"):
        raise Unsupported("a weight norm not folded (codec_decoders.for_serving)")


def _copied(slots: Sequence[_Slot | None]) -> list[_Slot | None]:
    """New ``_Slot`` objects holding the same tensors (the layers replace a
    slot's tensors: a copy keeps the ones it was made with)."""
    return [None if slot is None else _Slot(slot.tensors, slot.skip) for slot in slots]


def _drop(slot: _Slot, y: torch.Tensor) -> torch.Tensor:
    if slot.skip:
        dropped = min(slot.skip, y.shape[-1])
        slot.skip -= dropped
        y = y[..., dropped:]
    return y


class _Pointwise(_Op):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        # A module's forward itself (no hooks are set on a served codec's layers:
        # its call's machinery is a tenth of a small activation's time).
        self._call = fn.forward if isinstance(fn, nn.Module) else fn
        self._into: Callable[[torch.Tensor, torch.Tensor], bool] | None = getattr(fn, "into", None)

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        return self._call(x) if x.shape[-1] else x

    def into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``run``'s samples written into ``out`` (of ``x``'s shape), where the
        activation can (``codec_decoders``' ``ELU`` and ``Snake`` by the row
        kernel); False, nothing written, where it cannot."""
        return self._into is not None and bool(self._into(x, out))


DIRECT, PRODUCT, KERNEL = "direct", "product", "kernel"


class _Formed(_Op):
    """A convolution that can run three ways, equal to float rounding: as the
    convolution library's kernel (``direct``), as one matrix product of its
    weights with shifted copies of its input (``product``), or by the row
    kernel's C library (``by_kernel``, where ``kernel`` is set: float32 on a
    CPU). Which is fastest depends on the layer's shape and the batch
    (``IncrementalCodec.choose_forms`` measures it on a CPU: oneDNN's kernels
    for tiny channel counts and batches of more than one, or for a wide
    transposed convolution over few frames, take 2-7x the product's time, and
    for one or two outputs over long inputs 2-7x the C library's); the choice
    holds for calls of one stream's rows (``one``) and for larger ones
    (``many``)."""

    one = DIRECT
    many = DIRECT
    many_from = 2  # the rows of a call from which ``many`` holds
    seen: list[torch.Tensor] | None = None  # inputs, while ``choose_forms`` records
    kernel: rowkernel.RowKernel | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            self.seen.append(x)
        form = self.many if x.shape[0] >= self.many_from else self.one
        if form == PRODUCT:
            return self.product(x)
        if form == KERNEL:
            return self.by_kernel(x)
        return self.direct(x)

    def forms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The forms this layer can take (the kernel's where it is set and prepared)."""
        forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            DIRECT: self.direct,
            PRODUCT: self.product,
        }
        if self.kernel is not None:
            forms[KERNEL] = self.by_kernel
        return forms

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def by_kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self) -> bool:
        """Make the product's weight matrix, and the kernel's weight where
        ``kernel`` is set; False if this layer has no product form."""
        raise NotImplementedError


def _shifted(x: torch.Tensor, taps: int, step: int, n: int) -> torch.Tensor:
    """``x [B, C, t]``'s ``taps`` windows of ``n`` samples, ``step`` apart, stacked
    along the channels: ``[B, taps * C, n]``."""
    if taps == 1 and x.shape[-1] == n:
        return x
    return torch.cat([x[..., u * step : u * step + n] for u in range(taps)], 1)


def _kernel_weight(weight: torch.Tensor, channels: int) -> torch.Tensor | None:
    """A convolution's weight ``[O, C, U]`` as the row kernel reads it
    (``RowKernel.conv_prepared``: float32, contiguous, ``channels`` inputs), or
    None where it is not float32."""
    if weight.dtype != torch.float32 or weight.dim() != 3 or weight.shape[1] != channels:
        return None
    return weight.contiguous()


def _kernel_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A convolution's bias as the row kernel reads it (contiguous, detached)."""
    return None if bias is None else bias.detach().contiguous()


class _Conv(_Formed):
    """A stride-1 convolution with zero padding ``left`` and ``right``."""

    def __init__(self, conv: nn.Conv1d, left: int, right: int) -> None:
        _check_weight(conv)
        if conv.stride[0] != 1 or conv.padding_mode != "zeros":
            raise Unsupported(f"convolution with stride {conv.stride} ({conv.padding_mode})")
        if (conv.kernel_size[0] - 1) * conv.dilation[0] != left + right:
            raise Unsupported("convolution padding does not keep the length")
        self.conv = conv
        self.left, self.right = left, right
        self.lookahead = float(right)
        self.matrix: torch.Tensor | None = None
        self.stacked: torch.Tensor | None = None  # [C_out, C_in, taps], for the kernel
        self.bias: torch.Tensor | None = None  # the kernel's (the convolution's, detached)

    def begin(self, x: torch.Tensor) -> _Slot | None:
        if self.left + self.right == 0:
            return None
        # The left padding, and ``right`` zeros more whose outputs are dropped:
        # every stream's buffer has the same length from the start.
        span = self.left + self.right
        buffer = x.new_zeros(x.shape[0], self.conv.in_channels, span)
        return _Slot((buffer,), self.right)

    def run(
        self,
        x: torch.Tensor,
        state: list[_Slot | None],
        final: bool,
        activation: _Pointwise | None = None,
    ) -> torch.Tensor:
        """With ``activation``: ``run(activation.run(x))``, the activation's
        samples written straight into this convolution's padded input where it
        can (not into a tensor of their own and then copied into the input
        joined with the buffer: a pass over the layer's samples saved), the
        same floats."""
        conv, slot = self.conv, state[self.index]
        n = x.shape[-1]
        if activation is not None and (slot is None or not n):  # (no input to write into)
            x, activation = activation.run(x, state, final), None
        if slot is None:
            return self.apply(x) if n else _empty(x, conv.out_channels)
        (buffer,) = slot.tensors
        if activation is None:
            parts = [buffer, x]
            if final:
                parts.append(x.new_zeros(x.shape[0], x.shape[1], self.right))
            padded = torch.cat(parts, -1)
        else:
            span = buffer.shape[-1]
            right = self.right if final else 0
            padded = x.new_empty(x.shape[0], x.shape[1], span + n + right)
            padded[..., :span] = buffer
            if right:
                padded[..., span + n :] = 0.0
            if not activation.into(x, padded[..., span : span + n]):
                padded[..., span : span + n] = activation.run(x, state, final)
        # (A copy: a view would keep the whole padded input alive.)
        slot.tensors = (padded[..., padded.shape[-1] - buffer.shape[-1] :].clone(),)
        if padded.shape[-1] == buffer.shape[-1]:
            return _empty(x, conv.out_channels)
        return _drop(slot, self.apply(padded))

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        out: torch.Tensor = F.conv1d(x, conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)
        return out

    def prepare(self) -> bool:
        conv = self.conv
        if conv.groups != 1:
            return False
        # Column ``u * C_in + i``: input channel ``i`` at tap ``u``.
        weight = conv.weight.detach()
        self.matrix = weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()
        if self.kernel is not None:
            self.stacked = _kernel_weight(weight, conv.in_channels)
            self.bias = _kernel_bias(conv.bias)
            if self.stacked is None or (self.bias is not None and self.bias.dtype != weight.dtype):
                self.kernel = None  # (not float32: no kernel form)
        return True

    def product(self, x: torch.Tensor) -> torch.Tensor:
        assert self.matrix is not None
        conv = self.conv
        taps, step = conv.kernel_size[0], conv.dilation[0]
        n = x.shape[-1] - (taps - 1) * step
        y = torch.matmul(self.matrix, _shifted(x, taps, step, n))
        if conv.bias is not None:
            y += conv.bias.view(1, -1, 1)
        return y

    def by_kernel(self, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None and self.stacked is not None
        return self.kernel.conv_prepared(x, self.stacked, self.bias, self.conv.dilation[0])


def _empty(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.new_zeros(x.shape[0], channels, 0)


class _ConvTranspose(_Formed):
    """A transposed convolution whose full output is trimmed by ``left`` and
    ``right`` samples at the stream's ends."""

    def __init__(self, conv: nn.ConvTranspose1d, left: int, right: int) -> None:
        _check_weight(conv)
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        if conv.dilation[0] != 1 or conv.groups != 1 or kernel < stride:
            raise Unsupported("transposed convolution with dilation, groups or gaps")
        self.conv = conv
        self.stride = stride
        self.overlap = kernel - stride  # output samples the next input still adds to
        self.left, self.right = left, right
        self.rate = stride
        self.lookahead = left / stride  # the trim delays every output sample
        if not 0 <= right <= self.overlap:
            raise Unsupported("transposed convolution trimmed past its overlap")
        self.taps = -(-kernel // stride)  # input samples an output sample sums
        self.matrix: torch.Tensor | None = None
        self.stacked: torch.Tensor | None = None  # [C_out * stride, C_in, taps], for the kernel

    def begin(self, x: torch.Tensor) -> _Slot | None:
        tail = x.new_zeros(x.shape[0], self.conv.out_channels, self.overlap)
        return _Slot((tail,), self.left)

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        slot = state[self.index]
        assert slot is not None
        (tail,) = slot.tensors
        n = x.shape[-1]
        if n:
            y = self.apply(x)
            y[..., : self.overlap] += tail
            out, tail = y[..., : n * self.stride], y[..., n * self.stride :].clone()
        else:
            out = tail[..., :0]
        if final:
            out = torch.cat([out, tail[..., : self.overlap - self.right]], -1)
        slot.tensors = (tail,)
        if self.conv.bias is not None:
            # In place: ``out`` is the call's own (``apply``'s output, the tail
            # cloned from it first, or joined), or empty.
            out += self.conv.bias.view(1, -1, 1)
        return _drop(slot, out)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        """The full output ``[B, C_out, (n - 1) * stride + kernel]``, without the bias."""
        out: torch.Tensor = F.conv_transpose1d(x, self.conv.weight, None, self.stride)
        return out

    def prepare(self) -> bool:
        # Output sample ``t * stride + r`` sums input ``t - j`` times tap
        # ``j * stride + r``, for j < taps: a convolution of ``taps`` taps with
        # ``stride`` outputs per input sample. Row ``o * stride + r``, column
        # ``u * C_in + i`` (tap ``u`` of the shifted input: j = taps - 1 - u).
        weight = self.conv.weight.detach()  # [C_in, C_out, kernel]
        c_in, c_out, kernel = weight.shape
        taps, stride = self.taps, self.stride
        padded = F.pad(weight, (0, taps * stride - kernel)).view(c_in, c_out, taps, stride)
        matrix = padded.flip(2).permute(1, 3, 2, 0).reshape(c_out * stride, taps * c_in)
        self.matrix = matrix.contiguous()
        if self.kernel is not None:
            stacked = matrix.view(c_out * stride, taps, c_in).transpose(1, 2)
            self.stacked = _kernel_weight(stacked, c_in)
            if self.stacked is None:
                self.kernel = None  # (not float32: no kernel form)
        return True

    def product(self, x: torch.Tensor) -> torch.Tensor:
        assert self.matrix is not None
        n = x.shape[-1]
        taps = self.taps
        inputs = n + taps - 1
        if taps > 1:
            x = F.pad(x, (taps - 1, taps - 1))
        y = torch.matmul(self.matrix, _shifted(x, taps, 1, inputs))  # [B, C_out * stride, t]
        return self._interleaved(y, n)

    def by_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``product``'s sums by the C library, over the padded input as it
        lies, each output sample written in its place (no interleaving pass)."""
        assert self.kernel is not None and self.stacked is not None
        n, taps = x.shape[-1], self.taps
        if taps > 1:
            x = F.pad(x, (taps - 1, taps - 1))
        y = self.kernel.conv_prepared(x, self.stacked, None, phases=self.stride)
        return y[..., : (n - 1) * self.stride + self.conv.kernel_size[0]]

    def _interleaved(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, C_out * stride, t]`` (row ``o * stride + r``: outputs ``t * stride
        + r``) -> the full output ``[B, C_out, (n - 1) * stride + kernel]``."""
        b, _, inputs = y.shape
        stride = self.stride
        y = y.view(b, -1, stride, inputs).transpose(2, 3).reshape(b, -1, inputs * stride)
        return y[..., : (n - 1) * stride + self.conv.kernel_size[0]]


class _LSTM(_Op):
    batch_dim = 1

    def __init__(self, lstm: nn.LSTM, skip: bool) -> None:
        if lstm.bidirectional or lstm.batch_first or lstm.proj_size:
            raise Unsupported("a bidirectional, batch-first or projected LSTM")
        self.lstm, self.skip = lstm, skip

    def begin(self, x: torch.Tensor) -> _Slot | None:
        shape = (self.lstm.num_layers, x.shape[0], self.lstm.hidden_size)
        return _Slot((x.new_zeros(shape), x.new_zeros(shape)), 0)

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        slot = state[self.index]
        assert slot is not None
        if not x.shape[-1]:
            return x
        steps = x.permute(2, 0, 1)
        h, c = slot.tensors
        y, (h, c) = self.lstm(steps, (h, c))
        slot.tensors = (h, c)
        if self.skip:
            y = y + steps
        out: torch.Tensor = y.permute(1, 2, 0)
        return out


class _Chain(_Op):
    def __init__(self, ops: Sequence[_Op]) -> None:
        self.children = list(ops)
        self.lookahead = 0.0
        self.rate = 1
        for op in self.children:
            self.lookahead += op.lookahead / self.rate
            self.rate *= op.rate
        # What a run calls, in order: each op, an activation before a convolution
        # going with it (written into the convolution's padded input: no join).
        self._runs: list[tuple[_Op, _Pointwise | None]] = []
        i = 0
        while i < len(self.children):
            op = self.children[i]
            after = self.children[i + 1] if i + 1 < len(self.children) else None
            if isinstance(op, _Pointwise) and isinstance(after, _Conv):
                self._runs.append((after, op))
                i += 2
            else:
                self._runs.append((op, None))
                i += 1

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        for op, activation in self._runs:
            if activation is None:
                x = op.run(x, state, final)
            else:
                assert isinstance(op, _Conv)
                x = op.run(x, state, final, activation=activation)
        return x

    def ops(self) -> list[_Op]:
        return [op for child in self.children for op in child.ops()]


class _Residual(_Op):
    """``shortcut(x) + block(x)``: the shortcut's samples wait for the block's.

    A residual unit (an activation, a convolution, the activation, a one-tap
    convolution back to the input's channels, no shortcut layer: DAC's with
    Snake, EnCodec's with ELU) also runs fused on a CPU
    (``RowKernel.residual_unit``: the same floats as its layers by the row
    kernel, over tiles of time that stay in cache, where the layers make a
    pass over memory each), once every layer is past its start-up samples (to
    the stream's end), where ``choose_forms`` measured it the faster
    (``one``: calls of one stream's rows; ``many``: larger ones)."""

    # The row kernel, for the join (``choose_forms`` sets it: float32 on a CPU).
    kernel: rowkernel.RowKernel | None = None
    one = False
    many = False
    many_from = 2
    seen: list[tuple[torch.Tensor, list[_Slot | None]]] | None = None  # (``choose_forms``)

    def __init__(self, block: _Op, shortcut: _Op | None) -> None:
        if block.rate != 1 or (shortcut is not None and (shortcut.lookahead or shortcut.rate != 1)):
            raise Unsupported("a residual block that changes the rate")
        self.block, self.shortcut = block, shortcut
        self.lookahead = block.lookahead
        self._parts = _unit_layers(block) if shortcut is None else None
        self.weights: tuple[rowkernel.Unit, rowkernel.Unit] | None = None  # (``prepare``)

    def begin(self, x: torch.Tensor) -> _Slot | None:
        return _Slot((x[..., :0],), 0)  # channels set at the first run

    def prepare(self) -> bool:
        """The fused form's weights as the kernel reads them, where the kernel
        is set and the unit's layers are float32; False if it has no fused form."""
        self.weights = None
        if self.kernel is None or self._parts is None:
            return False
        units = []
        for activation, conv in (
            (self._parts[0], self._parts[1]),
            (self._parts[2], self._parts[3]),
        ):
            fn, module = activation.fn, conv.conv
            weight = module.weight.detach()
            bias = None if module.bias is None else module.bias.detach().contiguous()
            channels = weight.shape[1]
            if isinstance(fn, codec_decoders.ELU):
                alpha = inverse = torch.full((channels,), float(fn.alpha))
            else:
                assert isinstance(fn, codec_decoders.Snake)
                alpha = fn.alpha.detach().reshape(-1).contiguous()
                inverse = fn.inverse.reshape(-1).contiguous()
            if any(t.dtype != torch.float32 for t in (alpha, inverse, weight)) or (
                bias is not None and bias.dtype != torch.float32
            ):
                return False
            units.append(
                rowkernel.Unit(
                    alpha,
                    inverse,
                    weight.contiguous(),
                    bias,
                    module.dilation[0],
                    isinstance(fn, codec_decoders.ELU),
                )
            )
        self.weights = (units[0], units[1])
        return True

    def run(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        if self.seen is not None:
            self.seen.append((x, _copied(state)))
        if self.weights is not None and (self.many if x.shape[0] >= self.many_from else self.one):
            out = self.fused(x, state, final)
            if out is not None:
                return out
        return self.layers(x, state, final)

    def fused(
        self, x: torch.Tensor, state: list[_Slot | None], final: bool = False
    ) -> torch.Tensor | None:
        """``layers`` in one call of the row kernel, where every layer is past its
        start-up samples (None, nothing run, where not: the layers then run).
        At the stream's end (``final``), the first convolution's right padding
        is zeros after its activation, which maps zero to zero: the call is a
        steady one over ``x`` and as many zeros (the samples waiting cover the
        padding's outputs, as the layers' last join takes them)."""
        assert self.kernel is not None and self.weights is not None and self._parts is not None
        slot, own = state[self.index], state[self._parts[1].index]
        assert slot is not None and own is not None
        (waiting,) = slot.tensors
        (buffer,) = own.tensors
        if own.skip or not waiting.shape[1] or torch.is_grad_enabled():
            return None
        if final:
            right = self._parts[1].right
            if waiting.shape[-1] < right:
                return None
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], right)], -1)
        made = self.kernel.residual_unit(x, buffer, waiting, *self.weights)
        if made is None:
            return None
        out, own_next, rest = made
        own.tensors, slot.tensors = (own_next,), (rest,)
        return out

    def layers(self, x: torch.Tensor, state: list[_Slot | None], final: bool) -> torch.Tensor:
        """``run`` layer by layer."""
        slot = state[self.index]
        assert slot is not None
        skip = x if self.shortcut is None else self.shortcut.run(x, state, final)
        (waiting,) = slot.tensors
        y = self.block.run(x, state, final)
        n = y.shape[-1]
        if not waiting.shape[1]:  # (the first run: no channels yet)
            waiting = skip[..., :0]
        held = waiting.shape[-1]
        joined = None if self.kernel is None else self.kernel.join_add(waiting, skip, y)
        if joined is not None:  # (one pass, where a call's few samples cost its operations)
            out, rest = joined
            slot.tensors = (rest,)
            return out
        if n <= held:
            slot.tensors = (torch.cat([waiting[..., n:], skip], -1),)
            return waiting[..., :n] + y
        # The waiting samples, then the skip path's: each output the same sum as
        # over the two joined, without copying the skip path's samples to join them.
        out = torch.empty_like(y)
        if held:
            torch.add(waiting, y[..., :held], out=out[..., :held])
        torch.add(skip[..., : n - held], y[..., held:], out=out[..., held:])
        slot.tensors = (skip[..., n - held :].clone(),)
        return out

    def ops(self) -> list[_Op]:
        own: list[_Op] = [self]
        shortcut = [] if self.shortcut is None else self.shortcut.ops()
        return own + shortcut + self.block.ops()


def _unit_layers(block: _Op) -> tuple[_Pointwise, _Conv, _Pointwise, _Conv] | None:
    """A residual unit's layers: an activation (DAC's ``Snake``, or an ``ELU``
    of a positive alpha), a convolution of stride 1 over ``C`` channels to
    ``H``, the same activation, a one-tap convolution of ``H`` to ``C`` (DAC's
    residual units; EnCodec's residual blocks, where ``H`` is ``C / 2``); None
    where ``block`` is not one."""
    if not isinstance(block, _Chain) or len(block.children) != 4:
        return None
    first, inner, second, outer = block.children
    if not (isinstance(first, _Pointwise) and isinstance(second, _Pointwise)):
        return None
    if not (isinstance(inner, _Conv) and isinstance(outer, _Conv)):
        return None
    fns = (first.fn, second.fn)
    if all(isinstance(fn, codec_decoders.ELU) for fn in fns):
        if not all(fn.alpha > 0 for fn in fns if isinstance(fn, codec_decoders.ELU)):
            return None  # (a positive alpha: ELU(0) is +0, as the padding)
    elif not all(isinstance(fn, codec_decoders.Snake) for fn in fns):
        return None
    a, b = inner.conv, outer.conv
    channels, hidden = a.in_channels, a.out_channels
    if a.groups != 1 or b.groups != 1 or b.kernel_size[0] != 1:
        return None
    if b.in_channels != hidden or b.out_channels != channels:
        return None
    if not inner.left + inner.right:  # (a one-tap first convolution: no buffer)
        return None
    return first, inner, second, outer


def _number(root: _Op) -> list[_Op]:
    ops = root.ops()
    for i, op in enumerate(ops):
        op.index = i
    return ops


# -- building the chain from a loaded decoder ------------------------------------


def _conv1d_padded(conv: nn.Conv1d) -> _Conv:
    padding = conv.padding
    if isinstance(padding, str) or padding[0] * 2 != (conv.kernel_size[0] - 1) * conv.dilation[0]:
        raise Unsupported(f"convolution padding {padding}")
    return _Conv(conv, padding[0], padding[0])


def _audiocraft_conv(module: nn.Module) -> _Conv:
    conv = module.conv.conv
    if not isinstance(module.conv.norm, nn.Identity) or module.pad_mode not in (
        "constant",
        "zeros",
    ):
        raise Unsupported(
            f"a convolution with {module.conv.norm_type} norm, {module.pad_mode} padding"
        )
    if conv.padding[0] != 0:
        raise Unsupported("a padded inner convolution")
    total = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1 - conv.stride[0]
    right = 0 if module.causal else total // 2
    return _Conv(conv, total - right, right)


def _audiocraft_conv_transpose(module: nn.Module) -> _ConvTranspose:
    conv = module.convtr.convtr
    if not isinstance(module.convtr.norm, nn.Identity):
        raise Unsupported(f"a transposed convolution with {module.convtr.norm_type} norm")
    if conv.padding[0] or conv.output_padding[0]:
        raise Unsupported("a padded inner transposed convolution")
    total = conv.kernel_size[0] - conv.stride[0]
    right = math.ceil(total * module.trim_right_ratio) if module.causal else total // 2
    return _ConvTranspose(conv, total - right, right)


def _chain(module: nn.Module) -> _Op:
    """The incremental op of a decoder module (``Unsupported`` if none)."""
    kind = type(module).__name__
    if isinstance(module, nn.Sequential):
        return _Chain([_chain(child) for child in module])
    if isinstance(module, nn.ELU | nn.Tanh | nn.Identity | nn.LeakyReLU) or kind in (
        "Snake",
        "Snake1d",
    ):
        return _Pointwise(module)
    if type(module) is nn.Conv1d:
        return _conv1d_padded(module)
    if type(module) is nn.ConvTranspose1d:
        padding, extra = module.padding[0], module.output_padding[0]
        return _ConvTranspose(module, padding, padding - extra)
    # audiocraft's SEANet (EnCodec)
    if kind == "SEANetDecoder":
        return _chain(module.model)
    if kind == "StreamableConv1d":
        return _audiocraft_conv(module)
    if kind == "StreamableConvTranspose1d":
        return _audiocraft_conv_transpose(module)
    if kind == "StreamableLSTM":
        return _LSTM(module.lstm, bool(module.skip))
    if kind == "SEANetResnetBlock":
        shortcut = None if isinstance(module.shortcut, nn.Identity) else _chain(module.shortcut)
        return _Residual(_chain(module.block), shortcut)
    # transformers' DAC
    if kind == "DacDecoder":
        parts = [module.conv1, *module.block, module.snake1, module.conv2, module.tanh]
        return _Chain([_chain(part) for part in parts])
    if kind == "DacDecoderBlock":
        parts = [
            module.snake1,
            module.conv_t1,
            module.res_unit1,
            module.res_unit2,
            module.res_unit3,
        ]
        return _Chain([_chain(part) for part in parts])
    if kind == "DacResidualUnit":
        parts = [module.snake1, module.conv1, module.snake2, module.conv2]
        return _Residual(_Chain([_chain(part) for part in parts]), None)
    raise Unsupported(f"a {kind} layer")


# -- decoding ----------------------------------------------------------------------


@dataclass(slots=True, eq=False, weakref_slot=True)
class _Stack:
    """The layers' states of the streams last decoded together: each layer's
    tensors hold them one after another along its batch dimension (``rows``
    rows each), so that a call decoding the same streams again takes the
    tensors as they are, and any other call gathers each layer's in one slice
    or copy per run of streams, not per stream."""

    slots: list[_Slot | None]
    streams: int
    key: tuple[object, ...]  # equal keys: decodable together (``_key``)


@dataclass(slots=True, eq=False)
class CodecState:
    """One stream's place in the decoder: its row of a stack of layer states
    (``rows`` decoder rows: one per audio channel decoded apart, as interleaved
    stereo is)."""

    codec: IncrementalCodec
    stack: _Stack
    row: int = 0

    @property
    def key(self) -> tuple[object, ...]:
        """Equal keys: decodable together (the same shapes of layer state)."""
        return self.stack.key

    @property
    def slots(self) -> list[_Slot | None]:
        """This stream's own layer states (views of its rows of the stack)."""
        rows = self.codec.rows
        return [
            None
            if slot is None
            else _Slot(
                tuple(t.narrow(op.batch_dim, self.row * rows, rows) for t in slot.tensors),
                slot.skip,
            )
            for op, slot in zip(self.codec._ops, self.stack.slots, strict=True)
        ]


def _key(ops: Sequence[_Op], slots: Sequence[_Slot | None]) -> tuple[object, ...]:
    """What streams decoded together must share: every layer's samples still to
    drop, and its state's shapes but for the streams' dimension."""
    return tuple(
        None
        if slot is None
        else (
            slot.skip,
            tuple(t.shape[: op.batch_dim] + t.shape[op.batch_dim + 1 :] for t in slot.tensors),
        )
        for op, slot in zip(ops, slots, strict=True)
    )


_MOST_TIMED = 16  # streams a call that ``choose_forms`` times holds at most


@dataclass(frozen=True, slots=True)
class Forms:
    """What ``IncrementalCodec.choose_forms`` chose: of ``layers`` convolutions,
    how many run as matrix products and how many by the row kernel's library,
    for one stream's calls and for larger ones, and the seconds the choice took."""

    layers: int
    product_one: int
    product_many: int
    seconds: float
    kernel_one: int = 0
    kernel_many: int = 0
    units: int = 0  # residual units with a fused form (``_Residual``)
    fused_one: int = 0
    fused_many: int = 0


def _forms(formed: list[_Formed], units: list[_Residual], seconds: float) -> Forms:
    """What ``formed`` and ``units`` run as, counted (``seconds``: the choice's time)."""
    return Forms(
        len(formed),
        sum(op.one == PRODUCT for op in formed),
        sum(op.many == PRODUCT for op in formed),
        seconds,
        sum(op.one == KERNEL for op in formed),
        sum(op.many == KERNEL for op in formed),
        len(units),
        sum(unit.one for unit in units),
        sum(unit.many for unit in units),
    )


def _seconds(
    form: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, clock: Callable[[], float]
) -> float:
    began = clock()
    form(x)
    return clock() - began


def _form_seconds(
    forms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    name: str,
    x: torch.Tensor,
    clock: Callable[[], float],
) -> float:
    """Form ``name``'s time on ``x`` if the layer has it, else infinity."""
    form = forms.get(name)
    return math.inf if form is None else _seconds(form, x, clock)


def _fused_faster(
    unit: _Residual,
    x: torch.Tensor,
    state: list[_Slot | None],
    clock: Callable[[], float],
) -> bool | None:
    """Whether ``unit`` fused takes under 95% of its layers' time on ``x`` from
    ``state`` (the layers' states as a call left them: each run starts from a
    copy); None where it does not run fused there (its layers' start-up, or
    a layer over 20 ms: left as it is)."""

    def fused(x: torch.Tensor) -> torch.Tensor:
        out = unit.fused(x, _copied(state))
        assert out is not None
        return out

    def layers(x: torch.Tensor) -> torch.Tensor:
        return unit.layers(x, _copied(state), False)

    if unit.fused(x, _copied(state)) is None or _seconds(layers, x, clock) > 0.02:
        return None
    fast, slow = _race([fused, layers], x, clock)
    return fast < 0.95 * slow


def _race(
    forms: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    clock: Callable[[], float],
) -> list[float]:
    """Each form's least time on ``x``, timed in turns (a slow spell of the
    machine falls on both): five rounds, or two where a call takes over 5 ms;
    calls repeated to take about a millisecond a round."""
    first = [_seconds(form, x, clock) for form in forms]
    repeats = max(1, min(50, int(1e-3 / max(min(first), 1e-7))))
    rounds = 2 if min(first) > 5e-3 else 5
    best = [float("inf")] * len(forms)
    for _ in range(rounds):
        for i, form in enumerate(forms):
            began = clock()
            for _ in range(repeats):
                form(x)
            best[i] = min(best[i], (clock() - began) / repeats)
    return best


class IncrementalCodec:
    """A codec decoder that continues each stream from its state.

    Args:
        root: The decoder's layers (from ``incremental``).
        embed: Codes ``[B, K, n]`` to the decoder's input ``[B', D, n]`` (one
            frame at a time: nothing in it may look across frames).
        hop: Audio samples per frame.
        rows: Decoder rows per stream (``B' = rows * B``; 2 for interleaved stereo,
            each row one channel of the output).
        device: Where the decoder's weights are (codes are moved there).
    """

    def __init__(
        self,
        root: _Op,
        embed: Callable[[torch.Tensor], torch.Tensor],
        *,
        hop: int,
        rows: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if root.rate != hop:
            raise Unsupported(f"the decoder upsamples {root.rate}x, not the hop {hop}")
        self._root = root
        self._ops = _number(root)
        self._embed = embed
        self.hop = hop
        self.rows = rows
        self.device = torch.device(device)
        # Frames a sample's audio waits for after its own (rounded up).
        self.lookahead = math.ceil(root.lookahead - 1e-9)
        self._fresh: dict[tuple[torch.dtype, torch.device], _Stack] = {}
        # Steady calls as recorded graphs (``record_calls``), by shape.
        self._recorded: dict[tuple[object, ...], _Recorded | None] | None = None
        # The recordings' memory pool (None: the calls run eagerly on their buffers).
        self._pool: Any = None

    def record_calls(self, record: bool = True) -> None:
        """Decode the calls of streams under way (every layer's start-up samples
        dropped) by one recorded call per shape (``_Recorded``: the states' key,
        the streams, the frames): on CUDA a CUDA graph (``record``), whose
        hundreds of kernels then launch as one; otherwise (or with ``record``
        False) the same buffers, run eagerly, so the plumbing runs on any
        machine. The first and the last calls of a stream stay eager."""
        self._recorded = {}
        cuda = record and self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if cuda else None

    @property
    def recorded(self) -> int:
        """Shapes recorded (or set up, eagerly) so far."""
        return 0 if self._recorded is None else len(self._recorded)

    def start(self, like: torch.Tensor) -> CodecState:
        """The state of a new stream (``like``: a tensor of the decoder's dtype and device).

        Every new stream starts from the same state, made once per dtype and
        device and shared: the layers never write into their states (a call
        makes new ones), so streams that start together share its tensors
        until their first call."""
        fresh = self._fresh.get((like.dtype, like.device))
        if fresh is None:
            x = like.new_zeros(self.rows, 0)
            slots = [op.begin(x) for op in self._ops]
            fresh = self._fresh[(like.dtype, like.device)] = _Stack(
                slots, 1, _key(self._ops, slots)
            )
        return CodecState(self, fresh)

    def decode(
        self, codes: torch.Tensor, states: Sequence[CodecState], *, final: bool = False
    ) -> torch.Tensor:
        """The new audio ``[B, C, m]`` of frames ``codes [B, K, n]``, one row per
        state (states of one key), each state moved past them; with ``final``,
        the streams end there and ``m`` covers every sample still owed."""
        if len(states) != codes.shape[0] or len({s.stack.key for s in states}) > 1:
            raise ValueError("decode() takes one state per row, all of one key")
        key = states[0].stack.key
        if self._recorded is not None and not final and _steady(key):
            replayed = self._replayed(codes, states, key)
            if replayed is not None:
                return replayed
        batched = self._gather(states)
        x = self._embed(codes.to(self.device, non_blocking=True))
        y = self._root.run(x, batched, final)
        stack = _Stack(batched, len(states), _key(self._ops, batched))
        for row, state in enumerate(states):
            state.stack, state.row = stack, row
        return y.reshape(len(states), self.rows * y.shape[1], y.shape[-1])

    def choose_forms(
        self,
        like: torch.Tensor,
        streams: int,
        codebooks: int,
        frames: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Forms:
        """Choose each convolution's form (``_Formed``) by timing them on the
        inputs a call of ``frames`` new frames gives it, from the states of one
        stream and of ``streams`` streams long under way (at most 16: past that
        the choice barely moves, the tiny DAC's in 4 of 37 layers from 16 to 32
        and none from 32 to 64, the tiny EnCodec's in none, while the load pays
        more): the fastest of the product and the row kernel's (where its
        library is built and the decoder is float32), where it takes less than
        95% of the library's time. Only on a CPU (a GPU's convolutions are the
        library's, unmeasured), and only for layers whose call takes under 20 ms
        by the library's kernel or by the row kernel's (the released codecs'
        wide layers, where the library's are as fast or faster; timing them all
        would add 10 s or more to a load)."""
        if like.device.type != "cpu":
            return Forms(sum(isinstance(op, _Formed) for op in self._ops), 0, 0, 0.0)
        formed, units = self._formable(like)
        if not formed:
            return Forms(0, 0, 0, 0.0)
        began = clock()
        generator = torch.Generator().manual_seed(0)
        streams = max(1, min(streams, _MOST_TIMED))
        for n in sorted({1, streams}):
            decode = steady_decode(self, like, n, codebooks)
            codes = torch.randint(0, 2, (n, codebooks, frames), generator=generator)
            for op in formed:
                op.seen = []
            for unit in units:
                unit.seen = []
            try:
                decode(codes)
                inputs = [op.seen[0] if op.seen else None for op in formed]
                calls = [unit.seen[0] if unit.seen else None for unit in units]
            finally:
                for op in formed:
                    op.seen = None
                for unit in units:
                    unit.seen = None
            for op, x in zip(formed, inputs, strict=True):
                if x is None:
                    continue
                forms = op.forms()
                library = _seconds(forms[DIRECT], x, clock)
                quickest = min(library, _form_seconds(forms, KERNEL, x, clock))
                if quickest > 0.02:
                    continue  # (a layer that large: the library's kernels, unmeasured)
                names = list(forms)
                times = dict(
                    zip(names, _race([forms[name] for name in names], x, clock), strict=True)
                )
                fastest = min(names, key=times.__getitem__)
                choice = fastest if times[fastest] < 0.95 * times[DIRECT] else DIRECT
                if n > 1 or streams == 1:
                    op.many = choice
                if n == 1:
                    op.one = choice
            # Each residual unit fused or layer by layer (its layers' forms chosen).
            for unit, call in zip(units, calls, strict=True):
                faster = None if call is None else _fused_faster(unit, *call, clock)
                if faster is None:
                    continue
                if n > 1 or streams == 1:
                    unit.many = faster
                if n == 1:
                    unit.one = faster
        return _forms(formed, units, clock() - began)

    def _formable(self, like: torch.Tensor) -> tuple[list[_Formed], list[_Residual]]:
        """The convolutions with forms to choose from and the residual units
        with a fused form, prepared for decodes like ``like`` (the row kernel's
        where it is built and the decoder is float32), every one as the library's
        and layer by layer until chosen, their choice for larger calls holding
        from ``rows`` + 1 rows."""
        kernel = rowkernel.built() if like.dtype == torch.float32 else None
        self.direct_forms()  # (until chosen again)
        for op in self._ops:
            if isinstance(op, _Formed | _Residual):
                op.kernel = kernel
        formed = [op for op in self._ops if isinstance(op, _Formed) and op.prepare()]
        units = [op for op in self._ops if isinstance(op, _Residual) and op.prepare()]
        for op in formed:
            op.many_from = self.rows + 1
        for unit in units:
            unit.many_from, unit.one, unit.many = self.rows + 1, False, False
        return formed, units

    def kept_forms(self) -> dict[str, list[list[str]] | list[list[bool]]]:
        """The forms chosen (``choose_forms``), to keep for a later start: each
        formable convolution's (for one stream's calls, for more) and each
        residual unit's, in order (``use_forms`` takes them)."""
        formed = [op for op in self._ops if isinstance(op, _Formed)]
        units = [op for op in self._ops if isinstance(op, _Residual)]
        return {
            "layers": [[op.one, op.many] for op in formed],
            "units": [[unit.one, unit.many] for unit in units],
        }

    def use_forms(self, kept: object, like: torch.Tensor) -> Forms | None:
        """The forms ``kept_forms`` gave (a start before, on this decoder's
        shapes), taken for decodes like ``like`` without measuring; None (the
        library's everywhere, as before ``choose_forms``) where they are not
        this decoder's: another count of layers, a form it has not, a fused unit
        it cannot fuse."""
        if like.device.type != "cpu" or not isinstance(kept, dict):
            return None
        layers, fused = kept.get("layers"), kept.get("units")
        formed, units = self._formable(like)
        every = [op for op in self._ops if isinstance(op, _Formed)]
        residuals = [op for op in self._ops if isinstance(op, _Residual)]
        fits = (
            isinstance(layers, list)
            and isinstance(fused, list)
            and len(layers) == len(every)
            and len(fused) == len(residuals)
            and all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(form == DIRECT or (op in formed and form in op.forms()) for form in pair)
                for op, pair in zip(every, layers, strict=True)
            )
            and all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(b, bool) and (not b or unit in units) for b in pair)
                for unit, pair in zip(residuals, fused, strict=True)
            )
        )
        if not fits:
            self.direct_forms()
            return None
        assert isinstance(layers, list) and isinstance(fused, list)
        for op, (one, many) in zip(every, layers, strict=True):
            op.one, op.many = one, many
        for unit, (one, many) in zip(residuals, fused, strict=True):
            unit.one, unit.many = one, many
        return _forms(formed, units, 0.0)

    def direct_forms(self) -> None:
        """Every convolution as the library's, every residual unit layer by layer
        (the forms before ``choose_forms``)."""
        for op in self._ops:
            if isinstance(op, _Formed):
                op.one = op.many = DIRECT
            if isinstance(op, _Residual):
                op.one = op.many = False

    def _replayed(
        self, codes: torch.Tensor, states: Sequence[CodecState], key: tuple[object, ...]
    ) -> torch.Tensor | None:
        """``decode`` of steady streams by the recorded call of their shape; None
        where a call of that shape changes the states' shapes (it cannot write
        them over the old ones: such calls stay eager).

        The recording keeps its streams' layer states in its own buffers, and
        writes the new ones over them: the stack of the streams it last decoded
        is those buffers. A call of the same streams in the same order (a
        crowd's steady calls) reads them as they are; any other call first
        gives the streams still on those buffers a copy of their own
        (``_Recorded.evict``) and copies its streams' states in. The
        ``MOST_RECORDED`` shapes used last are kept (a stream on the buffers of
        one dropped keeps them)."""
        assert self._recorded is not None
        count, frames = len(states), int(codes.shape[-1])
        shape = (key, count, frames)
        codes = codes.to(self.device, non_blocking=True)
        fresh = shape not in self._recorded
        if fresh:  # (the buffers then hold the streams' states: no copy)
            made = _Recorded.make(self, codes, self._gather(states), key, self._pool)
            while len(self._recorded) >= MOST_RECORDED:
                del self._recorded[next(iter(self._recorded))]
            self._recorded[shape] = made
        recorded = self._recorded.pop(shape)
        self._recorded[shape] = recorded  # (the last used, last)
        if recorded is None:
            return None
        if not fresh:
            stack = states[0].stack
            owner = None if recorded.owner is None else recorded.owner()
            same = owner is stack and stack.streams == count
            if not (same and all(s.stack is stack and s.row == i for i, s in enumerate(states))):
                recorded.evict()
                sources = _flat(self._gather(states))
                torch._foreach_copy_(_flat(recorded.inputs), sources)
        recorded.codes.copy_(codes, non_blocking=True)
        y = recorded.replay()
        stack = _Stack(
            [None if slot is None else _Slot(slot.tensors, 0) for slot in recorded.inputs],
            count,
            key,
        )
        recorded.owner = weakref.ref(stack)
        for row, state in enumerate(states):
            state.stack, state.row = stack, row
        return y.reshape(count, self.rows * y.shape[1], y.shape[-1])

    def _gather(self, states: Sequence[CodecState]) -> list[_Slot | None]:
        """The states' layer states stacked in their order (new ``_Slot`` objects:
        the layers replace their tensors, and a call that fails leaves the
        streams' states as they were)."""
        first = states[0].stack
        if first.streams == len(states) and all(
            state.stack is first and state.row == row for row, state in enumerate(states)
        ):
            return _copied(first.slots)
        # Runs of consecutive rows of one stack: one slice each.
        runs: list[tuple[_Stack, int, int]] = []
        for state in states:
            if runs and runs[-1][0] is state.stack and sum(runs[-1][1:]) == state.row:
                stack, start, count = runs[-1]
                runs[-1] = (stack, start, count + 1)
            else:
                runs.append((state.stack, state.row, 1))
        rows = self.rows
        gathered: list[_Slot | None] = []
        for op, slot in zip(self._ops, first.slots, strict=True):
            if slot is None:
                gathered.append(None)
                continue
            tensors = []
            for j in range(len(slot.tensors)):
                parts = []
                for stack, start, count in runs:
                    own = stack.slots[op.index]
                    assert own is not None
                    parts.append(own.tensors[j].narrow(op.batch_dim, start * rows, count * rows))
                tensors.append(torch.cat(parts, op.batch_dim))
            gathered.append(_Slot(tuple(tensors), slot.skip))
        return gathered


def _steady(key: tuple[object, ...]) -> bool:
    """Whether states of ``key`` have every layer's start-up samples dropped."""
    return all(part is None or part[0] == 0 for part in key)  # type: ignore[index]


def _flat(slots: Sequence[_Slot | None]) -> list[torch.Tensor]:
    return [t for slot in slots if slot is not None for t in slot.tensors]


@dataclass(slots=True, eq=False)
class _Recorded:
    """A steady call of one shape, recorded: its codes and the layers' states in
    buffers of its own, the new states written over them at the end of the
    call, the audio in a tensor of the recording's (``graph``: a CUDA graph;
    None: run eagerly on the same buffers). ``owner``: the stack whose states
    the buffers hold now."""

    codec: IncrementalCodec
    codes: torch.Tensor
    inputs: list[_Slot | None]
    graph: Any = None
    audio: torch.Tensor | None = None
    owner: weakref.ref[_Stack] | None = None

    @classmethod
    def make(
        cls,
        codec: IncrementalCodec,
        codes: torch.Tensor,
        gathered: list[_Slot | None],
        key: tuple[object, ...],
        pool: Any,
    ) -> _Recorded | None:
        """Buffers holding ``codes`` and the ``gathered`` states (of ``key``);
        recorded as a CUDA graph into ``pool`` where one is given. First a call
        that writes nothing of the buffers (on CUDA two, on a side stream, as
        a recording asks): None where its new states are not of ``key``."""
        inputs = [
            None if slot is None else _Slot(tuple(t.clone() for t in slot.tensors), 0)
            for slot in gathered
        ]
        made = cls(codec, codes.clone(), inputs)
        if pool is None:
            _, state = made.call(write=False)
            return made if _key(codec._ops, state) == key else None
        warm = graphs.warm_up(lambda: made.call(write=False), 2)
        if warm is None or _key(codec._ops, warm[1]) != key:
            return None
        try:
            made.graph, (made.audio, _) = graphs.capture(lambda: made.call(write=True), pool)
        except RuntimeError:  # (a layer that cannot be recorded: the call stays eager)
            log.warning("a codec call of shape %s could not be recorded", key, exc_info=True)
            return None
        return made

    def call(self, *, write: bool) -> tuple[torch.Tensor, list[_Slot | None]]:
        """The call on the buffers, its audio and new states; with ``write``,
        those written over the buffers."""
        state = [None if slot is None else _Slot(slot.tensors, 0) for slot in self.inputs]
        y = self.codec._root.run(self.codec._embed(self.codes), state, False)
        if write:
            new, old = _flat(state), _flat(self.inputs)
            held = {t.untyped_storage().data_ptr() for t in old}
            # (a new state that is a view of the old ones is copied first)
            new = [t.clone() if t.untyped_storage().data_ptr() in held else t for t in new]
            torch._foreach_copy_(old, new)
        return y, state

    def replay(self) -> torch.Tensor:
        """The call's audio (a tensor of the caller's own)."""
        if self.graph is None:
            return self.call(write=True)[0]
        self.graph.replay()
        assert self.audio is not None
        return self.audio.clone()

    def evict(self) -> None:
        """Give the streams whose states the buffers hold (where any still does)
        a copy of their own, before the buffers take other streams'."""
        owner = None if self.owner is None else self.owner()
        if owner is not None:
            owner.slots = [
                None if slot is None else _Slot(tuple(t.clone() for t in slot.tensors), 0)
                for slot in owner.slots
            ]
        self.owner = None


def incremental(codec: nn.Module) -> IncrementalCodec | None:
    """The incremental decoder of a loaded codec: audiocraft's EnCodec (mono, or
    stereo interleaved), or HiggsAudio v2's tokenizer (DAC); None if its layers
    cannot run incrementally."""
    kind = type(codec).__name__
    device = next(iter(codec.parameters())).device
    try:
        if kind == "EncodecModel":
            model = codec
            root = _chain(model.decoder)
            return IncrementalCodec(root, model.quantizer.decode, hop=root.rate, device=device)
        if kind == "InterleaveStereoCompressionModel":
            model = codec.model
            if type(model).__name__ != "EncodecModel":
                return None
            root = _chain(model.decoder)

            def embed_stereo(codes: torch.Tensor) -> torch.Tensor:
                left, right = codec.get_left_right_codes(codes)
                both = torch.stack([left, right], 1).flatten(0, 1)  # [s0 L, s0 R, s1 L …]
                emb: torch.Tensor = model.quantizer.decode(both)
                return emb

            return IncrementalCodec(root, embed_stereo, hop=root.rate, rows=2, device=device)
        if kind == "HiggsAudioV2TokenizerModel":
            root = _chain(codec.acoustic_decoder)
            tables = code_tables(codec)

            def embed_higgs(codes: torch.Tensor) -> torch.Tensor:
                if tables is not None:  # (a gather a codebook, summed)
                    summed = tables[0][codes[:, 0]]
                    for k in range(1, codes.shape[1]):
                        summed = summed + tables[k][codes[:, k]]
                    tabled: torch.Tensor = summed.transpose(1, 2)
                    return tabled
                quantized = codec.quantizer.decode(codes.transpose(0, 1))
                out: torch.Tensor = codec.fc2(quantized.transpose(1, 2)).transpose(1, 2)
                return out

            return IncrementalCodec(root, embed_higgs, hop=root.rate, device=device)
    except Unsupported:
        return None
    return None


# The most memory the speech codec's code tables may take (``code_tables``):
# the 3B model's, eight codebooks of 1,024 codes into 1,024 channels, take 32 MB.
MOST_TABLE_BYTES = 64 << 20


def code_tables(codec: nn.Module) -> torch.Tensor | None:
    """HiggsAudio v2's codec input of every code, ``[K, cardinality, D]``: each
    codebook's code vector through its ``project_out`` and then ``fc2`` (whose
    bias goes with the first codebook's), computed in float64 and rounded once.
    Both maps are linear, so a frame's input is the sum of its codes' rows:
    a gather a codebook where the library makes a lookup, a product and a sum
    a codebook and ``fc2``'s product (the tiny codec's 16 frames: 30 us where
    the library's take 115 for one stream, 75 where they take 212 for eight),
    the same to float rounding. None where the tables would take over
    ``MOST_TABLE_BYTES``, the codebooks differ in size, or the layers are not
    these."""
    fc2 = getattr(codec, "fc2", None)
    quantizers = getattr(getattr(codec, "quantizer", None), "quantizers", None)
    if not isinstance(fc2, nn.Linear) or quantizers is None or not len(quantizers):
        return None
    layers = []
    for layer in quantizers:
        embed = getattr(getattr(layer, "codebook", None), "embed", None)
        out = getattr(layer, "project_out", None)
        if not isinstance(embed, torch.Tensor) or not isinstance(out, nn.Linear):
            return None
        layers.append((embed.detach(), out))
    codes = {embed.shape[0] for embed, _ in layers}
    dtype = fc2.weight.dtype
    size = len(layers) * max(codes) * fc2.out_features * torch.finfo(dtype).bits // 8
    if len(codes) != 1 or size > MOST_TABLE_BYTES:
        return None
    tables = []
    for k, (embed, out) in enumerate(layers):
        vectors = embed.double() @ out.weight.detach().double().T
        if out.bias is not None:
            vectors = vectors + out.bias.detach().double()
        table = vectors @ fc2.weight.detach().double().T
        if k == 0 and fc2.bias is not None:
            table = table + fc2.bias.detach().double()
        tables.append(table)
    return torch.stack(tables).to(dtype)


def checked(
    codec: IncrementalCodec,
    decode: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    *,
    codebooks: int,
    cardinality: int,
) -> float:
    """How far ``codec`` strays from the one-shot ``decode`` (the largest error
    over the largest sample) on two streams of random codes decoded together in
    uneven pieces: float rounding (1e-7 in float32) if its layers were read
    right; anything near 1 if not."""
    frames = 4 * codec.lookahead + 24
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cardinality, (2, codebooks, frames), generator=generator)
    whole = decode(codes.to(like.device)).float().cpu()
    states = [codec.start(like) for _ in range(2)]
    pieces, at = [], 0
    for n in (1, codec.lookahead + 1, 3, 10):
        pieces.append(codec.decode(codes[:, :, at : at + n].to(like.device), states))
        at += n
    pieces.append(codec.decode(codes[:, :, at:].to(like.device), states, final=True))
    streamed = torch.cat(pieces, -1).float().cpu()
    if streamed.shape != whole.shape:
        return float("inf")
    return float((streamed - whole).abs().max() / whole.abs().max().clamp_min(1e-12))


def steady_decode(
    codec: IncrementalCodec, like: torch.Tensor, most: int, codebooks: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A decode of codes ``[B, K, n]`` (``B <= most``) from the states of streams
    long under way (to time the codec: ``codec_stream.fastest_rows``)."""
    states = [codec.start(like) for _ in range(most)]
    zeros = torch.zeros(most, codebooks, codec.lookahead + 2, dtype=torch.long, device=like.device)
    while any(slot is not None and slot.skip for slot in states[0].slots):
        codec.decode(zeros, states)

    def decode(codes: torch.Tensor) -> torch.Tensor:
        return codec.decode(codes.to(like.device), states[: codes.shape[0]])

    return decode
