"""How much prompt a step prefills: the budget, and which prompts' chunks go in.

Both engines feed the prompts not yet in the cache between decode steps, a chunk
of each at a time, in one call (the decoders take a start and a length per
row), packed: the chunks' own positions one after the other (``packed``), no
padding computed. What a step may feed is a number of positions the decoder
computes: a cap, or, with a time budget
(``--prefill-budget-ms``), what that time buys at the speed measured on the
calls so far, so that a crowd of long prompts delays the running streams by
about the budget per step, never by the crowd's whole prompts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from .base import attempt
from .kv import LayerMask
from .pipelining import StepTimer, upload

T = TypeVar("T")
R = TypeVar("R")


def ragged(
    start: int | Sequence[int], sizes: Sequence[int] | None, count: int, steps: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A prefill call's rows: each one's first position and how many of the
    call's ``steps`` positions are its own (the rest are padding), from the
    decoders' ``start`` (one for all, or per row) and ``sizes`` (None: all)."""
    starts = np.broadcast_to(np.asarray(start, dtype=np.int64), (count,))
    own = np.full(count, steps, dtype=np.int64) if sizes is None else np.asarray(sizes)
    assert own.shape == (count,) and bool((own >= 1).all() and (own <= steps).all())
    return starts, own


def line_cost(calls: Sequence[tuple[int, float]], fixed: float = 0.0) -> tuple[float, float]:
    """Seconds a call of ``n`` units costs, ``(fixed, per unit)``, from calls'
    ``(n, seconds)``: a least-squares line where their sizes differ enough to
    tell the two apart (``line_fit``); else ``fixed`` (what an earlier fit
    found) and the rest per unit, or all per unit."""
    return line_fit(calls) or spread_cost(calls, fixed)


def spread_cost(calls: Sequence[tuple[int, float]], fixed: float) -> tuple[float, float]:
    """``(fixed, per unit)``: calls' time less ``fixed`` a call, per unit (all
    of it, where that leaves none)."""
    sizes = float(sum(n for n, _ in calls))
    times = float(sum(t for _, t in calls))
    rest = times - fixed * len(calls)
    return (fixed, rest / sizes) if rest > 0 else (0.0, times / sizes)


