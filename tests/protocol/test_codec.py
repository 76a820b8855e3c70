"""Protocol: round trips, golden frames, validation errors, fuzzing. No event loop."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wavecast.protocol import (
    Audio,
    BadFrame,
    Cancel,
    Caption,
    ClientError,
    Done,
    ErrorInfo,
    ErrorMessage,
    Generate,
    Hello,
    InvalidField,
    Limits,
    ModelInfo,
    ParamSpec,
    Progress,
    Queued,
    Started,
    Stats,
    TextInput,
    UnknownType,
    Waiting,
    decode,
    encode,
    to_wire,
)

GOLDEN = Path(__file__).parent / "golden.json"

AUDIO = Audio(
    id="r1",
    seq=0,
    offset=0,
    sample_rate=32000,
    channels=1,
    format="pcm_s16le",
    data=b"\x01\x00\xff\x7f",
)
MESSAGES = [
    Generate(id="r1", model="tiny-musicgen", prompt="lofi beat", params={"duration": 2.5}),
    Generate(id="r2", model="m", params={"top_k": 1, "seed": 7}, format="pcm_f32le"),
    Generate(
        id="r3",
        model="m",
        prompt="go on",
        params={"include_prompt": True},
        inputs={"continuation": b"RIFF\x00\x01"},
    ),
    Generate(
        id="r4",
        model="tiny-higgs",
        prompt="hello",
        format="pcm_mulaw",
        inputs={"reference": b"RIFF"},
        sample_rate=8000,
    ),
    Generate(
        id="r5",
        model="tiny-musicgen",
        prompt="ambient",
        format="opus",
        sample_rate=48000,
        bitrate=32000,
    ),
    Generate(id="r6", model="tiny-musicgen", params={"seed": 7}, resume=12345),
    Generate(
        id="r7",
        model="tiny-musicgen",
        params={"seed": 7},
        resume=640,
        codes=True,
        resume_codes=b"\x01\x00\x02\x00\x03\x00\x3f\x00",
    ),
    Generate(id="r8", model="tiny-higgs", prompt="Hello, ", text_stream=True),
    Generate(id="r9", model="tiny-higgs", prompt="Hi. Bye.", captions=True),
    Generate(
        id="r10",
        model="tiny-musicgen",
        params={"seed": 7},
        format="opus",
        resume=4096,
        resume_until=9600,
    ),
    Generate(
        id="r11",
        model="tiny-higgs",
        prompt="Hello, world. And then",
        params={"seed": 7, "chunk_method": "sentence"},
        resume=24000,
        text_stream=True,
        resume_flushes=(7, 22),
    ),
    Generate(
        id="r12",
        model="tiny-higgs",
        prompt="Hello, world. And then",
        params={"seed": 7, "chunk_method": "sentence"},
        format="opus",
        resume=5000,
        resume_until=48000,
        text_stream=True,
        resume_waits=((30720, 960), (45120, 1200)),
    ),
    Cancel(id="r1"),
    TextInput(id="r8", text="world. And"),
    TextInput(id="r8", text=" then", flush=True, end=True),
    Waiting(id="r8", seconds=2.4),
    Waiting(id="r8", seconds=2.4, silence=1152),
    Waiting(id="r8", seconds=2.4, silence=1152, frames=57600),
    Caption(id="r9", offset=38400, text="Bye."),
    Hello(
        server="wavecast",
        version="0.1.0",
        protocol=1,
        models=(
            ModelInfo(
                name="tiny-musicgen",
                family="musicgen",
                description="test",
                sample_rate=32000,
                channels=1,
                test_model=True,
                max_duration=30.0,
                params=(
                    ParamSpec("duration", "float", 10.0, 0.1, 30.0, None, "seconds"),
                    ParamSpec("mode", "str", "a", choices=("a", "b")),
                ),
                capabilities=("text", "codes"),
                codebooks=4,
            ),
            ModelInfo(
                name="tiny-higgs",
                family="higgs",
                description="speech test",
                sample_rate=24000,
                channels=1,
                test_model=True,
                max_duration=300.0,
                params=(ParamSpec("voice", "str", ""),),
                capabilities=("tts", "voices", "reference", "scene", "dialogue"),
                voices=("belinda", "语音"),
                scenes=("quiet_indoor",),
                device="cuda:0",
                dtype="bfloat16",
            ),
        ),
        limits=Limits(25165824, 8, 32, 4, 2000, 8388608, 16777216, 60.5),
    ),
    Queued(id="r1", position=3),
    Started(
        id="r1", model="tiny-musicgen", sample_rate=32000, channels=1, format="pcm_s16le", seed=42
    ),
    Started(
        id="r2",
        model="tiny-higgs",
        sample_rate=24000,
        channels=1,
        format="pcm_f32le",
        seed=7,
        seconds=None,
        max_seconds=81.92,
    ),
    Started(
        id="r3",
        model="tiny-musicgen",
        sample_rate=32000,
        channels=2,
        format="pcm_s16le",
        seconds=7.5,
    ),
    Progress(id="r1", fraction=0.0, seconds=0.0, stage="prepare"),
    Progress(id="r1", fraction=0.5, seconds=1.25),
    AUDIO,
    dataclasses.replace(AUDIO, id="r7", offset=640, codes=b"\x04\x00\x05\x00\x06\x00\x07\x00"),
    dataclasses.replace(AUDIO, id="r10", offset=4096, format="opus", data=b"OggS", until=10560),
    Done(id="r1", status="completed", stats=Stats(2.0, 0.5, 0.08, 4.0, 64000, 0.0)),
    Done(id="r2", status="error", error=ErrorInfo("invalid_field", "bad", "params.top_k")),
    ErrorMessage(code="unknown_id", message="no request", field="id", id="zz"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("text", [False, True], ids=["msgpack", "json"])
def test_round_trip(message: object, text: bool) -> None:
    frame = encode(message, text=text)  # type: ignore[arg-type]
    assert isinstance(frame, str if text else bytes)
    assert decode(frame) == message


def test_golden_frames() -> None:
    """The bytes on the wire are fixed; web_demo's JS is checked against the same file."""
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) == len(MESSAGES)
    for entry, message in zip(golden, MESSAGES, strict=True):
        assert encode(message).hex() == entry["msgpack"], entry["name"]  # type: ignore[union-attr]
        assert decode(bytes.fromhex(entry["msgpack"])) == message
        assert json.loads(encode(message, text=True)) == entry["json"]  # type: ignore[arg-type]


