"""The real server on 127.0.0.1 port 0, driven by the real client."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers import (
    first_audio,
    higgs_engines,
    make_config,
    reach,
    running_server,
    same_audio,
    steps_after_disconnect,
    timeout,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Progress, Queued, Started, decode, encode
from wavecast.protocol.messages import Cancel, Generate, Hello
from wavecast.server.audio import resample
from wavecast.server.config import TimeoutsConfig

HOP = 640  # tiny-musicgen: 32 kHz at 50 frames per second


def samples_for(duration: float) -> int:
    return int(duration * 50) * HOP


async def http_get(url: str) -> tuple[int, str, bytes]:
    def get() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout(10)) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()

    return await asyncio.to_thread(get)


async def test_greeting_lists_the_test_model(server: Any) -> None:
    async with connect(server.url) as client:
        model = client.models["tiny-musicgen"]
        assert model.test_model is True
        assert "test model" in model.description
        assert (model.sample_rate, model.channels) == (32000, 1)
        names = [p.name for p in model.params]
        assert names == [
            "duration",
            "top_k",
            "top_p",
            "temperature",
            "cfg_coef",
            "seed",
            "include_prompt",
            "mbd",
            "extend_stride",
        ]
        assert client.hello.limits.max_queue == 32


async def test_http_routes(server: Any) -> None:
    base = f"http://127.0.0.1:{server.port}"
    status, kind, body = await http_get(base + "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, kind, body = await http_get(base + "/v1/info")
    info = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert info["models"][0]["name"] == "tiny-musicgen"
    assert info["scheduler"]["active"] == 0
    assert info["formats"][-3:] == ["mp3", "opus", "flac"] and info["encoder_threads"] >= 1
    status, kind, body = await http_get(base + "/")
    assert status == 200 and kind.startswith("text/html") and b"wavecast" in body
    status, _, _ = await http_get(base + "/nope")
    assert status == 404
    status, _, _ = await http_get(base + "/v1/stream")
    assert status == 426


async def test_a_websocket_handshake_elsewhere_is_told_the_stream_path(server: Any) -> None:
    # The demo page's address is where a user may point a WebSocket client:
    # its answer names the stream path, where the page's own 200 would not.
    for path in ("/", "/index.html", "/v1/streams"):
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(f"ws://127.0.0.1:{server.port}{path}")
        response = refused.value.response
        assert response.status_code == 404, path
        assert response.body == b"WebSocket streams are at /v1/stream\n"
    # A browser's plain request for the page is served as before.
    status, kind, _ = await http_get(f"http://127.0.0.1:{server.port}/")
    assert status == 200 and kind.startswith("text/html")


async def test_the_client_takes_the_servers_address_for_its_stream(server: Any) -> None:
    for address in (
        f"http://127.0.0.1:{server.port}/",
        f"ws://127.0.0.1:{server.port}",
        f"127.0.0.1:{server.port}",
    ):
        async with connect(address) as client:
            assert client.hello.models[0].name == "tiny-musicgen"
            result = await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
            assert result.status == "completed", address


async def test_completed_stream_is_exact_and_contiguous(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "lofi", duration=2.0, seed=1)
        events = [event async for event in stream]
    kinds = [type(e).__name__ for e in events]
    assert kinds[:3] == ["Queued", "Progress", "Started"] and kinds[-1] == "Done"
    preparing = events[1]
    assert isinstance(preparing, Progress) and preparing.stage == "prepare"
    audio = [e for e in events if isinstance(e, Audio)]
    assert [a.seq for a in audio] == list(range(len(audio)))
    offsets = np.cumsum([0] + [a.frames for a in audio[:-1]])
    assert [a.offset for a in audio] == offsets.tolist()
    total = sum(a.frames for a in audio)
    assert total == samples_for(2.0)
    progress = [e.fraction for e in events if isinstance(e, Progress) and e.stage is None]
    assert progress == sorted(progress) and progress[-1] == 1.0
    done = events[-1]
    assert isinstance(done, Done) and done.status == "completed" and done.stats is not None
    assert done.stats.samples == total
    assert done.stats.audio_seconds == pytest.approx(2.0)
    assert done.stats.first_audio_seconds is not None
    assert 0 < done.stats.first_audio_seconds < done.stats.wall_seconds
    started = events[2]
    assert isinstance(started, Started) and started.seed == 1
    assert started.seconds == 2.0 and started.max_seconds is None


async def test_seed_reproduces_and_formats_agree(server: Any) -> None:
    async with connect(server.url) as client:
        runs = [
            await (
                await client.generate("tiny-musicgen", "x", duration=1.0, seed=42, format=fmt)
            ).collect()
            for fmt in ("pcm_f32le", "pcm_f32le", "pcm_s16le")
        ]
    a, b, c = (r.to_numpy() for r in runs)
    # The same music; where the chunks split (it follows the stream's lead over real
    # time) moves float rounding only.
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6
    expected = np.rint(np.clip(a, -1, 1) * 32767).astype(np.int16)
    assert c.shape == expected.shape
    assert np.abs(c.astype(np.int32) - expected).max() <= 1


async def test_a_stream_at_another_rate_is_the_clip_resampled(server: Any) -> None:
    """44.1 kHz from a 32 kHz model: every message says the rate asked for, the
    chunks join without a gap, and they make the model's own clip (the same
    seed) resampled at once, to float rounding."""
    async with connect(server.url) as client:
        own = await (
            await client.generate("tiny-musicgen", "x", duration=1.0, seed=3, format="pcm_f32le")
        ).collect()
        stream = await client.generate(
            "tiny-musicgen", "x", duration=1.0, seed=3, format="pcm_f32le", sample_rate=44100
        )
        events = [event async for event in stream]
    started = next(e for e in events if isinstance(e, Started))
    chunks = [e for e in events if isinstance(e, Audio)]
    done = events[-1]
    assert isinstance(done, Done) and done.status == "completed" and done.stats is not None
    assert started.sample_rate == 44100 and {c.sample_rate for c in chunks} == {44100}
    assert [c.offset for c in chunks] == [
        sum(c.frames for c in chunks[:i]) for i in range(len(chunks))
    ]
    heard = np.frombuffer(b"".join(c.data for c in chunks), "<f4")
    expected = resample(own.to_numpy().reshape(-1, 1), 32000, 44100)[:, 0]
    assert heard.shape == expected.shape == (44100,)
    assert np.abs(heard - expected).max() <= 1e-5
    assert done.stats.samples == 44100 and done.stats.audio_seconds == pytest.approx(1.0)


async def test_cancel_mid_generation(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "x", duration=30.0)
        seen_audio = 0
        async for event in stream:
            if isinstance(event, Audio):
                seen_audio += 1
                if seen_audio == 2:
                    await stream.cancel()
        assert stream.done is not None and stream.done.status == "cancelled"
        assert stream.done.stats is not None and stream.done.stats.audio_seconds < 30.0
    assert server.scheduler.snapshot()["active"] == 0


async def test_disconnect_stops_the_inference_thread(server: Any) -> None:
    steps = await steps_after_disconnect(
        server, lambda client: client.generate("tiny-musicgen", "x", duration=30.0)
    )
    # well under the 1503 steps the request would have taken
    assert steps < 1000


async def test_two_requests_on_one_connection(server: Any) -> None:
    async with connect(server.url) as client:
        first = await client.generate("tiny-musicgen", "a", duration=1.0, seed=1)
        second = await client.generate("tiny-musicgen", "b", duration=1.5, seed=2)
        a, b = await asyncio.gather(first.collect(), second.collect())
    assert (a.status, b.status) == ("completed", "completed")
    assert (a.frames, b.frames) == (samples_for(1.0), samples_for(1.5))


async def test_queue_positions_and_busy() -> None:
    async with (
        running_server(make_config(max_active=1, max_queue=2)) as srv,
        connect(srv.url) as client,
    ):
        running = await client.generate("tiny-musicgen", "a", duration=30.0)
        assert isinstance(await anext(aiter(running)), Queued)
        preparing = await anext(aiter(running))
        assert isinstance(preparing, Progress) and preparing.stage == "prepare"
        assert isinstance(await anext(aiter(running)), Started)
        second = await client.generate("tiny-musicgen", "b", duration=0.5)
        third = await client.generate("tiny-musicgen", "c", duration=0.5)
        busy = await client.generate("tiny-musicgen", "d", duration=0.5)
        result = await busy.collect()
        assert result.status == "error" and result.error is not None
        assert result.error.code == "busy"
        q2 = await anext(aiter(second))
        q3 = await anext(aiter(third))
        assert isinstance(q2, Queued) and q2.position == 1
        assert isinstance(q3, Queued) and q3.position == 2
        await running.cancel()
        # The freed slot goes to the next in line at once, and positions move up.
        assert isinstance(await anext(aiter(second)), Progress)  # preparing
        assert isinstance(await anext(aiter(second)), Started)
        moved = await anext(aiter(third))
        assert isinstance(moved, Queued) and moved.position == 1
        results = await asyncio.gather(running.collect(), second.collect(), third.collect())
        assert [r.status for r in results] == ["cancelled", "completed", "completed"]


async def test_cancel_while_queued() -> None:
    async with running_server(make_config(max_active=1)) as srv, connect(srv.url) as client:
        running = await client.generate("tiny-musicgen", "a", duration=5.0)
        waiting = await client.generate("tiny-musicgen", "b", duration=5.0)
        assert isinstance(await anext(aiter(waiting)), Queued)
        await waiting.cancel()
        result = await waiting.collect()
        assert result.status == "cancelled" and result.frames == 0
        await running.cancel()
        await running.collect()


async def test_other_clients_are_unaffected_by_a_bad_one() -> None:
    async with (
        running_server(make_config(max_frame_bytes=1 << 20)) as server,
        connect(server.url) as good,
    ):
        stream = await good.generate("tiny-musicgen", "ok", duration=2.0, seed=3)
        async with ws_connect(server.url) as bad:
            await bad.recv()
            for frame in (b"\xc1", b"garbage", "not json", msgpack.packb({"type": "x"})):
                await bad.send(frame)
            await bad.send(b"x" * (2 << 20))
            with pytest.raises(ConnectionClosed):
                while True:  # the four errors, then the close
                    await bad.recv()
            assert bad.close_code == 1009
        result = await stream.collect()
    assert result.status == "completed" and result.frames == samples_for(2.0)


async def test_json_text_frames(server: Any) -> None:
    async with ws_connect(server.url + "?encoding=json") as ws:
        hello = decode(await ws.recv())
        assert isinstance(hello, Hello)
        request = Generate(
            id="j1", model="tiny-musicgen", prompt="x", params={"duration": 0.5, "seed": 1}
        )
        await ws.send(encode(request, text=True))
        frames = []
        while True:
            frame = await ws.recv()
            assert isinstance(frame, str)  # answers come in the client's encoding
            message = decode(frame)
            frames.append(message)
            if isinstance(message, Done):
                break
    audio = b"".join(m.data for m in frames if isinstance(m, Audio))
    assert len(audio) == samples_for(0.5) * 2


async def test_json_and_msgpack_give_the_same_audio(server: Any) -> None:
    async with connect(server.url, text=True) as text_client:
        a = await (await text_client.generate("tiny-musicgen", "y", duration=0.5, seed=8)).collect()
    async with connect(server.url) as bin_client:
        b = await (await bin_client.generate("tiny-musicgen", "y", duration=0.5, seed=8)).collect()
    assert same_audio(a.pcm, b.pcm)


async def test_shutdown_ends_requests_and_closes_1001() -> None:
    async with running_server(make_config()) as srv:
        client = await connect(srv.url)
        stream = await client.generate("tiny-musicgen", "x", duration=30.0)
        await first_audio(stream)
        stop = asyncio.create_task(srv.stop())
        result = await stream.collect()
        await stop
        assert result.status == "error" and result.error is not None
        assert result.error.code == "shutting_down"
        await client.ws.wait_closed()
        assert client.ws.close_code == 1001
        await client.close()


async def test_raw_cancel_frame_of_unknown_id(server: Any) -> None:
    async with ws_connect(server.url) as ws:
        await ws.recv()
        await ws.send(encode(Cancel(id="ghost")))
        message = decode(await ws.recv())
    assert message.type == "error" and message.code == "unknown_id"  # type: ignore[union-attr]


async def test_drain_turns_readyz_off_refuses_new_requests_and_lets_running_ones_finish() -> None:
    config = replace(make_config(), timeouts=TimeoutsConfig(shutdown_grace=60.0))
    async with running_server(config) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        assert (await http_get(base + "/readyz"))[:3:2] == (200, b"ready\n")
        client = await connect(srv.url)
        stream = await client.generate("tiny-musicgen", "x", duration=2.0, seed=1)
        await first_audio(stream)
        stop = asyncio.create_task(srv.stop())
        await asyncio.sleep(0.05)
        # A load balancer stops sending: not ready, though alive and listening.
        assert (await http_get(base + "/readyz"))[0] == 503
        assert (await http_get(base + "/healthz"))[0] == 200
        # A new request on an open connection is refused; a new connection is
        # refused at the handshake with 503, so a load balancer tries another replica.
        refused = await (await client.generate("tiny-musicgen", "y", duration=1.0)).collect()
        assert refused.status == "error" and refused.error is not None
        assert refused.error.code == "shutting_down"
        with pytest.raises(InvalidStatus) as late:
            await connect(srv.url)
        assert late.value.response.status_code == 503
        assert late.value.response.headers["Retry-After"] == "1"
        # The running request finishes within the drain time, then the connection closes.
        result = await stream.collect()
        assert result.status == "completed"
        await asyncio.wait_for(stop, timeout(60))
        await client.ws.wait_closed()
        assert client.ws.close_code == 1001
        await client.close()


async def test_a_drain_that_runs_out_ends_queued_and_running_requests_with_shutting_down() -> None:
    config = replace(make_config(max_active=1), timeouts=TimeoutsConfig(shutdown_grace=0.5))
    async with running_server(config) as srv:
        client = await connect(srv.url)
        running = await client.generate("tiny-musicgen", "long", duration=60.0)
        # (Started before the drain: else it may still be queued when the drain
        # begins, and end "not started" with the other.)
        await reach(Started, running)
        queued = await client.generate("tiny-musicgen", "waits", duration=60.0)
        async for event in queued:
            assert isinstance(event, Queued)
            break
        await asyncio.wait_for(srv.stop(), timeout(30))
        results = [await running.collect(), await queued.collect()]
        for result in results:
            assert result.status == "error" and result.error is not None
            assert result.error.code == "shutting_down"  # the queued one too, not "cancelled"
        assert results[0].frames > 0 and results[1].frames == 0
        await client.close()


async def test_a_drain_starts_a_queued_request_only_where_it_would_finish_in_time() -> None:
    config = replace(make_config(max_active=1), timeouts=TimeoutsConfig(shutdown_grace=10.0))
    async with running_server(config) as srv:
        client = await connect(srv.url)
        running = await client.generate("tiny-musicgen", "running", duration=4.0, seed=1)
        await first_audio(running)  # (its ticks measured)
        short = await client.generate("tiny-musicgen", "short", duration=1.0, seed=2)
        long = await client.generate("tiny-musicgen", "long", duration=300.0)
        await reach(Queued, short, long)
        stop = asyncio.create_task(srv.stop())
        # The long one would not end in half the drain's ten seconds (behind the
        # others, 300 s of audio): it ends now, not started (not at the drain's end).
        cut = await asyncio.wait_for(long.collect(), timeout(10))
        assert cut.status == "error" and cut.error is not None
        assert cut.error.code == "shutting_down" and "had not started" in str(cut.error)
        # The short one runs after the running one, and both complete.
        for stream in running, short:
            result = await stream.collect()
            assert result.status == "completed", result.error
        await asyncio.wait_for(stop, timeout(60))
        await client.close()


async def test_a_drain_weighs_speech_by_its_longest_and_starts_what_fits() -> None:
    """Speech is as long as its text makes it, at most ``max_new_tokens`` frames a
    chunk: two slots busy (one for a long time), a queued utterance that fits in
    the drain starts there, in the slot the shorter running one frees, and one
    that could run past it ends at once."""
    config = make_config(max_active=2, admission="slots")
    config = replace(config, timeouts=TimeoutsConfig(shutdown_grace=10.0))
    async with running_server(config, lambda: higgs_engines(None)) as srv:
        client = await connect(srv.url)
        story = "One more word. " * 60  # (sixty chunks of a sentence)
        running = [
            await client.speak("tiny-higgs", story, chunk_method="word", chunk_max_word_num=3),
            await client.speak("tiny-higgs", "A short one.", max_new_tokens=200),
        ]
        for stream in running:
            await first_audio(stream)
        short = await client.speak("tiny-higgs", "Fits.", max_new_tokens=16)
        long = await client.speak("tiny-higgs", story, chunk_method="word", chunk_max_word_num=3)
        await reach(Queued, short, long)
        stop = asyncio.create_task(srv.stop())
        cut = await asyncio.wait_for(long.collect(), timeout(5))
        assert cut.error is not None and "had not started" in str(cut.error)
        fits = await short.collect()
        assert fits.status == "completed", fits.error
        assert (await running[1].collect()).status == "completed"
        await running[0].cancel()
        assert (await running[0].collect()).status == "cancelled"
        await asyncio.wait_for(stop, timeout(30))
        await client.close()


async def test_connections_per_client_address_are_limited() -> None:
    async with running_server(make_config(max_connections_per_ip=2)) as srv:
        first, second = await connect(srv.url), await connect(srv.url)
        async with ws_connect(srv.url) as third:
            with pytest.raises(ConnectionClosed):
                await third.recv()
        assert third.close_code == 1013
        assert third.close_reason == "too many connections from this address"
        # A connection that closes makes room for the next one.
        await first.close()
        await asyncio.sleep(0.1)
        async with connect(srv.url) as fourth:
            result = await (await fourth.generate("tiny-musicgen", "x", duration=0.2)).collect()
            assert result.status == "completed"
        await second.close()


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        ("10.0.0.5", "203.0.113.7", (), "10.0.0.5"),  # no trusted proxies: header ignored
        ("10.0.0.5", "203.0.113.7", ("10.0.0.0/8",), "203.0.113.7"),
        ("192.0.2.1", "203.0.113.7", ("10.0.0.0/8",), "192.0.2.1"),  # peer not trusted
        ("10.0.0.5", None, ("10.0.0.0/8",), "10.0.0.5"),
        # A client that writes its own header cannot hide behind it: the nearest
        # untrusted hop, read from the right, is the client.
        ("10.0.0.5", "1.2.3.4, 203.0.113.7", ("10.0.0.0/8",), "203.0.113.7"),
        ("10.0.0.5", "203.0.113.7, 10.0.0.9", ("10.0.0.0/8",), "203.0.113.7"),
        ("10.0.0.5", "10.0.0.8, 10.0.0.9", ("10.0.0.0/8",), "10.0.0.8"),
        # "*": every hop is a trusted proxy; the first one named the client.
        ("10.0.0.5", "1.2.3.4, 203.0.113.7", ("*",), "1.2.3.4"),
        ("10.0.0.5", "203.0.113.7, garbage", ("10.0.0.0/8",), "garbage"),
        ("::1", "2001:db8::1", ("::1",), "2001:db8::1"),
        ("10.0.0.5", " , ", ("10.0.0.0/8",), "10.0.0.5"),
    ],
)
def test_client_address_behind_trusted_proxies(
    peer: str, forwarded: str | None, trusted: tuple[str, ...], client: str
) -> None:
    from wavecast.server.http import client_address, trusted_proxies

    assert client_address(peer, forwarded, trusted_proxies(trusted)) == client


def test_a_malformed_trusted_proxy_is_refused_at_start() -> None:
    from wavecast.server.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--forwarded-allow-ips", "10.0.0.0/33"])
    with pytest.raises(SystemExit, match="--forwarded-allow-ips"):
        config_from_args(args)
    args = parser.parse_args(["--forwarded-allow-ips", "10.0.0.0/8", "--forwarded-allow-ips", "*"])
    assert config_from_args(args).network.forwarded_allow_ips == ("10.0.0.0/8", "*")


def test_cuda_graphs_are_on_where_the_device_is_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cuda-graphs``: unset, the device decides (on for CUDA; a CPU steps
    eagerly, with no graphs' buffers); ``--no-cuda-graphs`` or
    ``WAVECAST_CUDA_GRAPHS=0`` turn them off, ``1`` on, anything else is refused."""
    from wavecast.server.cli import add_serve_arguments, config_from_args
    from wavecast.server.engines import load_engines

    def graphs(argv: list[str]) -> bool | None:
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return config_from_args(parser.parse_args(argv)).models.cuda_graphs

    assert graphs([]) is None
    assert graphs(["--no-cuda-graphs"]) is False
    assert graphs(["--cuda-graphs"]) is True
    monkeypatch.setenv("WAVECAST_CUDA_GRAPHS", "0")
    assert graphs([]) is False
    assert graphs(["--cuda-graphs"]) is True
    monkeypatch.setenv("WAVECAST_CUDA_GRAPHS", "1")
    assert graphs([]) is True
    monkeypatch.setenv("WAVECAST_CUDA_GRAPHS", "yes")
    with pytest.raises(SystemExit, match="WAVECAST_CUDA_GRAPHS must be 1 or 0"):
        graphs([])
    (engine,) = load_engines(["tiny-musicgen"], "cpu").values()
    assert engine.graphs is None
    (engine,) = load_engines(["tiny-musicgen"], "cpu", cuda_graphs=True).values()
    assert engine.graphs is not None and not engine.graphs.record


