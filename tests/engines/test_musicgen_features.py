"""Stereo, long form and continuation on tiny random-weight models, against
audiocraft's own MusicGen (bit-exact codes with greedy sampling, exact audio)."""

from __future__ import annotations

import dataclasses
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
from wavecast.server.engines.musicgen.engine import MusicGenEngine, StreamSettings
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
    # One sample at 44.1 kHz is none at the model's 32 kHz: refused, by the
    # upload's check and by the preparation (the encoder has nothing to read).
    no_sample = wav_bytes(np.zeros((1, 1), np.float32), 44100)
    for check in (engine.check, engine.prepare):
        with pytest.raises(InvalidField, match="too short") as info:
            check(EngineRequest("t", "x", params, {"continuation": no_sample}))
        assert info.value.field == "inputs.continuation"


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
@pytest.mark.parametrize("models", ["windowed", "stereo"])
def test_a_continuations_frames_are_known_before_it_is_encoded(
    request: pytest.FixtureRequest, models: str, rate: int
) -> None:
    """``prompt_frames`` counts the codec frames a clip's encoding makes from its
    length and rate alone (what ``check`` refuses a clip by, before the request
    is queued): for clips at any rate, of lengths on either side of a frame's
    edge once resampled, mono and stereo."""
    model, engine = request.getfixturevalue(models)
    params = resolve_params(engine.info.params, {"duration": 2.0})
    rng = np.random.default_rng(rate)
    at_rate = engine.hop * rate / model.sample_rate  # a hop's samples at the clip's rate
    for frames in (1, 7, 25, 50):
        for nudge in (-1, 0, 1):
            samples = max(1, round(frames * at_rate) + nudge)
            channels = model.audio_channels
            clip = (0.1 * rng.standard_normal((samples, channels))).astype(np.float32)
            upload = EngineRequest("t", "x", params, {"continuation": wav_bytes(clip, rate)})
            heard = engine._upload_wav(upload, "continuation").unsqueeze(0)
            with torch.no_grad():
                codes, _ = model.compression_model.encode(heard)
            assert engine.prompt_frames(samples, rate) == codes.shape[-1], (samples, rate)


def test_check_refuses_a_continuation_too_long_for_its_duration(windowed: Any) -> None:
    """One frame short of the duration goes (check, then prepare); one sample
    more makes the frame that reaches it, refused by ``check``: before the
    request is queued, without encoding the clip."""
    _, engine = windowed
    params = resolve_params(engine.info.params, {"duration": 1.0})  # 50 frames
    longest = wav_bytes(np.zeros((49 * engine.hop, 1), np.float32), 32000)
    request = EngineRequest("t", "x", params, {"continuation": longest})
    job = engine.prepare(dataclasses.replace(request, decoded=engine.check(request)))
    engine.finish(job)
    one_more = wav_bytes(np.zeros((49 * engine.hop + 1, 1), np.float32), 32000)
    for check in (engine.check, engine.prepare):
        with pytest.raises(InvalidField, match="must be shorter") as info:
            check(EngineRequest("t", "x", params, {"continuation": one_more}))
        assert info.value.field == "inputs.continuation"


def codes_together(engine: MusicGenEngine, prompts: list[str]) -> list[torch.Tensor]:
    """Requests for ``prompts`` started in one step and stepped together to their
    ends: each one's codes."""
    params = resolve_params(engine.info.params, {"duration": 0.5, "seed": 3})
    jobs = [engine.prepare(EngineRequest(f"r{i}", p, params)) for i, p in enumerate(prompts)]
    active = list(jobs)
    while active:
        outputs = engine.step(active)
        active = [job for job, out in zip(active, outputs, strict=True) if not out.done]
    codes = [engine.codes_of(job) for job in jobs]
    for job in jobs:
        engine.finish(job)
    return codes


