"""Encoding and decoding of frames (PROTOCOL.md §2).

Binary frames carry msgpack maps; text frames carry the same maps as JSON, with
``audio.data`` as base64. Both functions are pure and validate everything:
:func:`decode` raises a :class:`~wavecast.protocol.errors.ClientError` subclass
for anything that does not follow the spec.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import msgpack

from .errors import BadFrame, InvalidField, UnknownType
from .messages import (
    AUDIO_FORMATS,
    DONE_STATUSES,
    MAX_BITRATE,
    MAX_SAMPLE_RATE,
    MIN_BITRATE,
    MIN_SAMPLE_RATE,
    Audio,
    Cancel,
    Caption,
    Done,
    ErrorInfo,
    ErrorMessage,
    Generate,
    Hello,
    Limits,
    Message,
    ModelInfo,
    ParamSpec,
    ParamValue,
    Progress,
    Queued,
    Started,
    Stats,
    TextInput,
    Waiting,
)

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_PARAMS",
    "MAX_PROMPT_CHARS",
    "decode",
    "decode_client",
    "encode",
    "to_wire",
]

# Hard protocol bounds (§7); the server may announce tighter ones.
MAX_ID_LENGTH = 64
MAX_PARAMS = 32
MAX_INPUTS = 4
MAX_PARAM_NAME = 64
MAX_STRING_PARAM = 4096
MAX_PROMPT_CHARS = 16384
_MAX_FRAME = 256 * 1024 * 1024
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # what msgpack carries

T = TypeVar("T")


# -- encoding ----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclass -> plain map, dropping ``None`` fields (§2.2)."""
    if hasattr(value, "__dataclass_fields__"):
        out: dict[str, Any] = {}
        type_tag = getattr(type(value), "type", None)
        if isinstance(type_tag, str):
            out["type"] = type_tag
        for name in value.__dataclass_fields__:
            item = getattr(value, name)
            if item is not None:
                out[name] = _plain(item)
        return out
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_wire(message: Message) -> dict[str, Any]:
    """Return the map that represents ``message`` on the wire."""
    result: dict[str, Any] = _plain(message)
    return result