def test_audio_json_uses_base64() -> None:
    audio = next(m for m in MESSAGES if isinstance(m, Audio))
    wire = json.loads(encode(audio, text=True))  # type: ignore[arg-type]
    assert base64.b64decode(wire["data"]) == b"\x01\x00\xff\x7f"


def test_hello_of_an_older_server_decodes() -> None:
    """A model map without ``device`` and ``dtype`` (servers before them) reads as empty."""
    hello = next(m for m in MESSAGES if isinstance(m, Hello))
    wire = to_wire(hello)
    for model in wire["models"]:
        del model["device"], model["dtype"]
    decoded = decode(msgpack.packb(wire))
    assert isinstance(decoded, Hello)
    assert [(m.device, m.dtype) for m in decoded.models] == [("", ""), ("", "")]
    assert decoded.models[1].voices == hello.models[1].voices


def test_none_fields_are_left_out() -> None:
    wire = msgpack.unpackb(encode(Done(id="x", status="cancelled")))  # type: ignore[arg-type]
    assert wire == {"type": "done", "id": "x", "status": "cancelled"}


@pytest.mark.parametrize(
    ("frame", "error", "field"),
    [
        (b"\xc1", BadFrame, None),  # never-used msgpack byte
        (b"", BadFrame, None),
        (msgpack.packb([1, 2]), BadFrame, None),
        (msgpack.packb({"type": "generate", "id": "a", "model": "m"}) + b"\x00", BadFrame, None),
        ("{not json", BadFrame, None),
        ('{"type": "cancel", "id": NaN}', BadFrame, None),
        (msgpack.packb({"id": "a"}), UnknownType, "type"),
        (msgpack.packb({"type": "dance"}), UnknownType, "type"),
        (msgpack.packb({"type": 5}), UnknownType, "type"),
        (msgpack.packb({"type": "cancel"}), InvalidField, "id"),
        (msgpack.packb({"type": "cancel", "id": ""}), InvalidField, "id"),
        (msgpack.packb({"type": "cancel", "id": "x" * 65}), InvalidField, "id"),
        (msgpack.packb({"type": "cancel", "id": "a\nb"}), InvalidField, "id"),
        (msgpack.packb({"type": "cancel", "id": 5}), InvalidField, "id"),
        (msgpack.packb({"type": "generate", "id": "a"}), InvalidField, "model"),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "prompt": 3}),
            InvalidField,
            "prompt",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "format": "aac"}),
            InvalidField,
            "format",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "bitrate": 5999}),
            InvalidField,
            "bitrate",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "bitrate": 512001}),
            InvalidField,
            "bitrate",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "bitrate": "64k"}),
            InvalidField,
            "bitrate",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "resume": -1}),
            InvalidField,
            "resume",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "resume": 1.5}),
            InvalidField,
            "resume",
        ),
        *(
            (
                msgpack.packb(
                    {"type": "generate", "id": "a", "model": "m", "prompt": "Hi.", **flushes}
                ),
                InvalidField,
                "resume_flushes",
            )
            for flushes in (
                {"resume_flushes": 3},
                {"resume_flushes": [2, 2]},
                {"resume_flushes": [3, 1]},
                {"resume_flushes": [0, 4]},
                {"resume_flushes": [True]},
                {"resume_flushes": [-1]},
                {"resume_flushes": [0, 1, 2, 3, 3]},
            )
        ),
        *(
            (
                msgpack.packb({"type": "generate", "id": "a", "model": "m", **waits}),
                InvalidField,
                "resume_waits",
            )
            for waits in (
                {"resume_waits": 3},
                {"resume_waits": [3]},
                {"resume_waits": [[3]]},
                {"resume_waits": [[3, 1, 1]]},
                {"resume_waits": [[3, 1], [3, 1]]},
                {"resume_waits": [[4, 1], [3, 1]]},
                {"resume_waits": [[-1, 1]]},
                {"resume_waits": [[3, -1]]},
                {"resume_waits": [[3, 192001]]},
                {"resume_waits": [[True, 1]]},
                {"resume_waits": [[3, 1.5]]},
                {"resume_waits": [[i, 0] for i in range(16_386)]},  # (one more than the most)
            )
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "params": [1]}),
            InvalidField,
            "params",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "params": {"top_k": [1]}}),
            InvalidField,
            "params.top_k",
        ),
        (
            msgpack.packb({"type": "generate", "id": "a", "model": "m", "params": {"t": math.inf}}),
            InvalidField,
            "params.t",
        ),
        (
            msgpack.packb(
                {
                    "type": "generate",
                    "id": "a",
                    "model": "m",
                    "params": {str(i): i for i in range(40)},
                }
            ),
            InvalidField,
            "params",
        ),
        (
            '{"type": "audio", "id": "a", "seq": 0, "offset": 0, "sample_rate": 1, '
            '"channels": 1, "format": "pcm_s16le", "data": "!!"}',
            InvalidField,
            "data",
        ),
        (msgpack.packb({"type": "queued", "id": "a", "position": True}), InvalidField, "position"),
    ],
)
def test_invalid_frames(frame: bytes | str, error: type[ClientError], field: str | None) -> None:
    with pytest.raises(error) as info:
        decode(frame)
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.code  # every error has its stable code


