"""Random clients against a real server, many at once: whatever they send, every
request ends with one ``done``, a refusal comes before ``queued`` (PROTOCOL.md
§3.3), nothing fails inside the server (but the waits of text streams whose
text never ends run out), and the server ends idle and healthy.

A fixed seed picks what each client does: a model (music, melody, speech),
parameters inside and outside their ranges or of the wrong type, output rates
formats and bit rates (some refused), uploads of random lengths, rates and
formats (some not audio, some with no sample at the model's rate, some longer
than the duration), streams picked up at a frame (``resume``; a file at its
``until``), speech whose text comes as it is written (in random parts, some
flushed, some late; its connection cut and the stream picked up on another),
cancels and dropped connections at any message, readers that take their time,
raw frames.
When a cancel or a drop lands varies from run to run; what is asserted holds
whatever it is: each stream's chunks join without a gap from where it was
picked up, at the rate and in the format its ``started`` says, in messages of
at most a piece (a completed PCM stream: the samples the stats count; an MP3,
Ogg Opus or FLAC stream: one file, which decodes to them and the silence of
its waits for text). (Such clients found the continuation too long for its
duration refused only after ``queued``, a one-sample clip at 44.1 kHz failing
inside the encoder and Demucs, a stream whose cancel came as the model
finished it said ``completed`` with its audio waiting left out, and the gauge
of streams waiting for their text counting one whose wait had run out.)
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import soundfile
from helpers import higgs_engines, make_config, running_server, timeout, with_stereo
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from wavecast.clients import connect
from wavecast.clients.client import decode_file
from wavecast.protocol import (
    AUDIO_FORMATS,
    ENCODED_FORMATS,
    Audio,
    Done,
    ErrorMessage,
    Queued,
    Started,
    Waiting,
    decode,
    offset_unit,
)
from wavecast.server.session import PIECE_BYTES


class Drop(Exception):
    """Raised inside a client's reading to drop its connection without a close."""


# Output rates a request may ask for, past the model's (two more are refused; and
# those the format's codec does not take: Opus takes 8, 16 and 48 kHz of these).
# At 192 kHz a chunk of float PCM goes in pieces.
RATES = [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000]

# Frames a stream is picked up at (``resume``), some past its end.
RESUMES = [0, 1, 700, 9000, 24000, 10**7]

# Bit rates a request may ask for: for MP3 and Opus (the others refuse any), some
# beyond what the codec takes.
BITRATES = [6000, 24000, 64000, 128000, 300000]

# The ``until`` an encoded stream is picked up at (``resume_until``): sample
# frames, some past its end.
UNTILS = [0, 1, 4000, 50000, 10**7]

# Parts of a text that comes as it is written (``text_stream``): sentences' ends
# inside and between them, titles that end none, lines, other scripts, nothing.
PARTS = [
    "Hello",
    " there.",
    " How are",
    " you? ",
    "Mr. Smith",
    " said 你好。",
    "\n",
    "",
    " and then…",
    ' "Quoted." ',
    "word " * 12,
    "." * 300,  # (a run of stops: cut at once)
]

# Codes a frame that opens no request may get (PROTOCOL.md §6).
FRAME_CODES = {"bad_frame", "unknown_type", "invalid_field", "unknown_id"}


def engines() -> Mapping[str, Any]:
    return {**with_stereo(), **higgs_engines()}


