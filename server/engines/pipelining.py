"""Pipelined steps: the host's part of a step while the device computes the next.

A decode step on a GPU is the device's work (one recorded graph: the forward and
the draw) and the host's (the next step's inputs, reading the codes back, each
request's bookkeeping and audio, the codec's calls, the scheduler's messages).
Run one after the other, the device waits through the host's part: on an H200
one musicgen-small stream stepped in 2.82 ms where its graph takes 2.21, one
random-higgs-3b stream in 5.30 ms where its graph took 3.84.

Pipelined, an engine launches a step and returns before its codes are read: the
next call reads them (``Launched.wait``: on CUDA they come back into pinned
memory, with an event), and each step's outputs come a call later. MusicGen
launches step *n + 1* before it reads step *n*'s codes (a request's codes in
flight are fed to the next step on the device), and so does the speech engine
(each row's rules, the codes it feeds among them, kept on the device:
``higgs.rules``; a draw made after a row's utterance ended by its codes is
dropped once they are read). The codec runs on a CUDA stream of its own
(``CodecPlace``), so that reading its audio back does not wait for the step in
flight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from .base import Job
from .slots import SlotTable

__all__ = ["CodecPlace", "Launched", "read_back", "to_device"]


class _Slotted(Protocol):
    slot: int | None


S = TypeVar("S", bound=_Slotted)


@dataclass(slots=True)
class Launched(Generic[S]):
    """A step launched: its codes ``[rows, K + 1]`` (the last column whether a
    row's logits were finite) on their way to ``back`` on the host, there once
    ``ready`` (a CUDA event; None: already); its logits on the device (tests
    compare them); which rows drew (``stepped``), and the requests that drew,
    with their jobs where the engine keeps them (a pipelined step is read a
    call later: a job finished in between is no longer its request's)."""

    back: torch.Tensor
    ready: Any
    logits: torch.Tensor
    stepped: npt.NDArray[np.bool_]
    drew: list[tuple[S, Job | None]]

    def wait(self) -> None:
        """Until the codes are on the host."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    def current(self, slots: SlotTable[S]) -> list[tuple[S, Job | None]]:
        """The requests that drew and are still where they drew: not finished
        since (their job's state, holding their slot in ``slots``); without a
        job kept (a plain step, read at once), every one."""
        return [
            (st, job)
            for st, job in self.drew
            if job is None or (job.state is st and slots.holds(st, st.slot))
        ]

    def forget(self, state: S) -> None:
        """Leave ``state`` out (its request finished with its codes in flight)."""
        self.drew[:] = [(other, job) for other, job in self.drew if other is not state]


def read_back(out: torch.Tensor, later: bool) -> tuple[torch.Tensor, Any]:
    """A step's outputs on the host and the event that says they are there:
    copied now (waiting for the device; no event), or, ``later``, on CUDA into
    pinned memory without waiting (the outputs may be a recorded graph's, which
    its next replay writes over: copied before it), elsewhere cloned."""
    if not later:
        return out.cpu(), None
    if out.device.type != "cuda":
        return out.clone(), None
    back = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    back.copy_(out, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return back, ready


def to_device(host: torch.Tensor, device: torch.device, later: bool) -> torch.Tensor:
    """A step's inputs on the device: ``later``, on CUDA, from pinned memory
    without waiting for the device's work in flight."""
    if later and device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class CodecPlace:
    """Where an engine's codec runs: with ``own`` on CUDA, on a stream of its
    own. Every codec call (its check at load, the warm-up's) runs in it, so that
    the codec's tensors are that stream's alone; each call ends by reading its
    audio back, which then waits for the codec's work only. What was written to
    the codec on the current stream (preparing it for serving) comes first."""

    def __init__(self, device: torch.device, own: bool) -> None:
        self.stream: Any = None
        if own and device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def __call__(self) -> contextlib.AbstractContextManager[Any]:
        """The context the codec's calls run in."""
        if self.stream is None:
            return contextlib.nullcontext()
        place: contextlib.AbstractContextManager[Any] = torch.cuda.stream(self.stream)
        return place
