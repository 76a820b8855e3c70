"""Every documented error, through the real server (PROTOCOL.md §6)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers import make_config, running_server, timeout
from test_stream import scrape
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from wavecast.clients import connect
from wavecast.clients.client import decode_file
from wavecast.protocol import (
    Audio,
    Cancel,
    Done,
    ErrorMessage,
    Generate,
    Progress,
    ServerMessage,
    decode,
    encode,
)
from wavecast.server import session
from wavecast.server.outputs import PROGRESS_INTERVAL


async def raw_exchange(url: str, frame: bytes | str) -> Any:
    async with ws_connect(url) as ws:
        await ws.recv()  # hello
        await ws.send(frame)
        return decode(await ws.recv())


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        (b"\xc1\x00", "bad_frame", None),
        ("[1, 2]", "bad_frame", None),
        (msgpack.packb({"type": "dance", "id": "a"}), "unknown_type", "type"),
        (msgpack.packb({"type": "hello", "server": "x"}), "unknown_type", "type"),
        (msgpack.packb({"type": "cancel", "id": 7}), "invalid_field", "id"),
        (msgpack.packb({"type": "cancel", "id": "nobody"}), "unknown_id", "id"),
        # an invalid id is never echoed: an error without id, not a done for it
        (msgpack.packb({"type": "generate", "id": "a\x07b", "model": "m"}), "invalid_field", "id"),
        (msgpack.packb({"type": "generate", "id": "x" * 65, "model": "m"}), "invalid_field", "id"),
    ],
)
async def test_frames_that_open_no_request_get_an_error(
    server: Any, frame: bytes | str, code: str, field: str | None
) -> None:
    message = await raw_exchange(server.url, frame)
    assert isinstance(message, ErrorMessage)
    assert (message.code, message.field) == (code, field)
    if code == "invalid_field":
        assert message.id is None


@pytest.mark.parametrize(
    ("model", "params", "prompt", "code", "field"),
    [
        ("tiny-musicgen", {"top_k": -1}, "", "invalid_field", "params.top_k"),
        ("tiny-musicgen", {"duration": 0}, "", "invalid_field", "params.duration"),
        ("tiny-musicgen", {"duration": "long"}, "", "invalid_field", "params.duration"),
        ("tiny-musicgen", {"temperature": True}, "", "invalid_field", "params.temperature"),
        ("tiny-musicgen", {"volume": 3}, "", "invalid_field", "params.volume"),
        ("tiny-musicgen", {}, "x" * 10001, "invalid_field", "prompt"),
        ("no-such-model", {}, "", "unknown_model", "model"),
    ],
)
async def test_bad_generate_ends_in_done_error(
    server: Any, model: str, params: dict[str, Any], prompt: str, code: str, field: str
) -> None:
    async with connect(server.url) as client:
        result = await (await client.generate(model, prompt, params=params)).collect()
        assert result.status == "error" and result.error is not None
        assert (result.error.code, result.error.field) == (code, field)
        assert result.frames == 0
        # the connection stays open: a good request still works
        ok = await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
        assert ok.status == "completed"


async def test_malformed_generate_with_an_id_gets_its_done(server: Any) -> None:
    frame = msgpack.packb(
        {"type": "generate", "id": "g1", "model": "tiny-musicgen", "format": "aac"}
    )
    message = await raw_exchange(server.url, frame)
    assert isinstance(message, Done) and message.id == "g1" and message.status == "error"
    assert message.error is not None and message.error.field == "format"


@pytest.mark.parametrize("rate", [7999, 192001, 0, -8000, 16000.0, "16000", True])
async def test_an_output_rate_out_of_range_or_not_an_integer_is_refused(
    server: Any, rate: Any
) -> None:
    frame = msgpack.packb(
        {"type": "generate", "id": "r1", "model": "tiny-musicgen", "sample_rate": rate}
    )
    message = await raw_exchange(server.url, frame)
    assert isinstance(message, Done) and message.id == "r1" and message.status == "error"
    assert message.error is not None
    assert (message.error.code, message.error.field) == ("invalid_field", "sample_rate")


async def test_duplicate_id_leaves_the_first_request_alone(server: Any) -> None:
    async with ws_connect(server.url) as ws:
        await ws.recv()
        request = Generate(id="dup", model="tiny-musicgen", params={"duration": 1.0})
        await ws.send(encode(request))
        await ws.send(encode(request))
        errors, done = [], None
        while done is None:
            message = decode(await ws.recv())
            if isinstance(message, ErrorMessage):
                errors.append(message)
            elif isinstance(message, Done):
                done = message
    assert [(e.code, e.id) for e in errors] == [("duplicate_id", "dup")]
    assert done.status == "completed"


async def test_too_many_requests_per_connection() -> None:
    async with (
        running_server(make_config(max_requests_per_connection=2)) as srv,
        connect(srv.url) as client,
    ):
        streams = [await client.generate("tiny-musicgen", "x", duration=5.0) for _ in range(3)]
        third = await streams[2].collect()
        assert third.error is not None and third.error.code == "too_many_requests"
        for stream in streams[:2]:
            await stream.cancel()
            assert (await stream.collect()).status == "cancelled"


async def test_oversized_frame_closes_with_1009() -> None:
    async with running_server(make_config(max_frame_bytes=4096)) as srv:
        async with ws_connect(srv.url) as ws:
            await ws.recv()
            await ws.send(b"\x80" + b"x" * 5000)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
        # the server is still there for everyone else
        async with connect(srv.url) as client:
            assert (
                await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
            ).status == "completed"


async def until_closed(srv: Any, ids: tuple[str, ...], duration: float) -> list[Any]:
    """Requests of ``duration`` seconds on one raw connection, read until the
    server closes it (1008): every message received."""
    async with ws_connect(srv.url) as ws:
        await ws.recv()
        for rid in ids:
            params = {"duration": duration}
            await ws.send(encode(Generate(id=rid, model="tiny-musicgen", params=params)))
        received = []
        with pytest.raises(ConnectionClosed):
            while True:
                received.append(decode(await ws.recv()))
        assert ws.close_code == 1008
    return received


async def test_slow_consumer_gets_its_done_then_is_disconnected_not_buffered() -> None:
    async with running_server(make_config(send_buffer_bytes=4096)) as srv:
        received = await until_closed(srv, ("s", "t"), 5.0)
        # Exactly one done per request, with the reason, before the close (§4.6).
        dones = [m for m in received if isinstance(m, Done)]
        assert sorted(d.id for d in dones) == ["s", "t"]
        for done in dones:
            assert done.status == "error" and done.error is not None
            assert done.error.code == "slow_consumer"
        assert isinstance(received[-1], Done)  # nothing after the last done
        await srv.scheduler.wait_idle(5.0)
        assert srv.scheduler.snapshot()["active"] == 0


async def test_a_request_done_before_its_audio_was_dropped_does_not_say_completed() -> None:
    """Requests so short that their audio and their done come in one step: the
    ask to end them reaches the scheduler after they finished, but audio of
    theirs was dropped all the same, and their done says so."""
    async with running_server(make_config(send_buffer_bytes=1024)) as srv:
        received = await until_closed(srv, ("a", "b", "c"), 0.1)
        dones = [m for m in received if isinstance(m, Done)]
        assert sorted(d.id for d in dones) == ["a", "b", "c"]
        assert {(d.status, d.error.code if d.error else None) for d in dones} == {
            ("error", "slow_consumer")
        }


async def test_a_second_version_longer_than_the_send_buffer_reaches_a_client_that_reads() -> None:
    """Multi-Band Diffusion's version comes whole, here 1.2 times the send
    buffer: it waits beside the queue and goes in as the client reads (half the
    buffer at most), whole; no slow_consumer; a live stream on the same
    connection meanwhile streams on."""
    async with (
        running_server(make_config(send_buffer_bytes=1 << 20)) as srv,
        connect(srv.url) as client,
    ):
        kwargs: dict[str, Any] = dict(duration=10.0, mbd=True, seed=1, format="pcm_f32le")
        polished = await client.generate("tiny-musicgen", "x", **kwargs)
        result = await polished.collect()
        assert result.status == "completed", result.error
        assert len(result.renditions["mbd"]) == len(result.pcm) == 10 * 32000 * 4
        # Again, with a live stream beside it on the connection.
        polished = await client.generate("tiny-musicgen", "x", **kwargs)
        live = await client.generate("tiny-musicgen", "y", duration=6.0, format="pcm_f32le")
        again, beside = await asyncio.gather(polished.collect(), live.collect())
    assert again.status == beside.status == "completed", (again.error, beside.error)
    assert again.renditions["mbd"] == result.renditions["mbd"]
    assert beside.frames == 6 * 32000


async def test_second_versions_waiting_on_one_connection_stay_whole_and_in_order() -> None:
    """Three requests with Multi-Band Diffusion and a plain one on one
    connection, each version longer than half the send buffer: every chunk of
    every version arrives, contiguous (the client checks each offset), each done
    last; a connection closed while versions wait leaves nothing behind in the
    server."""
    async with running_server(make_config(send_buffer_bytes=512 << 10)) as srv:
        async with connect(srv.url) as client:
            kwargs: dict[str, Any] = dict(mbd=True, format="pcm_f32le")
            streams = [
                await client.generate("tiny-musicgen", f"v{i}", duration=2.0 + i, seed=i, **kwargs)
                for i in range(3)
            ]
            streams.append(await client.generate("tiny-musicgen", "plain", duration=4.0))
            results = await asyncio.gather(*(stream.collect() for stream in streams))
        for i, result in enumerate(results[:3]):
            assert result.status == "completed", result.error
            assert len(result.pcm) == len(result.renditions["mbd"]) == (2 + i) * 32000 * 4
        assert results[3].status == "completed" and results[3].frames == 4 * 32000
        # Left while the versions wait: the server cancels what runs and drops the rest.
        async with ws_connect(srv.url) as ws:
            await ws.recv()
            for rid in ("p", "q"):
                generate = Generate(
                    id=rid,
                    model="tiny-musicgen",
                    params={"duration": 4.0, "mbd": True},
                    format="pcm_f32le",
                )
                await ws.send(encode(generate))
            while True:
                message = decode(await ws.recv())
                if getattr(message, "rendition", None) == "mbd":
                    break
        assert await srv.scheduler.wait_idle(timeout(30))
        snapshot = srv.scheduler.snapshot()
        assert snapshot["active"] == 0 and snapshot["failed"] == 0
        for _ in range(int(timeout(10) / 0.01)):  # (the connection's own end)
            if not srv.sessions:
                break
            await asyncio.sleep(0.01)
        assert not srv.sessions
        async with connect(srv.url) as client:  # (and serves on)
            again = await (await client.generate("tiny-musicgen", "x", duration=0.5)).collect()
            assert again.status == "completed"


async def small_window(srv: Any) -> Any:
    """A connection to ``srv`` through a small receive buffer that holds one
    message unread (max_queue=1: up to a second of audio): what the client has
    not read waits in the server's socket buffers and its send queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
    return ws_connect(srv.url, sock=sock, max_size=None, max_queue=1, close_timeout=0.5)