@pytest.mark.parametrize("which", ["windowed", "melodic"])
def test_a_check_while_the_inference_thread_tokenizes_changes_nothing(
    which: str, request: pytest.FixtureRequest
) -> None:
    """A request's prompt is counted in tokens by its check, on the event loop
    or the upload pool, while the inference thread may be tokenizing a batch of
    descriptions with padding (a crowd's, as here for the text-only model; a
    melody request's text and its null one). A fast tokenizer sets its padding
    in its backend at every call, so the two must not share one: here a check
    runs where a thread switch can put it, between the inference thread's call
    setting the padding on and its encoding the batch (the random clients met
    it twice in some ten thousand requests: the batch came back unpadded and
    the request failed; a crowd's call failed, and each was encoded again
    alone). The requests' codes are the same as without it, and a crowd's
    descriptions are encoded in one call that does not fail."""
    _, engine = request.getfixturevalue(which)
    prompts = ["a melody of nineteen", "drums"]
    want = codes_together(engine, prompts)
    conditioning = engine.conditioning
    tokenizer, together = conditioning.tokenizer, conditioning.together
    setting = tokenizer.set_truncation_and_padding
    checked: list[bool] = []
    raised: list[BaseException] = []

    def recorded(attributes: list[Any]) -> Any:
        try:
            return together(attributes)
        except Exception as exc:
            raised.append(exc)
            raise

    def set_then_check(**arguments: Any) -> None:
        setting(**arguments)
        if arguments["padding_strategy"].value != "do_not_pad" and not checked:
            checked.append(True)
            params = resolve_params(engine.info.params, {"duration": 0.5})
            engine.check(EngineRequest("other", "abc", params))

    tokenizer.set_truncation_and_padding = set_then_check
    conditioning.together = recorded
    try:
        got = codes_together(engine, prompts)
    finally:
        del tokenizer.set_truncation_and_padding, conditioning.together
    assert checked, "the inference thread tokenized no batch with padding"
    assert not raised, raised
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def melodic() -> tuple[Any, MusicGenEngine]:
    model = build_tiny_musicgen(melody=True, window=2.0, seed=5)
    return model, MusicGenEngine(model, name="tiny-melody", test_model=True, max_duration=10.0)


def test_a_melody_without_a_sample_at_the_models_rate_is_refused(melodic: Any) -> None:
    """One sample at 44.1 kHz is none at the model's 32 kHz: nothing for Demucs
    to separate. Refused by the upload's check (before the request is queued)
    and by the preparation; two samples are a melody."""
    _, engine = melodic
    params = resolve_params(engine.info.params, {"duration": 1.0})
    one = wav_bytes(np.zeros((1, 1), np.float32), 44100)
    for check in (engine.check, engine.prepare):
        with pytest.raises(InvalidField, match="too short") as info:
            check(EngineRequest("t", "x", params, {"melody": one}))
        assert info.value.field == "inputs.melody"
    two_samples = wav_bytes(np.zeros((2, 1), np.float32), 44100)
    two = EngineRequest("t", "x", params, {"melody": two_samples})
    engine.finish(engine.prepare(dataclasses.replace(two, decoded=engine.check(two))))


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
    """Counts Demucs' work: its layers' calls (an encoder or decoder layer, a
    layer of the cross-branch transformer: the time branch's beside each is not
    counted apart) and the whole model's forward calls (one a segment, where
    the library separates)."""

    def __init__(self, engine: MusicGenEngine) -> None:
        demucs = engine.lm.condition_provider.conditioners["self_wav"].demucs
        self.layers = self.forwards = 0
        layers = [*demucs.encoder, *demucs.crosstransformer.layers, *demucs.decoder]
        self.handles = [layer.register_forward_hook(self.layer) for layer in layers]
        self.handles.append(demucs.register_forward_hook(self.forward))

    def layer(self, *_: Any) -> None:
        self.layers += 1

    def forward(self, *_: Any) -> None:
        self.forwards += 1

    def take(self) -> tuple[int, int]:
        counts = self.layers, self.forwards
        self.layers = self.forwards = 0
        return counts

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_a_melodys_demucs_runs_one_layer_per_pause(melodic: Any) -> None:
    """A long reference is separated one Demucs layer per unit of preparation
    (the scheduler runs decode steps for the others in between), each segment's
    layers once, and the conditioning equals the library's one-go separation
    exactly, as does the state of Python's ``random`` after it."""
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
        # The same conditioning in one go (the library's separation), from the
        # same starting state of random.
        one_go, state = engine.conditioning.one(st.attributes, _seeded(3))
        layers, segments = calls.take()
    finally:
        calls.remove()
    assert max(layers for layers, _ in per_unit) == 1  # never more than a layer between pauses
    assert sum(forwards for _, forwards in per_unit) == 0  # (no segment in one go)
    assert segments >= 6  # 12 s in 2 s segments
    assert sum(layers for layers, _ in per_unit) == layers == 7 * segments
    assert len(per_unit) > layers  # (and the parts with no layer: the spectrograms)
    assert state == st.py_random  # what the next long-form window's Demucs starts from
    for name, (embeds, mask) in one_go.items():
        assert torch.equal(st.cfg_conditions[name][0], embeds), name
        assert torch.equal(st.cfg_conditions[name][1], mask), name


