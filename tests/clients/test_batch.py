"""``wavecast generate|speak --batch FILE``: many requests at once, a file each."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import soundfile
from helpers import (
    WAVECAST,
    higgs_engines,
    make_config,
    run_cli,
    running_server,
    same_audio,
    timeout,
)

from wavecast.clients.cli import ProgressBar, _read_batch, _slug


def test_a_batch_file_reads_as_prompts_and_json_lines(tmp_path: Path) -> None:
    batch = tmp_path / "batch.txt"
    batch.write_text(
        "# a comment\n"
        "warm lofi beat\n"
        "\n"
        "[SPEAKER0] Hello.\\n[SPEAKER1] Hi!\n"
        '{"text": "said", "output": "a.wav", "seed": 3, "voice": "en_woman"}\n'
    )
    items = _read_batch(ProgressBar(), str(batch))
    assert items is not None
    assert [(i.line, i.prompt, i.params, i.output) for i in items] == [
        (2, "warm lofi beat", {}, None),
        (4, "[SPEAKER0] Hello.\n[SPEAKER1] Hi!", {}, None),
        (5, "said", {"seed": 3, "voice": "en_woman"}, "a.wav"),
    ]
    assert _slug(items[1].prompt) == "hello-hi"
    for bad in ('{"seed": 3}', '{"prompt": "x", "params": {"a": 1}}', "{not json"):
        batch.write_text(bad + "\n")
        assert _read_batch(ProgressBar(), str(batch)) is None
    batch.write_text("# nothing\n")
    assert _read_batch(ProgressBar(), str(batch)) is None


async def test_generate_a_batch_at_once_a_file_each(tmp_path: Path) -> None:
    batch = tmp_path / "prompts.txt"
    lines = [
        "warm lofi beat",
        "# not a prompt",
        '{"prompt": "seeded", "seed": 7, "output": "seeded.wav", "duration": 1}',
        "slow ambient drone",
        '{"prompt": "refused", "top_k": -1}',
        "bright synth pop",
        '{"prompt": "diffused", "mbd": true, "output": "diffused.wav"}',
    ]
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    async with running_server(make_config(max_active=4)) as server:
        peak: list[int] = []
        step = server.scheduler._engines["tiny-musicgen"].step

        def counted(jobs: Any) -> Any:
            peak.append(len(jobs))
            return step(jobs)

        server.scheduler._engines["tiny-musicgen"].step = counted
        code, output = await run_cli(
            "generate", "--url", server.url, "--batch", str(batch), "--duration", "0.5",
            "--jobs", "3", "-o", str(out),
        )  # fmt: skip
        assert code == 1, output  # (one refused)
        names = sorted(p.name for p in out.iterdir())
        assert names == [
            "1-warm-lofi-beat.wav",
            "3-slow-ambient-drone.wav",
            "5-bright-synth-pop.wav",
            "diffused.encodec.wav",  # (the live version; the diffusion one as named)
            "diffused.wav",
            "seeded.wav",
        ]
        assert f"wrote {out / 'seeded.wav'} (1.00 s, seed 7)" in output
        assert "prompts.txt:5: invalid_field" in output and "top_k" in output
        assert "5 of 6 written" in output and "1 failed" in output and "3 at once" in output
        assert max(peak) >= 2  # (stepped together)
        for name in names:
            info = soundfile.info(str(out / name))
            assert info.samplerate == 32000
            assert info.frames == (32000 if name == "seeded.wav" else 16000), name
        # The seeded one is the request alone.
        alone = tmp_path / "alone.wav"
        code, output = await run_cli(
            "generate", "--url", server.url, "--seed", "7", "--duration", "1", "-o", str(alone),
            "seeded",
        )  # fmt: skip
        assert code == 0, output
        assert same_audio(
            soundfile.read(str(alone), dtype="int16")[0].tobytes(),
            soundfile.read(str(out / "seeded.wav"), dtype="int16")[0].tobytes(),
        )
        # Ctrl-C: what is running is cancelled, nothing more starts.
        batch.write_text("\n".join(f"long {i}" for i in range(6)) + "\n")
        stopped = tmp_path / "stopped"
        process = await asyncio.create_subprocess_exec(
            *WAVECAST, "generate", "--url", server.url, "--batch", str(batch),
            "--duration", "60", "--jobs", "2", "-o", str(stopped),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(int(timeout(30) * 20)):
            if server.scheduler.snapshot()["active"] == 2:
                break
            await asyncio.sleep(0.05)
        assert server.scheduler.snapshot()["active"] == 2
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), timeout(30)) == 130
        assert process.stdout is not None
        output = (await process.stdout.read()).decode()
        assert "cancelling 2 request(s)" in output and "0 of 6 written" in output, output
        assert "0 failed" in output
        assert list(stopped.iterdir()) == []
        for _ in range(int(timeout(10) * 20)):
            if server.scheduler.snapshot()["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert server.scheduler.snapshot()["active"] == 0
        # Names that leave the folder, or meet, are refused before anything is sent.
        for bad in ('{"prompt": "x", "output": "../x.wav"}', '{"prompt": "x", "output": "a.wav"}'):
            batch.write_text(bad + "\n" + '{"prompt": "y", "output": "a.wav"}\n')
            code, output = await run_cli(
                "generate", "--url", server.url, "--batch", str(batch), "-o", str(out)
            )
            assert code == 2, output
        code, output = await run_cli("generate", "--url", server.url)
        assert code == 2 and "give a PROMPT, or --batch FILE" in output, output


async def test_speak_a_batch(tmp_path: Path) -> None:
    batch = tmp_path / "lines.txt"
    batch.write_text(
        "[SPEAKER0] Hello there.\\n[SPEAKER1] Hi!\n"
        '{"text": "In a scene.", "scene": "cafe", "output": "cafe.flac"}\n'
    )
    out = tmp_path / "speech"
    async with running_server(make_config(), higgs_engines) as server:
        code, output = await run_cli(
            "speak", "--url", server.url, "--model", "tiny-higgs", "--batch", str(batch),
            "--max-new-tokens", "40", "--format", "flac", "-o", str(out),
        )  # fmt: skip
        assert code == 0, output
        assert sorted(p.name for p in out.iterdir()) == ["1-hello-there-hi.flac", "cafe.flac"]
        for path in out.iterdir():
            assert soundfile.info(str(path)).format == "FLAC"
        code, output = await run_cli(
            "speak", "--url", server.url, "--batch", str(batch), "some text too"
        )
        assert code == 2 and "not TEXT or --text-file too" in output, output
        code, output = await run_cli(
            "speak", "--url", server.url, "--batch", str(batch), "--captions", "x.vtt"
        )
        assert code == 2 and "not with --batch" in output, output
