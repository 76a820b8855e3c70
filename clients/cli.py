"""The ``wavecast`` command: ``serve`` (the server), ``generate`` (music),
``speak`` (text to speech) and ``models`` (what a server serves), the last three
as clients of a running server."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from wavecast.protocol import (
    AUDIO_FORMATS,
    BYTES_PER_SAMPLE,
    ENCODED_FORMATS,
    Audio,
    Caption,
    Done,
    ModelInfo,
    Progress,
    Queued,
    Started,
    Waiting,
    to_wire,
)

from .client import (
    DEFAULT_URL,
    FILE_SUFFIXES,
    SAVE_AS,
    GenerationResult,
    RequestStream,
    connect,
    server_url,
)

__all__ = ["main"]


class ProgressBar:
    """A one-line progress bar on a terminal (plain lines otherwise)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.last_line = ""

    def show(self, fraction: float, seconds: float, note: str = "") -> None:
        width = 30
        filled = round(fraction * width)
        elapsed = time.perf_counter() - self.started
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% "
            f"{seconds:6.2f} s of audio, {elapsed:5.1f} s elapsed {note}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)))
        elif int(fraction * 10) != int(self._last_fraction() * 10) or fraction >= 1.0:
            self.stream.write(line + "\n")
        self.last_line = line
        self.stream.flush()

    def _last_fraction(self) -> float:
        try:
            return float(self.last_line.split("]")[1].split("%")[0]) / 100
        except (IndexError, ValueError):
            return -1.0

    def message(self, text: str) -> None:
        if self.tty and self.last_line:
            self.stream.write("\n")
            self.last_line = ""
        self.stream.write(text + "\n")
        self.stream.flush()


# A WAV file's format tag and bits a sample, by the protocol's format.
WAV_FORMAT_TAGS = {
    "pcm_s16le": (1, 16),
    "pcm_f32le": (3, 32),
    "pcm_alaw": (6, 8),
    "pcm_mulaw": (7, 8),
}


class LiveWav:
    """Audio written to a pipe as it arrives, as one WAV stream, for a player to
    play while the rest is generated (``wavecast speak … -o - | ffplay -nodisp
    -autoexit -``). Its sizes are unknown when the header goes out: 0xFFFFFFFF,
    as streaming writers leave them (players and libsndfile read to the end).

    A thread of its own writes: a player reads at real time, slower than the
    audio comes, and the client must go on reading the connection meanwhile
    (the server ends the request of a client that stops reading). What the
    player has not read yet waits here: at most the clip the server sends.
    Where the reader goes away (the player quit) or a write fails otherwise (a
    full disk), ``on_closed`` is called on that thread with why, and the rest
    is dropped.
    """

    SIZE_UNKNOWN = 0xFFFFFFFF

    def __init__(
        self, out: BinaryIO, on_closed: Callable[[str], None], *, owned: bool = False
    ) -> None:
        self.out = out
        self.on_closed = on_closed
        self.owned = owned  # (closed at the end: a player's input, whose end it reads)
        self.closed = False  # the reader went away, or the rest was abandoned
        self.bytes = 0  # audio handed over (the header not counted)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._finished = False
        self._thread = threading.Thread(target=self._write_all, name="wavecast-out", daemon=True)
        self._thread.start()

    @staticmethod
    def header(sample_rate: int, channels: int, format: str) -> bytes:
        """A WAV header of unknown length: 16-bit integer or 32-bit float PCM,
        or G.711 mu-law or A-law."""
        tag, bits = WAV_FORMAT_TAGS[format]
        block = channels * bits // 8
        unknown = struct.pack("<I", LiveWav.SIZE_UNKNOWN)
        spec = struct.pack(
            "<IHHIIHH", 16, tag, channels, sample_rate, sample_rate * block, block, bits
        )
        return b"RIFF" + unknown + b"WAVE" + b"fmt " + spec + b"data" + unknown

    def start(self, sample_rate: int, channels: int, format: str) -> None:
        if format not in ENCODED_FORMATS:  # (an encoded stream is a file: its own header)
            self._queue.put(self.header(sample_rate, channels, format))

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self._queue.put(data)

    def abandon(self) -> None:
        """Drop what the reader has not read yet (after the one write under way)."""
        self.closed = True

    async def finish(self) -> None:
        """Once the reader has read everything (or gone away)."""
        if self._finished:
            return
        self._finished = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        if self.owned:
            with contextlib.suppress(OSError):
                self.out.close()

    def _write_all(self) -> None:
        while (data := self._queue.get()) is not None:
            if self.closed:
                continue
            try:
                self.out.write(data)
                self.out.flush()
            except OSError as exc:
                self.closed = True
                gone = isinstance(exc, BrokenPipeError)  # (the reader went away)
                why = "the output was closed" if gone else f"writing failed ({exc.strerror})"
                # What is left in the file's buffer must not fail again at exit.
                with contextlib.suppress(OSError, ValueError):
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, self.out.fileno())
                    os.close(null)
                self.on_closed(why)


STDOUT = Path("-")  # ``-o -``: the audio to standard output, as it comes
# ``--play``'s players, the first found (``WAVECAST_PLAYER`` before them): each
# plays a WAV stream from its standard input as it comes, and exits at its end.
PLAYERS = (
    ("ffplay", "-nodisp", "-autoexit", "-loglevel", "error", "-"),
    ("aplay", "-q", "-"),
    ("play", "-q", "-t", "wav", "-"),
)


def player_command() -> list[str] | None:
    """``--play``'s player: ``WAVECAST_PLAYER`` (a command line), else the first
    of ``PLAYERS`` on the PATH; None where there is none."""
    given = os.environ.get("WAVECAST_PLAYER", "").strip()
    if given:
        return shlex.split(given)
    return next((list(command) for command in PLAYERS if shutil.which(command[0])), None)


