"""Speech whose text comes as it is written (``generate.text_stream`` and the
``text`` frame, PROTOCOL.md §3.4) through the real server and client."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import pytest_asyncio
import soundfile
from helpers import (
    WAVECAST,
    higgs_engines,
    make_config,
    running_server,
    same_audio,
    slow_link,
    timeout,
    tiny_higgs,
)
from test_stream import scrape
from websockets.asyncio.client import connect as ws_connect

from wavecast.clients import SyncClient, connect
from wavecast.clients.client import GenerationResult, decode_file
from wavecast.protocol import Audio, Caption, Done, Started, Waiting
from wavecast.server import session as session_module
from wavecast.server.scheduler import Scheduler, add_text_part

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOP = 960  # tiny-higgs: 24 kHz, 25 frames a second
SENTENCES = ["One two three.", "Four five six.", "Seven eight nine."]
# Chunked by three words: the whole text's chunks are its sentences.
CHUNKING = {"chunk_method": "word", "chunk_max_word_num": 3, "max_new_tokens": 40, "seed": 7}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[Any]:
    async with running_server(make_config(max_active=4), higgs_engines) as srv:
        yield srv


def joined(events: list[Any], what: str) -> bytes:
    return b"".join(getattr(e, what) or b"" for e in events if isinstance(e, Audio))


async def test_the_capability_is_in_the_greeting(server: Any) -> None:
    async with connect(server.url) as client:
        assert "text_stream" in client.models["tiny-higgs"].capabilities
        assert "text_stream" not in client.models["tiny-musicgen"].capabilities


async def test_text_sent_as_the_speech_goes_makes_the_whole_texts_codes(server: Any) -> None:
    """Each sentence sent once the audio of the one before has begun to come
    (the stream waits for it where it has spoken all it had, and says so after
    that audio): the same codes as the whole text at once, every frame's audio
    sent, and the stream ends once its text has."""
    await speak_in_parts(server.url)


async def test_text_in_parts_on_a_server_that_pipelines_its_steps() -> None:
    """The same where each step is launched before the last one's codes are
    read (``--pipelined-steps``): a row's outputs come a step later."""
    engines = {"tiny-higgs": tiny_higgs(pipelined=True)}
    async with running_server(make_config(max_active=4), lambda: engines) as srv:
        await speak_in_parts(srv.url)


async def speak_in_parts(url: str) -> None:
    async with connect(url) as client:
        whole = await client.speak("tiny-higgs", " ".join(SENTENCES), codes=True, **CHUNKING)
        whole_events = [event async for event in whole]
        stream = await client.speak(
            "tiny-higgs", SENTENCES[0] + " Four", text_stream=True, codes=True, **CHUNKING
        )
        events: list[Any] = []
        parts = [(" five six.", False), (" " + SENTENCES[2], True)]
        async for event in stream:
            events.append(event)
            if isinstance(event, Audio) and parts:
                text, end = parts.pop(0)
                await stream.send_text(text, end=end)
        done = events[-1]
        assert isinstance(done, Done) and done.status == "completed", done
        assert not parts
        # Each wait said, after all of the audio before it: the first sentence's,
        # then the second's (the third is the stream's end).
        waits = [i for i, e in enumerate(events) if isinstance(e, Waiting)]
        assert len(waits) <= 2
        for at in waits:
            heard = sum(e.frames for e in events[:at] if isinstance(e, Audio))
            assert heard * 25 == round(events[at].seconds * 25) * HOP
        codes = joined(events, "codes")
        assert codes == joined(whole_events, "codes")
        frames = len(codes) // 8 - 3 * 4  # (each chunk's rows: its frames and the delay's)
        assert len(joined(events, "data")) // 2 == frames * HOP
        assert done.stats is not None and done.stats.samples == frames * HOP


