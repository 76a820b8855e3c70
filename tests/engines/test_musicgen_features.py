"""Stereo, long form and continuation on tiny random-weight models, against
audiocraft's own MusicGen (bit-exact codes with greedy sampling, exact audio)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from helpers import in_parts

from wavecast.protocol import InvalidField, resolve_params
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

HOP = 640


def run(engine: Any, prompt: str, inputs: dict[str, bytes] | None = None, **params: Any) -> Any:
    resolved = resolve_params(engine.info.params, params)
    job = engine.prepare(EngineRequest("t", prompt, resolved, inputs or {}))
    chunks, fractions = [], []
    while True:
        out = engine.step([job])[0]
        fractions.append(out.fraction)
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            break
    return job, np.concatenate(chunks), fractions


def decode(model: Any, codes: torch.Tensor) -> np.ndarray:
    result: np.ndarray = model.compression_model.decode(codes, None)[0].transpose(0, 1).numpy()
    return result


def wav_bytes(audio: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stereo() -> tuple[Any, MusicGenEngine]:
    model = build_tiny_musicgen(stereo=True)
    return model, MusicGenEngine(model, name="tiny-musicgen-stereo", test_model=True)


@pytest.fixture(scope="module")
def windowed() -> tuple[Any, MusicGenEngine]:
    """A 2-second window, so that long form needs several windows quickly."""
    model = build_tiny_musicgen(window=2.0, seed=3)
    return model, MusicGenEngine(model, name="tiny-2s", test_model=True, max_duration=12.0)


def test_stereo_streams_two_interleaved_channels(stereo: Any) -> None:
    model, engine = stereo
    assert engine.info.channels == 2 and "stereo" in engine.info.capabilities
    job, audio, _ = run(engine, "wide pads", duration=1.0, top_k=1)
    codes = engine.codes_of(job)
    model.set_generation_params(duration=1.0, top_k=1)
    _, reference = model.generate(["wide pads"], return_tokens=True)
    assert codes.shape == (1, 8, 50) and torch.equal(codes, reference)
    full = decode(model, codes)
    assert audio.shape == full.shape == (50 * HOP, 2)
    assert np.abs(audio - full).max() <= 1e-4
    assert not np.array_equal(audio[:, 0], audio[:, 1])  # really two channels


@pytest.mark.parametrize(("duration", "stride"), [(5.0, 1.0), (7.3, 1.5), (4.0, 0.5)])
def test_long_form_equals_audiocraft_extension(
    windowed: Any, duration: float, stride: float
) -> None:
    model, engine = windowed
    assert "long_form" in engine.info.capabilities
    job, audio, fractions = run(
        engine, "a long piece", duration=duration, top_k=1, extend_stride=stride
    )
    codes = engine.codes_of(job)
    model.set_generation_params(duration=duration, top_k=1, extend_stride=stride)
    _, reference = model.generate(["a long piece"], return_tokens=True)
    assert torch.equal(codes, reference)
    frames = codes.shape[-1]
    # audiocraft's window arithmetic in floats can end one frame short (7.3 s: 364)
    assert abs(frames - duration * 50) <= 1
    # streamed across every window boundary: no gap, no repeat, no seam
    full = decode(model, codes)
    assert audio.shape == full.shape == (frames * HOP, 1)
    assert np.abs(audio - full).max() <= 1e-4
    # progress covers the whole length
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert max(fractions[:-1]) < 1.0


def test_long_form_sampled_is_reproducible(windowed: Any) -> None:
    _, engine = windowed
    job_a, a, _ = run(engine, "x", duration=4.5, seed=12, extend_stride=1.0)
    codes_a = engine.codes_of(job_a)
    job_b, b, _ = run(engine, "x", duration=4.5, seed=12, extend_stride=1.0)
    assert torch.equal(engine.codes_of(job_b), codes_a)
    # Where the chunks split depends on the stream's lead: float rounding only.
    assert a.shape == b.shape == (225 * HOP, 1) and np.abs(a - b).max() <= 1e-6


def test_duration_beyond_the_server_limit_is_refused(windowed: Any) -> None:
    _, engine = windowed
    with pytest.raises(InvalidField) as info:
        resolve_params(engine.info.params, {"duration": 12.5})
    assert info.value.field == "params.duration"


@pytest.mark.parametrize("include_prompt", [False, True])
def test_continuation_matches_generate_continuation(windowed: Any, include_prompt: bool) -> None:
    model, engine = windowed
    t = np.arange(44100) / 44100
    clip = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[:, None]
    job, audio, _ = run(
        engine,
        "go on",
        {"continuation": wav_bytes(clip, 44100)},
        duration=4.0,
        top_k=1,
        extend_stride=1.0,
        include_prompt=include_prompt,
    )
    codes = engine.codes_of(job)
    model.set_generation_params(duration=4.0, top_k=1, extend_stride=1.0)
    _, reference = model.generate_continuation(
        torch.from_numpy(clip.T.copy())[None], 44100, ["go on"], return_tokens=True
    )
    assert torch.equal(codes, reference)
    full = decode(model, codes)
    skip = 0 if include_prompt else 50 * HOP  # the 1 s prompt is not re-sent unless asked
    assert audio.shape == full[skip:].shape
    assert np.abs(audio - full[skip:]).max() <= 1e-4


def test_continuation_accepts_stereo_flac_and_mp3(windowed: Any) -> None:
    _, engine = windowed
    t = np.arange(24000) / 48000
    stereo_clip = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 500 * t)], 1) * 0.2
    for fmt in ("FLAC", "MP3"):
        data = wav_bytes(stereo_clip.astype(np.float32), 48000, fmt)
        _, audio, _ = run(engine, "x", {"continuation": data}, duration=1.0, top_k=1)
        assert audio.shape == (25 * HOP, 1), fmt  # 1 s in all, 0.5 s of it new


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not audio at all", "could not be decoded"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "could not be decoded"),
    ],
)
def test_bad_uploads_are_clear_errors(windowed: Any, data: bytes, message: str) -> None:
    _, engine = windowed
    params = resolve_params(engine.info.params, {"duration": 2.0})
    with pytest.raises(InvalidField) as info:
        engine.prepare(EngineRequest("t", "x", params, {"continuation": data}))
    assert info.value.field == "inputs.continuation" and message in info.value.message


def test_too_long_and_empty_uploads(windowed: Any) -> None:
    _, engine = windowed
    params = resolve_params(engine.info.params, {"duration": 3.0})
    too_long = wav_bytes(np.zeros((16000 * 61, 1), np.float32), 16000)
    with pytest.raises(InvalidField, match="at most 60 s"):
        engine.prepare(EngineRequest("t", "x", params, {"continuation": too_long}))
    longer_than_duration = wav_bytes(np.zeros((32000 * 3, 1), np.float32), 32000)
    with pytest.raises(InvalidField, match="must be shorter"):
        engine.prepare(EngineRequest("t", "x", params, {"continuation": longer_than_duration}))
    empty = wav_bytes(np.zeros((0, 1), np.float32), 32000)
    with pytest.raises(InvalidField):
        engine.prepare(EngineRequest("t", "x", params, {"continuation": empty}))


@pytest.fixture(scope="module")
def melodic() -> tuple[Any, MusicGenEngine]:
    model = build_tiny_musicgen(melody=True, window=2.0, seed=5)
    return model, MusicGenEngine(model, name="tiny-melody", test_model=True, max_duration=10.0)


@pytest.mark.parametrize("duration", [1.5, 5.0])
def test_melody_matches_generate_with_chroma(melodic: Any, duration: float) -> None:
    """Chroma of the reference's melodic stems (Demucs), wrapped across windows."""
    model, engine = melodic
    assert "melody" in engine.info.capabilities
    rng = np.random.default_rng(1)
    reference = (0.2 * rng.standard_normal((int(44100 * 1.3), 2))).astype(np.float32)
    job, audio, _ = run(
        engine,
        "hum",
        {"melody": wav_bytes(reference, 44100)},
        duration=duration,
        top_k=1,
        extend_stride=1.0,
        seed=7,
    )
    codes = engine.codes_of(job)
    model.set_generation_params(duration=duration, top_k=1, extend_stride=1.0)
    random.seed(7)  # Demucs shifts its input at random, with Python's random
    _, expected = model.generate_with_chroma(
        ["hum"], torch.from_numpy(reference.T.copy()), 44100, return_tokens=True
    )
    assert torch.equal(codes, expected)
    assert np.abs(audio - decode(model, codes)).max() <= 1e-4


