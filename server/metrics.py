"""``GET /metrics``: counters and histograms in Prometheus' text format (0.0.4).

Written by hand (the format is a few lines of text) so the server needs no
client library. The scheduler records each request as it ends, on the
inference thread; the event loop renders on demand; a lock keeps the two apart.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Metrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: time to first audio and time in the queue.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Audio seconds per wall second of a request (above 1: faster than real time).
SPEED_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """What the scheduler records about the requests that ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (model, status, code) -> count
        self.audio_seconds: dict[str, float] = {}  # model -> seconds streamed
        self.first_audio: dict[str, Histogram] = {}
        self.queued: dict[str, Histogram] = {}
        self.speed: dict[str, Histogram] = {}
        self.refusals: dict[tuple[str, str], int] = {}  # (code, frame kind) -> count

    def finished(
        self,
        model: str,
        status: str,
        *,
        error: str | None = None,
        audio_seconds: float = 0.0,
        first_audio_seconds: float | None = None,
        queued_seconds: float | None = None,
        real_time_factor: float | None = None,
    ) -> None:
        with self._lock:
            key = (model, status, error or "")
            self.requests[key] = self.requests.get(key, 0) + 1
            self.audio_seconds[model] = self.audio_seconds.get(model, 0.0) + audio_seconds
            if first_audio_seconds is not None:
                self._histogram(self.first_audio, model, LATENCY_BUCKETS).observe(
                    first_audio_seconds
                )
            if queued_seconds is not None:
                self._histogram(self.queued, model, LATENCY_BUCKETS).observe(queued_seconds)
            if real_time_factor is not None and status == "completed":
                self._histogram(self.speed, model, SPEED_BUCKETS).observe(real_time_factor)

    def refused(self, code: str, *, request: bool) -> None:
        """A frame refused by a session (codes are a fixed, documented set)."""
        with self._lock:
            key = (code, "generate" if request else "other")
            self.refusals[key] = self.refusals.get(key, 0) + 1

    @staticmethod
    def _histogram(
        table: dict[str, Histogram], model: str, buckets: tuple[float, ...]
    ) -> Histogram:
        if model not in table:
            table[model] = Histogram(buckets)
        return table[model]

    def lines(self) -> list[str]:
        with self._lock:
            out = _family(
                "wavecast_requests_total",
                "counter",
                "Requests that ended, by model, status (completed, cancelled, error) and "
                "error code.",
                (
                    ({"model": m, "status": s, **({"code": c} if c else {})}, n)
                    for (m, s, c), n in sorted(self.requests.items())
                ),
            )
            out += _family(
                "wavecast_refused_total",
                "counter",
                "Frames refused before any model work, by error code; frame is "
                "'generate' for a request refused before it was queued.",
                (({"code": c, "frame": f}, n) for (c, f), n in sorted(self.refusals.items())),
            )
            out += _family(
                "wavecast_audio_seconds_total",
                "counter",
                "Seconds of audio streamed to clients, by model.",
                (({"model": m}, v) for m, v in sorted(self.audio_seconds.items())),
            )
            for name, help_text, table in (
                (
                    "wavecast_first_audio_seconds",
                    "From a request's start to its first audio.",
                    self.first_audio,
                ),
                ("wavecast_queued_seconds", "Time requests waited in the queue.", self.queued),
                (
                    "wavecast_real_time_factor",
                    "Audio seconds per wall second of each completed request.",
                    self.speed,
                ),
            ):
                out += _histograms(name, help_text, table)
        return out


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


def _histograms(name: str, help_text: str, table: Mapping[str, Histogram]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for model, h in sorted(table.items()):
        for bound, count in zip(h.buckets, h.counts, strict=True):
            lines.append(f"{name}_bucket{_labels({'model': model, 'le': _number(bound)})} {count}")
        lines.append(f"{name}_bucket{_labels({'model': model, 'le': '+Inf'})} {h.count}")
        lines.append(f"{name}_sum{_labels({'model': model})} {_number(h.total)}")
        lines.append(f"{name}_count{_labels({'model': model})} {h.count}")
    return lines


Samples = list[tuple[dict[str, str], float]]


def render(
    metrics: Metrics,
    gauges: Mapping[str, tuple[str, float | Samples]],
    counters: Mapping[str, tuple[str, float]],
) -> str:
    """The exposition: ``gauges`` and ``counters`` (name -> (help, a value or
    labelled samples)), then what ``metrics`` recorded."""
    lines: list[str] = []
    for kind, table in (("gauge", gauges), ("counter", counters)):
        for name, (help_text, value) in table.items():
            samples = value if isinstance(value, list) else [({}, value)]
            lines += _family(name, kind, help_text, samples)
    lines += metrics.lines()
    return "\n".join(lines) + "\n"
