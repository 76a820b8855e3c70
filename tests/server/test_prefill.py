"""Preparing new requests is bounded work between decode steps.

A request's preparation (uploads, text encoding, continuation prompt) runs in the
engine's units of work, at most one budget per scheduler tick, while the running
streams keep stepping; a long prompt prefills a chunk per step. Recorded with a
spy around the real tiny engine: the order of its calls, not timings.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import (
    higgs_engines,
    make_config,
    running_server,
    timeout,
    tiny_engines,
    with_stereo,
)

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Progress, Queued
from wavecast.server.engines.base import EngineRequest, Job, StepOutput


class Recorder:
    """The real engine, with a log of its calls: ("unit", id) and ("step", ids)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.events: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def prepare_steps(self, request: EngineRequest) -> Generator[Job | None, None, None]:
        for item in self.engine.prepare_steps(request):
            self.events.append(("unit", request.request_id))
            yield item

    def begin(self, jobs: Sequence[Job]) -> None:
        self.events.append(("begin", [job.request.request_id for job in jobs]))
        self.engine.begin(jobs)

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        self.events.append(("step", [job.request.request_id for job in jobs]))
        outputs: list[StepOutput] = self.engine.step(jobs)
        return outputs


def clip(seconds: float) -> bytes:
    t = np.arange(int(seconds * 32000)) / 32000
    buffer = io.BytesIO()
    soundfile.write(
        buffer, (0.25 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 32000, format="WAV"
    )
    return buffer.getvalue()


@asynccontextmanager
async def beside_a_running_stream(
    recorder: Recorder, model: str, start: Callable[[Any], Awaitable[Any]]
) -> AsyncIterator[tuple[Any, Any]]:
    """A server of ``recorder``'s engine as ``model``, with no preparation budget
    (one unit a tick), and a stream (``start(client)``) past its first audio:
    the client and that stream, cancelled at the end."""

    def factory() -> Mapping[str, Any]:
        return {model: recorder}

    # Slots: on a slow machine the measured speed would keep the newcomers queued
    # behind the running stream, and this is about preparing them beside it.
    config = make_config(max_active=4, admission="slots")
    config = replace(config, models=replace(config.models, prefill_budget_ms=0.0))
    async with running_server(config, factory) as srv, connect(srv.url) as client:
        running = await start(client)
        async for event in running:
            if isinstance(event, Audio):
                break
        rest = asyncio.ensure_future(running.collect())
        yield client, running
        await running.cancel()
        assert (await asyncio.wait_for(rest, timeout(30))).status == "cancelled"


async def collect_events(stream: Any) -> list[Any]:
    return [event async for event in stream]


def steps_between(events: list[tuple[str, Any]], units: list[int], running: str) -> None:
    """The ``running`` stream stepped between any two of the ``units`` (indices
    in ``events``)."""
    for before, after in itertools.pairwise(units):
        between = [e for e in events[before:after] if e[0] == "step"]
        assert between and all(running in ids for _, ids in between)


async def test_new_requests_prepare_between_the_steps_of_a_running_stream() -> None:
    recorder = Recorder(tiny_engines()["tiny-musicgen"])

    # (The running stream is long enough to outlast the others on a slow, busy
    # machine: it is cancelled once they are done.)
    def start(client: Any) -> Awaitable[Any]:
        return client.generate("tiny-musicgen", "a", duration=120.0, seed=1)

    async with beside_a_running_stream(recorder, "tiny-musicgen", start) as (client, running):
        # Three requests at once: two with a continuation prompt (encoded a
        # layer of the codec's encoder a unit, then conditioned), one with a
        # long description (one unit).
        joining = [
            await client.generate(
                "tiny-musicgen", "b", duration=10.0, inputs={"continuation": clip(6.0)}
            ),
            await client.generate(
                "tiny-musicgen", "c", duration=10.0, inputs={"continuation": clip(5.0)}
            ),
            await client.generate("tiny-musicgen", "d " * 200, duration=1.0),
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(stream.collect() for stream in joining)), timeout(120)
        )
        assert [r.status for r in results] == ["completed"] * 3
    events = recorder.events
    units = [i for i, (kind, rid) in enumerate(events) if kind == "unit" and rid != running.id]
    counted = [sum(1 for i in units if events[i][1] == stream.id) for stream in joining]
    assert counted[0] > 10 and counted[1] > 10 and counted[2] == 1
    # With no budget, one unit per tick: the running stream steps between any two.
    steps_between(events, units, running.id)
    # ... and it never misses a tick while the others prepare, prefill and run (it
    # was cancelled only once they were done).
    steps = [ids for kind, ids in events[units[0] :] if kind == "step"]
    assert len(steps) > 20 and all(running.id in ids for ids in steps)


