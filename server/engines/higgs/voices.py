"""Named voices and scenes for text-to-speech models.

A voices folder holds one audio file per voice (``NAME.wav``; FLAC, OGG and MP3
too) with an optional transcript of what it says (``NAME.txt``). A scenes folder
holds one text file per scene (``NAME.txt``): a description of the recording
setting that goes into the prompt. Both are read once at startup; a file that
cannot be used stops the server with one line naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wavecast.protocol import InvalidField

from ...audio import decode_upload

__all__ = [
    "BUILTIN_SCENES",
    "Scene",
    "Voice",
    "VoiceLoadError",
    "load_scenes",
    "load_voices",
    "scene_text",
]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_VOICE_SECONDS = 60.0
MAX_SCENE_CHARS = 4000

BUILTIN_SCENES = Path(__file__).resolve().parents[2] / "scenes"


class VoiceLoadError(RuntimeError):
    """A voice or scene file cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Voice:
    """A named reference voice.

    Args:
        name: What ``params.voice`` names it by (the file name without suffix).
        path: The audio file.
        transcript: What the clip says, when a transcript file was given.
        audio: Mono float32 samples.
        sample_rate: Their rate in Hz.
    """

    name: str
    path: Path
    transcript: str | None
    audio: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return float(self.audio.shape[0] / self.sample_rate)

    def describe(self) -> dict[str, object]:
        """The voice as ``GET /v1/voices`` lists it."""
        return {
            "name": self.name,
            "file": self.path.name,
            "type": self.path.suffix.lstrip(".").lower(),
            "seconds": round(self.seconds, 3),
            "transcript": self.transcript,
        }


@dataclass(frozen=True, slots=True)
class Scene:
    """A named scene description."""

    name: str
    path: Path
    content: str

    def describe(self) -> dict[str, object]:
        """The scene as ``GET /v1/scenes`` lists it."""
        return {"name": self.name, "file": self.path.name, "content": self.content}


def load_voices(folder: Path | None) -> dict[str, Voice]:
    """Read every voice in ``folder`` (none when ``folder`` is ``None``)."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise VoiceLoadError(f"voices folder {folder} does not exist")
    voices: dict[str, Voice] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
            continue
        name = path.stem
        if not NAME.match(name):
            raise VoiceLoadError(f"voice file {path}: name must be letters, digits, _ . -")
        if name in voices:
            raise VoiceLoadError(f"voice {name!r} has two audio files in {folder}")
        try:
            audio, rate = decode_upload(
                path.read_bytes(), field=f"voice {name}", max_seconds=MAX_VOICE_SECONDS
            )
        except (InvalidField, OSError) as exc:
            raise VoiceLoadError(f"voice file {path}: {exc}") from exc
        transcript = None
        text_path = path.with_suffix(".txt")
        if text_path.is_file():
            transcript = _read_text(text_path) or None
        voices[name] = Voice(name, path, transcript, audio.mean(axis=1), rate)
    return voices


def load_scenes(folder: Path | None) -> dict[str, Scene]:
    """Read every ``*.txt`` scene in ``folder``."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise VoiceLoadError(f"scenes folder {folder} does not exist")
    scenes: dict[str, Scene] = {}
    for path in sorted(folder.glob("*.txt")):
        if not NAME.match(path.stem):
            raise VoiceLoadError(f"scene file {path}: name must be letters, digits, _ . -")
        content = _read_text(path)
        if not content:
            raise VoiceLoadError(f"scene file {path} is empty")
        if len(content) > MAX_SCENE_CHARS:
            raise VoiceLoadError(f"scene file {path} is over {MAX_SCENE_CHARS} characters")
        scenes[path.stem] = Scene(path.stem, path, content)
    return scenes


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise VoiceLoadError(f"{path}: not readable as UTF-8 text ({exc})") from exc


def scene_text(scenes: Mapping[str, Scene], value: str) -> str:
    """A ``scene`` parameter: a scene's name, or free text used as it is."""
    scene = scenes.get(value.strip())
    return scene.content if scene is not None else value.strip()
