"""Streams as compressed files: MP3, Ogg Opus and FLAC (PROTOCOL.md §4.5)."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from helpers import higgs_engines, make_config, running_server, timeout

from wavecast.clients import connect
from wavecast.clients.client import GenerationResult, decode_file, flac_with_length
from wavecast.protocol import (
    Audio,
    Caption,
    Done,
    ErrorInfo,
    InvalidField,
    Progress,
    ServerMessage,
    Started,
    Waiting,
    WavecastError,
)
from wavecast.server import encode
from wavecast.server.encode import (
    WARM_FRAMES,
    EncodedStream,
    Encoder,
    Silences,
    _coded_number,
    encoded_rate,
    frame_size,
    warm_start,
)

# The tests with the module's server run on the module's event loop, as it does.
on_the_servers_loop = pytest.mark.asyncio(loop_scope="module")

MP3_DELAY = 1105  # LAME's encoder delay, in samples, at every rate


def music(rate: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """A tone and a little noise: something a lossy codec keeps recognisably."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 330 * t)[:, None] * np.linspace(1, 0.5, channels)
    noise = 0.02 * rng.standard_normal((t.size, channels))
    return (tone + noise).astype(np.float32)


def encode_in(format: str, rate: int, audio: np.ndarray[Any, Any], cuts: list[int]) -> bytes:
    encoder = Encoder(format, rate, audio.shape[1])
    parts, start = [], 0
    for end in [*cuts, audio.shape[0]]:
        parts.append(encoder.push(audio[start:end]))
        start = end
    return b"".join(parts) + encoder.close()


