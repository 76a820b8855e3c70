"""The `wavecast` command and the blocking client, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import WAVECAST, run_cli, running_server, slow_link, timeout

from wavecast.clients import SyncClient, connect, server_url, stream_url
from wavecast.clients.client import decode_file
from wavecast.protocol import Audio, Done, Started
from wavecast.server.config import Config


def serve_config(*argv: str) -> Config:
    """What ``wavecast serve ARGV`` would run with (flags over the environment)."""
    import argparse

    from wavecast.server.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


async def test_generate_writes_a_wav(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "clip.wav"
    code, output = await run_cli(
        "generate",
        "--url",
        server.url,
        "--duration",
        "1.5",
        "--seed",
        "3",
        "-o",
        str(out),
        "warm synth pads",
    )
    assert code == 0, output
    assert "random-weight test model" in output
    assert "100.0%" in output and "first audio after" in output
    info = soundfile.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (32000, 1, 75 * 640)
    assert info.subtype == "PCM_16"


async def test_over_a_slow_connection_the_bar_says_what_came(server: Any, tmp_path: Path) -> None:
    """Through a 500 kbit/s link, a float PCM clip (1,024 kbit/s) the model
    makes at some ten times real time: the progress comes ahead of the audio
    (PROTOCOL.md §4.4), and the command says the connection is what the stream
    waits for, and what part of it Opus would need (64 kbit/s against 1,024:
    1/16); Ctrl-C then cancels, and
    what came is written (before, its bar stood at the progress of the audio
    received, or, with the progress ahead and no word of it, at 100% for
    seconds)."""
    out = tmp_path / "clip.wav"
    async with slow_link(server.port, 500) as port:
        code, output = await run_cli(
            "generate",
            "--url",
            f"ws://127.0.0.1:{port}/v1/stream",
            "--duration",
            "8",
            "--format",
            "pcm_f32le",
            "-o",
            str(out),
            "through a slow link",
            interrupt_after="--format opus needs about 1/16 of it",
        )
    assert code == 130, output
    assert "the connection carries this stream slower than it is made" in output, output
    assert "cancelling" in output and "cancelled" in output, output
    assert 0 < soundfile.info(str(out)).frames < 8 * 32000


async def test_generate_float_wav(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "clip.wav"
    code, output = await run_cli(
        "generate",
        "--url",
        server.url,
        "--duration",
        "0.5",
        "--format",
        "pcm_f32le",
        "-o",
        str(out),
        "x",
    )
    assert code == 0, output
    assert soundfile.info(str(out)).subtype == "FLOAT"


async def piped_cli(*args: str) -> tuple[int, bytes, str]:
    """Run ``wavecast ARGS`` with its standard output a pipe apart from its
    messages: its exit code, its output's bytes and its messages."""
    process = await asyncio.create_subprocess_exec(
        *WAVECAST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout(60))
    assert process.returncode is not None
    return process.returncode, out, err.decode()


async def test_generate_at_another_rate(server: Any, tmp_path: Path) -> None:
    """``--sample-rate``: the file at the rate asked for, as long; G.711 as a
    file and as a stream (a telephone's 8 kHz A-law and mu-law); a rate the
    protocol refuses is the server's one-line error."""
    out = tmp_path / "clip.wav"
    request = ("generate", "--url", server.url, "--duration", "0.5")
    code, output = await run_cli(*request, "--sample-rate", "48000", "-o", str(out), "x")
    assert code == 0, output
    assert ", 48000 Hz, 1 ch" in output
    info = soundfile.info(str(out))
    assert (info.samplerate, info.frames) == (48000, 24000)
    code, output = await run_cli(
        *request, "--sample-rate", "8000", "--format", "pcm_alaw", "-o", str(out), "x"
    )
    assert code == 0, output
    info = soundfile.info(str(out))
    assert (info.samplerate, info.frames, info.subtype) == (8000, 4000, "ALAW")
    code, streamed, messages = await piped_cli(
        *request, "--sample-rate", "8000", "--format", "pcm_mulaw", "-o", "-", "x"
    )
    assert code == 0, messages
    assert streamed[20:24] == bytes([7, 0, 1, 0])  # mu-law, one channel
    assert len(streamed) == 44 + 4000  # a byte a sample
    code, output = await run_cli(*request, "--sample-rate", "4000", "-o", str(out), "x")
    assert code == 1 and "invalid_field" in output and "sample_rate" in output, output
    assert "Traceback" not in output


