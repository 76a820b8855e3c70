"""The HiggsAudio v2 engine against transformers' own generate, processor and codec."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from helpers import in_parts
from transformers import DacFeatureExtractor, GenerationConfig, HiggsAudioV2Processor

from wavecast.protocol import InvalidField
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.higgs.prompt import (
    MULTISPEAKER_SYSTEM,
    SYSTEM,
    PromptAudio,
    build_prompt,
    chunk_text,
    delay_block,
)
from wavecast.server.engines.higgs.voices import Scene, Voice, VoiceLoadError
from wavecast.server.engines.testing.higgs import _quiet_eos, build_tiny_higgs, save_tiny_higgs
from wavecast.server.engines.testing.higgs_reference import HiggsReference

K = 4  # tiny-higgs codebooks
BOS, EOS = 64, 65


@pytest.fixture(scope="module")
def loaded() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu")


@pytest.fixture(scope="module")
def engine(loaded: HiggsModel) -> HiggsEngine:
    return HiggsEngine(loaded, name="tiny-higgs")


@pytest.fixture(scope="module")
def reference(loaded: HiggsModel) -> HiggsReference:
    return HiggsReference(loaded, name="tiny-higgs")


def defaults(engine: HiggsEngine, **given: Any) -> dict[str, Any]:
    params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    params.update(given)
    return params


def reference_prompt(engine: HiggsEngine) -> list[Any]:
    codes = torch.randint(0, BOS, (K, 30), generator=torch.Generator().manual_seed(1))
    return build_prompt(
        SYSTEM,
        "Audio is recorded from a quiet room.",
        [],
        [("This is the reference.", PromptAudio(codes.numpy()))],
        "The sun rises in the east and sets in the west.",
    )


def run_stream(engine: HiggsReference, parts: list[Any], temperature: float, seed: int) -> Any:
    stream = engine.start_stream(parts, temperature=temperature, top_k=50, top_p=0.95)
    prompt = (stream.input_ids.clone(), stream.audio_ids.clone())
    generator = torch.Generator().manual_seed(seed)
    rows = []
    while True:
        row = engine.sample_row(
            stream,
            do_sample=temperature > 0,
            generator=generator,
            ras_win_len=7,
            ras_max_repeat=2,
            max_new_tokens=60,
        )
        if row is None:
            break
        rows.append(row)
    return prompt, torch.stack(rows)


def reference_generate(model: Any, prompt: Any, temperature: float, seed: int) -> torch.Tensor:
    input_ids, audio_ids = prompt
    sampling = temperature > 0
    config = GenerationConfig(
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_k=50 if sampling else None,
        top_p=0.95 if sampling else None,
        max_new_tokens=60,
        ras_win_len=7,
        ras_win_max_num_repeat=2,
        return_dict_in_generate=True,
    )
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        audio_input_ids=audio_ids,
        audio_input_ids_mask=torch.ones(audio_ids.shape[:2], dtype=torch.bool),
        generation_config=config,
    )
    rows: torch.Tensor = out.audio_sequences[0, audio_ids.shape[1] :]
    return rows


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (0.7, 5), (1.0, 11)])
def test_rows_equal_generate(reference: HiggsReference, temperature: float, seed: int) -> None:
    prompt, rows = run_stream(reference, reference_prompt(reference), temperature, seed)
    expected = reference_generate(reference.model, prompt, temperature, seed)
    assert rows.shape == (60, K)  # tiny-higgs speaks until max_new_tokens
    assert torch.equal(rows, expected)


def test_natural_end_equals_generate() -> None:
    # The plain random head ends utterances early: the EOS path, delay pattern and all.
    tiny = build_tiny_higgs(quiet_eos=False)
    engine = HiggsReference(HiggsModel(tiny.model, tiny.tokenizer, tiny.codec, True), name="t")
    ended = 0
    for seed in range(6):
        prompt, rows = run_stream(engine, reference_prompt(engine), 0.7, seed)
        expected = reference_generate(engine.model, prompt, 0.7, seed)
        if len(rows) < 60:
            ended += 1
            # generate's last row is the all-EOS row that ends the utterance
            assert torch.equal(expected[-1], torch.full((K,), EOS))
            expected = expected[:-1]
        assert torch.equal(rows, expected)
    assert ended >= 3


@pytest.mark.parametrize("pinned", [False, True])
def test_a_pinned_quiet_eos_holds_however_the_layers_drift(pinned: bool) -> None:
    """The test models' quiet EOS against layers that write the residual's first
    coordinate hard (their output rows for it scaled up: what 28 random layers
    do to it at the released depth). Plain, EOS then rises above codes, as it
    did on CUDA for random-higgs-3b; pinned (as that model is built), it stays
    far below every code of every codebook."""
    from helpers import model_forward, voiced_prompt

    tiny = build_tiny_higgs(quiet_eos=False)
    model = tiny.model
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight[0] *= 200
    _quiet_eos(model, pinned=pinned)
    engine = HiggsEngine(HiggsModel(model, tiny.tokenizer, tiny.codec, True), name="t")
    ids, audio, frames = voiced_prompt(engine, K, BOS)
    gaps = []
    for logits in model_forward(model, ids, audio, frames):
        codes = torch.cat([logits[:, :EOS], logits[:, EOS + 1 :]], 1)
        gaps.append(logits[:, EOS] - codes.min(1).values)  # EOS less the lowest code
    highest = float(torch.stack(gaps).max())
    if pinned:
        assert highest < -25
    else:
        assert highest > 0


def test_delay_block_matches_processor() -> None:
    codes = torch.randint(0, BOS, (K, 9))
    processor = SimpleNamespace(audio_stream_bos_id=BOS, audio_stream_eos_id=EOS)
    with_markers = torch.cat([torch.full((K, 1), BOS), codes, torch.full((K, 1), EOS)], 1)
    expected = HiggsAudioV2Processor.build_delay_pattern(processor, with_markers[None])[0]
    got = torch.from_numpy(delay_block(codes.numpy(), BOS, EOS))
    assert torch.equal(got, expected.transpose(0, 1))


def test_prompt_tokens_match_processor(engine: HiggsEngine) -> None:
    """The processor, given the same layout and the reference waveform, builds the
    same text tokens and the same audio code blocks."""
    wav = 0.3 * np.sin(np.linspace(0, 400, 24000)).astype(np.float32)
    codes = engine.encode_audio(wav, 24000)
    parts = build_prompt(SYSTEM, "A quiet room.", [], [("Reference.", PromptAudio(codes))], "Hi!")
    input_ids, audio_ids = engine.tokenize(parts)
    processor = HiggsAudioV2Processor(
        DacFeatureExtractor(sampling_rate=24000),
        engine.tokenizer,
        engine.codec,
        audio_stream_bos_id=BOS,
        audio_stream_eos_id=EOS,
    )
    text = "".join(p if isinstance(p, str) else "<|AUDIO_OUT|>" for p in parts)
    expected = processor(text=text, audio=[wav], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(input_ids, expected["input_ids"])
    assert audio_ids is not None
    assert torch.equal(audio_ids, expected["audio_input_ids"])


def test_prompt_layout() -> None:
    audio = PromptAudio(torch.zeros(K, 2, dtype=torch.long))

    def render(*args: Any) -> str:
        return "".join(p if isinstance(p, str) else "<A>" for p in build_prompt(*args))

    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    tail = (
        "<|start_header_id|>user<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )
    # As the processor's chat template renders a scene of [text, "SPEAKER0:", audio, ...].
    assert render(
        SYSTEM, "In a cafe.", [("SPEAKER0", audio), ("SPEAKER1", audio)], [], "Hello."
    ) == (
        head + SYSTEM + "\n\n<|scene_desc_start|>\nIn a cafe.\n\n"
        "SPEAKER0: <|audio_out_bos|><A><|audio_eos|>\nSPEAKER1: <|audio_out_bos|><A><|audio_eos|>"
        "\n<|scene_desc_end|><|eot_id|>" + tail
    )
    # No scene text: the voices alone, as the original examples write them.
    assert render(SYSTEM, "", [("SPEAKER0", audio)], [], "Hello.") == (
        head + SYSTEM + "\n\n<|scene_desc_start|>\nSPEAKER0: <|audio_out_bos|><A><|audio_eos|>"
        "\n<|scene_desc_end|><|eot_id|>" + tail
    )
    # Earlier exchanges: a transcript, then its audio as the assistant's answer.
    assert render(MULTISPEAKER_SYSTEM, "", [], [("Hi.", audio)], "Hello.") == (
        head + MULTISPEAKER_SYSTEM + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi."
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|><A>"
        "<|audio_eos|><|eot_id|>" + tail
    )


def test_chunking() -> None:
    dialogue = "[SPEAKER0] Hi there.\n[SPEAKER1] Hello!\nHow are you?\n[SPEAKER0] Fine."
    assert chunk_text(dialogue, "speaker", 200, 1) == [
        "[SPEAKER0] Hi there.",
        "[SPEAKER1] Hello!\nHow are you?",
        "[SPEAKER0] Fine.",
    ]
    assert chunk_text(dialogue, "speaker", 200, 2) == [
        "[SPEAKER0] Hi there.\n[SPEAKER1] Hello!\nHow are you?",
        "[SPEAKER0] Fine.",
    ]
    words = " ".join(f"w{i}" for i in range(7))
    assert chunk_text(f"{words}\n\nnext one", "word", 3, 1) == [
        "w0 w1 w2",
        "w3 w4 w5",
        "w6\n\n",
        "next one\n\n",
    ]
    # Chinese has no spaces: characters count as words, and pass through unchanged.
    assert chunk_text("今天天气很好我们去公园", "word", 4, 1) == [
        "今天天气",
        "很好我们",
        "去公园\n\n",
    ]
    assert chunk_text(dialogue, "none", 1, 1) == [dialogue]
    # A sentence a chunk, each with its turn's speaker; a long one cut by words.
    assert chunk_text(dialogue, "sentence", 200, 1) == [
        "[SPEAKER0] Hi there.",
        "[SPEAKER1] Hello!",
        "[SPEAKER1] How are you?",
        "[SPEAKER0] Fine.",
    ]
    said = "Mr. Smith came home. It rained, and rained! Then 3.14 is pi… 你好。再见"
    assert chunk_text(said, "sentence", 4, 1) == [
        "Mr. Smith came home.",
        "It rained, and rained!",
        "Then 3.14 is pi…",
        "你好。",
        "再见",
    ]
    assert chunk_text("one two three four five. six", "sentence", 2, 1) == [
        "one two",
        "three four",
        "five.",
        "six",
    ]


def test_streamed_audio_equals_one_shot_decode(engine: HiggsEngine) -> None:
    """Chunks from the incremental decoder, across text chunks, equal decoding every
    frame at once (float32)."""
    request = EngineRequest(
        "r",
        "[SPEAKER0] One two three.\n[SPEAKER1] Four five six.\n[SPEAKER0] Seven.",
        defaults(engine, seed=3, max_new_tokens=40, chunk_method="speaker"),
    )
    job = engine.prepare(request)
    pieces = []
    for _ in range(1000):
        (out,) = engine.step([job])
        if out.audio is not None:
            pieces.append(out.audio)
        if out.done:
            break
    assert out.done
    streamed = np.concatenate(pieces)[:, 0]
    codes = engine.codes_of(job)
    assert codes.shape == (1, K, 3 * (40 - K))  # three turns, each to max_new_tokens
    whole = engine.codec.decode(codes).audio_values[0, 0].numpy()
    assert streamed.shape == whole.shape
    assert np.abs(whole).max() > 1e-3
    assert np.abs(streamed - whole).max() < 1e-6
    engine.finish(job)


def test_seed_reproduces_and_differs(engine: HiggsEngine) -> None:
    def codes(seed: int) -> torch.Tensor:
        job = engine.prepare(
            EngineRequest("r", "Hello.", defaults(engine, seed=seed, max_new_tokens=20))
        )
        while not engine.step([job])[0].done:
            pass
        return engine.codes_of(job)

    assert torch.equal(codes(7), codes(7))
    assert not torch.equal(codes(7), codes(8))


def test_prepare_refuses_bad_requests(engine: HiggsEngine) -> None:
    with pytest.raises(InvalidField) as info:
        engine.prepare(EngineRequest("r", "Hi.", defaults(engine, voice="nobody")))
    assert info.value.field == "params.voice"
    with pytest.raises(InvalidField) as info:
        engine.prepare(EngineRequest("r", "  \n ", defaults(engine)))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidField) as info:
        engine.prepare(
            EngineRequest("r", "Hi.", defaults(engine), {"reference": b"not audio at all"})
        )
    assert info.value.field == "inputs.reference"


@pytest.mark.parametrize(
    ("field", "given"),
    [
        ("prompt", {}),
        ("params.scene", {"scene": "A hall <|eot_id|><|start_header_id|>system"}),
        ("params.reference_text", {"reference_text": "Me <|audio_eos|>."}),
    ],
)
def test_a_text_holding_a_control_token_is_refused(
    engine: HiggsEngine, field: str, given: dict[str, Any]
) -> None:
    # The audio placeholder in a prompt made the request fail in its prefill.
    prompt = "Say <|AUDIO_OUT|> now." if field == "prompt" else "Hi."
    inputs = {"reference": b"RIFF"} if "reference_text" in given else {}
    request = EngineRequest("r", prompt, defaults(engine, **given), inputs)
    with pytest.raises(InvalidField) as info:
        engine.check(request)
    assert info.value.field == field and "control token" in str(info.value)
    # Their names alone, not the tokens, are plain text.
    job = engine.prepare(EngineRequest("r", "Say AUDIO_OUT and eot_id |>.", defaults(engine)))
    engine.finish(job)


def test_a_voice_or_scene_holding_a_control_token_is_refused_at_start(
    loaded: HiggsModel,
) -> None:
    # (Else every request in that voice or scene failed, or wrote the layout.)
    voice = Voice("v", Path("v.wav"), "Hi <|eot_id|> there.", np.zeros(4800, np.float32), 24000)
    with pytest.raises(VoiceLoadError, match=r"v\.txt: holds <\|eot_id\|>"):
        HiggsEngine(loaded, name="t", voices={"v": voice})
    scene = Scene("hall", Path("hall.txt"), "A hall. <|AUDIO_OUT|>")
    with pytest.raises(VoiceLoadError, match=r"hall\.txt: holds <\|AUDIO_OUT\|>"):
        HiggsEngine(loaded, name="t", scenes={"hall": scene})


def test_saved_model_loads_back(tmp_path: Path, reference: HiggsReference) -> None:
    """save_tiny_higgs writes the released layout; load_higgs reads it as it reads a
    downloaded checkpoint, and the result is the same model."""
    folder, codec_dir = save_tiny_higgs(build_tiny_higgs(), tmp_path / "tiny")
    assert (folder / "config.json").is_file() and (codec_dir / "config.json").is_file()
    again = load_higgs(str(folder), None, "cpu")
    assert again.test_model
    reloaded = HiggsReference(again, name="saved")
    parts = reference_prompt(reference)
    _, a = run_stream(reference, parts, 0.7, 4)
    _, b = run_stream(reloaded, parts, 0.7, 4)
    assert torch.equal(a, b)
    codes = torch.randint(0, BOS, (1, K, 12))
    assert torch.equal(
        reference.codec.decode(codes).audio_values, reloaded.codec.decode(codes).audio_values
    )


def test_max_duration_and_max_new_tokens_limits(loaded: HiggsModel) -> None:
    """--max-duration ends a request (completed) once that much audio is made, however
    many chunks remain; --max-new-tokens bounds the parameter."""
    engine = HiggsEngine(loaded, name="tiny-higgs", max_duration=1.0, max_new_tokens=64)
    spec = next(s for s in engine.info.params if s.name == "max_new_tokens")
    assert (spec.default, spec.max) == (64, 64)
    assert engine.info.max_duration == 1.0
    text = "one two three four five six"
    job = engine.prepare(
        EngineRequest("r", text, defaults(engine, chunk_method="word", chunk_max_word_num=1))
    )
    frames = 0
    for _ in range(1000):
        (out,) = engine.step([job])
        frames += 0 if out.audio is None else out.audio.shape[0]
        if out.done:
            break
    assert out.done and out.fraction == 1.0
    assert frames == 25 * engine.hop  # one second at 25 frames a second


def test_a_dialogues_speakers_are_told_apart_by_their_numbers(engine: HiggsEngine) -> None:
    # In order of their numbers, one for each number (002 is 2), however many
    # digits a tag has (more than Python makes an int of: the request failed).
    many = "9" * 5000
    prompt = f"[SPEAKER10] A. [SPEAKER2] B. [SPEAKER0] C. [SPEAKER{many}] D. [SPEAKER002] E."
    job = engine.prepare(EngineRequest("r", prompt, defaults(engine, max_new_tokens=8)))
    assert job.state.system == MULTISPEAKER_SYSTEM
    assert job.state.scene == (
        f"SPEAKER0: feminine\nSPEAKER2: masculine\nSPEAKER10: feminine\nSPEAKER{many}: masculine"
    )
    engine.finish(job)


def test_tokenizer_that_does_not_match_the_model_is_refused() -> None:
    tiny = build_tiny_higgs()
    tiny.model.config.audio_token_id = 5  # a byte, not <|AUDIO_OUT|>
    with pytest.raises(ValueError, match=r"<\|AUDIO_OUT\|> is 264, the model expects id 5"):
        HiggsEngine(HiggsModel(tiny.model, tiny.tokenizer, tiny.codec, True), name="t")


def test_text_in_any_script_reaches_the_model_unchanged(engine: HiggsEngine) -> None:
    text = "Ça va? 你好，世界！ Привет — こんにちは。"
    job = engine.prepare(EngineRequest("r", f"  {text}  ", defaults(engine, max_new_tokens=8)))
    input_ids, _ = engine.tokenize(build_prompt(SYSTEM, "", [], [], job.state.chunks[0]))
    decoded = engine.tokenizer.decode(input_ids[0])
    assert f"user<|end_header_id|>\n\n{text}<|eot_id|>" in decoded


def test_too_few_steps_for_a_frame_end_cleanly(engine: HiggsEngine) -> None:
    # 1 BOS row + K - 1 delay rows: with max_new_tokens <= K no frame completes.
    job = engine.prepare(EngineRequest("r", "Hi.", defaults(engine, max_new_tokens=K)))
    outputs = [engine.step([job])[0] for _ in range(K)]
    assert outputs[-1].done and all(o.audio is None for o in outputs)
    job = engine.prepare(EngineRequest("r", "Hi.", defaults(engine, max_new_tokens=K + 1)))
    audio = [o.audio for o in (engine.step([job])[0] for _ in range(K + 1)) if o.audio is not None]
    assert sum(a.shape[0] for a in audio) == engine.hop  # one frame


def test_next_chunk_reuses_the_cache_and_agrees_with_a_fresh_prefill(
    reference: HiggsReference,
) -> None:
    engine = reference
    codes = torch.randint(0, BOS, (K, 20), generator=torch.Generator().manual_seed(3))
    refs = [("A reference.", PromptAudio(codes))]
    first = engine.start_stream(
        build_prompt(SYSTEM, "A room.", [], refs, "One."), temperature=0, top_k=0, top_p=1
    )
    rows = []
    while (row := engine.sample_row(first, **GREEDY, max_new_tokens=30)) is not None:
        rows.append(row)
    spoken = torch.stack(rows)  # [30, K] delayed rows; frames = 30 - K
    frames = torch.stack([spoken[1 + i : 1 + i + 30 - K, i] for i in range(K)])
    history = [*refs, ("One.", PromptAudio(frames.clamp(0, BOS - 1)))]
    parts = build_prompt(SYSTEM, "A room.", [], history, "Two.")
    prompt_length = first.prompt_ids.shape[1]

    reused = engine.start_stream(parts, temperature=0, top_k=0, top_p=1, after=first)
    fresh = engine.start_stream(parts, temperature=0, top_k=0, top_p=1)
    # The cache kept the old prompt and every generated row the block repeats: all
    # 29 fed back except where codebook 0 ran past the last complete frame.
    assert reused.cached_tokens == prompt_length + 1 + (30 - K)
    assert fresh.cached_tokens == 0
    a = [engine.sample_row(reused, **GREEDY, max_new_tokens=25) for _ in range(25)]
    b = [engine.sample_row(fresh, **GREEDY, max_new_tokens=25) for _ in range(25)]
    assert all(
        x is not None and y is not None and torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )
    # A prompt that does not extend the old one starts afresh.
    other = build_prompt(SYSTEM, "Elsewhere.", [], history, "Two.")
    assert (
        engine.start_stream(other, temperature=0, top_k=0, top_p=1, after=reused).cached_tokens == 0
    )


GREEDY: dict[str, Any] = {
    "do_sample": False,
    "generator": None,
    "ras_win_len": 0,
    "ras_max_repeat": 2,
}


def _stable_norm_codec(loaded: HiggsModel) -> Any:
    """The tiny tokenizer's shape, with the other HuBERT layout (layer norms in
    its convolutions, the encoder's norm after its layers), random weights."""
    import copy

    from transformers import HiggsAudioV2TokenizerModel

    config = copy.deepcopy(loaded.codec.config)
    config.semantic_model_config.do_stable_layer_norm = True
    config.semantic_model_config.feat_extract_norm = "layer"
    torch.manual_seed(3)
    return HiggsAudioV2TokenizerModel(config).eval()