def band_levels(audio: np.ndarray[Any, Any], rate: int, top: float) -> np.ndarray[Any, Any]:
    """The power in twelve bands, spaced evenly in pitch from 300 Hz to ``top``, in dB."""
    mono = audio.astype(np.float64).mean(axis=1)
    frames = mono[: mono.size // 1024 * 1024].reshape(-1, 1024) * np.hanning(1024)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
    frequency = np.fft.rfftfreq(1024, 1 / rate)
    edges = np.geomspace(300, top, 13)
    return np.array(
        [
            10 * np.log10(power[(frequency >= lo) & (frequency < hi)].sum() + 1e-12)
            for lo, hi in itertools.pairwise(edges)
        ]
    )


def snr(reference: np.ndarray[Any, Any], decoded: np.ndarray[Any, Any]) -> float:
    error = reference - decoded
    return float(10 * np.log10((reference**2).sum() / max((error**2).sum(), 1e-20)))


# Each format at a few of its rates, mono and stereo.
FILES = [
    ("flac", 32000, 1),
    ("flac", 44100, 2),
    ("opus", 48000, 1),
    ("opus", 24000, 2),
    ("opus", 8000, 1),
    ("mp3", 32000, 1),
    ("mp3", 24000, 2),
    ("mp3", 8000, 1),
]


@pytest.mark.parametrize(("format", "rate", "channels"), FILES)
def test_a_stream_is_one_file_whatever_its_chunks(format: str, rate: int, channels: int) -> None:
    """The bytes of a stream's file do not depend on how its audio was cut (one
    push, or a few hundred of random sizes and empty ones), and the file decodes
    to the audio: FLAC to its 16-bit samples exactly, Opus to the same number of
    samples, MP3 after its encoder's delay; both lossy ones close to it."""
    audio = music(rate, 2.0, channels)
    whole = encode_in(format, rate, audio, [])
    rng = np.random.default_rng(rate + channels)
    cuts = sorted(int(c) for c in rng.integers(0, audio.shape[0], 200))
    assert encode_in(format, rate, audio, cuts) == whole
    decoded = decode_file(whole, format)
    assert decoded.shape[1] == channels
    if format == "flac":
        expected = np.rint(np.clip(audio, -1, 1) * 32767).astype(np.int16)
        assert decoded.dtype == np.int16 and np.array_equal(decoded, expected)
        return
    if format == "opus":
        assert decoded.shape[0] == audio.shape[0]
        assert snr(audio, decoded) > 15
    else:
        frames = -(-(audio.shape[0] + MP3_DELAY) // 1152)  # (whole frames, at least)
        assert frames * 1152 <= decoded.shape[0] <= (frames + 2) * 1152
        assert snr(audio, decoded[MP3_DELAY : MP3_DELAY + audio.shape[0]]) > 15


def pieces_in(
    format: str, rate: int, audio: np.ndarray[Any, Any], step: int, start: int = 0
) -> list[tuple[bytes, int]]:
    """The file's pieces, its encoder begun at the stream's frame ``start``."""
    encoder = Encoder(format, rate, audio.shape[1], start=start)
    pieces = []
    for at in range(start, audio.shape[0], step):
        pieces += encoder.push_pieces(audio[at : at + step])
    return pieces + encoder.close_pieces()


@pytest.mark.parametrize(("format", "rate", "channels"), FILES)
def test_a_file_made_again_goes_on_from_any_packet(format: str, rate: int, channels: int) -> None:
    """A stream picked up is encoded again from its start, from audio that may
    differ by a rounding (here, noise of 3e-6: thirty times the codec's), and
    its file goes on from the packet after the client's (``until``). The
    pieces end at the same frames in both files; the file joined decodes as
    close to the first as the second does (FLAC: the first's samples up to the
    cut, the second's after; MP3's frames spend no bits of the frames before
    them, where a bit reservoir's did, and the join lost a frame to noise). A
    file made again from ``WARM_FRAMES`` of its codec's frames before the cut,
    not from its start (Ogg's pages and FLAC's frames numbered on), joins into
    a file as true to the audio as the whole one, near the join too; FLAC's
    frames are the file made again from its start's, byte for byte."""
    audio = music(rate, 3.0, channels, seed=rate)
    noise = np.random.default_rng(1).standard_normal(audio.shape) * 3e-6
    first = pieces_in(format, rate, audio, 1000)
    noisy = (audio + noise).astype(np.float32)
    again = pieces_in(format, rate, noisy, 777)
    untils = [until for _, until in first]  # (each piece's own: a client's bytes tell it)
    assert untils[0] >= 0 and all(a < b for a, b in itertools.pairwise(untils))
    assert untils[-1] == audio.shape[0]
    assert set(untils[1:]) <= {until for _, until in again}  # (the same packets' ends)
    whole = decode_file(b"".join(data for data, _ in first), format).astype(np.float64)
    remade = decode_file(b"".join(data for data, _ in again), format).astype(np.float64)
    assert remade.shape == whole.shape
    apart = np.abs(remade - whole).max()  # (FLAC: in 16-bit steps)
    assert 0 < apart < (2 if format == "flac" else 0.2)
    for cut in range(1, len(first), max(1, len(first) // 7)):
        had, until = b"".join(data for data, _ in first[:cut]), first[cut - 1][1]
        joined = had + b"".join(data for data, end in again if end > until)
        decoded = decode_file(joined, format).astype(np.float64)
        assert decoded.shape == whole.shape
        assert np.abs(decoded - whole).max() <= apart + 1e-6, cut
        if format == "flac":
            assert np.array_equal(decoded[:until], whole[:until])
            assert np.array_equal(decoded[until:], remade[until:])
        frame = frame_size(format, rate)
        start = max(0, until // frame - WARM_FRAMES) * frame
        warm = pieces_in(format, rate, noisy, 777, start=start)
        joined = had + b"".join(data for data, end in warm if end > until)
        decoded = decode_file(joined, format).astype(np.float64)
        assert decoded.shape == whole.shape
        if format == "flac":
            assert [p for p in warm if p[1] > until] == [p for p in again if p[1] > until]
            assert np.array_equal(decoded[:until], whole[:until])
            assert np.array_equal(decoded[until:], remade[until:])
        else:
            # As true to the audio as the whole file, at the join too (a fresh
            # encoder's packets, Opus' rate control its own: not the same bits).
            lag = MP3_DELAY if format == "mp3" else 0
            heard, kept = decoded[lag:][: len(audio)], whole[lag:][: len(audio)]
            assert snr(audio, heard) >= snr(audio, kept) - 0.5, cut
            near = slice(max(0, until - 3 * frame), until + 3 * frame)
            error = np.sqrt(((heard[near] - audio[near]) ** 2).mean())
            assert error <= 1.5 * np.sqrt(((kept[near] - audio[near]) ** 2).mean()), cut


def test_flac_frames_numbered_on_are_the_whole_files_byte_for_byte() -> None:
    """A FLAC file begun again at a frame past the first 127 (whose numbers
    its frame headers code in one byte) and past 2,047 (two): each frame
    numbered on, its CRC-8 and CRC-16 computed again, is the whole file's,
    byte for byte; a frame's number coded as UTF-8 codes a character."""
    for number in (0, 127, 128, 2047, 2048, 65535, 65536, 0x10FFFF):
        assert _coded_number(number) == chr(number).encode("utf-8", "surrogatepass")
    assert _coded_number(2**36 - 1) == b"\xfe" + b"\xbf" * 6
    audio = music(8000, 3000 * 576 / 8000 + 0.01, 1)
    frame = frame_size("flac", 8000)
    assert frame == 576

    def pieces(start: int) -> list[tuple[bytes, int]]:
        encoder = Encoder("flac", 8000, 1, start=start)
        return encoder.push_pieces(audio[start:]) + encoder.close_pieces()

    whole = dict((until, data) for data, until in pieces(0))
    assert len(whole) == 3001
    for first in (1, 127, 128, 2047, 2048, 2990):
        again = pieces(first * frame)
        assert again[0][0].startswith(b"fLaC")  # (the header, with the first frame)
        assert all(whole[until] == data for data, until in again[1:])


def test_a_streamed_flac_gets_its_length_for_libsndfile() -> None:
    """A streamed FLAC's header says its length is unknown; libsndfile (soundfile)
    needs it: ``flac_with_length`` fills it in, and then it reads."""
    audio = music(32000, 1.0, 2)
    data = encode_in("flac", 32000, audio, [3000])
    with pytest.raises(ValueError, match="too big"):  # (its frame count reads as huge)
        soundfile.read(io.BytesIO(data), dtype="int16")
    read, rate = soundfile.read(io.BytesIO(flac_with_length(data, 32000)), dtype="int16")
    assert rate == 32000 and np.array_equal(read, decode_file(data, "flac"))
    assert flac_with_length(b"not flac", 5) == b"not flac"


def test_a_result_saves_as_its_files_name_asks(tmp_path: Any) -> None:
    """``save`` writes what a path's name asks for: PCM as WAV, FLAC, MP3 (and as
    Opus only at a rate Opus takes); an MP3 stream as it came where the name
    says MP3 or nothing known, else decoded into WAV or FLAC."""
    audio = music(32000, 1.0, 1)
    pcm = np.rint(audio * 32767).astype("<i2").tobytes()
    result = GenerationResult("r", "completed", pcm, 32000, 1, "pcm_s16le")
    for name, kind in (("a.wav", "WAV"), ("a.flac", "FLAC"), ("a.mp3", "MP3"), ("a", "WAV")):
        result.save(tmp_path / name)
        info = soundfile.info(str(tmp_path / name))
        assert (info.format, info.samplerate, info.frames) == (kind, 32000, 32000)
    read, _ = soundfile.read(str(tmp_path / "a.flac"), dtype="int16", always_2d=True)
    assert np.array_equal(read, result.to_numpy())
    with pytest.raises(ValueError, match="Opus"):
        result.save(tmp_path / "a.opus")
    mp3 = encode_in("mp3", 32000, audio, [])
    result = GenerationResult("r", "completed", mp3, 32000, 1, "mp3")
    for name in ("b.mp3", "b.bin"):
        result.save(tmp_path / name)
        assert (tmp_path / name).read_bytes() == mp3
    decoded = result.to_numpy()
    for name, kind in (("b.wav", "WAV"), ("b.flac", "FLAC")):
        result.save(tmp_path / name)
        read, rate = soundfile.read(str(tmp_path / name), dtype="int16", always_2d=True)
        assert soundfile.info(str(tmp_path / name)).format == kind and rate == 32000
        expected = np.rint(np.clip(decoded, -1, 1) * 32767)
        assert read.shape == decoded.shape and np.abs(read - expected).max() <= 1


@pytest.mark.parametrize(
    ("format", "model", "asked", "rate"),
    [
        ("opus", 32000, None, 48000),
        ("opus", 24000, None, 24000),
        ("opus", 32000, 16000, 16000),
        ("mp3", 32000, None, 32000),
        ("mp3", 96000, None, 48000),
        ("mp3", 24000, 44100, 44100),
        ("flac", 32000, None, 32000),
        ("flac", 32000, 192000, 192000),
        ("pcm_s16le", 32000, None, 32000),
    ],
)
def test_the_rate_of_an_encoded_stream(format: str, model: int, asked: Any, rate: int) -> None:
    assert encoded_rate(format, model, asked) == rate


@pytest.mark.parametrize(("format", "asked"), [("opus", 44100), ("opus", 32000), ("mp3", 96000)])
def test_a_rate_the_codec_does_not_take_is_refused(format: str, asked: int) -> None:
    with pytest.raises(InvalidField) as caught:
        encoded_rate(format, 32000, asked)
    assert caught.value.field == "sample_rate" and format in caught.value.message


class Received:
    """A request's messages as ``EncodedStream`` hands them on, and its errors."""

    def __init__(self) -> None:
        self.messages: list[ServerMessage] = []
        self.errors: list[WavecastError] = []
        self.done = asyncio.Event()

    def __call__(self, message: ServerMessage) -> None:
        self.messages.append(message)
        if isinstance(message, Done):
            self.done.set()


def pcm_chunks(audio: np.ndarray[Any, Any], rate: int, sizes: list[int], rendition: Any = None):
    offset = 0
    for seq, size in enumerate(sizes):
        chunk = audio[offset : offset + size]
        yield Audio(
            id="r",
            seq=seq,
            offset=offset,
            sample_rate=rate,
            channels=audio.shape[1],
            format="pcm_f32le",
            data=chunk.astype("<f4").tobytes(),
            rendition=rendition,
        )
        offset += size


async def test_the_encoded_stream_keeps_the_messages_order_and_joins_into_files() -> None:
    """Started says the format; the audio comes as files (the live one, then the
    rendition's), their chunks' offsets counting bytes; a progress between
    chunks, the stage's change and the done keep their places; the live file
    ends before the next stage's first message."""
    live, mbd = music(32000, 1.5, 1), music(32000, 1.5, 1, seed=1)
    received = Received()
    spans: list[tuple[str | None, tuple[float, float]]] = []

    def sink(message: ServerMessage) -> None:
        if isinstance(message, Audio):  # (what its bytes play, as the session asks)
            spans.append((message.rendition, stream.span_of(message)))
        received(message)

    stream = EncodedStream("r", "flac", sink, received.errors.append)
    stream(Started(id="r", model="m", sample_rate=32000, channels=1, format="pcm_f32le"))
    sizes = [640, 1280, 0, 7000, 20000, live.shape[0] - 28920]
    for i, chunk in enumerate(pcm_chunks(live, 32000, sizes)):
        stream(chunk)
        if i == 2:
            stream(Progress(id="r", fraction=0.5, seconds=0.6))
    stream(Progress(id="r", fraction=1.0, seconds=1.5))
    stream(Progress(id="r", fraction=0.0, seconds=1.5, stage="mbd"))
    for chunk in pcm_chunks(mbd, 32000, [32000, mbd.shape[0] - 32000], rendition="mbd"):
        stream(chunk)
    stream(Done(id="r", status="completed"))
    await asyncio.wait_for(received.done.wait(), timeout(10))
    kinds = [f"audio:{m.rendition}" if isinstance(m, Audio) else m.type for m in received.messages]
    assert kinds[0] == "started" and kinds[-1] == "done" and not received.errors
    assert received.messages[0].format == "flac"  # type: ignore[union-attr]
    stage = next(i for i, m in enumerate(received.messages) if isinstance(m, Progress) and m.stage)
    assert set(kinds[1:stage]) == {"audio:None", "progress"}
    assert set(kinds[stage + 1 : -1]) == {"audio:mbd"}
    for name, source in ((None, live), ("mbd", mbd)):
        chunks = [m for m in received.messages if isinstance(m, Audio) and m.rendition == name]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert [c.offset for c in chunks] == [
            sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))
        ]
        assert {c.format for c in chunks} == {"flac"}
        expected = np.rint(np.clip(source, -1, 1) * 32767).astype(np.int16)
        assert np.array_equal(decode_file(b"".join(c.data for c in chunks), "flac"), expected)
        # Each chunk's audio, in order, from the file's start to its end.
        parts = [span for rendition, span in spans if rendition == name]
        assert len(parts) == len(chunks) and parts[-1][1] == 1.5
        assert all(start <= end for start, end in parts)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))


async def test_encoding_that_falls_behind_ends_the_request_with_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the backlog bound, no more audio: the request is asked to end
    (``busy``), and what the scheduler sends then (its done) still comes."""
    monkeypatch.setattr(encode, "MAX_BACKLOG_SECONDS", 0.5)
    received = Received()
    stream = EncodedStream("r", "opus", received, received.errors.append)
    stream(Started(id="r", model="m", sample_rate=48000, channels=1, format="pcm_f32le"))
    for chunk in pcm_chunks(music(48000, 2.0, 1), 48000, [4800] * 20):
        stream(chunk)  # (all at once, on the event loop: the encoders cannot have kept up)
    assert [e.code for e in received.errors] == ["busy"]
    stream(Done(id="r", status="error", error=ErrorInfo("busy", "behind")))
    await asyncio.wait_for(received.done.wait(), timeout(10))
    audio = [m for m in received.messages if isinstance(m, Audio)]
    assert sum(len(m.data) for m in audio) < 12000  # (a part: what was already encoding)


async def test_a_stream_behind_its_encoders_says_so_until_they_catch_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``behind``: more than ``HOLD_SECONDS`` of live audio not yet encoded (the
    scheduler then leaves the request out of its steps); not once the encoders
    have caught up, nor for a second version, which comes whole and is as long
    as the stream (neither held nor bounded: 2 s of it pass a 0.5 s bound)."""
    monkeypatch.setattr(encode, "HOLD_SECONDS", 0.5)
    monkeypatch.setattr(encode, "MAX_BACKLOG_SECONDS", 1.0)
    received = Received()
    stream = EncodedStream("r", "opus", received, received.errors.append)
    assert not stream.behind()
    stream(Started(id="r", model="m", sample_rate=48000, channels=1, format="pcm_f32le"))
    live = list(pcm_chunks(music(48000, 0.8, 1), 48000, [4800] * 8))
    for chunk in live[:4]:
        stream(chunk)
    assert not stream.behind()  # (0.4 s)
    for chunk in live[4:]:
        stream(chunk)
    assert stream.behind()  # (0.8 s, given at once: the encoders cannot have kept up)
    for _ in range(int(timeout(10) / 0.005)):  # (until the encoders have caught up)
        if not stream.behind():
            break
        await asyncio.sleep(0.005)
    assert not stream.behind()
    stream(Progress(id="r", fraction=0.0, seconds=0.8, stage="mbd"))
    for chunk in pcm_chunks(music(48000, 2.0, 1, seed=1), 48000, [9600] * 10, rendition="mbd"):
        stream(chunk)
        assert not stream.behind()
    stream(Done(id="r", status="completed"))
    await asyncio.wait_for(received.done.wait(), timeout(10))
    assert not received.errors and not stream.behind()
    files = {
        name: b"".join(
            m.data for m in received.messages if isinstance(m, Audio) and m.rendition == name
        )
        for name in (None, "mbd")
    }
    assert decode_file(files[None], "opus").shape == (38400, 1)
    assert decode_file(files["mbd"], "opus").shape == (96000, 1)


async def test_a_failed_encoding_ends_the_request_with_an_internal_error() -> None:
    """Audio the encoder cannot take (three channels: no layout for them) ends the
    request: asked to end, no audio, and its done says ``internal_error``."""
    received = Received()
    stream = EncodedStream("r", "mp3", received, received.errors.append)
    stream(Started(id="r", model="m", sample_rate=32000, channels=3, format="pcm_f32le"))
    for chunk in pcm_chunks(music(32000, 0.5, 3), 32000, [8000, 8000]):
        stream(chunk)
    stream(Done(id="r", status="completed"))
    await asyncio.wait_for(received.done.wait(), timeout(10))
    assert [e.code for e in received.errors] == ["internal_error"]
    assert not [m for m in received.messages if isinstance(m, Audio)]
    done = received.messages[-1]
    assert isinstance(done, Done) and done.status == "error"
    assert done.error is not None and done.error.code == "internal_error"


# -- through the server --------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[Any]:
    """tiny-musicgen and tiny-higgs, one server for the module's tests (its start
    is most of a short test's time; they share the module's event loop)."""
    async with running_server(make_config(), higgs_engines) as srv:
        yield srv


@on_the_servers_loop
async def test_flac_through_the_server_is_the_16_bit_stream(server: Any) -> None:
    """tiny-musicgen in FLAC: the chunks join into one file, whose samples are
    the ``pcm_s16le`` stream's (the same seed; float rounding where the chunks
    split may move one by a level), and the client saves it with its length."""
    async with connect(server.url) as client:
        pcm = await (
            await client.generate("tiny-musicgen", "x", duration=1.5, seed=4, format="pcm_s16le")
        ).collect()
        flac = await (
            await client.generate("tiny-musicgen", "x", duration=1.5, seed=4, format="flac")
        ).collect()
    assert flac.status == "completed" and flac.format == "flac" and flac.encoded
    assert flac.sample_rate == 32000 and flac.chunks > 1 and flac.pcm[:4] == b"fLaC"
    assert flac.stats is not None and flac.stats.samples == flac.frames == 48000
    heard, expected = flac.to_numpy(), pcm.to_numpy()
    assert heard.dtype == np.int16 and heard.shape == expected.shape == (48000, 1)
    assert np.abs(heard.astype(np.int32) - expected).max() <= 1
    saved = io.BytesIO()
    flac.save(saved)
    read, rate = soundfile.read(io.BytesIO(saved.getvalue()), dtype="int16", always_2d=True)
    assert rate == 32000 and np.array_equal(read, heard)


@on_the_servers_loop
async def test_a_stream_whose_encoders_lag_waits_for_them_and_loses_nothing(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoders slower than the generation (here each chunk takes 40 ms more to
    encode, and the hold is at 0.2 s): the request sits out steps until they catch
    up, rather than fail, and its file is the one it would have been (FLAC: the
    ``pcm_s16le`` stream of the same seed, within a level); a PCM neighbour
    runs on meanwhile, and ``/metrics`` counts the steps sat out."""
    monkeypatch.setattr(encode, "HOLD_SECONDS", 0.2)
    monkeypatch.setattr(encode, "MAX_BACKLOG_SECONDS", 2.0)  # (passed if not held)
    push = Encoder.push_pieces

    def slow_push(self: Encoder, audio: np.ndarray[Any, Any]) -> list[tuple[bytes, int]]:
        time.sleep(0.04)
        return push(self, audio)

    monkeypatch.setattr(Encoder, "push_pieces", slow_push)
    async with connect(server.url) as client:
        pcm = await (
            await client.generate("tiny-musicgen", "x", duration=8.0, seed=6, format="pcm_s16le")
        ).collect()
        flac_stream = await client.generate(
            "tiny-musicgen", "x", duration=8.0, seed=6, format="flac"
        )
        neighbour = await client.generate("tiny-musicgen", "y", duration=8.0, format="pcm_s16le")
        flac, beside = await asyncio.gather(flac_stream.collect(), neighbour.collect())
    assert flac.status == beside.status == "completed", (flac.error, beside.error)
    heard, expected = flac.to_numpy(), pcm.to_numpy()
    assert heard.shape == expected.shape == (256000, 1)
    assert np.abs(heard.astype(np.int32) - expected).max() <= 1
    assert flac.stats is not None and beside.stats is not None
    assert beside.stats.wall_seconds < flac.stats.wall_seconds  # (it did not wait)

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(scrape)
    held = [line for line in text.splitlines() if line.startswith("wavecast_held_steps")]
    assert held and float(held[0].rsplit(" ", 1)[1]) > 0, held


@on_the_servers_loop
async def test_opus_and_mp3_through_the_server(server: Any) -> None:
    """Music at 32 kHz in Opus goes out at 48 kHz (Opus does not take 32), and
    decodes to the samples made; speech in MP3 at 16 kHz, resampled and
    encoded; both near the float stream at that rate (the same seed)."""
    async with connect(server.url) as client:
        results = {}
        for name, kwargs in {
            "music": dict(model="tiny-musicgen", prompt="x", duration=1.0, seed=2),
            "speech": dict(model="tiny-higgs", prompt="Hello there.", max_new_tokens=60, seed=2),
        }.items():
            format, rate = ("opus", 48000) if name == "music" else ("mp3", 16000)
            pcm = await (
                await client.generate(**kwargs, format="pcm_f32le", sample_rate=rate)
            ).collect()
            encoded = await (await client.generate(**kwargs, format=format)).collect()
            if name == "speech":  # (mp3 at the speech model's 24 kHz by default; 16 asked)
                encoded = await (
                    await client.generate(**kwargs, format=format, sample_rate=rate)
                ).collect()
            results[name] = (pcm, encoded)
    pcm, opus = results["music"]
    assert opus.status == "completed" and opus.sample_rate == 48000 and opus.pcm[:4] == b"OggS"
    heard = opus.to_numpy()
    assert heard.shape == pcm.to_numpy().shape == (48000, 1) == (opus.frames, 1)
    # Random weights make noise, which a perceptual codec keeps as noise of the same
    # spectrum, not as the same waveform: the bands' levels, within 3 dB.
    levels = band_levels(heard, 48000, 14000) - band_levels(pcm.to_numpy(), 48000, 14000)
    assert np.abs(levels).max() < 3, levels
    pcm, mp3 = results["speech"]
    assert mp3.status == "completed" and mp3.sample_rate == 16000
    heard = mp3.to_numpy()
    expected = pcm.to_numpy()
    assert mp3.frames == expected.shape[0]
    assert heard.shape[0] >= expected.shape[0] + MP3_DELAY
    aligned = heard[MP3_DELAY : MP3_DELAY + expected.shape[0]]
    levels = band_levels(aligned, 16000, 7000) - band_levels(expected, 16000, 7000)
    assert np.abs(levels).max() < 3, levels


@on_the_servers_loop
async def test_a_cancelled_encoded_stream_is_a_whole_file(server: Any) -> None:
    """Cancelled mid-stream, the chunks still make a complete file: the Ogg
    stream ends, and decodes to the samples made before the cancel."""
    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "x", duration=30.0, format="opus")
        chunks = []
        async for event in stream:
            if isinstance(event, Audio):
                chunks.append(event.data)
                if len(chunks) == 3:
                    await stream.cancel()
    assert stream.done is not None and stream.done.status == "cancelled"
    assert stream.done.stats is not None
    decoded = decode_file(b"".join(chunks), "opus")
    assert decoded.shape[0] == stream.done.stats.samples > 0


async def test_the_server_sizes_its_encoders_as_configured() -> None:
    """``--encoder-threads``: the encoders' pool the server starts with (0: one
    thread a core but two, from one to eight); streams encode in it."""
    config = make_config()
    config = replace(config, models=replace(config.models, encoder_threads=3))
    async with running_server(config) as srv, connect(srv.url) as client:
        assert encode._pool_threads == 3
        result = await (
            await client.generate("tiny-musicgen", "x", duration=0.5, format="flac")
        ).collect()
        assert result.status == "completed" and result.to_numpy().shape == (16000, 1)
    assert encode.configure(0) == encode.default_threads() >= 1


@on_the_servers_loop
async def test_a_bitrate_asked_for_is_the_streams(server: Any) -> None:
    """``bitrate``: an Opus stream at 16 kbit/s weighs about a quarter of one at
    64 (the default), an MP3 one at 32 about a quarter of one at 128."""
    async with connect(server.url) as client:
        sizes = {}
        for format, bitrate in (("opus", None), ("opus", 16000), ("mp3", None), ("mp3", 32000)):
            result = await (
                await client.generate(
                    "tiny-musicgen", "x", duration=2.0, seed=1, format=format, bitrate=bitrate
                )
            ).collect()
            assert result.status == "completed", result.error
            sizes[format, bitrate] = len(result.pcm)
    assert 0.15 < sizes["opus", 16000] / sizes["opus", None] < 0.4, sizes
    assert 0.15 < sizes["mp3", 32000] / sizes["mp3", None] < 0.35, sizes


@pytest.mark.parametrize(
    ("format", "bitrate"), [("flac", 64000), ("pcm_s16le", 64000), ("opus", 300000)]
)
@on_the_servers_loop
async def test_a_bitrate_the_format_does_not_take_is_refused(
    server: Any, format: str, bitrate: int
) -> None:
    async with connect(server.url) as client:
        stream = await client.generate(
            "tiny-musicgen", "x", duration=1.0, format=format, bitrate=bitrate
        )
        events = [event async for event in stream]
    assert len(events) == 1 and isinstance(events[0], Done) and events[0].error is not None
    assert (events[0].error.code, events[0].error.field) == ("invalid_field", "bitrate")


@on_the_servers_loop
async def test_metrics_count_the_audio_encoded_and_the_encoders_time(server: Any) -> None:
    """``/metrics``: the seconds of audio each format's encoders took in, and the
    time their threads spent (what ``--encoder-threads`` must cover)."""

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("wavecast_enc")
        }

    before = await asyncio.to_thread(scrape)  # (the module's other tests encode too)
    async with connect(server.url) as client:
        for format in ("opus", "flac", "flac"):
            result = await (
                await client.generate("tiny-musicgen", "x", duration=1.0, format=format)
            ).collect()
            assert result.status == "completed"
    after = await asyncio.to_thread(scrape)
    samples = {name: value - before.get(name, 0.0) for name, value in after.items()}
    encoded = 'wavecast_encoded_audio_seconds_total{format="%s"}'
    assert samples[encoded % "opus"] == pytest.approx(1.0, abs=1e-6)
    assert samples[encoded % "flac"] == pytest.approx(2.0, abs=1e-6)
    for format in ("opus", "flac"):
        busy = samples[f'wavecast_encoder_busy_seconds_total{{format="{format}"}}']
        assert 0 < busy < 1.0  # (tens of times faster than real time)


@on_the_servers_loop
async def test_bad_rates_for_a_codec_are_refused_before_queued(server: Any) -> None:
    async with connect(server.url) as client:
        for format, rate in (("opus", 44100), ("mp3", 96000)):
            stream = await client.generate(
                "tiny-musicgen", "x", duration=1.0, format=format, sample_rate=rate
            )
            events = [event async for event in stream]
            assert len(events) == 1 and isinstance(events[0], Done)
            assert events[0].error is not None
            assert (events[0].error.code, events[0].error.field) == (
                "invalid_field",
                "sample_rate",
            )


def test_silences_map_a_files_frames_to_its_streams() -> None:
    """A file with silence at two waits (300 frames at 1,000, 200 at 1,500):
    its frames are the stream's and the silence before them."""
    silences = Silences(((1000, 300), (1500, 200)))
    assert [silences.before(f) for f in (0, 999, 1000, 1499, 1500, 9000)] == [
        0,
        0,
        300,
        300,
        500,
        500,
    ]
    # (file -> stream, and the silence left where the file's frame is within one)
    assert silences.stream_frame(999) == (999, 0)
    assert silences.stream_frame(1000) == (1000, 300)
    assert silences.stream_frame(1299) == (1000, 1)
    assert silences.stream_frame(1300) == (1000, 0)
    assert silences.stream_frame(1799) == (1499, 0)
    assert silences.stream_frame(1800) == (1500, 200)
    assert silences.stream_frame(2000) == (1500, 0)
    for frame in range(0, 3000, 7):  # (a stream's frame is where the file has it)
        assert silences.stream_frame(frame + silences.before(frame)) == (frame, 0)


@pytest.mark.parametrize(
    ("format", "rate"), [("flac", 24000), ("opus", 24000), ("mp3", 24000), ("opus", 48000)]
)
async def test_a_file_with_waits_picked_up_anywhere_goes_on_as_it_was(
    format: str, rate: int
) -> None:
    """A file whose text came as it was written got silence at its waits
    (here two, 0.3 s apart: each within the frames a pick-up encodes again
    after one of them). Picked up after any of its chunks, told where the
    waits it had were (``Silences``), it is encoded again from a few frames
    before the cut with that silence where it was (and the rest of one it
    begins within) and goes on from the client's bytes: FLAC byte for byte, the
    lossy ones as true to the audio as the whole file. Its later waits get the
    same silence, its captions are where they were in the file; cut as it
    waits, the wait comes again (the text after it had not come) and its
    silence is given once."""
    audio = music(rate, 2.0, 1)
    waits = [int(0.8 * rate) + 37, int(1.1 * rate) + 11]  # (the stream's frames)
    step = rate // 25  # (a speech frame's audio: the engine's chunks are of them)

    async def encoded(
        first: int = 0,
        resume: int = 0,
        until: int = 0,
        start: int = 0,
        told: tuple[tuple[int, int], ...] = (),
    ) -> list[ServerMessage]:
        received = Received()
        stream = EncodedStream(
            "r",
            format,
            received,
            received.errors.append,
            resume=resume,
            until=until,
            start=start,
            silences=Silences(told),
        )
        stream(Started(id="r", model="m", sample_rate=rate, channels=1, format="pcm_f32le"))
        seq, at = 0, first
        cut_at = Silences(told).stream_frame(until)[0]  # (where the client's file ends)
        for end in sorted({*range(first + step, audio.shape[0], step), *waits, audio.shape[0]}):
            if end <= first:
                continue
            if at in (0, *waits):
                stream(Caption(id="r", offset=at, text=f"at {at}"))
            stream(
                Audio(
                    id="r",
                    seq=seq,
                    offset=at,
                    sample_rate=rate,
                    channels=1,
                    format="pcm_f32le",
                    data=audio[at:end].astype("<f4").tobytes(),
                )
            )
            seq, at = seq + 1, end
            if end in waits and end >= cut_at:
                stream(Waiting(id="r", seconds=end / rate))  # (cut as it waits: again)
        stream(Done(id="r", status="completed"))
        await asyncio.wait_for(received.done.wait(), timeout(10))
        assert not received.errors
        return received.messages

    whole = await encoded()
    chunks = [m for m in whole if isinstance(m, Audio)]
    silences = [m.silence for m in whole if isinstance(m, Waiting)]
    assert len(silences) == 2 and all(s > 0 for s in silences)
    file = b"".join(m.data for m in chunks)
    timeline = np.concatenate(
        [
            audio[: waits[0]],
            np.zeros((silences[0], 1)),
            audio[waits[0] : waits[1]],
            np.zeros((silences[1], 1)),
            audio[waits[1] :],
        ]
    ).astype(np.float64)
    decoded = decode_file(file, format).astype(np.float64)
    lag = MP3_DELAY if format == "mp3" else 0
    kept = decoded[lag:][: len(timeline)]
    captions = {m.text: m.offset for m in whole if isinstance(m, Caption)}
    assert captions == {
        "at 0": 0,
        f"at {waits[0]}": waits[0] + silences[0],
        f"at {waits[1]}": waits[1] + sum(silences),
    }
    frame = frame_size(format, rate)
    inside = 0  # (cuts whose encoder begins within a wait's silence)
    for cut in range(1, len(chunks)):
        had, until = b"".join(m.data for m in chunks[:cut]), chunks[cut - 1].until
        assert until is not None
        index = whole.index(chunks[cut - 1])
        told = tuple(
            (w, s)
            for w, s in zip(waits, silences, strict=True)
            if any(isinstance(m, Waiting) and m.seconds == w / rate for m in whole[: index + 2])
        )
        start = warm_start(format, rate, until)
        first, lead = Silences(told).stream_frame(start)
        inside += lead > 0
        again = await encoded(first // step * step, len(had), until, start, told)
        rest = [m for m in again if isinstance(m, Audio)]
        assert rest and rest[0].offset == len(had), cut
        joined = had + b"".join(m.data for m in rest)
        at = Silences(told).stream_frame(until)[0]
        again_silences = [m.silence for m in again if isinstance(m, Waiting)]
        assert again_silences == [s for w, s in zip(waits, silences, strict=True) if w >= at]
        placed = {m.text: m.offset for m in again if isinstance(m, Caption)}
        assert placed.items() <= captions.items(), cut
        if format == "flac":
            assert joined == file, cut
            continue
        heard = decode_file(joined, format).astype(np.float64)
        assert heard.shape == decoded.shape, cut
        heard = heard[lag:][: len(timeline)]
        assert snr(timeline, heard) >= snr(timeline, kept) - 0.5, cut
        near = slice(max(0, until - 3 * frame), until + 3 * frame)
        error = np.sqrt(((heard[near] - timeline[near]) ** 2).mean())
        assert error <= 1.5 * np.sqrt(((kept[near] - timeline[near]) ** 2).mean()) + 1e-4, cut
    # The path that begins within a silence was taken (a FLAC file's is less
    # than a block, and ends where one does: there, a block after it begins).
    assert inside >= 1 or format == "flac"
