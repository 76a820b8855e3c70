"""``GET /metrics``: Prometheus' text format (0.0.4), with ``prometheus_client``.

Each server keeps its own registry (several servers may share a process, as in
the tests). The scheduler records each request as it ends, on the inference
thread, sessions record the frames they refuse, on the event loop, and the
encoders each piece of their work, on their threads (``prometheus_client``'s
metrics are thread-safe); the live gauges are read when the page is scraped.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "Samples", "render"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# No `*_created` series: they double every counter for what a scrape's start
# time already says (process-wide; this server is the process).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: time to first audio and time in the queue.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Audio seconds per wall second of a request (above 1: faster than real time).
SPEED_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0)
# Seconds a garbage collection held the interpreter.
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class Metrics:
    """What the scheduler and the sessions record about requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "wavecast_requests",
            "Requests that ended, by model, status (completed, cancelled, error) and "
            "error code (empty unless the status is error).",
            ["model", "status", "code"],
            registry=self.registry,
        )
        self._refused = Counter(
            "wavecast_refused",
            "Frames refused before any model work, by error code; frame is "
            "'generate' for a request refused before it was queued.",
            ["code", "frame"],
            registry=self.registry,
        )
        self._audio = Counter(
            "wavecast_audio_seconds",
            "Seconds of audio streamed to clients, by model.",
            ["model"],
            registry=self.registry,
        )
        self._first_audio = Histogram(
            "wavecast_first_audio_seconds",
            "From a request's start to its first audio.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._queued = Histogram(
            "wavecast_queued_seconds",
            "Time requests waited in the queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._speed = Histogram(
            "wavecast_real_time_factor",
            "Audio seconds per wall second of each completed request.",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=self.registry,
        )
        self._gc_pause = Histogram(
            "wavecast_gc_pause_seconds",
            "Garbage collections while serving, by generation: how long each held the "
            "interpreter (every stream waits; the heap loaded at start is frozen out of them).",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=self.registry,
        )
        self._encoded = Counter(
            "wavecast_encoded_audio_seconds",
            "Seconds of audio encoded for streams in mp3, opus or flac, by format.",
            ["format"],
            registry=self.registry,
        )
        self._encoding = Counter(
            "wavecast_encoder_busy_seconds",
            "Seconds the encoders' threads spent encoding, by format: over the wall time "
            "and --encoder-threads, how busy they are.",
            ["format"],
            registry=self.registry,
        )
        self._held = Counter(
            "wavecast_held_steps",
            "Steps that requests sat out, their audio not taken up as fast as it was made "
            "(their client reading slower, or their encoders behind), by model.",
            ["model"],
            registry=self.registry,
        )
        self._resumed = Counter(
            "wavecast_resumed_requests",
            "Requests that picked a cut stream up where its client had it "
            "(generate.resume), by model.",
            ["model"],
            registry=self.registry,
        )
        self._remade = Counter(
            "wavecast_resumed_audio_seconds",
            "Seconds of audio made again for them and not sent (what the client had), by model.",
            ["model"],
            registry=self.registry,
        )
        self._from_codes = Counter(
            "wavecast_resumed_from_codes_seconds",
            "Of the audio made again, seconds taken from the codes the client sent "
            "(generate.resume_codes): decoded again, not generated again, by model.",
            ["model"],
            registry=self.registry,
        )
        self._gc_started = 0.0
        # The interpreter's own: collections and objects by generation, and the
        # process's memory, CPU time and open files.
        GCCollector(registry=self.registry)
        ProcessCollector(registry=self.registry)

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
        resumed_seconds: float | None = None,
        from_codes_seconds: float = 0.0,
    ) -> None:
        """A request's end. ``audio_seconds``: streamed to its client;
        ``resumed_seconds``: made again and not sent (a ``resume``);
        ``from_codes_seconds``: taken from the codes its client sent."""
        self._requests.labels(model, status, error or "").inc()
        self._audio.labels(model).inc(audio_seconds)
        if resumed_seconds is not None:
            self._resumed.labels(model).inc()
            self._remade.labels(model).inc(resumed_seconds)
            self._from_codes.labels(model).inc(from_codes_seconds)
        if first_audio_seconds is not None:
            self._first_audio.labels(model).observe(first_audio_seconds)
        if queued_seconds is not None:
            self._queued.labels(model).observe(queued_seconds)
        if real_time_factor is not None and status == "completed":
            self._speed.labels(model).observe(real_time_factor)

    def held(self, model: str) -> None:
        """A request left out of a step: its client or its encoders are behind."""
        self._held.labels(model).inc()

    def encoded(self, format: str, audio_seconds: float, busy_seconds: float) -> None:
        """A piece of encoding work done: the audio it took in, the time it took."""
        self._encoded.labels(format).inc(audio_seconds)
        self._encoding.labels(format).inc(busy_seconds)

    def watch_gc(self) -> None:
        """Time every garbage collection from now on (``unwatch_gc`` stops)."""
        gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self._gc_pause.labels(str(info["generation"])).observe(pause)

    def refused(self, code: str, *, request: bool) -> None:
        """A frame refused by a session (codes are a fixed, documented set)."""
        self._refused.labels(code, "generate" if request else "other").inc()


Samples = list[tuple[dict[str, str], float]]


class _Scrape(Collector):
    """One scrape: the live families, then the registry's."""

    def __init__(self, live: list[Metric], registry: CollectorRegistry) -> None:
        self.live = live
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.live
        yield from self.registry.collect()


def render(
    metrics: Metrics,
    gauges: Mapping[str, tuple[str, float | Samples]],
    counters: Mapping[str, tuple[str, float | Samples]],
) -> str:
    """The exposition: ``gauges`` and ``counters`` read now (name -> (help, a
    value or labelled samples)), then what ``metrics`` recorded."""
    live: list[Metric] = []
    kinds: list[tuple[Any, Mapping[str, tuple[str, float | Samples]]]] = [
        (GaugeMetricFamily, gauges),
        (CounterMetricFamily, counters),
    ]
    for kind, families in kinds:
        for name, (help_text, value) in families.items():
            if isinstance(value, list):
                names = sorted({key for labels, _ in value for key in labels})
                family = kind(name, help_text, labels=names)
                for labels, sample in value:
                    family.add_metric([labels.get(key, "") for key in names], sample)
            else:
                family = kind(name, help_text, value=value)
            live.append(family)
    return generate_latest(_Scrape(live, metrics.registry)).decode()
