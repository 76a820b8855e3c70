"""A speech stream picked up from its codes (``generate.resume_codes``): the
rows its cut try drew are taken again (each chunk's stop rules, its frames),
the chunk under way opens with those it has in its prompt, and the rest of the
stream is the one the whole run drew, its audio too."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch
from test_higgs_batched import BOS, DIALOGUE, EOS, K, wav

from wavecast.protocol import InvalidField
from wavecast.server.engines.base import EngineRequest, Job
from wavecast.server.engines.codec_stream import remake
from wavecast.server.engines.higgs import rules as rules_module
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.higgs.rules import RowRules
from wavecast.server.engines.higgs.utterance import Utterance
from wavecast.server.engines.pieces import run_through
from wavecast.server.engines.testing.higgs import build_tiny_higgs

VOICED = {"reference": wav(0.8, 330)}


@pytest.fixture(scope="module")
def loaded() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "pipelined"])
def engine(request: pytest.FixtureRequest, loaded: HiggsModel) -> HiggsEngine:
    return HiggsEngine(loaded, name="tiny-higgs", pipelined=request.param)


@pytest.fixture(scope="module")
def ending() -> HiggsEngine:
    """Its head samples stream EOS: utterances end on their own."""
    tiny = build_tiny_higgs(quiet_eos=False)
    return HiggsEngine(HiggsModel(tiny.model, tiny.tokenizer, tiny.codec, True), name="t")


def asked(engine: HiggsEngine, resume: list[list[int]] | None = None, **given: Any) -> Any:
    params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    params.update(given)
    data = None if resume is None else np.asarray(resume, "<u2").tobytes()
    return params, data


def prepared(
    engine: HiggsEngine,
    text: str,
    inputs: dict[str, bytes] | None = None,
    resume: list[list[int]] | None = None,
    rid: str = "t",
    heard: int = 0,
    **given: Any,
) -> Job:
    params, data = asked(engine, resume, **given)
    request = EngineRequest(rid, text, params, inputs or {}, resume_codes=data, resume=heard)
    engine.check(request)
    return engine.prepare(request)


def run(
    engine: HiggsEngine,
    text: str,
    inputs: dict[str, bytes] | None = None,
    resume: list[list[int]] | None = None,
    heard: int = 0,
    **given: Any,
) -> tuple[Job, list[tuple[int, list[list[int]]]], np.ndarray]:
    """A request alone to its end (its client having ``heard`` sample frames):
    its job, its outputs' codes (where each starts, its rows) and its audio."""
    job = prepared(engine, text, inputs, resume, heard=heard, **given)
    sent, chunks = [], []
    while True:
        out = engine.step([job])[0]
        if out.codes:
            sent.append((out.codes_from, out.codes))
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            return job, sent, np.concatenate(chunks)


def rows_of(sent: list[tuple[int, list[list[int]]]]) -> list[list[int]]:
    return [row for _, rows in sent for row in rows]


def test_the_rules_moved_on_at_once_are_those_taken_row_by_row(monkeypatch: Any) -> None:
    """``moved_on`` leaves a row's rules as ``take`` does a row at a time (by the
    row kernel and by torch's operations): countdowns before and after a
    codebook ends, windows of the prompt's rows and past them, the markers."""
    engine = HiggsEngine(load_higgs("tiny-higgs", None, "cpu"), name="t")
    markers = engine.markers
    rng = np.random.default_rng(0)
    ids, audio = engine.tokens(engine.chunk_prompt(prepared(engine, "Hello.").state))
    opening = Utterance.start(ids, audio, markers)
    for kernel in (True, False):
        monkeypatch.setattr(rules_module, "KERNEL", kernel)
        for n in (1, 3, 10, 70, 90):
            rows = rng.integers(0, 64, size=(n, K))
            rows[: min(n, K)] = BOS  # (a few marked ones, and EOS from where it ends)
            if n > 8:
                rows[n - 5 :, 0] = EOS
                rows[n - 3 :, 1] = EOS
            rules = RowRules(1, markers, engine.decoder.card, torch.device("cpu"))
            start = rules.initial(opening)
            rules.reset([(0, start)])
            for row in rows:
                rules.take(1, torch.ones(1, dtype=torch.bool), torch.from_numpy(row)[None])
            at_once = rules.moved_on(start, rows.tolist())
            assert np.array_equal(at_once, rules.state[0].numpy()), (kernel, n)
            assert np.array_equal(start, rules.initial(opening))  # (not changed in place)


