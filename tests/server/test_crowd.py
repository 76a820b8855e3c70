"""Streams in a crowd are the streams alone, through the server.

A server with both test models runs a few probe requests alone, then the same
probes inside a crowd of requests of both models arriving over a tenth of a
second, some cancelled mid-stream, one whose connection drops: each
probe's audio equals its run alone, every request ends as it should, and
nothing fails. The engines' equivalence tests compare rows with their solo runs
step by step; this covers what the scheduler adds around them (admission,
preparation within the budget, prefill, the codec's shared cadence, the two
models stepped in one tick), with the steps plain and pipelined
(``--pipelined-steps``: outputs a step late, cancels and a dropped connection
with codes in flight).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import higgs_engines, make_config, running_server, same_audio, timeout

from wavecast.clients import connect
from wavecast.protocol import Audio

MUSIC = ("tiny-musicgen", "generate")
SPEECH = ("tiny-higgs", "speak")

# (model, prompt or text, params): two of each model, sampled and greedy.
PROBES: list[tuple[tuple[str, str], str, dict[str, Any]]] = [
    (MUSIC, "warm lofi keys", {"duration": 1.5, "seed": 11}),
    (MUSIC, "fast drums", {"duration": 2.0, "seed": 12, "temperature": 0.7, "top_p": 0.9}),
    (SPEECH, "The sun rises in the east.", {"max_new_tokens": 40, "seed": 13}),
    (SPEECH, "A second voice, a little later.", {"max_new_tokens": 50, "seed": 14, "top_k": 1}),
]
TEXTS = ["Hello there.", "Good morning to you all.", "One, two, three.", "A short line."]


_PIPELINED: dict[str, Any] = {}


def engines(voices: Path, pipelined: bool) -> Mapping[str, Any]:
    """Both test models; with ``pipelined``, their steps pipelined
    (``--pipelined-steps``: engines of their own, built once)."""
    if not pipelined:
        return higgs_engines(voices)
    if not _PIPELINED:
        from wavecast.server.engines import load_engines

        names = ["tiny-musicgen", "tiny-higgs"]
        _PIPELINED.update(load_engines(names, "cpu", pipelined_steps=True))
    return _PIPELINED


@pytest.fixture(params=[False, True], ids=["plain", "pipelined"])
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    voices = tmp_path / "voices"
    voices.mkdir()
    # Slots: on a slow machine the measured speed would queue part of the crowd,
    # and this is about streams decoded together.
    config = make_config(max_active=12, max_requests_per_connection=16, admission="slots")
    config = replace(config, models=replace(config.models, voices_dir=voices))
    async with running_server(config, lambda: engines(voices, request.param)) as srv:
        assert all(e.pipelined is request.param for e in srv.scheduler._engines.values())
        yield srv


async def start(client: Any, kind: tuple[str, str], prompt: str, params: dict[str, Any]) -> Any:
    model, method = kind
    return await getattr(client, method)(model, prompt, **params)


def neighbour(rng: random.Random) -> tuple[tuple[str, str], str, dict[str, Any]]:
    if rng.random() < 0.5:
        duration = round(rng.uniform(0.5, 2.5), 2)
        params = {"duration": duration, "seed": rng.randrange(1000), "temperature": 0.9}
        return MUSIC, rng.choice(["rain", "bells", "a slow waltz"]), params
    tokens = rng.randrange(20, 60)
    return SPEECH, rng.choice(TEXTS), {"max_new_tokens": tokens, "seed": rng.randrange(1000)}


@pytest.mark.parametrize("seed", [1, 2])
async def test_probes_in_a_crowd_equal_their_runs_alone(server: Any, seed: int) -> None:
    rng = random.Random(seed)
    async with connect(server.url) as client:
        alone = [await (await start(client, *probe)).collect() for probe in PROBES]
        assert all(r.status == "completed" and r.pcm for r in alone)

        async def probe(index: int, delay: float) -> Any:
            await asyncio.sleep(delay)
            return await (await start(client, *PROBES[index])).collect()

        async def other(delay: float, cancel_after: int | None) -> str:
            await asyncio.sleep(delay)
            stream = await start(client, *neighbour(rng))
            if cancel_after is None:
                return str((await stream.collect()).status)
            chunks = 0
            async for event in stream:
                if isinstance(event, Audio):
                    chunks += 1
                    if chunks == cancel_after:
                        await stream.cancel()
                        break
            return str((await stream.collect()).status)

        async def dropped(delay: float) -> None:
            await asyncio.sleep(delay)
            async with connect(server.url) as own:
                stream = await start(own, *neighbour(rng))
                async for event in stream:
                    if isinstance(event, Audio):
                        break  # the connection closes with the request running

        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, server.scheduler.snapshot()["active"])
                await asyncio.sleep(0.005)

        watching = asyncio.ensure_future(watch())
        probes = [probe(i, rng.uniform(0.0, 0.1)) for i in range(len(PROBES))]
        cancels = [rng.choice([None, None, 1, 2]) for _ in range(8)]
        others = [other(rng.uniform(0.0, 0.1), after) for after in cancels]
        results = await asyncio.wait_for(
            asyncio.gather(*probes, *others, dropped(rng.uniform(0.0, 0.1))), timeout(120)
        )
        watching.cancel()
    assert most >= 6  # decoded together, not one after another
    together, statuses = results[: len(PROBES)], results[len(PROBES) : -1]
    for (kind, prompt, _), solo, crowd in zip(PROBES, alone, together, strict=True):
        assert crowd.status == "completed", prompt
        assert same_audio(crowd.pcm, solo.pcm), (kind, prompt)
    for status, after in zip(statuses, cancels, strict=True):
        # (A short request may complete before its cancel arrives.)
        assert status == "completed" if after is None else status in ("cancelled", "completed")
    assert await server.scheduler.wait_idle(timeout(30))
    assert server.scheduler.snapshot()["failed"] == 0