def test_a_melodys_draws_are_its_own_whatever_other_threads_draw(melodic: Any) -> None:
    """Other threads draw from Python's ``random`` at any time (the event loop's
    keepalive pings do), also while the inference thread is inside a part of a
    melody's conditioning, its operations having let go of the interpreter. Here
    the text encoder and every Demucs layer draw from Python's ``random`` as such
    a thread would: the conditioning in pieces, and the state of the request's
    draws after it (what its next long-form window's Demucs starts from), are
    those made without them."""
    _, engine = melodic
    rng = np.random.default_rng(8)
    reference = wav_bytes((0.2 * rng.standard_normal((44100 * 6, 1))).astype(np.float32), 44100)
    params = resolve_params(engine.info.params, {"duration": 1.5, "seed": 3})

    def conditioned() -> tuple[Any, Any]:
        job = None
        for item in engine.prepare_steps(EngineRequest("t", "hum", params, {"melody": reference})):
            job = item
        assert job is not None
        conditions, state = job.state.cfg_conditions, job.state.py_random
        engine.finish(job)
        return conditions, state

    want, want_state = conditioned()
    conditioners = engine.lm.condition_provider.conditioners
    demucs = conditioners["self_wav"].demucs
    modules = [conditioners["description"].t5, *demucs.encoder, *demucs.decoder]
    modules += [*demucs.crosstransformer.layers, *demucs.crosstransformer.layers_t]

    def another_thread(*_: Any) -> None:
        random.getrandbits(32)  # (a ping's payload, say)

    handles = [module.register_forward_pre_hook(another_thread) for module in modules]
    try:
        got, state = conditioned()
    finally:
        for handle in handles:
            handle.remove()
    assert state == want_state
    for name, (embeds, mask) in want.items():
        assert torch.equal(got[name][0], embeds), name
        assert torch.equal(got[name][1], mask), name


