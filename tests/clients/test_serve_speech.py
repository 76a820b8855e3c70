"""``wavecast serve`` as a process with a speech model loaded from a folder, its
voices and scenes folders and its flags; the one-line startup errors; saved
models of both families in bfloat16."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import soundfile
from helpers import WAVECAST, served, timeout

from wavecast.clients import SyncClient
from wavecast.server.engines.testing.higgs import build_tiny_higgs, save_tiny_higgs


def get(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def without_audiocraft(tmp_path: Path) -> dict[str, str]:
    """An environment in which any import of audiocraft fails."""
    shadow = tmp_path / "shadow" / "audiocraft"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("audiocraft is not installed")\n')
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_serve_a_saved_speech_model_with_voices_and_scenes_without_audiocraft(
    tmp_path: Path,
) -> None:
    """A saved folder, its voices and scenes folders and its flags. A server of
    speech models alone never imports audiocraft (seconds of startup, and a
    dependency it does not need): here any import of it fails."""
    folder, _ = save_tiny_higgs(build_tiny_higgs(), tmp_path / "higgs")
    voices = tmp_path / "voices"
    voices.mkdir()
    t = np.arange(16000) / 16000
    soundfile.write(str(voices / "anna.wav"), (0.3 * np.sin(2 * np.pi * 180 * t)), 16000)
    (voices / "anna.txt").write_text("Hello, I am Anna.")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "stage.txt").write_text("Recorded on a theatre stage.\n")
    args = ["--model", str(folder), "--voices-dir", str(voices), "--scenes-dir", str(scenes)]
    args += ["--max-new-tokens", "100", "--max-prompt-chars", "60"]
    with served(args, tmp_path / "server.log", without_audiocraft(tmp_path)) as port:
        assert get(port, "/v1/voices") == {
            "voices": [
                {
                    "name": "anna",
                    "file": "anna.wav",
                    "type": "wav",
                    "seconds": 1.0,
                    "transcript": "Hello, I am Anna.",
                }
            ],
            "count": 1,
        }
        listed = get(port, "/v1/scenes")
        assert listed == {
            "scenes": [
                {"name": "stage", "file": "stage.txt", "content": "Recorded on a theatre stage."}
            ],
            "count": 1,
        }
        with SyncClient(f"ws://127.0.0.1:{port}/v1/stream") as client:
            (info,) = client.hello.models
            assert info.name == str(folder) and info.test_model  # the folder's marker
            assert info.voices == ("anna",) and info.scenes == ("stage",)
            spec = next(s for s in info.params if s.name == "max_new_tokens")
            assert (spec.default, spec.max) == (100, 100)
            scene = next(s for s in info.params if s.name == "scene")
            assert scene.default == ""  # no quiet_indoor in this scenes folder
            result = client.speak(
                info.name, "Hi there.", voice="anna", scene="stage", max_new_tokens=20
            ).collect()
            assert result.status == "completed" and result.frames == 16 * 960
            long = client.speak(info.name, "x" * 61).collect()
            assert long.error is not None and long.error.field == "prompt"
    assert "audiocraft" not in (tmp_path / "server.log").read_text()


def test_a_musicgen_model_without_audiocraft_says_so_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*WAVECAST, "serve", "--port", "0", "--model", "tiny-musicgen"],
        env=without_audiocraft(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 1 and len(errors) == 1
    assert "MusicGen models need audiocraft" in errors[0]


def run_serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    return subprocess.run(
        [*WAVECAST, "serve", "--port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )


def test_unreachable_speech_model_says_so_in_one_line(tmp_path: Path) -> None:
    result = run_serve(["--model", "bosonai/higgs-audio-v2-generation-3B-base"], tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "higgs-audio-v2-generation-3B-base" in errors[0]
    assert "--model tiny-higgs" in errors[0]


def test_bad_voice_file_stops_the_server_with_its_name(tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "broken.wav").write_bytes(b"RIFF not really a wav file")
    result = run_serve(["--model", "tiny-higgs", "--voices-dir", str(voices)], tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "broken.wav" in errors[0]


def test_serve_saved_models_in_bfloat16(tmp_path: Path) -> None:
    """``--dtype`` (here from the environment) reaches both families' real loading
    code (a saved folder each), and the greeting and /v1/info say what runs."""
    from wavecast.server.engines.musicgen.loading import save_musicgen
    from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

    speech, _ = save_tiny_higgs(build_tiny_higgs(), tmp_path / "higgs")
    music = tmp_path / "music"
    save_musicgen(build_tiny_musicgen(), music)
    env = {**os.environ, "WAVECAST_DTYPE": "bfloat16"}
    args = ["--model", str(speech), "--model", str(music)]
    with (
        served(args, tmp_path / "server.log", env) as port,
        SyncClient(f"ws://127.0.0.1:{port}/v1/stream") as client,
    ):
        formats = {m.name: (m.device, m.dtype) for m in client.hello.models}
        assert formats == {str(speech): ("cpu", "bfloat16"), str(music): ("cpu", "bfloat16")}
        listed = get(port, "/v1/info")
        assert isinstance(listed, dict)
        assert {m["dtype"] for m in listed["models"]} == {"bfloat16"}
        said = client.speak(str(speech), "Hi there.", max_new_tokens=20).collect()
        assert said.status == "completed" and said.frames == 16 * 960
        played = client.generate(str(music), "a drum", duration=0.5).collect()
        assert played.status == "completed" and played.frames == 25 * 640
        url = f"ws://127.0.0.1:{port}/v1/stream"
        shown = subprocess.run(
            [*WAVECAST, "models", "--url", url], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        said_of = shown.stdout.split("\n\n")
        assert said_of[0].startswith(f"{speech}  (TEST MODEL")
        assert "higgs · 24000 Hz mono" in said_of[0] and "cpu bfloat16" in said_of[0]
        assert "\n  voices: none\n  scenes: cafe, podcast_studio, quiet_indoor" in said_of[0]
        assert "musicgen · 32000 Hz mono" in said_of[1] and "cpu bfloat16" in said_of[1]
    # (A flag over the environment: test_cli.py's test_dtype_from_flag_and_environment.)
