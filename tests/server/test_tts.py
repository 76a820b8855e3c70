"""Text to speech (HiggsAudio v2, tiny-higgs) through the real server and client."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from helpers import (
    higgs_engines,
    make_config,
    run_cli,
    running_server,
    same_audio,
    steps_after_disconnect,
    timeout,
)
from test_stream import scrape

from wavecast.clients import connect
from wavecast.clients.client import g711_table
from wavecast.protocol import Audio, Done, Progress, Started
from wavecast.server.audio import mulaw, resample

HOP = 960  # tiny-higgs: 24 kHz, 25 frames per second
K = 4  # codebooks: an utterance of max_new_tokens rows holds max_new_tokens - K frames


def tone(seconds: float, rate: int = 24000, freq: float = 220.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(buffer, wave.astype(np.float32), rate, format=fmt)
    return buffer.getvalue()


# One server for the module (its start, with the codec's layers timed, is most of
# a short test's time): the tests and the fixture share the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    (folder / "belinda.wav").write_bytes(tone(1.5, freq=200))
    (folder / "belinda.txt").write_text("Twas the night before my birthday.\n")
    (folder / "broom_salesman.wav").write_bytes(tone(1.2, rate=16000, freq=120))
    (folder / "broom_salesman.txt").write_text("I sell the finest brooms.")
    (folder / "no_transcript.flac").write_bytes(tone(1.0, freq=300, fmt="FLAC"))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(voices_dir: Path) -> AsyncIterator[Any]:
    config = make_config()
    config = replace(config, models=replace(config.models, voices_dir=voices_dir))
    async with running_server(config, lambda: higgs_engines(voices_dir)) as srv:
        yield srv


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.loads(response.read())


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "audio/wav"
        data: bytes = response.read()
        return data


async def test_greeting_voices_and_scenes_endpoints(server: Any) -> None:
    async with connect(server.url) as client:
        info = client.models["tiny-higgs"]
        assert info.family == "higgs" and info.test_model
        assert "test model" in info.description
        assert info.capabilities == (
            "tts",
            "voices",
            "reference",
            "scene",
            "dialogue",
            "codes",
            "text_stream",
            "captions",
        )
        assert info.voices == ("belinda", "broom_salesman", "no_transcript")
        assert info.scenes is not None and "quiet_indoor" in info.scenes
        assert client.models["tiny-musicgen"].voices is None
        specs = {spec.name: spec for spec in info.params}
        # the original server's defaults
        assert (specs["temperature"].default, specs["top_k"].default) == (0.7, 50)
        assert (specs["top_p"].default, specs["max_new_tokens"].default) == (0.95, 2048)
        assert (specs["ras_win_len"].default, specs["ras_win_max_num_repeat"].default) == (7, 2)
        assert specs["chunk_method"].choices == ("none", "speaker", "word", "sentence")
        assert (specs["chunk_max_word_num"].default, specs["chunk_max_num_turns"].default) == (
            200,
            1,
        )
        assert specs["scene"].default == "quiet_indoor"
    base = server.url.replace("ws://", "http://").removesuffix("/v1/stream")
    loop = asyncio.get_running_loop()
    voices = await loop.run_in_executor(None, get_json, base + "/v1/voices")
    assert voices["count"] == 3
    belinda = voices["voices"][0]
    assert belinda["name"] == "belinda" and belinda["type"] == "wav"
    assert belinda["transcript"] == "Twas the night before my birthday."
    assert belinda["seconds"] == 1.5
    assert voices["voices"][2]["transcript"] is None
    scenes = await loop.run_in_executor(None, get_json, base + "/v1/scenes")
    quiet = next(s for s in scenes["scenes"] if s["name"] == "quiet_indoor")
    assert quiet["content"] == "Audio is recorded from a quiet room."
    # Each voice can be heard before it is chosen.
    wav = await loop.run_in_executor(None, get_bytes, base + "/v1/voices/belinda.wav")
    heard, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    voice = server.voices["belinda"]
    assert rate == voice.sample_rate and heard.shape == voice.audio.shape
    assert np.abs(heard - voice.audio).max() <= 1 / 32767 + 1e-6
    with pytest.raises(urllib.error.HTTPError) as missing:
        await loop.run_in_executor(None, get_bytes, base + "/v1/voices/nobody.wav")
    missing.value.close()
    assert missing.value.code == 404
    info_json = await loop.run_in_executor(None, get_json, base + "/v1/info")
    higgs = next(m for m in info_json["models"] if m["name"] == "tiny-higgs")
    assert higgs["voices"] == ["belinda", "broom_salesman", "no_transcript"]


async def speak(client: Any, text: str, **kwargs: Any) -> Any:
    return await (await client.speak("tiny-higgs", text, **kwargs)).collect()


async def test_named_voice_streams_audio(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.speak(
            "tiny-higgs", "Hello there, how are you?", voice="belinda", max_new_tokens=30, seed=1
        )
        events = [event async for event in stream]
        started = next(e for e in events if isinstance(e, Started))
        assert (started.sample_rate, started.channels, started.seed) == (24000, 1, 1)
        assert started.seconds is None and started.max_seconds == pytest.approx(30 * HOP / 24000)
        chunks = [e for e in events if isinstance(e, Audio)]
        assert len(chunks) > 2  # streamed as it is made, not at the end
        offsets = [c.offset for c in chunks]
        sizes = [len(c.data) // 2 for c in chunks]
        assert offsets == list(np.cumsum([0, *sizes[:-1]]))
        assert sum(sizes) == (30 - K) * HOP
        fractions = [e.fraction for e in events if isinstance(e, Progress)]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert stream.done.status == "completed"


async def test_voices_with_and_without_transcript_and_free_scene(server: Any) -> None:
    async with connect(server.url) as client:
        for voice in ("belinda", "no_transcript"):
            result = await speak(
                client, "Good morning.", voice=voice, scene="On a windy beach.", max_new_tokens=12
            )
            assert result.status == "completed" and result.frames == (12 - K) * HOP


async def test_uploaded_reference_voice(server: Any) -> None:
    async with connect(server.url) as client:
        with_text = await speak(
            client,
            "Nice to meet you.",
            reference=tone(1.0, rate=44100, fmt="OGG"),
            reference_text="This is my voice.",
            max_new_tokens=16,
            seed=2,
        )
        without = await speak(
            client, "Nice to meet you.", reference=tone(1.0, rate=8000), max_new_tokens=16, seed=2
        )
        assert with_text.status == without.status == "completed"
        assert with_text.frames == without.frames == (16 - K) * HOP
        # the reference is in the prompt: a different voice, different audio
        plain = await speak(client, "Nice to meet you.", max_new_tokens=16, seed=2)
        assert plain.pcm != with_text.pcm


async def test_dialogue_chunked_by_speaker_streams_across_chunks(server: Any) -> None:
    text = "[SPEAKER0] Hi, are you there?\n[SPEAKER1] Yes! Over here.\n[SPEAKER0] Great."
    async with connect(server.url) as client:
        stream = await client.speak(
            "tiny-higgs",
            text,
            voice=["belinda", "broom_salesman"],
            chunk_method="speaker",
            max_new_tokens=20,
            seed=5,
            format="pcm_f32le",
        )
        chunks = [e async for e in stream if isinstance(e, Audio)]
        assert stream.done.status == "completed"
        # three turns, one after another in one contiguous stream
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        total = sum(len(c.data) // 4 for c in chunks)
        assert total == 3 * (20 - K) * HOP
        assert [c.offset for c in chunks] == list(
            np.cumsum([0, *[len(c.data) // 4 for c in chunks[:-1]]])
        )
        # two turns merged per chunk: two chunks
        merged = await speak(
            client, text, chunk_method="speaker", chunk_max_num_turns=2, max_new_tokens=20
        )
        assert merged.frames == 2 * (20 - K) * HOP
        # no voices: the model picks them (multi-speaker system prompt)
        plain = await speak(client, text, max_new_tokens=10)
        assert plain.status == "completed" and plain.frames == (10 - K) * HOP


async def test_word_chunks_and_chunk_buffer(server: Any) -> None:
    text = "one two three four five six seven\n\n今天天气很好"
    async with connect(server.url) as client:
        result = await speak(
            client, text, chunk_method="word", chunk_max_word_num=3, max_new_tokens=10
        )
        # "one two three", "four five six", "seven", "今天天", "气很好"
        assert result.frames == 5 * (10 - K) * HOP
        buffered = await speak(
            client,
            text,
            chunk_method="word",
            chunk_max_word_num=3,
            max_new_tokens=10,
            generation_chunk_buffer_size=1,
            seed=9,
        )
        full = await speak(
            client, text, chunk_method="word", chunk_max_word_num=3, max_new_tokens=10, seed=9
        )
        assert buffered.frames == full.frames
        # the first two chunks see the same context; later ones see less with a buffer of 1
        two = 2 * (10 - K) * HOP * 2
        assert same_audio(buffered.pcm[:two], full.pcm[:two])
        assert buffered.pcm != full.pcm


async def test_speech_at_telephones_rate(server: Any) -> None:
    """8 kHz from the 24 kHz codec, a dialogue in two chunks: the stream runs on
    across the chunks at the rate asked for, and is the model's own resampled."""
    text = "[SPEAKER0] Hello there.\n[SPEAKER1] Hi!"
    kwargs: dict[str, Any] = dict(chunk_method="speaker", max_new_tokens=12, seed=4)
    async with connect(server.url) as client:
        own = await speak(client, text, format="pcm_f32le", **kwargs)
        low = await speak(client, text, sample_rate=8000, format="pcm_f32le", **kwargs)
        coded = await speak(client, text, sample_rate=8000, format="pcm_mulaw", **kwargs)
    assert (own.sample_rate, low.sample_rate, coded.sample_rate) == (24000, 8000, 8000)
    assert own.frames == 2 * (12 - K) * HOP and low.frames == coded.frames == own.frames // 3
    # (Chunks fall otherwise from run to run: float rounding, a few 1e-7.)
    assert np.abs(low.to_numpy() - resample(own.to_numpy(), 24000, 8000)).max() <= 1e-5
    # mu-law, a byte a sample: those samples coded (a level apart at most, where
    # such rounding moved a 16-bit sample across a level's edge)
    assert len(coded.pcm) == coded.frames
    sixteen = np.rint(np.clip(low.to_numpy()[:, 0], -1, 1) * 32767).astype(np.int32)
    levels = np.unique(g711_table("pcm_mulaw"))
    as_coded = g711_table("pcm_mulaw")[mulaw(sixteen)]
    apart = np.searchsorted(levels, coded.to_numpy()[:, 0]) - np.searchsorted(levels, as_coded)
    assert np.abs(apart).max() <= 1 and np.mean(apart == 0) > 0.95