def line_fit(calls: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """``(fixed, per unit)``: the least-squares line through calls' ``(n,
    seconds)``, where their sizes differ enough (twice) to tell the two apart
    and the line is one a cost can be (neither part below zero); else None."""
    sizes = np.array([n for n, _ in calls], dtype=np.float64)
    if len(sizes) < 2 or sizes.max() < 2 * sizes.min():
        return None
    times = np.array([t for _, t in calls], dtype=np.float64)
    slope, intercept = np.polyfit(sizes, times, 1)
    if slope > 0 and intercept >= 0:
        return float(intercept), float(slope)
    return None


def units_for(seconds: float, fixed: float, per_unit: float) -> int:
    """Units a call of ``(fixed, per_unit)`` seconds (``line_cost``) does in
    ``seconds``; where the fixed part alone is over half of them (a large model
    on a CPU reads all of its weights whatever a call's size), the units of a
    call of twice the fixed part: half of its time goes to units, not one unit
    a call at a call's whole price."""
    return int((max(seconds, 2 * fixed) - fixed) / max(per_unit, 1e-9))


@dataclass(frozen=True, slots=True)
class Group:
    """Rows of a packed call that start at the same place with as many positions:
    ``count`` rows of ``own`` positions from ``start`` on, packed one after the
    other from packed position ``first``; ``rows``: their places in the call."""

    rows: tuple[int, ...]
    first: int
    own: int
    start: int

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def end(self) -> int:
        """One past the last packed position of the group."""
        return self.first + self.count * self.own


@dataclass(frozen=True, slots=True)
class Packed:
    """A prefill call's own positions one after the other, without its padding.

    The call's rows ``[R, S]`` hold ``own[r]`` positions each, the rest padding.
    Packed, the work of each layer's products is the positions' (the sum of the
    rows' sizes), not the padded rows' (R times the longest): a crowd of
    prompts of different lengths pays for what it feeds. Rows that start at the
    same place with as many positions are packed together (``groups``), so that
    attention runs once per group, over the group's own positions, not over the
    longest row's.
    """

    index: npt.NDArray[np.int64]  # [T]: each packed position's place in the flat [R * S]
    row: npt.NDArray[np.int64]  # [T]: its row in the call
    position: npt.NDArray[np.int64]  # [T]: its position in its row
    last: npt.NDArray[np.int64]  # [R]: the packed place of each row's last own position
    groups: tuple[Group, ...]
    whole: bool  # no padding, rows in their order: the packed positions are the flat rows


def packed(starts: npt.NDArray[np.int64], own: npt.NDArray[np.int64], steps: int) -> Packed:
    """The packed layout of a call's rows (``ragged``'s ``starts`` and ``own``,
    ``steps`` positions each, padding included): rows grouped by their start and
    size, in the order they first appear."""
    keys: dict[tuple[int, int], list[int]] = {}
    for r, (start, size) in enumerate(zip(starts.tolist(), own.tolist(), strict=True)):
        keys.setdefault((start, size), []).append(r)
    groups = []
    first = 0
    for (start, size), members in keys.items():
        groups.append(Group(tuple(members), first, size, start))
        first += len(members) * size
    order = np.array([r for group in groups for r in group.rows], dtype=np.int64)
    sizes = own[order]
    offsets = np.repeat(np.cumsum(sizes) - sizes, sizes)
    within = np.arange(int(sizes.sum()), dtype=np.int64) - offsets
    row = np.repeat(order, sizes)
    last = np.empty(len(own), dtype=np.int64)
    last[order] = np.cumsum(sizes) - 1
    whole = bool((own == steps).all()) and bool((order == np.arange(len(own))).all())
    return Packed(
        index=row * steps + within,
        row=row,
        position=starts[row] + within,
        last=last,
        groups=tuple(groups),
        whole=whole,
    )


class GroupAttention:
    """A packed call's attention, group by group (``Packed.groups``): each
    group's rows attend over their own positions, causal from the start of a row
    (``is_causal``), or with a mask where the rows continue from ``start``.

    Made once a call (the masks, the cache rows each group reads: a slice where
    they follow each other, and where each packed position's keys and values
    go), applied in every layer.
    """

    def __init__(
        self,
        layout: Packed,
        rows: Sequence[int],
        device: torch.device,
        sent: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``sent``: ``inputs``' arrays on the device (a call's inputs go up in one
        copy: ``pipelining.upload``); None: sent here."""
        if sent is None:
            sent = upload(self.inputs(layout, rows), device)
        self.parts: list[tuple[Group, torch.Tensor | slice, LayerMask | None]] = []
        for i, group in enumerate(layout.groups):
            table = [rows[r] for r in group.rows]
            held: torch.Tensor | slice = (
                slice(table[0], table[0] + len(table)) if _consecutive(table) else sent[f"held{i}"]
            )
            mask = None
            if group.start:
                end = group.start + group.own
                positions = torch.arange(group.start, end, device=device)
                keep = torch.arange(end, device=device) <= positions[:, None]  # [own, end]
                mask = LayerMask(keep[None, None])
            self.parts.append((group, held, mask))
        self._rows = sent["table_rows"][:, None]  # [T, 1]
        self._positions = sent["positions"][:, None]  # [T, 1]

    @staticmethod
    def inputs(layout: Packed, rows: Sequence[int]) -> dict[str, npt.NDArray[np.int64]]:
        """What the attention of a call takes from the host: each packed
        position's cache row and position, and the rows of each group whose
        rows do not follow each other."""
        arrays = {
            "table_rows": np.asarray(rows, dtype=np.int64)[layout.row],
            "positions": layout.position,
        }
        for i, group in enumerate(layout.groups):
            table = [rows[r] for r in group.rows]
            if not _consecutive(table):
                arrays[f"held{i}"] = np.asarray(table, dtype=np.int64)
        return arrays

    def store(
        self, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write the packed positions' keys and values ``k``, ``v`` ``[T, H_kv, d]``
        into a layer's cache ``[rows, H_kv, L, d]``, each at its row and position."""
        heads = torch.arange(k.shape[1], device=k.device)[None, :]
        where = (self._rows, heads, self._positions)
        keys.index_put_(where, k.to(keys.dtype))
        values.index_put_(where, v.to(values.dtype))

    def each(
        self,
        q: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor | slice, LayerMask | None], torch.Tensor],
    ) -> torch.Tensor:
        """``q`` ``[T, H, d]``, group by group: ``attend(i, queries, held, mask)``
        maps group ``i``'s queries ``[n, H, own, d]`` (its rows ``held``, its
        mask) to their attention's output of that shape; packed again:
        ``[T, H * d]``."""
        heads, d = int(q.shape[1]), int(q.shape[2])
        outs = []
        for i, (group, held, mask) in enumerate(self.parts):
            queries = q[group.first : group.end].view(group.count, group.own, heads, d)
            attended = attend(i, queries.transpose(1, 2), held, mask)
            outs.append(attended.transpose(1, 2).reshape(group.count * group.own, heads * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``q`` ``[T, H, d]`` against a layer's cached ``keys`` and ``values``
        ``[rows, H_kv, L, d]`` (this call's already written): ``[T, H * d]``."""

        def own(
            i: int, queries: torch.Tensor, held: torch.Tensor | slice, mask: LayerMask | None
        ) -> torch.Tensor:
            end = self.parts[i][0].start + self.parts[i][0].own
            attended: torch.Tensor = F.scaled_dot_product_attention(
                queries,
                keys[held, :, :end].to(q.dtype),
                values[held, :, :end].to(q.dtype),
                attn_mask=None if mask is None else mask.for_(queries),
                is_causal=mask is None,
                enable_gqa=keys.shape[1] != queries.shape[1],
            )
            return attended

        return self.each(q, own)


def _consecutive(table: Sequence[int]) -> bool:
    return list(table) == list(range(table[0], table[0] + len(table)))


class PrefillBudget:
    """Positions a step may prefill.

    A call's time is taken as a fixed part (its launches, the per-layer work a
    call pays whatever its size) plus a part per position, fitted over the last
    calls; a budget from time per position alone would take the fixed part of
    the small calls (a step's one-position prompts) as the price of every
    position, and feed a crowd's long prompts a few positions a step.

    Args:
        positions: The most positions per step (what bounds a call's activations;
            at least one).
        seconds: A time budget per step (None: ``positions`` only).
        device: Where the calls run (on CUDA each call is timed by events
            around its work, read once it is done: a launch never waits for
            the step in flight to time a call).
        clock: The clock the calls are timed with (not on CUDA).
    """

    # Calls the fit looks back over.
    WINDOW = 16

    def __init__(
        self,
        positions: int,
        seconds: float | None,
        device: torch.device,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.positions = max(1, positions)
        self.seconds = seconds
        self.device = device
        self.clock = clock
        self._calls: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)
        self._fixed = 0.0  # a call's fixed part, as the last telling calls found it
        self._timer = StepTimer(device, clock)

    def now(self) -> int:
        """Positions this step may prefill: the cap, or what the time budget buys
        at the measured speed (once there is a measurement: ``units_for``)."""
        if self.seconds is not None:
            self._calls.extend(self._timer.done())
        if self.seconds is None or not self._calls:
            return self.positions
        return max(1, min(self.positions, units_for(self.seconds, *self.cost())))

    def cost(self) -> tuple[float, float]:
        """Seconds a call costs: ``(fixed, per position)``, from the last calls
        (``line_cost``). Where their sizes are too alike to tell the two parts
        apart (a long prompt fed at the budget's size, call after call), the
        fixed part the last telling calls found stays: taken all per
        position, it would make the next call's budget buy a position or
        two."""
        found = line_fit(self._calls)
        if found is not None:
            self._fixed = found[0]
            return found
        return spread_cost(self._calls, self._fixed)

    def start(self) -> Any:
        """A mark before a call (``measure`` takes it)."""
        return None if self.seconds is None else self._timer.start()

    def measure(self, positions: int, began: Any) -> None:
        """A call of ``positions`` positions that began at ``began`` (``start``)
        has returned (on CUDA: been launched; its time counts once its work is
        done)."""
        if self.seconds is None:
            return
        self._calls.extend(self._timer.stop(began, max(1, positions)))


def choose(
    waiting: Sequence[tuple[T, int]], budget: int, rows: int = 1
) -> tuple[list[tuple[T, int]], int]:
    """The chunks one call feeds, and their padded width (the call's inputs are
    padded to it; the decoder packs them and computes none of the padding).

    ``waiting``: each prompt's next chunk size, oldest first; ``rows``: decoder
    rows per prompt (2 where guidance pairs them). The oldest always goes in (cut
    to the budget if need be); each other one if the call's positions still fit
    the budget with it; one that does not is passed over for shorter ones
    behind it.
    """
    chosen: list[tuple[T, int]] = []
    width = 0
    total = 0
    for item, size in waiting:
        if not chosen:
            size = min(size, max(1, budget // rows))
        elif (total + size) * rows > budget:
            continue
        chosen.append((item, size))
        width = max(width, size)
        total += size
    return chosen, width


def feed(
    chosen: list[tuple[T, int]],
    width: int,
    call: Callable[[list[tuple[T, int]], int], Sequence[R]],
    failures: dict[int, BaseException],
    budget: PrefillBudget,
    rows: int = 1,
) -> list[R | None]:
    """``call(chosen, width)``: one result per chunk, the call timed into
    ``budget`` (its positions as ``choose`` counts them). If it raises, each
    chunk is fed again alone, so that one prompt's failure ends only its request
    (``failures``, by ``id``); its result is None."""
    began = budget.start()
    try:
        results: list[R | None] = list(call(chosen, width))
    except Exception as exc:
        if len(chosen) == 1:
            failures[id(chosen[0][0])] = exc
            return [None]
        return [
            attempt(failures, [item], lambda one: call(one, one[0][1])[0], [(item, size)])
            for item, size in chosen
        ]
    budget.measure(sum(size for _, size in chosen) * rows, began)
    return results