async def test_a_stream_waits_for_its_text_holding_no_one_up(server: Any) -> None:
    """A stream that has spoken all of its text so far sends all of that audio
    and waits; a request beside it goes on to its end; more text, and the
    stream goes on."""
    async with connect(server.url) as client:
        stream = await client.speak(
            "tiny-higgs", "Hello there. ", text_stream=True, codes=True, **CHUNKING
        )
        events: list[Any] = []
        iterator = stream.__aiter__()
        while not events or not isinstance(events[-1], Audio):
            events.append(await anext(iterator))
        other = await client.speak("tiny-higgs", "Meanwhile, another voice.", max_new_tokens=30)
        other_done = (await other.collect()).status
        assert other_done == "completed"
        # (all of the first sentence's audio came meanwhile: nothing more until text)
        more = asyncio.ensure_future(anext(iterator))
        await asyncio.sleep(0.3)
        while more.done():
            events.append(more.result())
            more = asyncio.ensure_future(anext(iterator))
            await asyncio.sleep(0.05)
        heard = len(joined(events, "data"))
        # Every frame of its one chunk so far (its rows less the delay's): none
        # held back for the codec's look-ahead.
        rows = len(joined(events, "codes")) // 8
        assert heard > 0 and heard == 2 * HOP * (rows - 4)
        samples, kinds = await scrape(server.port)
        assert kinds["wavecast_requests_waiting_for_text"] == "gauge"
        assert samples["wavecast_requests_waiting_for_text"] == 1
        await stream.end_text("And goodbye.")
        events.append(await more)
        events += [event async for event in iterator]
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        assert len(joined(events, "data")) > heard


async def test_a_stream_waiting_for_text_is_cancelled_at_once(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.speak("tiny-higgs", "", text_stream=True)
        events = [await anext(stream.__aiter__())]
        await asyncio.sleep(0.2)
        await stream.cancel()
        events += [event async for event in stream]
        assert isinstance(events[-1], Done) and events[-1].status == "cancelled"
        assert any(isinstance(event, Started) for event in events)


async def test_a_stream_that_waits_too_long_for_text_ends(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Scheduler, "TEXT_WAIT", 0.5)
    monkeypatch.setattr(Scheduler, "TEXT_POLL", 0.1)
    async with connect(server.url) as client:
        stream = await client.speak("tiny-higgs", "Only this. ", text_stream=True, **CHUNKING)
        result = await stream.collect()
        assert result.status == "error" and result.error is not None
        assert result.error.code == "text_timeout"
        assert result.frames > 0  # (what it had, spoken)
    # It waits no more: the gauge of streams waiting says so, once nothing runs.
    samples, _ = await scrape(server.port)
    assert samples["wavecast_requests_waiting_for_text"] == 0


async def test_a_part_that_makes_a_control_token_ends_its_stream(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.speak("tiny-higgs", "Hi. ", text_stream=True, **CHUNKING)
        await stream.send_text("Then <|eot")
        await stream.send_text("_id|> more.")
        result = await stream.collect()
        assert result.status == "error" and result.error is not None
        assert (result.error.code, result.error.field) == ("invalid_field", "text")
        assert "<|eot_id|>" in result.error.message
        # (the connection and the server go on)
        again = await client.speak("tiny-higgs", "Fine.", max_new_tokens=20)
        assert (await again.collect()).status == "completed"


async def test_the_client_keeps_to_the_text_stream() -> None:
    async with running_server(make_config(), higgs_engines) as srv, connect(srv.url) as client:
        plain = await client.speak("tiny-higgs", "Hello.", max_new_tokens=20)
        with pytest.raises(ValueError, match="text_stream"):
            await plain.send_text("more")
        await plain.collect()
        stream = await client.speak("tiny-higgs", "Hi. ", text_stream=True, max_new_tokens=20)
        await stream.end_text()
        with pytest.raises(ValueError, match="has ended"):
            await stream.send_text("more")
        assert (await stream.collect()).status == "completed"


async def raw(url: str, *frames: dict[str, Any], replies: int = 1) -> list[dict[str, Any]]:
    async with ws_connect(url) as ws:
        await ws.recv()  # (the greeting)
        for frame in frames:
            await ws.send(msgpack.packb(frame))
        out = []
        for _ in range(replies):
            reply = msgpack.unpackb(await ws.recv())
            while reply["type"] in ("queued", "started", "progress", "audio"):
                reply = msgpack.unpackb(await ws.recv())
            out.append(reply)
        return out


SPEAK = {"type": "generate", "id": "s", "model": "tiny-higgs", "prompt": "Hi. "}


@pytest.mark.parametrize(
    ("frames", "code", "field", "says"),
    [
        ([{"type": "text", "id": "x", "text": "hi"}], "unknown_id", "id", "no request"),
        (
            [{**SPEAK, "params": {"max_new_tokens": 200}}, {"type": "text", "id": "s"}],
            "invalid_field",
            "text_stream",
            "not opened with text_stream",
        ),
        (
            [
                {**SPEAK, "text_stream": True},
                {"type": "text", "id": "s", "end": True},
                {"type": "text", "id": "s", "text": "more"},
            ],
            "invalid_field",
            "end",
            "has ended",
        ),
        (
            [{**SPEAK, "text_stream": True}, {"type": "text", "id": "s", "text": "x" * 10_000}],
            "invalid_field",
            "text",
            "longer than",
        ),
        ([{"type": "text", "id": "s", "text": 3}], "invalid_field", "text", "must be a string"),
    ],
    ids=["unknown id", "text came whole", "after its end", "too long", "not a string"],
)
async def test_text_that_cannot_be_taken_is_refused(
    server: Any, frames: list[dict[str, Any]], code: str, field: str, says: str
) -> None:
    replies = await raw(server.url, *frames)
    error = replies[0]
    assert error["type"] == "error" and error["code"] == code, error
    assert error["field"] == field and says in error["message"]


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        ({"model": "tiny-musicgen"}, "unsupported", "text_stream"),
        (
            {"resume": 10, "params": {"seed": 1}},
            "invalid_field",
            "only where it is cut a sentence a chunk",
        ),
        (
            {
                "resume": 10,
                "resume_waits": [[100, 20]],
                "params": {"seed": 1, "chunk_method": "sentence"},
            },
            "invalid_field",
            "resume_waits goes with resume and text_stream, in an encoded format",
        ),
        (
            {"format": "mp3", "resume_waits": [[100, 20]]},
            "invalid_field",
            "resume_waits goes with resume",
        ),
        *(
            (
                {
                    "format": "mp3",
                    "resume": 10,
                    "resume_until": 20000,
                    "resume_waits": waits,
                    "params": {"seed": 1, "chunk_method": "sentence"},
                },
                "invalid_field",
                "past the file's resume_until",
            )
            # (a wait after the client's file; more silence than a flush of
            # sixteen 576-sample MP3 frames at 24 kHz gives)
            for waits in ([[20001, 0]], [[10000, 100], [19950, 0]], [[100, 16 * 576 + 1]])
        ),
        ({"resume_flushes": [1]}, "invalid_field", "resume_flushes goes with resume"),
        (
            {"text_stream": None, "resume": 10, "resume_flushes": [1], "params": {"seed": 1}},
            "invalid_field",
            "resume_flushes goes with resume and text_stream",
        ),
    ],
    ids=[
        "a music model",
        "picked up, not cut by sentence",
        "waits, in PCM",
        "waits, not picked up",
        "a wait past the file",
        "a wait past the file with the silence before it",
        "more silence than a wait gives",
        "flushes, not picked up",
        "flushes, not a text stream",
    ],
)
async def test_a_text_stream_that_cannot_be_is_refused(
    server: Any, extra: dict[str, Any], code: str, says: str
) -> None:
    (done,) = await raw(server.url, {**SPEAK, "text_stream": True, **extra})
    assert done["type"] == "done" and done["status"] == "error"
    assert done["error"]["code"] == code and says in done["error"]["message"]