def encode(message: Message, *, text: bool = False) -> bytes | str:
    """Encode a message into a frame.

    Args:
        message: Any protocol message.
        text: Produce a JSON text frame instead of a msgpack binary frame.

    Returns:
        ``bytes`` for a binary frame, ``str`` for a text frame.
    """
    wire = to_wire(message)
    if text:
        if isinstance(message, Audio):
            wire["data"] = base64.b64encode(message.data).decode("ascii")
            if message.codes is not None:
                wire["codes"] = base64.b64encode(message.codes).decode("ascii")
        elif isinstance(message, Generate):
            if message.inputs:
                wire["inputs"] = {
                    key: base64.b64encode(value).decode("ascii")
                    for key, value in message.inputs.items()
                }
            if message.resume_codes is not None:
                wire["resume_codes"] = base64.b64encode(message.resume_codes).decode("ascii")
        return json.dumps(wire, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    return packed


# -- decoding ----------------------------------------------------------------------


def decode_client(frame: bytes | str) -> Generate | Cancel | TextInput:
    """Decode a frame a client sent; server-only types are ``UnknownType``.

    Raises:
        BadFrame, UnknownType, InvalidField: As :func:`decode`.
    """
    message = decode(frame, _only=_CLIENT_TYPES)
    assert isinstance(message, Generate | Cancel | TextInput)
    return message


def decode(frame: bytes | str, *, _only: frozenset[str] | None = None) -> Message:
    """Decode and validate a frame.

    Args:
        frame: A binary (msgpack) or text (JSON) frame.

    Returns:
        The message it holds.

    Raises:
        BadFrame: The frame does not hold a msgpack / JSON map.
        UnknownType: ``type`` is missing or unknown.
        InvalidField: A field is missing, mistyped or out of range.
    """
    text = isinstance(frame, str)
    wire = _load_json(frame) if isinstance(frame, str) else _load_msgpack(frame)
    if not isinstance(wire, dict):
        raise BadFrame("a frame must hold a map")
    kind = wire.get("type")
    if not isinstance(kind, str):
        raise UnknownType("missing or non-string 'type'", field="type", id=_maybe_id(wire))
    parser = _PARSERS.get(kind) if _only is None or kind in _only else None
    if parser is None:
        raise UnknownType(f"unknown message type {kind[:40]!r}", field="type", id=_maybe_id(wire))
    try:
        return parser(_Fields(wire, text))
    except InvalidField as exc:
        exc.message_type = kind
        raise


def _load_msgpack(frame: bytes) -> Any:
    if len(frame) > _MAX_FRAME:
        raise BadFrame("frame too large")
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=len(frame),
            max_bin_len=len(frame),
            max_array_len=len(frame),
            max_map_len=len(frame),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # ExtraData, FormatError, StackError, ValueError for bad UTF-8 or ext types.
        raise BadFrame("frame is not a valid msgpack map") from exc


def _load_json(frame: str) -> Any:
    if len(frame) > _MAX_FRAME:
        raise BadFrame("frame too large")
    try:
        return json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadFrame("frame is not valid JSON") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _maybe_id(wire: Mapping[str, Any]) -> str | None:
    """A frame's ``id`` when it is valid (§3.1: 1-64 printable characters): the
    one rule for echoing it. A frame whose id is invalid gets an ``error`` with no
    ``id``, never a ``done`` for that id."""
    value = wire.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    return None


class _Fields:
    """Typed access to a wire map; every getter raises ``InvalidField``."""

    def __init__(self, wire: dict[str, Any], text: bool) -> None:
        self.wire = wire
        self.text = text
        self.id = _maybe_id(wire)

    def _fail(self, name: str, problem: str) -> InvalidField:
        return InvalidField(f"field {name!r} {problem}", field=name, id=self.id)

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.wire or self.wire[name] is None:
            if required:
                raise self._fail(name, "is required")
            return None
        return self.wire[name]

    def string(self, name: str, *, max_len: int, required: bool = True, min_len: int = 0) -> Any:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail(name, "must be a string")
        if not min_len <= len(value) <= max_len:
            raise self._fail(name, f"must have {min_len} to {max_len} characters")
        return value

    def ident(self, name: str = "id") -> str:
        value: str = self.string(name, max_len=MAX_ID_LENGTH, min_len=1)
        if not value.isprintable():
            raise self._fail(name, "must be printable")
        return value

    def integer(self, name: str, *, lo: int = 0, required: bool = True) -> Any:
        value = self._get(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, "must be an integer")
        if value < lo:
            raise self._fail(name, f"must be >= {lo}")
        if value > _INT_MAX:
            raise self._fail(name, f"must be <= {_INT_MAX}")
        return value

    def number(self, name: str, *, required: bool = True) -> Any:
        value = self._get(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, "must be a number")
        if not math.isfinite(value):
            raise self._fail(name, "must be finite")
        return float(value)

    def boolean(self, name: str, *, required: bool = True) -> Any:
        value = self._get(name, required)
        if value is None and not required:
            return None
        if not isinstance(value, bool):
            raise self._fail(name, "must be a boolean")
        return value

    def choice(self, name: str, choices: tuple[T, ...], default: T | None = None) -> T:
        value = self._get(name, default is None)
        if value is None:
            assert default is not None
            return default
        if value not in choices:
            raise self._fail(name, f"must be one of {', '.join(map(repr, choices))}")
        return cast(T, value)

    def binary(self, name: str, *, field: str | None = None, required: bool = True) -> Any:
        label = field or name
        value = self._get(name, required)
        if value is None and not required:
            return None
        if self.text:
            if not isinstance(value, str):
                raise self._fail(label, "must be a base64 string")
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self._fail(label, "is not valid base64") from exc
        if not isinstance(value, bytes):
            raise self._fail(label, "must be binary")
        return value

    def mapping(self, name: str, *, required: bool = True) -> Any:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(name, "must be a map")
        return value

    def array(self, name: str) -> list[Any]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._fail(name, "must be a list")
        return value

    def sub(self, name: str, value: Any) -> _Fields:
        if not isinstance(value, dict):
            raise self._fail(name, "must be a map")
        sub = _Fields(value, self.text)
        sub.id = self.id
        return sub


def _params(f: _Fields) -> dict[str, ParamValue]:
    raw = f.mapping("params", required=False) or {}
    if len(raw) > MAX_PARAMS:
        raise InvalidField(f"at most {MAX_PARAMS} params", field="params", id=f.id)
    out: dict[str, ParamValue] = {}
    for key, value in raw.items():
        name = f"params.{key}"
        if not isinstance(key, str) or not 0 < len(key) <= MAX_PARAM_NAME:
            raise InvalidField("param names must be short strings", field="params", id=f.id)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidField(f"field {name!r} must be finite", field=name, id=f.id)
        if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            raise InvalidField(f"field {name!r} is out of the 64-bit range", field=name, id=f.id)
        if isinstance(value, str) and len(value) > MAX_STRING_PARAM:
            raise InvalidField(f"field {name!r} is too long", field=name, id=f.id)
        if value is not None and not isinstance(value, bool | int | float | str):
            raise InvalidField(f"field {name!r} must be a scalar", field=name, id=f.id)
        out[key] = value
    return out


def _inputs(f: _Fields) -> dict[str, bytes] | None:
    raw = f.mapping("inputs", required=False)
    if raw is None:
        return None
    if len(raw) > MAX_INPUTS:
        raise InvalidField(f"at most {MAX_INPUTS} inputs", field="inputs", id=f.id)
    out: dict[str, bytes] = {}
    for key in raw:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_PARAM_NAME:
            raise InvalidField("input names must be short strings", field="inputs", id=f.id)
        out[key] = f.sub("inputs", raw).binary(key, field=f"inputs.{key}")
    return out


def _sample_rate(f: _Fields) -> int | None:
    rate: int | None = f.integer("sample_rate", lo=MIN_SAMPLE_RATE, required=False)
    if rate is not None and rate > MAX_SAMPLE_RATE:
        raise InvalidField(
            f"field 'sample_rate' must be <= {MAX_SAMPLE_RATE}", field="sample_rate", id=f.id
        )
    return rate


def _bitrate(f: _Fields) -> int | None:
    bitrate: int | None = f.integer("bitrate", lo=MIN_BITRATE, required=False)
    if bitrate is not None and bitrate > MAX_BITRATE:
        raise InvalidField(f"field 'bitrate' must be <= {MAX_BITRATE}", field="bitrate", id=f.id)
    return bitrate


def _flushes(f: _Fields, prompt: str) -> tuple[int, ...] | None:
    """``resume_flushes``: characters of ``prompt``, each above the one before."""
    if f.wire.get("resume_flushes") is None:
        return None
    flushes = f.array("resume_flushes")
    if len(flushes) > len(prompt) + 1:
        raise f._fail("resume_flushes", "has more places than the prompt has characters")
    last = -1
    for at in flushes:
        if isinstance(at, bool) or not isinstance(at, int) or not last < at <= len(prompt):
            raise f._fail(
                "resume_flushes",
                "must be integers, each above the one before, at most the prompt's "
                f"length ({len(prompt)})",
            )
        last = at
    return tuple(flushes)


def _waits(f: _Fields) -> tuple[tuple[int, int], ...] | None:
    """``resume_waits``: pairs of a stream's frame (each above the one before)
    and the frames of silence its file got there (at most a second at the top
    rate); at most one a character of the longest text, and one more."""
    if f.wire.get("resume_waits") is None:
        return None
    waits = f.array("resume_waits")
    if len(waits) > MAX_PROMPT_CHARS + 1:
        raise f._fail("resume_waits", f"has more than {MAX_PROMPT_CHARS + 1} waits")
    out: list[tuple[int, int]] = []
    for pair in waits:
        if not (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in pair)
            and (not out or out[-1][0] < pair[0])
            and 0 <= pair[0] <= _INT_MAX
            and 0 <= pair[1] <= MAX_SAMPLE_RATE
        ):
            raise f._fail(
                "resume_waits",
                "must be pairs of integers, [frames, silence]: the frames each above "
                f"the ones before, the silence from 0 to {MAX_SAMPLE_RATE}",
            )
        out.append((pair[0], pair[1]))
    return tuple(out)


