"""Uploaded audio is decoded within its bounds (PROTOCOL.md §3.3): a few
compressed bytes may hold hours of silence, or many channels; decoding stops
at the limit, and what it holds is never all in memory."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import soundfile

from wavecast.protocol import InvalidField
from wavecast.server.audio import _decode_av, _OverLimit, decode_upload

RATE = 48000


def silence(minutes: int, *, unknown_length: bool = False) -> bytes:
    """A FLAC file of ``minutes`` of silence (a few hundred kilobytes), its
    header's count of samples zeroed (\"unknown\", as FLAC allows) if asked."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", samplerate=RATE, channels=1, format="FLAC") as file:
        minute = np.zeros(RATE * 60, dtype=np.float32)
        for _ in range(minutes):
            file.write(minute)
    data = bytearray(buffer.getvalue())
    if unknown_length:
        # fLaC, a block header, STREAMINFO: its 36-bit total sample count ends
        # byte 18 + 4 after its 3 bits of channels and 5 of bits a sample.
        at = 4 + 4 + 10 + 3  # (the byte holding its top four bits)
        data[at] &= 0xF0
        data[at + 1 : at + 5] = bytes(4)
    return bytes(data)


def peak_of(call: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """What ``call`` raised (None) and the most memory it held at once."""
    tracemalloc.start()
    try:
        call()
        raised = None
    except (InvalidField, _OverLimit) as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


@pytest.mark.parametrize("unknown_length", [False, True], ids=["told", "unknown"])
def test_an_hour_of_compressed_silence_is_refused_without_decoding_it(
    unknown_length: bool,
) -> None:
    data = silence(60, unknown_length=unknown_length)
    assert len(data) < 1 << 20  # (an hour in under a megabyte)
    raised, peak = peak_of(lambda: decode_upload(data, field="inputs.melody", max_seconds=60))
    assert isinstance(raised, InvalidField) and raised.field == "inputs.melody"
    # Its header says how long it is, or it is read to one frame past the limit.
    said = "lasts 3600.0 s" if not unknown_length else "lasts longer"
    assert said in str(raised) and "at most 60 s" in str(raised)
    # Decoded whole, the hour took 0.66 GB; read no further than the limit,
    # a minute's float32 samples at most (11 MB).
    assert peak < 16 << 20, peak


def test_the_other_decoder_stops_at_the_limit_too() -> None:
    data = silence(60)
    raised, peak = peak_of(lambda: _decode_av(data, 60))
    assert isinstance(raised, _OverLimit) and "lasts longer" in raised.what
    assert peak < 16 << 20, peak


def test_a_file_within_the_limit_is_decoded_whole() -> None:
    data = silence(1)
    audio, rate = decode_upload(data, field="inputs.melody", max_seconds=60)
    assert (audio.shape, rate) == ((RATE * 60, 1), RATE)
    # (a header that does not say how long it is: libsndfile says 2**63 - 1)
    unknown = decode_upload(silence(1, unknown_length=True), field="x", max_seconds=60)
    assert (unknown[0].shape, unknown[1]) == ((RATE * 60, 1), RATE)
    audio, rate = _decode_av(data, 60)
    assert (audio.shape, rate) == ((RATE * 60, 1), RATE)
    with pytest.raises(InvalidField, match=r"lasts 60\.0 s; at most 59\.9 s"):
        decode_upload(data, field="inputs.melody", max_seconds=59.9)


def test_more_samples_a_second_than_are_decoded_are_refused() -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((4800, 16), dtype=np.float32), RATE, format="WAV")
    with pytest.raises(InvalidField, match=r"16 channel\(s\) at 48000 Hz") as info:
        decode_upload(buffer.getvalue(), field="inputs.reference", max_seconds=60)
    assert info.value.field == "inputs.reference"
    # Eight channels at 48 kHz, or stereo at 192 kHz, are.
    for channels, rate in ((8, RATE), (2, 192000)):
        buffer = io.BytesIO()
        soundfile.write(buffer, np.zeros((rate // 10, channels), np.float32), rate, format="WAV")
        audio, got = decode_upload(buffer.getvalue(), field="inputs.reference", max_seconds=60)
        assert (audio.shape, got) == ((rate // 10, channels), rate)