async def test_compressed_files_from_their_names_and_on_standard_output(
    server: Any, tmp_path: Path
) -> None:
    """``-o clip.mp3`` (``.opus``, ``.flac``) asks for that format and writes the
    file as it came, libsndfile reading it at its length (FLAC's filled in);
    ``--format`` with ``-o -`` writes the file's bytes with no WAV header around
    them; with ``--mbd`` the live version goes beside, in the same format;
    ``--play`` plays PCM only: a line saying how to hear the others."""
    request = ("generate", "--url", server.url, "--duration", "0.5", "--seed", "5")
    for name, rate, frames, kind in (
        ("clip.mp3", 32000, None, "MP3"),
        ("clip.opus", 48000, 24000, "OGG"),
        ("clip.ogg", 48000, 24000, "OGG"),
        ("clip.flac", 32000, 16000, "FLAC"),
    ):
        out = tmp_path / name
        code, output = await run_cli(*request, "-o", str(out), "x")
        assert code == 0, output
        assert f"wrote {out} (0.50 s, {rate} Hz, 1 ch" in output
        info = soundfile.info(str(out))
        assert (info.format, info.samplerate) == (kind, rate)
        assert info.frames == frames if frames else info.frames >= 16000 + 1105
    code, small, messages = await piped_cli(
        *request, "--format", "opus", "--bitrate", "16", "-o", "-", "x"
    )
    assert code == 0 and small[:4] == b"OggS", messages
    assert len(small) < 0.5 * (tmp_path / "clip.opus").stat().st_size  # (64 kbit/s)
    code, streamed, messages = await piped_cli(*request, "--format", "flac", "-o", "-", "x")
    assert code == 0, messages
    assert streamed[:4] == b"fLaC" and "bytes of flac went to standard output" in messages
    saved, _ = soundfile.read(str(tmp_path / "clip.flac"), dtype="int16", always_2d=True)
    heard = decode_file(streamed, "flac").astype(np.int32)
    assert np.abs(heard - saved).max() <= 1  # (the same seed; float rounding where chunks split)
    out = tmp_path / "both.flac"
    code, output = await run_cli(*request, "--mbd", "-o", str(out), "x")
    assert code == 0, output
    live = tmp_path / "both.encodec.flac"
    assert soundfile.info(str(out)).frames == soundfile.info(str(live)).frames == 16000
    code, output = await run_cli(*request, "--play", "-o", str(tmp_path / "x.mp3"), "x")
    assert code == 2 and "--play plays PCM: not mp3" in output and "ffplay" in output
    # PCM asked for, a file named .ogg: Opus, which does not take 32 kHz: a line, exit 1.
    out = tmp_path / "pcm.ogg"
    code, output = await run_cli(*request, "--format", "pcm_s16le", "-o", str(out), "x")
    assert code == 1 and f"cannot write {out}: an Opus file is" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize(("format", "subtype"), [("pcm_s16le", "PCM_16"), ("pcm_f32le", "FLOAT")])