def test_long_form_melody_windows_condition_one_layer_per_step(melodic: Any) -> None:
    """Each new long-form window's melody chroma is computed in pieces too: a
    decode step runs at most one Demucs layer, and the codes stay audiocraft's
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
        calls.remove()
    assert max(layers for layers, _ in per_step) == 1
    assert sum(forwards for _, forwards in per_step) == 0
    assert sum(layers for layers, _ in per_step) >= 7 * 2 * 4  # four windows, two segments
    assert waiting > 0


def test_a_melodys_silent_null_half_is_not_separated(melodic: Any) -> None:
    """The conditioner's separation of a request's pair (its reference, and the
    null half's silence) runs Demucs on the reference alone: silence for the
    silent row, exactly, and audiocraft's stems for the other within float
    rounding (a batch of one is split over the threads otherwise than a batch
    of two), the same draws from ``random``; in parts, the same bits as in one
    go. Where every row sounds, or none, all of them are separated."""
    from wavecast.server.engines.musicgen.melody import StemsInPieces

    model, _ = melodic
    conditioner = model.lm.condition_provider.conditioners["self_wav"]
    stems = StemsInPieces.of(conditioner)
    rows: list[int] = []
    handle = conditioner.demucs.register_forward_pre_hook(
        lambda _, args: rows.append(args[0].shape[0])
    )
    rng = torch.Generator().manual_seed(9)
    pair = torch.zeros(2, 1, 32000 * 3)
    pair[0] = 0.2 * torch.randn(1, 32000 * 3, generator=rng)
    try:
        both, silent = pair[:1].expand(2, -1, -1), pair * 0
        for wav, batch in ((pair, 1), (pair.flip(0), 1), (both, 2), (silent, 2)):
            random.seed(5)
            expected = type(conditioner)._get_stemmed_wav(conditioner, wav, 32000)
            after = random.getstate()
            rows.clear()
            random.seed(5)
            one_go = stems.stemmed_wav(wav, 32000)
            assert random.getstate() == after and set(rows) == {batch}
            assert torch.allclose(one_go, expected, rtol=0.0, atol=1e-6)
            silent = wav.flatten(1).eq(0).all(1)
            assert torch.equal(one_go[silent], expected[silent])
            assert not one_go[silent].any()
            random.seed(5)
            wanted = stems.until_separation(lambda wav=wav: stems.stemmed_wav(wav, 32000))
            _, made = in_parts(stems.separate(wanted))
            assert torch.equal(made.stems, one_go) and made.state == after
    finally:
        handle.remove()


@pytest.mark.parametrize("bag", [False, True])
def test_demucs_in_parts_is_the_librarys_separation(bag: bool) -> None:
    """``apply_in_parts`` gives ``apply_model``'s stems bit for bit, and leaves
    Python's ``random`` as it does (a shift, a positional embedding a segment):
    HTDemucs alone or in a bag, a batch with a silent row (a melody's null
    half), a reference shorter than a segment, without a shift or without
    segments; a model of another kind in one part."""
    from demucs.apply import BagOfModels, apply_model

    from wavecast.server.engines.musicgen.separation import apply_in_parts, parts_of
    from wavecast.server.engines.testing.musicgen import tiny_demucs

    demucs = tiny_demucs().eval()
    model: Any = BagOfModels([demucs]) if bag else demucs
    rng = torch.Generator().manual_seed(8)
    wav = 0.2 * torch.randn(2, 2, 44100 * 4 + 123, generator=rng)
    wav[1] = 0.0
    short = wav[:1, :, : 44100 // 2]
    for x, options in ((wav, {}), (short, {}), (wav, {"shifts": 0}), (short, {"split": False})):
        random.seed(11)
        with torch.no_grad():
            expected = apply_model(model, x, device="cpu", **options)
        after = random.getstate()
        random.seed(11)
        with torch.no_grad():
            parts, got = in_parts(apply_in_parts(model, x, device="cpu", **options))
        assert torch.equal(got, expected), options
        assert random.getstate() == after
        assert parts >= (8 if x is short else 16)
        # The count of its pauses (its progress's measure): at most one
        # segment's more than it made (the random shift may leave one out).
        most = parts_of(model, x.shape[-1], **options)
        assert most - 9 <= parts <= most

    class Plain(torch.nn.Module):  # (not HTDemucs: its forward, whole)
        samplerate, segment, sources = 44100, 2, ["drums", "bass", "other", "vocals"]

        def forward(self, mix: torch.Tensor) -> torch.Tensor:
            return torch.stack([mix * (k + 1) for k in range(4)], 1)

    with torch.no_grad():
        parts, got = in_parts(apply_in_parts(Plain(), short, device="cpu", shifts=0))
        assert torch.equal(got, apply_model(Plain(), short, device="cpu", shifts=0))
    assert parts == 0 == parts_of(Plain(), short.shape[-1], shifts=0)


def _seeded(seed: int) -> Any:
    return random.Random(seed).getstate()


def test_a_continuation_encoded_in_pieces_is_encodecs_encoding() -> None:
    """``encode_in_pieces`` runs EnCodec's ``encode`` a part at a time (a layer
    of its SEANet encoder, a residual block's activation or convolution): its
    codes are ``encode``'s bit for bit, in as many parts as ``parts_of``
    counts; a continuation request's preparation takes many units (saying how
    far its encoding is), its prompt those codes; a model in training mode is
    encoded in one part."""
    from wavecast.server.engines.musicgen.encoding import encode_in_pieces, parts_of

    model = build_tiny_musicgen(window=30.0)
    codec = model.compression_model
    generator = torch.Generator().manual_seed(5)
    for samples in (32000 * 3, 32000 * 4 + 333):
        wav = 0.2 * torch.randn(1, 1, samples, generator=generator)
        with torch.no_grad():
            expected, _ = codec.encode(wav)
            parts, (got, scale) = in_parts(encode_in_pieces(codec, wav))
        assert torch.equal(got, expected) and scale is None and parts >= 10, samples
        assert parts == parts_of(codec)
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    clip = decode(model, torch.randint(0, 64, (1, 4, 60)))
    params = resolve_params(engine.info.params, {"duration": 4.0, "seed": 1})
    request = EngineRequest("c", "go on", params, {"continuation": wav_bytes(clip, 32000)})
    units = list(engine.prepare_steps(request))
    job = units[-1]
    assert job is not None and len(units) > 10
    done = [unit for unit in units[:-1] if unit is not None]
    assert len(done) == parts_of(codec) and done == sorted(done) and done[-1] < 1
    heard = engine._upload_wav(request, "continuation").unsqueeze(0)
    with torch.no_grad():
        expected, _ = codec.encode(heard)
    assert np.array_equal(job.state.codes[0], expected.numpy())
    engine.finish(job)
    codec.train()
    try:
        assert parts_of(codec) == 0
        with torch.no_grad(), pytest.raises(StopIteration):
            next(encode_in_pieces(codec, wav))
    finally:
        codec.eval()


def run_picked_up(
    engine: Any,
    prompt: str,
    known: np.ndarray,
    inputs: dict[str, bytes] | None = None,
    resume: int = 0,
    **params: Any,
) -> tuple[Any, np.ndarray, int, list[Any]]:
    """``run`` picking the stream up from ``known`` ``[K, n]`` codes
    (``generate.resume_codes``), its client having ``resume`` sample frames:
    its job, audio (from ``from_sample`` on), steps and outputs' codes."""
    resolved = resolve_params(engine.info.params, params)
    data = known.T.astype("<u2").tobytes()
    request = EngineRequest("t", prompt, resolved, inputs or {}, resume_codes=data, resume=resume)
    engine.check(request)
    job = engine.prepare(request)
    # The known codes' audio is out before the first step (no step decodes it).
    decoder = job.state.decoder
    if job.extra.get("from_sample", 0) == 0:
        assert decoder.total - decoder.emitted == decoder.holdback
    chunks, codes, steps = [], [], 0
    while True:
        out = engine.step([job])[0]
        steps += 1
        if out.codes:
            codes.append((out.codes_from, out.codes))
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            break
    return job, np.concatenate(chunks), steps, codes


