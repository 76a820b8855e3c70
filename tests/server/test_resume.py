"""``generate.resume`` (PROTOCOL.md §3.1): a request sent again after its stream
was cut (a restart, a lost connection) with the seed its ``started`` gave is
made again, and sent from the frame its client had to."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
import pytest
import pytest_asyncio
from helpers import make_config, running_server, same_audio
from test_encode import MP3_DELAY
from test_stream import scrape
from websockets.asyncio.client import connect as ws_connect

from wavecast.clients import connect
from wavecast.clients.client import decode_file
from wavecast.protocol import Audio, Done
from wavecast.server.audio import warm_resample_start
from wavecast.server.encode import CHUNK_BYTES
from wavecast.server.outputs import RequestOutputs
from wavecast.server.session import PIECE_BYTES

# One server for the module (started in a third of a second, but a dozen times).
pytestmark = pytest.mark.asyncio(loop_scope="module")

HOP = 640  # tiny-musicgen: 32 kHz at 50 frames a second


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[Any]:
    async with running_server(make_config(max_active=4, admission="slots")) as srv:
        yield srv


async def events_of(client: Any, **request: Any) -> list[Any]:
    stream = await client.generate("tiny-musicgen", "a resumed clip", **request)
    return [event async for event in stream]


def live_audio(events: list[Any]) -> list[Audio]:
    return [e for e in events if isinstance(e, Audio) and e.rendition is None]


async def test_a_resumed_stream_is_the_rest_of_the_whole_one(server: Any) -> None:
    async with connect(server.url) as client:
        whole = await (
            await client.generate("tiny-musicgen", "a resumed clip", duration=2.0, seed=11)
        ).collect()
        frames = len(whole.pcm) // 2
        assert frames == 100 * HOP
        # A chunk's middle, the first and last frames, none: each time the stream
        # made again from its start, and sent from the frame asked for.
        for resume in (12_345, 1, frames - 1, 0):
            events = await events_of(client, duration=2.0, seed=11, resume=resume)
            audio = live_audio(events)
            assert [a.seq for a in audio] == list(range(len(audio)))
            assert audio[0].offset == resume
            for a, b in itertools.pairwise(audio):
                assert b.offset == a.offset + a.frames  # (contiguous from there)
            assert same_audio(b"".join(a.data for a in audio), whole.pcm[2 * resume :])
            done = events[-1]
            assert isinstance(done, Done) and done.status == "completed"
            # Its stats count the whole stream made, the frames not sent too.
            assert done.stats is not None and done.stats.samples == frames
            assert done.stats.audio_seconds == whole.stats.audio_seconds  # type: ignore[union-attr]


async def test_a_stream_resumed_at_or_past_its_end_sends_no_audio(server: Any) -> None:
    async with connect(server.url) as client:
        for resume in (100 * HOP, 10**9):
            events = await events_of(client, duration=2.0, seed=11, resume=resume)
            assert live_audio(events) == []
            assert isinstance(events[-1], Done) and events[-1].status == "completed"


async def test_a_resumed_stream_at_another_rate_and_format(server: Any) -> None:
    async with connect(server.url) as client:
        asked = {"duration": 1.5, "seed": 4, "sample_rate": 16000, "format": "pcm_f32le"}
        whole = await (await client.generate("tiny-musicgen", "rate", **asked)).collect()
        rest = await (
            await client.generate("tiny-musicgen", "rate", **asked, resume=7777)
        ).collect()
        a = np.frombuffer(whole.pcm, np.float32)
        b = np.frombuffer(rest.pcm, np.float32)
        assert len(a) == int(1.5 * 16000) and b.shape == a[7777:].shape
        assert np.abs(a[7777:] - b).max() < 1e-4


async def test_a_resumed_request_with_mbd_sends_its_version_whole(server: Any) -> None:
    async with connect(server.url) as client:
        asked = {"duration": 2.0, "seed": 1, "mbd": True}
        whole = await (await client.generate("tiny-musicgen", "mbd", **asked)).collect()
        rest = await (
            await client.generate("tiny-musicgen", "mbd", **asked, resume=100 * HOP)
        ).collect()
        assert rest.status == "completed" and rest.pcm == b""
        assert np.allclose(rest.to_numpy("mbd"), whole.to_numpy("mbd"), atol=1e-4)


async def test_metrics_count_the_audio_sent_and_what_was_made_again(server: Any) -> None:
    model = 'model="tiny-musicgen"'
    before, _ = await scrape(server.port)
    async with connect(server.url) as client:
        rest = await (
            await client.generate("tiny-musicgen", "metrics", duration=1.0, seed=2, resume=20_000)
        ).collect()
    assert rest.status == "completed" and rest.frames == 32_000 - 20_000
    await server.scheduler.wait_idle(5)
    after, _ = await scrape(server.port)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew(f"wavecast_resumed_requests_total{{{model}}}") == 1
    assert grew(f"wavecast_resumed_audio_seconds_total{{{model}}}") == pytest.approx(
        20_000 / 32_000
    )
    assert grew(f"wavecast_audio_seconds_total{{{model}}}") == pytest.approx(12_000 / 32_000)


async def test_a_file_picked_up_before_its_first_audio_counts_as_picked_up(server: Any) -> None:
    """An MP3 file at 16 kHz whose client has its first packet only (its
    ``until`` 0: the packet ends within LAME's delay) is picked up: so the
    metrics count it, with no audio had."""
    model = 'model="tiny-musicgen"'
    asked = {"duration": 1.0, "seed": 2, "format": "mp3", "sample_rate": 16000}
    before, _ = await scrape(server.port)
    async with connect(server.url) as client:
        events = await events_of(client, **asked, resume=144, resume_until=0)
    rest = live_audio(events)
    assert rest[0].offset == 144 and isinstance(events[-1], Done)
    assert events[-1].status == "completed"
    await server.scheduler.wait_idle(5)
    after, _ = await scrape(server.port)

    def grew(name: str) -> float:
        return after.get(f"wavecast_{name}_total{{{model}}}", 0.0) - before.get(
            f"wavecast_{name}_total{{{model}}}", 0.0
        )

    assert grew("resumed_requests") == 1 and grew("resumed_audio_seconds") == 0
    assert grew("audio_seconds") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("resume", "extra", "says"),
    [
        (100, {}, "resume needs params.seed"),
        (-1, {"params": {"seed": 1}}, "must be >= 0"),
        ("10", {"params": {"seed": 1}}, "must be an integer"),
    ],
)
async def test_a_resume_that_cannot_be_kept_is_refused(
    server: Any, resume: Any, extra: dict[str, Any], says: str
) -> None:
    frame = {"type": "generate", "id": "r", "model": "tiny-musicgen", "resume": resume, **extra}
    async with ws_connect(server.url) as ws:
        await ws.recv()  # (the greeting)
        await ws.send(msgpack.packb(frame))
        done = msgpack.unpackb(await ws.recv())
    assert done["type"] == "done" and done["status"] == "error"
    assert done["error"]["code"] == "invalid_field" and done["error"]["field"] == "resume"
    assert says in done["error"]["message"]


def joined_codes(audio: list[Audio]) -> bytes:
    return b"".join(a.codes or b"" for a in audio)


async def test_a_stream_sends_its_codes_with_its_audio_when_asked(server: Any) -> None:
    async with connect(server.url) as client:
        k = client.models["tiny-musicgen"].codebooks
        assert k == 4 and "codes" in client.models["tiny-musicgen"].capabilities
        audio = live_audio(await events_of(client, duration=2.0, seed=11, codes=True))
        # Every timestep, once, in order; each message with the timesteps its
        # audio needs at least (a stream cut after it can be picked up from them).
        assert len(joined_codes(audio)) == 100 * k * 2
        had = 0
        for a in audio:
            had += len(a.codes or b"") // (2 * k)
            assert had * HOP >= a.offset + a.frames
        plain = live_audio(await events_of(client, duration=2.0, seed=11))
        assert all(a.codes is None for a in plain)
        assert same_audio(b"".join(a.data for a in plain), b"".join(a.data for a in audio))


async def test_a_stream_picked_up_from_its_codes_is_the_rest_of_the_whole_one(
    server: Any,
) -> None:
    model = 'model="tiny-musicgen"'
    async with connect(server.url) as client:
        asked = {"duration": 3.0, "seed": 21, "top_k": 50, "codes": True}
        whole = live_audio(await events_of(client, **asked))
        pcm = b"".join(a.data for a in whole)
        # Cut after the fourth message: what the client has of the audio, and its codes.
        have = whole[:4]
        resume = have[-1].offset + have[-1].frames
        codes = joined_codes(have)
        before, _ = await scrape(server.port)
        events = await events_of(client, **asked, resume=resume, resume_codes=codes)
        rest = live_audio(events)
        assert rest[0].offset == resume and [a.seq for a in rest] == list(range(len(rest)))
        assert same_audio(b"".join(a.data for a in rest), pcm[2 * resume :])
        # Its codes: those after the ones sent, the whole stream's.
        assert codes + joined_codes(rest) == joined_codes(whole)
        done = events[-1]
        assert isinstance(done, Done) and done.status == "completed"
        assert done.stats is not None and done.stats.samples == 150 * HOP
        await server.scheduler.wait_idle(5)
        after, _ = await scrape(server.port)
    taken = after.get(f"wavecast_resumed_from_codes_seconds_total{{{model}}}", 0.0) - before.get(
        f"wavecast_resumed_from_codes_seconds_total{{{model}}}", 0.0
    )
    assert taken == pytest.approx(len(codes) / 8 / 50)


@pytest.mark.parametrize("rate", [16000, 44100])
async def test_a_stream_picked_up_from_its_codes_at_another_rate(
    server: Any, rate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heard at another rate than the model's 32 kHz: the rest is the whole
    stream's too, and the audio of the codes not sent yet comes with it. The
    server makes the audio again from a little before the cut only, where its
    resampler begins again (``warm_resample_start``), not from the stream's start."""
    began: list[int] = []
    begin_at = RequestOutputs.begin_at

    def recorded(outputs: RequestOutputs, frame: int) -> None:
        began.append(frame)
        begin_at(outputs, frame)

    monkeypatch.setattr(RequestOutputs, "begin_at", recorded)
    async with connect(server.url) as client:
        asked = {"duration": 2.0, "seed": 3, "codes": True, "sample_rate": rate}
        asked["format"] = "pcm_f32le"
        whole = live_audio(await events_of(client, **asked))
        have = whole[:3]
        resume = have[-1].offset + have[-1].frames - 100  # (the codes go further)
        codes = joined_codes(have)
        rest = live_audio(await events_of(client, **asked, resume=resume, resume_codes=codes))
        a = np.frombuffer(b"".join(x.data for x in whole), np.float32)
        b = np.frombuffer(b"".join(x.data for x in rest), np.float32)
        assert rest[0].offset == resume and b.shape == a[resume:].shape
        assert np.abs(a[resume:] - b).max() < 1e-4
    cut = resume * 32000 // rate
    assert began == [warm_resample_start(32000, rate, resume) // HOP * HOP]
    # (0.1 s before, and up to a codec frame and a step of the two rates' ratio more)
    assert cut - 3200 - HOP - 320 <= began[0] <= cut - 3200


@pytest.mark.parametrize(
    ("frame", "field", "says"),
    [
        ({"resume_codes": b"\0" * 8, "params": {"seed": 1}}, "resume_codes", "needs resume"),
        ({"resume": 10, "resume_codes": b"\0" * 6, "params": {"seed": 1}}, "resume_codes", "whole"),
        (
            {"resume": 10, "resume_codes": b"\xff" * 8, "params": {"seed": 1}},
            "resume_codes",
            "below 64",
        ),
        ({"codes": 1}, "codes", "must be a boolean"),
        (
            {"resume": 100, "format": "opus", "params": {"seed": 1}},
            "resume_until",
            "needs resume_until",
        ),
        ({"resume_until": 100, "format": "opus"}, "resume_until", "goes with resume"),
        (
            {"resume": 100, "resume_until": 100, "params": {"seed": 1}},
            "resume_until",
            "is for an encoded format",
        ),
    ],
    ids=[
        "without resume",
        "a part of a timestep",
        "a code too high",
        "not a boolean",
        "a file without its until",
        "an until without resume",
        "an until of PCM",
    ],
)
async def test_codes_that_cannot_be_kept_are_refused(
    server: Any, frame: dict[str, Any], field: str, says: str
) -> None:
    frame = {"type": "generate", "id": "c", "model": "tiny-musicgen", **frame}
    async with ws_connect(server.url) as ws:
        await ws.recv()  # (the greeting)
        await ws.send(msgpack.packb(frame))
        done = msgpack.unpackb(await ws.recv())
    assert done["type"] == "done" and done["status"] == "error"
    assert done["error"]["code"] == "invalid_field" and done["error"]["field"] == field
    assert says in done["error"]["message"]


@pytest.mark.parametrize(
    ("format", "rate"), [("mp3", 32000), ("opus", 48000), ("flac", 32000), ("mp3", 16000)]
)
async def test_a_file_picked_up_goes_on_from_the_packet_after_the_clients(
    server: Any, format: str, rate: int
) -> None:
    """An encoded stream cut after any of its messages (each ends where a packet
    of its codec does, at its ``until``), picked up with and without its codes:
    its file goes on from the client's bytes, and the file joined decodes to the
    whole one's audio (FLAC to its 16-bit samples, within a step; the lossy
    ones, where a packet off would be noise, within the codec's own rounding).
    Its codes join the whole stream's; each message's cover its bytes."""
    model = 'model="tiny-musicgen"'
    async with connect(server.url) as client:
        k = client.models["tiny-musicgen"].codebooks
        asked = {"duration": 3.0, "seed": 5, "format": format, "codes": True, "sample_rate": rate}
        whole = live_audio(await events_of(client, **asked))
        file = b"".join(a.data for a in whole)
        codes = joined_codes(whole)
        assert len(codes) == 150 * k * 2  # (every timestep, once: none lost to a codec's delay)
        untils = [a.until for a in whole]
        assert all(until is not None for until in untils) and untils == sorted(untils)  # type: ignore[type-var]
        assert untils[-1] >= 3 * rate
        timesteps = 0
        assert CHUNK_BYTES <= PIECE_BYTES  # (a live chunk is one message: it ends a packet)
        for a in whole:
            assert len(a.data) <= CHUNK_BYTES
            timesteps += len(a.codes or b"") // (2 * k)
            assert timesteps * HOP / 32000 >= a.until / rate  # type: ignore[operator]
        expected = decode_file(file, format).astype(np.float64)
        for cut in sorted({1, 2, len(whole) // 2, len(whole) - 1}):
            have = whole[:cut]
            had = b"".join(a.data for a in have)
            for from_codes in (True, False):
                before, _ = await scrape(server.port)
                events = await events_of(
                    client,
                    **asked,
                    resume=len(had),
                    resume_until=have[-1].until,
                    resume_codes=joined_codes(have) if from_codes else None,
                )
                rest = live_audio(events)
                assert rest[0].offset == len(had) and [a.seq for a in rest] == list(
                    range(len(rest))
                )
                for a, b in itertools.pairwise(rest):
                    assert b.offset == a.offset + len(a.data)
                done = events[-1]
                assert isinstance(done, Done) and done.status == "completed"
                joined = decode_file(had + b"".join(a.data for a in rest), format)
                assert joined.shape == expected.shape
                apart = np.abs(joined.astype(np.float64) - expected)
                if format == "flac":
                    assert apart.max() <= 1
                else:  # (MP3: from the end of its encoder's delay)
                    assert apart[MP3_DELAY if format == "mp3" else 0 :].max() < 0.02
                if from_codes:
                    assert joined_codes(have) + joined_codes(rest) == codes
                await server.scheduler.wait_idle(5)
                after, _ = await scrape(server.port)

                grew = {
                    name: after.get(f"wavecast_{name}_total{{{model}}}", 0.0)
                    - before.get(f"wavecast_{name}_total{{{model}}}", 0.0)
                    for name in ("resumed_requests", "resumed_audio_seconds", "audio_seconds")
                }
                heard = have[-1].until / rate  # type: ignore[operator]
                assert grew["resumed_requests"] == 1
                assert grew["resumed_audio_seconds"] == pytest.approx(heard)
                assert grew["audio_seconds"] == pytest.approx(3.0 - heard)


async def test_a_file_picked_up_at_its_end_sends_no_audio(server: Any) -> None:
    async with connect(server.url) as client:
        asked = {"duration": 1.0, "seed": 5, "format": "opus"}
        whole = live_audio(await events_of(client, **asked))
        size = sum(len(a.data) for a in whole)
        events = await events_of(client, **asked, resume=size, resume_until=whole[-1].until)
        assert live_audio(events) == []
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