async def test_seeds_reproduce(server: Any) -> None:
    async with connect(server.url) as client:
        a = await speak(client, "Same words.", voice="belinda", seed=42, max_new_tokens=15)
        b = await speak(client, "Same words.", voice="belinda", seed=42, max_new_tokens=15)
        c = await speak(client, "Same words.", voice="belinda", seed=43, max_new_tokens=15)
        assert same_audio(a.pcm, b.pcm) and a.seed == 42
        assert a.pcm != c.pcm


async def test_an_utterance_resumed_is_the_rest_of_it(server: Any) -> None:
    """generate.resume (§3.1): the speech made again, text chunk by chunk, and sent
    from the frame asked for (here in its third chunk, of five)."""
    text = "one two three four five six seven\n\n今天天气很好"
    asked = {"chunk_method": "word", "chunk_max_word_num": 3, "max_new_tokens": 10, "seed": 9}
    async with connect(server.url) as client:
        whole = await speak(client, text, **asked)
        resume = 2 * (10 - K) * HOP + 5
        stream = await client.speak("tiny-higgs", text, **asked, resume=resume)
        events = [event async for event in stream]
        audio = [e for e in events if isinstance(e, Audio)]
        assert audio[0].offset == resume and audio[0].seq == 0
        assert same_audio(b"".join(a.data for a in audio), whole.pcm[2 * resume :])
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        assert events[-1].stats is not None and events[-1].stats.samples == whole.frames