async def test_its_audio_is_the_texts_speech_at_any_rate(server: Any) -> None:
    """Resampled as it streams (16 kHz): at a wait, all of the audio so far has
    come (the resampler holds none back), and the stream ends with its text."""
    async with connect(server.url) as client:
        stream = await client.speak(
            "tiny-higgs", "", text_stream=True, sample_rate=16000, format="pcm_f32le", **CHUNKING
        )
        await stream.send_text("One two three.", flush=True)
        events: list[Any] = []
        async for event in stream:
            events.append(event)
            if isinstance(event, Waiting):
                heard = sum(e.frames for e in events if isinstance(e, Audio))
                # (36 frames of 960 samples at 24 kHz, at 16 kHz)
                assert heard == (40 - 4) * HOP * 2 // 3 and event.seconds == 36 / 25
                await stream.end_text(" Four five six.")
        assert sum(isinstance(e, Waiting) for e in events) == 1
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        audio = np.frombuffer(joined(events, "data"), np.float32)
        assert len(audio) == 2 * (40 - 4) * HOP * 2 // 3 and np.isfinite(audio).all()


async def speak_waiting_each_time(client: Any, format: str) -> tuple[list[Any], list[bytes]]:
    """Three sentences, each sent once the stream waits for it: the events, and
    the stream's bytes so far at each wait."""
    # (31 frames a sentence: a FLAC block, 2.4 frames, does not end where one does)
    params = {**CHUNKING, "max_new_tokens": 35}
    stream = await client.speak(
        "tiny-higgs", "", text_stream=True, format=format, captions=True, **params
    )
    parts = [(s, i == len(SENTENCES) - 1) for i, s in enumerate(SENTENCES)]
    text, end = parts.pop(0)
    await stream.send_text(text, flush=True)
    events: list[Any] = []
    at_waits: list[bytes] = []
    async for event in stream:
        events.append(event)
        if isinstance(event, Waiting):
            at_waits.append(joined(events, "data"))
            text, end = parts.pop(0)
            await stream.send_text(" " + text, flush=True, end=end)
    assert isinstance(events[-1], Done) and events[-1].status == "completed"
    assert len(at_waits) == 2 and not parts
    return events, at_waits


