"""What a stream's context costs a decode step: measured once, at warm-up.

A decode step's attention reads every position of each row's context, so a
stream's step costs more as it grows: on the 2-core CPU, 64 tiny-model streams
take 9.5 ms a tick at the start of their clips and 18 ms near the end of 10 s.
Ticks measured while serving are too noisy to learn that growth from (a codec
call for many streams now and then doubles a tick), so each engine times its own
batched decode step over the same rows at a short and a long attention span,
the rows inactive (they compute, write nothing that any row reads and advance
none), and the scheduler counts the difference per stream and per second of
context (``server/capacity.py``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Protocol

import torch

__all__ = ["context_cost"]


class _Decoder(Protocol):
    codebooks: int

    def decode(self, codes: torch.Tensor, active: torch.Tensor, span: int | None = None) -> Any: ...


def context_cost(
    decoder: _Decoder,
    *,
    rows: int,
    rows_per_stream: int,
    short: int,
    long: int,
    frame_rate: float,
    device: torch.device,
    repeats: int = 7,
) -> float:
    """Seconds a decode step costs per stream per second of its context.

    The table must hold ``rows`` rows and ``long`` positions. The median of
    ``repeats`` steps at each span; 0 where the long span measures no slower.
    """
    codes = torch.zeros(rows, decoder.codebooks, dtype=torch.int64, device=device)
    active = torch.zeros(rows, dtype=torch.bool, device=device)

    def timed(span: int) -> float:
        times: list[float] = []
        count = repeats
        while len(times) <= count:  # (the first: the shapes' first run)
            if len(times) == 1 and times[0] > 0.05:
                count = min(count, 3)  # (a large model on a CPU: a few are enough)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            decoder.decode(codes, active, span)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])

    with torch.no_grad():
        extra = timed(long) - timed(short)
    streams = rows / rows_per_stream
    seconds = (long - short) / frame_rate
    return max(0.0, extra / (streams * seconds))