async def test_dash_o_writes_the_audio_to_standard_output_as_a_wav_stream(
    server: Any, tmp_path: Path, format: str, subtype: str
) -> None:
    """``-o -``: one WAV stream on standard output (its sizes unknown when its
    header went out: 0xFFFFFFFF), the samples of ``-o FILE`` with the same seed,
    in the format asked for; the messages on standard error."""
    import struct

    import numpy as np

    request = ("generate", "--url", server.url, "--duration", "1.5", "--seed", "3")
    code, out, messages = await piped_cli(*request, "--format", format, "-o", "-", "drums")
    assert code == 0, messages
    assert "1.50 s went to standard output (32000 Hz, 1 ch, seed 3)" in messages
    assert out[:4] == b"RIFF" and out[8:16] == b"WAVE" + b"fmt "
    assert struct.unpack("<I", out[4:8])[0] == 0xFFFFFFFF
    assert out[36:40] == b"data" and struct.unpack("<I", out[40:44])[0] == 0xFFFFFFFF
    tag, channels, rate = struct.unpack("<HHI", out[20:28])
    assert (tag, channels, rate) == ((3 if subtype == "FLOAT" else 1), 1, 32000)
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(out)
    assert soundfile.info(str(streamed)).subtype == subtype  # (libsndfile reads it to its end)
    written = tmp_path / "written.wav"
    code, output = await run_cli(*request, "--format", format, "-o", str(written), "drums")
    assert code == 0, output
    dtype = "float32" if subtype == "FLOAT" else "int16"
    a, _ = soundfile.read(str(streamed), dtype=dtype)
    b, _ = soundfile.read(str(written), dtype=dtype)
    # (Chunks fall otherwise from run to run: the codec's sums round otherwise,
    # within its exactness, 1e-4, which is one step of a 16-bit sample.)
    assert len(a) == len(b) == 75 * 640
    assert np.abs(a.astype(np.float64) - b).max() <= (1e-4 if subtype == "FLOAT" else 1)


async def test_dash_o_streams_while_generating_and_a_closed_output_cancels(
    server: Any,
) -> None:
    """``-o -`` hands the audio on as it comes: its first samples are there to
    read while the request still runs at the server. A reader that goes away
    (a player that quits) cancels the request: the command says so, exits 130,
    and the server counts a cancel; no traceback."""
    reader, writer = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *WAVECAST, "generate", "--url", server.url, "--duration", "300", "-o", "-", "x",
        stdout=writer, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(writer)

    def read(size: int) -> bytes:
        got = b""
        while len(got) < size and (part := os.read(reader, size - len(got))):
            got += part
        return got

    try:
        head = await asyncio.wait_for(asyncio.to_thread(read, 44 + 6400), timeout(60))
        assert head[:4] == b"RIFF" and len(head) == 44 + 6400
        assert server.scheduler.snapshot()["active"] == 1 and process.returncode is None
    finally:
        os.close(reader)  # (the player quits)
    _, err = await asyncio.wait_for(process.communicate(), timeout(60))
    code, messages = process.returncode, err.decode()
    assert code == 130, messages
    assert "the output was closed: cancelling" in messages
    assert "went to standard output (closed before its end)" in messages
    assert "Traceback" not in messages and "Exception ignored" not in messages
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (Linux's full disk)")
async def test_dash_o_into_a_full_disk_cancels_and_says_why(server: Any) -> None:
    """A write that fails otherwise than by a reader gone (a full disk) cancels
    the request too, and the command says why."""
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        process = await asyncio.create_subprocess_exec(
            *WAVECAST, "generate", "--url", server.url, "--duration", "300", "-o", "-", "x",
            stdout=full, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(full)
    _, err = await asyncio.wait_for(process.communicate(), timeout(60))
    messages = err.decode()
    assert process.returncode == 130, messages
    assert "writing failed (No space left on device): cancelling" in messages
    assert "Traceback" not in messages and "Exception ignored" not in messages
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1


async def test_dash_o_refuses_a_terminal_and_mbd(tmp_path: Path) -> None:
    """``-o -`` on a terminal would print the samples: refused with a line saying
    how to use it; with ``--mbd`` (two files) too; before connecting."""
    import pty

    leader, follower = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *WAVECAST, "speak", "--url", "127.0.0.1:9", "-o", "-", "hi",
            stdout=follower, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), timeout(60))
    finally:
        os.close(follower)
        os.close(leader)
    assert process.returncode == 2
    assert "pipe it into a player" in err.decode()
    code, out, messages = await piped_cli(
        "generate", "--url", "127.0.0.1:9", "--mbd", "-o", "-", "x"
    )
    assert code == 2 and out == b"" and "not -o -" in messages