async def slow_reader(
    srv: Any, bytes_per_second: float | None, seconds: float, seed: int, stop: float = 120.0
) -> tuple[Done | None, bytes]:
    """A request of float PCM at 192 kHz (768 kB a second of audio: the tiny
    model makes it some ten times faster), read at ``bytes_per_second`` (None:
    at once; 0: not at all) through a small receive buffer; its done (None: not
    within ``stop`` seconds) and its audio."""
    audio = bytearray()
    params = {"duration": seconds, "seed": seed}
    generate = Generate(
        id="a", model="tiny-musicgen", params=params, format="pcm_f32le", sample_rate=192000
    )
    async with await small_window(srv) as ws:
        await ws.recv()
        await ws.send(encode(generate))
        if bytes_per_second == 0:
            await asyncio.sleep(stop)
            return None, b""
        deadline = asyncio.get_running_loop().time() + stop
        while asyncio.get_running_loop().time() < deadline:
            message = decode(await ws.recv())
            if isinstance(message, Done):
                return message, bytes(audio)
            if message.type == "audio":
                audio += message.data  # type: ignore[attr-defined]
                if bytes_per_second:
                    await asyncio.sleep(len(message.data) / bytes_per_second)  # type: ignore[attr-defined]
    return None, bytes(audio)