def test_melody_seed_reproduces(melodic: Any) -> None:
    _, engine = melodic
    rng = np.random.default_rng(3)
    reference = wav_bytes((0.3 * rng.standard_normal((30000, 1))).astype(np.float32), 22050)
    job_a, a, _ = run(engine, "x", {"melody": reference}, duration=3.0, seed=9, extend_stride=1.0)
    codes_a = engine.codes_of(job_a)
    random.random()  # whatever else uses Python's random in between
    job_b, b, _ = run(engine, "x", {"melody": reference}, duration=3.0, seed=9, extend_stride=1.0)
    assert torch.equal(engine.codes_of(job_b), codes_a)
    # The same music; where the chunks split (it depends on the stream's lead over
    # real time) moves float rounding only.
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_melody_changes_the_music(melodic: Any) -> None:
    _, engine = melodic
    rng = np.random.default_rng(2)
    reference = wav_bytes((0.3 * rng.standard_normal((44100, 1))).astype(np.float32), 44100)
    _, with_melody, _ = run(engine, "x", {"melody": reference}, duration=1.0, top_k=1)
    _, without, _ = run(engine, "x", duration=1.0, top_k=1)
    assert not np.array_equal(with_melody, without)


def test_bad_melody_upload(melodic: Any) -> None:
    _, engine = melodic
    params = resolve_params(engine.info.params, {"duration": 1.0})
    with pytest.raises(InvalidField) as info:
        engine.prepare(EngineRequest("t", "x", params, {"melody": b"\x00" * 100}))
    assert info.value.field == "inputs.melody"