def test_error_carries_request_id_and_type() -> None:
    frame = msgpack.packb({"type": "generate", "id": "abc", "model": 1})
    with pytest.raises(InvalidField) as info:
        decode(frame)
    assert info.value.id == "abc"
    assert info.value.message_type == "generate"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_bytes_only_raise_client_errors(data: bytes) -> None:
    with contextlib.suppress(ClientError):
        decode(data)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
)
_values = st.recursive(
    _scalars | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_types = st.sampled_from(
    [
        "generate",
        "cancel",
        "hello",
        "queued",
        "started",
        "progress",
        "audio",
        "done",
        "error",
        "nope",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    _types,
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "model",
                "prompt",
                "params",
                "format",
                "position",
                "seq",
                "offset",
                "data",
                "status",
                "stats",
                "error",
                "models",
                "limits",
                "fraction",
                "seconds",
                "code",
                "message",
                "sample_rate",
                "channels",
                "seed",
                "server",
                "version",
                "protocol",
            ]
        ),
        _values,
        max_size=10,
    ),
)
def test_fuzz_structured_maps(kind: str, fields: dict[str, object]) -> None:
    """Maps of plausible shape: decode returns a message or raises a ClientError."""
    wire = {"type": kind, **fields}
    for frame in (
        msgpack.packb(wire),
        _json_or_none(wire),
        _json_or_none({**wire, "params": {"seed": 2**70}}),
    ):
        if frame is None:
            continue
        try:
            message = decode(frame)
        except ClientError:
            continue
        assert decode(encode(message)) == message


def _json_or_none(wire: dict[str, object]) -> str | None:
    try:
        return json.dumps(wire, allow_nan=False)
    except (TypeError, ValueError):
        return None


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=64).filter(str.isprintable),
    st.text(max_size=200),
    st.dictionaries(
        st.text(min_size=1, max_size=10),
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30),
        max_size=8,
    ),
)
def test_generate_round_trip_property(rid: str, prompt: str, params: dict[str, object]) -> None:
    message = Generate(id=rid, model="m", prompt=prompt, params=params)  # type: ignore[arg-type]
    for text in (False, True):
        assert decode(encode(message, text=text)) == message


def test_protocol_imports_no_io_libraries() -> None:
    code = (
        "import sys, wavecast.protocol\n"
        "bad = {'asyncio', 'websockets', 'numpy', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
