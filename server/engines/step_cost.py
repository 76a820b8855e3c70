"""What a stream's context costs a decode step: measured once, at warm-up.

A decode step's attention reads every position of each row's context, so a
stream's step costs more as it grows: on the 2-core CPU, 64 tiny-model streams'
decode step took 2.7 ms at the start of their 10 s clips and 6.9 ms at the end.
Ticks measured while serving are too noisy to learn that growth from (a codec
call for many streams now and then doubles a tick), so each engine times its own
batched decode step over the same rows at a short and a long attention span,
the rows inactive (they compute, write nothing that any row reads and advance
none), and the scheduler counts the difference per stream and per second of
context (``server/capacity.py``).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Protocol

import torch

from .measures import Measures

__all__ = ["context_cost", "measure_context_cost"]

log = logging.getLogger(__name__)


class _Decoder(Protocol):
    codebooks: int

    def ensure(self, *, rows: int = 0, length: int = 0) -> None: ...

    def decode(self, codes: torch.Tensor, active: torch.Tensor, span: int | None = None) -> Any: ...


def measure_context_cost(
    decoder: _Decoder,
    *,
    name: str,
    streams: int,
    rows_per_stream: int,
    table_length: int,
    frame_rate: float,
    device: torch.device,
    measures: Measures | None = None,
) -> float:
    """An engine's ``context_cost`` at warm-up: a step over ``streams`` requests'
    rows (the table holds them), at a span of 512 positions (or the table's, if
    shorter) and of an eighth of that; or as a start before measured it (kept
    in ``measures``, where what is measured is kept); logged."""
    long = min(512, table_length)
    decoder.ensure(length=long)

    def measure() -> float:
        return context_cost(
            decoder,
            rows=rows_per_stream * streams,
            rows_per_stream=rows_per_stream,
            short=max(1, long // 8),
            long=long,
            frame_rate=frame_rate,
            device=device,
        )

    def usable(kept: object) -> float | None:
        if isinstance(kept, bool) or not isinstance(kept, int | float):
            return None
        return float(kept) if kept >= 0.0 else None

    cost = measure() if measures is None else measures.recall("context_cost", usable, measure)[0]
    log.info("%s: a second of context costs a stream %.4f ms a step", name, cost * 1000)
    return cost


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
