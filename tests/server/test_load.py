"""Many clients at once, round after round (loopback, tiny model, bounded in time).

200 clients connect together, each asks for a short clip, and each gets its whole
stream (contiguous, every sample) and exactly one ``done``; three rounds, with
the server's memory flat between the second and the third (the first warms the
allocator and the batch buckets up).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from helpers import make_config, running_server, timeout

from wavecast.clients import connect
from wavecast.protocol import Audio, Done

CLIENTS = 200
ROUNDS = 3
SECONDS = 0.4  # 20 codec frames


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def one_client(url: str, seed: int) -> tuple[int, int, list[int]]:
    async with connect(url, open_timeout=timeout(60)) as client:
        stream = await client.generate("tiny-musicgen", "load", duration=SECONDS, seed=seed)
        frames, dones, offsets = 0, 0, []
        async for event in stream:
            if isinstance(event, Audio):
                offsets.append(event.offset)
                assert event.offset == frames  # contiguous
                frames += event.frames
            elif isinstance(event, Done):
                dones += 1
                assert event.status == "completed", event.error
        return frames, dones, offsets


async def test_two_hundred_clients_three_rounds_memory_flat() -> None:
    config = make_config(
        max_active=32,
        max_queue=CLIENTS,
        admission="slots",
        max_connections=CLIENTS + 8,
        max_connections_per_ip=CLIENTS + 8,
    )
    async with running_server(config) as server:
        memory: list[int] = []
        for round_ in range(ROUNDS):
            results: list[Any] = await asyncio.wait_for(
                asyncio.gather(*(one_client(server.url, i) for i in range(CLIENTS))),
                timeout(240),
            )
            for frames, dones, _ in results:
                assert frames == int(SECONDS * 50) * 640
                assert dones == 1
            assert await server.scheduler.wait_idle(timeout(10))
            snapshot = server.scheduler.snapshot()
            assert (snapshot["queued"], snapshot["active"]) == (0, 0)
            assert snapshot["completed"] == CLIENTS * (round_ + 1)
            await asyncio.sleep(0.2)  # the connections' last bytes
            assert len(server.sessions) == 0
            memory.append(rss_bytes())
        growth = memory[2] - memory[1]
        assert growth < 32 << 20, f"memory grew {growth >> 20} MiB between rounds 2 and 3"