async def test_play_feeds_a_player_as_the_audio_comes_and_waits_for_it(
    server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--play``: the player (``WAVECAST_PLAYER``; here one that keeps what it
    is fed) reads the WAV stream from its standard input, the samples of
    ``-o FILE`` with the same seed; the command waits for it to end, and writes
    no file where none was asked for."""
    import sys

    import numpy as np

    played = tmp_path / "played.wav"
    keep = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"
    monkeypatch.setenv("WAVECAST_PLAYER", f'{sys.executable} -c "{keep}" {played}')
    request = ("generate", "--url", server.url, "--duration", "1.5", "--seed", "3")
    code, output = await run_cli(*request, "--play", "drums")
    assert code == 0, output
    assert f"1.50 s went to the player ({sys.executable})" in output and "wrote" not in output
    written = tmp_path / "written.wav"
    code, output = await run_cli(*request, "-o", str(written), "drums")
    assert code == 0, output
    a, _ = soundfile.read(str(played), dtype="int16")
    b, _ = soundfile.read(str(written), dtype="int16")
    assert len(a) == len(b) == 75 * 640
    assert np.abs(a.astype(np.int32) - b).max() <= 1  # (as -o -'s test says)


async def test_a_player_that_quits_cancels_and_no_player_is_a_line(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A player that quits early (its input closed) cancels the request: exit
    130, the server counts a cancel. A player that is not there: one line, 2."""
    import sys

    quits = "import sys; sys.stdin.buffer.read(5000)"
    monkeypatch.setenv("WAVECAST_PLAYER", f'{sys.executable} -c "{quits}"')
    long = ("generate", "--url", server.url, "--duration", "300")
    code, output = await run_cli(*long, "--play", "x")
    assert code == 130, output
    assert "the output was closed: cancelling" in output and "Traceback" not in output
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1
    monkeypatch.setenv("WAVECAST_PLAYER", "no-such-player --flag")
    code, output = await run_cli("generate", "--url", server.url, "--play", "x")
    assert code == 2 and "--play: no command 'no-such-player'" in output
    code, output = await run_cli("generate", "--url", server.url, "--play", "-o", "-", "x")
    assert code == 2 and "one or the other" in output


def test_play_from_starts_a_player_once_it_would_not_run_out() -> None:
    """``--play``'s rule: faster than real time (with the margin), at once; slower,
    once what is held covers the rest at that speed; all of it held, at once; the
    speed or (slower) the length not known, not yet."""
    from wavecast.clients.cli import PLAY_MARGIN, play_from

    assert play_from(0.1, 30.0, 10.0) and play_from(0.1, 1.2, None)
    assert not play_from(0.1, None, 10.0) and not play_from(0.1, 1.05, None)
    half = 0.5 / PLAY_MARGIN  # (half of real time, counted)
    assert not play_from(4.9, half, 10.0) and play_from(5.0, half, 10.0)
    assert not play_from(9.0, half, None) and play_from(10.0, None, 10.0)


async def test_playback_holds_audio_that_comes_slower_than_real_time(tmp_path: Path) -> None:
    """Chunks of 0.05 s every 0.1 s (half of real time), 1 s in all: the player
    starts only once 0.55 s are held (then the rest comes as fast as it plays:
    it never runs out), says so, and is fed every chunk."""
    import io
    import sys

    from wavecast.clients.cli import Playback, ProgressBar

    played = tmp_path / "played.wav"
    keep = "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, open(sys.argv[1], 'wb'))"
    messages = io.StringIO()
    closed: list[str] = []
    playback = Playback(
        [sys.executable, "-c", keep, str(played)],
        closed.append,
        (1000, 1, "pcm_s16le"),
        ProgressBar(messages),
    )
    playback.total = 1.0
    chunk = bytes(range(100))  # (50 samples: 0.05 s at 1000 Hz)
    started_at = None
    for i in range(20):
        await playback.feed(chunk)
        if playback.live is not None and started_at is None:
            started_at = (i + 1) * 0.05
        await asyncio.sleep(0.1)
    await playback.finish(play_rest=True)
    assert started_at is not None and started_at >= 0.55 - 1e-9, started_at
    assert "the audio comes at 0." in messages.getvalue() and "s held, so as not to stop" in (
        messages.getvalue()
    )
    assert closed == [] and played.read_bytes()[44:] == chunk * 20


async def test_ctrl_c_cancels_the_request(server: Any, tmp_path: Path) -> None:
    code, output = await run_cli(
        "generate",
        "--url",
        server.url,
        "--duration",
        "30",
        "-o",
        str(tmp_path / "x.wav"),
        "x",
        interrupt_after="%",
    )
    assert code == 130, output
    assert "cancelling" in output and "cancelled" in output
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1


async def test_a_lost_connection_is_an_error_that_keeps_the_audio_so_far(
    server: Any, tmp_path: Path
) -> None:
    """The server's end of the connection dropped mid-stream (no close frame, as a
    crashed server or a cut network leaves it): the command says the connection
    was lost, writes the audio it received (it joins exactly, as a cancelled
    one's), and exits 1; no traceback."""

    def drop() -> None:
        for session in list(server.sessions):
            session.ws.transport.abort()

    out = tmp_path / "x.wav"
    code, output = await run_cli(
        "generate", "--url", server.url, "--duration", "300", "-o", str(out), "x",
        interrupt_after="#", then=drop,  # (the bar's first step: audio has come)
    )  # fmt: skip
    assert code == 1, output
    assert "the connection to the server was lost (no close frame)" in output
    assert "Traceback" not in output
    written = soundfile.info(str(out))
    assert written.frames > 0 and f"wrote {out}: the" in output


async def test_a_request_stream_raises_connection_closed_when_the_connection_is_lost(
    server: Any,
) -> None:
    """The library's side of the same: the stream's events up to the drop, then
    websockets' ``ConnectionClosed`` (as ``RequestStream`` says)."""
    from websockets.exceptions import ConnectionClosed

    async with connect(server.url) as client:
        stream = await client.generate("tiny-musicgen", "x", duration=300)
        chunks = 0
        with pytest.raises(ConnectionClosed):
            async for event in stream:
                chunks += isinstance(event, Audio)
                if chunks == 2:
                    for session in list(server.sessions):
                        session.ws.transport.abort()
        assert chunks >= 2 and stream.done is None


async def test_a_connection_lost_before_the_greeting_is_a_line_not_a_traceback() -> None:
    """A WebSocket server that drops the connection once it is open (no greeting,
    no close frame): the command says so and exits 2."""
    from websockets.asyncio.server import ServerConnection, serve

    async def drop(websocket: ServerConnection) -> None:
        websocket.transport.abort()

    async with serve(drop, "127.0.0.1", 0) as dropping:
        port = dropping.sockets[0].getsockname()[1]
        code, output = await run_cli("models", "--url", f"ws://127.0.0.1:{port}/v1/stream")
    assert code == 2, output
    assert "the connection to ws://127.0.0.1:" in output and "was lost" in output, output
    assert "Traceback" not in output


async def test_models_lists_what_the_server_serves(server: Any) -> None:
    code, output = await run_cli("models", "--url", server.url)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "tiny-musicgen  (TEST MODEL: random weights, it makes noise)"
    assert "musicgen · 32000 Hz mono · up to 300 s · cpu float32" in lines[2]
    assert lines[3] == "  capabilities: text, continuation, long_form, mbd, codes"
    code, output = await run_cli("models", "--url", server.url, "--json")
    assert code == 0, output
    (listed,) = json.loads(output)
    assert listed["name"] == "tiny-musicgen" and listed["test_model"] is True
    assert (listed["device"], listed["dtype"]) == ("cpu", "float32")
    assert {p["name"] for p in listed["params"]} >= {"duration", "top_k", "seed"}


async def test_cli_reports_server_errors(server: Any) -> None:
    code, output = await run_cli("generate", "--url", server.url, "--model", "nope", "x")
    assert code == 1
    assert "unknown_model" in output


async def test_cli_takes_the_servers_address(server: Any) -> None:
    address = f"http://127.0.0.1:{server.port}/"
    code, output = await run_cli("models", "--url", address)
    assert code == 0, output
    assert output.startswith("tiny-musicgen  (TEST MODEL")


async def test_cli_takes_the_server_from_the_environment(server: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("WAVECAST_URL", f"127.0.0.1:{server.port}")
    code, output = await run_cli("models")
    assert code == 0 and output.startswith("tiny-musicgen  (TEST MODEL"), output
    # The flag wins.
    code, output = await run_cli("models", "--url", "ws://127.0.0.1:9/v1/stream")
    assert code == 2 and "cannot reach ws://127.0.0.1:9/v1/stream" in output


async def test_cli_says_why_a_server_refused(server: Any) -> None:
    url = f"ws://127.0.0.1:{server.port}/wavecast/v1/stream"  # (a proxy's prefix, absent)
    code, output = await run_cli("models", "--url", url)
    assert code == 2
    assert output.strip() == (
        f"wavecast: {url} refused the connection (HTTP 404: WebSocket streams are at /v1/stream)"
    )
    for url in (f"ftp://127.0.0.1:{server.port}", f":{server.port}"):
        code, output = await run_cli("models", "--url", url)
        assert code == 2 and output.startswith("wavecast: not a wavecast server's address"), url


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("ws://h:5555/v1/stream", "ws://h:5555/v1/stream"),
        ("ws://h:5555", "ws://h:5555/v1/stream"),
        ("ws://h:5555/", "ws://h:5555/v1/stream"),
        ("h:5555", "ws://h:5555/v1/stream"),
        ("http://h:5555/", "ws://h:5555/v1/stream"),
        ("HTTPS://h/", "wss://h/v1/stream"),
        ("wss://h/?token=k", "wss://h/v1/stream?token=k"),
        (
            "ws://h:5555/wavecast/v1/stream?encoding=json",
            "ws://h:5555/wavecast/v1/stream?encoding=json",
        ),
        ("http://[::1]:5555", "ws://[::1]:5555/v1/stream"),
    ],
)
def test_stream_url(given: str, meant: str) -> None:
    assert stream_url(given) == meant