async def failed_once(srv: Any) -> None:
    """Wait for the server's one request to fail (within 40 s), then for it to be idle."""
    for _ in range(int(timeout(40) / 0.05)):
        await asyncio.sleep(0.05)
        if srv.scheduler.snapshot()["failed"]:
            break
    assert await srv.scheduler.wait_idle(timeout(10))
    snapshot = srv.scheduler.snapshot()
    assert snapshot["failed"] == 1 and snapshot["completed"] == 0


async def test_the_kernel_holds_little_of_a_stream_unsent(server: Any) -> None:
    """TCP_NOTSENT_LOWAT on each connection: what the link has not carried waits in
    the send queue, where it is counted, not megabytes of it in the kernel, ahead
    of a keepalive's answer (bench/RESULTS.md, a slow link)."""
    async with connect(server.url) as client:
        assert "tiny-musicgen" in client.models
        (one,) = server.sessions
        sock = one.ws.transport.get_extra_info("socket")
        unsent = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert unsent == session.UNSENT_BYTES == 32 << 10


async def test_a_cancel_leaves_out_the_audio_still_waiting_to_be_sent() -> None:
    """A client that reads nothing for a while has megabytes of its float PCM
    stream waiting in the server's send queue (a slow link). Its cancel leaves
    them out: what it reads next is what the kernel and its own library already
    held, then its done, and what it got is the stream's beginning, in whole
    chunks. (Before, it read every byte queued, and its next request's audio
    waited behind them.) An Opus file cancelled beside it comes whole: its last
    page ends the stream. The id is free again, and its next stream whole."""
    async with (
        running_server(make_config(send_buffer_bytes=16 << 20)) as srv,
        await small_window(srv) as ws,
    ):
        await ws.recv()
        model = "tiny-musicgen"
        opus = Generate(id="o", model=model, params={"duration": 20.0}, format="opus")
        await ws.send(encode(opus))
        params = {"duration": 60.0, "seed": 3}
        pcm = Generate(id="a", model=model, params=params, format="pcm_f32le", sample_rate=96000)
        await ws.send(encode(pcm))
        (connection,) = srv.sessions
        for _ in range(int(timeout(30) / 0.05)):
            if connection.buffered_bytes >= 6 << 20:
                break
            await asyncio.sleep(0.05)
        queued = connection.buffered_bytes
        assert queued >= 6 << 20, queued
        await ws.send(encode(Cancel(id="a")))
        await ws.send(encode(Cancel(id="o")))
        got: dict[str, bytearray] = {"a": bytearray(), "o": bytearray()}
        ends: dict[str, Done] = {}
        while len(ends) < 2:
            message = decode(await asyncio.wait_for(ws.recv(), timeout(30)))
            if isinstance(message, Audio):
                unit = 4 if message.id == "a" else 1
                assert message.offset * unit == len(got[message.id])  # (whole chunks)
                got[message.id] += message.data
            elif isinstance(message, Done):
                ends[message.id] = message
        assert ends["a"].status == ends["o"].status == "cancelled"
        assert 0 < len(got["a"]) < 2 << 20, (len(got["a"]), queued)
        last_page = got["o"].rindex(b"OggS")
        assert got["o"][last_page + 5] & 0x04  # (end of stream)
        assert not connection._cut
        # The id again: its stream whole.
        await ws.send(encode(replace(pcm, params={"duration": 0.5, "seed": 3})))
        again = bytearray()
        while not isinstance(message := decode(await ws.recv()), Done):
            if isinstance(message, Audio):
                again += message.data
        assert message.status == "completed" and len(again) == 48000 * 4