@pytest.mark.parametrize("format", ["flac", "opus", "mp3"])
async def test_an_encoded_stream_plays_all_of_its_speech_at_a_wait(
    server: Any, format: str
) -> None:
    """At a wait, an encoded stream's file so far plays all of its speech so far
    (the encoder's last frame and look-ahead filled with silence, which plays
    while it waits): FLAC its 16-bit samples exactly, each sentence's after the
    silence that ended the one before; Opus and MP3 as many samples, at least.
    Each sentence's caption is where it begins in the file, after that silence."""
    async with connect(server.url) as client:
        pcm_events, _ = await speak_waiting_each_time(client, "pcm_s16le")
        events, at_waits = await speak_waiting_each_time(client, format)
    # Each sentence's audio, as the PCM stream sent it (its waits cut it).
    waits = [i for i, e in enumerate(pcm_events) if isinstance(e, Waiting)]
    cuts = [0, *waits, len(pcm_events)]
    sentences = [
        np.frombuffer(joined(pcm_events[a:b], "data"), "<i2") for a, b in itertools.pairwise(cuts)
    ]
    assert all(len(s) > 0 for s in sentences)
    files = [*at_waits, joined(events, "data")]
    silences = [e.silence for e in events if isinstance(e, Waiting)]
    delay = 1105 if format == "mp3" else 0  # (LAME's: the file begins with it)
    # (less than a FLAC block, 2,304 samples at 24 kHz; 50 ms of Opus; 150 of MP3)
    assert all(0 < s < {"flac": 2304, "opus": 1200, "mp3": 3600}[format] for s in silences)
    captions = [e for e in events if isinstance(e, Caption)]
    assert [c.text for c in captions] == SENTENCES
    start = 0
    for sentence, data, silence in zip(sentences, files, [*silences, 0], strict=True):
        assert captions.pop(0).offset == start
        decoded = decode_file(data, format)[delay:, 0]
        end = start + len(sentence)
        assert len(decoded) >= end
        if format == "flac":
            assert np.array_equal(decoded[start:end], sentence)
            assert len(decoded) == end + silence and not decoded[end:].any()
        else:  # (the speech's last 20 ms is there, as loud, give or take)
            heard = np.sqrt(np.mean(decoded[end - 480 : end].astype(np.float64) ** 2))
            said = np.sqrt(np.mean((sentence[-480:] / 32768.0) ** 2))
            assert 0.3 * said < heard < 3 * said
        start = end + silence  # (where the next sentence begins in the file)
    done = events[-1]
    assert done.stats.samples == sum(len(s) for s in sentences)
    if format != "mp3":  # (MP3 pads its last frame, and has no count)
        assert len(decoded) == done.stats.samples + sum(silences)
        # (what a client's result says it holds: the file's frames)
        result = GenerationResult("s", "completed", files[-1], 24000, 1, format, done.stats)
        assert replace(result, silence=sum(silences)).frames == len(decoded)