@pytest.mark.parametrize("layout", ["released", "stable-norm"])
def test_a_voice_encoded_in_pieces_is_the_tokenizers_encoding(
    loaded: HiggsModel, layout: str
) -> None:
    """``encode_in_pieces`` runs the tokenizer's ``encode`` a part at a time (a
    convolution, a layer, an activation): its codes are ``encode``'s bit for
    bit, for clips whose acoustic frames need the tokenizer's padding or not,
    in both HuBERT layouts, in as many parts as ``parts_of`` counts (its
    progress's measure); a tokenizer in training mode (dropout on) is
    encoded in one part, by its own ``encode``."""
    from wavecast.server.engines.higgs.encoding import encode_in_pieces, parts_of

    codec = loaded.codec if layout == "released" else _stable_norm_codec(loaded)
    generator = torch.Generator().manual_seed(7)
    for samples in (24000 * 2, 24000 * 3 + 517):
        audio = 0.2 * torch.randn(1, 1, samples, generator=generator)
        with torch.no_grad():
            expected = codec.encode(audio).audio_codes
            parts, got = in_parts(encode_in_pieces(codec, audio))
        assert torch.equal(got, expected), samples
        assert parts >= 20 and parts == parts_of(codec)
    codec.train()
    assert parts_of(codec) == 0
    try:
        with torch.no_grad():
            pieces = encode_in_pieces(codec, audio)
            with pytest.raises(StopIteration) as done:
                next(pieces)
        assert done.value.value.shape == expected.shape
    finally:
        codec.eval()