async def test_connections_per_client_behind_a_trusted_load_balancer() -> None:
    limits = {"max_connections_per_ip": 1}
    # Trusted (the load balancer is 127.0.0.1): X-Forwarded-For names the client.
    config = make_config(**limits)
    config = replace(config, network=replace(config.network, forwarded_allow_ips=("127.0.0.1",)))
    async with running_server(config) as srv:

        def via(client: str) -> Any:
            return ws_connect(srv.url, additional_headers={"X-Forwarded-For": client})

        async with via("203.0.113.7") as one, via("203.0.113.8") as other:
            assert decode(await one.recv()).type == "hello"
            assert decode(await other.recv()).type == "hello"
            async with via("203.0.113.7") as again:
                with pytest.raises(ConnectionClosed):
                    await again.recv()
            assert again.close_code == 1013
    # Not trusted (the default): the header is ignored; the peer is the client.
    async with (
        running_server(make_config(**limits)) as srv,
        ws_connect(srv.url, additional_headers={"X-Forwarded-For": "1.1.1.1"}) as one,
    ):
        assert decode(await one.recv()).type == "hello"
        headers = {"X-Forwarded-For": "2.2.2.2"}
        async with ws_connect(srv.url, additional_headers=headers) as spoofed:
            with pytest.raises(ConnectionClosed):
                await spoofed.recv()
        assert spoofed.close_code == 1013


