"""Continuation uploads, long form and stereo through the real server."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from helpers import make_config, run_cli, running_server, with_stereo

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Progress, Queued

HOP = 640


def clip_bytes(seconds: float, rate: int = 22050, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(
        buffer, (0.25 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format=fmt
    )
    return buffer.getvalue()


async def test_greeting_declares_capabilities() -> None:
    async with running_server(factory=with_stereo) as srv, connect(srv.url) as client:
        mono = client.models["tiny-musicgen"]
        stereo = client.models["tiny-musicgen-stereo"]
        assert set(mono.capabilities) == {"text", "continuation", "long_form", "mbd", "codes"}
        assert "stereo" in stereo.capabilities and stereo.channels == 2
        assert "mbd" in stereo.capabilities
        assert client.hello.limits.max_upload_bytes == 16 << 20
        assert "extend_stride" in [p.name for p in mono.params]


async def test_melody_upload_and_cli_flag(tmp_path: Path) -> None:
    async with running_server(factory=with_stereo) as srv, connect(srv.url) as client:
        melody_model = client.models["tiny-musicgen-melody"]
        assert "melody" in melody_model.capabilities
        result = await (
            await client.generate(
                "tiny-musicgen-melody", "hum", duration=1.0, inputs={"melody": clip_bytes(1.0)}
            )
        ).collect()
        assert result.status == "completed" and result.frames == 50 * HOP
        source = tmp_path / "hum.ogg"
        source.write_bytes(clip_bytes(1.0, fmt="OGG"))
        out = tmp_path / "out.wav"
        code, output = await run_cli(
            "generate",
            "--url",
            srv.url,
            "--model",
            "tiny-musicgen-melody",
            "--duration",
            "1",
            "--melody",
            str(source),
            "-o",
            str(out),
            "follow this",
        )
        assert code == 0, output
        assert soundfile.info(str(out)).frames == 50 * HOP


async def test_stereo_pcm_is_interleaved() -> None:
    async with running_server(factory=with_stereo) as srv, connect(srv.url) as client:
        stream = await client.generate(
            "tiny-musicgen-stereo", "wide", duration=1.0, seed=1, format="pcm_f32le"
        )
        result = await stream.collect()
    audio = result.to_numpy()
    assert result.channels == 2 and audio.shape == (50 * HOP, 2)
    assert not np.array_equal(audio[:, 0], audio[:, 1])


async def test_continuation_upload(server: Any) -> None:
    async with connect(server.url) as client:
        upload = clip_bytes(2.0)
        streams = [
            await client.generate(
                "tiny-musicgen",
                "go on",
                duration=5.0,
                seed=4,
                include_prompt=include,
                inputs={"continuation": upload},
                format="pcm_f32le",
            )
            for include in (False, True)
        ]
        plain, with_prompt = [await stream.collect() for stream in streams]
    assert plain.status == "completed" and plain.frames == 150 * HOP  # 5 s minus the 2 s prompt
    assert with_prompt.frames == 250 * HOP
    # started says how long each live stream will be
    assert [stream.started.seconds for stream in streams] == [3.0, 5.0]
    # the new part is the same audio whether or not the prompt is re-sent (the chunk
    # boundaries differ, so equal up to float rounding)
    new = with_prompt.to_numpy()[100 * HOP :]
    assert np.abs(new - plain.to_numpy()).max() <= 1e-4


async def test_long_form_streams_past_the_window(server: Any) -> None:
    async with connect(server.url) as client:
        stream = await client.generate(
            "tiny-musicgen", "long", duration=34.0, seed=2, extend_stride=18.0
        )
        events = [e async for e in stream]
    audio = [e for e in events if isinstance(e, Audio)]
    assert sum(a.frames for a in audio) == 1700 * HOP
    assert [a.seq for a in audio] == list(range(len(audio)))
    fractions = [e.fraction for e in events if isinstance(e, Progress)]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


async def test_upload_errors(server: Any) -> None:
    async with connect(server.url) as client:
        bad = await (
            await client.generate(
                "tiny-musicgen", "x", duration=2.0, inputs={"continuation": b"garbage"}
            )
        ).collect()
        melody = await (
            await client.generate(
                "tiny-musicgen", "x", duration=2.0, inputs={"melody": clip_bytes(1.0)}
            )
        ).collect()
        stream = await client.generate(
            "tiny-musicgen", "x", duration=2.0, inputs={"continuation": clip_bytes(3.0)}
        )
        too_long = [event async for event in stream]
        # One sample at 44.1 kHz: none at the model's rate.
        one_sample = clip_bytes(1.5 / 44100, 44100)
        stream = await client.generate(
            "tiny-musicgen", "x", duration=2.0, inputs={"continuation": one_sample}
        )
        too_short = [event async for event in stream]
    assert (bad.error.code, bad.error.field) == ("invalid_field", "inputs.continuation")  # type: ignore[union-attr]
    assert (melody.error.code, melody.error.field) == ("unsupported", "inputs.melody")  # type: ignore[union-attr]
    # A clip longer than the duration is refused with the upload's check, at
    # once: never queued, never started (no stats).
    assert len(too_long) == 1 and isinstance(too_long[0], Done), too_long
    assert too_long[0].status == "error" and too_long[0].stats is None
    assert too_long[0].error is not None and "shorter" in too_long[0].error.message
    assert too_long[0].error.field == "inputs.continuation"
    assert len(too_short) == 1 and isinstance(too_short[0], Done), too_short
    assert too_short[0].error is not None and "too short" in too_short[0].error.message
    assert too_short[0].error.field == "inputs.continuation"


async def test_upload_size_limit() -> None:
    async with (
        running_server(make_config(max_upload_bytes=1000)) as srv,
        connect(srv.url) as client,
    ):
        result = await (
            await client.generate(
                "tiny-musicgen", "x", duration=2.0, inputs={"continuation": clip_bytes(1.0)}
            )
        ).collect()
    assert result.error is not None
    assert (result.error.code, result.error.field) == ("invalid_field", "inputs.continuation")


async def test_cli_continue_flag(server: Any, tmp_path: Path) -> None:
    source = tmp_path / "in.flac"
    source.write_bytes(clip_bytes(1.0, fmt="FLAC"))
    out = tmp_path / "out.wav"
    code, output = await run_cli(
        "generate",
        "--url",
        server.url,
        "--duration",
        "3",
        "--continue",
        str(source),
        "-o",
        str(out),
        "more of this",
    )
    assert code == 0, output
    assert soundfile.info(str(out)).frames == 100 * HOP


async def test_mbd_rendition_and_cancel_during_diffusion(server: Any, tmp_path: Path) -> None:
    async with connect(server.url) as client:
        result = await (
            await client.generate("tiny-musicgen", "x", duration=2.0, mbd=True, seed=1)
        ).collect()
        assert result.status == "completed" and result.frames == 100 * HOP
        assert result.to_numpy("mbd").shape == (100 * HOP, 1)
        # cancel while the diffusion runs: the request ends within a step
        stream = await client.generate("tiny-musicgen", "x", duration=8.0, mbd=True)
        async for event in stream:
            if isinstance(event, Progress) and event.stage == "mbd":
                await stream.cancel()
        assert stream.done is not None and stream.done.status == "cancelled"
    await server.scheduler.wait_idle(5.0)
    out = tmp_path / "clip.wav"
    code, output = await run_cli(
        "generate", "--url", server.url, "--duration", "1", "--mbd", "-o", str(out), "x"
    )
    assert code == 0, output
    assert "Multi-Band Diffusion" in output
    assert soundfile.info(str(out)).frames == 50 * HOP
    assert soundfile.info(str(tmp_path / "clip.encodec.wav")).frames == 50 * HOP


async def test_features_a_model_lacks_are_unsupported() -> None:
    from wavecast.server.engines import load_engines

    def window_only() -> Mapping[str, Any]:  # no long form: max_duration = the window
        return load_engines(["tiny-musicgen"], "cpu", max_duration=30.0)

    async with running_server(factory=window_only) as srv, connect(srv.url) as client:
        result = await (
            await client.generate("tiny-musicgen", "x", duration=1.0, extend_stride=10.0)
        ).collect()
    assert result.error is not None
    assert (result.error.code, result.error.field) == ("unsupported", "params.extend_stride")


async def test_bad_uploads_are_refused_before_they_are_queued(server: Any) -> None:
    """Uploads are decoded and checked before `queued` (in a worker pool): a bad one
    ends its request at once, with no `queued`, no `started` and no stats."""
    async with connect(server.url) as client:
        running = await client.generate("tiny-musicgen", "busy", duration=3.0)
        bad = await client.generate(
            "tiny-musicgen", "x", duration=2.0, inputs={"continuation": b"garbage"}
        )
        events = [event async for event in bad]
        good = await client.generate(
            "tiny-musicgen", "x", duration=2.0, inputs={"continuation": clip_bytes(1.0)}
        )
        good_events = [event async for event in good]
        await running.collect()
    assert len(events) == 1 and isinstance(events[0], Done)
    assert events[0].status == "error" and events[0].stats is None
    assert (events[0].error.code, events[0].error.field) == (  # type: ignore[union-attr]
        "invalid_field",
        "inputs.continuation",
    )
    # A good upload is queued once checked, then runs.
    assert isinstance(good_events[0], Queued) and good_events[-1].status == "completed"  # type: ignore[union-attr]
