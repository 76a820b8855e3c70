"""The clients try again where the server says to (``retry_for``, ``--retry-for``):
a busy queue, a draining server, one at its connection limit, one not up yet."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import soundfile
from helpers import (
    in_its_place,
    make_config,
    reach,
    run_cli,
    running_server,
    same_audio,
    timeout,
    tiny_engines,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Progress, Queued, Started
from wavecast.server.app import ListenError, WavecastServer
from wavecast.server.config import Config
from wavecast.server.engines import load_engines


@asynccontextmanager
async def server_and_client(config: Config) -> AsyncIterator[tuple[Any, Any, list[str]]]:
    """A server of ``config``, and a client of it that tries again for a minute
    where the server says to (``retry_for``); why it waited each time, in order."""
    waits: list[str] = []
    async with (
        running_server(config) as server,
        connect(
            server.url, retry_for=timeout(60), on_retry=lambda why, _: waits.append(why)
        ) as client,
    ):
        yield server, client, waits


def one_at_a_time() -> Any:
    """A server that runs one request and queues none: the next is ``busy``."""
    return make_config(max_active=1, max_queue=0, admission="slots")


@asynccontextmanager
async def running_and_queued(
    url: str, client: Any, **queued: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """On a one-slot server (at ``url``): a long request running, and one of ``client``'s
    (``queued``'s parameters; 1 s by default) queued behind it. The running one
    is a client's of its own that does not try again: it ends with its server
    or connection (picked up, it would hold the slot for five minutes)."""
    async with connect(url) as other:
        running = await other.generate("tiny-musicgen", "running", duration=300, format="opus")
        await reach(Started, running)
        waiting = await client.generate("tiny-musicgen", "queued", **{"duration": 1, **queued})
        await reach(Queued, waiting)
        yield running, waiting


async def test_a_busy_request_is_asked_again_until_it_starts() -> None:
    async with running_server(one_at_a_time()) as server:
        waits: list[tuple[str, float]] = []
        async with (
            connect(server.url) as first,
            connect(
                server.url, retry_for=timeout(60), on_retry=lambda *w: waits.append(w)
            ) as second,
        ):
            long = await first.generate("tiny-musicgen", "first", duration=30)
            async for event in long:
                if isinstance(event, Started):
                    break
            # Without retry_for: busy, once.
            async with connect(server.url) as third:
                once = await (await third.generate("tiny-musicgen", "third", duration=1)).collect()
            assert once.status == "error" and once.error is not None
            assert once.error.code == "busy"
            # With it: asked again (its stream shows none of the refusals) until it runs.
            stream = await second.generate("tiny-musicgen", "second", duration=1, seed=5)
            events = [event async for event in stream]
            assert (await long.collect()).status == "completed"  # (before it: one at a time)
            assert waits and all(why.startswith("the server is busy (") for why, _ in waits)
            assert 0.4 <= waits[0][1] <= 0.6  # (the first wait, at random within 20%)
            assert isinstance(events[-1], Done) and events[-1].status == "completed"
            assert not any(isinstance(e, Done) for e in events[:-1])
            # What was sent again is the request as asked: its audio, asked once more now.
            again = await (
                await second.generate("tiny-musicgen", "second", duration=1, seed=5)
            ).collect()
            heard = b"".join(e.data for e in events if getattr(e, "data", None) is not None)
            assert same_audio(heard, again.pcm)


async def test_a_request_cancelled_while_it_waits_to_be_asked_again_ends_cancelled() -> None:
    async with running_server(one_at_a_time()) as server, connect(server.url) as first:
        long = await first.generate("tiny-musicgen", "first", duration=30)
        async for event in long:
            if isinstance(event, Started):
                break
        waiting = asyncio.Event()
        async with connect(
            server.url, retry_for=timeout(60), on_retry=lambda *_: waiting.set()
        ) as second:
            stream = await second.generate("tiny-musicgen", "second", duration=1)
            collected = asyncio.ensure_future(stream.collect())
            await asyncio.wait_for(waiting.wait(), timeout(10))
            await stream.cancel()
            result = await asyncio.wait_for(collected, timeout(5))
            assert result.status == "cancelled" and result.pcm == b""
            # The connection goes on.
            assert "tiny-musicgen" in second.models
        await long.cancel()


async def test_a_draining_server_is_tried_again() -> None:
    async with running_server() as server:
        server.draining = True  # (its handshakes: 503, Retry-After: 1)
        with pytest.raises(InvalidStatus):
            await connect(server.url)
        waits: list[tuple[str, float]] = []

        def waited(why: str, seconds: float) -> None:
            waits.append((why, seconds))
            server.draining = False  # (a replica back, say)

        async with connect(server.url, retry_for=timeout(30), on_retry=waited) as client:
            assert "tiny-musicgen" in client.models
        assert waits == [("the server is shutting down", 1.0)]


async def test_requests_not_started_when_a_server_restarts_go_to_the_one_that_comes_back() -> None:
    config = make_config(max_active=1, max_queue=4, admission="slots")
    async with (
        server_and_client(config) as (first_server, client, waits),
        running_and_queued(first_server.url, client, seed=5) as (running, queued),
    ):
        first_hello = client.hello
        waited = asyncio.ensure_future(queued.collect())
        port = first_server.port
        # The restart: a drain (one second's grace), nothing listening for a
        # moment, then a server on the same port.
        await asyncio.wait_for(first_server.stop(), timeout(30))
        await asyncio.sleep(1.5)
        second = in_its_place(config, port)
        async with running_server(second) as second_server:
            result = await asyncio.wait_for(waited, timeout(60))
            # The one under way ended with the first server, with what it had made.
            cut = await running.collect()
            assert cut.status == "error" and cut.error is not None
            assert cut.error.code == "shutting_down" and cut.pcm  # (an Opus file)
            # The queued one was asked of the second, once it listened.
            assert result.status == "completed", result.error
            assert waits[0] == "the server is shutting down"
            assert "the connection was refused" in waits
            assert all(
                w.startswith(("the server is shutting down", "the connection was")) for w in waits
            ), waits
            assert client.hello is not first_hello
            # It is the request as asked (the same audio, asked again now), and
            # the next request goes to the new server too.
            again = await (
                await client.generate("tiny-musicgen", "queued", duration=1, seed=5)
            ).collect()
            assert same_audio(result.pcm, again.pcm)
            assert len(second_server.sessions) == 1


async def test_a_request_cancelled_while_no_server_listens_ends_at_once() -> None:
    config = make_config(max_active=1, max_queue=4, admission="slots")
    refused = asyncio.Event()

    def waited(why: str, _: float) -> None:
        if why == "the connection was refused":
            refused.set()

    async with (
        running_server(config) as server,
        connect(server.url, retry_for=timeout(120), on_retry=waited) as client,
        running_and_queued(server.url, client, duration=300) as (_, queued),
    ):
        waiting = asyncio.ensure_future(queued.collect())
        port = server.port
        await asyncio.wait_for(server.stop(), timeout(30))
        await asyncio.wait_for(refused.wait(), timeout(30))  # (trying to connect again)
        await queued.cancel()
        result = await asyncio.wait_for(waiting, timeout(2))
        assert result.status == "cancelled"
        # A server back on the port hears nothing of it.
        again = in_its_place(config, port)
        async with running_server(again) as back:
            await asyncio.sleep(2.0)  # (past the next try's time: 1 s, give or take 20%)
            assert back.sessions == set() and back.scheduler.snapshot()["completed"] == 0


async def test_requests_not_started_on_a_lost_connection_are_sent_on_a_new_one() -> None:
    async def lose_connections() -> None:
        for session in list(server.sessions):
            await session.ws.close(1001)  # (going away)

    async with running_server(make_config(max_active=1, max_queue=4, admission="slots")) as server:
        async with (
            connect(server.url) as client,  # not asked to: both lost
            running_and_queued(server.url, client, seed=3) as (running, queued),
        ):
            await lose_connections()
            for stream in running, queued:
                with pytest.raises(ConnectionClosed):
                    await stream.collect()
        tries: list[str] = []
        async with (
            connect(
                server.url, retry_for=timeout(30), on_retry=lambda why, _: tries.append(why)
            ) as client,
            running_and_queued(server.url, client, seed=3) as (running, queued),
        ):
            await lose_connections()
            with pytest.raises(ConnectionClosed):  # (its client's: not tried again)
                await running.collect()
            result = await queued.collect()
            assert result.status == "completed", result.error
            assert tries == ["the connection was lost"]
            alone = await (
                await client.generate("tiny-musicgen", "queued", duration=1, seed=3)
            ).collect()
            assert same_audio(result.pcm, alone.pcm)


def one_try_seen(events: list[Any], frames: int) -> None:
    """A stream picked up where it was cut shows one try: one ``started``,
    progress that does not go back, audio numbered and joined on (each
    rendition's), ``frames`` sample frames in all, ``done`` last."""
    assert sum(isinstance(e, Started) for e in events) == 1
    assert not any(isinstance(e, Queued) for e in events[events.index(first(events, Started)) :])
    stages = {"prepare": 0, None: 1, "mbd": 2}
    seen = [(stages[e.stage], e.fraction) for e in events if isinstance(e, Progress)]
    assert seen == sorted(seen)
    for rendition in {e.rendition for e in events if isinstance(e, Audio)}:
        audio = [e for e in events if isinstance(e, Audio) and e.rendition == rendition]
        assert [a.seq for a in audio] == list(range(len(audio)))
        starts = [0, *itertools.accumulate(a.frames for a in audio[:-1])]
        assert [a.offset for a in audio] == starts
    assert sum(e.frames for e in events if isinstance(e, Audio)) == frames
    assert isinstance(events[-1], Done) and events[-1].status == "completed"
    assert not any(isinstance(e, Done) for e in events[:-1])


def first(events: list[Any], kind: type) -> Any:
    return next(e for e in events if isinstance(e, kind))


async def until_audio(stream: Any, events: list[Any], seconds: float) -> asyncio.Future[None]:
    """Read ``stream`` into ``events`` (the rest of it in the future returned) until
    it has brought ``seconds`` of audio."""
    arrived = asyncio.Event()

    async def read() -> None:
        heard = 0
        async for event in stream:
            events.append(event)
            heard += event.frames if isinstance(event, Audio) else 0
            if heard >= seconds * 32000:
                arrived.set()

    reading = asyncio.ensure_future(read())
    await asyncio.wait_for(arrived.wait(), timeout(30))
    return reading


async def test_a_stream_cut_by_a_restart_is_picked_up_where_it_was_cut() -> None:
    config = make_config(max_active=1, max_queue=4, admission="slots")
    config = replace(config, timeouts=replace(config.timeouts, shutdown_grace=0.2))
    async with server_and_client(config) as (first_server, client, waits):
        # No seed asked for: the server's, as its started gave it, makes it again.
        stream = await client.generate("tiny-musicgen", "cut", duration=20)
        events: list[Any] = []
        reading = await until_audio(stream, events, 1.0)
        port = first_server.port
        # A restart under way (a drain of 0.2 s: 20 s of audio takes over one).
        await asyncio.wait_for(first_server.stop(), timeout(30))
        await asyncio.sleep(1.5)
        second = in_its_place(config, port)
        async with running_server(second) as second_server:
            await asyncio.wait_for(reading, timeout(60))
            one_try_seen(events, 20 * 32000)
            picked = [w for w in waits if "(picking the stream up at " in w]
            assert picked[0].startswith("the server is shutting down (picking")
            at = float(picked[0].split(" at ")[1].split(" s)")[0])
            assert 1.0 <= at < 20.0, picked
            assert second_server.scheduler.snapshot()["completed"] == 1
            # Picked up from the codes the first server sent with the audio (the
            # client asks for them where it tries again): none of the audio
            # heard was generated again, only decoded again.
            registry = second_server.scheduler.metrics.registry
            taken = registry.get_sample_value(
                "wavecast_resumed_from_codes_seconds_total", {"model": "tiny-musicgen"}
            )
            assert taken is not None and at <= taken < 20.0
            # The clip heard is the clip asked for, whole: asked again at once.
            seed = first(events, Started).seed
            alone = await (
                await client.generate("tiny-musicgen", "cut", duration=20, seed=seed)
            ).collect()
            heard = b"".join(e.data for e in events if isinstance(e, Audio))
            assert same_audio(heard, alone.pcm)


async def test_a_server_started_beside_one_with_reuse_port_takes_its_place_without_a_gap() -> None:
    """``--reuse-port``: a new server listens on the port of one still running
    (both started with it), then the first drains. Its stream under way is
    picked up on the new one where it was cut, and the port is never closed:
    every try is answered (by the first, draining, then by the new one), none
    refused. A server without it is told at once that the port is in use,
    before its models load."""
    config = make_config(max_active=1, max_queue=4, admission="slots")
    config = replace(
        config,
        network=replace(config.network, reuse_port=True),
        timeouts=replace(config.timeouts, shutdown_grace=0.2),
    )
    async with server_and_client(config) as (first_server, client, waits):
        port = first_server.port
        stranger = WavecastServer(in_its_place(make_config(), port), engine_factory=never)
        with pytest.raises(ListenError, match=f"127.0.0.1:{port} is in use"):
            await stranger.start()
        stream = await client.generate("tiny-musicgen", "cut", duration=20)
        events: list[Any] = []
        reading = await until_audio(stream, events, 1.0)

        def own_engines() -> Any:  # (the same weights: the test models' seed)
            return load_engines(["tiny-musicgen"], "cpu")

        async with running_server(in_its_place(config, port), own_engines) as second_server:
            await asyncio.wait_for(first_server.stop(), timeout(30))
            await asyncio.wait_for(reading, timeout(60))
            one_try_seen(events, 20 * 32000)
            assert waits and not any("refused" in why for why in waits), waits
            assert second_server.scheduler.snapshot()["completed"] == 1
            seed = first(events, Started).seed
            async with connect(second_server.url) as again:
                alone = await (
                    await again.generate("tiny-musicgen", "cut", duration=20, seed=seed)
                ).collect()
            heard = b"".join(e.data for e in events if isinstance(e, Audio))
            assert same_audio(heard, alone.pcm)
            assert second_server.scheduler.snapshot()["completed"] == 2


def never() -> Any:
    raise AssertionError("the models load only where the server can listen")


async def test_a_stream_under_way_on_a_lost_connection_is_picked_up_on_a_new_one() -> None:
    """Its time to try again counts from the cut: with ``retry_for`` of one second,
    a stream cut after more than that is picked up."""
    asked = {"duration": 120, "seed": 8, "sample_rate": 16000}  # (resampled as it goes)
    async with (
        running_server(make_config(max_active=2, admission="slots")) as server,
        connect(server.url, retry_for=1.0) as client,
    ):
        stream = await client.generate("tiny-musicgen", "lost", **asked)
        events: list[Any] = []
        reading = await until_audio(stream, events, 0.5)
        await asyncio.sleep(1.2)  # (past retry_for since it was asked)
        for session in list(server.sessions):
            await session.ws.close(1001)  # (going away)
        cut = sum(e.frames for e in events if isinstance(e, Audio))
        assert cut < 120 * 16000
        # Picked up: a second of audio past the cut, then cancelled.
        heard = lambda: sum(e.frames for e in events if isinstance(e, Audio))  # noqa: E731
        while heard() < cut + 16000:
            assert not reading.done(), events[-1]
            await asyncio.sleep(0.05)
        await stream.cancel()
        await asyncio.wait_for(reading, timeout(30))
        assert isinstance(events[-1], Done) and events[-1].status == "cancelled"
        audio = [e for e in events if isinstance(e, Audio)]
        assert [a.seq for a in audio] == list(range(len(audio)))
        assert [a.offset for a in audio] == [0, *itertools.accumulate(a.frames for a in audio[:-1])]
        assert sum(isinstance(e, Started) for e in events) == 1
        assert len(server.sessions) == 1  # (the new connection; the old one closed)
        # The same audio as the request asked alone, as far as it went.
        alone = await client.generate("tiny-musicgen", "lost", **asked)
        pcm = bytearray()
        async for event in alone:
            if isinstance(event, Audio):
                if len(pcm) < 2 * heard() <= len(pcm) + len(event.data):
                    await alone.cancel()
                pcm += event.data
        assert same_audio(b"".join(a.data for a in audio), bytes(pcm[: 2 * heard()]))


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
async def test_the_command_picks_a_stream_cut_by_a_restart_up(tmp_path: Path, suffix: str) -> None:
    """``wavecast generate --retry-for``: a restart 10-90% of the way in; the
    file written is the clip asked for, whole (a FLAC file too: its stream
    picked up from the bytes it had)."""
    config = make_config(max_active=1, admission="slots")
    config = replace(config, timeouts=replace(config.timeouts, shutdown_grace=0.2))
    first_server = WavecastServer(config, tiny_engines)
    await asyncio.wait_for(first_server.start(), timeout(120))
    second = in_its_place(config, first_server.port)
    servers: list[WavecastServer] = []

    async def restart() -> None:
        await first_server.stop()
        await asyncio.sleep(1.0)
        servers.append(WavecastServer(second, tiny_engines))
        await servers[0].start()

    restarting: list[asyncio.Task[None]] = []
    out_file = tmp_path / f"out{suffix}"
    try:
        code, out = await run_cli(
            "generate", "--url", first_server.url, "--duration", "40", "--retry-for", "60",
            "-o", str(out_file), "cut",
            # (its bar's first line between 10% and 90%, "[###...]  12.3%": its
            # lines come at each tenth the progress passes, some skipped in a jump)
            interrupt_after=re.compile(r"\]\s+[1-8]\d\.\d%"),
            then=lambda: restarting.append(asyncio.ensure_future(restart())),
        )  # fmt: skip
        assert restarting, out
        await restarting[0]
        assert code == 0, out
        assert "the server is shutting down (picking the stream up at " in out, out
        seed = int(out.split(", seed ")[1].split(")")[0])
        heard, rate = soundfile.read(str(out_file), dtype="int16")
        assert rate == 32000 and len(heard) == 40 * 32000
        async with connect(servers[0].url) as client:
            alone = await (
                await client.generate("tiny-musicgen", "cut", duration=40, seed=seed)
            ).collect()
        assert same_audio(heard.tobytes(), alone.pcm)
    finally:
        await first_server.stop()
        for server in servers:
            await server.stop()


async def test_a_refused_connection_is_tried_again_at_least_every_second() -> None:
    """Nothing listens (a server restarting): the waits double from half a second
    to one, not to 8 s, so that the server is found within a second of listening."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits: list[tuple[str, float]] = []
    # (Room for four waits at their longest, 0.6 + 3 x 1.2 s, and the tries: with
    # 4 s, waits drawn long left room for three, and CI's run failed so.)
    with pytest.raises(ConnectionRefusedError):
        await connect(f"127.0.0.1:{port}", retry_for=5.0, on_retry=lambda *w: waits.append(w))
    assert {why for why, _ in waits} == {"the connection was refused"}
    assert 0.4 <= waits[0][1] <= 0.6 and all(0.8 <= w <= 1.2 for _, w in waits[1:]), waits
    assert len(waits) >= 4, waits


async def test_the_command_tries_again_for_as_long_as_asked(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = asyncio.get_running_loop().time()
    code, out = await run_cli("models", "--url", f"127.0.0.1:{port}", "--retry-for", "2")
    took = asyncio.get_running_loop().time() - started
    assert code == 2 and "cannot reach" in out, out
    tries = out.count("the connection was refused: trying again in")
    assert tries >= 2, out
    assert took >= 1.0, out


async def test_the_command_waits_for_a_busy_server(tmp_path: Path) -> None:
    async with running_server(one_at_a_time()) as server, connect(server.url) as first:
        long = await first.generate("tiny-musicgen", "first", duration=300)
        async for event in long:
            if isinstance(event, Started):
                break
        out_file = tmp_path / "out.wav"
        cancelling: list[asyncio.Task[None]] = []
        code, out = await run_cli(
            "generate", "--url", server.url, "--duration", "1", "--retry-for", "60",
            "-o", str(out_file), "second",
            interrupt_after="the server is busy (",
            then=lambda: cancelling.append(asyncio.ensure_future(long.cancel())),
        )  # fmt: skip
        assert code == 0, out
        assert "trying again in" in out and f"wrote {out_file}" in out, out
        assert (await long.collect()).status == "cancelled"
        # Not asked to: busy, once, and the flag named.
        long = await first.generate("tiny-musicgen", "first", duration=300)
        async for event in long:
            if isinstance(event, Started):
                break
        code, out = await run_cli("generate", "--url", server.url, "--duration", "1", "x")
        assert code == 1 and "error: busy" in out and "--retry-for SECONDS" in out, out
        await long.cancel()


async def test_the_clients_send_the_headers_given(caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    config = replace(config, network=replace(config.network, forwarded_allow_ips=("127.0.0.1",)))
    caplog.set_level("INFO", logger="wavecast.server.session")
    async with running_server(config) as server:
        code, out = await run_cli(
            "models", "--url", server.url, "--header", "X-Forwarded-For: 10.9.9.9"
        )
        assert code == 0, out
        async with connect(server.url, headers={"X-Forwarded-For": "10.8.8.8"}) as client:
            assert "tiny-musicgen" in client.models
        assert "connected from 10.9.9.9 (via 127.0.0.1:" in caplog.text
        assert "connected from 10.8.8.8 (via 127.0.0.1:" in caplog.text
        code, out = await run_cli("models", "--url", server.url, "--header", "no colon")
        assert code == 2 and "--header 'no colon': not NAME: VALUE" in out, out