async def test_the_command_speaks_its_input_as_it_comes(server: Any, tmp_path: Path) -> None:
    """``wavecast speak --text-stream``: each line of its standard input sent as
    it comes, a sentence a chunk (two in a line too), the stream ending with
    the input."""
    out, vtt = tmp_path / "said.wav", tmp_path / "said.vtt"
    process = await asyncio.create_subprocess_exec(
        *WAVECAST,
        "speak",
        "--text-stream",
        "--url",
        server.url,
        "--max-new-tokens",
        "30",
        "-o",
        str(out),
        "--captions",
        str(vtt),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"The first line. It comes\n")
    await process.stdin.drain()
    await asyncio.sleep(0.5)  # (spoken meanwhile: the stream then waits)
    process.stdin.write(b"and then the last.")
    process.stdin.close()
    output = (await asyncio.wait_for(process.stdout.read(), timeout(60))).decode()
    assert await process.wait() == 0, output
    assert "completed" in output and "test model" in output
    audio, rate = soundfile.read(out)
    # Three utterances of at most 30 rows (26 frames) each.
    assert rate == 24000 and 0 < len(audio) <= 3 * 26 * HOP
    said = [cue.split("\n")[-1] for cue in vtt.read_text().strip().split("\n\n")[1:]]
    assert said == ["The first line.", "It comes", "and then the last."]


async def test_the_parts_waiting_for_the_engine_are_as_few_as_say_the_same() -> None:
    parts: collections.deque[tuple[str, bool, bool]] = collections.deque()
    for _ in range(1000):  # (a client's frames of nothing, and flushes of nothing)
        add_text_part(parts, "", False, False)
        add_text_part(parts, "", True, False)
    assert list(parts) == [("", True, False)]
    add_text_part(parts, "One ", False, False)
    add_text_part(parts, "two.", False, False)
    add_text_part(parts, " Three", True, False)
    add_text_part(parts, "", True, False)
    add_text_part(parts, " four", False, False)
    add_text_part(parts, "", False, True)
    assert list(parts) == [
        ("", True, False),
        ("One two. Three", True, False),
        (" four", False, True),
    ]


def thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds a thread of this process has used (Linux)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_full_server_of_waiting_streams_sleeps_until_a_slot_frees() -> None:
    """Every slot held by a stream that waits for its text, and a request queued
    behind it: the inference thread sleeps (it does not spin) until the stream's
    text ends, and the queued request then starts."""
    config = make_config(max_active=1)
    async with running_server(config, higgs_engines) as srv, connect(srv.url) as client:
        waiting = await client.speak("tiny-higgs", "Hi. ", text_stream=True, max_new_tokens=20)
        queued = await client.speak("tiny-higgs", "Next in line.", max_new_tokens=20)
        await asyncio.sleep(0.5)  # (the first spoken: it waits, the second is queued)
        native_id = srv.scheduler._thread.native_id
        before = thread_cpu_seconds(native_id)
        await asyncio.sleep(1.0)
        assert thread_cpu_seconds(native_id) - before < 0.2
        assert queued.started is None
        await waiting.end_text()
        assert (await waiting.collect()).status == "completed"
        assert (await queued.collect()).status == "completed"


