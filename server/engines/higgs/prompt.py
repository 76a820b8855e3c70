"""HiggsAudio v2's prompt: the chat layout its processor renders, audio as
delay-pattern code blocks, and long texts split as the original generation
script splits them (by speaker turn or by word count)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "AUDIO_DELAY",
    "AUDIO_OUT",
    "CHUNK_METHODS",
    "MULTISPEAKER_SYSTEM",
    "SPEAKER_TAG",
    "SYSTEM",
    "PromptAudio",
    "PromptPart",
    "build_preamble",
    "build_prompt",
    "chunk_text",
    "delay_block",
    "normalize_text",
    "turn_parts",
    "user_turn",
]

CHUNK_METHODS = ("none", "speaker", "word", "sentence")

SYSTEM = "Generate audio following instruction."
MULTISPEAKER_SYSTEM = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate "
    "speech for the following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
SPEAKER_TAG = re.compile(r"\[SPEAKER(\d+)\]")
# Scripts written without spaces between words: each character counts as a word
# when chunking by words.
_UNSPACED = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"
)

AUDIO_OUT = "<|AUDIO_OUT|>"
AUDIO_DELAY = "<|reserved_special_token_6|>"


@dataclass(frozen=True, slots=True)
class PromptAudio:
    """Audio codes ``[K, n]`` (codec frames, no stream markers) in a prompt, on
    the host (a prompt is laid out and tokenized there: opening a request's
    next chunk while a step computes waits for no device)."""

    codes: npt.NDArray[np.int64]


PromptPart = str | PromptAudio


def build_prompt(
    system: str,
    scene: str,
    speakers: Sequence[tuple[str, PromptAudio]],
    turns: Sequence[tuple[str, PromptAudio]],
    text: str,
) -> list[PromptPart]:
    """The HiggsAudio v2 chat layout, as its processor's chat template renders it.

    Args:
        system: The system instruction.
        scene: The scene description (may be empty).
        speakers: Voices described in the scene by their audio alone
            (``("SPEAKER0", audio)``), as references without a transcript go.
        turns: Earlier (user text, assistant audio) exchanges: reference voices
            with their transcripts, and chunks already spoken.
        text: What to say now.

    Returns:
        Text and audio parts; each audio part stands for its code block.
    """
    parts = build_preamble(system, scene, speakers, turns)
    parts.append(user_turn(text))
    return parts


def user_turn(text: str) -> str:
    """The prompt's last part (``build_prompt``): the text to say, and the
    answer opened."""
    return (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        + text.strip()
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )


def build_preamble(
    system: str,
    scene: str,
    speakers: Sequence[tuple[str, PromptAudio]],
    turns: Sequence[tuple[str, PromptAudio]],
) -> list[PromptPart]:
    """What ``build_prompt`` lays out before the text to say: the system text,
    the scene, and the ``turns``. With the reference voices' turns alone, the
    beginning that requests of the same voices, scene and system share."""
    parts: list[PromptPart] = [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system.strip()
    ]
    if scene.strip() or speakers:
        parts.append("\n\n<|scene_desc_start|>\n")
        if scene.strip():
            parts.append(scene.strip() + ("\n\n" if speakers else ""))
        for i, (label, audio) in enumerate(speakers):
            parts += [f"{label}: <|audio_out_bos|>", audio, "<|audio_eos|>"]
            if i < len(speakers) - 1:
                parts.append("\n")
        parts.append("\n<|scene_desc_end|>")
    parts.append("<|eot_id|>")
    return parts + turn_parts(turns)


def turn_parts(turns: Sequence[tuple[str, PromptAudio]]) -> list[PromptPart]:
    """Earlier exchanges as ``build_preamble`` lays them out after its
    beginning: each user text, then the assistant's audio."""
    parts: list[PromptPart] = []
    for user, audio in turns:
        parts += [
            "<|start_header_id|>user<|end_header_id|>\n\n" + user.strip() + "<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>",
            audio,
            "<|audio_eos|><|eot_id|>",
        ]
    return parts


