"""Steps replayed as CUDA graphs, one per shape.

A batched decode step of a transformer launches hundreds of small kernels; on a
GPU at small batches their launch cost, not the arithmetic, sets the step time.
A CUDA graph records the step's kernels once and replays them with one launch.
It needs what the engines' steps give: static shapes per key (rows, attention
span) and no host synchronisation between the step's inputs and its outputs,
and inputs and outputs at fixed addresses, which :class:`StepGraphs` adds
(static input buffers the step's inputs are copied into; the outputs the graph
writes). The engines graph the whole device side of a step: the decoder's
forward, classifier-free guidance, every row's sampling rules and draw, and the
finiteness check, so that one replay and one copy back remain.

The engines record every shape their configured crowd can step at warm-up
(``prepare``: the slot table preallocated for ``--max-active`` requests, every
power-of-two batch of rows up to it, every attention span up to the cache's
length), before the server reports ready, so that no stream waits on a
recording later. A graph is recorded with every row inactive: an inactive row
writes only its cache's spare position and does not advance, so recording
changes no row's state. A shape not prepared (the cache grown past what was
preallocated) is recorded the first time it is stepped. The graphs read the
decoder's cache tensors (and the per-row sampling parameters) where they were
when recorded: when the table grows, its tensors move, and every graph is
dropped and recorded again as its shape comes back (``version``).

The engines attend over spans of powers of two (``span_for``; attending further
changes nothing: the positions past a row's length are masked), with or without
graphs, so that the shapes are few (about ``log2(rows) * log2(length / 64)``
graphs) and a graph's step is the eager step, bit for bit.

Off by default (``--cuda-graphs``). Without CUDA (``record=False``) the same
buffers are used and the step runs eagerly on them, so the plumbing is tested on
any machine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

__all__ = ["PrefilledLogits", "StepGraphs", "capture", "powers_of_two", "span_for", "warm_up"]

Key = tuple[int, ...]
T = TypeVar("T")
# (static inputs, key) -> outputs (a tensor or a tuple of tensors).
Step = Callable[[Sequence[torch.Tensor], Key], Any]


@dataclass(slots=True)
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # static inputs
    out: Any  # the recorded step's outputs (None until run, eagerly)
    graph: Any = None  # torch.cuda.CUDAGraph, when recorded


class StepGraphs:
    """``step(inputs, key) -> outputs``, replayed per key (a shape).

    Args:
        step: The engine's step (static shapes per key; every row inactive
            when its inputs are all zeros).
        version: What identifies where the tensors the step reads live (the
            cache's shapes): a change drops every graph.
        record: Record CUDA graphs (CUDA only); otherwise run eagerly on the
            static buffers.
        warmups: Eager runs before recording (lazy initialisations, cuBLAS
            workspaces), on a side stream as CUDA graph capture asks.
    """

    def __init__(
        self,
        step: Step,
        version: Callable[[], Hashable],
        *,
        record: bool,
        warmups: int = 2,
    ) -> None:
        self.step = step
        self.version = version
        self.record = record
        self.warmups = warmups
        self._graphs: dict[Key, _Graph] = {}
        self._version: Hashable = None
        self._pool: Any = None  # one memory pool for every graph
        self.recorded = 0  # graphs recorded so far (tests and logs)
        self.dropped = 0  # times every graph was dropped (the cache moved)

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def shapes(self) -> set[Key]:
        """The keys ready to step."""
        return set(self._graphs)

    def prepare(
        self,
        keys: Iterable[Key],
        blank: Callable[[Key], Sequence[torch.Tensor]],
        *,
        label: str = "",
    ) -> int:
        """Make ready (record) the step of every key now, with ``blank(key)``'s
        inputs (zeros: every row inactive); how many were new (logged with
        ``label``). The largest shapes first: the smaller graphs' work tensors
        then fit in the memory the larger ones' left in the shared pool."""
        start = time.perf_counter()
        before = len(self._graphs)
        for key in sorted(keys, reverse=True):
            self._entry(key, blank(key))
        made = len(self._graphs) - before
        what = "CUDA graphs recorded" if self.record else "step shapes ready"
        log.info("%s: %d %s in %.2f s", label, made, what, time.perf_counter() - start)
        return made

    def __call__(self, key: Key, *inputs: torch.Tensor) -> Any:
        """The step's outputs, in the key's output buffers (valid until the next
        step of the same key)."""
        entry = self._entry(key, inputs)
        for static, given in zip(entry.inputs, inputs, strict=True):
            static.copy_(given)
        if entry.graph is None:
            entry.out = self.step(entry.inputs, key)
        else:
            entry.graph.replay()
        return entry.out

    def _entry(self, key: Key, inputs: Sequence[torch.Tensor]) -> _Graph:
        version = self.version()
        if version != self._version:
            self.dropped += bool(self._graphs)
            self._graphs.clear()
            self._pool = None
            self._version = version
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new(key, inputs)
            self._graphs[key] = entry
        return entry

    def _new(self, key: Key, inputs: Sequence[torch.Tensor]) -> _Graph:
        entry = _Graph(tuple(torch.zeros_like(x) for x in inputs), None)
        if not self.record:
            return entry
        # Every row inactive while recording: only the spare position is written.
        with _no_autocast_cache():
            warm_up(lambda: self.step(entry.inputs, key), self.warmups)
            graph, entry.out = capture(lambda: self.step(entry.inputs, key), self._pool)
        self._pool = graph.pool()
        entry.graph = graph
        self.recorded += 1
        return entry


def warm_up(call: Callable[[], T], times: int) -> T | None:
    """``call`` ``times`` times on a side stream, as a CUDA graph's recording asks
    first (lazy initialisations, cuBLAS workspaces); its last result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    result = None
    with torch.cuda.stream(side):
        for _ in range(times):
            result = call()
    torch.cuda.current_stream().wait_stream(side)
    return result


def capture(call: Callable[[], T], pool: Any) -> tuple[Any, T]:
    """``call`` recorded as a CUDA graph (into ``pool``: None for a new one), and
    what it returned (the graph's outputs).

    Only this thread's CUDA calls matter to the recording (the server's other
    threads touch no CUDA, but a recording mid-serving must not depend on it).
    autocast's cache of cast weights would hand the graph casts that are freed
    when the autocast context exits (make_graphed_callables refuses it): the
    casts are recorded instead (none where the weights are in the step's dtype)."""
    graph = torch.cuda.CUDAGraph()
    with (
        _no_autocast_cache(),
        torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"),
    ):
        out = call()
    return graph, out


@contextlib.contextmanager
def _no_autocast_cache() -> Iterator[None]:
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cache)


class PrefilledLogits:
    """Logits ``[rows, K, card]`` at a fixed address, for a graphed step: a row
    whose prompt completed in this step samples from its prefill's logits,
    written here before the replay and taken where the step's flags say."""

    def __init__(self, rows: int, codebooks: int, card: int, device: torch.device) -> None:
        self.logits = torch.zeros(rows, codebooks, card, device=device)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` rows (the table grew: the graphs are recorded again)."""
        if rows > self.logits.shape[0]:
            self.logits = self.logits.new_zeros(rows, *self.logits.shape[1:])

    def merge(self, logits: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[R, K, card]`` with the flagged rows' (``[R]``) taken from here."""
        rows = int(logits.shape[0])
        return torch.where(flags.bool()[:, None, None], self.logits[:rows], logits)


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
