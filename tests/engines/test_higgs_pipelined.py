"""Pipelined speech steps (``pipelined``): each call launches its step before
it reads the last one's codes (the rows' rules on the device), then keeps the
requests' rows, decodes their audio and returns their outputs.

Each request draws what the plain steps draw, from the same logits (within
1e-5: a request's next chunk starts a step later, beside other rows), so its
codes are the plain engine's; each step's outputs come a call later. The
batched engine's cases (a crowd joining apart against solo runs, a neighbour
cancelled, requests failing alone) run here on a pipelined engine too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import test_higgs_batched as batched_tests
import torch
from helpers import (
    cancelled_in_flight_leave_nothing,
    left_out_now_and_then,
    observed_logits,
    steps_in_order,
    waits_in,
)
from test_higgs_batched import DIALOGUE, K, drive, request, wav
from test_prefixes import SCENES, VOICES

from wavecast.server.engines.base import Job
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.testing.higgs import build_tiny_higgs


@pytest.fixture(scope="module")
def loaded() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu")


@pytest.fixture(scope="module")
def pipelined(loaded: HiggsModel) -> HiggsEngine:
    return HiggsEngine(loaded, name="tiny-higgs", pipelined=True)


def crowd(engine: HiggsEngine) -> list[Job]:
    """Texts, a dialogue in chunks with an uploaded voice, greedy and sampled
    with repetition-aware sampling, lengths of their own."""
    return [
        request(engine, "a", "Hello there, how are you?", max_new_tokens=40, seed=1),
        request(
            engine,
            "b",
            DIALOGUE,
            {"reference": wav(0.8, 330)},
            chunk_method="speaker",
            max_new_tokens=25,
            seed=2,
        ),
        request(engine, "c", "Short.", max_new_tokens=12, temperature=1.0, top_k=0, seed=3),
        request(engine, "d", "Steady words here.", temperature=0.0, max_new_tokens=35, seed=4),
    ]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-buffers"])
def test_pipelined_steps_are_the_plain_steps(loaded: HiggsModel, graphs: bool) -> None:
    """A crowd joining apart: each request's logits equal the plain engine's
    (bit for bit but where its next chunk starts beside other rows than in the
    plain steps: within 1e-5, as in any batch), its codes too, its audio the
    plain stream's (within 1e-5: the codec's calls may group the streams'
    chunks otherwise)."""
    engines = [
        HiggsEngine(loaded, name="tiny-higgs", cuda_graphs=graphs, pipelined=pipelined)
        for pipelined in (False, True)
    ]
    results = []
    for engine in engines:
        jobs = crowd(engine)
        with observed_logits(engine) as seen:
            audio = drive(engine, jobs, [0, 0, 3, 7])
        codes = {job.request.request_id: engine.codes_of(job) for job in jobs}
        results.append((audio, codes, seen))
        for job in jobs:
            engine.finish(job)
    (audio, codes, seen), (piped_audio, piped_codes, piped_seen) = results
    for rid in audio:
        assert torch.equal(piped_codes[rid], codes[rid]), rid
        assert piped_audio[rid].shape == audio[rid].shape, rid
        assert np.abs(piped_audio[rid] - audio[rid]).max() <= 1e-5, rid
        assert len(piped_seen[rid]) == len(seen[rid]) > 10, rid
        pairs = list(zip(piped_seen[rid], seen[rid], strict=True))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs), rid
        if rid != "b":  # (the one request in chunks)
            assert all(torch.equal(a, b) for a, b in pairs), rid


def test_a_steps_codes_are_read_before_the_next_launch_and_decoded_after(
    pipelined: HiggsEngine, monkeypatch: Any
) -> None:
    """Within a call: this step launched, then the last step's codes read,
    then the codec's calls; a request's first output (nothing yet) comes
    before any codes are read, its last in the call after its last step, in
    which nothing more is launched (its last row known by its length)."""
    marks = {"_read": lambda *_: "read", "_launch": lambda *_: "launch"}
    marks["_decode_due"] = lambda: "codec"
    job = request(pipelined, "a", "Hello there.", max_new_tokens=20, seed=1)
    calls, outputs = steps_in_order(pipelined, job, marks, monkeypatch)
    assert calls[0] == ["launch", "codec"] and outputs[0].audio is None
    assert all(call == ["launch", "read", "codec"] for call in calls[1:])
    assert outputs[-1].done and pipelined._in_flight is None  # (nothing launched after)


def test_rows_in_a_pipelined_batch_equal_their_solo_runs(pipelined: HiggsEngine) -> None:
    batched_tests.test_rows_in_a_batch_equal_their_solo_runs(pipelined)


def test_a_cancelled_neighbour_in_flight_and_a_reused_slot_change_nothing(
    pipelined: HiggsEngine,
) -> None:
    batched_tests.test_a_cancelled_neighbour_and_a_reused_slot_change_nothing(pipelined)


def test_a_request_failing_alone_in_flight_ends_alone(
    pipelined: HiggsEngine, monkeypatch: Any
) -> None:
    batched_tests.test_a_request_that_fails_alone_ends_alone(pipelined, monkeypatch)


def test_finished_and_cancelled_pipelined_requests_leave_nothing_behind(
    loaded: HiggsModel,
) -> None:
    """Requests finished (done, or cancelled with their codes in flight, the
    server then idle) leave nothing of theirs reachable from the engine."""
    engine = HiggsEngine(loaded, name="tiny-higgs", pipelined=True)
    drive(engine, [request(engine, "a", "Hello there.", max_new_tokens=20, seed=1)])
    jobs = [
        request(engine, "b", DIALOGUE, chunk_method="speaker", max_new_tokens=12, seed=2),
        request(engine, "c", "Cut short, this one.", max_new_tokens=40, seed=3),
    ]
    cancelled_in_flight_leave_nothing(engine, jobs, 4)


def test_a_request_left_out_of_calls_loses_nothing(pipelined: HiggsEngine) -> None:
    """A request left out of calls while its codes are in flight: they are read
    and its row taken, its output waits for its next call, and it speaks what
    it speaks when not left out."""

    def jobs() -> dict[str, Job]:
        return {
            "a": request(pipelined, "a", "Hello there.", max_new_tokens=20, seed=1),
            "b": request(pipelined, "b", "Steady words here.", max_new_tokens=30, seed=2),
        }

    runs = [left_out_now_and_then(pipelined, jobs(), leave) for leave in (None, "b")]
    for rid in "ab":
        (codes, audio), (left_codes, left_audio) = runs[0][rid], runs[1][rid]
        assert torch.equal(left_codes, codes), rid
        assert left_audio.shape == audio.shape and np.abs(left_audio - audio).max() <= 1e-5


def test_utterances_ending_by_their_codes_draw_what_the_plain_steps_draw() -> None:
    """On the plain random head, utterances end by stream EOS (the cascade),
    which a pipelined step learns only after it launched the next step: that
    draw is dropped and its counts undone. A dialogue whose chunks end so, and
    texts ending so, speak the plain engine's codes (the next chunk's first draw
    with the plain step's noise), their logits within 1e-5 of the plain ones,
    and each next chunk keeps as much of the row's cache as in the plain
    steps; nothing stays in flight for them."""
    tiny = build_tiny_higgs(quiet_eos=False)
    loaded = HiggsModel(tiny.model, tiny.tokenizer, tiny.codec, True)
    results = []
    for pipelined in (False, True):
        engine = HiggsEngine(loaded, name="t", pipelined=pipelined)
        kept: list[int] = []  # positions of each chunk's prompt already in the row
        opening = engine._open_utterance

        def open_utterance(st: Any, opening: Any = opening, kept: list[int] = kept) -> Any:
            u = opening(st)
            kept.append(u.fed)
            return u

        engine._open_utterance = open_utterance  # type: ignore[method-assign]
        jobs = [
            request(engine, "a", DIALOGUE, chunk_method="speaker", max_new_tokens=60, seed=5),
            request(engine, "b", "Hello.", max_new_tokens=60, seed=1),
            request(engine, "c", "Hi.", max_new_tokens=60, temperature=0.7, seed=2),
        ]
        with observed_logits(engine) as seen:
            audio = drive(engine, jobs, [0, 2, 4])
        codes = {job.request.request_id: engine.codes_of(job) for job in jobs}
        chunks = [audio.codes.shape[-1] for _, audio in jobs[0].state.history]
        results.append((audio, codes, seen, (chunks, kept)))
        assert engine._in_flight is None
        for job in jobs:
            engine.finish(job)
    (audio, codes, seen, (chunks, kept)), (piped_audio, piped_codes, piped_seen, piped) = results
    # Chunks of the dialogue ended by EOS before their cap, the next chunk after them.
    assert len(chunks) == 3 and sum(frames < 60 - K for frames in chunks[:-1]) >= 1, chunks
    assert sum(fed > 0 for fed in kept) == 2  # (the dialogue's second and third chunks)
    assert piped == (chunks, kept)
    for rid in audio:
        assert torch.equal(piped_codes[rid], codes[rid]), rid
        assert piped_audio[rid].shape == audio[rid].shape, rid
        assert np.abs(piped_audio[rid] - audio[rid]).max() <= 1e-5, rid
        assert len(piped_seen[rid]) == len(seen[rid]), rid
        pairs = zip(piped_seen[rid], seen[rid], strict=True)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs), rid


def test_a_step_waits_for_nothing_on_the_device(loaded: HiggsModel) -> None:
    """A pipelined step's host part (its launch, then the last step's codes
    read and each request's row taken) runs while the step it launched
    computes: on a GPU, anything in it that waits for the device (a tensor
    read on the host, a copy from pageable memory) waits for that step, and
    the overlap is lost. Requests joining apart, one with an uploaded voice,
    two opening with the same named voice and scene (its beginning kept, then
    copied), a dialogue in chunks (each next chunk's prompt laid out and
    tokenized on the host), prompts fed in pieces under a time budget: the
    step's own code reads nothing back and copies nothing but through
    ``pipelining``'s calls (pinned memory, events; the codes read back once
    there). Left out: the codec's calls, on a stream of their own."""
    engine = HiggsEngine(
        loaded,
        name="t",
        voices=VOICES,
        scenes=SCENES,
        pipelined=True,
        prefill_chunk=24,
        prefill_budget_ms=5.0,
    )
    named = {"voice": "belinda", "scene": "hall", "max_new_tokens": 14}
    jobs = [
        request(engine, "a", "Good morning to you.", seed=1, **named),
        request(
            engine,
            "b",
            DIALOGUE,
            {"reference": wav(0.8, 330)},
            chunk_method="speaker",
            max_new_tokens=16,
            seed=2,
        ),
        request(engine, "c", "Please hold the line.", seed=3, **named),
        request(engine, "d", "Short.", max_new_tokens=12, temperature=1.0, top_k=0, seed=4),
    ]
    fed = []
    original = engine.decoder.prefill

    def counted(rows: list[int], *args: Any) -> Any:
        fed.append(len(rows))
        return original(rows, *args)

    engine.decoder.prefill = counted  # type: ignore[method-assign]
    copied = []
    holding = engine.decoder.hold

    def hold(row: int, *args: Any) -> None:
        copied.append(row)
        holding(row, *args)

    engine.decoder.hold = hold  # type: ignore[method-assign]
    with waits_in(engine, "step", [(engine, "_decode_due")]) as waits:
        drive(engine, jobs, [0, 0, 9, 12])
    assert waits == []
    # What the launches did: prompts in pieces (timed), a beginning kept and
    # copied into the later request's row, the dialogue's three chunks opened.
    assert len(fed) > 8 and len(engine.prefill._calls) > 0
    assert len(copied) == 1 and len(engine.prefixes) >= 1
    assert len(jobs[1].state.history) == 3