@pytest.mark.parametrize(
    ("duration", "stride", "known"),
    [(1.5, 1.0, 40), (1.5, 1.0, 74), (5.0, 1.0, 60), (5.0, 1.0, 101), (7.3, 1.5, 300)],
)
def test_a_stream_picked_up_from_its_codes_goes_on_as_it_went(
    windowed: Any, duration: float, stride: float, known: int
) -> None:
    """Sampled with a seed, in one window or several (long form, picked up in
    the middle of a later window or where one begins): the codes after the
    known ones are those of the whole run, the audio too (all of it, the known
    codes' made again), in fewer steps."""
    _, engine = windowed
    asked = {"duration": duration, "seed": 5, "extend_stride": stride}
    whole_job, whole, _ = run(engine, "again", **asked)
    whole_codes = engine.codes_of(whole_job)[0].numpy()
    steps_whole = whole_job.steps
    job, audio, steps, sent = run_picked_up(engine, "again", whole_codes[:, :known], **asked)
    assert np.array_equal(engine.codes_of(job)[0].numpy(), whole_codes)
    assert audio.shape == whole.shape and np.abs(audio - whole).max() <= 1e-4
    # The outputs' codes: the timesteps after the known ones, in order.
    assert sent[0][0] == known
    joined = [frame for _, frames in sent for frame in frames]
    assert np.array_equal(np.array(joined).T, whole_codes[:, known:])
    assert steps < steps_whole - known + 10


@pytest.mark.parametrize("heard", [1, 37, 60, 90])
def test_a_stream_picked_up_makes_none_of_the_audio_its_client_has_again(
    windowed: Any, heard: int
) -> None:
    """Its client has ``heard`` frames and a few samples more (the codes go
    further, or stop before): their audio is not made again, the decoder takes
    their codes as context; from the frame they end in, the audio is the
    whole run's."""
    _, engine = windowed
    asked = {"duration": 5.0, "seed": 5, "extend_stride": 1.0}
    whole_job, whole, _ = run(engine, "again", **asked)
    codes = engine.codes_of(whole_job)[0].numpy()
    resume = heard * HOP + 17
    job, audio, _, _ = run_picked_up(engine, "again", codes[:, :60], resume=resume, **asked)
    start = min(heard, 60) * HOP
    assert job.extra["from_sample"] == start
    assert np.array_equal(engine.codes_of(job)[0].numpy(), codes)
    assert audio.shape == whole[start:].shape and np.abs(audio - whole[start:]).max() <= 1e-4