async def test_security_headers_on_every_response(server: Any) -> None:
    def headers(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=timeout(10)) as response:
            return response.headers

    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/app.js", "/v1/info", "/healthz"):
        got = await asyncio.to_thread(headers, base + path)
        assert "default-src 'self'" in got["Content-Security-Policy"], path
        assert "frame-ancestors 'none'" in got["Content-Security-Policy"]
        assert got["X-Frame-Options"] == "DENY"
        assert got["X-Content-Type-Options"] == "nosniff"
        assert got["Referrer-Policy"] == "no-referrer"


async def test_only_allowed_origins_open_streams() -> None:
    config = make_config()
    config = replace(
        config, network=replace(config.network, allowed_origins=("https://app.example",))
    )
    async with running_server(config) as srv:
        own = f"http://127.0.0.1:{srv.port}"
        # Not a browser (no Origin), the page's own origin, a listed origin: welcome.
        for origin in (None, own, "https://app.example"):
            async with ws_connect(srv.url, origin=origin) as ws:  # type: ignore[arg-type]
                assert decode(await ws.recv()).type == "hello"
        # Another site's page: refused before the handshake completes.
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(srv.url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        assert srv.scheduler.snapshot()["completed"] == 0


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "h:1", (), True),
        ("http://h:1", "h:1", (), True),
        ("https://H:1", "h:1", (), True),
        ("http://h:2", "h:1", (), False),
        ("https://app.example", "h:1", ("https://app.example/",), True),
        ("https://evil.example", "h:1", ("https://app.example",), False),
        ("https://evil.example", "h:1", ("*",), True),
        ("null", "h:1", (), False),
        ("http://h:1", None, (), False),
    ],
)
def test_origin_rule(origin: str | None, host: str | None, allowed: Any, ok: bool) -> None:
    from wavecast.server.http import origin_allowed

    assert origin_allowed(origin, host, allowed) is ok


