"""Messages of the wavecast protocol (PROTOCOL.md §3 and §4).

Every message is a frozen, slotted dataclass whose ``type`` tag names it on the
wire. Use :func:`wavecast.protocol.codec.encode` and
:func:`wavecast.protocol.codec.decode` to turn them into frames and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

__all__ = [
    "AUDIO_FORMATS",
    "CODEC_RATES",
    "DONE_STATUSES",
    "ENCODED_FORMATS",
    "Audio",
    "Cancel",
    "Caption",
    "ClientMessage",
    "Done",
    "ErrorInfo",
    "ErrorMessage",
    "Generate",
    "Hello",
    "Limits",
    "Message",
    "ModelInfo",
    "ParamSpec",
    "ParamValue",
    "Progress",
    "Queued",
    "ServerMessage",
    "Started",
    "Stats",
    "TextInput",
    "Waiting",
    "offset_unit",
]

PROTOCOL_VERSION = 1

# 16-bit and float PCM; G.711's mu-law and A-law (8 bits a sample: telephone lines);
# and one file of a compressed format, in pieces as it is written (§4.5).
AudioFormat = Literal["pcm_s16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw", "mp3", "opus", "flac"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = (
    "pcm_s16le",
    "pcm_f32le",
    "pcm_mulaw",
    "pcm_alaw",
    "mp3",
    "opus",
    "flac",
)
BYTES_PER_SAMPLE: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1}
# MP3, Ogg Opus and FLAC: each stream (and each rendition) is one file, its bytes
# in the ``data`` of its chunks, ``offset`` counting bytes.
ENCODED_FORMATS: tuple[AudioFormat, ...] = ("mp3", "opus", "flac")
# The rates the lossy formats' codecs take (§3.1): Opus's five; MPEG-1's, -2's
# and -2.5's three each. (FLAC and PCM: any.)
CODEC_RATES: dict[str, tuple[int, ...]] = {
    "opus": (8000, 12000, 16000, 24000, 48000),
    "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
}


def offset_unit(format: str, channels: int) -> int:
    """Bytes of ``data`` per unit of ``offset`` (§4.5): a sample frame's bytes
    for PCM, 1 for an encoded format (its offset counts bytes)."""
    return BYTES_PER_SAMPLE[format] * channels if format in BYTES_PER_SAMPLE else 1


# The output rates a ``generate`` may ask for (§3.1): telephony's 8 kHz to 192 kHz.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
# The bit rates of a lossy stream a ``generate`` may ask for (§3.1), bits a second:
# Opus's least to its most for two channels.
MIN_BITRATE = 6000
MAX_BITRATE = 512000

DoneStatus = Literal["completed", "cancelled", "error"]
DONE_STATUSES: tuple[DoneStatus, ...] = ("completed", "cancelled", "error")

ParamValue = int | float | bool | str | None
ParamKind = Literal["int", "float", "bool", "str"]


# -- descriptions carried by the greeting (§4.1) ---------------------------------


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One generation parameter a model accepts (PROTOCOL.md §5).

    Args:
        name: Key in ``generate.params``.
        kind: ``int``, ``float``, ``bool`` or ``str``.
        default: Value used when the client leaves the parameter out
            (``None``: the model decides, e.g. a random seed).
        min: Smallest accepted value (numbers only).
        max: Largest accepted value (numbers only).
        choices: Accepted values (strings only).
        description: One line for humans.
    """

    name: str
    kind: ParamKind
    default: ParamValue = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the server serves.

    Args:
        name: The name ``generate.model`` uses.
        family: ``musicgen`` (or later families).
        description: One line for humans.
        sample_rate: Output sample rate in Hz.
        channels: Output channel count (PCM is interleaved).
        test_model: True for random-weight test models that make noise.
        max_duration: Longest audio one request may ask for, in seconds.
        params: The parameters ``generate.params`` accepts.
        capabilities: Feature names: ``text``, ``continuation``, ``melody``,
            ``long_form``, ``stereo``, ``mbd``; for speech ``tts``, ``voices``,
            ``reference``, ``scene``, ``dialogue``; ``codes``: its streams'
            codes can be sent, and a cut stream picked up from them
            (PROTOCOL.md §4.1).
        voices: Named voices ``params.voice`` accepts (speech models).
        scenes: Named scenes ``params.scene`` accepts (speech models).
        device: Where the model runs (``cpu``, ``cuda:0``); empty when not said.
        dtype: The generator's number format (``float32``, ``bfloat16``,
            ``float16``); empty when not said.
        codebooks: Codes a timestep of its streams has (``codes``).
    """

    name: str
    family: str
    description: str
    sample_rate: int
    channels: int
    test_model: bool
    max_duration: float
    params: tuple[ParamSpec, ...] = ()
    capabilities: tuple[str, ...] = ()
    voices: tuple[str, ...] | None = None
    scenes: tuple[str, ...] | None = None
    device: str = ""
    dtype: str = ""
    codebooks: int | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Server limits announced in the greeting (PROTOCOL.md §7)."""

    max_frame_bytes: int
    max_requests_per_connection: int
    max_queue: int
    max_active: int
    max_prompt_chars: int
    send_buffer_bytes: int
    max_upload_bytes: int = 0
    max_upload_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Stats:
    """Statistics of a finished request (all times in seconds).

    Args:
        audio_seconds: Audio produced.
        wall_seconds: From ``started`` to the end of the request.
        first_audio_seconds: From ``started`` to the first ``audio``
            (``None`` if no audio was sent).
        real_time_factor: ``audio_seconds / wall_seconds`` (above 1 is faster
            than real time).
        samples: Sample frames produced (per channel).
        queued_seconds: Time spent waiting in the queue.
    """

    audio_seconds: float
    wall_seconds: float
    first_audio_seconds: float | None
    real_time_factor: float
    samples: int
    queued_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A typed error: stable ``code``, message, offending ``field`` if any."""

    code: str
    message: str
    field: str | None = None


# -- client -> server (§3) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generate:
    """Start a generation (PROTOCOL.md §3.1).

    Args:
        id: Client-chosen request id, unique among the connection's requests
            in flight (1 to 64 printable characters).
        model: A model name from the greeting.
        prompt: The text prompt.
        params: Model parameters (see the model's ``params`` in the greeting).
        format: Encoding of the ``audio`` messages: PCM, or one file.
        sample_rate: The rate of the ``audio`` messages in Hz (``None``: the
            model's own); the server resamples the stream to it.
        bitrate: Bits a second of an ``mp3`` or ``opus`` stream (``None``: the
            server's choice for the rate and channels).
        inputs: Uploaded audio files by role (``continuation``, ``melody``), as
            the bytes of a WAV, FLAC, OGG or MP3 file (PROTOCOL.md §3.1).
        resume: Sample frames of the live stream the client already has, from
            a try of the same request that was cut (``params.seed`` as its
            ``started`` gave it): the server makes the stream again and sends it
            from there (PROTOCOL.md §3.1). For an encoded format, the bytes of
            the live file it has, with ``resume_until``.
        resume_until: With ``resume``, for an encoded format: the ``until``
            of the last live ``audio`` message the client has (the sample
            frames its bytes hold): the file goes on from there.
        codes: Send the live stream's codes with its audio (PROTOCOL.md §4.5;
            models with the ``codes`` capability).
        resume_codes: With ``resume``, the codes the cut try sent (its
            ``audio`` messages' ``codes``, joined): the server picks the stream
            up from them instead of making it again from its start.
        text_stream: The text comes as it is written: ``prompt`` is its
            beginning, and ``text`` frames bring the rest (PROTOCOL.md §3.4;
            models with the ``text_stream`` capability).
        captions: Say which text the live stream's audio speaks, a ``caption``
            message as each text chunk's audio begins (PROTOCOL.md §4.9;
            models with the ``captions`` capability).
        resume_flushes: With ``resume`` and ``text_stream``: where the cut
            try's ``text`` parts sent with ``flush`` ended, in characters of
            ``prompt`` (all of its text so far), ascending (PROTOCOL.md §3.4).
        resume_waits: With ``resume`` and ``text_stream``, for an encoded
            format: the cut try's ``waiting`` messages' ``frames`` and
            ``silence``, a pair each, in order: where its file got silence
            (PROTOCOL.md §3.4).
    """

    type: ClassVar[str] = "generate"
    id: str
    model: str
    prompt: str = ""
    params: dict[str, ParamValue] = field(default_factory=dict)
    format: AudioFormat = "pcm_s16le"
    inputs: dict[str, bytes] | None = None
    sample_rate: int | None = None
    bitrate: int | None = None
    resume: int | None = None
    codes: bool | None = None
    resume_codes: bytes | None = None
    text_stream: bool | None = None
    captions: bool | None = None
    resume_until: int | None = None
    resume_flushes: tuple[int, ...] | None = None
    resume_waits: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel a request in flight (PROTOCOL.md §3.2)."""

    type: ClassVar[str] = "cancel"
    id: str


@dataclass(frozen=True, slots=True)
class TextInput:
    """More text for a request opened with ``text_stream`` (PROTOCOL.md §3.4).

    Args:
        id: The request.
        text: The text's next part (it joins the parts before it as written).
        flush: Speak what has come so far now, mid-sentence too.
        end: The text's last part: the stream ends once it is spoken.
    """

    type: ClassVar[str] = "text"
    id: str
    text: str = ""
    flush: bool | None = None
    end: bool | None = None


# -- server -> client (§4) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The greeting, sent once right after the connection opens (§4.1)."""

    type: ClassVar[str] = "hello"
    server: str
    version: str
    protocol: int
    models: tuple[ModelInfo, ...]
    limits: Limits


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits; ``position`` 1 is next in line (§4.2)."""

    type: ClassVar[str] = "queued"
    id: str
    position: int


@dataclass(frozen=True, slots=True)
class Started:
    """The request left the queue and is being generated (§4.3).

    ``seed`` is the random seed in use, so that a result can be reproduced.
    ``seconds`` is the length of the live stream when it is known before it
    starts (music); ``max_seconds`` the most it can carry when only a limit is
    known (speech).
    """

    type: ClassVar[str] = "started"
    id: str
    model: str
    sample_rate: int
    channels: int
    format: AudioFormat
    seed: int | None = None
    seconds: float | None = None
    max_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Generation progress: ``fraction`` in [0, 1], ``seconds`` generated (§4.4).

    ``stage`` is absent while the model generates, ``"prepare"`` (before
    ``started``) while the request's inputs are analysed (its text encoded, a
    melody's chroma, a continuation's prompt: 0 at once, and more as a long
    analysis goes), ``"mbd"`` while Multi-Band Diffusion renders the final
    version; ``fraction`` counts within the stage.
    """

    type: ClassVar[str] = "progress"
    id: str
    fraction: float
    seconds: float
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class Waiting:
    """A stream whose text comes as it is written has spoken all of it so far
    (§4.8): every ``audio`` of it came before this, and it waits for more.

    ``seconds`` is the audio generated so far (as ``progress`` counts it).
    ``silence``: in an encoded ``format``, the frames of silence its file got
    here, so that all of that audio plays (the encoder's last frame filled).
    ``frames``: the live stream's sample frames so far, at its rate (in a file,
    the silence of the waits apart): where that silence is.
    """

    type: ClassVar[str] = "waiting"
    id: str
    seconds: float
    silence: int | None = None
    frames: int | None = None


@dataclass(frozen=True, slots=True)
class Caption:
    """The text the live stream speaks from sample frame ``offset`` on (§4.9):
    one chunk of the request's text, as the server cut it, until the next
    caption's ``offset`` (or the stream's end). Sent ahead of that audio."""

    type: ClassVar[str] = "caption"
    id: str
    offset: int
    text: str


@dataclass(frozen=True, slots=True)
class Audio:
    """A chunk of audio (§4.5).

    ``seq`` counts the request's chunks from 0 without gaps; ``offset`` is the
    index of the chunk's first sample frame in the whole stream; ``data`` holds
    interleaved PCM in ``format``. For an encoded format (``mp3``, ``opus``,
    ``flac``) ``data`` holds the next bytes of one file and ``offset`` counts
    bytes. ``rendition`` is absent for the live stream;
    ``"mbd"`` marks a second, complete version of the clip (Multi-Band
    Diffusion) with its own ``seq`` and ``offset`` counting from 0.
    ``codes`` (asked for with ``generate.codes``): the live stream's timesteps
    completed since the last ``codes``, each one's codes as little-endian
    uint16, one timestep after another. ``until`` (an encoded format's live
    stream): the sample frames of the stream that the file up to this
    message's end holds, in whole packets of its codec (a cut stream is picked
    up from there: ``generate.resume_until``).
    """

    type: ClassVar[str] = "audio"
    id: str
    seq: int
    offset: int
    sample_rate: int
    channels: int
    format: AudioFormat
    data: bytes
    rendition: str | None = None
    codes: bytes | None = None
    until: int | None = None

    @property
    def frames(self) -> int:
        """Number of sample frames in ``data`` (0 for an encoded format: a file's
        bytes, its frames known once decoded)."""
        if self.format not in BYTES_PER_SAMPLE:
            return 0
        return len(self.data) // (BYTES_PER_SAMPLE[self.format] * self.channels)


@dataclass(frozen=True, slots=True)
class Done:
    """The one terminal message of every request (§4.6)."""

    type: ClassVar[str] = "done"
    id: str
    status: DoneStatus
    stats: Stats | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """An error that belongs to no request's ``done`` (§4.7).

    Sent for frames that cannot be tied to a request, or that would clash with
    one in flight (duplicate ids, unknown ids in ``cancel``).
    """

    type: ClassVar[str] = "error"
    code: str
    message: str
    field: str | None = None
    id: str | None = None


ClientMessage = Generate | Cancel | TextInput
ServerMessage = (
    Hello | Queued | Started | Progress | Audio | Waiting | Caption | Done | ErrorMessage
)
Message = ClientMessage | ServerMessage
