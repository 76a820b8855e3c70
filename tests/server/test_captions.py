"""Which text the audio speaks (``generate.captions``, PROTOCOL.md §4.9): a
``caption`` ahead of each text chunk's audio, at the sample frame it begins,
through the real server and client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import higgs_engines, make_config, run_cli, running_server

from wavecast.clients import connect
from wavecast.protocol import Audio, Caption, Done

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOP = 960  # tiny-higgs: 24 kHz, 25 frames a second
SENTENCES = ["One two three.", "Four five six.", "Seven eight nine."]
TEXT = " ".join(SENTENCES)
# Chunked by three words: the chunks are the sentences, each of 36 frames
# (max_new_tokens rows less the delay pattern's four).
CHUNKING = {"chunk_method": "word", "chunk_max_word_num": 3, "max_new_tokens": 40, "seed": 7}
CHUNK = 36 * HOP


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[Any]:
    async with running_server(make_config(max_active=4), higgs_engines) as srv:
        yield srv


async def events_of(url: str, text: str = TEXT, **kwargs: Any) -> list[Any]:
    async with connect(url) as client:
        stream = await client.speak("tiny-higgs", text, **{**CHUNKING, **kwargs})
        return [event async for event in stream]


def heard_before(events: list[Any]) -> list[tuple[Caption, int]]:
    """Each caption, and the sample frames of audio that came before it."""
    out, frames = [], 0
    for event in events:
        if isinstance(event, Audio):
            frames += event.frames
        elif isinstance(event, Caption):
            out.append((event, frames))
    return out


async def test_each_chunk_is_captioned_ahead_of_its_audio(server: Any) -> None:
    """A caption a text chunk, its text as the server cut it, at the sample
    frame its audio begins (the frames of the chunks before it), sent before
    that frame's audio; none where not asked for."""
    events = await events_of(server.url, captions=True)
    done = events[-1]
    assert isinstance(done, Done) and done.status == "completed"
    assert done.stats is not None and done.stats.samples == 3 * CHUNK
    captions = heard_before(events)
    assert [(c.text, c.offset) for c, _ in captions] == [
        (sentence, i * CHUNK) for i, sentence in enumerate(SENTENCES)
    ]
    assert all(heard <= caption.offset for caption, heard in captions)
    plain = await events_of(server.url)
    assert not any(isinstance(e, Caption) for e in plain)
    # (the same audio: captions change nothing else)
    assert b"".join(e.data for e in plain if isinstance(e, Audio)) == b"".join(
        e.data for e in events if isinstance(e, Audio)
    )


async def test_at_another_rate_a_caption_counts_that_rates_frames(server: Any) -> None:
    events = await events_of(server.url, captions=True, sample_rate=16000)
    offsets = [c.offset for c, _ in heard_before(events)]
    assert offsets == [i * CHUNK * 2 // 3 for i in range(3)]
    assert sum(e.frames for e in events if isinstance(e, Audio)) == 3 * CHUNK * 2 // 3


async def test_a_stream_picked_up_is_captioned_from_where_it_was_cut(server: Any) -> None:
    """``resume`` in the second chunk: the third chunk's caption, not the ones
    whose audio began before the cut (the cut try sent those)."""
    events = await events_of(server.url, captions=True, resume=CHUNK + 5 * HOP)
    assert [(c.text, c.offset) for c, _ in heard_before(events)] == [(SENTENCES[2], 2 * CHUNK)]


async def test_the_client_keeps_them_and_writes_webvtt(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.speak("tiny-higgs", TEXT, captions=True, **CHUNKING)
        result = await stream.collect()
    assert [c.text for c in result.captions] == SENTENCES
    assert result.webvtt() == (
        "WEBVTT\n\n"
        "1\n00:00:00.000 --> 00:00:01.440\nOne two three.\n\n"
        "2\n00:00:01.440 --> 00:00:02.880\nFour five six.\n\n"
        "3\n00:00:02.880 --> 00:00:04.320\nSeven eight nine.\n"
    )


async def test_a_model_without_them_refuses_them(server: Any) -> None:
    async with connect(server.url) as client:
        assert "captions" in client.models["tiny-higgs"].capabilities
        assert "captions" not in client.models["tiny-musicgen"].capabilities
        stream = await client.generate("tiny-musicgen", "x", duration=0.5, captions=True)
        result = await stream.collect()
    assert result.status == "error" and result.error is not None
    assert result.error.code == "unsupported" and result.error.field == "captions"


async def test_the_command_writes_them_beside_the_audio(server: Any, tmp_path: Path) -> None:
    out, vtt = tmp_path / "said.wav", tmp_path / "said.vtt"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CHUNKING.items()]
    code, output = await run_cli(
        "speak", TEXT, "--url", server.url, *args, "-o", str(out), "--captions", str(vtt)
    )
    assert code == 0, output
    assert "wrote" in output and "(3 captions)" in output
    cues = vtt.read_text(encoding="utf-8").split("\n\n")
    assert cues[0] == "WEBVTT" and len(cues) == 4
    assert cues[3] == "3\n00:00:02.880 --> 00:00:04.320\nSeven eight nine.\n"