@dataclass
class TwoStreams:
    """A client's two streams on one connection, ``a`` then ``b`` asked beside
    it, read at a pace (a slow link): what each brought, in order and whole
    (each chunk where the one before ended, ``units`` bytes an offset), its
    ``seq``s, the largest message, and the long stream's bytes read when the
    short one's first audio came."""

    units: dict[str, int]
    got: dict[str, bytearray] = field(default_factory=lambda: {"a": bytearray(), "b": bytearray()})
    seqs: dict[str, list[int]] = field(default_factory=lambda: {"a": [], "b": []})
    largest: int = 0
    before_b: int | None = None
    ends: dict[str, Done] = field(default_factory=dict)

    async def read(self, ws: Any, bytes_per_second: float) -> None:
        """Until ``b``'s done."""
        while "b" not in self.ends:
            message = decode(await ws.recv())
            if isinstance(message, Audio):
                got = self.got[message.id]
                assert message.offset * self.units[message.id] == len(got)  # (in order, whole)
                if message.id == "b" and self.before_b is None:
                    self.before_b = len(self.got["a"])
                self.seqs[message.id].append(message.seq)
                self.largest = max(self.largest, len(message.data))
                got += message.data
                await asyncio.sleep(len(message.data) / bytes_per_second)
            elif isinstance(message, Done):
                self.ends[message.id] = message

    async def start(
        self, ws: Any, srv: Any, sample_rate: int, bytes_per_second: float, waiting: int
    ) -> asyncio.Future[None]:
        """After the greeting, ``a`` (60 s of float PCM at ``sample_rate``) asked
        and read, until more than ``waiting`` bytes wait in the server's send
        queue; the reading."""
        await ws.recv()
        params = {"duration": 60.0, "seed": 3}
        model = "tiny-musicgen"
        long = Generate(
            id="a", model=model, params=params, format="pcm_f32le", sample_rate=sample_rate
        )
        await ws.send(encode(long))
        reading = asyncio.ensure_future(self.read(ws, bytes_per_second))
        (connection,) = srv.sessions
        for _ in range(int(timeout(30) / 0.05)):
            if connection.buffered_bytes > waiting or reading.done():
                break
            await asyncio.sleep(0.05)
        assert connection.buffered_bytes > waiting, connection.buffered_bytes
        return reading


