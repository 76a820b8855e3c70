"""Work done a part at a time between decode steps.

A request's preparation can hold long work (an uploaded clip's encoding, a
melody's separation). The engines write it as a generator that yields between
parts, and the scheduler steps the running streams between them
(``Engine.prepare_steps``). These run such a generator: each part without
autograd, or all its parts at once.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

import torch

__all__ = ["run_through", "without_grad"]

R = TypeVar("R")


def without_grad(pieces: Generator[None, None, R]) -> Generator[None, None, R]:
    """``pieces``, each part run without autograd (not across the pauses: the
    scheduler's own work runs between them); its result."""
    while True:
        with torch.no_grad():
            try:
                next(pieces)
            except StopIteration as done:
                result: R = done.value
                return result
        yield


def run_through(pieces: Generator[None, None, R]) -> R:
    """Every part of ``pieces`` now (none of its pauses); its result."""
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            result: R = done.value
            return result