@pytest.mark.parametrize("known", [2, 9, 20, 21, 30, 45, 59, 60])
def test_a_stream_picked_up_from_its_codes_goes_on_as_it_went(
    engine: HiggsEngine, known: int
) -> None:
    """A sampled dialogue in three chunks of 20 rows with an uploaded voice,
    picked up before its first frame, within a chunk, where one begins, and at
    its last row (or all of them: the last is drawn again): the rows after the
    known ones are the whole run's, so are its frames and its audio (the known
    frames' made again before its first step)."""
    given = {"chunk_method": "speaker", "max_new_tokens": 20, "seed": 2, "temperature": 1.0}
    whole_job, whole_sent, whole = run(engine, DIALOGUE, VOICED, **given)
    rows = rows_of(whole_sent)
    assert len(rows) == 60 and [first for first, _ in whole_sent[:3]] == [0, 1, 2]
    codes = engine.codes_of(whole_job)[0].numpy()
    job = prepared(engine, DIALOGUE, VOICED, rows[:known], **given)
    decoder = job.state.decoder
    frames = job.state.produced
    first = min(known, 59)  # (the last row is drawn again)
    assert frames == first // 20 * (20 - K) + max(0, first % 20 - K)
    # Their audio is ready before the first step, all but the codec's lookahead.
    pending = job.state.pending_audio
    if frames > decoder.codec.lookahead:
        assert len(pending) >= (frames - decoder.codec.lookahead) * engine.hop
    else:
        assert pending is None
    assert job.extra["from_codes"] == pytest.approx(frames / 25)
    engine.finish(job)
    job, sent, audio = run(engine, DIALOGUE, VOICED, rows[:known], **given)
    assert np.array_equal(engine.codes_of(job)[0].numpy(), codes)
    assert sent[0][0] == first
    assert rows_of(sent) == rows[first:]
    assert audio.shape == whole.shape and np.abs(audio - whole).max() <= 1e-4


@pytest.mark.parametrize(("known", "heard"), [(30, 1), (30, 10), (30, 22), (45, 40), (59, 20)])
def test_a_stream_picked_up_makes_none_of_the_audio_its_client_has_again(
    engine: HiggsEngine, known: int, heard: int
) -> None:
    """Its client has ``heard`` frames and a few samples more (the rows go
    further, or stop before): their audio is not made again, the decoder takes
    their frames as context; from the frame they end in, the audio is the whole
    run's."""
    given = {"chunk_method": "speaker", "max_new_tokens": 20, "seed": 2, "temperature": 1.0}
    _, whole_sent, whole = run(engine, DIALOGUE, VOICED, **given)
    rows = rows_of(whole_sent)
    job, sent, audio = run(engine, DIALOGUE, VOICED, rows[:known], heard * engine.hop + 5, **given)
    frames = known // 20 * (20 - K) + max(0, known % 20 - K)  # (the known rows')
    start = min(heard, frames) * engine.hop
    assert job.extra["from_sample"] == start
    assert rows_of(sent) == rows[known:]
    assert audio.shape == whole[start:].shape and np.abs(audio - whole[start:]).max() <= 1e-4


def test_streams_picked_up_where_their_chunks_end_on_their_own(ending: HiggsEngine) -> None:
    """Chunks that end by their codes (every codebook at stream EOS): picked up
    as the EOS cascade counts down, at the row that ends a chunk, and just
    after it."""
    given = {"chunk_method": "speaker", "max_new_tokens": 40, "seed": 3}
    _, whole_sent, whole = run(ending, DIALOGUE, **given)
    rows = rows_of(whole_sent)
    ends = [i for i, row in enumerate(rows) if row.count(EOS) == K]
    assert len(ends) == 3 and ends[0] < 39 and ends[-1] == len(rows) - 1  # (on its own)
    cascade = next(i for i, row in enumerate(rows) if EOS in row)
    for known in (cascade, cascade + 1, ends[0], ends[0] + 1, ends[1] + 2):
        _, sent, audio = run(ending, DIALOGUE, resume=rows[:known], **given)
        assert sent[0][0] == known and rows_of(sent) == rows[known:], known
        assert audio.shape == whole.shape and np.abs(audio - whole).max() <= 1e-4


def test_the_next_chunk_keeps_a_picked_up_rows_cache(engine: HiggsEngine) -> None:
    """After a chunk picked up in its middle, the next chunk's prompt repeats
    the known rows and those generated after: the row's cache keeps them all
    (only the new turn is prefilled), as without the pick-up."""
    greedy = {"temperature": 0.0, "ras_win_len": 0}
    given = {"chunk_method": "speaker", "max_new_tokens": 20, **greedy}
    _, whole_sent, _ = run(engine, DIALOGUE, **given)
    job = prepared(engine, DIALOGUE, resume=rows_of(whole_sent)[:12], **given)
    while job.state.index == 0:
        engine.step([job])
    first = job.state.spoken
    assert first is not None and first.known == 12
    second = engine._open_utterance(job.state)
    assert second.fed == len(first.ids) - 12 + 1 + (20 - K)
    engine.finish(job)