async def test_a_stream_begun_beside_one_with_seconds_waiting_is_sent_first() -> None:
    """A client reading at 600 kB/s (a slow link; its float PCM stream is
    384 kB/s, made some ten times faster) has megabytes of a long stream waiting
    in the server's send queue: seconds ahead of its playback. A clip asked
    beside it on the same connection is due at once: its audio goes out first,
    not behind those megabytes (before, it came after them, its request sitting
    out the steps until they were read), made while the long one, far ahead,
    sits out. Both streams whole, in order."""
    async with (
        running_server(make_config(send_buffer_bytes=8 << 20)) as srv,
        await small_window(srv) as ws,
    ):
        two = TwoStreams({"a": 4, "b": 4})
        reading = await two.start(ws, srv, 96000, 600e3, 4 << 20)  # (half the bound)
        short = Generate(
            id="b", model="tiny-musicgen", params={"duration": 1.0, "seed": 4}, format="pcm_f32le",
            sample_rate=96000,
        )  # fmt: skip
        await ws.send(encode(short))
        asked = len(two.got["a"])
        await asyncio.wait_for(reading, timeout(60))
        assert two.ends["b"].status == "completed" and len(two.got["b"]) == 96000 * 4
        assert two.before_b is not None and two.before_b - asked < 2 << 20, (two.before_b, asked)
        assert "a" not in two.ends  # (still going: it was seconds ahead)
        await ws.send(encode(Cancel(id="a")))
        while not isinstance(message := decode(await ws.recv()), Done):
            pass
        assert message.id == "a" and message.status == "cancelled"