def _generate(f: _Fields) -> Generate:
    ident, model = f.ident(), f.string("model", max_len=256, min_len=1)
    prompt = f.string("prompt", max_len=MAX_PROMPT_CHARS, required=False) or ""
    return Generate(
        id=ident,
        model=model,
        prompt=prompt,
        params=_params(f),
        format=f.choice("format", AUDIO_FORMATS, default="pcm_s16le"),
        inputs=_inputs(f),
        sample_rate=_sample_rate(f),
        bitrate=_bitrate(f),
        resume=f.integer("resume", required=False),
        codes=f.boolean("codes", required=False),
        resume_codes=f.binary("resume_codes", required=False),
        text_stream=f.boolean("text_stream", required=False),
        captions=f.boolean("captions", required=False),
        resume_until=f.integer("resume_until", required=False),
        resume_flushes=_flushes(f, prompt),
        resume_waits=_waits(f),
    )


def _cancel(f: _Fields) -> Cancel:
    return Cancel(id=f.ident())


def _text(f: _Fields) -> TextInput:
    return TextInput(
        id=f.ident(),
        text=f.string("text", max_len=MAX_PROMPT_CHARS, required=False) or "",
        flush=f.boolean("flush", required=False),
        end=f.boolean("end", required=False),
    )


def _param_spec(f: _Fields) -> ParamSpec:
    choices = f.array("choices")
    return ParamSpec(
        name=f.string("name", max_len=MAX_PARAM_NAME, min_len=1),
        kind=f.choice("kind", ("int", "float", "bool", "str")),
        default=f.wire.get("default"),
        min=f.number("min", required=False),
        max=f.number("max", required=False),
        choices=tuple(str(c) for c in choices) if choices else None,
        description=f.string("description", max_len=4096, required=False) or "",
    )