def test_server_url_from_the_argument_the_environment_or_a_local_server(monkeypatch: Any) -> None:
    monkeypatch.delenv("WAVECAST_URL", raising=False)
    assert server_url() == "ws://127.0.0.1:5555/v1/stream"
    monkeypatch.setenv("WAVECAST_URL", "http://h:80/")
    assert server_url() == "ws://h:80/v1/stream"
    assert server_url("g:81") == "ws://g:81/v1/stream"


async def test_clients_take_the_server_from_the_environment(server: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("WAVECAST_URL", f"127.0.0.1:{server.port}")

    def work() -> str:
        with SyncClient() as client:
            return client.generate("tiny-musicgen", "x", duration=0.2).collect().status

    assert await asyncio.to_thread(work) == "completed"
    async with connect() as client:
        assert client.hello.models[0].name == "tiny-musicgen"


@pytest.mark.parametrize(
    "given", ["ftp://h:5555/", ":5555", "ws://:5555/v1/stream", "h:port", "h:0", "h:70000", ""]
)
def test_stream_url_refuses_what_names_no_server(given: str) -> None:
    with pytest.raises(ValueError, match="not a wavecast server's address"):
        stream_url(given)


async def test_cli_says_when_something_else_listens() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-not-a-websocket\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        code, output = await run_cli("models", "--url", f"127.0.0.1:{port}")
    assert code == 2
    assert output.startswith(f"wavecast: ws://127.0.0.1:{port}/v1/stream is not a WebSocket server")


async def test_cli_unreachable_server() -> None:
    code, output = await run_cli("generate", "--url", "ws://127.0.0.1:9/v1/stream", "x")
    assert code == 2 and "cannot reach" in output


async def test_sync_client(server: Any, tmp_path: Path) -> None:
    def work() -> tuple[list[str], Any]:
        with SyncClient(server.url) as client:
            assert "tiny-musicgen" in [m.name for m in client.hello.models]
            request = client.generate("tiny-musicgen", "x", duration=0.5, seed=2)
            kinds = [type(event).__name__ for event in request]
            again = client.generate("tiny-musicgen", "x", duration=0.5, seed=2).collect()
            return kinds, again

    kinds, result = await asyncio.to_thread(work)
    assert kinds[:3] == ["Queued", "Progress", "Started"] and kinds[-1] == "Done"
    assert Audio.__name__ in kinds and Started.__name__ in kinds and Done.__name__ in kinds
    assert result.status == "completed" and result.frames == 25 * 640
    result.save(tmp_path / "x.wav")  # (as received: 16-bit, the samples exactly)
    samples, rate = soundfile.read(str(tmp_path / "x.wav"), dtype="int16", always_2d=True)
    assert rate == 32000 and soundfile.info(str(tmp_path / "x.wav")).subtype == "PCM_16"
    assert (samples == result.to_numpy()).all() and samples.shape == (25 * 640, 1)


def test_serve_command_starts_and_stops(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    env = {**os.environ, "WAVECAST_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [
            *WAVECAST,
            "serve",
            "--model",
            "tiny-musicgen",
            "--port",
            "0",
            "--log-file",
            str(log_file),
        ],
        env=env,
    )
    try:
        port = None
        for _ in range(int(timeout(120) * 10)):
            if log_file.exists():
                match = re.search(r"ws://127\.0\.0\.1:(\d+)/v1/stream", log_file.read_text())
                if match:
                    port = int(match.group(1))
                    break
            if process.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert port is not None, log_file.read_text() if log_file.exists() else "no log"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.read() == b"ok\n"
        # --max-active's default: as many requests as the memory holds, up to 16 on
        # a CPU (the tiny model's tables: that many), one step for all of them.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info") as response:
            assert json.loads(response.read())["limits"]["max_active"] == 16
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout(30)) == 0
        lines = log_file.read_text().splitlines()
        assert any('"message":"shutting down"' in line for line in lines)
        assert all(line.startswith("{") for line in lines if line.strip())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_without_the_model_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "AUDIOCRAFT_CACHE_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [*WAVECAST, "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "facebook/musicgen-small" in errors[0] and "--model tiny-musicgen" in errors[0]