# --play counts on this part of the speed the audio comes at (it varies).
PLAY_MARGIN = 0.9
# Seconds the server may have generated past the audio received before the bar
# says the connection, not the model, is what the stream waits for (the live
# progress comes ahead of the audio waiting to be sent: PROTOCOL.md §4.4).
LINK_BEHIND_SECONDS = 2.0


class Received:
    """The live stream's audio received against what the server says it has
    generated: where the first lags, the bar says so, and once, for PCM, that
    an encoded format would need less of the connection."""

    def __init__(self, bar: ProgressBar, format: str) -> None:
        self.bar = bar
        self.format = format
        self.seconds = 0.0  # received
        self.progress = (0.0, 0.0)  # the live progress: fraction, seconds generated
        self.said = False
        self.unit = 0.0  # seconds a byte (0: an encoded format, not counted)
        self.rates = (0, 0)  # the stream's sample rate and channels

    def started(self, sample_rate: int, channels: int) -> None:
        if self.format in BYTES_PER_SAMPLE:
            self.unit = 1.0 / (BYTES_PER_SAMPLE[self.format] * channels * sample_rate)
            self.rates = (sample_rate, channels)

    def opus_share(self) -> str:
        """What part of this PCM stream's bit rate an Opus stream at the
        server's default takes (PROTOCOL.md §4.5: 64 kbit/s a channel above
        16 kHz, 32 at and below)."""
        rate, channels = self.rates
        pcm = 8 / self.unit
        opus = (64000 if rate > 16000 else 32000) * channels
        share = round(pcm / opus)
        return "about half" if share <= 2 else f"about 1/{share}"

    def audio(self, data: bytes) -> None:
        self.seconds += len(data) * self.unit
        if self.bar.tty and self.behind():  # (the bar's line, brought up to date)
            self.show()

    def generated(self, fraction: float, seconds: float) -> None:
        self.progress = (fraction, seconds)
        self.show()

    def behind(self) -> bool:
        return bool(self.unit) and self.progress[1] - self.seconds > LINK_BEHIND_SECONDS

    def show(self) -> None:
        note = ""
        if self.behind():
            note = f"({self.seconds:.2f} s received: the connection is slower than the stream)"
            if not self.said:
                self.said = True
                self.bar.message(
                    "note: the connection carries this stream slower than it is made: "
                    f"--format opus needs {self.opus_share()} of it"
                )
        self.bar.show(*self.progress, note)


def play_from(held: float, speed: float | None, total: float | None) -> bool:
    """Whether a player started now would play to the end without running out:
    ``held`` seconds of audio in hand, the rest coming at ``speed`` seconds of
    audio a second (None: not measured yet; ``PLAY_MARGIN`` of it counted on),
    ``total`` seconds in all (None: not known). Slower than real time, the rest
    (``total - held``) comes in ``(total - held) / speed`` seconds while the
    player plays ``held`` and what comes meanwhile: it never runs out where
    ``held * speed >= (total - held) * (1 - speed)``."""
    if total is not None and held >= total:
        return True
    if speed is None:
        return False
    speed *= PLAY_MARGIN
    if speed >= 1.0:
        return True
    if total is None:
        return False
    return held * speed >= (total - held) * (1.0 - speed)


class Playback:
    """``--play``: the player, fed the audio as it comes (``LiveWav``).

    It starts as soon as it would not run out (``play_from``): at the second
    chunk where the audio comes faster than real time (the speed is measured
    from the first), later where it comes slower (a large model on a small
    machine: what is held then covers the rest, so the player does not stop
    and start), at the end at the latest. ``total`` is the audio's length as
    the progress messages give it (a speech request's, at most).
    """

    def __init__(
        self,
        command: list[str],
        on_closed: Callable[[str], None],
        wav: tuple[int, int, str],
        bar: ProgressBar,
    ) -> None:
        self.command = command
        self.on_closed = on_closed
        self.wav = wav  # (sample rate, channels, format)
        self.bar = bar
        sample_rate, channels, format = wav
        self.byte_seconds = 1.0 / (BYTES_PER_SAMPLE[format] * channels * sample_rate)
        self.held = bytearray()  # (until the player starts)
        self.live: LiveWav | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.failed = False
        self.received = 0.0  # seconds of audio
        self.total: float | None = None
        self._first: tuple[float, float] | None = None  # (when, seconds received then)

    async def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        self.received += len(data) * self.byte_seconds
        if self.live is not None:
            self.live.write(data)
            return
        if self.failed:
            return
        self.held.extend(data)
        if self._first is None:
            self._first = (now, self.received)
            speed = None
        else:
            began, seconds = self._first
            speed = (self.received - seconds) / (now - began) if now > began else None
        if play_from(self.received, speed, self.total):
            await self._start(speed)

    async def finish(self, play_rest: bool) -> None:
        """Once every chunk has come (``play_rest``: the player started with what is
        held, where it has not yet) or the request ended otherwise; until the
        player has played it all, or quit."""
        if self.live is None and play_rest and self.held and not self.failed:
            await self._start(None)
        if self.live is not None:
            await self.live.finish()
        if self.process is not None:
            await self.process.wait()

    async def _start(self, speed: float | None) -> None:
        try:
            self.live, self.process = await _start_player(self.command, self.on_closed)
        except OSError as exc:
            self.failed = True
            self.on_closed(f"--play: cannot start {self.command[0]} ({exc.strerror})")
            return
        self.live.start(*self.wav)
        self.live.write(bytes(self.held))
        self.held.clear()
        if speed is not None and speed * PLAY_MARGIN < 1.0:
            self.bar.message(
                f"the audio comes at {speed:.2f}x real time: playing from "
                f"{self.received:.1f} s held, so as not to stop"
            )