def _model_info(f: _Fields) -> ModelInfo:
    return ModelInfo(
        name=f.string("name", max_len=256, min_len=1),
        family=f.string("family", max_len=64),
        description=f.string("description", max_len=4096, required=False) or "",
        sample_rate=f.integer("sample_rate", lo=1),
        channels=f.integer("channels", lo=1),
        test_model=f.boolean("test_model"),
        max_duration=f.number("max_duration"),
        params=tuple(_param_spec(f.sub("params", p)) for p in f.array("params")),
        capabilities=tuple(str(c) for c in f.array("capabilities")),
        voices=_names(f, "voices"),
        scenes=_names(f, "scenes"),
        device=f.string("device", max_len=64, required=False) or "",
        dtype=f.string("dtype", max_len=32, required=False) or "",
        codebooks=f.integer("codebooks", lo=1, required=False),
    )


def _names(f: _Fields, key: str) -> tuple[str, ...] | None:
    if f.wire.get(key) is None:
        return None
    return tuple(str(name) for name in f.array(key))


def _limits(f: _Fields) -> Limits:
    return Limits(
        max_frame_bytes=f.integer("max_frame_bytes", lo=1),
        max_requests_per_connection=f.integer("max_requests_per_connection", lo=1),
        max_queue=f.integer("max_queue"),
        max_active=f.integer("max_active", lo=1),
        max_prompt_chars=f.integer("max_prompt_chars", lo=1),
        send_buffer_bytes=f.integer("send_buffer_bytes", lo=1),
        max_upload_bytes=f.integer("max_upload_bytes", required=False) or 0,
        max_upload_seconds=f.number("max_upload_seconds", required=False) or 0.0,
    )