async def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading() -> None:
    """Another server listens there: one line, at once (not a traceback after the
    models load), naming the port and ``--reuse-port``."""
    async with running_server() as other:
        port = other.port
        code, out = await run_cli("serve", "--port", str(port), "--model", "no/such-model")
    assert code == 1
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out
    assert f"127.0.0.1:{port} is in use" in errors[0] and "--reuse-port" in errors[0]
    assert "Traceback" not in out and "no/such-model" not in out


def test_allowed_origins_from_flags_and_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("WAVECAST_ALLOW_ORIGINS", "https://a.example, https://b.example")
    config = serve_config("--allow-origin", "https://c.example")
    assert config.network.allowed_origins == (
        "https://a.example",
        "https://b.example",
        "https://c.example",
    )
    monkeypatch.delenv("WAVECAST_ALLOW_ORIGINS")
    assert serve_config().network.allowed_origins == ()


async def test_cli_and_sync_client_with_an_api_key(tmp_path: Path, monkeypatch: Any) -> None:
    from dataclasses import replace

    from helpers import make_config, running_server

    monkeypatch.delenv("WAVECAST_API_KEY", raising=False)
    config = make_config()
    config = replace(config, network=replace(config.network, api_keys=("s3cret",)))
    async with running_server(config) as srv:
        out = tmp_path / "keyed.wav"
        args = ("generate", "--url", srv.url, "--duration", "0.2", "-o", str(out), "x")
        code, output = await run_cli(*args)
        assert code == 2 and "an API key is needed (--api-key or WAVECAST_API_KEY)" in output
        code, output = await run_cli(*args, "--api-key", "wrong")
        assert code == 2 and "an API key was refused" in output
        code, output = await run_cli(*args, "--api-key", "s3cret")
        assert code == 0, output
        assert soundfile.info(str(out)).frames == 10 * 640
        # The clients read WAVECAST_API_KEY when no key is given.
        monkeypatch.setenv("WAVECAST_API_KEY", "s3cret")

        def work() -> str:
            with SyncClient(srv.url) as client:
                return client.generate("tiny-musicgen", "x", duration=0.2).collect().status

        assert await asyncio.to_thread(work) == "completed"