def delay_block(codes: npt.NDArray[np.int64], bos: int, eos: int) -> npt.NDArray[np.int64]:
    """Codes ``[K, n]`` -> ``[n + 2 + K - 1, K]``: stream BOS and EOS added, codebook
    ``k`` shifted ``k`` frames late (``HiggsAudioV2Processor.build_delay_pattern``)."""
    k, n = codes.shape
    out = np.full((k, n + 2 + k - 1), bos, dtype=np.int64)
    for i in range(k):
        out[i, i + 1 : i + n + 1] = codes[i]
        out[i, i + n + 1 :] = eos
    return out.T.copy()


def chunk_text(text: str, method: str, max_words: int, max_turns: int) -> list[str]:
    """Split a text as the original HiggsAudio generation script does.

    ``speaker``: one chunk per speaker turn (a line starting with ``[SPEAKERn]``),
    ``max_turns`` turns merged per chunk. ``word``: paragraphs (split on blank
    lines) cut every ``max_words`` words; in scripts written without spaces
    (Chinese, Japanese) each character counts as a word. ``sentence`` (this
    server's own): each sentence a chunk, where ``speakable`` ends one (a
    longer one than ``max_words`` cut as ``word`` cuts it), so that a text
    that comes as it is written is cut the same however its parts come; in a
    dialogue, each with the speaker tag of its turn.
    """
    if method == "sentence":
        pieces, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            pieces.append(text[start : match.end()])
            start = match.end()
        pieces.append(text[start:])
        sentences, tag = [], ""
        for piece in (p.strip() for p in pieces):
            if not piece:
                continue
            if opening := SPEAKER_TAG.match(piece):
                tag = opening.group(0)
            elif tag:
                piece = f"{tag} {piece}"
            sentences += [c.strip() for c in chunk_text(piece, "word", max_words, max_turns)]
        return sentences or [text]
    if method == "speaker":
        turns: list[str] = []
        current = ""
        for raw in text.split("\n"):
            line = raw.strip()
            if SPEAKER_TAG.match(line):
                if current:
                    turns.append(current.strip())
                current = line
            else:
                current = f"{current}\n{line}" if current else line
        if current.strip():
            turns.append(current.strip())
        if max_turns > 1:
            return ["\n".join(turns[i : i + max_turns]) for i in range(0, len(turns), max_turns)]
        return turns
    if method == "word":
        chunks: list[str] = []
        for paragraph in text.split("\n\n"):
            if not paragraph.strip():
                continue
            unspaced = len(_UNSPACED.findall(paragraph)) > len(paragraph.split())
            if unspaced:
                chars = list(paragraph)
                chunks += [
                    "".join(chars[i : i + max_words]) for i in range(0, len(chars), max_words)
                ]
            else:
                words = paragraph.split(" ")
                chunks += [
                    " ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)
                ]
            chunks[-1] += "\n\n"
        return [c for c in chunks if c.strip()] or [text]
    return [text]


# Where a sentence ends in a text that comes as it is written (``speakable``): a
# full stop, question or exclamation mark (or an ellipsis), with what closes a
# quotation after it, before a space; those of scripts written without spaces
# as they are; a line's end. A full stop after a title or a lone capital (an
# initial) is not one (but two stops are: "Mr.. ").
#
# Each run of stops is tried once, from its first, and read once (possessive
# quantifiers): tried from each of its places, a run that no space follows
# would be read again from each (a text of 10,000 full stops took seconds,
# holding the interpreter's lock, so every stream's step too).
_SENTENCE_END = re.compile(
    r"(?<![.!?\u2026])"
    r"(?:(?<![A-Z])(?<!\b[A-Z][a-z])(?<!\bMrs)(?<!\bProf)(?<!\b[Ee]\.g)(?<!\b[Ii]\.e)"
    r"[.!?\u2026]|[.!?\u2026]{2})"
    r"[.!?\u2026]*+[\"'\u201d\u2019\u00bb)\]]*+(?=\s)"
    r"|[\u3002\uff01\uff1f]+[\u201d\u2019\u300d\u300f)\]]*"
    r"|\n"
)


def speakable(text: str, whole: bool) -> tuple[str, str]:
    """A text that comes as it is written, cut where its last whole sentence
    ends (all of it where ``whole``): what can be spoken now, and the rest."""
    if whole:
        return text, ""
    end = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
    return text[:end], text[end:]


def normalize_text(text: str) -> str:
    """Collapse runs of spaces and drop blank lines (paragraph breaks are kept for
    word chunking by the caller); every script passes through unchanged."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = [" ".join(line.split()) for line in paragraph.split("\n") if line.strip()]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)
