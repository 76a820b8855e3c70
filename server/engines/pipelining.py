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

A launch runs while the step before it computes, so nothing in it may wait for
the device, including where requests join or open their next chunk: what goes
up (a step's inputs, a prefill's tokens and positions, new rows' sampling
parameters) goes from pinned memory without waiting (``to_device``,
``upload``: one copy a call); what comes back is asked for and used once there
(``HostCopy``: a kept prompt beginning's finiteness; ``StepTimer``: a prefill
call's time for the budget); prompts are laid out and tokenized on the host.
The tests list any wait in a launch on a CPU (``waits_in``) and fail at one on
a GPU (``torch.cuda``'s sync debug mode).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from .base import Job
from .slots import SlotTable

__all__ = ["CodecPlace", "HostCopy", "Launched", "StepTimer", "read_back", "to_device", "upload"]


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
    _rows: list[list[int]] | None = None

    def wait(self) -> None:
        """Until the codes are on the host."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    def rows(self) -> list[list[int]]:
        """Each row's codes and, last, whether its logits were finite (1 or 0),
        as ints, once on the host (``wait``)."""
        self.wait()
        if self._rows is None:
            self._rows = self.back.tolist()
        return self._rows

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
    if host.device == device:
        return host
    return host.to(device)


def upload(
    arrays: Mapping[str, npt.ArrayLike | torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Host integer arrays on the device, as int64 tensors of their shapes (by
    name), in one copy: on CUDA from pinned memory, without waiting for the
    work in flight (a launch that prefills or seats new rows while a step
    computes sends its inputs this way). A tensor already on the device is
    passed through."""
    out: dict[str, torch.Tensor] = {}
    host: dict[str, npt.NDArray[np.int64]] = {}
    for name, array in arrays.items():
        if isinstance(array, torch.Tensor) and array.device == device:
            out[name] = array.to(torch.int64)
        else:
            if isinstance(array, torch.Tensor):
                array = array.numpy()
            host[name] = np.asarray(array, dtype=np.int64)
    if host:
        flat = torch.from_numpy(np.concatenate([array.reshape(-1) for array in host.values()]))
        sent = to_device(flat, device, later=True)
        pieces = sent.split([array.size for array in host.values()])
        for (name, array), piece in zip(host.items(), pieces, strict=True):
            out[name] = piece.view(array.shape)
    return {name: out[name] for name in arrays}


class HostCopy:
    """A device tensor's values on their way to the host, there once the work
    that makes them is done (on CUDA, into pinned memory with an event;
    elsewhere at once): a launch asks ``ready`` and goes on without them
    rather than wait."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: Any = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().clone()

    def ready(self) -> bool:
        """Whether the values are on the host (never waits)."""
        if self._event is not None and self._event.query():
            self._event = None
        return self._event is None

    def values(self) -> npt.NDArray[Any]:
        """The values (``ready`` first)."""
        assert self.ready(), "not on the host yet"
        values: npt.NDArray[Any] = self._host.numpy()
        return values


class StepTimer:
    """How long calls on the device take, without waiting for them: each call
    is timed by events around its work (on CUDA; elsewhere by the clock, the
    work being done when the call returns), and read once done, a call or a
    few later (``done``)."""

    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock
        self._pending: deque[tuple[Any, Any, int]] = deque()

    def start(self) -> Any:
        """A mark before a call's work."""
        if not self.cuda:
            return self.clock()
        began = torch.cuda.Event(enable_timing=True)
        began.record()
        return began

    def stop(self, began: Any, size: int) -> list[tuple[int, float]]:
        """The call begun at ``began`` (``size``: what it did) has been launched;
        the calls whose work is done now: ``(size, seconds)``, oldest first."""
        if not self.cuda:
            return [(size, self.clock() - began)]
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._pending.append((began, ended, size))
        return self.done()

    def done(self) -> list[tuple[int, float]]:
        """The calls whose work is done since last asked (never waits)."""
        out = []
        while self._pending and self._pending[0][1].query():
            began, ended, size = self._pending.popleft()
            out.append((size, began.elapsed_time(ended) / 1000.0))
        return out


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