@pytest.mark.parametrize("pipelined", [False, True])
def test_mbd_rendition_equals_tokens_to_wav(windowed: Any, pipelined: bool) -> None:
    """The stepped diffusion is audiocraft's MultiBandDiffusion.tokens_to_wav
    (pipelined steps too: the live stream's last codes read a step later)."""
    from wavecast.server.engines.musicgen.mbd import MBD_STEPS
    from wavecast.server.engines.testing.mbd import build_tiny_mbd

    model, _ = windowed
    mbd = build_tiny_mbd(model.compression_model)
    engine = MusicGenEngine(
        model, name="m", test_model=True, max_duration=12.0, mbd=mbd, pipelined=pipelined
    )
    assert "mbd" in engine.info.capabilities
    resolved = resolve_params(
        engine.info.params, {"duration": 3.0, "seed": 21, "mbd": True, "extend_stride": 1.0}
    )
    job = engine.prepare(EngineRequest("t", "x", resolved))
    live, stages, rendition = [], [], None
    while True:
        out = engine.step([job])[0]
        stages.append(out.stage)
        if out.audio is not None:
            live.append(out.audio)
        if out.rendition is not None:
            rendition = out.rendition
        if out.done:
            break
    codes = engine.codes_of(job)
    torch.manual_seed(21)
    expected = mbd.tokens_to_wav(codes)[0].transpose(0, 1).numpy()
    assert rendition is not None and rendition.shape == expected.shape == (150 * HOP, 1)
    assert np.array_equal(rendition, expected)
    # the live stream came first and is whole; diffusion steps followed, one per call
    assert np.concatenate(live).shape == (150 * HOP, 1)
    assert stages.count("mbd") == len(mbd.DPs) * (len(MBD_STEPS) - 1)
    assert stages[-1] == "mbd" and stages[0] is None


def test_mbd_follows_the_streamed_span_of_a_continuation(windowed: Any) -> None:
    from wavecast.server.engines.testing.mbd import build_tiny_mbd

    model, _ = windowed
    engine = MusicGenEngine(
        model,
        name="m",
        test_model=True,
        max_duration=12.0,
        mbd=build_tiny_mbd(model.compression_model),
    )
    clip = wav_bytes((0.2 * np.ones((16000, 1))).astype(np.float32), 16000)
    resolved = resolve_params(engine.info.params, {"duration": 2.0, "mbd": True})
    job = engine.prepare(EngineRequest("t", "x", resolved, {"continuation": clip}))
    while not (out := engine.step([job])[0]).done:
        pass
    assert out.rendition is not None and out.rendition.shape == (50 * HOP, 1)  # prompt cut


@pytest.mark.parametrize("pipelined", [False, True])
def test_mbd_for_stereo_renders_each_channel(stereo: Any, pipelined: bool) -> None:
    """Left and right codes through the mono MBD as a batch, as audiocraft's demo
    does (stereo's interleaved codebooks fed on the device too, pipelined)."""
    from wavecast.server.engines.testing.mbd import build_tiny_mbd

    model, _ = stereo
    mbd = build_tiny_mbd(model.compression_model.model)
    engine = MusicGenEngine(model, name="s", test_model=True, mbd=mbd, pipelined=pipelined)
    resolved = resolve_params(engine.info.params, {"duration": 1.0, "seed": 4, "mbd": True})
    job = engine.prepare(EngineRequest("t", "x", resolved))
    while not (out := engine.step([job])[0]).done:
        pass
    left, right = model.compression_model.get_left_right_codes(engine.codes_of(job))
    torch.manual_seed(4)
    both = mbd.tokens_to_wav(torch.cat([left, right]))  # [2, 1, T]
    expected = both[:, 0].transpose(0, 1).numpy()
    assert out.rendition is not None and out.rendition.shape == (50 * HOP, 2)
    assert np.array_equal(out.rendition, expected)