async def test_the_time_a_stream_waits_for_its_text_is_not_a_slow_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over a link slower than the stream (its audio waiting in the send buffer
    for seconds), a stream that waits for its text is not behind real time for
    that wait: its client is not a slow consumer (``PACE_GRACE`` here 0), and
    the stream ends when its text does."""
    monkeypatch.setattr(session_module, "PACE_GRACE", 0.0)
    config = make_config(send_buffer_bytes=256 << 10)
    async with (
        running_server(config, higgs_engines) as srv,
        slow_link(srv.port, 320) as port,
        connect(f"ws://127.0.0.1:{port}/v1/stream") as client,
    ):
        # Its sentence (4.6 s of float PCM, 445 kB) is made at once and goes
        # out at 40 kB/s: half the send buffer waits for some 6 s, while the
        # stream waits for its text (before, 5 s in, a slow consumer).
        stream = await client.speak(
            "tiny-higgs", "Hi there. ", text_stream=True, format="pcm_f32le", max_new_tokens=120
        )
        events: list[Any] = []
        iterator = stream.__aiter__()
        while not any(isinstance(e, Audio) for e in events):
            events.append(await anext(iterator))
        await asyncio.sleep(7.0)
        await stream.end_text()
        events += [event async for event in iterator]
    done = events[-1]
    assert isinstance(done, Done) and done.status == "completed", done
    assert done.stats is not None and done.stats.audio_seconds == pytest.approx(4.64)


async def test_the_blocking_client_sends_text_as_it_comes(server: Any) -> None:
    def work() -> Any:
        with SyncClient(server.url) as client:
            request = client.speak("tiny-higgs", "One", text_stream=True, **CHUNKING)
            request.send_text(" two three.")
            request.send_text(" Four", flush=True)
            request.end_text(" five six.")
            return request.collect()

    result = await asyncio.to_thread(work)
    # Three utterances ("One two three.", "Four", "five six."), each to its
    # max_new_tokens: every frame of them.
    assert result.status == "completed" and result.frames == 3 * (40 - 4) * HOP


@pytest.mark.parametrize(
    ("rate", "flush"), [(None, False), (16000, False), (None, True)], ids=["", "16000", "flushed"]
)
async def test_a_text_stream_cut_under_way_is_picked_up_where_it_was(
    rate: int | None, flush: bool
) -> None:
    """Cut a sentence a chunk (``chunk_method: sentence``), a stream whose text
    comes as it is written is picked up on a new connection (``retry_for``):
    its text so far in its prompt, from the codes it sent (cut in its second
    sentence, which came in a part); a part sent while it was cut goes after
    it. The speech is the one made without the cut, at the model's rate and at
    another (resampled again from a little before the cut). A part sent with
    ``flush`` mid-sentence spoke a chunk there: the stream picked up says where
    (``resume_flushes``), and speaks the same chunks."""
    asked = {"chunk_method": "sentence", "max_new_tokens": 150, "seed": 3, "sample_rate": rate}
    async with (
        running_server(make_config(max_active=2, admission="slots"), higgs_engines) as server,
        connect(server.url, retry_for=timeout(30)) as client,
    ):

        async def spoken(cut: bool) -> list[Any]:
            stream = await client.speak(
                "tiny-higgs", "One two three. Four", text_stream=True, captions=True, **asked
            )
            assert stream.generate.codes  # (asked for, to be picked up from)
            events: list[Any] = []
            heard, parts = 0, [" five six. Seven", " eight nine."]
            async for event in stream:
                events.append(event)
                heard += event.frames if isinstance(event, Audio) else 0
                if isinstance(event, Audio) and len(parts) == 2:
                    await stream.send_text(parts.pop(0), flush=flush)
                elif heard * 24000 // (rate or 24000) > (146 + 10) * HOP and len(parts) == 1:
                    if cut:
                        await close_sessions(server)
                    await stream.end_text(parts.pop())
            return events

        alone = await spoken(cut=False)
        events = await spoken(cut=True)
    for got in (alone, events):
        assert isinstance(got[-1], Done) and got[-1].status == "completed", got[-1]
    assert sum(isinstance(e, Started) for e in events) == 1  # (one stream, picked up)
    audio = [e for e in events if isinstance(e, Audio)]
    assert [a.offset for a in audio] == [0, *itertools.accumulate(a.frames for a in audio[:-1])]
    assert same_audio(joined(events, "data"), joined(alone, "data"))
    assert joined(events, "codes") == joined(alone, "codes")
    # Each sentence's caption once, where it was said without the cut.
    captions = [(e.offset, e.text) for e in events if isinstance(e, Caption)]
    assert captions == [(e.offset, e.text) for e in alone if isinstance(e, Caption)]
    said = ["One two three.", "Four five six.", "Seven", "eight nine."] if flush else SENTENCES
    assert [text for _, text in captions] == said


@pytest.mark.parametrize(
    ("format", "rate", "cut", "again"),
    [
        ("flac", None, (1, 1), False),
        ("flac", None, (2, 0), False),
        ("flac", None, (1, 0), True),
        ("opus", None, (1, 1), False),
        ("opus", 48000, (2, 1), False),
        ("opus", None, (2, 0), True),
        ("mp3", None, (1, 1), False),
        ("mp3", 16000, (2, 0), False),
    ],
)
async def test_an_encoded_text_stream_cut_under_way_is_picked_up_where_it_was(
    format: str, rate: int | None, cut: tuple[int, int], again: bool
) -> None:
    """A file whose text comes as it is written, cut a sentence a chunk, holds
    silence where the stream waited for its text. Cut (``cut``: after that many
    waits, at the first audio message after the last, so that the file made
    again begins near that silence; or, 0, as it waits: both come, however
    large the chunks), it is picked up on a new connection (``retry_for``)
    from its codes, with where it got that silence (``resume_waits``): its
    bytes go on from the client's, and the file joined is the one made without
    the cut (FLAC its 16-bit samples, within a step; the lossy ones within the
    codec's own rounding), its captions where they were. Cut as it waits, its
    next part sent while it is cut, or (``again``) only once the stream picked
    up waits there again: that wait's silence is the same, once, and the
    client's consumer has its ``waiting`` once."""
    asked = {"chunk_method": "sentence", "max_new_tokens": 35, "seed": 7, "sample_rate": rate}
    async with (
        running_server(make_config(max_active=2, admission="slots"), higgs_engines) as server,
        connect(server.url, retry_for=timeout(30)) as client,
    ):

        async def spoken(cutting: bool) -> tuple[list[Any], Any]:
            stream = await client.speak(
                "tiny-higgs", "", text_stream=True, captions=True, format=format, **asked
            )
            assert stream.generate.codes  # (asked for, to be picked up from)
            parts = [f"{s} " for s in SENTENCES]
            await stream.send_text(parts.pop(0))
            events: list[Any] = []
            waits = heard = 0
            later = None
            async for event in stream:
                events.append(event)
                if isinstance(event, Waiting):
                    waits, heard = waits + 1, 0
                    part = parts.pop(0)
                    if cutting and cut == (waits, 0):
                        ended = server.scheduler.snapshot()["cancelled"] + 1  # (the cut try)
                        await close_sessions(server)
                        if again:  # (sent once the stream picked up waits there again)
                            waiting = waits_again(server, ended, part, stream, not parts)
                            later = asyncio.ensure_future(waiting)
                            continue
                    await stream.send_text(part, end=not parts)
                elif isinstance(event, Audio):
                    heard += 1
                    if cutting and cut == (waits, heard):
                        await close_sessions(server)
            if later is not None:
                await later
            return events, stream.generate

        alone, _ = await spoken(cutting=False)
        events, asked_again = await spoken(cutting=True)
    # (picked up from its codes, with the waits before the cut)
    assert asked_again.resume and asked_again.resume_codes
    assert asked_again.resume_waits is not None and len(asked_again.resume_waits) == cut[0]
    for got in (alone, events):
        assert isinstance(got[-1], Done) and got[-1].status == "completed", got[-1]
    assert sum(isinstance(e, Started) for e in events) == 1  # (one stream, picked up)
    audio = [e for e in events if isinstance(e, Audio)]
    assert [a.offset for a in audio] == [0, *itertools.accumulate(len(a.data) for a in audio[:-1])]
    silences = [e.silence for e in alone if isinstance(e, Waiting)]
    assert len(silences) == 2 and [e.silence for e in events if isinstance(e, Waiting)] == silences
    whole = decode_file(joined(alone, "data"), format).astype(np.float64)
    file = decode_file(joined(events, "data"), format).astype(np.float64)
    assert file.shape == whole.shape
    done = events[-1]
    assert done.stats is not None and done.stats.samples == alone[-1].stats.samples
    if format != "mp3":  # (MP3 pads its last frame)
        assert len(file) == done.stats.samples + sum(silences)
    apart = np.abs(file - whole)
    if format == "flac":
        assert apart.max() <= 1
    else:
        assert apart[1105 if format == "mp3" else 0 :].max() < 0.02
    captions = [(e.offset, e.text) for e in events if isinstance(e, Caption)]
    assert captions == [(e.offset, e.text) for e in alone if isinstance(e, Caption)]
    assert [text for _, text in captions] == SENTENCES


async def waits_again(server: Any, ended: int, part: str, stream: Any, end: bool) -> None:
    """Once ``stream``, cut as it waited, is picked up (the cut try ended: the
    server's ``ended``-th cancelled request) and waits again (its client reading
    on meanwhile), its next part."""
    for _ in range(int(timeout(30) / 0.01)):
        now = server.scheduler.snapshot()
        if now["cancelled"] == ended and now["active"] == now["waiting_for_text"] == 1:
            await stream.send_text(part, end=end)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stream picked up did not wait again")


async def close_sessions(server: Any) -> None:
    for session in list(server.sessions):
        await session.ws.close(1001)  # (going away: the client picks its streams up)