async def test_an_uploaded_voice_is_encoded_between_the_steps_of_a_running_stream() -> None:
    """A speech request with a long uploaded voice (20 s) joins a running
    stream: the voice is encoded in many units (a part of the tokenizer's
    work each), and with no budget, one a tick, the running stream steps
    between any two."""
    recorder = Recorder(higgs_engines()["tiny-higgs"])
    t = np.arange(24000 * 20) / 24000
    buffer = io.BytesIO()
    soundfile.write(
        buffer, (0.25 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 24000, format="WAV"
    )

    def start(client: Any) -> Awaitable[Any]:
        story = "A long story, told slowly. " * 20
        return client.speak("tiny-higgs", story, max_new_tokens=2048, seed=1)

    async with beside_a_running_stream(recorder, "tiny-higgs", start) as (client, running):
        cloned = await client.speak(
            "tiny-higgs", "Hello there.", reference=buffer.getvalue(), max_new_tokens=30, seed=2
        )
        result = await asyncio.wait_for(cloned.collect(), timeout(120))
        assert result.status == "completed"
    events = recorder.events
    units = [i for i, (kind, rid) in enumerate(events) if kind == "unit" and rid == cloned.id]
    assert len(units) > 20
    steps_between(events, units, running.id)


async def test_a_melody_is_separated_between_the_steps_of_a_running_stream() -> None:
    """A melody request (a 6 s reference) joins a running stream of the same
    model: its Demucs separation runs a layer a unit (and its conditioning's
    two runs one each), and with no budget, one a tick, the running stream
    steps between any two. The client hears how far the analysis is:
    ``"prepare"`` progress from 0, growing, below 1, before ``started``."""
    recorder = Recorder(with_stereo()["tiny-musicgen-melody"])

    def start(client: Any) -> Awaitable[Any]:
        return client.generate("tiny-musicgen-melody", "a", duration=120.0, seed=1)

    model = "tiny-musicgen-melody"
    async with beside_a_running_stream(recorder, model, start) as (client, running):
        melody = await client.generate(model, "hum", duration=1.0, inputs={"melody": clip(6.0)})
        events = await asyncio.wait_for(collect_events(melody), timeout(120))
        assert melody.done is not None and melody.done.status == "completed"
    kinds = [type(event).__name__ for event in events]
    preparing = [
        event.fraction
        for event in events[: kinds.index("Started")]
        if isinstance(event, Progress) and event.stage == "prepare"
    ]
    assert preparing[0] == 0.0 and len(preparing) >= 3
    assert preparing == sorted(preparing) and preparing[-1] < 1.0
    events = recorder.events
    units = [i for i, (kind, rid) in enumerate(events) if kind == "unit" and rid == melody.id]
    assert len(units) > 4 * 9  # four 2 s segments (a quarter overlapping), nine parts each
    steps_between(events, units, running.id)


class Gated(Recorder):
    """The recorder, whose preparation of the request with prompt "a" says it
    has begun (``entered``), then waits for ``gate`` (the test opens it once
    another request is queued)."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def prepare_steps(self, request: EngineRequest) -> Generator[Job | None, None, None]:
        if request.prompt == "a":
            self.entered.set()
            assert self.gate.wait(timeout(30))
        yield from super().prepare_steps(request)


@pytest.mark.parametrize("budget_ms", [60_000.0, 0.0])
async def test_a_request_arriving_while_another_prepares_starts_in_its_step(
    budget_ms: float,
) -> None:
    """What arrives while the tick prepares (a crowd comes over a few
    milliseconds) is admitted and prepared before the step, within the budget:
    the first, costly step (descriptions encoded together, prefill) is paid once.
    With no budget left, it waits for the next tick."""
    gated = Gated(tiny_engines()["tiny-musicgen"])
    first, second = await a_second_while_held(gated, budget_ms)
    steps = [ids for kind, ids in gated.events if kind == "step"]
    if budget_ms:
        assert steps[0] == [first, second]
    else:
        assert steps[0] == [first]
        assert steps[1] == [first, second]


async def a_second_while_held(gated: Gated | GatedBegin, budget_ms: float) -> tuple[str, str]:
    """Through a server of ``gated`` (prefill budget ``budget_ms``): a request
    ("a"), held by the engine (``entered``) until a second ("b") is queued,
    then let go (``gate``); both run to completion. Their ids."""

    def factory() -> Mapping[str, Any]:
        return {"tiny-musicgen": gated}

    config = make_config(max_active=4, admission="slots")
    config = replace(config, models=replace(config.models, prefill_budget_ms=budget_ms))
    async with running_server(config, factory) as srv, connect(srv.url) as client:
        first = await client.generate("tiny-musicgen", "a", duration=0.5, seed=1)
        assert await asyncio.to_thread(gated.entered.wait, timeout(30))
        second = await client.generate("tiny-musicgen", "b", duration=0.5, seed=2)
        async for event in second:
            if isinstance(event, Queued):
                break
        gated.gate.set()
        results = await asyncio.wait_for(
            asyncio.gather(first.collect(), second.collect()), timeout(60)
        )
        assert [r.status for r in results] == ["completed"] * 2
    return first.id, second.id


class GatedBegin(Recorder):
    """The recorder, whose ``begin`` of the request with prompt "a" says it has
    been entered, then waits for ``gate`` (the test opens it once another
    request is queued): the description's encoding, taking its time."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.encoded: list[bool] = []  # each call: whether its descriptions came out encoded

    def begin(self, jobs: Sequence[Job]) -> None:
        if any(job.request.prompt == "a" for job in jobs):
            self.entered.set()
            assert self.gate.wait(timeout(30))
        super().begin(jobs)
        self.encoded.append(all(job.state.cfg_conditions is not None for job in jobs))


async def test_a_request_arriving_while_another_is_begun_starts_in_its_step() -> None:
    """A prepared request's description is encoded (``begin``) before its
    first step, and the queue is looked at again after it: a request that came
    meanwhile is prepared and begun in the same tick, and both take their first
    step together (their prefill in one call), the descriptions each encoded
    once, before it."""
    gated = GatedBegin(tiny_engines()["tiny-musicgen"])
    first, second = await a_second_while_held(gated, 60_000.0)
    calls = [(kind, ids) for kind, ids in gated.events if kind != "unit"]
    assert calls[:3] == [("begin", [first]), ("begin", [second]), ("step", [first, second])]
    assert gated.encoded[:2] == [True, True]


class FailingBegin(Recorder):
    """The recorder, whose ``begin`` raises for a crowd holding the request
    with prompt "boom" (a bug in the engine's code for the first step)."""

    def begin(self, jobs: Sequence[Job]) -> None:
        if any(job.request.prompt == "boom" for job in jobs):
            raise RuntimeError("a bug in beginning the first step")
        super().begin(jobs)


async def test_a_begin_that_fails_ends_its_requests_and_spares_the_server() -> None:
    """An engine's ``begin`` that raises ends the requests it was given
    (``internal_error``, as a step that fails), and the server goes on: a
    request asked after them completes."""
    failing = FailingBegin(tiny_engines()["tiny-musicgen"])

    def factory() -> Mapping[str, Any]:
        return {"tiny-musicgen": failing}

    async with running_server(make_config(max_active=4), factory) as srv:
        async with connect(srv.url) as client:
            bad = await (await client.generate("tiny-musicgen", "boom", duration=0.5)).collect()
            assert bad.status == "error" and bad.error is not None
            assert bad.error.code == "internal_error"
            good = await (await client.generate("tiny-musicgen", "fine", duration=0.5)).collect()
            assert good.status == "completed"
        await srv.scheduler.wait_idle(5)
        assert not srv.scheduler._active


async def test_the_description_is_limited_in_tokens() -> None:
    async with running_server() as srv, connect(srv.url) as client:
        stream = await client.generate("tiny-musicgen", "é" * 300, duration=1.0)
        events = [event async for event in stream]
        assert len(events) == 1  # refused before `queued`
        result = await asyncio.wait_for(stream.collect(), timeout(60))
        # A long one is tokenized in the worker pool, still before `queued`.
        long = [e async for e in await client.generate("tiny-musicgen", "é" * 1200)]
        assert len(long) == 1 and isinstance(long[0], Done) and long[0].error is not None
        assert "2401 tokens" in long[0].error.message
        ok = await client.generate("tiny-musicgen", "x" * 500, duration=0.2)
        assert (await asyncio.wait_for(ok.collect(), timeout(60))).status == "completed"
    assert result.status == "error"
    error = stream.done.error if stream.done else None
    assert error is not None and (error.code, error.field) == ("invalid_field", "prompt")
    # 300 characters, but 601 of the byte tokenizer's tokens (with the end of text):
    # what the encoder pays for.
    assert "601 tokens" in error.message and "512" in error.message
