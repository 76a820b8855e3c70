"""Two ``wavecast serve`` replicas behind Debian's nginx with docker/nginx.conf:
both serve, every stream is exact, and a replica drained with SIGTERM mid-run
ends its own streams with ``shutting_down`` while new connections go to the
other one, and so do the requests it had queued, sent again by their clients.
(``scripts/setup-venv --test`` installs nginx.)"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import MODEL, Cluster, connections, eventually, gauge, get, open_cluster
from helpers import first_audio, reach, same_audio, timeout
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from wavecast.clients import Client, GenerationResult, connect
from wavecast.protocol import Audio, Queued, Started, decode


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with open_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def nginx_logs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "access.log", tmp_path / "error.log"


async def generate(client: Client, seed: int, duration: float) -> GenerationResult:
    stream = await client.generate(MODEL, "through the proxy", duration=duration, seed=seed)
    return await stream.collect()


async def test_two_replicas_behind_nginx_serve_exact_streams_and_drain(
    cluster: Cluster, nginx_logs: tuple[Path, Path]
) -> None:
    (_, port_a), (_, port_b) = cluster.replicas
    process_a = cluster.replicas[0][0]
    # What each seed sounds like, from the first replica directly.
    references = {}
    async with connect(f"ws://127.0.0.1:{port_a}/v1/stream") as direct:
        for seed in range(4):
            references[seed] = (await generate(direct, seed, 1.0)).pcm
    # The demo page through the proxy, and a stream opened from that page: the
    # proxy keeps Host with its port, so the page's own origin is accepted; a
    # foreign origin is still refused.
    status, page = await asyncio.to_thread(get, f"http://127.0.0.1:{cluster.port}/")
    assert status == 200 and "<title>" in page
    own = {"Origin": f"http://127.0.0.1:{cluster.port}"}
    async with ws_connect(cluster.url, additional_headers=own) as browser:
        assert decode(await browser.recv()).type == "hello"
    with pytest.raises(InvalidStatus) as foreign:
        await ws_connect(cluster.url, additional_headers={"Origin": "https://evil.example"})
    assert foreign.value.response.status_code == 403

    # 16 clients at once through nginx: least connections spreads them over both.
    clients = await asyncio.gather(*(connect(cluster.url) for _ in range(16)))
    try:
        # (Sessions of the connections closed above may take a moment to end.)
        await eventually(lambda: sorted([connections(port_a), connections(port_b)]) == [8, 8], 10)
        results = await asyncio.gather(
            *(generate(client, i % 4, 1.0) for i, client in enumerate(clients))
        )
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    for i, result in enumerate(results):
        assert result.status == "completed", result.error
        assert same_audio(result.pcm, references[i % 4]), f"client {i}: not the seed's audio"

    # 16 long streams; then the first replica is drained mid-run.
    clients = await asyncio.gather(*(connect(cluster.url) for _ in range(16)))
    streams = [
        await client.generate(MODEL, "long", duration=120.0, seed=i)
        for i, client in enumerate(clients)
    ]
    for stream in streams:
        await first_audio(stream)
    await eventually(lambda: (connections(port_a), connections(port_b)) == (8, 8), 10)
    process_a.send_signal(signal.SIGTERM)
    await eventually(lambda: get(f"http://127.0.0.1:{port_a}/readyz")[0] == 503, 10)
    # New clients while it drains: every one reaches the other replica.
    late = await asyncio.gather(*(connect(cluster.url) for _ in range(8)))
    await eventually(lambda: connections(port_b) == 16, 10)
    late_results = await asyncio.gather(*(generate(c, i % 4, 1.0) for i, c in enumerate(late)))
    for i, result in enumerate(late_results):
        assert result.status == "completed", result.error
        assert same_audio(result.pcm, references[i % 4]), f"late client {i}: not the seed's audio"
    await asyncio.gather(*(client.close() for client in late))
    # The drained replica's streams end with shutting_down after its grace and
    # it exits; the other replica's streams go on until cancelled.
    await asyncio.to_thread(process_a.wait, timeout(30))
    assert process_a.returncode == 0
    finished: list[GenerationResult] = []
    for stream in streams:
        collecting = asyncio.ensure_future(stream.collect())
        await asyncio.wait({collecting}, timeout=0.2)
        if not collecting.done():
            await stream.cancel()
        finished.append(await asyncio.wait_for(collecting, timeout(30)))
    codes = sorted(r.error.code if r.error else r.status for r in finished)
    assert codes == ["cancelled"] * 8 + ["shutting_down"] * 8, codes
    await asyncio.gather(*(client.close() for client in clients))
    # nginx sent late handshakes to the draining replica, which answered 503,
    # and retried them on the other one.
    access, errors = [await asyncio.to_thread(log.read_text) for log in nginx_logs]
    retried = f"/v1/stream 101 127.0.0.1:{port_a}, 127.0.0.1:{port_b} 503, 101"
    assert retried in access.splitlines(), access
    assert "[emerg]" not in errors


async def test_requests_queued_on_a_drained_replica_go_to_the_other(tmp_path: Path) -> None:
    """Two slots a replica; four clients through nginx, two a replica, each with a
    long request (running) and a shorter one (queued). The first replica is sent
    SIGTERM: its queued requests would not finish in its drain, so they end at
    once, before they start, and their clients (``retry_for``) send them again
    through nginx, which takes them to the other replica. Its running ones are
    picked up on the other replica where the drain cut them (the Opus file from
    the bytes and frames its client had); the PCM stream goes on as the same
    clip."""
    async with open_cluster(tmp_path, "--max-active", "2") as cluster:
        (process_a, port_a), (_, port_b) = cluster.replicas
        waits: list[str] = []
        tried: list[tuple[int, str]] = []  # (by client)
        clients: list[Client] = []
        on_a: list[bool] = []  # (each client's replica, as its connection counts)
        for index in range(4):

            def waited(why: str, _: float, index: int = index) -> None:
                waits.append(why)
                tried.append((index, why))

            clients.append(await connect(cluster.url, retry_for=timeout(60), on_retry=waited))
            await eventually(lambda: connections(port_a) + connections(port_b) == len(clients), 10)
            on_a.append(await asyncio.to_thread(connections, port_a) > sum(on_a))
        try:
            assert sorted(on_a) == [False, False, True, True], on_a
            # The first replica's first long request is an Opus file, its second PCM.
            formats = ["opus" if on_a[i] and on_a[:i].count(True) == 0 else "pcm_s16le"
                       for i in range(4)]  # fmt: skip
            long = [
                await c.generate(MODEL, "long", duration=300.0, seed=i, format=formats[i])
                for i, c in enumerate(clients)
            ]
            await reach(Started, *long)
            short = [
                await c.generate(MODEL, "short", duration=30.0, seed=i)
                for i, c in enumerate(clients)
            ]
            await reach(Queued, *short)
            queued = [
                await asyncio.to_thread(gauge, p, "wavecast_requests_queued")
                for p in (port_a, port_b)
            ]
            assert queued == [2, 2], queued
            shorts = [asyncio.ensure_future(stream.collect()) for stream in short]
            picked_events: list[Any] = []
            picked = next(i for i in range(4) if on_a[i] and formats[i] == "pcm_s16le")
            reading = asyncio.ensure_future(read_into(long[picked], picked_events))
            process_a.send_signal(signal.SIGTERM)
            # The second replica queues its own two and the first's two.
            await eventually(lambda: gauge(port_b, "wavecast_requests_queued") >= 4, 20)
            await asyncio.to_thread(process_a.wait, timeout(30))
            # The long ones: the first replica's Opus file picked up on the second,
            # and cancelled here, as the second's are; its PCM stream is picked up
            # on the second.
            ends = {}
            for i, stream in enumerate(long):
                if i == picked:
                    continue
                collecting = asyncio.ensure_future(stream.collect())
                await asyncio.wait({collecting}, timeout=0.2)
                if not collecting.done():
                    await stream.cancel()
                result = await asyncio.wait_for(collecting, timeout(30))
                ends[formats[i], on_a[i]] = result.error.code if result.error else result.status
            assert ends == {("opus", True): "cancelled", ("pcm_s16le", False): "cancelled"}, ends
            file = formats.index("opus")
            assert any(i == file and "(picking the stream up at " in w for i, w in tried), tried
            results = await asyncio.gather(*shorts)
            assert [r.status for r in results] == ["completed"] * 4, [r.error for r in results]
            assert waits.count("the server is shutting down") >= 2, waits
            # The picked-up stream: two seconds past its cut, then cancelled; what it
            # brought is the seed's clip, as the second replica makes it alone.
            cut = [w for i, w in tried if i == picked and "(picking the stream up at " in w]
            assert len(cut) == 1 and cut[0].startswith("the server is shutting down"), waits
            at = int(float(cut[0].split(" up at ")[1].split(" s)")[0]) * 32000)
            while heard(picked_events) < at + 2 * 32000:
                assert not reading.done(), picked_events[-1]
                await asyncio.sleep(0.05)
            await long[picked].cancel()
            await asyncio.wait_for(reading, timeout(30))
            audio = b"".join(e.data for e in picked_events if isinstance(e, Audio))
            async with connect(f"ws://127.0.0.1:{port_b}/v1/stream") as direct:
                alone = await direct.generate(MODEL, "long", duration=300.0, seed=picked)
                pcm = await audio_until(alone, len(audio))
            assert same_audio(audio, pcm)
        finally:
            await asyncio.gather(*(client.close() for client in clients))
    access = (tmp_path / "access.log").read_text()
    retried = f"/v1/stream 101 127.0.0.1:{port_a}, 127.0.0.1:{port_b} 503, 101"
    assert retried in access.splitlines(), access


async def read_into(stream: Any, events: list[Any]) -> None:
    async for event in stream:
        events.append(event)


async def audio_until(stream: Any, size: int) -> bytes:
    """A stream's first ``size`` bytes of audio; the rest cancelled."""
    pcm = bytearray()
    async for event in stream:
        if isinstance(event, Audio):
            if len(pcm) < size <= len(pcm) + len(event.data):
                await stream.cancel()
            pcm += event.data
    return bytes(pcm[:size])


def heard(events: list[Any]) -> int:
    return sum(e.frames for e in events if isinstance(e, Audio))
