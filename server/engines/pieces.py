"""Work done a part at a time between decode steps.

A request's preparation can hold long work (an uploaded clip's encoding, a
melody's separation). The engines write it as a generator that yields between
parts, and the scheduler steps the running streams between them
(``Engine.prepare_steps``). These run such a generator: each part without
autograd, or all its parts at once; and say how far it is at each pause (the
part of the work done, which the scheduler sends the client), from a count of
its parts made beforehand, or within a share of a larger work.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import torch

__all__ = ["measured", "run_through", "scaled", "without_grad"]

R = TypeVar("R")
Y = TypeVar("Y")


def without_grad(pieces: Generator[Y, None, R]) -> Generator[Y, None, R]:
    """``pieces``, each part run without autograd (not across the pauses: the
    scheduler's own work runs between them), its pauses as they come; its result."""
    while True:
        with torch.no_grad():
            try:
                paused = next(pieces)
            except StopIteration as done:
                result: R = done.value
                return result
        yield paused


def measured(
    pieces: Generator[None, None, R], total: int, start: float = 0.0, width: float = 1.0
) -> Generator[float, None, R]:
    """``pieces``, which pauses ``total`` times at most, each pause saying how
    far it is: the pauses made over ``total``, below 1, within ``start`` and
    ``start + width`` (its share of a larger work); its result."""
    done = 0
    while True:
        try:
            next(pieces)
        except StopIteration as finished:
            result: R = finished.value
            return result
        done += 1
        yield start + width * min(done / max(total, 1), 0.99)


def scaled(
    pieces: Generator[float | None, None, R], start: float, width: float
) -> Generator[float | None, None, R]:
    """``pieces``, each pause's part done (a float, 0 to 1) taken as a share of
    a larger work: within ``start`` and ``start + width``; its result."""
    while True:
        try:
            paused = next(pieces)
        except StopIteration as finished:
            result: R = finished.value
            return result
        yield None if paused is None else start + width * paused


def run_through(pieces: Generator[None, None, R]) -> R:
    """Every part of ``pieces`` now (none of its pauses); its result."""
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            result: R = done.value
            return result