def test_api_keys_from_flags_file_and_environment(tmp_path: Path, monkeypatch: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nfrom-file\n\n  spaced  \nfrom-env\n")
    monkeypatch.setenv("WAVECAST_API_KEYS", "from-env")
    config = serve_config("--api-key", "from-flag", "--api-keys-file", str(keys))
    assert config.network.api_keys == ("from-env", "from-flag", "from-file", "spaced")
    assert "from-flag" not in repr(config)  # keys stay out of logs


async def test_cli_says_when_a_server_is_full() -> None:
    """A server at its connection limit closes a new connection with 1013 (try
    again later): the command says so in a line, not as a lost connection."""
    from helpers import make_config, running_server

    async with running_server(make_config(max_connections_per_ip=1)) as srv:
        async with connect(srv.url):
            code, output = await run_cli("models", "--url", srv.url)
        assert code == 2
        assert output.strip() == (
            f"wavecast: {srv.url} is full (too many connections from this address); try again later"
        ), output
        code, output = await run_cli("models", "--url", srv.url)  # (the one closed)
        assert code == 0, output


async def test_cli_says_when_a_server_is_shutting_down(tmp_path: Path) -> None:
    from dataclasses import replace

    from helpers import first_audio, make_config, running_server

    from wavecast.clients import connect
    from wavecast.server.config import TimeoutsConfig

    config = replace(make_config(), timeouts=TimeoutsConfig(shutdown_grace=60.0))
    async with running_server(config) as srv:
        client = await connect(srv.url)
        stream = await client.generate("tiny-musicgen", "x", duration=60.0)
        await first_audio(stream)
        stop = asyncio.create_task(srv.stop())
        await asyncio.sleep(0.05)
        out = tmp_path / "late.wav"
        args = ("generate", "--url", srv.url, "--duration", "0.2", "-o", str(out), "x")
        code, output = await run_cli(*args)
        assert code == 2 and "is shutting down; connect again" in output, output
        await stream.cancel()
        await stream.collect()
        await asyncio.wait_for(stop, timeout(60))
        await client.close()


def test_cuda_graphs_from_flag_and_environment_reach_the_engine(monkeypatch: Any) -> None:
    from wavecast.server.engines import load_engines

    def parsed(*argv: str) -> bool:
        return serve_config(*argv).models.cuda_graphs

    monkeypatch.delenv("WAVECAST_CUDA_GRAPHS", raising=False)
    assert not parsed() and parsed("--cuda-graphs")
    monkeypatch.setenv("WAVECAST_CUDA_GRAPHS", "1")
    assert parsed()
    engines = load_engines(["tiny-musicgen", "tiny-higgs"], "cpu", cuda_graphs=True, max_active=3)
    for engine in engines.values():
        assert engine._graphs is not None and not engine._graphs.record  # (no CUDA here)
        assert engine.max_active == 3  # the shapes prepared at warm-up: up to 3 requests


def test_pipelined_steps_from_flag_and_environment(monkeypatch: Any) -> None:
    """``--pipelined-steps`` (or ``WAVECAST_PIPELINED_STEPS=1``) reaches the
    server's configuration; off by default (``load_engines`` passes it on to
    MusicGen's engines: the crowd test serves one)."""

    def parsed(*argv: str) -> bool:
        return serve_config(*argv).models.pipelined_steps

    monkeypatch.delenv("WAVECAST_PIPELINED_STEPS", raising=False)
    assert not parsed() and parsed("--pipelined-steps")
    assert not parsed("--no-pipelined-steps")
    monkeypatch.setenv("WAVECAST_PIPELINED_STEPS", "1")
    assert parsed() and not parsed("--no-pipelined-steps")


def test_dtype_from_flag_and_environment(monkeypatch: Any) -> None:
    def parsed(*argv: str) -> str:
        return serve_config(*argv).models.dtype

    monkeypatch.delenv("WAVECAST_DTYPE", raising=False)
    assert parsed() == "auto" and parsed("--dtype", "bfloat16") == "bfloat16"
    monkeypatch.setenv("WAVECAST_DTYPE", "float16")
    assert parsed() == "float16" and parsed("--dtype", "float32") == "float32"
    with pytest.raises(SystemExit):
        parsed("--dtype", "float64")


def test_encoder_threads_from_flag_and_environment(monkeypatch: Any) -> None:
    def parsed(*argv: str) -> int:
        return serve_config(*argv).models.encoder_threads

    monkeypatch.delenv("WAVECAST_ENCODER_THREADS", raising=False)
    assert parsed() == 0 and parsed("--encoder-threads", "3") == 3
    monkeypatch.setenv("WAVECAST_ENCODER_THREADS", "2")
    assert parsed() == 2 and parsed("--encoder-threads", "5") == 5
