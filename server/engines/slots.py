"""The slot table: which request decodes in which row of a batched decoder.

A request takes the lowest free slot when it starts and gives it back when it
ends (completed, cancelled, failed); the next request reuses it. When every slot
is taken the table grows (with the decoder's cache, in powers of two). A step
runs over the first slots up to the last one in use, rounded up to a power of
two, so that one stream after a crowd pays for one stream's rows, and the step
keeps a handful of shapes (what a captured graph needs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = ["SlotTable"]

T = TypeVar("T")


class SlotTable(Generic[T]):
    """Owners by slot; ``grow(n)`` makes room for at least ``n`` slots elsewhere
    (the decoder's rows, per-slot settings) and returns how many there are now."""

    def __init__(self, grow: Callable[[int], int]) -> None:
        self._grow = grow
        self.owners: list[T | None] = [None] * grow(1)

    def __len__(self) -> int:
        return len(self.owners)

    def take(self, owner: T) -> int:
        """The lowest free slot, now ``owner``'s (the table grows if none is free)."""
        try:
            slot = self.owners.index(None)
        except ValueError:
            slot = len(self.owners)
            count = self._grow(slot + 1)
            self.owners.extend([None] * (count - len(self.owners)))
        self.owners[slot] = owner
        return slot

    def reserve(self, count: int) -> None:
        """Room for ``count`` slots now (the rows a step can cover stay the same
        powers of two as when the table grows on demand)."""
        if count > len(self.owners):
            total = self._grow(count)
            self.owners.extend([None] * (total - len(self.owners)))

    def spans(self) -> list[int]:
        """Every number of slots a step can cover with the table as it is."""
        spans = [1]
        while spans[-1] < len(self.owners):
            spans.append(min(len(self.owners), 2 * spans[-1]))
        return spans

    def holds(self, owner: T, slot: int | None) -> bool:
        return slot is not None and self.owners[slot] is owner

    def release(self, owner: T, slot: int | None) -> bool:
        """Free ``slot`` if ``owner`` holds it; whether it did."""
        if slot is None or self.owners[slot] is not owner:
            return False
        self.owners[slot] = None
        return True

    def span(self, slots: Iterable[int]) -> int:
        """How many slots a step covers for requests in ``slots``: up to the last,
        rounded up to a power of two (slots are taken lowest first)."""
        last = max(slots)
        return min(len(self.owners), 1 << last.bit_length())