async def test_a_chunk_goes_in_pieces_and_a_stream_asked_beside_it_waits_for_one_piece() -> None:
    """At 192 kHz a second of float PCM is 768 kB, a chunk of it up to that: it
    goes in ``audio`` messages of at most 32 KiB (numbered on without gaps, each
    where the one before ended), as does a FLAC stream's, so that over a slow
    link (a client reading at 2x real time, the model making it some 10x) a clip
    asked beside the stream waits behind what the link holds and a piece, not
    the rest of a chunk the server began to write. Both streams whole: each
    piece where the one before ended, the FLAC file decoding to its frames."""
    async with (
        running_server(make_config(send_buffer_bytes=8 << 20)) as srv,
        await small_window(srv) as ws,
    ):
        short = Generate(
            id="b", model="tiny-musicgen", params={"duration": 3.0, "seed": 4}, format="flac",
            sample_rate=192000,
        )  # fmt: skip
        two = TwoStreams({"a": 4, "b": 1})
        reading = await two.start(ws, srv, 192000, 1.5e6, 2 << 20)  # (seconds ahead)
        asked = len(two.got["a"])  # (when the short one was asked)
        await ws.send(encode(short))
        await asyncio.wait_for(reading, timeout(60))
        await ws.send(encode(Cancel(id="a")))
        while not isinstance(message := decode(await ws.recv()), Done):
            if isinstance(message, Audio):
                two.seqs["a"].append(message.seq)
                two.largest = max(two.largest, len(message.data))
        assert message.id == "a" and message.status == "cancelled"
    assert two.ends["b"].status == "completed"
    assert two.largest <= session.PIECE_BYTES == 32 << 10
    assert all(seqs == list(range(len(seqs))) for seqs in two.seqs.values()), two.seqs
    assert decode_file(bytes(two.got["b"]), "flac").shape == (3 * 192000, 1)
    # Behind the short clip's first audio: what the link held and the pieces
    # being written, the time its first chunk took to make (before: up to the
    # rest of a 768 kB chunk, and 64 KiB more the transport held).
    assert two.before_b is not None and two.before_b - asked < 384 << 10, (two.before_b, asked)


async def test_the_live_progress_goes_ahead_of_the_audio_waiting() -> None:
    """Over a slow link (a client reading its 48 kHz float PCM stream at 2x
    real time, the model making it some 10x), the progress says what is
    generated as it is made: it comes seconds ahead of the audio still waiting
    to be sent (before, it came in its place among the audio, never more than
    a chunk ahead of what the client had). Its fractions never go back; the
    stream comes whole, in order, its 1.0 after the last chunk, the done last.
    (Its preparation's progress comes before, in order.)"""
    async with running_server(make_config()) as srv, await small_window(srv) as ws:
        await ws.recv()
        params = {"duration": 12.0, "seed": 5}
        await ws.send(
            encode(
                Generate(
                    id="a", model="tiny-musicgen", params=params, format="pcm_f32le",
                    sample_rate=48000,
                )
            )
        )  # fmt: skip
        audio = bytearray()
        fractions: list[float] = []
        ahead = 0.0  # the most the progress was ahead of the audio had (seconds)
        while not isinstance(
            message := decode(await asyncio.wait_for(ws.recv(), timeout(30))), Done
        ):
            if isinstance(message, Audio):
                assert message.offset * 4 == len(audio) and fractions[-1:] != [1.0]
                audio += message.data
                await asyncio.sleep(len(message.data) / 384e3)
            elif isinstance(message, Progress) and message.stage is None:
                fractions.append(message.fraction)
                ahead = max(ahead, message.seconds - len(audio) / (4 * 48000))
        assert message.status == "completed" and len(audio) == 12 * 48000 * 4
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert ahead > 3.0, ahead


async def test_a_cancel_of_a_stream_made_to_its_end_leaves_out_its_audio_waiting() -> None:
    """Over a slow link the model finishes a stream long before its client has
    read it. A cancel then still leaves out the audio waiting (before, it was
    answered ``unknown_id`` and every byte still came), and the done, which
    said ``completed``, says ``cancelled``: the client did not get it all. A
    stream asked at once after the cancel comes after that done (before, its
    audio, due at once, went ahead of the cancelled stream's audio due later,
    which was left out only as its turn came, and of its done)."""
    async with (
        running_server(make_config(send_buffer_bytes=16 << 20)) as srv,
        await small_window(srv) as ws,
    ):
        await ws.recv()
        params = {"duration": 20.0, "seed": 3}
        pcm = Generate(
            id="a", model="tiny-musicgen", params=params, format="pcm_f32le", sample_rate=96000
        )
        await ws.send(encode(pcm))
        (connection,) = srv.sessions
        for _ in range(int(timeout(60) / 0.05)):
            if not connection.requests and connection.buffered_bytes > 6 << 20:
                break  # (made to its end: its done waits)
            await asyncio.sleep(0.05)
        queued = connection.buffered_bytes
        assert not connection.requests and queued > 6 << 20, queued
        await ws.send(encode(Cancel(id="a")))
        await ws.send(encode(replace(pcm, id="b", params={"duration": 1.0, "seed": 4})))
        for _ in range(int(timeout(30) / 0.05)):
            await asyncio.sleep(0.05)
            if not connection.requests:
                break  # (the next clip made, its audio waiting too)
        assert not connection.requests
        got = bytearray()
        while not isinstance(message := decode(await asyncio.wait_for(ws.recv(), 30)), Done):
            assert not isinstance(message, ErrorMessage), message
            assert not isinstance(message, Audio) or message.id == "a", message.id
            if isinstance(message, Audio):
                assert message.offset * 4 == len(got)  # (whole chunks)
                got += message.data
        assert message.id == "a"
        assert message.status == "cancelled" and message.stats is not None
        assert message.stats.audio_seconds == 20.0  # (what was made)
        assert 0 < len(got) < 2 << 20, (len(got), queued)
        assert not connection._cut
        next_clip = bytearray()
        while not isinstance(message := decode(await asyncio.wait_for(ws.recv(), 30)), Done):
            if isinstance(message, Audio):
                next_clip += message.data
        assert message.id == "b" and message.status == "completed"
        assert len(next_clip) == 96000 * 4