def test_an_uploaded_voice_is_encoded_between_steps(engine: HiggsEngine) -> None:
    """A request's uploaded voice is encoded in many units of its preparation
    (each a part of the tokenizer's work, each saying how far it is), and its
    prompt holds the codes the tokenizer's ``encode`` gives the clip."""
    wav = (0.3 * np.sin(np.linspace(0, 900, 24000 * 3))).astype(np.float32)
    data = io.BytesIO()
    soundfile.write(data, wav, 24000, format="WAV")
    params = defaults(engine, max_new_tokens=8, seed=1)
    request = EngineRequest("u", "Hello.", params, {"reference": data.getvalue()})
    units = list(engine.prepare_steps(request))
    job = units[-1]
    assert job is not None and len(units) > 20
    done = units[:-1]  # (the part of the encoding done, growing, below 1)
    assert all(isinstance(part, float) for part in done)
    assert done == sorted(done) and done[0] > 0 and done[-1] < 1
    codes = job.state.speakers[0][1].codes  # (no transcript: the voice in the scene)
    with torch.no_grad():
        heard, _ = soundfile.read(io.BytesIO(data.getvalue()), dtype="float32")
        expected = engine.codec.encode(torch.from_numpy(heard).view(1, 1, -1)).audio_codes[0]
    assert np.array_equal(codes, expected.numpy())
    engine.finish(job)