def _hello(f: _Fields) -> Hello:
    return Hello(
        server=f.string("server", max_len=256),
        version=f.string("version", max_len=64),
        protocol=f.integer("protocol", lo=1),
        models=tuple(_model_info(f.sub("models", m)) for m in f.array("models")),
        limits=_limits(f.sub("limits", f.mapping("limits"))),
    )


def _queued(f: _Fields) -> Queued:
    return Queued(id=f.ident(), position=f.integer("position", lo=1))


def _started(f: _Fields) -> Started:
    return Started(
        id=f.ident(),
        model=f.string("model", max_len=256, min_len=1),
        sample_rate=f.integer("sample_rate", lo=1),
        channels=f.integer("channels", lo=1),
        format=f.choice("format", AUDIO_FORMATS),
        seed=f.integer("seed", required=False),
        seconds=f.number("seconds", required=False),
        max_seconds=f.number("max_seconds", required=False),
    )


def _progress(f: _Fields) -> Progress:
    return Progress(
        id=f.ident(),
        fraction=f.number("fraction"),
        seconds=f.number("seconds"),
        stage=f.string("stage", max_len=32, required=False),
    )


def _audio(f: _Fields) -> Audio:
    return Audio(
        id=f.ident(),
        seq=f.integer("seq"),
        offset=f.integer("offset"),
        sample_rate=f.integer("sample_rate", lo=1),
        channels=f.integer("channels", lo=1),
        format=f.choice("format", AUDIO_FORMATS),
        data=f.binary("data"),
        rendition=f.string("rendition", max_len=32, required=False),
        codes=f.binary("codes", required=False),
        until=f.integer("until", required=False),
    )


def _stats(f: _Fields) -> Stats:
    return Stats(
        audio_seconds=f.number("audio_seconds"),
        wall_seconds=f.number("wall_seconds"),
        first_audio_seconds=f.number("first_audio_seconds", required=False),
        real_time_factor=f.number("real_time_factor"),
        samples=f.integer("samples"),
        queued_seconds=f.number("queued_seconds", required=False) or 0.0,
    )


def _error_info(f: _Fields) -> ErrorInfo:
    return ErrorInfo(
        code=f.string("code", max_len=64, min_len=1),
        message=f.string("message", max_len=4096),
        field=f.string("field", max_len=256, required=False),
    )


def _done(f: _Fields) -> Done:
    stats = f.mapping("stats", required=False)
    error = f.mapping("error", required=False)
    return Done(
        id=f.ident(),
        status=f.choice("status", DONE_STATUSES),
        stats=_stats(f.sub("stats", stats)) if stats is not None else None,
        error=_error_info(f.sub("error", error)) if error is not None else None,
    )


def _waiting(f: _Fields) -> Waiting:
    return Waiting(
        id=f.ident(),
        seconds=f.number("seconds"),
        silence=f.integer("silence", required=False),
        frames=f.integer("frames", required=False),
    )


def _caption(f: _Fields) -> Caption:
    return Caption(
        id=f.ident(),
        offset=f.integer("offset"),
        text=f.string("text", max_len=MAX_PROMPT_CHARS),
    )


def _error(f: _Fields) -> ErrorMessage:
    return ErrorMessage(
        code=f.string("code", max_len=64, min_len=1),
        message=f.string("message", max_len=4096),
        field=f.string("field", max_len=256, required=False),
        id=f.string("id", max_len=MAX_ID_LENGTH, required=False),
    )


_CLIENT_TYPES = frozenset({"generate", "cancel", "text"})
_PARSERS: dict[str, Callable[[_Fields], Message]] = {
    "generate": _generate,
    "cancel": _cancel,
    "text": _text,
    "hello": _hello,
    "queued": _queued,
    "started": _started,
    "progress": _progress,
    "audio": _audio,
    "done": _done,
    "waiting": _waiting,
    "caption": _caption,
    "error": _error,
}