async def test_a_cancel_as_the_stream_ends_says_cancelled_when_its_audio_was_left_out(
    monkeypatch: Any,
) -> None:
    """The model made the stream to its end, and its done is on its way to the
    connection, when the client's cancel comes: the cancel leaves out the audio
    waiting, so the done says ``cancelled``, not ``completed`` over a stream cut
    short (random clients found it: a completed stream short of the samples its
    stats count). The done is held on its way here, as a busy loop holds it."""
    async with (
        running_server(make_config(send_buffer_bytes=16 << 20)) as srv,
        await small_window(srv) as ws,
    ):
        await ws.recv()
        (connection,) = srv.sessions
        held: list[ServerMessage] = []
        deliver = connection._on_event

        def on_event(message: ServerMessage) -> None:
            if isinstance(message, Done):
                held.append(message)
            else:
                deliver(message)

        monkeypatch.setattr(connection, "_on_event", on_event)
        params = {"duration": 5.0, "seed": 3}
        pcm = Generate(
            id="a", model="tiny-musicgen", params=params, format="pcm_f32le", sample_rate=96000
        )
        await ws.send(encode(pcm))
        for _ in range(int(timeout(60) / 0.05)):
            if held:
                break
            await asyncio.sleep(0.05)
        assert held and held[0].status == "completed"
        queued = connection.buffered_bytes
        assert queued > 1 << 20, queued
        await ws.send(encode(Cancel(id="a")))
        for _ in range(int(timeout(30) / 0.05)):
            if "a" in connection._cut:
                break
            await asyncio.sleep(0.05)
        assert connection._cut["a"] > 0  # (its audio waiting left out)
        deliver(held[0])
        got = bytearray()
        while not isinstance(message := decode(await asyncio.wait_for(ws.recv(), 30)), Done):
            if isinstance(message, Audio):
                assert message.offset * 4 == len(got)  # (whole chunks)
                got += message.data
        assert message.status == "cancelled" and message.stats is not None
        assert 0 < len(got) < message.stats.samples * 4, (len(got), message.stats)
        assert not connection._cut and not connection._cancelled


async def test_a_client_slower_than_the_audio_is_made_gets_it_at_its_pace() -> None:
    """A client reading at 2x real time, the model making audio at some 10x:
    once half the send buffer waits for it (the kernel's socket buffers full
    first, up to 4 MB here), its request sits out steps while it reads, and
    completes: every sample, as a client reading at once gets them (the same
    seed). Before, its buffer overflowed (``slow_consumer``). (The clip, 12 MB,
    is long enough for the hold where the model makes it at only 4x.)"""
    async with running_server(make_config(send_buffer_bytes=1 << 20)) as srv:
        fast, expected = await slow_reader(srv, None, 16.0, seed=3)
        counts, _ = await scrape(srv.port)
        assert counts.get('wavecast_held_steps_total{model="tiny-musicgen"}', 0) == 0
        paced, audio = await slow_reader(srv, 1_500_000, 16.0, seed=3)
        counts, _ = await scrape(srv.port)
        assert counts['wavecast_held_steps_total{model="tiny-musicgen"}'] > 0  # (it was held)
    assert fast is not None and fast.status == "completed"
    assert paced is not None and paced.status == "completed", paced.error
    assert len(audio) == len(expected) == 16 * 192000 * 4
    heard = np.frombuffer(audio, dtype="<f4")
    made = np.frombuffer(expected, dtype="<f4")
    assert np.abs(heard - made).max() < 1e-4  # (float rounding where the chunks split)


