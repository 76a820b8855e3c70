"""HiggsAudio v2 on the batched core: the decoder against transformers' forward,
the sampling rules against its processors, the batched engine against the
reference path (each request alone through transformers) and against itself
(a row in a batch equals its solo run)."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from helpers import (
    count_codec_calls,
    model_forward,
    observed_logits,
    random_rules,
    step_together,
    voiced_prompt,
)
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.higgs_audio_v2.generation_higgs_audio_v2 import (
    HiggsAudioV2DelayPatternLogitsProcessor,
)

from wavecast.server.engines import dense, kv, rowkernel
from wavecast.server.engines.base import EngineRequest, Job, ModelLoadError
from wavecast.server.engines.higgs import rules as rules_module
from wavecast.server.engines.higgs.decoder import HiggsDecoder
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.higgs.prompt import SYSTEM, build_prompt
from wavecast.server.engines.higgs.rules import RowRules
from wavecast.server.engines.higgs.voices import Scene, Voice
from wavecast.server.engines.kv import free_memory
from wavecast.server.engines.sampling import (
    RowSampling,
    counted_window,
    redraw_repeats,
    row_keys,
    sample_repeat_aware,
    sample_warped,
    warp,
    warpers,
)
from wavecast.server.engines.testing.higgs import build_tiny_higgs
from wavecast.server.engines.testing.higgs_reference import HiggsReference

K = 4  # tiny-higgs codebooks
BOS, EOS = 64, 65
DIALOGUE = "[SPEAKER0] Hi there.\n[SPEAKER1] Who is it?\n[SPEAKER0] Only me, again."


@pytest.fixture(scope="module")
def loaded() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu")


@pytest.fixture(scope="module")
def batched(loaded: HiggsModel) -> HiggsEngine:
    return HiggsEngine(loaded, name="tiny-higgs")


@pytest.fixture(scope="module")
def reference(loaded: HiggsModel) -> HiggsReference:
    return HiggsReference(loaded, name="tiny-higgs")


def wav(seconds: float, pitch: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * pitch * t), 16000, format="WAV")
    return buffer.getvalue()


def request(
    engine: HiggsEngine, rid: str, text: str, inputs: dict[str, bytes] | None = None, **given: Any
) -> Job:
    params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    params.update(given)
    return engine.prepare(EngineRequest(rid, text, params, inputs or {}))


def voiced_dialogue(engine: HiggsEngine, rid: str) -> Job:
    """A dialogue in chunks by speaker turn, with an uploaded voice reference."""
    inputs = {"reference": wav(0.8, 330)}
    return request(engine, rid, DIALOGUE, inputs, chunk_method="speaker", max_new_tokens=20, seed=2)


def drive(
    engine: HiggsEngine, jobs: Sequence[Job], joins: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Step ``jobs`` to the end, job ``i`` joining at step ``joins[i]``; their audio."""
    audio = step_together(engine, jobs, joins)
    return {rid: np.concatenate(pieces) for rid, pieces in audio.items()}


# -- the decoder -----------------------------------------------------------------------


@pytest.mark.parametrize("packed", ["no", "copies", "direct", "copies, no row kernel"])
def test_decoder_matches_the_model_forward(
    loaded: HiggsModel, batched: HiggsEngine, packed: str, monkeypatch: Any
) -> None:
    """(``packed``: every weight a step multiplies packed, as a released model's
    are on a CPU, the tiny model's being too small to be, with the row kernel
    for a few rows where it is built; or, where memory holds no copies,
    multiplied by oneDNN as they lie. The steps attend by the row kernel where
    it is built and not turned off.)"""
    model = loaded.model
    config = model.config
    ids, audio, frames = voiced_prompt(batched, K, BOS)
    expected = model_forward(model, ids, audio, frames)
    if packed != "no":
        monkeypatch.setattr(dense, "PACKED_FROM", 1)
    if packed == "direct":
        monkeypatch.setattr(dense, "free_memory", lambda device: 0)
    if packed.endswith("no row kernel"):
        monkeypatch.setattr(dense, "KERNEL_ROWS", 0)
    with torch.no_grad():
        decoder = HiggsDecoder(model, rows=4, length=512)
        packing = decoder.pack_weights()
        stepped = 4 * len(model.model.layers) + 1
        assert packing.weights == (stepped if packed.startswith("copies") else 0)
        assert packing.direct == (stepped if packed == "direct" else 0)
        built = isinstance(rowkernel.load(), rowkernel.RowKernel)
        kernel = packed in ("copies", "direct") and built
        assert packing.kernel == (stepped if kernel else 0)
        assert packing.attention == (built and not packed.endswith("no row kernel"))
        tokens = ids[0].numpy()
        is_audio = (tokens == config.audio_token_id) | (tokens == config.audio_delay_token_id)
        # The prompt in two calls (text and audio positions in both), beside a
        # neighbour row holding another prompt.
        cut = int(np.flatnonzero(is_audio)[10])
        before = int(is_audio[:cut].sum())
        decoder.prefill(
            [3], ids[:, :40], audio[0, : int(is_audio[:40].sum())], is_audio[None, :40], 0
        )
        decoder.prefill([1], ids[:, :cut], audio[0, :before], is_audio[None, :cut], 0)
        got = decoder.prefill([1], ids[:, cut:], audio[0, before:], is_audio[None, cut:], cut)
        assert torch.allclose(got[0], expected[0], atol=1e-5)
        length = len(tokens)
        for step, frame in enumerate(frames):
            codes_in = torch.randint(0, BOS, (decoder.rows, K))
            codes_in[1] = frame
            active = torch.tensor([False, True, False, step % 2 == 0])
            logits = decoder.decode(codes_in, active, span=length + 64)
            assert torch.allclose(logits[1], expected[step + 1], atol=1e-4)
        assert int(decoder.lengths[1]) == length + len(frames)
        assert int(decoder.lengths[3]) == 40 + 3  # the neighbour advanced on its own steps


def test_decode_step_traces_as_one_graph(loaded: HiggsModel) -> None:
    decoder = HiggsDecoder(loaded.model, rows=4, length=64)
    with torch.no_grad():
        for row in range(4):
            ids = torch.randint(0, 200, (1, 5 + row))
            decoder.prefill([row], ids, None, np.zeros((1, 5 + row), bool), 0)
        codes_in = torch.randint(0, BOS, (4, K))
        active = torch.tensor([True, False, True, True])
        before = decoder.lengths.clone()
        eager = decoder.decode(codes_in, active, span=64)
        decoder.lengths.copy_(before)
        try:
            torch._dynamo.reset()
            compiled = torch.compile(decoder.decode, fullgraph=True, backend="eager")
            traced = compiled(codes_in, active, span=64)
        finally:
            torch._dynamo.reset()
    assert torch.allclose(traced, eager, atol=1e-5)
    assert torch.equal(decoder.lengths, before + active.long())