def test_a_continuation_picked_up_from_its_codes_goes_on_as_it_went(windowed: Any) -> None:
    _, engine = windowed
    t = np.arange(44100) / 44100
    clip = wav_bytes((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[:, None], 44100)
    for include_prompt in (False, True):
        asked = {"duration": 4.0, "seed": 8, "extend_stride": 1.0, "include_prompt": include_prompt}
        whole_job, whole, _ = run(engine, "go on", {"continuation": clip}, **asked)
        codes = engine.codes_of(whole_job)[0].numpy()
        first = 50  # (the clip's timesteps: not the stream's codes)
        known = codes[:, first : first + 70]
        job, audio, _, sent = run_picked_up(engine, "go on", known, {"continuation": clip}, **asked)
        assert np.array_equal(engine.codes_of(job)[0].numpy(), codes)
        assert audio.shape == whole.shape and np.abs(audio - whole).max() <= 1e-4
        assert sent[0][0] == 70
        # Its client has some of it (within the clip where it is streamed, past
        # it, past the known codes): that audio is not made again.
        for heard in (30, 100, 130):
            job, audio, _, _ = run_picked_up(
                engine, "go on", known, {"continuation": clip}, heard * HOP, **asked
            )
            start = job.extra["from_sample"]
            assert start == min(heard, 70 + first * include_prompt) * HOP
            assert np.abs(audio - whole[start:]).max() <= 1e-4


@pytest.mark.parametrize(
    ("codes", "says"),
    [
        (b"\x00" * 7, "whole timesteps"),
        (np.full((3, 4), 64, "<u2").tobytes(), "below 64"),  # (the tiny model's codebooks)
        (np.zeros((101, 4), "<u2").tobytes(), "the clip has 100"),
    ],
    ids=["a part of a timestep", "a code too high", "more timesteps than the clip"],
)
def test_codes_to_pick_up_from_that_cannot_be_are_refused(
    windowed: Any, codes: bytes, says: str
) -> None:
    _, engine = windowed
    resolved = resolve_params(engine.info.params, {"duration": 2.0, "seed": 1})
    with pytest.raises(InvalidField) as info:
        engine.check(EngineRequest("t", "x", resolved, resume_codes=codes))
    assert info.value.field == "resume_codes" and says in str(info.value)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_stream_picked_up_beside_others_goes_on_as_it_went(pipelined: bool) -> None:
    """Joining a batch under way, pipelined or not: its codes are those of its
    whole run alone, and its neighbour's are unchanged."""
    model = build_tiny_musicgen(window=2.0, seed=3)
    engine = MusicGenEngine(
        model, name="tiny-2s", test_model=True, max_duration=12.0, pipelined=pipelined
    )
    asked = resolve_params(engine.info.params, {"duration": 3.0, "seed": 9, "extend_stride": 1.0})
    other = resolve_params(engine.info.params, {"duration": 2.5, "seed": 2})
    solo = {}
    for name, params in (("picked", asked), ("other", other)):
        job = engine.prepare(EngineRequest(name, name, params))
        while not engine.step([job])[0].done:
            pass
        solo[name] = engine.codes_of(job)[0].numpy()
    neighbour = engine.prepare(EngineRequest("other", "other", other))
    jobs = [neighbour]
    for _ in range(17):
        engine.step(jobs)
    known = solo["picked"][:, :120].T.astype("<u2").tobytes()
    jobs.append(engine.prepare(EngineRequest("picked", "picked", asked, resume_codes=known)))
    running = list(jobs)
    while running:
        outs = engine.step(running)
        running = [job for job, out in zip(running, outs, strict=True) if not out.done]
    assert np.array_equal(engine.codes_of(jobs[1])[0].numpy(), solo["picked"])
    assert np.array_equal(engine.codes_of(jobs[0])[0].numpy(), solo["other"])


@pytest.mark.parametrize(("seconds", "cuts"), [(2.0, (60, 120, 171)), (1.3, (150,))])
def test_a_melody_stream_is_picked_up_from_its_codes_in_any_window(
    melodic: Any, monkeypatch: Any, seconds: float, cuts: tuple[int, ...]
) -> None:
    """A later window's melody analysis draws on the windows' before it (their
    Demucs' random shifts): theirs are replayed, drawn and not made, so that
    each analysis starts where it did in the whole run, and the stream goes on
    from its codes in any window, as it went (its codes, its audio, the
    outputs' codes from the first one not known); with a reference shorter
    than the window too (wrapped around)."""
    _, engine = melodic
    rng = np.random.default_rng(6)
    samples = int(44100 * seconds)
    reference = wav_bytes((0.2 * rng.standard_normal((samples, 1))).astype(np.float32), 44100)
    asked = {"duration": 4.0, "extend_stride": 1.0, "seed": 4}
    analyses: list[Any] = []  # the state of the draws each window's analysis starts from
    in_pieces = engine.conditioning.in_pieces

    def recorded(attributes: Any, py_random: Any) -> Any:
        analyses.append(py_random)
        return in_pieces(attributes, py_random)

    monkeypatch.setattr(engine.conditioning, "in_pieces", recorded)
    whole_job, whole, _ = run(engine, "hum", {"melody": reference}, **asked)
    codes = engine.codes_of(whole_job)[0].numpy()
    states, analyses[:] = list(analyses), []
    assert len(states) == 3  # (windows at 0, 1 and 2 s)
    for known in cuts:
        job, audio, _, sent = run_picked_up(
            engine, "hum", codes[:, :known], {"melody": reference}, **asked
        )
        replayed = 0 if known < 100 else (known - 50) // 50
        assert job.state.replayed == replayed, known
        assert analyses == states[replayed:], known
        analyses.clear()
        assert np.array_equal(engine.codes_of(job)[0].numpy(), codes), known
        assert audio.shape == whole.shape and np.abs(audio - whole).max() <= 1e-4
        assert sent[0][0] == known and "from_codes" in job.extra


def test_a_melodys_analysis_draws_are_replayed_without_it(melodic: Any) -> None:
    """``draws_after`` leaves a request's draws where the analysis in pieces
    leaves them (its random shift and each segment's positional embedding,
    drawn in the same order), without running Demucs; for a reference of
    several segments, and for one shorter than one."""
    _, engine = melodic
    conditioning = engine.conditioning
    for seconds in (5.3, 0.4):
        t = np.arange(int(32000 * seconds)) / 32000
        reference = torch.from_numpy(np.sin(2 * np.pi * 330 * t)[None].astype(np.float32))
        attributes = conditioning.attributes("hum", reference)
        state = random.Random(11).getstate()
        pieces = conditioning.in_pieces(attributes, state)
        while True:
            try:
                next(pieces)
            except StopIteration as done:
                _, after = done.value
                break
        replayed = conditioning.draws_after(attributes, state)
        assert replayed == after != state


def test_a_stream_picked_up_from_its_codes_with_the_codec_re_decoding_windows() -> None:
    """The known codes' audio made again before the stream steps, with the
    codec re-decoding windows (``--codec-windows``) as incrementally."""
    model = build_tiny_musicgen(window=2.0, seed=3)
    engine = MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        stream=StreamSettings(codec_windows=True),
    )
    asked = {"duration": 3.0, "seed": 6, "extend_stride": 1.0}
    whole_job, whole, _ = run(engine, "windows", **asked)
    codes = engine.codes_of(whole_job)[0].numpy()
    resolved = resolve_params(engine.info.params, asked)
    known = codes[:, :90].T.astype("<u2").tobytes()
    job = engine.prepare(EngineRequest("t", "windows", resolved, resume_codes=known))
    # (All of it out but the windows' hold-back, before the first step.)
    assert job.state.decoder.emitted == 90 - engine.stream.holdback
    _, audio, _, _ = run_picked_up(engine, "windows", codes[:, :90], **asked)
    assert np.abs(audio - whole).max() <= 1e-4


def test_a_stereo_stream_picked_up_from_its_codes_goes_on_as_it_went(stereo: Any) -> None:
    """Eight codebooks a timestep, two channels: the same."""
    _, engine = stereo
    asked = {"duration": 1.0, "seed": 3}
    whole_job, whole, _ = run(engine, "wide", **asked)
    codes = engine.codes_of(whole_job)[0].numpy()
    assert codes.shape == (8, 50)
    job, audio, _, sent = run_picked_up(engine, "wide", codes[:, :20], **asked)
    assert np.array_equal(engine.codes_of(job)[0].numpy(), codes)
    assert audio.shape == whole.shape == (50 * HOP, 2) and np.abs(audio - whole).max() <= 1e-4
    assert sent[0][0] == 20 and len(sent[0][1][0]) == 8