class DemucsCalls:
    """Counts the separations of Demucs' segments (forward calls of the model)."""

    def __init__(self, engine: MusicGenEngine) -> None:
        demucs = engine.lm.condition_provider.conditioners["self_wav"].demucs
        self.count = 0
        self.handle = demucs.register_forward_hook(self.called)

    def called(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def test_a_melodys_demucs_runs_one_segment_per_pause(melodic: Any) -> None:
    """A long reference is separated one Demucs segment per unit of preparation
    (the scheduler runs decode steps for the others in between), each segment
    once, and the conditioning equals the one-go separation exactly."""
    model, engine = melodic
    # Another engine over the same model shares the conditioner, and its pieces.
    MusicGenEngine(model, name="again", test_model=True)
    rng = np.random.default_rng(4)
    reference = wav_bytes((0.2 * rng.standard_normal((44100 * 12, 1))).astype(np.float32), 44100)
    params = resolve_params(engine.info.params, {"duration": 1.5, "seed": 3})
    calls = DemucsCalls(engine)
    try:
        per_unit = []
        for item in engine.prepare_steps(EngineRequest("t", "hum", params, {"melody": reference})):
            per_unit.append(calls.take())
            job = item
        assert job is not None
        st = job.state
        # The same conditioning in one go, from the same starting state of random.
        one_go, state = engine.conditioning.one(st.attributes, _seeded(3))
        separated_in_one_go = calls.take()
    finally:
        calls.handle.remove()
    assert max(per_unit) == 1  # never more than one segment between pauses
    assert sum(per_unit) == separated_in_one_go >= 6  # each segment once (12 s, 2 s segments)
    assert state == st.py_random  # what the next long-form window's Demucs starts from
    for name, (embeds, mask) in one_go.items():
        assert torch.equal(st.cfg_conditions[name][0], embeds), name
        assert torch.equal(st.cfg_conditions[name][1], mask), name


def test_long_form_melody_windows_condition_one_segment_per_step(melodic: Any) -> None:
    """Each new long-form window's melody chroma is computed in pieces too: a
    decode step runs at most one Demucs segment, and the codes stay audiocraft's
    (test_melody_matches_generate_with_chroma covers those)."""
    _, engine = melodic
    rng = np.random.default_rng(6)
    reference = wav_bytes((0.2 * rng.standard_normal((44100 * 3, 1))).astype(np.float32), 44100)
    params = resolve_params(engine.info.params, {"duration": 6.0, "extend_stride": 1.0})
    job = engine.prepare(EngineRequest("t", "hum", params, {"melody": reference}))
    calls = DemucsCalls(engine)
    per_step, waiting = [], 0
    try:
        while True:
            out = engine.step([job])[0]
            per_step.append(calls.take())
            waiting += job.state is not None and job.state.conditioning is not None
            if out.done:
                break
    finally:
        calls.handle.remove()
    assert max(per_step) == 1
    assert sum(per_step) >= 2 * 4  # four more windows, each at least two segments
    assert waiting > 0


def _seeded(seed: int) -> Any:
    return random.Random(seed).getstate()


def test_a_continuation_encoded_in_pieces_is_encodecs_encoding() -> None:
    """``encode_in_pieces`` runs EnCodec's ``encode`` a part at a time (a layer
    of its SEANet encoder, a residual block's activation or convolution): its
    codes are ``encode``'s bit for bit; a continuation request's preparation
    takes many units, its prompt those codes; a model in training mode is
    encoded in one part."""
    from wavecast.server.engines.musicgen.encoding import encode_in_pieces

    model = build_tiny_musicgen(window=30.0)
    codec = model.compression_model
    generator = torch.Generator().manual_seed(5)
    for samples in (32000 * 3, 32000 * 4 + 333):
        wav = 0.2 * torch.randn(1, 1, samples, generator=generator)
        with torch.no_grad():
            expected, _ = codec.encode(wav)
            parts, (got, scale) = in_parts(encode_in_pieces(codec, wav))
        assert torch.equal(got, expected) and scale is None and parts >= 10, samples
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    clip = decode(model, torch.randint(0, 64, (1, 4, 60)))
    params = resolve_params(engine.info.params, {"duration": 4.0, "seed": 1})
    request = EngineRequest("c", "go on", params, {"continuation": wav_bytes(clip, 32000)})
    units = list(engine.prepare_steps(request))
    job = units[-1]
    assert job is not None and len(units) > 10
    heard = engine._upload_wav(request, "continuation").unsqueeze(0)
    with torch.no_grad():
        expected, _ = codec.encode(heard)
    assert np.array_equal(job.state.codes[0], expected.numpy())
    engine.finish(job)
    codec.train()
    try:
        with torch.no_grad(), pytest.raises(StopIteration):
            next(encode_in_pieces(codec, wav))
    finally:
        codec.eval()