async def _start_player(
    command: list[str], on_closed: Callable[[str], None]
) -> tuple[LiveWav, asyncio.subprocess.Process]:
    """The player, reading the WAV stream that the returned ``LiveWav`` writes."""
    reader, writer = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(*command, stdin=reader)
    except BaseException:
        os.close(writer)
        raise
    finally:
        os.close(reader)
    return LiveWav(os.fdopen(writer, "wb"), on_closed, owned=True), process


Params = dict[str, int | float | bool | str | None]
SPEAK_PARAMS = (
    "scene",
    "temperature",
    "top_k",
    "top_p",
    "max_new_tokens",
    "seed",
    "ras_win_len",
    "ras_win_max_num_repeat",
    "chunk_method",
    "chunk_max_word_num",
    "chunk_max_num_turns",
    "generation_chunk_buffer_size",
)


def _read_inputs(bar: ProgressBar, files: dict[str, Path | None]) -> dict[str, bytes] | None:
    inputs = {}
    for role, path in files.items():
        if path is None:
            continue
        try:
            inputs[role] = path.read_bytes()
        except OSError as exc:
            bar.message(f"cannot read {path}: {exc.strerror}")
            return None
    return inputs


async def _generate(args: argparse.Namespace) -> int:
    bar = ProgressBar()
    params: Params = {}
    for name in ("duration", "top_k", "top_p", "temperature", "cfg_coef", "seed", "extend_stride"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.include_prompt:
        params["include_prompt"] = True
    if args.mbd:
        params["mbd"] = True
    if (args.prompt is None) == (args.batch is None):
        bar.message("give a PROMPT, or --batch FILE of them (not both)")
        return 2
    inputs = _read_inputs(bar, {"continuation": args.continue_from, "melody": args.melody})
    if inputs is None:
        return 2
    if args.batch is not None:
        return await _run_batch(args, bar, params, inputs, capability="text")
    return await _run(args, bar, args.prompt, params, inputs, capability="text")


async def _speak(args: argparse.Namespace) -> int:
    bar = ProgressBar()
    text = args.text
    if args.text_stream and (text not in ("", "-") or args.text_file or args.batch):
        bar.message(
            "--text-stream reads the text from standard input, as it comes: not TEXT, "
            "--text-file or --batch too"
        )
        return 2
    if text == "-" and not args.text_stream:
        text = sys.stdin.read()
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            bar.message(f"cannot read {args.text_file}: {exc}")
            return 2
    if args.batch is not None and (text or args.text_file is not None):
        bar.message("--batch reads the texts from its file: not TEXT or --text-file too")
        return 2
    if args.batch is not None and args.captions is not None:
        bar.message("--captions writes one request's captions: not with --batch")
        return 2
    if args.text_stream:
        text = ""
    elif not text and args.batch is None:
        bar.message("nothing to say: give TEXT, --text-file or --batch")
        return 2
    params: Params = {}
    for name in SPEAK_PARAMS:
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.voice:
        params["voice"] = ",".join(args.voice)
    if args.ref_text is not None:
        params["reference_text"] = args.ref_text
    if args.ref1_text is not None:
        params["reference_1_text"] = args.ref1_text
    if args.text_stream:  # (cut the same however the lines come: picked up where cut)
        params.setdefault("chunk_method", "sentence")
    inputs = _read_inputs(bar, {"reference": args.ref, "reference_1": args.ref1})
    if inputs is None:
        return 2
    if args.batch is not None:
        return await _run_batch(args, bar, params, inputs, capability="tts")
    return await _run(
        args, bar, text, params, inputs, capability="text_stream" if args.text_stream else "tts"
    )


@dataclass(frozen=True)
class BatchItem:
    """A line of a ``--batch`` file: its prompt (or text), its own parameters and
    file name (a JSON line's), and where it is."""

    line: int
    prompt: str
    params: Params
    output: str | None


def _read_batch(bar: ProgressBar, path: str) -> list[BatchItem] | None:
    """``--batch FILE``'s items (``-``: standard input): a prompt a line (``\\n``
    in it: a new line, for a dialogue), or a JSON object with ``prompt`` (or
    ``text``), an optional ``output`` file name and any parameters; blank lines
    and ``#`` comments skipped. None (said why) where it cannot be read."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        bar.message(f"cannot read --batch {path}: {exc}")
        return None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            items.append(BatchItem(number, line.replace("\\n", "\n"), {}, None))
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            bar.message(f"{path}:{number}: not a JSON object: {exc.msg}")
            return None
        if not isinstance(fields, dict):
            fields = {}
        prompt = fields.pop("prompt", None)
        prompt = fields.pop("text", None) if prompt is None else prompt
        output = fields.pop("output", None)
        if not isinstance(prompt, str) or not isinstance(output, str | None):
            bar.message(f'{path}:{number}: a JSON line needs a "prompt" (or "text") string')
            return None
        if not all(isinstance(v, int | float | bool | str) for v in fields.values()):
            bar.message(f"{path}:{number}: parameters are numbers, strings or true/false")
            return None
        items.append(BatchItem(number, prompt, fields, output))
    if not items:
        bar.message(f"--batch {path}: no prompts in it")
        return None
    return items


def _slug(text: str) -> str:
    words = re.findall(r"\w+", re.sub(r"\[SPEAKER\d+\]", " ", text).lower())
    return "-".join(words[:6])[:48] or "clip"


async def _run_batch(
    args: argparse.Namespace,
    bar: ProgressBar,
    params: Params,
    inputs: dict[str, bytes],
    *,
    capability: str,
) -> int:
    """``--batch``: every item of the file, ``--jobs`` at once (the server steps
    them together), each written to its file in ``-o FOLDER`` as it completes."""
    if args.play or args.output == STDOUT:
        bar.message("--batch writes files into a folder (-o FOLDER): not --play or -o -")
        return 2
    items = _read_batch(bar, args.batch)
    if items is None:
        return 2
    args.format = args.format or "pcm_s16le"
    folder: Path = args.output or Path("out")
    paths = _batch_files(bar, args, items, folder)
    if paths is None:
        return 2
    batch = Batch(args, bar, params, inputs, list(zip(items, paths, strict=True)))
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, batch.interrupt)
    try:
        code = await batch.run(capability)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
    if code is not None:
        return code
    speed = batch.audio / batch.wall if batch.wall else 0.0
    bar.message(
        f"{batch.written} of {len(items)} written to {folder}, {batch.failed} failed, "
        f"in {batch.wall:.1f} s ({batch.audio:.1f} s of audio: x{speed:.2f} real time, "
        f"{batch.jobs} at once)"
    )
    if batch.stopping:
        return 130
    return 1 if batch.failed else 0


class Batch:
    """A ``--batch`` run: its items' requests, ``--jobs`` at once on as many
    connections as the server's per-connection limit asks; a Ctrl-C cancels
    those under way and starts no more."""

    def __init__(
        self,
        args: argparse.Namespace,
        bar: ProgressBar,
        params: Params,
        inputs: dict[str, bytes],
        todo: list[tuple[BatchItem, Path]],
    ) -> None:
        self.args = args
        self.bar = bar
        self.params = params
        self.inputs = inputs
        self.total = len(todo)
        self.todo = collections.deque(enumerate(todo, start=1))
        self.running: dict[str, Any] = {}  # the requests under way, by id
        self.stopping = False
        self.written = self.failed = self.jobs = 0
        self.audio = self.wall = 0.0
        self._cancels: set[asyncio.Task[None]] = set()

    def interrupt(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.bar.message(f"cancelling {len(self.running)} request(s)…")
        for stream in list(self.running.values()):
            task = asyncio.get_running_loop().create_task(stream.cancel())
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)

    async def run(self, capability: str) -> int | None:
        """Every item, or until interrupted; an exit code where it could not start."""
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(_connect(self.args, self.bar.message))
            models = first.models
            model = self.args.model or next(
                (name for name, info in models.items() if capability in info.capabilities), None
            )
            if model is None:
                self.bar.message(f"the server serves no model with the {capability!r} capability")
                return 1
            if model in models and models[model].test_model:
                self.bar.message(f"note: {model} is a random-weight test model; it makes noise")
            limits = first.hello.limits
            self.jobs = max(1, min(self.args.jobs or limits.max_active, self.total))
            per_connection = max(1, limits.max_requests_per_connection)
            clients = [first]
            while len(clients) * per_connection < self.jobs:
                clients.append(
                    await stack.enter_async_context(_connect(self.args, self.bar.message))
                )
            began = time.perf_counter()
            await asyncio.gather(
                *(self._worker(clients[i // per_connection], model) for i in range(self.jobs))
            )
            self.wall = time.perf_counter() - began
        return None

    async def _worker(self, client: Any, model: str) -> None:
        args = self.args
        while self.todo and not self.stopping:
            index, (item, path) = self.todo.popleft()
            stream = await client.generate(
                model,
                item.prompt,
                params={**self.params, **item.params},
                format=args.format,
                sample_rate=args.sample_rate,
                bitrate=args.bitrate * 1000 if args.bitrate is not None else None,
                inputs=self.inputs,
            )
            self.running[stream.id] = stream
            try:
                result = await stream.collect()
            finally:
                del self.running[stream.id]
            where = f"[{index}/{self.total}]"
            if result.status != "completed":
                self.failed += result.status == "error"
                why = f"{result.error.code}: {result.error}" if result.error else result.status
                self.bar.message(f"{where} {args.batch}:{item.line}: {why}")
                continue
            mbd = "mbd" in result.renditions
            live = path.with_suffix(".encodec" + path.suffix) if mbd else path
            if not _save(self.bar, result, live) or (
                mbd and not _save(self.bar, result, path, "mbd")
            ):
                self.failed += 1
                continue
            seconds = result.frames / result.sample_rate if result.sample_rate else 0.0
            self.written += 1
            self.audio += seconds
            self.bar.message(f"{where} wrote {path} ({seconds:.2f} s, seed {result.seed})")


def _batch_files(
    bar: ProgressBar, args: argparse.Namespace, items: list[BatchItem], folder: Path
) -> list[Path] | None:
    """Each item's file in ``folder`` (made): its JSON line's ``output``, else
    ``NN-words-of-its-prompt`` with the format's suffix. None (said why) where one
    would leave the folder, two are the same, or the folder cannot be made."""
    suffix = FILE_SUFFIXES.get(args.format, ".wav")
    width = len(str(len(items)))
    paths = [
        folder / (item.output or f"{index:0{width}d}-{_slug(item.prompt)}{suffix}")
        for index, item in enumerate(items, start=1)
    ]
    for item, path in zip(items, paths, strict=True):
        if (
            not path.resolve().is_relative_to(folder.resolve())
            or path.resolve() == folder.resolve()
        ):
            bar.message(f"{args.batch}:{item.line}: {item.output!r} is not a file in {folder}")
            return None
    if len({path.resolve() for path in paths}) < len(paths):
        bar.message(f"--batch {args.batch}: two items are written to the same file")
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        bar.message(f"cannot make {folder}: {exc.strerror}")
        return None
    return paths


def _headers(given: list[str]) -> dict[str, str]:
    """``--header 'NAME: VALUE'`` flags as a map.

    Raises:
        ValueError: One is not ``NAME: VALUE``.
    """
    headers = {}
    for header in given:
        name, colon, value = header.partition(":")
        if not colon or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip()):
            raise ValueError(f"--header {header!r}: not NAME: VALUE")
        headers[name.strip()] = value.strip()
    return headers


def _connect(args: argparse.Namespace, say: Callable[[str], None]) -> connect:
    """The connection the command line asks for; ``say`` tells of each wait."""
    return connect(
        args.url,
        api_key=args.api_key,
        ca_file=args.ca_file,
        retry_for=args.retry_for,
        on_retry=lambda why, wait: say(f"{why}: trying again in {wait:.1f} s"),
        headers=args.headers,
    )


async def _models(args: argparse.Namespace) -> int:
    async with _connect(args, lambda line: print(f"wavecast: {line}", file=sys.stderr)) as client:
        models = list(client.models.values())
    if args.json:
        print(json.dumps([to_wire(m) for m in models], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(_describe(m) for m in models))
    return 0


def _describe(model: ModelInfo) -> str:
    """A model as ``wavecast models`` shows it: a few lines."""
    test = "  (TEST MODEL: random weights, it makes noise)" if model.test_model else ""
    channels = {1: "mono", 2: "stereo"}.get(model.channels, f"{model.channels} channels")
    runs = " ".join(part for part in (model.device, model.dtype) if part)
    lines = [
        f"{model.name}{test}",
        f"  {model.description}",
        f"  {model.family} · {model.sample_rate} Hz {channels} · up to {model.max_duration:g} s"
        + (f" · {runs}" if runs else ""),
        f"  capabilities: {', '.join(model.capabilities) or 'none'}",
    ]
    for label, names in (("voices", model.voices), ("scenes", model.scenes)):
        if names is not None:
            lines.append(f"  {label}: {', '.join(names) or 'none'}")
    return "\n".join(lines)


async def _run(
    args: argparse.Namespace,
    bar: ProgressBar,
    prompt: str,
    params: Params,
    inputs: dict[str, bytes],
    *,
    capability: str,
) -> int:
    if args.format is None:  # (from the file's name: out.mp3 is an MP3 stream)
        suffix = args.output.suffix.lower() if args.output not in (None, STDOUT) else ""
        args.format = SAVE_AS.get(suffix, "pcm_s16le")
    player = player_command() if args.play else None
    if args.play and args.format in ENCODED_FORMATS:
        bar.message(
            f"--play plays PCM: not {args.format} (to hear it as it comes: "
            f"--format {args.format} -o - | ffplay -nodisp -autoexit -)"
        )
        return 2
    if args.play:
        if args.output == STDOUT:
            bar.message("--play and -o -: one or the other (-o - | PLAYER plays it too)")
            return 2
        if player is None:
            bar.message(
                "--play found no player (ffplay, aplay or sox's play): set WAVECAST_PLAYER "
                "to one that reads a WAV stream from its standard input"
            )
            return 2
        if shutil.which(player[0]) is None:
            bar.message(f"--play: no command {player[0]!r} (WAVECAST_PLAYER)")
            return 2
    default = Path("out" + FILE_SUFFIXES.get(args.format, ".wav"))
    output = args.output or (None if args.play and not params.get("mbd") else default)
    if output == STDOUT:
        if sys.stdout.isatty():
            bar.message(
                "-o - writes the audio to standard output: pipe it into a player "
                "(… -o - | ffplay -nodisp -autoexit -) or into a file"
            )
            return 2
        if params.get("mbd"):
            bar.message("--mbd writes two files (the live version and the diffusion one): not -o -")
            return 2
    async with _connect(args, bar.message) as client:
        models = client.models
        fitting = [name for name, info in models.items() if capability in info.capabilities]
        model = args.model or next(iter(fitting), None)
        if model is None:
            bar.message(f"the server serves no model with the {capability!r} capability")
            return 1
        if model in models and models[model].test_model:
            bar.message(f"note: {model} is a random-weight test model; it makes noise")
        text_stream = capability == "text_stream"
        captions_path: Path | None = getattr(args, "captions", None)
        if captions_path is not None and "captions" not in getattr(
            models.get(model), "capabilities", ("captions",)
        ):
            bar.message(f"{model} does not say which text its audio speaks: no --captions")
            return 2
        stream = await client.generate(
            model,
            prompt,
            params=params,
            format=args.format,
            sample_rate=args.sample_rate,
            bitrate=args.bitrate * 1000 if args.bitrate is not None else None,
            inputs=inputs,
            text_stream=text_stream,
            captions=captions_path is not None,
        )
        loop = asyncio.get_running_loop()
        cancel_sent = False
        tasks: set[asyncio.Task[None]] = set()
        if text_stream:
            task = loop.create_task(_feed_lines(stream, sys.stdin))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def on_interrupt(why: str = "") -> None:
            nonlocal cancel_sent
            if stream.done is not None and (out := writing()) is not None:
                out.abandon()  # (the part the reader has not read yet)
            elif not cancel_sent:
                cancel_sent = True
                bar.message(f"{why}cancelling…")
                task = loop.create_task(stream.cancel())
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        def on_output_closed(why: str) -> None:
            loop.call_soon_threadsafe(on_interrupt, f"{why}: ")

        live = LiveWav(sys.stdout.buffer, on_output_closed) if output == STDOUT else None
        playback: Playback | None = None  # (--play: made at ``started``)

        def writing() -> LiveWav | None:
            """The stream being written: to standard output, or to the player."""
            return live if playback is None else playback.live

        keep = output is not None and output != STDOUT  # (the live stream, written at the end)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        pcm = bytearray()
        mbd_pcm = bytearray()
        arriving = Received(bar, args.format)
        sample_rate = channels = silence = 0
        captions: list[Caption] = []
        seed = None
        lost: ConnectionClosed | None = None  # the connection, gone before the done
        try:
            async for event in stream:
                if isinstance(event, Queued):
                    bar.message(f"queued at position {event.position}")
                elif isinstance(event, Started):
                    sample_rate, channels, seed = event.sample_rate, event.channels, event.seed
                    arriving.started(sample_rate, channels)
                    if player is not None:
                        wav = (sample_rate, channels, args.format)
                        playback = Playback(player, on_output_closed, wav, bar)
                    if live is not None:
                        live.start(sample_rate, channels, args.format)
                elif isinstance(event, Audio):
                    if event.rendition is not None:
                        mbd_pcm.extend(event.data)
                        continue
                    arriving.audio(event.data)
                    if live is not None:
                        live.write(event.data)
                    if playback is not None:
                        await playback.feed(event.data)
                    if keep:
                        pcm.extend(event.data)
                elif isinstance(event, Waiting):
                    silence += event.silence or 0
                elif isinstance(event, Caption):
                    captions.append(event)
                elif isinstance(event, Progress):
                    if event.stage == "prepare":
                        part = f" {event.fraction:.0%}" if event.fraction > 0 else ""
                        bar.message(f"preparing (analysing the inputs){part}")
                    elif event.stage == "mbd":
                        bar.show(event.fraction, event.seconds, "(Multi-Band Diffusion)")
                    else:
                        arriving.generated(event.fraction, event.seconds)
                        if playback is not None and event.fraction > 0:
                            playback.total = event.seconds / event.fraction
            if live is not None:
                await live.finish()
        except ConnectionClosed as exc:
            lost = exc
            if live is not None:
                await live.finish()
        finally:
            if playback is not None:  # (until it has played it all, or quit)
                await playback.finish(play_rest=stream.done is not None and not cancel_sent)
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
        done = stream.done
        if lost is not None:
            # What came before joins exactly: kept, as a cancel keeps it.
            done = Done(id=stream.id, status="error")
            reason = f"close code {lost.rcvd.code}" if lost.rcvd else "no close frame"
            bar.message(f"error: the connection to the server was lost ({reason})")
        assert isinstance(done, Done)

        def clip(data: bytearray) -> GenerationResult:
            return GenerationResult(
                stream.id,
                done.status,
                bytes(data),
                sample_rate,
                channels,
                args.format,
                done.stats,
                None,
                seed,
                silence=silence,
                captions=captions,
            )

        result = clip(pcm)
        if captions_path is not None:  # (what came: a cut stream's too)
            try:
                await asyncio.to_thread(captions_path.write_text, result.webvtt(), "utf-8")
            except OSError as exc:
                bar.message(f"cannot write {captions_path}: {exc.strerror or exc}")
                return 1
            bar.message(f"wrote {captions_path} ({len(captions)} captions)")
        sent = writing()
        if sent is not None:  # (its audio is not in ``pcm``: nothing more to write)
            end = " (closed before its end)" if sent.closed else ""
            where = "standard output" if player is None else f"the player ({player[0]})"
            if args.format in ENCODED_FORMATS:
                what = f"{sent.bytes} bytes of {args.format}"
            else:
                frame = BYTES_PER_SAMPLE[args.format] * channels
                what = f"{sent.bytes / (frame * sample_rate) if sample_rate else 0.0:.2f} s"
            bar.message(
                f"{what} went to {where}{end} ({sample_rate} Hz, {channels} ch, seed {seed})"
            )
        if lost is not None:
            if result.pcm and output is not None and _save(bar, result, output):  # (kept)
                received = (
                    f"the {len(result.pcm)} bytes"
                    if result.encoded
                    else f"the {result.frames / sample_rate:.2f} s"
                )
                bar.message(f"wrote {output}: {received} received before the connection was lost")
            return 1
        if done.status == "error" and done.error is not None:
            bar.message(f"error: {done.error.code}: {done.error.message}")
            if done.error.code == "busy" and not args.retry_for:
                bar.message("(--retry-for SECONDS asks again, while it is busy)")
            return 1
        outputs = [(output, result)] if keep and output is not None else []
        if mbd_pcm:
            # -o gets the diffusion version; the live (EnCodec) one goes beside it.
            assert output is not None and output != STDOUT  # (refused, or out.wav)
            live_path = output.with_suffix(".encodec" + (output.suffix or ".wav"))
            outputs = [(output, clip(mbd_pcm)), (live_path, result)]
        for path, version in outputs:
            if version.frames:
                if not _save(bar, version, path):
                    return 1
                bar.message(
                    f"wrote {path} ({version.frames / sample_rate:.2f} s, "
                    f"{sample_rate} Hz, {channels} ch, seed {seed})"
                )
        if done.stats is not None:
            s = done.stats
            first = f"{s.first_audio_seconds * 1000:.0f} ms" if s.first_audio_seconds else "-"
            bar.message(
                f"{done.status}: {s.audio_seconds:.2f} s of audio in "
                f"{s.wall_seconds:.2f} s (x{s.real_time_factor:.2f} real time), "
                f"first audio after {first}"
            )
        return 130 if done.status == "cancelled" else 0


async def _feed_lines(stream: RequestStream, source: TextIO) -> None:
    """``--text-stream``: each line of ``source`` sent as it comes (a line's end
    ends a sentence), and the text's end at the end of the input. Read on a
    thread of its own, which the process does not wait for (a line may never
    come)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue(64)

    def read() -> None:
        with contextlib.suppress(RuntimeError):  # (the command ended: its loop closed)
            for line in iter(source.readline, ""):
                asyncio.run_coroutine_threadsafe(lines.put(line), loop).result()
            asyncio.run_coroutine_threadsafe(lines.put(""), loop).result()

    threading.Thread(target=read, name="text-stream", daemon=True).start()
    with contextlib.suppress(ConnectionClosed):  # (the stream's end says why)
        while stream.done is None:
            line = await lines.get()
            if stream.done is not None:
                return
            if not line:
                await stream.end_text()
                return
            await stream.send_text(line)


def _save(
    bar: ProgressBar, result: GenerationResult, path: Path, rendition: str | None = None
) -> bool:
    """Write a file (as its name asks: ``GenerationResult.save``; the live stream,
    or ``rendition``); a line where it cannot be written."""
    try:
        result.save(path, rendition)
    except (OSError, ValueError, RuntimeError) as exc:  # (libsndfile's errors: RuntimeError)
        bar.message(f"cannot write {path}: {exc}")
        return False
    return True


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=f"the server's stream URL (default: WAVECAST_URL, else {DEFAULT_URL}); its address "
        "alone (HOST:PORT, ws://HOST:PORT, or http://HOST:PORT/ as the demo page's) means its "
        "/v1/stream",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("WAVECAST_API_KEY"),
        help="the server's API key, when it needs one (default: WAVECAST_API_KEY)",
    )
    parser.add_argument(
        "--header",
        action="append",
        dest="headers",
        default=[],
        metavar="'NAME: VALUE'",
        help="an HTTP header for the handshake (a gateway's token, say); repeat for more",
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=float(os.environ.get("WAVECAST_RETRY_FOR") or 0),
        metavar="SECONDS",
        help="keep trying this long where the server says to try again: refused (starting), "
        "draining, full, or busy before the request starts (default: WAVECAST_RETRY_FOR, else "
        "0: once)",
    )
    parser.add_argument(
        "--ca-file",
        default=os.environ.get("WAVECAST_CA_FILE"),
        metavar="FILE",
        help="for a wss:// (https://) server: trust the certificates in this PEM file (a "
        "self-signed server's own) instead of the system's (default: WAVECAST_CA_FILE)",
    )


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    _add_connection_arguments(parser)
    parser.add_argument(
        "--format",
        choices=AUDIO_FORMATS,
        help="format on the wire and in the file: PCM in a WAV file (pcm_s16le, the default; "
        "pcm_mulaw, pcm_alaw: G.711, 8 bits a sample, as telephone lines carry it, with "
        "--sample-rate 8000), or an MP3, Ogg Opus or FLAC file (mp3, opus, flac: the default "
        "for an -o FILE named .mp3, .opus or .ogg, .flac)",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        metavar="HZ",
        help="the audio's rate, 8000 to 192000 (default: the model's own); the server "
        "resamples the stream as it goes (e.g. 16000 for speech recognition, 48000 for video)",
    )
    parser.add_argument(
        "--bitrate",
        type=int,
        metavar="KBPS",
        help="kilobits a second of an mp3 or opus stream (default: the server's, for the "
        "rate and channels: Opus 64 a channel, MP3 128 a channel at 32 kHz and above)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write (default out.wav, or out.mp3, out.opus, out.flac; none with "
        "--play); '-': standard output, as the audio comes (a WAV stream, or the file of "
        "--format mp3, opus or flac; for a player: … -o - | ffplay -nodisp -autoexit -)",
    )
    parser.add_argument(
        "--batch",
        metavar="FILE",
        help="many at once: a prompt a line ('\\n' in it: a new line), or JSON lines "
        '({"prompt": ..., "output": "NAME.wav", "seed": 3, ...}); -o is then a folder '
        "(default out/), the requests --jobs at once, each file written as it completes",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="--batch: requests at once (default: the server's max_active)",
    )
    parser.add_argument(
        "--play",
        action="store_true",
        help="play the audio as it comes: WAVECAST_PLAYER, else ffplay, aplay or sox's "
        "play (the first found), fed a WAV stream (where the audio comes slower than real "
        "time, from once what is held covers the rest); quitting it cancels the request",
    )