async def test_cancel_stops_within_a_step(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.speak("tiny-higgs", "A very long story. " * 20)
        async for event in stream:
            if isinstance(event, Audio):
                await stream.cancel()
                break
        result = await asyncio.wait_for(stream.collect(), timeout(10))
        assert result.status == "cancelled"
        assert result.stats is not None and result.stats.audio_seconds < 30
        # the server goes on serving
        ok = await speak(client, "Still here.", max_new_tokens=8)
        assert ok.status == "completed"


async def test_disconnect_stops_speech(server: Any) -> None:
    steps = await steps_after_disconnect(
        server,
        lambda client: client.speak("tiny-higgs", "A long story. " * 40, max_new_tokens=2048),
    )
    assert steps < 1000  # of the 2048 the request would have taken


@pytest.mark.parametrize(
    ("kwargs", "inputs", "code", "field"),
    [
        ({"voice": "nobody"}, None, "invalid_field", "params.voice"),
        ({"chunk_method": "paragraph"}, None, "invalid_field", "params.chunk_method"),
        ({"temperature": 3.0}, None, "invalid_field", "params.temperature"),
        ({"max_new_tokens": 2049}, None, "invalid_field", "params.max_new_tokens"),
        ({"reference_text": "hi"}, None, "invalid_field", "params.reference_text"),
        ({}, {"reference": b"RIFF....not a wav"}, "invalid_field", "inputs.reference"),
        ({}, {"reference": tone(70.0, rate=8000)}, "invalid_field", "inputs.reference"),
        ({}, {"reference": tone(0.01)}, "invalid_field", "inputs.reference"),
        ({}, {"melody": tone(1.0)}, "unsupported", "inputs.melody"),
        ({"duration": 3.0}, None, "invalid_field", "params.duration"),
    ],
)
async def test_bad_requests_get_typed_errors(
    server: Any, kwargs: dict[str, Any], inputs: Any, code: str, field: str
) -> None:
    async with connect(server.url) as client:
        stream = await client.generate(
            "tiny-higgs", "Hello.", params={"max_new_tokens": 8, **kwargs}, inputs=inputs
        )
        events = [event async for event in stream]
        # Refused before it was queued: its `done` is all it gets.
        assert len(events) == 1 and isinstance(events[0], Done), events
        result = events[0]
        assert result.status == "error" and result.error is not None and result.stats is None
        assert (result.error.code, result.error.field) == (code, field)
        ok = await speak(client, "Hello.", max_new_tokens=8)
        assert ok.status == "completed"


async def test_a_speech_stream_picked_up_from_its_codes_is_the_rest_of_the_whole_one(
    server: Any,
) -> None:
    """A dialogue in chunks, cut in its second chunk: the rows its first
    messages sent (their codes) pick it up, and the rest is the whole stream's,
    its codes too; the seconds taken from them are counted."""
    metric = 'wavecast_resumed_from_codes_seconds_total{model="tiny-higgs"}'
    async with connect(server.url, retry_for=5) as client:
        info = client.models["tiny-higgs"]
        assert "codes" in info.capabilities and info.codebooks == K
        text = "[SPEAKER0] Hello there.\n[SPEAKER1] Who is it?\n[SPEAKER0] Only me."
        asked = {"max_new_tokens": 20, "seed": 5, "chunk_method": "speaker"}
        stream = await client.speak("tiny-higgs", text, **asked)
        assert stream.generate is not None and stream.generate.codes  # (it retries)
        whole = [e async for e in stream if isinstance(e, Audio)]
        joined = b"".join(a.codes or b"" for a in whole)
        assert len(joined) == 3 * 20 * K * 2  # (three chunks of 20 rows)
        # The codes always cover the audio: a frame needs its row and K - 1 more.
        rows = 0
        for a in whole:
            rows += len(a.codes or b"") // (2 * K)
            assert (rows - K) * HOP >= a.offset + a.frames
        pcm = b"".join(a.data for a in whole)
        # Cut once the client has 27 rows (the second chunk's seventh).
        have: list[Audio] = []
        while len(b"".join(a.codes or b"" for a in have)) < 27 * K * 2:
            have.append(whole[len(have)])
        resume = have[-1].offset + have[-1].frames
        codes = b"".join(a.codes or b"" for a in have)
        before, _ = await scrape(server.port)
        again = await client.speak("tiny-higgs", text, **asked, resume=resume, resume_codes=codes)
        events = [event async for event in again]
        rest = [e for e in events if isinstance(e, Audio)]
        assert rest[0].offset == resume
        assert same_audio(b"".join(a.data for a in rest), pcm[2 * resume :])
        assert codes + b"".join(a.codes or b"" for a in rest) == joined
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        await server.scheduler.wait_idle(5)
        after, _ = await scrape(server.port)
    # The known rows' frames: the first chunk's 20 - K, and the second's, a
    # frame a row from its K-th on.
    known = len(codes) // (2 * K)
    assert after.get(metric, 0.0) - before.get(metric, 0.0) == pytest.approx((known - 2 * K) / 25)


@pytest.mark.parametrize("format", ["mp3", "opus", "flac"])
async def test_a_speech_file_picked_up_in_its_second_chunk_is_the_whole_one(
    server: Any, format: str
) -> None:
    """A dialogue's file (at the model's 24 kHz) cut in its second chunk and
    picked up from its codes and bytes: the rows after them are the whole
    stream's, and the file joined decodes to the whole one's audio (FLAC within
    a step; MP3 and Opus, begun again a few frames before the cut from audio
    decoded again from there, within their rounding)."""
    from wavecast.clients.client import decode_file

    async with connect(server.url) as client:
        text = "[SPEAKER0] Hello there.\n[SPEAKER1] Who is it?\n[SPEAKER0] Only me."
        asked = {"max_new_tokens": 20, "seed": 5, "chunk_method": "speaker"}
        stream = await client.speak("tiny-higgs", text, **asked, format=format, codes=True)
        whole = [e async for e in stream if isinstance(e, Audio)]
        file, joined = b"".join(a.data for a in whole), b"".join(a.codes or b"" for a in whole)
        have: list[Audio] = []  # (cut once the client has 27 rows: the second chunk's seventh)
        while len(b"".join(a.codes or b"" for a in have)) < 27 * K * 2:
            have.append(whole[len(have)])
        had, codes = b"".join(a.data for a in have), b"".join(a.codes or b"" for a in have)
        again = await client.speak(
            "tiny-higgs",
            text,
            **asked,
            format=format,
            codes=True,
            resume=len(had),
            resume_until=have[-1].until,
            resume_codes=codes,
        )
        events = [event async for event in again]
        rest = [e for e in events if isinstance(e, Audio)]
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        assert rest[0].offset == len(had)
        assert codes + b"".join(a.codes or b"" for a in rest) == joined
        expected = decode_file(file, format).astype(np.float64)
        heard = decode_file(had + b"".join(a.data for a in rest), format).astype(np.float64)
        assert heard.shape == expected.shape
        assert np.abs(heard - expected).max() <= (1 if format == "flac" else 0.02)


async def test_speech_codes_that_cannot_be_kept_are_refused(server: Any) -> None:
    async with connect(server.url) as client:
        asked = {"max_new_tokens": 8, "seed": 3}
        for codes, says in (
            (b"\0" * 6, "whole timesteps"),
            (np.full((2, K), 66, "<u2").tobytes(), "below 66"),
            (np.zeros((9, K), "<u2").tobytes(), "draws 8 at most"),
        ):
            stream = await client.generate(
                "tiny-higgs", "Hello.", params=asked, resume=10, resume_codes=codes
            )
            result = await stream.collect()
            assert result.error is not None, says
            assert (result.error.code, result.error.field) == ("invalid_field", "resume_codes")
            assert says in result.error.message


async def test_empty_text_and_reference_on_music_model(server: Any) -> None:
    async with connect(server.url) as client:
        events = [event async for event in await client.speak("tiny-higgs", "   ")]
        assert len(events) == 1 and isinstance(events[0], Done)  # refused before `queued`
        empty = events[0]
        assert empty.error is not None and empty.error.field == "prompt"
        # Speaker tags and nothing for them to say: as empty.
        tags = [
            event async for event in await client.speak("tiny-higgs", "[SPEAKER0]\n[SPEAKER1] ")
        ]
        assert len(tags) == 1 and isinstance(tags[0], Done), tags
        assert tags[0].error is not None and tags[0].error.field == "prompt"
        assert "empty" in tags[0].error.message
        music = await (
            await client.generate("tiny-musicgen", "x", inputs={"reference": tone(1.0)})
        ).collect()
        assert music.error is not None
        assert (music.error.code, music.error.field) == ("unsupported", "inputs.reference")


async def test_two_speakers_interleave(server: Any) -> None:
    async with connect(server.url) as client:
        solo = await speak(client, "First.", seed=3, max_new_tokens=25)
        streams = [
            await client.speak("tiny-higgs", "First.", seed=3, max_new_tokens=25),
            await client.speak("tiny-higgs", "Second.", seed=4, max_new_tokens=25),
        ]
        results = await asyncio.gather(*(s.collect() for s in streams))
        assert all(r.status == "completed" for r in results)
        assert same_audio(results[0].pcm, solo.pcm)


async def test_cli_speak(server: Any, voices_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    code, output = await run_cli(
        "speak",
        "--url",
        server.url,
        "--voice",
        "belinda",
        "--scene",
        "quiet_indoor",
        "--max-new-tokens",
        "20",
        "--seed",
        "3",
        "-o",
        str(out),
        "Hello from the command line.",
    )
    assert code == 0, output
    assert "random-weight test model" in output
    audio, rate = soundfile.read(out)
    assert rate == 24000 and len(audio) == (20 - K) * HOP
    ref = tmp_path / "me.wav"
    ref.write_bytes(tone(1.0))
    code, output = await run_cli(
        "speak",
        "--url",
        server.url,
        "--ref",
        str(ref),
        "--ref-text",
        "It is me.",
        "--max-new-tokens",
        "10",
        "-o",
        str(out),
        "Cloned.",
    )
    assert code == 0, output
    code, output = await run_cli(
        "speak", "--url", server.url, "--voice", "nobody", "-o", str(out), "Hi."
    )
    assert code == 1 and "params.voice" in output


async def test_an_utterance_too_short_for_a_frame_completes_empty(server: Any) -> None:
    async with connect(server.url) as client:
        result = await speak(client, "Hi.", max_new_tokens=K)
        assert result.status == "completed" and result.frames == 0
        assert result.stats is not None and result.stats.first_audio_seconds is None