def test_the_cache_grows_by_half_at_least_and_keeps_what_it_holds(loaded: HiggsModel) -> None:
    """A row that needs a few more positions grows the cache by half (a long
    dialogue copies it a few times, not at every chunk); one that needs many gets
    them; what the rows held is kept, and the forward over it is unchanged."""
    decoder = HiggsDecoder(loaded.model, rows=2, length=64)
    ids = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(4))
    codes_in = torch.randint(0, BOS, (2, K), generator=torch.Generator().manual_seed(5))
    active = torch.tensor([True, False])
    with torch.no_grad():
        decoder.prefill([0], ids, None, np.zeros((1, 20), bool), 0)
        before = decoder.decode(codes_in, active, span=64).clone()
        decoder.lengths[0] -= 1  # (the same step again after growing)
        decoder.ensure(length=70)
        assert decoder.length == 96
        decoder.ensure(length=90)
        assert decoder.length == 96  # room enough: nothing moves
        decoder.ensure(length=400)
        assert decoder.length == 400
        after = decoder.decode(codes_in, active, span=64)
    assert torch.equal(after[0], before[0])


# -- sampling rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 50, 0.95), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.5, 3, 0.2), (0.9, 0, 1.0)],
)
def test_warp_equals_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    logits = 3 * torch.randn(3, K, 66, generator=torch.Generator().manual_seed(4))
    forced = torch.tensor([[-1, BOS, -1, -1], [-1] * K, [EOS, EOS, -1, 7]])
    ours = warp(
        logits,
        forced,
        torch.full((3,), temperature),
        torch.full((3,), top_k),
        torch.full((3,), top_p),
    )
    for row in range(3):
        scores = logits[row].clone()
        for k in range(K):
            if forced[row, k] >= 0:
                keep = scores[k, forced[row, k]].clone()
                scores[k] = float("-inf")
                scores[k, forced[row, k]] = keep
        warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        for warper in warpers:
            scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(scores))
        finite = torch.isfinite(scores)
        assert torch.allclose(ours[row][finite], scores[finite])


def test_draws_follow_the_warped_distribution() -> None:
    logits = torch.randn(1, 1, 66, generator=torch.Generator().manual_seed(5))
    forced, temperature, top_k, top_p = (
        torch.full((500, 1), -1),
        torch.full((500,), 0.8),
        torch.full((500,), 10),
        torch.full((500,), 0.9),
    )
    probs = torch.softmax(warp(logits, forced[:1], temperature[:1], top_k[:1], top_p[:1]), -1)
    n = 20000
    draws = torch.cat(
        [
            sample_warped(
                logits.expand(500, 1, 66),
                forced,
                temperature,
                top_k,
                top_p,
                torch.from_numpy(row_keys(np.full(500, 3), np.arange(i, i + 500))),
            )
            for i in range(0, n, 500)
        ]
    ).view(-1)
    counts = torch.bincount(draws, minlength=66).float() / n
    probs = probs[0, 0]
    assert bool((counts[probs == 0] == 0).all())
    assert torch.allclose(counts, probs, atol=0.015)


def test_repetition_aware_redraw() -> None:
    tokens = torch.tensor([[3, 3, BOS, 9]])
    window = torch.tensor([[[3, 3, BOS, 1], [3, -1, BOS, 9], [-1, -1, BOS, 2]]])
    logits = torch.zeros(1, K, 66)
    logits[0, :, 40] = 30.0  # the raw distribution's all but certain pick
    got = redraw_repeats(tokens, logits, window, torch.tensor([2]), (BOS, EOS), torch.tensor([1]))
    # codebook 0: 3 twice in the window -> redrawn; 1: once -> kept; 2: stream
    # markers never count; 3: 9 once -> kept.
    assert got.tolist() == [[40, 3, BOS, 9]]


def test_the_two_draws_together_are_the_two_apart() -> None:
    """The engine's draw (first draw and repetition-aware redraw in one pass)
    gives the codes of ``sample_warped`` then ``redraw_repeats``, row by row."""
    gen = torch.Generator().manual_seed(8)
    rows = 6
    params = (
        torch.tensor([0.0, 0.7, 1.0, 1.3, 0.7, 1.0]),
        torch.tensor([0, 50, 5, 0, 2, 66]),
        torch.tensor([1.0, 0.95, 0.5, 1.0, 0.8, 0.3]),
    )
    for step in range(30):
        logits = torch.randn(rows, K, 66, generator=gen) * 3
        forced = torch.where(torch.rand(rows, K, generator=gen) < 0.2, BOS, -1)
        # Small alphabets: many repeats, so that redraws happen.
        window = torch.randint(-1, 4, (rows, 7, K), generator=gen)
        keys = torch.from_numpy(row_keys(np.arange(rows), np.full(rows, step)))
        repeats = torch.randint(1, 4, (rows,), generator=gen)
        apart = redraw_repeats(
            sample_warped(logits, forced, *params, keys),
            logits,
            window,
            repeats,
            (BOS, EOS),
            keys + 7,
        )
        together = sample_repeat_aware(
            logits,
            forced,
            warpers(*params, 66),
            keys,
            torch.from_numpy(counted_window(window.numpy(), (BOS, EOS))),
            repeats,
            keys + 7,
        )
        assert torch.equal(together, apart)
        # The table's warpers, set row by row, are those of the whole batch.
        table = RowSampling(rows, "cpu", vocab=66)
        for row in range(rows):
            temperature, top_k, top_p = (float(p[row]) for p in params)
            table.set_row(row, temperature=temperature, top_k=int(top_k), top_p=top_p, seed=row)
        assert table.warpers is not None
        for mine, whole in zip(table.warpers, warpers(*params, 66), strict=True):
            assert torch.equal(mine, whole)