async def scrape(port: int) -> tuple[dict[str, float], dict[str, str]]:
    """GET /metrics; its samples by name and labels, and each family's type."""
    status, kind, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and kind == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind_of = line.split(" ")
            kinds[name] = kind_of
            continue
        if line.startswith("# HELP "):
            continue
        name, labels, value = re.fullmatch(r"([a-z_]\w*)(\{[^}]*\})? (\S+)", line).groups()  # type: ignore[union-attr]
        samples[name + (labels or "")] = float(value)
    return samples, kinds


async def test_metrics_in_prometheus_text_format(server: Any) -> None:
    model = 'model="tiny-musicgen"'
    async with connect(server.url) as client:
        done = await (await client.generate("tiny-musicgen", "a", duration=1.0)).collect()
        stream = await client.generate("tiny-musicgen", "b", duration=30.0)
        first = (await first_audio(stream)).frames  # collect() below counts the rest
        # Scraped during a generation.
        during, _ = await scrape(server.port)
        assert during[f"wavecast_model_requests_active{{{model}}}"] == 1
        assert during["wavecast_requests_active"] == 1 and during["wavecast_connections"] == 1
        assert during["wavecast_send_buffer_bytes"] >= 0
        await stream.cancel()
        cancelled = await stream.collect()
        refused = await (await client.generate("tiny-musicgen", "c", duration=-1)).collect()
    assert (done.status, cancelled.status, refused.status) == ("completed", "cancelled", "error")
    await server.scheduler.wait_idle(timeout(5))
    samples, kinds = await scrape(server.port)
    assert samples['wavecast_refused_total{code="invalid_field",frame="generate"}'] == 1
    assert samples[f'wavecast_requests_total{{code="",{model},status="completed"}}'] == 1
    assert samples[f'wavecast_requests_total{{code="",{model},status="cancelled"}}'] == 1
    streamed = (done.frames + first + cancelled.frames) / 32000
    assert samples[f"wavecast_audio_seconds_total{{{model}}}"] == pytest.approx(streamed, abs=1e-3)
    assert kinds["wavecast_first_audio_seconds"] == "histogram"
    buckets = [
        value
        for key, value in samples.items()
        if key.startswith("wavecast_first_audio_seconds_bucket{") and key.endswith(f",{model}}}")
    ]
    assert len(buckets) == 12  # 11 bounds and +Inf
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[-1] == samples[f"wavecast_first_audio_seconds_count{{{model}}}"] == 2
    assert samples[f"wavecast_real_time_factor_count{{{model}}}"] == 1  # completed only
    assert samples["wavecast_up"] == 1 and samples["wavecast_ready"] == 1
    assert samples["wavecast_requests_active"] == 0
    assert samples["wavecast_steps_total"] > 0 and kinds["wavecast_steps_total"] == "counter"
    # The interpreter's and the process's own; every garbage collection timed.
    assert samples['python_gc_collections_total{generation="2"}'] >= 0
    assert samples["process_resident_memory_bytes"] > 0
    before = samples.get('wavecast_gc_pause_seconds_count{generation="2"}', 0)
    gc.collect()
    samples, kinds = await scrape(server.port)
    assert kinds["wavecast_gc_pause_seconds"] == "histogram"
    assert samples['wavecast_gc_pause_seconds_count{generation="2"}'] >= before + 1


