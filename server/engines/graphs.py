"""Decode steps replayed as CUDA graphs, one per shape.

A batched decode step of a transformer launches hundreds of small kernels; on a
GPU at small batches their launch cost, not the arithmetic, sets the step time.
A CUDA graph records the step's kernels once and replays them with one launch.
It needs what the decoders already give: static shapes per (rows, span) and no
host synchronisation in the step, and inputs and outputs at fixed addresses,
which :class:`DecodeGraphs` adds (static input buffers the step's inputs are
copied into; the output buffer the graph writes).

The engines record every shape their configured crowd can step at warm-up
(``prepare``: the slot table preallocated for ``--max-active`` requests, every
power-of-two batch of rows up to it, every attention span up to the cache's
length), before the server reports ready, so that no stream waits on a
recording later. A graph is recorded with every row inactive: an inactive row
writes only its cache's spare position and does not advance, so recording
changes no row's state. A shape not prepared (the cache grown past what was
preallocated) is recorded the first time it is stepped. The graphs read the
decoder's cache tensors where they were when recorded: when the cache grows, its
tensors move, and every graph is dropped and recorded again as its shape comes
back (``version``).

The engines attend over spans of powers of two (``span_for``; attending further
changes nothing: the positions past a row's length are masked), with or without
graphs, so that the shapes are few (about ``log2(rows) * log2(length / 64)``
graphs) and a graph's step is the eager step, bit for bit.

Off by default (``--cuda-graphs``). Without CUDA (``record=False``) the same
buffers are used and the step runs eagerly on them, so the plumbing is tested on
any machine.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DecodeGraphs", "powers_of_two", "span_for"]

Decode = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(slots=True)
class _Graph:
    codes: torch.Tensor  # [R, K] static input
    active: torch.Tensor  # [R] static input
    out: torch.Tensor | None  # the recorded step's output (None until run, eagerly)
    graph: Any = None  # torch.cuda.CUDAGraph, when recorded


class DecodeGraphs:
    """``decode(codes [R, K], active [R], span) -> logits``, replayed per shape.

    Args:
        decode: The decoder's step (static shapes per ``R`` and ``span``).
        version: What identifies the decoder's storage (its cache shapes): a
            change drops every graph.
        record: Record CUDA graphs (CUDA only); otherwise run eagerly on the
            static buffers.
        warmups: Eager runs before recording (lazy initialisations, cuBLAS
            workspaces), on a side stream as CUDA graph capture asks.
    """

    def __init__(
        self,
        decode: Decode,
        version: Callable[[], Hashable],
        *,
        record: bool,
        warmups: int = 2,
    ) -> None:
        self.decode = decode
        self.version = version
        self.record = record
        self.warmups = warmups
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._version: Hashable = None
        self._pool: Any = None  # one memory pool for every graph
        self.recorded = 0  # graphs recorded so far (tests and logs)
        self.dropped = 0  # times every graph was dropped (the cache moved)

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def shapes(self) -> set[tuple[int, int]]:
        """The (rows, span) shapes ready to step."""
        return set(self._graphs)

    def prepare(
        self, rows: Iterable[int], spans: Iterable[int], codebooks: int, device: torch.device
    ) -> int:
        """Make ready (record) every shape of ``rows`` x ``spans`` now; how many
        were new."""
        spans = sorted(set(spans))
        before = len(self._graphs)
        for count in rows:
            codes = torch.zeros(count, codebooks, dtype=torch.int64, device=device)
            active = torch.zeros(count, dtype=torch.bool, device=device)
            for span in spans:
                self._entry(codes, active, span)
        return len(self._graphs) - before

    def __call__(self, codes: torch.Tensor, active: torch.Tensor, span: int) -> torch.Tensor:
        """The step's logits, in the shape's output buffer (valid until the next
        step of the same shape)."""
        entry = self._entry(codes, active, span)
        entry.codes.copy_(codes)
        entry.active.copy_(active)
        if entry.graph is None:
            entry.out = self.decode(entry.codes, entry.active, span)
        else:
            entry.graph.replay()
        assert entry.out is not None
        return entry.out

    def _entry(self, codes: torch.Tensor, active: torch.Tensor, span: int) -> _Graph:
        version = self.version()
        if version != self._version:
            self.dropped += bool(self._graphs)
            self._graphs.clear()
            self._pool = None
            self._version = version
        key = (int(codes.shape[0]), span)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new(codes, active, span)
            self._graphs[key] = entry
        return entry

    def _new(self, codes: torch.Tensor, active: torch.Tensor, span: int) -> _Graph:
        entry = _Graph(torch.zeros_like(codes), torch.zeros_like(active), None)
        if not self.record:
            return entry
        # Every row inactive while recording: only the spare position is written.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmups):
                self.decode(entry.codes, entry.active, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            entry.out = self.decode(entry.codes, entry.active, span)
        self._pool = graph.pool()
        entry.graph = graph
        self.recorded += 1
        return entry


def span_for(positions: int, least: int = 64) -> int:
    """The attention span of a step whose rows hold up to ``positions``
    positions: the next power of two, at least ``least``."""
    return max(least, 1 << (positions - 1).bit_length())


def powers_of_two(least: int, most: int) -> list[int]:
    """``least, 2 * least, ...`` up to the first one at or above ``most``."""
    out = [least]
    while out[-1] < most:
        out.append(2 * out[-1])
    return out