async def test_a_client_slower_than_real_time_is_a_slow_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client reading at a tenth of real time holds its request back until
    the request falls ``PACE_GRACE`` (here 0) behind real time: then it is a slow
    consumer (it would keep the request's slot for ten times its length), and
    the server serves on. (Slower still, the keepalive's ping, behind what the
    client has not read, goes unanswered first: the connection closes.)"""
    monkeypatch.setattr(session, "PACE_GRACE", 0.0)
    async with running_server(make_config(send_buffer_bytes=1 << 20)) as srv:
        task = asyncio.create_task(slow_reader(srv, 77_000, 60.0, seed=1, stop=timeout(40)))
        await failed_once(srv)  # (long before its 60 s are made)
        counts, _ = await scrape(srv.port)
        assert (
            counts[
                'wavecast_requests_total{code="slow_consumer",model="tiny-musicgen",status="error"}'
            ]
            == 1
        )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
        async with connect(srv.url) as client:
            again = await (await client.generate("tiny-musicgen", "x", duration=0.5)).collect()
            assert again.status == "completed"


async def test_a_client_that_reads_nothing_is_a_slow_consumer_without_a_keepalive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the keepalive's pings off, a client that reads nothing at all
    (its request held back once the socket's buffers and half the send buffer
    are full) still ends as a slow consumer once the request falls behind real
    time: its slot is not kept."""
    monkeypatch.setattr(session, "PACE_GRACE", 0.0)
    config = make_config(send_buffer_bytes=1 << 20)
    config = replace(config, timeouts=replace(config.timeouts, ping_interval=None))
    async with running_server(config) as srv:
        task = asyncio.create_task(slow_reader(srv, 0, 60.0, seed=1, stop=timeout(40)))
        await failed_once(srv)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task


async def test_progress_is_bounded(server: Any) -> None:
    """At most about 100 progress messages a stage, and about 20 a second (a
    stream many times faster than real time would send one every few steps)."""
    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "x", duration=10.0)
        progress = [e async for e in stream if isinstance(e, Progress)]
    assert stream.done is not None and stream.done.stats is not None
    wall = stream.done.stats.wall_seconds
    live = [p.fraction for p in progress if p.stage is None]
    assert [p.stage for p in progress[:1]] == ["prepare"]
    assert live == sorted(live) and live[-1] == 1.0
    assert 3 <= len(live) <= min(101, wall / PROGRESS_INTERVAL + 2)


async def test_a_request_that_fails_in_a_batched_step_fails_alone(
    server: Any, engine: Any, monkeypatch: Any
) -> None:
    """One request's part of a shared step raises: it ends with internal_error, the
    other request in the same steps completes, and the server serves the next one."""
    advance = engine._advance

    def faulty(job: Any, sampled: Any) -> Any:
        if job.request.prompt == "doomed" and job.steps == 5:
            raise RuntimeError("a bug in one request's bookkeeping")
        return advance(job, sampled)

    monkeypatch.setattr(engine, "_advance", faulty)
    async with connect(server.url) as client:
        doomed = await client.generate("tiny-musicgen", "doomed", duration=1.0, seed=1)
        fine = await client.generate("tiny-musicgen", "fine", duration=1.0, seed=2)
        failed, completed = await doomed.collect(), await fine.collect()
        assert failed.status == "error" and failed.error is not None
        assert failed.error.code == "internal_error"
        assert completed.status == "completed" and completed.frames == 32000
        again = await (await client.generate("tiny-musicgen", "doomed", duration=0.2)).collect()
        assert again.status == "error"
    await server.scheduler.wait_idle(timeout(5))
    samples, _ = await scrape(server.port)
    failed_key = (
        'wavecast_requests_total{code="internal_error",model="tiny-musicgen",status="error"}'
    )
    assert samples[failed_key] == 2
    async with connect(server.url) as client:
        assert (
            await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
        ).status == "completed"