class Clients:
    """The clients' choices (one seeded generator) and what they saw."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.seen: Counter[str] = Counter()
        self.late: list[str] = []  # errors after ``queued`` (none is expected here)
        self.unended = 0  # text streams whose text never ends (their waits run out)
        self.poisoned = 0  # text streams whose parts make a model's control token

    def clip(self, seconds: float, channels: int = 1) -> bytes:
        rng = self.rng
        rate = rng.choice([8000, 11025, 22050, 32000, 44100, 48000])
        samples = max(1, int(seconds * rate))
        audio = (
            0.1 * np.random.default_rng(rng.getrandbits(32)).standard_normal((samples, channels))
        ).astype(np.float32)
        buffer = io.BytesIO()
        soundfile.write(buffer, audio, rate, format=rng.choice(["WAV", "FLAC", "OGG"]))
        return buffer.getvalue()

    def upload(self, longest: float, channels: int = 1) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.15:
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        if kind < 0.3:
            return self.clip(rng.uniform(1e-5, 1e-3), channels)  # a sample or a few
        return self.clip(rng.uniform(0.05, longest), channels)

    def music(self) -> tuple[str, str, dict[str, Any], dict[str, bytes]]:
        rng = self.rng
        model = rng.choice(["tiny-musicgen", "tiny-musicgen-melody", "tiny-musicgen-stereo"])
        params: dict[str, Any] = {"duration": rng.uniform(0.1, 2.5)}
        for name, low, high in (("top_p", 0, 1), ("temperature", 0, 3), ("cfg_coef", 0, 6)):
            if rng.random() < 0.4:
                params[name] = rng.uniform(low, high)
        if rng.random() < 0.3:
            params["top_k"] = rng.randint(0, 64)
        if rng.random() < 0.1:
            params["mbd"] = True
        if rng.random() < 0.1:
            params[rng.choice(["duration", "top_k", "volume"])] = rng.choice([-1, "x", 1e9, [1]])
        inputs: dict[str, bytes] = {}
        if rng.random() < 0.3:
            inputs["continuation"] = self.upload(3.0, 2 if model.endswith("stereo") else 1)
        if rng.random() < 0.3:
            inputs["melody"] = self.upload(2.0, rng.choice([1, 2]))
        prompt = rng.choice(["lofi beat", "", "drums and bass", "x" * 2000])
        return model, prompt, params, inputs

    def speech(self) -> tuple[str, str, dict[str, Any], dict[str, bytes]]:
        rng = self.rng
        params: dict[str, Any] = {"max_new_tokens": rng.randint(1, 60)}
        for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
            if rng.random() < 0.4:
                params[name] = rng.uniform(low, high)
        if rng.random() < 0.3:
            params["scene"] = rng.choice(["cafe", "a windy beach", ""])
        if rng.random() < 0.3:
            params["chunk_method"] = rng.choice(["none", "word", "speaker", "bogus"])
            params["chunk_max_word_num"] = rng.randint(1, 8)
        if rng.random() < 0.1:
            params["voice"] = "nobody"
        if rng.random() < 0.1:
            params[rng.choice(["max_new_tokens", "temperature", "pitch"])] = rng.choice([-5, "x"])
        inputs: dict[str, bytes] = {}
        if rng.random() < 0.3:
            inputs["reference"] = self.upload(2.0)
            if rng.random() < 0.5:
                params["reference_text"] = "hello there"
        text = rng.choice(
            [
                "Hello there.",
                "[SPEAKER0] Hi! [SPEAKER1] Hello, how are you?\n[SPEAKER0] Fine.",
                "word " * 40,
                "Ünïcödé 你好",
                "",
            ]
        )
        return "tiny-higgs", text, params, inputs

    async def one(self) -> None:
        """A connection with one to three requests, each read to its end (or
        cancelled, or the connection dropped, at some message), by a reader
        that may take a while over each message."""
        rng = self.rng
        plans = [
            (self.music() if rng.random() < 0.5 else self.speech(), rng.random())
            for _ in range(rng.randint(1, 3))
        ]
        pause = rng.choice([0.0, 0.0, 0.0, 0.01, 0.05])  # (a reader's time over a message)
        async with connect(self.url) as client:
            streams = []
            for (model, prompt, params, inputs), fate in plans:
                rate = rng.choice([None, None, None, *RATES, 7999, 192001])
                format = rng.choice(AUDIO_FORMATS)
                lossy = format in ("mp3", "opus")
                bitrate = rng.choice(BITRATES) if rng.random() < (0.5 if lossy else 0.03) else None
                resume = resume_codes = until = None
                if rng.random() < 0.25:  # (with a seed; else refused)
                    resume = rng.choice(RESUMES)
                    if format in ENCODED_FORMATS and rng.random() < 0.8:
                        until = rng.choice(UNTILS)  # (without it: refused)
                    if rng.random() < 0.9:
                        params = {**params, "seed": rng.randint(0, 99)}
                    if rng.random() < 0.5:  # (some past the clip's end, or of no model's)
                        steps = rng.choice([1, 30, 120, 5000])
                        top = rng.choice([64, 66])  # (66: speech's stream markers too)
                        noise = np.random.default_rng(rng.randint(0, 9))
                        codes = noise.integers(0, top, (steps, 4))
                        resume_codes = codes.astype("<u2").tobytes()[: rng.choice([None, -1])]
                with_codes = rng.random() < 0.3 or None
                stream = await client.generate(
                    model,
                    prompt,
                    params=params,
                    inputs=inputs or None,
                    format=format,
                    sample_rate=rate,
                    bitrate=bitrate,
                    resume=resume,
                    resume_codes=resume_codes,
                    resume_until=until,
                    codes=with_codes,
                )
                streams.append((stream, fate, rng.randint(2, 15), resume or 0, bool(with_codes)))

            async def read(stream: Any, fate: float, at: int, resume: int, codes: bool) -> None:
                events = []
                async for event in stream:
                    events.append(event)
                    if pause:
                        await asyncio.sleep(pause)
                    if fate < 0.15 and len(events) == at:
                        await stream.cancel()
                    if fate > 0.88 and len(events) == at:
                        raise Drop
                self.check(events, resume, codes)

            reads = [asyncio.create_task(read(*stream)) for stream in streams]
            try:
                await asyncio.gather(*reads)
            except Drop:
                self.seen["dropped"] += 1
                client.ws.transport.abort()  # no close frame: the server sees the drop
                for task in reads:
                    task.cancel()
                await asyncio.gather(*reads, return_exceptions=True)

    async def writer(self, unended: bool = False, poisoned: bool | None = None) -> None:
        """A speech stream whose text comes as it is written (``text_stream``), in
        random parts (some flushed) with pauses between them, ended (or not: its
        wait for text runs out), cancelled, dropped, or cut and picked up on a new
        connection (``retry_for``: the client asks for it again with its text so
        far). ``unended``: one whose text never ends, read to its end (in PCM
        at the model's rate: not refused). ``poisoned``: whether its parts make
        one of the model's control tokens (None: now and then); one that does
        is read to its end, ended with ``invalid_field``."""
        rng = self.rng
        retry = rng.random() < 0.5
        chunking = rng.choice(["sentence", "sentence", "word", "none", "speaker"])
        params: dict[str, Any] = {
            "max_new_tokens": rng.randint(5, 40),
            "seed": rng.randint(0, 99),
            "chunk_method": chunking,
        }
        format = rng.choice(AUDIO_FORMATS)
        rate = rng.choice([None, None, None, *RATES])
        if unended:  # (not refused: a format and rate every model takes)
            format, rate = "pcm_s16le", None
        parts = [(rng.choice(PARTS), rng.random() < 0.2) for _ in range(rng.randint(0, 6))]
        # Now and then a model's control token, in two parts: the stream ends
        # with ``invalid_field`` once they are joined.
        poisoned = not unended and rng.random() < 0.06 if poisoned is None else poisoned
        if poisoned:
            where = rng.randint(0, len(parts))
            parts[where:where] = [(" Then <|eo", False), ("t_id|> more. ", False)]
        self.poisoned += poisoned
        pauses = [rng.choice([0.0, 0.0, 0.005, 0.05]) for _ in parts]
        ending, last = rng.random(), rng.choice(["", " The end."])
        ending = 1.0 if unended else 0.0 if poisoned else ending  # (never ended; ended)
        self.unended += ending >= 0.9
        fate, at = 1.0 if unended or poisoned else rng.random(), rng.randint(2, 15)
        retry_for = timeout(30) if retry else 0.0
        async with connect(self.url, retry_for=retry_for) as client:
            asked = time.monotonic()
            stream = await client.speak(
                "tiny-higgs",
                rng.choice(["", "Well. ", "So"]),
                text_stream=True,
                captions=rng.random() < 0.5,
                format=format,
                sample_rate=rate,
                params=params,
            )

            async def write() -> None:
                for (text, flush), pause in zip(parts, pauses, strict=True):
                    await asyncio.sleep(pause)
                    await stream.send_text(text, flush=flush)
                if ending < 0.8:
                    await stream.end_text(last)
                elif ending < 0.9:
                    await stream.cancel()
                # (else no end: the stream's wait for its text runs out)

            writing = asyncio.create_task(write())
            events: list[Any] = []
            try:
                async for event in stream:
                    events.append(event)
                    if fate < 0.2 and len(events) == at:
                        if not retry:
                            raise Drop
                        self.seen["cut"] += 1
                        client.ws.transport.abort()  # (a lost connection: picked up)
            except ConnectionClosed:
                # Cut before it started, it is asked for again while its time to
                # try again (from when it was asked) lasts; under way, it is
                # picked up where it is cut a sentence a chunk. Else the loss is
                # the consumer's.
                if stream.started is None:
                    assert time.monotonic() - asked >= retry_for, events
                else:
                    assert chunking != "sentence", events
                self.seen["cut, not picked up"] += 1
            except Drop:
                self.seen["dropped"] += 1
                client.ws.transport.abort()
            else:
                await writing
                codes = bool(stream.generate and stream.generate.codes)
                self.check(events, codes=codes, refused=poisoned)
                self.seen["text stream"] += 1
                return
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)

    def check(
        self, events: list[Any], resume: int = 0, codes: bool = False, refused: bool = False
    ) -> None:
        """A request's events, read to its ``done``: whole, in order, its audio as
        ``started`` says. ``refused``: its text held a control token (it may end
        ``invalid_field``)."""
        dones = [event for event in events if isinstance(event, Done)]
        assert len(dones) == 1 and events[-1] is dones[0], events
        done = dones[0]
        started = [event for event in events if isinstance(event, Started)]
        for version in (None, "mbd"):  # each at the rate and in the format started says
            chunks = [e for e in events if isinstance(e, Audio) and e.rendition == version]
            assert not chunks or len(started) == 1, events
            units = [len(c.data) // offset_unit(c.format, c.channels) for c in chunks]
            start = resume if version is None else 0  # (a picked-up stream's first frame)
            offsets = [start + sum(units[:i]) for i in range(len(chunks))]
            assert [c.offset for c in chunks] == offsets, events
            assert [c.seq for c in chunks] == list(range(len(chunks))), events
            for chunk in chunks:
                # Codes: asked for, with the live stream's chunks, whole timesteps.
                assert chunk.codes is None or (codes and version is None), chunk
                assert len(chunk.codes or b"") % 8 == 0, chunk  # (four codes a timestep)
                fields = (chunk.sample_rate, chunk.channels, chunk.format)
                assert fields == (started[0].sample_rate, started[0].channels, started[0].format)
                assert len(chunk.data) % offset_unit(chunk.format, chunk.channels) == 0
                assert len(chunk.data) <= PIECE_BYTES, len(chunk.data)
            if not chunks or done.stats is None:
                continue
            if chunks[0].format in ENCODED_FORMATS:  # (one whole file, cancelled or not)
                if start:  # (the rest of a file whose beginning this client never had)
                    self.seen["picked up"] += done.status == "completed"
                    continue
                frames = decode_file(b"".join(c.data for c in chunks), chunks[0].format).shape[0]
                # (and the silence that played while a text stream waited for its
                # text: once where a stream picked up where it waited waits again)
                waits = {e.frames: e.silence or 0 for e in events if isinstance(e, Waiting)}
                samples = done.stats.samples + sum(waits.values())
                if chunks[0].format == "mp3":  # (its encoder's delay and padding besides)
                    assert frames >= samples + 1105, events
                else:
                    assert frames == samples, events
            elif version is None and done.status == "completed":
                sent = sum(c.frames for c in chunks)
                assert done.stats.samples == start + sent, (done.stats, sent, start)
                self.seen["picked up"] += start > 0
        code = done.error.code if done.error is not None else None
        self.seen[f"{done.status} {code or ''}".strip()] += 1
        assert code != "internal_error", done
        if done.error is not None and any(isinstance(event, Queued) for event in events):
            if code == "text_timeout":  # (a text stream never ended: expected)
                return
            if refused and code == "invalid_field" and done.error.field in ("text", "prompt"):
                self.seen["refused a control token"] += 1
                return
            self.late.append(f"{code}: {done.error.message}")

    async def raw(self) -> None:
        """A frame that opens no request, or a malformed one: a typed error."""
        rng = self.rng
        frame = rng.choice(
            [
                bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 100))),
                msgpack.packb([1, 2, 3]),
                msgpack.packb({"type": "cancel", "id": "nobody"}),
                msgpack.packb({"type": "text", "id": "nobody", "text": "Hi."}),
                msgpack.packb({"type": "dance"}),
                '{"type": "generate", "id": "',
            ]
        )
        async with ws_connect(self.url) as ws:
            await ws.recv()  # hello
            await ws.send(frame)
            answer = decode(await asyncio.wait_for(ws.recv(), timeout(10)))
        assert isinstance(answer, ErrorMessage) and answer.code in FRAME_CODES, answer
        self.seen["raw " + answer.code] += 1


async def test_random_clients_leave_every_request_done_and_the_server_whole() -> None:
    config = make_config(max_active=4, max_requests_per_connection=4)
    async with running_server(config, factory=engines) as server:
        server.scheduler.TEXT_WAIT = 1.0  # (a text stream never ended: its wait runs out)
        clients = Clients(server.url, seed=33)
        # (one whose wait runs out, and one whose text makes a control token,
        # whatever else the clients choose)
        running: set[asyncio.Task[None]] = {
            asyncio.create_task(clients.writer(unended=True)),
            asyncio.create_task(clients.writer(poisoned=True)),
        }
        loop = asyncio.get_running_loop()
        end = loop.time() + 15.0
        while loop.time() < end:
            while len(running) < 8:
                kind = clients.rng.random()
                work = (
                    clients.one()
                    if kind < 0.75
                    else clients.writer()
                    if kind < 0.9
                    else clients.raw()
                )
                running.add(asyncio.create_task(work))
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        for task in asyncio.as_completed(running, timeout=timeout(120)):
            await task
        assert await server.scheduler.wait_idle(timeout(30))
        snapshot = server.scheduler.snapshot()
        errors = Counter[str]()  # the requests that ended in an error after ``queued``
        for metric in server.scheduler.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "wavecast_requests_total" and sample.labels["status"] == "error":
                    errors[sample.labels["code"]] += int(sample.value)
        async with connect(server.url) as client:  # still serving
            ok = await (await client.generate("tiny-musicgen", "x", duration=0.2)).collect()
    assert clients.late == [], clients.late
    # None failed inside the server: only text streams never ended waited too
    # long, and those whose parts made a control token were refused.
    assert set(+errors) <= {"text_timeout", "invalid_field"}, errors
    assert errors["text_timeout"] <= clients.unended, errors
    assert errors["invalid_field"] <= clients.poisoned, errors
    assert snapshot["failed"] == errors.total(), snapshot
    assert snapshot["queued"] == snapshot["active"] == snapshot["waiting_for_text"] == 0, snapshot
    assert ok.status == "completed"
    seen = clients.seen
    # A run that tried little proves little: each kind of end happened.
    assert seen["completed"] >= 10 and seen["cancelled"] >= 1, seen
    assert seen["error invalid_field"] >= 10 and seen["dropped"] >= 1, seen
    assert seen["picked up"] >= 1, seen
    assert seen["text stream"] >= 3 and seen["error text_timeout"] >= 1, seen
    assert seen["refused a control token"] >= 1, seen
    assert sum(count for kind, count in seen.items() if kind.startswith("raw ")) >= 3, seen
