"""The audio's formats on the wire: G.711 mu-law and A-law (PROTOCOL.md §4.5)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from wavecast.clients.client import g711_table
from wavecast.server.audio import alaw, mulaw, to_pcm

SAMPLES = np.arange(-32768, 32768, dtype=np.int32)  # every 16-bit sample
CODERS = {"pcm_mulaw": (mulaw, "ULAW"), "pcm_alaw": (alaw, "ALAW")}


@pytest.mark.parametrize("format", CODERS)
def test_the_clients_g711_decoding_is_every_decoders(format: str) -> None:
    """Each of the 256 codes decodes to what libsndfile (and so a WAV reader) says."""
    subtype = CODERS[format][1]
    codes = io.BytesIO(np.arange(256, dtype=np.uint8).tobytes())
    expected, _ = soundfile.read(
        codes, dtype="int16", format="RAW", samplerate=8000, channels=1, subtype=subtype
    )
    assert np.array_equal(g711_table(format), expected)


@pytest.mark.parametrize("format", CODERS)
def test_g711_coding_quantizes_every_sample_to_a_neighbouring_level(format: str) -> None:
    """Every 16-bit sample codes to one of the two levels around it (the highest
    where it is above them all), the levels rise with the sample, and each level
    codes to its own code (mu-law's two zeros to one)."""
    coder = CODERS[format][0]
    table = g711_table(format).astype(np.int32)
    decoded = table[coder(SAMPLES)]
    assert np.all(np.diff(decoded) >= 0)
    levels = np.unique(table)
    above = np.searchsorted(levels, SAMPLES)  # the first level >= the sample
    upper = levels[np.minimum(above, len(levels) - 1)]
    lower = levels[np.maximum(above - 1, 0)]
    assert np.all((decoded == upper) | (decoded == lower))
    codes = np.arange(256)
    back = coder(table)
    negative_zero = 0x7F if format == "pcm_mulaw" else -1
    assert np.array_equal(back[codes != negative_zero], codes[codes != negative_zero])


def test_g711_codes_of_the_reference_coder() -> None:
    """Codes the standard's tables give: silence, and the extremes."""
    extremes = np.array([0, 32767, -32768, 1000, -1000], dtype=np.int32)
    assert mulaw(extremes).tolist() == [0xFF, 0x80, 0x00, 0xCE, 0x4E]
    assert alaw(extremes).tolist() == [0xD5, 0xAA, 0x2A, 0xFA, 0x7A]


@pytest.mark.parametrize("format", CODERS)
def test_g711_bytes_are_the_16_bit_samples_coded(format: str) -> None:
    audio = np.linspace(-1.2, 1.2, 2000, dtype=np.float32).reshape(-1, 2)
    sixteen = np.frombuffer(to_pcm(audio, "pcm_s16le"), "<i2").astype(np.int32)
    assert to_pcm(audio, format) == CODERS[format][0](sixteen).tobytes()