def _add_speak_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "text",
        nargs="?",
        default="",
        help="what to say ('-': read it from standard input); [SPEAKER0] / [SPEAKER1] "
        "tags at line starts make a dialogue",
    )
    parser.add_argument("--text-file", type=Path, metavar="FILE", help="read the text from FILE")
    parser.add_argument(
        "--text-stream",
        action="store_true",
        help="read the text from standard input as it comes (a language model's answer piped "
        "in): each sentence is spoken once its line or sentence ends, a sentence a chunk "
        "(unless --chunk-method says otherwise), the stream ending with the input "
        "(… | wavecast speak --text-stream --play)",
    )
    parser.add_argument(
        "--captions",
        type=Path,
        metavar="FILE",
        help="write a WebVTT file of which text the audio speaks: a cue a text chunk "
        "(sentences, speaker turns or word groups, as --chunk-method cuts the text)",
    )
    _add_common_arguments(parser)
    parser.add_argument("--model", help="model name (default: the server's first speech model)")
    parser.add_argument(
        "--voice",
        action="append",
        metavar="NAME",
        help="a named voice from the server (GET /v1/voices); repeat for SPEAKER0, SPEAKER1, ...",
    )
    parser.add_argument(
        "--ref", type=Path, metavar="FILE", help="clone the voice of this recording (SPEAKER0)"
    )
    parser.add_argument("--ref-text", metavar="TEXT", help="what the --ref recording says")
    parser.add_argument(
        "--ref1", type=Path, metavar="FILE", help="a second reference voice, for SPEAKER1"
    )
    parser.add_argument("--ref1-text", metavar="TEXT", help="what the --ref1 recording says")
    parser.add_argument("--scene", help="a scene name (GET /v1/scenes) or a free description")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ras-win-len", type=int, dest="ras_win_len")
    parser.add_argument("--ras-win-max-num-repeat", type=int, dest="ras_win_max_num_repeat")
    parser.add_argument(
        "--chunk-method",
        choices=("none", "speaker", "word", "sentence"),
        dest="chunk_method",
        help="speak long texts chunk by chunk: by speaker turn, by word count or a sentence "
        "at a time",
    )
    parser.add_argument("--chunk-max-word-num", type=int, dest="chunk_max_word_num")
    parser.add_argument("--chunk-max-num-turns", type=int, dest="chunk_max_num_turns")
    parser.add_argument(
        "--generation-chunk-buffer-size", type=int, dest="generation_chunk_buffer_size"
    )


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompt", nargs="?", help="text description of the music (none with --batch)"
    )
    _add_common_arguments(parser)
    parser.add_argument("--model", help="model name (default: the server's first music model)")
    parser.add_argument("--duration", type=float, help="seconds of audio")
    parser.add_argument("--top-k", type=int, dest="top_k")
    parser.add_argument("--top-p", type=float, dest="top_p")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--cfg-coef", type=float, dest="cfg_coef")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--extend-stride",
        type=float,
        dest="extend_stride",
        help="long form: seconds each new window moves on by",
    )
    parser.add_argument(
        "--continue",
        type=Path,
        dest="continue_from",
        metavar="FILE",
        help="continue this audio file (WAV, FLAC, OGG, MP3); --duration "
        "then counts the prompt too",
    )
    parser.add_argument(
        "--melody",
        type=Path,
        metavar="FILE",
        help="melody reference (models with the melody capability)",
    )
    parser.add_argument(
        "--mbd",
        action="store_true",
        help="also render with Multi-Band Diffusion and write that version to -o "
        "(the live EnCodec version goes to NAME.encodec.wav)",
    )
    parser.add_argument(
        "--include-prompt",
        action="store_true",
        help="with --continue: put the prompt's audio in the output too",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wavecast", description="Real-time audio generation over WebSocket"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (demo page at /)")
    generate = commands.add_parser("generate", help="generate music and write a WAV file")
    _add_generate_arguments(generate)
    speak = commands.add_parser("speak", help="text to speech: say TEXT and write a WAV file")
    _add_speak_arguments(speak)
    models = commands.add_parser(
        "models", help="list a server's models: capabilities, voices, device, format"
    )
    _add_connection_arguments(models)
    models.add_argument("--json", action="store_true", help="the greeting's model maps as JSON")
    # The server's flags are defined next to its config; importing them pulls in
    # no model code.
    from wavecast.server.cli import add_serve_arguments

    add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from wavecast.server.cli import run_serve

        run_serve(args)  # (it ends the process)
    try:
        args.url = server_url(args.url)
        args.headers = _headers(args.headers)
    except ValueError as exc:
        print(f"wavecast: {exc}", file=sys.stderr)
        return 2
    try:
        command = {"speak": _speak, "generate": _generate, "models": _models}[args.command]
        return asyncio.run(command(args))
    except ssl.SSLCertVerificationError as exc:
        print(
            f"wavecast: {args.url}: its certificate is not trusted ({exc.verify_message}); "
            "--ca-file FILE (or WAVECAST_CA_FILE) trusts a self-signed one",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        if args.url.startswith("wss://") and isinstance(exc, ssl.SSLError | ConnectionResetError):
            # (a server without TLS answers the handshake in the clear, and closes)
            why = getattr(exc, "reason", None) or "the connection was reset"
            print(
                f"wavecast: {args.url}: no TLS connection ({why}); "
                "a server without --tls-cert is ws:// (http://)",
                file=sys.stderr,
            )
        else:
            print(f"wavecast: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            given = "was refused" if args.api_key else "is needed (--api-key or WAVECAST_API_KEY)"
            print(f"wavecast: {args.url}: an API key {given}", file=sys.stderr)
        elif status == 503:
            print(f"wavecast: {args.url} is shutting down; connect again", file=sys.stderr)
        else:
            # The server's own answers say why in a line of plain text.
            plain = exc.response.headers.get("Content-Type", "").startswith("text/plain")
            body = exc.response.body if plain and exc.response.body else b""
            reason = body.decode("utf-8", "replace").strip().partition("\n")[0][:200]
            why = f"HTTP {status}: {reason}" if reason else f"HTTP {status}"
            print(f"wavecast: {args.url} refused the connection ({why})", file=sys.stderr)
        return 2
    except InvalidHandshake as exc:  # (something else listens there, or TLS)
        tls = " (or one with TLS: wss://, https://)" if args.url.startswith("ws://") else ""
        print(f"wavecast: {args.url} is not a WebSocket server{tls}: {exc}", file=sys.stderr)
        return 2
    except ConnectionClosed as exc:  # (before a request was under way)
        if exc.rcvd is not None and exc.rcvd.code == 1013:  # (at its connection limit)
            why = exc.rcvd.reason or "too many connections"
            print(f"wavecast: {args.url} is full ({why}); try again later", file=sys.stderr)
        else:
            print(f"wavecast: the connection to {args.url} was lost: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