def test_a_stream_picked_up_beside_others_goes_on_as_it_went(engine: HiggsEngine) -> None:
    """Joining a batch under way: its rows are those of its whole run alone, and
    its neighbour's are unchanged."""
    picked = {"chunk_method": "speaker", "max_new_tokens": 20, "seed": 4}
    other = {"max_new_tokens": 40, "seed": 7}
    _, solo, _ = run(engine, DIALOGUE, **picked)
    _, neighbour_solo, _ = run(engine, "Somebody else is speaking.", **other)
    neighbour = prepared(engine, "Somebody else is speaking.", rid="n", **other)
    sent: dict[str, list[Any]] = {"n": [], "p": []}
    jobs = [neighbour]
    for step in range(60):
        if step == 9:
            jobs.append(prepared(engine, DIALOGUE, resume=rows_of(solo)[:25], rid="p", **picked))
        outs = engine.step(jobs)
        for job, out in zip(jobs, outs, strict=True):
            if out.codes:
                sent[job.request.request_id].append((out.codes_from, out.codes))
        jobs = [job for job, out in zip(jobs, outs, strict=True) if not out.done]
        if not jobs:
            break
    assert not jobs
    assert rows_of(sent["n"]) == rows_of(neighbour_solo)
    assert rows_of(sent["p"]) == rows_of(solo)[25:]


@pytest.mark.parametrize(
    ("codes", "says"),
    [
        (b"\x00" * 6, "whole timesteps"),
        (np.full((2, K), 66, "<u2").tobytes(), "below 66"),  # (64 codes, the two markers)
        (np.zeros((17, K), "<u2").tobytes(), "draws 16 at most"),  # (two chunks of 8)
    ],
    ids=["a part of a timestep", "a code too high", "more rows than the request draws"],
)
def test_codes_to_pick_up_from_that_cannot_be_are_refused(
    loaded: HiggsModel, codes: bytes, says: str
) -> None:
    engine = HiggsEngine(loaded, name="tiny-higgs")
    params, _ = asked(engine, chunk_method="word", chunk_max_word_num=2, max_new_tokens=8)
    request = EngineRequest("t", "One two three four.", params, resume_codes=codes)
    with pytest.raises(InvalidField) as info:
        engine.check(request)
    assert info.value.field == "resume_codes" and says in str(info.value)


@pytest.mark.parametrize(
    ("fixed", "per_frame", "budget"),
    [(0.002, 0.0005, None), (0.002, 0.0005, 0.020), (0.045, 0.0037, 0.020)],
    ids=["no budget", "a fast codec", "a codec whose calls cost over half the budget"],
)
def test_the_known_audio_is_made_again_in_parts_of_the_time_budget(
    loaded: HiggsModel, fixed: float, per_frame: float, budget: float | None
) -> None:
    """``remake`` (both engines'): with the prefill's time budget, the parts
    after the first few take about the budget at the codec's speed (here a
    call's fixed cost and a frame's: 2 ms and 0.5 ms, 35 or 36 frames), or
    twice a call's fixed cost where that is over half the budget (the real
    musicgen-small's codec on this project's CPUs: 45 ms and 3.7 ms, 12
    frames); without one, 250 frames a part. The audio is the same as made in
    one go, to float rounding."""
    engine = HiggsEngine(loaded, name="tiny-higgs")
    codes = np.random.default_rng(1).integers(0, 64, (1, K, 600))
    expected = engine.codec_streams.stream().push_now(codes)
    decoder = engine.codec_streams.stream()
    now, sizes, times = [0.0], [], []
    push_now = decoder.push_now

    def timed(part: np.ndarray) -> Any:
        sizes.append(part.shape[-1])
        times.append(fixed + per_frame * part.shape[-1])
        now[0] += times[-1]
        return push_now(part)

    decoder.push_now = timed  # type: ignore[method-assign]
    made = remake(decoder, codes, contextlib.nullcontext, budget, lambda: now[0])
    parts = run_through(made)
    assert np.abs(np.concatenate(parts) - expected).max() <= 1e-5
    assert sum(sizes) == 600
    if budget is None:
        assert sizes == [250, 250, 100]
    elif fixed < budget / 2:
        assert sizes[:2] == [16, 32] and set(sizes[2:-1]) <= {35, 36}
        assert max(times[2:]) <= budget * 1.001
    else:
        assert sizes[:4] == [16, 3, 6, 12] and set(sizes[4:-1]) == {12}
        assert max(times[3:]) <= 2 * fixed
