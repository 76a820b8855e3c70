"""Prompt beginnings that requests share, prefilled once.

Speech prompts open with what many requests have in common: the system text,
a scene, a named voice's reference (its transcript, then hundreds of audio
positions). ``PrefixStore`` keeps the keys and values of such a beginning once
a request has prefilled it; a later request opening with the same tokens and
codes gets them copied into its row instead of prefilling them again (on a
CPU, a 3B-parameter model prefills a position in about 80 ms; a voice of ten
seconds is 250 positions).

What a beginning holds depends on its tokens and codes alone (causal
attention), so the copy is what the request's own prefill would compute, to
float rounding (a product over other rows in the call rounds alike, not bit for
bit). Bounded: at most ``budget`` bytes, the least recently used beginning
given up first; one larger than the budget, or than a quarter of the device's
free memory, is not kept; nor is one whose keys or values are not finite (what
a failed request leaves must not reach another): on a GPU that is known once
the device has computed it (``HostCopy``), and until then the beginning is
kept but not given out (so that keeping it never waits for a step in flight).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .kv import free_memory
from .pipelining import HostCopy

__all__ = ["PrefixStore"]

# Of the memory free on the device, what one beginning kept may take: a server
# whose model barely fits keeps its memory for the steps.
FREE_SHARE = 0.25


class PrefixStore:
    """Keys and values ``[layers, H_kv, P, d]`` of shared prompt beginnings, by
    content (``key``: the beginning's tokens and codes, as bytes)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        # Each beginning's keys and values, and whether they are finite (on its way).
        self._held: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor, HostCopy]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: bytes) -> bool:
        return key in self._held

    def get(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The beginning's keys and values (now the most recently used), or None:
        not kept, not known to be finite yet, or found not finite (given up)."""
        held = self._held.get(key)
        if held is None or not held[2].ready():
            return None
        keys, values, finite = held
        if not bool(finite.values()):
            self._give_up(key)
            return None
        self._held.move_to_end(key)
        return keys, values

    def put(self, key: bytes, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Keep a beginning (copies of ``keys`` and ``values``), giving up the least
        recently used ones it needs the room of. Not kept (False): one larger than
        the budget, one whose keys or values are found not finite now (on a GPU,
        once computed: ``get`` gives it up then), or one the device has no memory
        for now (more than a quarter of what is free: on a CPU, Linux gives
        memory it does not have and ends the process when it is used)."""
        size = _size(keys) + _size(values)
        if key in self._held or size > self.budget:
            return False
        free = free_memory(keys.device)
        if free is not None and size > FREE_SHARE * free:
            return False
        finite = HostCopy(torch.isfinite(keys).all() & torch.isfinite(values).all())
        if finite.ready() and not bool(finite.values()):
            return False
        while self.bytes + size > self.budget:
            self._give_up(next(iter(self._held)))
        try:
            self._held[key] = (keys.clone(), values.clone(), finite)
        except torch.OutOfMemoryError:
            return False  # (the device is short of memory now: the next request keeps it)
        self.bytes += size
        return True

    def _give_up(self, key: bytes) -> None:
        keys, values, _ = self._held.pop(key)
        self.bytes -= _size(keys) + _size(values)

    def clear(self) -> None:
        self._held.clear()
        self.bytes = 0


def _size(tensor: torch.Tensor) -> int:
    return int(tensor.numel()) * int(tensor.element_size())