@pytest.mark.parametrize(
    ("text", "given", "inputs", "silent"),
    [
        # Word chunks; one too short for a frame (the next is not a turn more).
        ("One two three four five six seven.", {"chunk_max_word_num": 2}, False, True),
        # Lines and paragraphs; a scene; a window of one spoken chunk (its
        # beginning moves: tokenized whole each time).
        (
            "Say it\nnow,\n\n then more and more words.",
            {"scene": "quiet_indoor", "chunk_max_word_num": 3},
            False,
            False,
        ),
        (
            "One two three four five six.",
            {"generation_chunk_buffer_size": 1, "chunk_max_word_num": 2},
            False,
            False,
        ),
        # A dialogue by turns, its voices uploaded with their transcripts.
        (
            "[SPEAKER0] Hi there.\n[SPEAKER1] Hello.\n[SPEAKER0] Bye.",
            {"chunk_method": "speaker"},
            True,
            False,
        ),
    ],
    ids=["words", "lines", "window", "dialogue"],
)
def test_each_chunks_prompt_grown_from_the_last_is_the_conversation_tokenized_whole(
    engine: HiggsEngine, text: str, given: dict[str, Any], inputs: bool, silent: bool
) -> None:
    """A chunk's prompt holds the chunks spoken before it: their tokens are kept
    and grown a chunk at a time, the same as the whole prompt's."""
    assert engine._grows_prompts  # (the tiny tokenizer splits at special tokens)
    opened: list[bool] = []
    grown = engine._chunk_tokens

    def compared(st: Any) -> Any:
        ids, audio = grown(st)
        whole_ids, whole_audio = engine.tokens(engine.chunk_prompt(st))
        opened.append(np.array_equal(ids, whole_ids) and np.array_equal(audio, whole_audio))
        return ids, audio

    params = defaults(engine, **{"chunk_method": "word", "max_new_tokens": 12, "seed": 2, **given})
    uploads: dict[str, bytes] = {}
    if inputs:
        for role, pitch in (("reference", 300), ("reference_1", 700)):
            wav = (0.3 * np.sin(np.linspace(0, pitch, 24000))).astype(np.float32)
            data = io.BytesIO()
            soundfile.write(data, wav, 24000, format="WAV")
            uploads[role] = data.getvalue()
            params[f"{role}_text"] = f"My voice at {pitch}."
    engine._chunk_tokens = compared  # type: ignore[method-assign]
    try:
        job = engine.prepare(EngineRequest("g", text, params, uploads))
        while not engine.step([job])[0].done:
            if job.state.index == 1 and silent:
                job.state.max_new_tokens = K  # (a chunk with no frame, not a turn)
            elif job.state.index > 1:
                job.state.max_new_tokens = 12
        chunks, spoken = len(job.state.chunks), len(job.state.history)
        references = len(job.state.references)
        engine.finish(job)
    finally:
        del engine._chunk_tokens
    assert len(opened) == chunks >= 3 and all(opened)
    assert spoken >= 2 and references == 2 * inputs