def test_sampling_traces_as_one_graph() -> None:
    def draw(logits: torch.Tensor, forced: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        keys = torch.arange(rows)
        return sample_repeat_aware(
            logits,
            forced,
            warpers(
                torch.tensor([0.0, 0.7, 1.0]),
                torch.tensor([0, 50, 5]),
                torch.tensor([1.0, 0.95, 0.5]),
                66,
            ),
            keys,
            window,
            torch.full((rows,), 2),
            keys + 7,
        )

    logits = torch.randn(3, K, 66, generator=torch.Generator().manual_seed(6))
    forced = torch.tensor([[BOS, -1, -1, -1], [-1] * K, [-1, -1, EOS, EOS]])
    window = torch.randint(0, 66, (3, 7, K), generator=torch.Generator().manual_seed(7))
    try:
        torch._dynamo.reset()
        compiled = torch.compile(draw, fullgraph=True, backend="eager")
        assert torch.equal(compiled(logits, forced, window), draw(logits, forced, window))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kernel", [True, False], ids=["row-kernel", "torch"])
def test_delay_pattern_rules_match_the_processor(
    batched: HiggsEngine, kernel: bool, monkeypatch: Any
) -> None:
    """The rules' countdowns on the device (``RowRules``, by the row kernel on a
    CPU and by torch's operations) force what
    HiggsAudioV2DelayPatternLogitsProcessor leaves finite, step by step, through
    a stream's BOS rows and its EOS cascade; their repetition window is the
    utterance's last rows (the prompt's, then drawn), the stream markers not
    counted; a row that does not draw keeps its state."""
    if kernel and rowkernel.built() is None:
        pytest.skip("no row kernel on this machine")
    monkeypatch.setattr(rules_module, "KERNEL", kernel)
    config = batched.model.config
    rng = np.random.default_rng(0)
    rules = RowRules(2, batched.markers, 66, torch.device("cpu"))
    both = torch.tensor([True, False])  # row 0 draws, row 1 never does
    ras = torch.tensor([7, 7])
    for trial in range(20):
        processor = HiggsAudioV2DelayPatternLogitsProcessor(
            delay_pattern=[i + 1 for i in range(K)],
            audio_bos_token_id=int(config.audio_bos_token_id),
            audio_eos_token_id=int(config.audio_delay_token_id),
            audio_stream_bos_id=BOS,
            audio_stream_eos_id=EOS,
            num_codebooks=K,
            codebook_size=66,
        )
        parts = build_prompt(SYSTEM, "", [], [], f"Trial {trial}.")
        ids, _ = batched.tokenize(parts)
        job = request(batched, "r", "x")
        u = batched._open_utterance(job.state)
        rules.reset([(0, rules.initial(u))])
        idle = rules.state[1].clone()
        input_ids = ids
        first_eos = int(rng.integers(K + 1, 30))
        drawn: list[np.ndarray] = []
        for step in range(60):
            scores = processor(input_ids, torch.zeros(1, K * 66)).view(K, 66)
            forcing, window = rules.forced(2, ras, 8)
            forced = forcing[0].numpy()
            for k in range(K):
                finite = torch.isfinite(scores[k])
                if forced[k] >= 0:
                    assert finite.sum() == 1 and bool(finite[forced[k]]), (trial, step, k)
                else:
                    assert bool(finite.all()), (trial, step, k)
            recent = np.full((8, K), -1)
            if drawn:
                tail = np.stack(drawn[-7:])
                recent[8 - len(tail) :] = np.where((tail == BOS) | (tail == EOS), -1, tail)
            assert np.array_equal(window[0].numpy(), recent), (trial, step)
            # A row as a model might sample it: a spontaneous EOS in one codebook
            # at ``first_eos``, the forced codes elsewhere.
            row = np.where(forced >= 0, forced, rng.integers(0, BOS, K))
            if step == first_eos:
                row[int(rng.integers(0, K))] = EOS
            rules.take(2, both, torch.from_numpy(np.stack([row, row])))
            assert torch.equal(rules.fed(2)[0], torch.from_numpy(row))
            assert torch.equal(rules.state[1], idle)
            drawn.append(row)
            u.take(row.tolist(), max_new_tokens=1000)
            input_ids = torch.cat([input_ids, torch.tensor([[u.last]])], dim=1)
            if (row == EOS).all():
                break
        else:
            pytest.fail("the EOS cascade never ended the utterance")
        batched.finish(job)


def test_the_rules_by_the_row_kernel_are_torchs(monkeypatch: Any) -> None:
    """The row kernel's two calls read and move the rules as torch's operations
    do, for rows in every state (counting down, ended, drawing or not, windows
    of every length, the stream markers among the codes)."""
    if rowkernel.built() is None:
        pytest.skip("no row kernel on this machine")
    for rules, rows, window, ras_len, stepped, tokens in random_rules(K, BOS, EOS, 20):
        state = rules.state.clone()
        results = []
        for kernel in (True, False):
            monkeypatch.setattr(rules_module, "KERNEL", kernel)
            rules.state = state.clone()
            forced, recent = rules.forced(rows, ras_len, window)
            rules.take(rows, stepped, tokens)
            results.append((forced, recent, rules.state))
        (forced, recent, after), (torch_forced, torch_recent, torch_after) = results
        assert torch.equal(forced, torch_forced), (rows, window)
        assert torch.equal(recent, torch_recent), (rows, window)
        assert torch.equal(after, torch_after), (rows, window)
        assert torch.equal(after[rows:], state[rows:])  # (rows past the step's: as they were)


# -- the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello there, how are you?", DIALOGUE])
def test_greedy_equals_the_reference_path(
    batched: HiggsEngine, reference: HiggsEngine, text: str
) -> None:
    # Greedy, without the random redraw: the codes (and so the audio) of the
    # batched engine equal those of transformers' forward stepped alone, across
    # text chunks that reuse the cache, with an uploaded voice.
    params: dict[str, Any] = {"temperature": 0.0, "ras_win_len": 0, "max_new_tokens": 30, "seed": 1}
    inputs = {"reference": wav(1.0, 220)}
    for extra in ({}, {"chunk_method": "speaker"}):
        ours = request(batched, "a", text, inputs, **params, **extra)
        theirs = request(reference, "a", text, inputs, **params, **extra)
        got, expected = drive(batched, [ours])["a"], drive(reference, [theirs])["a"]
        assert torch.equal(batched.codes_of(ours), reference.codes_of(theirs))
        # The same codes; the audio to float rounding (chunk boundaries follow
        # the clock: a stream far ahead of real time gets larger chunks).
        assert got.shape == expected.shape
        assert np.allclose(got, expected, atol=1e-5)


def test_the_codes_of_a_chunk_under_way(batched: HiggsEngine, reference: HiggsEngine) -> None:
    """``codes_of`` mid-chunk: the frames streamed so far, on either path."""
    params: dict[str, Any] = {"temperature": 0.0, "ras_win_len": 0, "max_new_tokens": 30, "seed": 1}
    codes = []
    for engine in (batched, reference):
        job = request(engine, "a", "Hello there, how are you?", **params)
        for _ in range(15):  # the delay pattern's K - 1 steps, then frames
            assert not engine.step([job])[0].done
        codes.append(engine.codes_of(job))
        engine.finish(job)
    assert codes[0].shape == (1, K, 15 - (K - 1) - 1)
    assert torch.equal(codes[0], codes[1])


def test_voices_scenes_and_chunk_buffers_equal_the_reference_path(loaded: HiggsModel) -> None:
    """Named voices (with and without a transcript), a scene, a dialogue spoken
    turn by turn with one chunk kept as context: greedy codes equal the
    reference path's."""
    t = np.arange(16000) / 16000
    voices = {
        "belinda": Voice("belinda", Path("belinda.wav"), "I am Belinda.", np.sin(440 * t), 16000),
        "chad": Voice("chad", Path("chad.wav"), None, 0.5 * np.sin(170 * t), 16000),
    }
    scenes = {"hall": Scene("hall", Path("hall.txt"), "A large echoing hall.")}
    ours = HiggsEngine(loaded, name="t", voices=voices, scenes=scenes)
    theirs = HiggsReference(loaded, name="t", voices=voices, scenes=scenes)
    text = "[SPEAKER0] One turn.\n[SPEAKER1] Another.\n[SPEAKER0] A third.\n[SPEAKER1] Done."
    cases: list[dict[str, Any]] = [
        {"voice": "belinda", "scene": "hall"},
        {"voice": "belinda,chad", "chunk_method": "speaker", "generation_chunk_buffer_size": 1},
        {"voice": "chad", "chunk_method": "word", "chunk_max_word_num": 3},
    ]
    for extra in cases:
        given = {"temperature": 0.0, "ras_win_len": 0, "max_new_tokens": 20, "seed": 2, **extra}
        a, b = request(ours, "a", text, **given), request(theirs, "a", text, **given)
        drive(ours, [a])
        drive(theirs, [b])
        assert torch.equal(ours.codes_of(a), theirs.codes_of(b)), extra


def test_the_next_chunk_keeps_its_row_and_prefills_only_the_new_turn(
    batched: HiggsEngine,
) -> None:
    greedy: dict[str, Any] = {"temperature": 0.0, "ras_win_len": 0}
    job = request(batched, "a", DIALOGUE, chunk_method="speaker", max_new_tokens=20, **greedy)
    while job.state.index == 0:
        batched.step([job])
    first = job.state.spoken
    assert first is not None and job.state.slot is not None
    second = batched._open_utterance(job.state)  # what the next step opens
    # The cache kept the first prompt and the generated rows the new prompt
    # repeats: the BOS row and one per complete frame (19 were fed back; the
    # last K - 1 ran past the last complete frame).
    assert first.forwarded == 19
    assert second.fed == len(first.ids) + 1 + (20 - K)
    assert len(second.ids) > second.fed
    batched.finish(job)


def test_rows_in_a_batch_equal_their_solo_runs(batched: HiggsEngine) -> None:
    """Different texts, voices, lengths, chunking and join times, sampled with RAS:
    each row's logits match its solo run and its audio is the same."""
    specs: list[tuple[str, str, dict[str, bytes], dict[str, Any]]] = [
        ("a", "Hello there, how are you?", {}, {"max_new_tokens": 40}),
        ("b", DIALOGUE, {"reference": wav(0.8, 330)}, {"chunk_method": "speaker"}),
        ("c", "Short.", {}, {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0}),
        ("d", "Steady words here.", {}, {"temperature": 0.0, "max_new_tokens": 35}),
        ("e", DIALOGUE, {}, {"chunk_method": "speaker", "top_p": 1.0, "ras_win_len": 10}),
    ]
    for rid, _, _, extra in specs:
        extra.setdefault("max_new_tokens", 25)
        extra["seed"] = ord(rid)

    def run(jobs: list[Job], joins: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        with observed_logits(batched) as seen:
            audio = drive(batched, jobs, joins)
        codes = {job.request.request_id: batched.codes_of(job) for job in jobs}
        return {rid: (audio[rid], codes[rid]) for rid in audio}, seen

    solo_audio: dict[str, Any] = {}
    solo_logits: dict[str, Any] = {}
    for rid, text, inputs, extra in specs:
        audio, logits = run([request(batched, rid, text, inputs, **extra)], [0])
        solo_audio.update(audio)
        solo_logits.update(logits)
    jobs = [request(batched, rid, text, inputs, **extra) for rid, text, inputs, extra in specs]
    together_audio, together_logits = run(jobs, [0, 0, 3, 7, 8])
    for rid, *_ in specs:
        (audio, codes), (solo, solo_codes) = together_audio[rid], solo_audio[rid]
        assert torch.equal(codes, solo_codes), rid
        assert audio.shape == solo.shape and np.allclose(audio, solo, atol=1e-5), rid
        assert len(together_logits[rid]) == len(solo_logits[rid])
        for a, b in zip(together_logits[rid], solo_logits[rid], strict=True):
            assert torch.allclose(a, b, atol=1e-5), rid


def test_due_codec_windows_go_in_calls_of_at_most_codec_batch(loaded: HiggsModel) -> None:
    """Five streams due in the same steps: their windows go to the codec in calls of
    at most ``codec_batch``; each stream's audio is its solo run's."""
    engine = HiggsEngine(loaded, name="tiny-higgs", max_chunk_frames=8, codec_batch=2)
    engine.warm_up()
    assert engine.codec_batch == 2  # given, so not measured

    def spoken(rid: str) -> Job:
        return request(engine, rid, "Steady words here.", max_new_tokens=40, seed=1)

    solo = drive(engine, [spoken("solo")])["solo"]
    calls = count_codec_calls(engine)
    together = drive(engine, [spoken(rid) for rid in "abcde"])
    assert max(calls) == 2 and calls.count(2) >= 4
    for audio in together.values():
        assert audio.shape == solo.shape and np.allclose(audio, solo, atol=1e-5)
    measured = HiggsEngine(loaded, name="tiny-higgs", max_active=3)
    measured.warm_up()
    assert measured.codec_batch is not None and 1 <= measured.codec_batch <= 3


def test_a_cancelled_neighbour_and_a_reused_slot_change_nothing(batched: HiggsEngine) -> None:
    params: dict[str, Any] = {"max_new_tokens": 30, "seed": 3}
    solo = request(batched, "a", DIALOGUE, chunk_method="speaker", **params)
    drive(batched, [solo])
    a = request(batched, "a", DIALOGUE, chunk_method="speaker", **params)
    b = request(batched, "b", "I will be cancelled.", **params)
    c = request(batched, "c", "I take the free slot.", **params)
    live = [a, b]
    for step in range(500):
        if step == 10:
            slot = b.state.slot
            batched.finish(b)  # cancelled mid-way: its slot is free
            live.remove(b)
        if step == 14:
            live.append(c)
        outputs = batched.step(live)
        if step == 14:
            assert c.state.slot == slot
        live = [job for job, out in zip(live, outputs, strict=True) if not out.done]
        if a not in live:
            break
    assert torch.equal(batched.codes_of(a), batched.codes_of(solo))
    for job in (solo, a, c):
        batched.finish(job)


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_requests_begun_before_their_first_step_run_as_begun_by_it(
    loaded: HiggsModel, monkeypatch: Any, pipelined: bool
) -> None:
    """``begin`` (the scheduler's call as requests are prepared) takes their rows
    and opens their first chunks' prompts before their first step: the runs
    equal those the step begins, joining together or apart. A prompt that fails
    to open there fails its request in that first step (b, with no audio), and
    the others run as alone."""
    engine = HiggsEngine(loaded, name="tiny-higgs", pipelined=pipelined)
    texts = {"a": DIALOGUE, "b": "Mine fails.", "c": "Hello there, how are you?", "d": "Short."}
    params: dict[str, Any] = {"chunk_method": "speaker", "max_new_tokens": 25}

    def make(rid: str) -> Job:
        return request(engine, rid, texts[rid], seed=ord(rid), **params)

    def run(rids: str, joins: list[int], begin: bool) -> dict[str, Any]:
        jobs = [make(rid) for rid in rids]
        audio = step_together(engine, jobs, joins, begin=begin)
        return {
            job.request.request_id: (audio[job.request.request_id], engine.codes_of(job))
            for job in jobs
        }

    plain = run("acd", [0, 0, 4], begin=False)
    begun = run("acd", [0, 0, 4], begin=True)
    for rid, (audio, codes) in plain.items():
        got_audio, got_codes = begun[rid]
        assert torch.equal(got_codes, codes), rid
        assert np.allclose(np.concatenate(got_audio), np.concatenate(audio), atol=1e-5), rid
    open_utterance = engine._open_utterance
    opened: list[str] = []

    def faulty(st: Any) -> Any:
        opened.append(st.chunks[0])
        if st.chunks[0] == texts["b"]:
            raise RuntimeError("this prompt failed to open")
        return open_utterance(st)

    monkeypatch.setattr(engine, "_open_utterance", faulty)
    jobs = {rid: make(rid) for rid in "abc"}
    engine.begin(list(jobs.values()))
    assert opened.count(texts["b"]) == 1 and jobs["b"].state.failed is not None
    first = engine.step(list(jobs.values()))
    assert first[1].error is not None and first[1].error.code == "internal_error"
    assert first[1].audio is None and first[1].done
    engine.finish(jobs["b"])
    rest = step_together(engine, [jobs["a"], jobs["c"]])
    assert opened.count(texts["b"]) == 1  # (not opened again in the step)
    for rid, out in zip("ac", (first[0], first[2]), strict=True):
        assert out.error is None
        audio = ([] if out.audio is None else [out.audio]) + rest[rid]
        assert torch.equal(engine.codes_of(jobs[rid]), plain[rid][1]), rid
        assert np.allclose(np.concatenate(audio), np.concatenate(plain[rid][0]), atol=1e-5), rid
    # A part of ``begin`` for all of them that fails (the rows' rules): each
    # request fails with it in its first step.
    monkeypatch.undo()
    reset = engine._rules.reset
    monkeypatch.setattr(engine._rules, "reset", lambda opened: 1 / 0 if opened else reset(opened))
    crowd = [make(rid) for rid in "ac"]
    engine.begin(crowd)
    monkeypatch.undo()
    outs = engine.step(crowd)
    assert all(out.error is not None and out.done for out in outs)
    for job in crowd:
        engine.finish(job)


def test_a_request_that_fails_alone_ends_alone(batched: HiggsEngine, monkeypatch: Any) -> None:
    """b's row turns NaN, d's bookkeeping raises: each ends with its own error, a
    goes on as if alone, and c, taking b's row after it, equals its solo run."""
    params: dict[str, Any] = {"max_new_tokens": 30, "seed": 3}
    texts = {"a": DIALOGUE, "b": "My row goes bad.", "c": "I take the free slot.", "d": "Oops."}

    def make(rid: str) -> Job:
        return request(batched, rid, texts[rid], chunk_method="speaker", **params)

    solo = {rid: make(rid) for rid in "ac"}
    for job in solo.values():
        drive(batched, [job])
    advance = batched._advance

    def faulty(job: Job, tokens: Any) -> Any:
        if job.request.request_id == "d" and job.steps == 5:
            raise RuntimeError("a bug in one request's bookkeeping")
        return advance(job, tokens)

    monkeypatch.setattr(batched, "_advance", faulty)
    jobs = {rid: make(rid) for rid in "abcd"}
    live, errors = [jobs["a"], jobs["b"], jobs["d"]], {}
    for step in range(500):
        if step == 8:
            slot = jobs["b"].state.slot
            batched.decoder.kv.k[:, slot] = float("nan")
            batched.decoder.kv.v[:, slot] = float("nan")
        if step == 12:
            live.append(jobs["c"])
        outputs = batched.step(live)
        if step == 12:
            assert jobs["c"].state.slot == slot
        for job, out in zip(live, outputs, strict=True):
            if out.error is not None:
                errors[job.request.request_id] = out.error
                batched.finish(job)
        live = [job for job, out in zip(live, outputs, strict=True) if not out.done]
        if not live:
            break
    assert set(errors) == {"b", "d"}
    assert "non-finite" in errors["b"].message and errors["d"].code == "internal_error"
    for rid in "ac":
        assert torch.equal(batched.codes_of(jobs[rid]), batched.codes_of(solo[rid])), rid
        batched.finish(jobs[rid])
        batched.finish(solo[rid])


def test_a_prompt_that_fails_its_prefill_fails_alone(loaded: HiggsModel) -> None:
    """A crowd's prompts go in one call; where that call fails, each is fed again
    alone: the one that fails alone ends with an error, the others speak as alone.
    (No beginnings shared: every prompt goes in the first call.)"""
    engine = HiggsEngine(loaded, name="t", prefix_cache=0)
    assert engine.decoder is not None
    original = engine.decoder.prefill
    texts = {"a": "First of the crowd.", "bad": "I break the prefill.", "c": "Third, and fine."}
    params: dict[str, Any] = {"max_new_tokens": 16}
    crowd = {rid: request(engine, rid, text, seed=7, **params) for rid, text in texts.items()}
    calls: list[int] = []

    def faulty(rows: list[int], *args: Any) -> torch.Tensor:
        calls.append(len(rows))
        if crowd["bad"].state.slot in rows:
            raise RuntimeError("a bug in one prompt's prefill")
        return original(rows, *args)

    engine.decoder.prefill = faulty  # type: ignore[method-assign]
    outputs = engine.step(list(crowd.values()))
    assert calls == [3, 1, 1, 1]  # together, then each alone
    errors = {rid: out.error for rid, out in zip(crowd, outputs, strict=True) if out.error}
    assert list(errors) == ["bad"] and errors["bad"].code == "internal_error"
    engine.finish(crowd.pop("bad"))
    del engine.decoder.prefill
    drive(engine, list(crowd.values()))
    for rid, job in crowd.items():
        alone = request(engine, f"solo-{rid}", texts[rid], seed=7, **params)
        drive(engine, [alone])
        assert torch.equal(engine.codes_of(job), engine.codes_of(alone)), rid
        engine.finish(alone)
        engine.finish(job)


def test_sampled_utterances_end_on_their_own() -> None:
    """The plain random head samples stream EOS: the cascade ends the utterance
    early, frames stop before the EOS codes, and the stream ends cleanly."""
    tiny = build_tiny_higgs(quiet_eos=False)
    engine = HiggsEngine(HiggsModel(tiny.model, tiny.tokenizer, tiny.codec, True), name="t")
    ended = 0
    for seed in range(4):
        job = request(engine, "r", "Hello.", max_new_tokens=60, seed=seed)
        audio = drive(engine, [job])["r"]
        frames = audio.shape[0] // engine.hop
        assert audio.shape[0] == frames * engine.hop
        ended += frames < 60 - K
    assert ended >= 2


def test_a_crowd_prefills_within_the_budget(loaded: HiggsModel) -> None:
    """A crowd's prompts, of different lengths, go in one call a step (each
    request's next chunk, padded to the longest), within the budget counted in
    the call's padded positions; the running stream steps every time, and each
    prompt makes the same speech as alone."""
    engine = HiggsEngine(loaded, name="t", prefill_chunk=32, prefill_budget=64)
    calls: list[tuple[int, int]] = []  # rows, padded width
    original = engine.decoder.prefill if engine.decoder else None
    assert original is not None

    def counted(rows: list[int], tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append((len(rows), int(tokens.shape[1])))
        return original(rows, tokens, *args)

    engine.decoder.prefill = counted  # type: ignore[method-assign, union-attr]
    running = request(engine, "run", "I am speaking already.", max_new_tokens=200, seed=1)
    while engine.step([running])[0].audio is None:
        pass
    texts = [
        "A new voice joins the crowd.",
        "Hi.",
        "Another, longer voice joins it too.",
        "Me too!",
    ]
    short = {"max_new_tokens": 12}
    crowd = [request(engine, f"n{i}", text, seed=i, **short) for i, text in enumerate(texts)]
    calls.clear()

    def prefilling(job: Job) -> bool:
        u = job.state.utterance
        return u is None or u.fed < len(u.ids)

    together = 0
    while any(prefilling(job) for job in crowd):
        before = running.steps
        engine.step([running, *crowd])
        assert running.steps == before + 1
        assert len(calls) == 1
        rows, width = calls[0]
        assert rows * width <= 64 and width <= 32
        together = max(together, rows)
        calls.clear()
    assert together == 2  # two chunks of 32 (the prompts differ in length)
    lengths = {len(job.state.utterance.ids) for job in crowd}
    assert len(lengths) == len(texts)
    live = list(crowd)
    while live:
        outputs = engine.step([running, *live])
        live = [job for job, out in zip(live, outputs[1:], strict=True) if not out.done]
    for i, job in enumerate(crowd):
        alone = request(engine, f"solo{i}", texts[i], seed=i, **short)
        drive(engine, [alone])
        assert torch.equal(engine.codes_of(job), engine.codes_of(alone)), i
        engine.finish(alone)
    for job in [running, *crowd]:
        engine.finish(job)


def test_prompts_of_any_length_and_place_prefill_together_as_alone(loaded: HiggsModel) -> None:
    """The decoder's prefill of rows at different places with different lengths
    (padded to the longest in the call's tokens) leaves each row's cache and
    last logits as its own call does, and its next steps' logits too. Rows of
    one place and size (the first and the last) attend together; the padding is
    not computed: nothing lands past a row's new length."""
    model = loaded.model
    gen = torch.Generator().manual_seed(11)
    starts, sizes = [0, 7, 3, 0], [9, 4, 1, 9]
    heads = [torch.randint(0, 200, (1, n), generator=gen) for n in starts]
    chunks = [torch.randint(0, 200, (1, n), generator=gen) for n in sizes]
    width = max(sizes)
    count = len(sizes)

    def prepared() -> HiggsDecoder:
        decoder = HiggsDecoder(model, rows=4, length=64)
        for row, head in enumerate(heads):
            if head.shape[1]:
                decoder.prefill([row], head, None, np.zeros((1, head.shape[1]), bool), 0)
        return decoder

    with torch.no_grad():
        alone = prepared()
        expected = [
            alone.prefill([row], chunk, None, np.zeros((1, chunk.shape[1]), bool), starts[row])[0]
            for row, chunk in enumerate(chunks)
        ]
        together = prepared()
        tokens = torch.zeros((count, width), dtype=torch.int64)
        for row, chunk in enumerate(chunks):
            tokens[row, : sizes[row]] = chunk[0]
        tokens[1, sizes[1] :] = 5  # padding: any ids
        rows = list(range(count))
        got = together.prefill(rows, tokens, None, np.zeros((count, width), bool), starts, sizes)
        ends = [a + b for a, b in zip(starts, sizes, strict=True)]
        assert together.lengths[:count].tolist() == ends
        for row in range(count):
            assert torch.allclose(got[row], expected[row], atol=1e-5), row
            assert not together.kv.k[:, row, :, ends[row] :].any(), row
            assert not together.kv.v[:, row, :, ends[row] :].any(), row
        codes = torch.randint(0, BOS, (4, K), generator=gen)
        active = torch.tensor([True, True, True, True])
        for _ in range(3):
            want = alone.decode(codes, active, span=32)
            have = together.decode(codes, active, span=32)
            assert torch.allclose(have, want, atol=1e-5)


def test_a_packed_prefill_keeps_each_rows_audio(loaded: HiggsModel, batched: HiggsEngine) -> None:
    """Voiced prompts of different lengths in one call, the rows packed out of
    their order (two of one size first): each row's audio positions get its own
    codes, as the row's call alone does."""
    ids, audio, _ = voiced_prompt(batched, K, BOS)
    config = loaded.model.config
    tokens = ids[0].numpy()
    voiced = (tokens == config.audio_token_id) | (tokens == config.audio_delay_token_id)
    cut = int(np.flatnonzero(voiced)[10])  # rows 0 and 2: ten audio positions
    cuts = [cut, len(tokens), cut]
    width = max(cuts)
    short = (ids[:, :cut], audio[0, :10], voiced[None, :cut])
    calls = [short, (ids, audio[0].flip(0), voiced[None]), short]
    with torch.no_grad():
        alone = HiggsDecoder(loaded.model, rows=4, length=512)
        expected = [alone.prefill([row], *call, 0)[0] for row, call in enumerate(calls)]
        padded = torch.zeros((3, width), dtype=torch.int64)
        is_audio = np.zeros((3, width), dtype=bool)
        for row, (chunk, _, flags) in enumerate(calls):
            padded[row, : chunk.shape[1]] = chunk[0]
            is_audio[row, : chunk.shape[1]] = flags[0]
        codes = torch.cat([codes for _, codes, _ in calls])
        together = HiggsDecoder(loaded.model, rows=4, length=512)
        got = together.prefill([1, 0, 3], padded, codes, is_audio, 0, cuts)
    for row, table_row in enumerate([1, 0, 3]):
        assert torch.allclose(got[row], expected[row], atol=1e-5), row
        assert int(together.lengths[table_row]) == cuts[row]


def test_a_time_budget_sets_the_positions_per_step(loaded: HiggsModel) -> None:
    """With --prefill-budget-ms, the positions a step prefills follow the measured
    speed: on a clock where a position costs 1 ms, a 20 ms budget buys 20."""
    now = [0.0]
    engine = HiggsEngine(
        loaded,
        name="t",
        prefill_chunk=8,
        prefill_budget=1000,
        prefill_budget_ms=20.0,
        prefix_cache=0,  # (every prompt prefilled whole: none waits for another's beginning)
        clock=lambda: now[0],
    )
    calls: list[int] = []
    original = engine.decoder.prefill if engine.decoder else None
    assert original is not None

    def timed(rows: list[int], tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        # The positions the decoder computes: each row's own (it packs them).
        own = int(tokens.numel()) if args[3] is None else sum(args[3])
        calls.append(own)
        now[0] += 0.001 * own  # 1 ms a position
        return original(rows, tokens, *args)

    engine.decoder.prefill = timed  # type: ignore[method-assign, union-attr]
    crowd = [request(engine, f"n{i}", "A new voice joins the crowd.", seed=i) for i in range(4)]
    per_step: list[int] = []
    while any(
        job.state.utterance is None or job.state.utterance.fed < len(job.state.utterance.ids)
        for job in crowd
    ):
        calls.clear()
        engine.step(crowd)
        per_step.append(sum(calls))
    # Before a measurement: the position cap (1000, in chunks of 8, one per request);
    # after: what 20 positions a step hold, two requests' chunks of 8 (the last
    # steps, shorter chunks: up to 20).
    assert per_step[0] == 32
    assert all(n <= 20 for n in per_step[1:]) and 16 <= max(per_step[1:-1]) <= 20
    for job in crowd:
        engine.finish(job)


def test_a_step_covers_the_rows_in_use(loaded: HiggsModel) -> None:
    """After a crowd has gone, one request's step runs over a row or two, not the
    whole table (a power of two up to its slot)."""
    engine = HiggsEngine(loaded, name="t")
    assert engine.decoder is not None
    decoder = engine.decoder
    seen: list[int] = []
    original = decoder.decode

    def counted(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(int(codes.shape[0]))
        return original(codes, *args, **kwargs)

    decoder.decode = counted  # type: ignore[method-assign]
    crowd = [request(engine, f"c{i}", "We are many.", max_new_tokens=8, seed=i) for i in range(6)]
    drive(engine, crowd)
    for job in crowd:
        engine.finish(job)
    assert decoder.rows == 8 and max(seen) == 8
    seen.clear()
    alone = request(engine, "a", "Now I am alone.", max_new_tokens=12, seed=1)
    audio = drive(engine, [alone])["a"]
    assert set(seen) == {1}
    # The same as on a fresh engine whose table never grew.
    fresh = HiggsEngine(loaded, name="t")
    again = request(fresh, "a", "Now I am alone.", max_new_tokens=12, seed=1)
    assert np.allclose(drive(fresh, [again])["a"], audio, atol=1e-5)
    assert torch.equal(fresh.codes_of(again), engine.codes_of(alone))


def test_the_step_through_static_buffers_equals_the_direct_step(loaded: HiggsModel) -> None:
    """``cuda_graphs`` (on a CPU: the graphs' static buffers, the step run eagerly
    on them): the same logits and codes as the direct step, with requests joining,
    a voice reference and dialogue chunks (new turns prefilled into kept rows)."""
    runs = []
    for cuda_graphs in (False, True):
        engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=cuda_graphs)
        jobs = [
            request(engine, "a", "Hello there, how are you?", max_new_tokens=30, seed=1),
            voiced_dialogue(engine, "b"),
            request(engine, "c", "Short.", max_new_tokens=12, temperature=0.0, seed=3),
        ]
        with observed_logits(engine) as seen:
            audio = drive(engine, jobs, [0, 0, 3])
        runs.append(
            (engine, audio, seen, {job.request.request_id: engine.codes_of(job) for job in jobs})
        )
    (_, audio, seen, codes), (staged, staged_audio, staged_seen, staged_codes) = runs
    for rid in codes:
        assert torch.equal(staged_codes[rid], codes[rid]), rid
        assert np.array_equal(staged_audio[rid], audio[rid]), rid
        assert len(staged_seen[rid]) == len(seen[rid])
        assert all(torch.equal(x, y) for x, y in zip(staged_seen[rid], seen[rid], strict=True))
    assert staged._graphs is not None and staged._graphs.recorded == 0 and len(staged._graphs)


def test_a_table_the_memory_cannot_hold_is_refused_at_load(loaded: HiggsModel) -> None:
    """``cuda_graphs`` reserves the table for ``max_active`` requests at load;
    more than the memory free can hold stops the load before allocating, with
    one line for the operator (this machine's real free memory)."""
    assert free_memory("cpu") is not None
    huge = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True, max_active=2**40, codec_batch=4)
    with pytest.raises(ModelLoadError) as refused:
        huge.warm_up()
    message = str(refused.value)
    assert message.startswith("tiny-higgs: --max-active 1099511627776 needs ")
    assert re.search(r"GiB free; \d+ fit \(--max-active \d+\)$", message), message


def test_asked_for_none_the_speech_table_is_sized_for_as_many_as_fit(
    loaded: HiggsModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_active`` 0 (the server's default): the speech engine sizes its table
    at warm-up as the music engine does (``kv.room_for``): the tiny model's fit
    ``kv.AUTO_MOST`` requests in this machine's memory, and fewer in less."""
    roomy = HiggsEngine(loaded, name="tiny-higgs", max_active=0, codec_batch=4)
    roomy.warm_up()
    assert roomy.max_active == kv.AUTO_MOST["cpu"] == 16
    length = roomy._table_length()
    one = HiggsEngine(loaded, name="tiny-higgs", max_active=1, codec_batch=4)
    one.warm_up()

    def need(requests: int) -> int:
        return one.decoder.bytes_for(rows=requests, length=length)

    between = (need(2) + need(4)) // 2
    monkeypatch.setattr(kv, "free_memory", lambda device: int(between / kv.AUTO_SHARE))
    two = HiggsEngine(loaded, name="tiny-higgs", max_active=0, codec_batch=4)
    two.warm_up()
    assert two.max_active == 2


def test_every_step_shape_is_ready_after_warm_up(loaded: HiggsModel) -> None:
    """``cuda_graphs``: warming up prepares (on CUDA: records) every shape the
    configured crowd can step, before the server reports ready: rows for 1 and 2
    requests (``max_active`` 2), every span up to a default request's positions,
    the default repetition-aware window.
    Then a dialogue with a voice reference and a request beside it step through
    prepared shapes only and nothing is dropped; their codes equal the direct
    step's."""
    staged = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True, max_active=2)
    graphs = staged._graphs
    assert graphs is not None and len(graphs) == 0
    staged.warm_up()
    assert staged.decoder is not None
    # Room for 1024 prompt positions and the default 2048 new tokens: 3073.
    assert staged.decoder.length == 3073
    cache = staged.decoder.kv.k
    # (What the load-time check estimated for the table is what it holds.)
    assert staged.decoder.bytes_for(rows=2, length=3073) == 2 * cache.numel() * cache.element_size()
    spans = (64, 128, 256, 512, 1024, 2048, 4096)
    # (and the default repetition-aware window, 7 frames, as 8)
    assert graphs.shapes == {(rows, span, 8) for rows in (1, 2) for span in spans}
    prepared, storage, drops = graphs.shapes, staged.decoder.storage(), graphs.dropped
    results = []
    for engine in (staged, HiggsEngine(loaded, name="tiny-higgs")):
        jobs = [
            voiced_dialogue(engine, "b"),
            request(engine, "a", "Hello there, how are you?", max_new_tokens=30, seed=1),
        ]
        drive(engine, jobs, [0, 4])
        results.append([engine.codes_of(job) for job in jobs])
    assert staged.decoder.storage() == storage
    assert graphs.shapes == prepared and graphs.dropped == drops
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


def test_the_graphed_step_traces_as_one_graph(loaded: HiggsModel) -> None:
    """The whole device side of a graphed speech step (the forward of the codes
    each row drew last, the prefilled rows' logits put in, the delay pattern's
    forced codes, the warpers, the draw, the repetition-aware redraws and the
    rules' state moved on) traces as one graph, with the eager step's outputs
    and state."""
    engine = HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=True)
    jobs = [
        request(engine, r, "Hello there.", max_new_tokens=20, seed=i) for i, r in enumerate("ab")
    ]
    try:
        engine.step(jobs)  # prefill them
        decoder = engine.decoder
        rows, window = decoder.rows, 8
        gen = torch.Generator().manual_seed(0)
        keys = torch.randint(0, 2**31, (2, rows * K), generator=gen)  # one per codebook
        parts = [
            torch.ones(rows, dtype=torch.int64),
            torch.ones(rows, dtype=torch.int64),
            keys[0],
            keys[1],
            torch.full((rows,), 2),
            torch.full((rows,), 7),
            torch.tensor([0, 1] * (rows // 2) or [0]),
        ]
        flat = torch.cat(parts)
        engine._prefilled.logits.normal_()
        rules = engine._rules.state
        rules[:rows, -window * K :] = torch.randint(0, BOS, (rows, window * K), generator=gen)
        before = decoder.lengths.clone(), rules.clone()
        eager = engine._graphed_step([flat], (rows, 64, window))
        after = rules.clone()
        assert not torch.equal(after, before[1])
        decoder.lengths.copy_(before[0])
        rules.copy_(before[1])
        try:
            torch._dynamo.reset()
            compiled = torch.compile(engine._graphed_step, fullgraph=True, backend="eager")
            traced = compiled([flat], (rows, 64, window))
        finally:
            torch._dynamo.reset()
        assert torch.equal(traced[0], eager[0])
        assert torch.allclose(traced[1], eager[1], atol=1e-5)
        assert torch.equal(decoder.lengths, before[0] + 1)
        assert torch.equal(rules, after)
    finally:
        for job in jobs:
            engine.finish(job)


def test_finished_and_cancelled_requests_leave_nothing_behind(loaded: HiggsModel) -> None:
    """Once finished (done, or cancelled half-way), no request's state stays
    reachable from the engine (its row is free, no codec window waits for it)."""
    import gc
    import weakref

    engine = HiggsEngine(loaded, name="tiny-higgs")
    for _ in range(2):
        jobs = [
            request(engine, "a", "Hello there.", max_new_tokens=20, seed=1),
            request(engine, "b", DIALOGUE, chunk_method="speaker", max_new_tokens=12, seed=2),
            request(engine, "c", "Cut short, this one.", max_new_tokens=40, seed=3),
        ]
        states = [weakref.ref(job.state) for job in jobs]
        live = list(jobs)
        for step in range(200):
            if step == 6:  # c is cancelled half-way
                engine.finish(jobs[2])
                live.remove(jobs[2])
            if not live:
                break
            outputs = engine.step(live)
            live = [job for job, out in zip(live, outputs, strict=True) if not out.done]
        for job in jobs:
            engine.finish(job)
        del jobs, live, outputs
        gc.collect()
        assert all(owner is None for owner in engine._slots.owners) and not engine._due
        assert all(state() is None for state in states)