async def test_metrics_count_the_graphs_of_a_graphed_step() -> None:
    """With ``--cuda-graphs`` (on a CPU: the same buffers, eagerly), /metrics says
    how many step shapes are ready by model (rows for 1 and 2 requests at
    ``--max-active 2``, six spans up to the 30 s window) and how many times they
    were dropped; without it, neither series."""
    from wavecast.server.engines import load_engines

    def graphed() -> Mapping[str, Any]:
        return load_engines(["tiny-musicgen"], "cpu", cuda_graphs=True, max_active=2)

    model = 'model="tiny-musicgen"'
    async with running_server(make_config(max_active=2), graphed) as srv:
        async with connect(srv.url) as client:
            done = await (await client.generate("tiny-musicgen", "a", duration=1.0)).collect()
        assert done.status == "completed"
        samples, kinds = await scrape(srv.port)
    assert samples[f"wavecast_step_graphs{{{model}}}"] == 12
    assert samples[f"wavecast_step_graph_drops_total{{{model}}}"] == 0
    assert kinds["wavecast_step_graph_drops_total"] == "counter"
    async with running_server() as plain:
        samples, _ = await scrape(plain.port)
    assert not [name for name in samples if name.startswith("wavecast_step_graph")]


async def test_api_keys_guard_streams_and_the_api_but_not_health() -> None:
    config = make_config()
    config = replace(config, network=replace(config.network, api_keys=("k-one", "k-two")))
    async with running_server(config) as srv:
        base = f"http://127.0.0.1:{srv.port}"

        def get(path: str, key: str | None = None) -> tuple[int, str | None]:
            request = urllib.request.Request(base + path)
            if key is not None:
                request.add_header("Authorization", f"Bearer {key}")
            try:
                with urllib.request.urlopen(request, timeout=timeout(10)) as response:
                    return response.status, None
            except urllib.error.HTTPError as error:
                with error:
                    return error.code, error.headers["WWW-Authenticate"]

        for path in ("/healthz", "/readyz", "/", "/app.js"):
            assert (await asyncio.to_thread(get, path))[0] == 200, path
        for path in ("/v1/info", "/v1/voices", "/v1/scenes", "/metrics"):
            assert await asyncio.to_thread(get, path) == (401, 'Bearer realm="wavecast"'), path
            assert (await asyncio.to_thread(get, path, "wrong"))[0] == 401, path
            assert (await asyncio.to_thread(get, path, "k-two"))[0] == 200, path
        assert (await asyncio.to_thread(get, "/v1/info?token=k-one"))[0] == 200
        # The stream: refused at the handshake without a key, before any model work.
        for url in (srv.url, srv.url + "?token=nope"):
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(url):
                    pass
            assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            await connect(srv.url, api_key="nope")
        async with connect(srv.url, api_key="k-one") as client:
            result = await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
            assert result.status == "completed"
        async with ws_connect(srv.url + "?token=k-two") as ws:
            assert decode(await ws.recv()).type == "hello"
        assert srv.scheduler.snapshot()["completed"] == 1


def test_keys_are_compared_whole() -> None:
    from wavecast.server.http import key_accepted

    keys = ("alpha", "beta")
    assert key_accepted("alpha", keys) and key_accepted("beta", keys)
    for wrong in (None, "", "alph", "alphaa", "ALPHA", "beta "):
        assert not key_accepted(wrong, keys), wrong
    assert not key_accepted("alpha", ())


async def test_unknown_encodings_are_refused_at_the_handshake(server: Any) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(server.url + "?encoding=xml"):
            pass
    assert refused.value.response.status_code == 400
    async with ws_connect(server.url + "?encoding=msgpack") as ws:
        assert isinstance(decode(await ws.recv()), Hello)
    async with ws_connect(server.url + "?encoding=json") as ws:
        assert json.loads(await ws.recv())["type"] == "hello"


@pytest.mark.parametrize(("duration", "frames"), [(1.234, 61), (0.58, 28), (3.3, 165)])
async def test_duration_is_cut_to_whole_frames_and_said(
    server: Any, duration: float, frames: int
) -> None:
    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "x", duration=duration)
        result = await stream.collect()
    assert stream.started is not None and stream.started.seconds == frames / 50
    assert result.frames == frames * 640
    assert result.stats is not None and result.stats.audio_seconds == frames / 50
