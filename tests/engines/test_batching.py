"""One batched decode step for every MusicGen request: each row as if alone.

Requests with different prompts, parameters, lengths and join times share the
slot table; each one's logits match its solo run (within 1e-5), its sampled codes
are equal (same seed: the noise is per row), and a neighbour joining, finishing
or being cancelled changes nothing. Long form windows and continuation prompts
are re-prefilled inside the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from helpers import count_codec_calls
from test_musicgen_features import decode, wav_bytes

from wavecast.protocol import Busy, InternalError, WavecastError, resolve_params
from wavecast.server.engines import dense, kv, rowkernel
from wavecast.server.engines.base import EngineRequest, Job, ModelLoadError
from wavecast.server.engines.musicgen.engine import MusicGenEngine, StreamSettings
from wavecast.server.engines.musicgen.windows import FED_TOKEN
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen


@dataclass
class Run:
    job: Job
    logits: list[torch.Tensor] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    done: bool = False
    error: WavecastError | None = None


def prepare(engine: MusicGenEngine, rid: str, prompt: str, **params: Any) -> Job:
    inputs = params.pop("inputs", {})
    resolved = resolve_params(engine.info.params, params)
    return engine.prepare(EngineRequest(rid, prompt, resolved, inputs))


def drive(
    engine: MusicGenEngine,
    joins: dict[int, list[tuple[str, Job]]],
    cancels: dict[int, list[str]] | None = None,
    before: Callable[[int, dict[str, Run]], None] | None = None,
) -> tuple[dict[str, Run], int]:
    """Step every joined job together until all are done; return runs and step count.

    ``before(step, runs)`` runs before each step (faults are injected there)."""
    runs: dict[str, Run] = {}
    cancels = cancels or {}

    def observe(logits: dict[str, torch.Tensor]) -> None:
        for rid, row in logits.items():
            runs[rid].logits.append(row.clone())

    engine.logits_observer = observe
    steps = 0
    try:
        while True:
            for rid, job in joins.get(steps, []):
                runs[rid] = Run(job)
            for rid in cancels.get(steps, []):
                engine.finish(runs[rid].job)
                runs[rid].done = True
            live = [rid for rid, run in runs.items() if not run.done]
            if not live and steps > max(joins):
                return runs, steps
            if before is not None:
                before(steps, runs)
            outputs = engine.step([runs[rid].job for rid in live])
            for rid, out in zip(live, outputs, strict=True):
                if out.audio is not None:
                    runs[rid].audio.append(out.audio)
                runs[rid].done = out.done
                runs[rid].error = out.error
                if out.error is not None:
                    engine.finish(runs[rid].job)  # as the scheduler does
            steps += 1
    finally:
        engine.logits_observer = None


def codes(engine: MusicGenEngine, run: Run) -> torch.Tensor:
    return engine.codes_of(run.job).clone()


@pytest.fixture(scope="module")
def windowed() -> tuple[Any, MusicGenEngine]:
    model = build_tiny_musicgen(window=2.0, seed=3)
    return model, MusicGenEngine(model, name="tiny-2s", test_model=True, max_duration=12.0)


REQUESTS: dict[str, dict[str, Any]] = {
    "a": {"prompt": "rock", "duration": 1.5, "seed": 1},
    "b": {
        "prompt": "ambient pads and a long prompt " * 3,
        "duration": 3.3,
        "seed": 2,
        "temperature": 0.7,
        "top_k": 5,
        "cfg_coef": 1.5,
    },
    "c": {"prompt": "jazz", "duration": 1.0, "seed": 3, "top_p": 0.9},
    "d": {"prompt": "drums", "duration": 2.5, "seed": 4, "temperature": 0.0, "extend_stride": 1.0},
}


def make(engine: MusicGenEngine, rid: str, **extra: Any) -> Job:
    spec = dict(REQUESTS[rid], **extra)
    return prepare(engine, rid, spec.pop("prompt"), **spec)


def test_rows_in_a_batch_equal_their_solo_runs(windowed: Any) -> None:
    model, engine = windowed
    clip = decode(model, torch.randint(0, 64, (1, 4, 40)))
    continuation = {"inputs": {"continuation": wav_bytes(clip, 32000)}}
    solo = {}
    for rid in REQUESTS:
        extra = continuation if rid == "c" else {}
        solo[rid] = drive(engine, {0: [(rid, make(engine, rid, **extra))]})[0][rid]
    # a and b from the start; c joins at step 5, d at step 37 (b is in its second
    # window by then); b runs over window boundaries with the others beside it.
    batch, _ = drive(
        engine,
        {
            0: [("a", make(engine, "a")), ("b", make(engine, "b"))],
            5: [("c", make(engine, "c", **continuation))],
            37: [("d", make(engine, "d"))],
        },
    )
    for rid, alone in solo.items():
        together = batch[rid]
        assert len(together.logits) == len(alone.logits)
        pairs = zip(together.logits, alone.logits, strict=True)
        diff = max(float((x - y).abs().max()) for x, y in pairs)
        assert diff <= 1e-5, (rid, diff)
        assert torch.equal(codes(engine, together), codes(engine, alone)), rid
        streamed = np.concatenate(together.audio)
        assert np.abs(streamed - np.concatenate(alone.audio)).max() <= 1e-5
        if rid != "c":  # a continuation streams its new part only
            full = decode(model, codes(engine, together))
            assert np.abs(streamed - full).max() <= 1e-4
    assert codes(engine, batch["b"]).shape[-1] > 150  # two window extensions


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("room", [True, False])
def test_packed_weights_keep_rows_as_alone_and_logits_as_unpacked(
    windowed: Any, monkeypatch: Any, room: bool, kernel: bool
) -> None:
    """Every weight a step multiplies packed (as a released model's are on a
    CPU; the tiny model's are too small to be), or, without ``room`` for the
    copies, multiplied by oneDNN as they lie; the row kernel taking the steps of
    a few rows (where it is built), or not: a row in a batch is as alone, and
    the logits are the unpacked engine's to float rounding."""
    _, plain = windowed
    monkeypatch.setattr(dense, "PACKED_FROM", 1)
    if not kernel:
        monkeypatch.setattr(dense, "KERNEL_ROWS", 0)
    if not room:
        monkeypatch.setattr(dense, "free_memory", lambda device: 0)
    engine = MusicGenEngine(
        build_tiny_musicgen(window=2.0, seed=3), name="tiny-2s", test_model=True, max_duration=12.0
    )
    assert not engine.decoder.packing.applied  # (packed at warm-up)
    packing = engine.decoder.pack_weights()
    assert (packing.weights > 0, packing.direct > 0) == (room, not room)
    built = isinstance(rowkernel.load(), rowkernel.RowKernel)
    assert (packing.kernel > 0) == packing.attention == (kernel and built)
    unpacked = {rid: drive(plain, {0: [(rid, make(plain, rid))]})[0][rid] for rid in "ab"}
    solo = {rid: drive(engine, {0: [(rid, make(engine, rid))]})[0][rid] for rid in "ab"}
    batch, _ = drive(engine, {0: [("a", make(engine, "a"))], 3: [("b", make(engine, "b"))]})
    for rid in "ab":
        pairs = zip(batch[rid].logits, solo[rid].logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5, rid
        assert torch.equal(codes(engine, batch[rid]), codes(engine, solo[rid])), rid
        pairs = zip(solo[rid].logits, unpacked[rid].logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-4, rid


def test_a_cancelled_neighbour_and_a_reused_slot_change_nothing(windowed: Any) -> None:
    _, engine = windowed
    alone = drive(engine, {0: [("a", make(engine, "a"))]})[0]["a"]
    runs, _ = drive(
        engine,
        {
            0: [("a", make(engine, "a")), ("b", make(engine, "b")), ("c", make(engine, "c"))],
            30: [("d", make(engine, "d"))],  # takes the slot b left
        },
        cancels={20: ["b"]},
    )
    assert torch.equal(codes(engine, runs["a"]), codes(engine, alone))
    pairs = zip(runs["a"].logits, alone.logits, strict=True)
    assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5
    d_alone = drive(engine, {0: [("d", make(engine, "d"))]})[0]["d"]
    assert torch.equal(codes(engine, runs["d"]), codes(engine, d_alone))


def test_a_request_that_fails_alone_ends_alone(windowed: Any, monkeypatch: Any) -> None:
    """b's rows turn NaN (as an overflow leaves them: its cache and its
    conditions' keys and values), c's bookkeeping raises: each ends with its own
    error, a goes on as if alone, and d, taking b's row after it with a shorter
    prompt, is not poisoned by what b left there (a masked position's NaN value
    still makes NaN in attention)."""
    _, engine = windowed
    alone = {rid: drive(engine, {0: [(rid, make(engine, rid))]})[0][rid] for rid in "ad"}
    advance = engine._advance

    def faulty(job: Job, sampled: Any) -> Any:
        if job.request.request_id == "c" and job.steps == 12:
            raise RuntimeError("a bug in one request's bookkeeping")
        return advance(job, sampled)

    monkeypatch.setattr(engine, "_advance", faulty)
    slots: dict[str, int] = {}
    own_b: list[int] = []

    def inject(step: int, runs: dict[str, Run]) -> None:
        for rid, run in runs.items():
            if run.job.state is not None and run.job.state.slot is not None:
                slots.setdefault(rid, run.job.state.slot)
        if step == 10:
            rows = slice(2 * slots["b"], 2 * slots["b"] + 2)
            engine.decoder.kv.k[:, rows] = float("nan")
            engine.decoder.kv.v[:, rows] = float("nan")
            own = int(engine.decoder.cross_lengths[rows].max())
            own_b.append(own)
            engine.decoder.cross.k[:, rows, :, :own] = float("nan")
            engine.decoder.cross.v[:, rows, :, :own] = float("nan")

    runs, _ = drive(
        engine,
        {
            0: [("a", make(engine, "a")), ("b", make(engine, "b")), ("c", make(engine, "c"))],
            30: [("d", make(engine, "d"))],
        },
        before=inject,
    )
    assert isinstance(runs["b"].error, InternalError)
    assert "non-finite" in runs["b"].error.message
    assert len(runs["b"].logits) == 10  # the step that saw NaN fails it, and only it
    assert isinstance(runs["c"].error, InternalError)
    assert runs["c"].job.state is None and len(runs["c"].logits) == 13
    assert slots["d"] == slots["b"]
    d_row = 2 * slots["d"]
    assert int(engine.decoder.cross_lengths[d_row]) < own_b[0]  # b's NaN lay past d's
    for rid in "ad":
        assert runs[rid].error is None
        assert torch.equal(codes(engine, runs[rid]), codes(engine, alone[rid])), rid
        streamed, solo = np.concatenate(runs[rid].audio), np.concatenate(alone[rid].audio)
        assert streamed.shape == solo.shape and np.abs(streamed - solo).max() <= 1e-5


def test_a_crowds_descriptions_encoded_together_are_each_ones_alone(windowed: Any) -> None:
    """``together`` (one call for a crowd, its unconditional halves made without
    audiocraft's deep copy) gives each request the tensors that audiocraft's own
    path (``one``: ``ClassifierFreeGuidanceDropout``, the provider) gives it alone:
    the same lengths and masks, the embeddings to float rounding; an empty
    description (all its rows masked) too."""
    _, engine = windowed
    conditioning = engine.conditioning
    assert conditioning.together_ok
    texts = ["rock", "", "ambient pads and a long prompt " * 3, "jazz"]
    attributes = [conditioning.attributes(text, None)[0] for text in texts]
    with torch.no_grad():
        crowd = conditioning.together(attributes)
        for attribute, got in zip(attributes, crowd, strict=True):
            alone, _ = conditioning.one([attribute], random.getstate())
            assert got.keys() == alone.keys() == {"description"}
            (embeds, mask), (solo_embeds, solo_mask) = got["description"], alone["description"]
            assert embeds.shape == solo_embeds.shape and torch.equal(mask, solo_mask)
            assert float((embeds - solo_embeds).abs().max()) <= 1e-6
    assert not bool(crowd[1]["description"][1].any())  # the empty text: nothing to attend to


@pytest.mark.parametrize("part", ["descriptions", "conditions"])
def test_a_crowd_whose_first_step_fails_for_one_fails_only_it(
    windowed: Any, monkeypatch: Any, part: str
) -> None:
    """A crowd's descriptions are encoded in one call, and its conditions' keys
    and values loaded in one; where one request (b, the long prompt) makes that
    call fail, each goes again alone: b ends with an error, a and c run as alone."""
    _, engine = windowed
    alone = {rid: drive(engine, {0: [(rid, make(engine, rid))]})[0][rid] for rid in "ac"}
    calls: list[int] = []  # requests in each call
    if part == "descriptions":
        together = engine.conditioning.together

        def encode(attributes: list[Any]) -> Any:
            calls.append(len(attributes))
            if any("ambient" in (a.text.get("description") or "") for a in attributes):
                raise RuntimeError("the text encoder failed on this description")
            return together(attributes)

        monkeypatch.setattr(engine.conditioning, "together", encode)
    else:
        set_conditions = engine.decoder.set_conditions

        def load(rows: list[int], source: Any, lengths: Any = None) -> None:
            calls.append(len(rows) // 2)
            if source is not None and source.shape[1] > 20:  # b's description, padded to or not
                raise RuntimeError("the conditions' projection failed")
            set_conditions(rows, source, lengths)

        monkeypatch.setattr(engine.decoder, "set_conditions", load)
    runs, _ = drive(engine, {0: [(rid, make(engine, rid)) for rid in "abc"]})
    assert calls == [3, 1, 1, 1]  # together, then each alone
    assert isinstance(runs["b"].error, InternalError) and not runs["b"].audio
    for rid in "ac":
        assert runs[rid].error is None
        assert torch.equal(codes(engine, runs[rid]), codes(engine, alone[rid])), rid
        pairs = zip(runs[rid].logits, alone[rid].logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5


@pytest.mark.parametrize("fails", [False, True])
def test_descriptions_encoded_before_the_first_step_change_nothing(
    windowed: Any, monkeypatch: Any, fails: bool
) -> None:
    """``begin`` (the scheduler's call as requests are prepared) encodes a
    crowd's descriptions in one call, and its first step encodes none: the runs
    equal those begun by their first step. Where that call fails (here: on b's
    description), nothing is kept, and the first step encodes them again, each
    failing on its own: b ends with an error, a and c run as alone."""
    _, engine = windowed
    alone = {rid: drive(engine, {0: [(rid, make(engine, rid))]})[0][rid] for rid in "abc"}
    together = engine.conditioning.together
    calls: list[tuple[str, int]] = []  # (where, requests) of each call
    where = "step"

    def encode(attributes: list[Any]) -> Any:
        calls.append((where, len(attributes)))
        if fails and any("ambient" in (a.text.get("description") or "") for a in attributes):
            raise RuntimeError("the text encoder failed on this description")
        return together(attributes)

    monkeypatch.setattr(engine.conditioning, "together", encode)

    def begin(step: int, runs: dict[str, Run]) -> None:
        nonlocal where
        if step == 0:
            where = "begin"
            engine.begin([run.job for run in runs.values()])
            where = "step"

    runs, _ = drive(engine, {0: [(rid, make(engine, rid)) for rid in "abc"]}, before=begin)
    if fails:
        assert calls == [("begin", 3), ("step", 3), ("step", 1), ("step", 1), ("step", 1)]
        assert isinstance(runs["b"].error, InternalError) and not runs["b"].audio
    else:
        assert calls == [("begin", 3)]
    for rid in "ac" if fails else "abc":
        assert runs[rid].error is None
        assert torch.equal(codes(engine, runs[rid]), codes(engine, alone[rid])), rid
        pairs = zip(runs[rid].logits, alone[rid].logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5


def test_a_bad_codec_window_fails_its_stream_only(windowed: Any) -> None:
    """c's windows hold codes the codec cannot decode: the batched decode falls back
    to each window alone, c ends with an error, a's audio is untouched."""
    _, engine = windowed
    alone = drive(engine, {0: [("a", make(engine, "a"))]})[0]["a"]
    a, c = make(engine, "a"), make(engine, "c")
    decoder = c.state.decoder

    def poisoned(push: Any) -> Any:
        def planned(codes: Any) -> Any:
            plan = push(codes)
            if plan is not None:
                plan.window.fill_(10_000)  # beyond the codebooks
            return plan

        return planned

    # (Frames come one at a time as ints, or several as an array.)
    decoder.plan_push = poisoned(decoder.plan_push)
    decoder.plan_push_frame = poisoned(decoder.plan_push_frame)
    runs, _ = drive(engine, {0: [("a", a), ("c", c)]})
    assert isinstance(runs["c"].error, InternalError) and not runs["c"].audio
    assert runs["a"].error is None
    assert torch.equal(codes(engine, runs["a"]), codes(engine, alone))
    streamed, solo = np.concatenate(runs["a"].audio), np.concatenate(alone.audio)
    # (chunk sizes follow the clock: equal to float rounding)
    assert streamed.shape == solo.shape and np.abs(streamed - solo).max() <= 1e-5


def test_due_codec_windows_go_in_calls_of_at_most_codec_batch() -> None:
    """Five streams with chunks due: their windows go to the codec in calls of at
    most ``codec_batch`` (their first chunks, due in the same step, as 2 + 2 + 1;
    later, each group of two on steps of its own; their ends, in the step they
    all end, 2 + 2 + 1 again: a group's streams have the same frames left), and
    each stream's audio is still a one-shot decode of its codes."""
    model = build_tiny_musicgen(seed=5)
    fixed = StreamSettings(max_chunk_frames=10, codec_batch=2)  # chunks due together
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True, stream=fixed)
    engine.warm_up()
    assert engine.codec_batch == 2  # given, so not measured
    calls = count_codec_calls(engine)
    prompts = {"a": "rock", "b": "rock", "c": "jazz", "d": "jazz", "e": "folk"}
    jobs = [
        (rid, prepare(engine, rid, text, duration=1.5, seed=ord(rid)))
        for rid, text in prompts.items()
    ]
    runs, _ = drive(engine, {0: jobs})
    # Later chunks: (a, b) and (c, d) in calls of two, e alone, each group on its
    # steps.
    assert calls[:3] == [2, 2, 1] and calls[-3:] == [2, 2, 1] and max(calls) == 2
    later = calls[3:-3]
    assert len(later) >= 9 and later.count(2) >= 2 * later.count(1) - 2, calls
    for run in runs.values():
        streamed = np.concatenate(run.audio)
        full = model.compression_model.decode(codes(engine, run), None)[0].transpose(0, 1)
        assert streamed.shape == full.shape
        assert np.abs(streamed - full.numpy()).max() <= 1e-4


def test_melody_rows_batch_with_text_rows() -> None:
    model = build_tiny_musicgen(melody=True)
    engine = MusicGenEngine(model, name="tiny-musicgen-melody", test_model=True)
    rng = np.random.default_rng(0)
    melody = {
        "inputs": {"melody": wav_bytes(rng.standard_normal(32000).astype(np.float32) * 0.1, 32000)}
    }

    def request(rid: str, **extra: Any) -> Job:
        return prepare(engine, rid, "hum", duration=1.0, seed=9, **extra)

    solo = drive(engine, {0: [("m", request("m", **melody))]})[0]["m"]
    plain = drive(engine, {0: [("t", request("t"))]})[0]["t"]
    runs, _ = drive(engine, {0: [("t", request("t"))], 3: [("m", request("m", **melody))]})
    assert torch.equal(codes(engine, runs["m"]), codes(engine, solo))
    assert torch.equal(codes(engine, runs["t"]), codes(engine, plain))


def test_one_decoder_forward_per_step_for_every_request(windowed: Any) -> None:
    _, engine = windowed
    calls = {"decode": 0, "prefill": 0}
    decoder = engine.decoder
    original_decode, original_prefill = decoder.decode, decoder.prefill

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        calls["decode"] += 1
        return original_decode(*args, **kwargs)

    def counting_prefill(*args: Any) -> Any:
        calls["prefill"] += 1
        return original_prefill(*args)

    decoder.decode, decoder.prefill = counting_decode, counting_prefill  # type: ignore[method-assign]
    try:
        jobs = [make(engine, rid) for rid in ("a", "c")]
        for _ in range(10):
            engine.step(jobs)
    finally:
        del decoder.decode, decoder.prefill
        for job in jobs:
            engine.finish(job)
    # Both new requests' prompts (one position each: the pattern's first column)
    # go in by the decode step: one forward a step, the first one included.
    assert calls == {"decode": 10, "prefill": 0}


def test_the_decode_step_traces_as_one_graph(windowed: Any) -> None:
    _, engine = windowed
    decoder = engine.decoder
    jobs = [make(engine, rid) for rid in ("a", "b")]
    try:
        engine.step(jobs)  # prefill both
        rows = decoder.rows
        codes_in = torch.randint(0, 64, (rows, decoder.codebooks))
        active = torch.ones(rows, dtype=torch.bool)
        before = decoder.lengths.clone()
        eager = decoder.decode(codes_in, active)
        decoder.lengths.copy_(before)
        torch._dynamo.reset()
        compiled = torch.compile(decoder.decode, fullgraph=True, backend="eager")
        traced = compiled(codes_in, active)
        assert torch.allclose(traced, eager, atol=1e-5)
        assert torch.equal(decoder.lengths, before + 1)
    finally:
        torch._dynamo.reset()
        for job in jobs:
            engine.finish(job)


def test_a_long_prompt_goes_in_by_chunks_beside_running_streams(windowed: Any) -> None:
    """A continuation prompt longer than the decode span, prefilled 16 positions a
    step while another request decodes: neither changes (codes and logits equal to
    their solo runs), and the other request never waits for it."""
    model, engine = windowed
    chunked = MusicGenEngine(
        model, name="tiny-2s", test_model=True, max_duration=12.0, prefill_chunk=16
    )
    clip = decode(model, torch.randint(0, 64, (1, 4, 80)))
    inputs = {"continuation": wav_bytes(clip, 32000)}

    def long_prompt(target: MusicGenEngine) -> Job:
        return prepare(target, "p", "strings", duration=2.0, seed=5, inputs=inputs)

    solo_p = drive(engine, {0: [("p", long_prompt(engine))]})[0]["p"]
    solo_a = drive(engine, {0: [("a", make(engine, "a"))]})[0]["a"]
    runs, _ = drive(chunked, {0: [("a", make(chunked, "a"))], 3: [("p", long_prompt(chunked))]})
    for rid, alone in (("p", solo_p), ("a", solo_a)):
        together = runs[rid]
        assert torch.equal(codes(chunked, together), codes(engine, alone)), rid
        pairs = zip(together.logits, alone.logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5, rid
    # `a` sampled at every step, p's six prefill steps included.
    assert len(runs["a"].logits) == len(solo_a.logits)


def test_a_crowd_of_continuations_prefills_together_within_the_budget(windowed: Any) -> None:
    """Continuations of different lengths, joining beside a running stream: their
    prompts go in one call a step (chunks padded to the longest), within the
    budget (two decoder rows a request); each request's codes and logits equal
    its solo run's, and the running stream samples at every step."""
    model, engine = windowed
    crowded = MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        prefill_chunk=16,
        prefill_budget=80,
    )
    gen = torch.Generator().manual_seed(9)
    clips = {
        rid: wav_bytes(decode(model, torch.randint(0, 64, (1, 4, n), generator=gen)), 32000)
        for rid, n in (("p", 40), ("q", 23), ("r", 9))
    }

    def continuing(target: MusicGenEngine, rid: str) -> Job:
        inputs = {"continuation": clips[rid]}
        return prepare(
            target, rid, "strings", duration=1.5, seed=len(rid) + ord(rid), inputs=inputs
        )

    solo = {rid: drive(engine, {0: [(rid, continuing(engine, rid))]})[0][rid] for rid in clips}
    solo["a"] = drive(engine, {0: [("a", make(engine, "a"))]})[0]["a"]
    calls: list[tuple[int, int, list[int]]] = []  # rows, positions computed, starts
    original = crowded.decoder.prefill

    def counted(rows: list[int], inputs: torch.Tensor, start: Any = 0, sizes: Any = None) -> Any:
        own = len(rows) * int(inputs.shape[1]) if sizes is None else int(sum(sizes))
        calls.append((len(rows), own, list(np.broadcast_to(start, len(rows)))))
        return original(rows, inputs, start, sizes)

    crowded.decoder.prefill = counted  # type: ignore[method-assign]
    steps_with_calls: list[int] = []

    def before(step: int, runs: dict[str, Run]) -> None:
        steps_with_calls.append(len(calls))

    try:
        joins = {
            0: [("a", make(crowded, "a"))],
            2: [(rid, continuing(crowded, rid)) for rid in clips],
        }
        runs, _ = drive(crowded, joins, before=before)
    finally:
        del crowded.decoder.prefill
    per_step = np.diff([*steps_with_calls, len(calls)])
    assert per_step.max() == 1  # at most one prefill call a step
    assert all(own <= 80 for _, own, _ in calls)  # the budget, in positions computed
    assert any(len(set(starts)) > 1 for _, _, starts in calls)  # rows at different places
    assert max(rows for rows, _, _ in calls) >= 4  # two requests or more in a call
    for rid, alone in solo.items():
        together = runs[rid]
        assert torch.equal(codes(crowded, together), codes(engine, alone)), rid
        pairs = zip(together.logits, alone.logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5, rid
    assert len(runs["a"].logits) == len(solo["a"].logits)


def test_the_step_through_static_buffers_equals_the_direct_step(windowed: Any) -> None:
    """``cuda_graphs`` (on a CPU: the graphs' static input and output buffers, the
    step run eagerly on them): the same logits and codes as the direct step, with
    requests joining, growing the table and crossing a window boundary."""
    model, _ = windowed
    # Two fresh engines: the same table history, so the same shapes step by step.
    engine = MusicGenEngine(model, name="tiny-2s", test_model=True, max_duration=12.0)
    staged = MusicGenEngine(
        model, name="tiny-2s", test_model=True, max_duration=12.0, cuda_graphs=True
    )
    graphs = staged._graphs
    assert graphs is not None and not graphs.record

    def joins(on: MusicGenEngine) -> dict[int, list[tuple[str, Job]]]:
        return {
            0: [("a", make(on, "a")), ("b", make(on, "b"))],
            5: [("c", make(on, "c"))],
            37: [("d", make(on, "d"))],  # b is in its second window by then
        }

    direct, _ = drive(engine, joins(engine))
    through, _ = drive(staged, joins(staged))
    for rid, run in direct.items():
        other = through[rid]
        assert len(other.logits) == len(run.logits)
        assert all(torch.equal(x, y) for x, y in zip(other.logits, run.logits, strict=True))
        assert torch.equal(codes(staged, other), codes(engine, run)), rid
    assert graphs.recorded == 0 and len(graphs) > 0


def test_every_step_shape_is_ready_after_warm_up(windowed: Any) -> None:
    """``cuda_graphs``: warming up prepares (on CUDA: records) every shape the
    configured crowd can step, before the server reports ready: rows for 1, 2 and
    4 requests (``max_active`` 3), every span up to the window's positions. Then
    three requests (a continuation, long form across windows, a long description)
    step through prepared shapes only, and nothing is dropped (the cache did not
    move); their codes equal the direct step's."""
    model, engine = windowed
    staged = MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        cuda_graphs=True,
        max_active=3,
    )
    graphs = staged._graphs
    assert graphs is not None and len(graphs) == 0
    staged.warm_up()
    # A 2 s window at 50 Hz, 4 codebooks: 105 positions; spans of 64 and 128.
    assert staged.decoder.length == 105
    assert graphs.shapes == {(rows, span) for rows in (2, 4, 8) for span in (64, 128)}
    prepared, storage, drops = graphs.shapes, staged.decoder.storage(), graphs.dropped
    clip = decode(model, torch.randint(0, 64, (1, 4, 40)))
    continuation = {"inputs": {"continuation": wav_bytes(clip, 32000)}}
    words = {"prompt": "a long description of a piece " * 4}

    def joins(on: MusicGenEngine) -> dict[int, list[tuple[str, Job]]]:
        return {
            0: [("b", make(on, "b")), ("a", make(on, "a", **words))],
            9: [("c", make(on, "c", **continuation))],
        }

    through, _ = drive(staged, joins(staged))
    assert staged.decoder.storage() == storage
    assert graphs.shapes == prepared and graphs.dropped == drops
    direct, _ = drive(engine, joins(engine))
    for rid, run in direct.items():
        assert torch.equal(codes(staged, through[rid]), codes(engine, run)), rid
    # A description past the 128 tokens preallocated grows the cache: every shape
    # is dropped, and recorded again as it comes back; the codes stay the same.
    longer = {"prompt": "a long description of a piece " * 8}
    through, _ = drive(staged, {0: [("a", make(staged, "a", **longer))]})
    direct, _ = drive(engine, {0: [("a", make(engine, "a", **longer))]})
    assert graphs.dropped == drops + 1 and graphs.shapes < prepared
    assert torch.equal(codes(staged, through["a"]), codes(engine, direct["a"]))


def sized(model: Any, requests: int, graphs: bool = True, share: float = 1.0) -> MusicGenEngine:
    """The windowed tiny model's engine with its table for ``requests`` (0: as
    many as fit in ``share`` of the memory), reserved at warm-up with ``graphs``."""
    return MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        cuda_graphs=graphs,
        max_active=requests,
        memory_share=share,
        stream=StreamSettings(codec_batch=4),
    )


def test_a_table_the_memory_cannot_hold_is_refused_at_load(
    windowed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cuda_graphs`` reserves the table for ``max_active`` requests at load:
    where the memory free cannot hold it, the load stops before allocating it,
    with one line saying how many requests would fit. The estimate is what the
    table then holds: a memory of exactly eight requests' table takes eight and
    refuses a hundred, saying eight fit; with or without graphs."""
    model, _ = windowed

    def staged(requests: int, graphs: bool = True) -> MusicGenEngine:
        return sized(model, requests, graphs)

    eight = staged(8)
    eight.warm_up()
    decoder = eight.decoder
    caches = (decoder.kv.k, decoder.kv.v, decoder.cross.k, decoder.cross.v)
    held = sum(t.numel() * t.element_size() for t in caches)
    length, conditions = decoder.length, decoder.cross.length
    assert decoder.bytes_for(rows=16, length=length, cross_length=conditions) == held
    monkeypatch.setattr(kv, "free_memory", lambda device: int(held / kv.ROOM_SHARE) + 1)
    staged(8).warm_up()
    with pytest.raises(ModelLoadError) as refused:
        staged(100).warm_up()
    assert "tiny-2s: --max-active 100 needs" in str(refused.value)
    assert str(refused.value).endswith("; 8 fit (--max-active 8)")
    # Without graphs the table grows on demand; a crowd it could not hold is
    # refused all the same, at load rather than when the ninth request comes.
    staged(8, graphs=False).warm_up()
    with pytest.raises(ModelLoadError, match="8 fit"):
        staged(100, graphs=False).warm_up()
    monkeypatch.setattr(kv, "free_memory", lambda device: 1000)
    with pytest.raises(ModelLoadError, match="not even one fits"):
        staged(1).warm_up()
    # Room by the estimate, and yet the reservation runs out: one line too.
    monkeypatch.setattr(kv, "free_memory", lambda device: 2**50)

    def full(cache: kv.StaticKV, shape: tuple[int, ...]) -> torch.Tensor:
        if shape[2] > 2:  # ([2, layers, rows, ...]: the warm-up request's own pair fits)
            raise torch.OutOfMemoryError("injected: the device is full")
        return torch.zeros(shape)

    monkeypatch.setattr(kv.StaticKV, "_zeros", full)
    with pytest.raises(ModelLoadError, match="no memory to reserve --max-active 8 requests'"):
        staged(8).warm_up()


def test_asked_for_none_a_table_is_sized_for_as_many_as_the_memory_holds(
    windowed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_active`` 0 (the server's default): at warm-up the engine takes the
    most requests, a power of two up to ``kv.AUTO_MOST`` for the device, whose
    table fits in ``kv.AUTO_SHARE`` of its part of the memory free, and reserves
    (with graphs) and measures for that many; one where not even two fit."""
    model, _ = windowed

    def auto(share: float = 1.0, requests: int = 0, graphs: bool = True) -> MusicGenEngine:
        engine = sized(model, requests, graphs, share)
        engine.warm_up()
        return engine

    roomy = auto()  # (this machine's memory holds the tiny model's tables)
    assert roomy.max_active == kv.AUTO_MOST["cpu"] == 16
    assert len(roomy._slots) >= 16  # (reserved for them, with graphs)
    one = auto(requests=1, graphs=False)  # (a table of one request's rows)
    decoder = one.decoder
    length, conditions = one._table_size()  # (what the table is sized for)

    def need(requests: int) -> int:
        return decoder.bytes_for(rows=2 * requests, length=length, cross_length=conditions)

    # Room in the part auto sizes in for more than four requests' table and less
    # than eight's (the table grows in powers of two): four.
    between = (need(4) + need(8)) // 2
    monkeypatch.setattr(kv, "free_memory", lambda device: int(between / kv.AUTO_SHARE))
    four = auto()
    # (Readied for four: the table reserved for their rows, two a request. Its
    # context's cost, measured over them, may be 0 on a busy machine.)
    assert four.max_active == 4 and four.decoder.rows == 2 * 4
    assert auto(share=0.5).max_active == 2  # half of that memory: two
    monkeypatch.setattr(kv, "free_memory", lambda device: int(need(1) / kv.ROOM_SHARE) + 1)
    assert auto().max_active == 1
    assert kv.most_that_fit(need, None, 16) == 16  # (the memory not known: the most)
    # On a CPU, a model whose one stream steps less than four times faster than
    # real time (50 steps a second of audio here) is sized for four at most; a
    # GPU's most is 64 whatever its eager warm-up took.
    assert kv.auto_most("cpu", 0.002, 50.0) == 16
    assert kv.auto_most("cpu", 0.0051, 50.0) == kv.AUTO_SLOW == 4
    assert kv.auto_most("cuda", 0.02, 50.0) == 64


def test_a_cache_that_cannot_grow_stays_as_it_was() -> None:
    """Growing allocates the new table (keys and values in one tensor) before
    touching the cache: where the memory runs out, the keys, values and lengths
    are those of before, and the growth ends ``busy``."""
    cache = kv.StaticKV(2, 2, 4, rows=2, length=5, device="cpu", dtype=torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    cache.lengths[:] = torch.tensor([3, 4])
    before = (cache.k.clone(), cache.v.clone(), cache.lengths.clone())
    made: list[tuple[int, ...]] = []

    def zeros(shape: tuple[int, ...]) -> torch.Tensor:
        made.append(shape)
        raise torch.OutOfMemoryError("injected: no memory for the table")

    cache._zeros = zeros  # type: ignore[method-assign]
    with pytest.raises(Busy, match="no memory"):
        cache.grow(rows=3, length=9)
    assert made == [(2, 2, 4, 2, 9, 4)]
    for now, then in zip((cache.k, cache.v, cache.lengths), before, strict=True):
        assert torch.equal(now, then)
    del cache._zeros  # the next growth succeeds and keeps what is stored
    cache.grow(rows=3, length=9)
    assert torch.equal(cache.k[:, :2, :, :5], before[0]) and cache.lengths.tolist() == [3, 4, 0, 0]
    assert torch.equal(cache.v[:, :2, :, :5], before[1])
    assert cache.k.is_contiguous() and cache.v.is_contiguous()


def test_no_memory_for_a_newcomer_ends_it_busy_and_spares_the_others(windowed: Any) -> None:
    """A request that joins when the table must grow, and the memory has no room:
    it ends ``busy`` (retry later), and the request already running goes on
    untouched: its codes are those of its solo run."""
    model, _ = windowed
    engine = MusicGenEngine(model, name="tiny-2s", test_model=True, max_duration=12.0)
    solo, _ = drive(engine, {0: [("a", make(engine, "a"))]})
    assert engine.decoder.rows == 2  # one request's pair of rows: b needs two more

    def no_memory(shape: tuple[int, ...]) -> torch.Tensor:
        raise torch.OutOfMemoryError("injected: the device is full")

    def before(step: int, runs: dict[str, Run]) -> None:
        if step == 4:
            engine.decoder.kv._zeros = no_memory  # type: ignore[method-assign]
        if step == 5:
            del engine.decoder.kv._zeros

    runs, _ = drive(
        engine,
        {0: [("a", make(engine, "a"))], 4: [("b", make(engine, "b"))]},
        before=before,
    )
    assert isinstance(runs["b"].error, Busy) and runs["b"].done
    assert runs["a"].error is None
    assert torch.equal(codes(engine, runs["a"]), codes(engine, solo["a"]))


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_graphed_step_traces_as_one_graph(windowed: Any, pipelined: bool) -> None:
    """The whole device side of a graphed step (the forward, the prefilled rows'
    logits put in, guidance, every row's draw; pipelined, the codes in flight
    fed and the draw kept for the next step) has no host sync and no
    data-dependent control flow: it traces as one graph, with the eager
    step's outputs."""
    model, _ = windowed
    engine = MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        cuda_graphs=True,
        pipelined=pipelined,
    )
    jobs = [make(engine, rid) for rid in ("a", "b", "c")]
    try:
        engine.step(jobs)  # prefill them
        decoder = engine.decoder
        rows, k = decoder.rows, decoder.codebooks
        slots = rows // 2
        keys = rows * (k + 1) + slots * k  # (every slot's draw keys, one per codebook)
        flat = torch.zeros(keys + rows, dtype=torch.int64)
        flat[: rows * k] = torch.randint(0, 64, (rows * k,))
        flat[rows * k : rows * (k + 1)] = 1  # every row advances
        flat[rows * (k + 1) : keys] = torch.randint(0, 2**31, (slots * k,))
        flat[keys::3] = 1  # some rows' logits from "their prefill"
        if pipelined:  # some codes in flight, from the last draw kept on the device
            flat[: rows * k : 3] = FED_TOKEN
            engine._fed.random_(0, 64)
        fed = engine._fed.clone()
        engine._prefilled.logits.normal_()
        before = decoder.lengths.clone()
        eager = engine._graphed_step([flat], (rows, 64))
        kept = engine._fed.clone()
        decoder.lengths.copy_(before)
        engine._fed.copy_(fed)
        try:
            torch._dynamo.reset()
            compiled = torch.compile(engine._graphed_step, fullgraph=True, backend="eager")
            traced = compiled([flat], (rows, 64))
        finally:
            torch._dynamo.reset()
        assert torch.equal(traced[0], eager[0])  # codes and finiteness
        assert torch.allclose(traced[1], eager[1], atol=1e-5)  # guided logits
        assert torch.equal(decoder.lengths, before + 1)
        assert torch.equal(engine._fed, kept)
        assert torch.equal(kept, eager[0][:, :-1]) == pipelined  # (every slot drew)
    finally:
        for job in jobs:
            engine.finish(job)


def test_finished_and_cancelled_requests_leave_nothing_behind(windowed: Any) -> None:
    """Once finished (done, or cancelled half-way), no request's state stays
    reachable from the engine: its slot is free, no codec window waits for it,
    and the garbage collector finds none of its state (a crowd after a crowd
    costs no memory more)."""
    model, _ = windowed
    crowds_leave_nothing(MusicGenEngine(model, name="tiny-2s", test_model=True, max_duration=12.0))


def crowds_leave_nothing(engine: MusicGenEngine) -> None:
    """Two crowds (one joining later, one cancelled half-way), finished: no
    slot taken, no codec window waiting, no request's state reachable."""
    import gc
    import weakref

    for _ in range(2):
        joins = {0: [("a", make(engine, "a")), ("b", make(engine, "b"))]}
        joins[3] = [("c", make(engine, "c"))]
        states = [weakref.ref(job.state) for jobs in joins.values() for _, job in jobs]
        runs, _ = drive(engine, joins, cancels={9: ["b"]})
        for run in runs.values():
            engine.finish(run.job)
        del runs, joins
        gc.collect()
        assert all(owner is None for owner in engine._slots.owners) and not engine._due
        assert all(state() is None for state in states)


def test_step_buffers_are_kept_per_shape_and_dropped_when_the_storage_moves() -> None:
    from wavecast.server.engines.graphs import StepGraphs

    storage = ["cache at A"]
    calls: list[tuple[int, ...]] = []

    def step(inputs: Any, key: tuple[int, ...]) -> torch.Tensor:
        codes, active = inputs
        calls.append(key)
        return codes.sum(1) * active + key[1]

    def blank(key: tuple[int, ...]) -> list[torch.Tensor]:
        return [torch.zeros(key[0], 2, dtype=torch.int64), torch.zeros(key[0], dtype=torch.bool)]

    graphs = StepGraphs(step, lambda: storage[0], record=False)
    codes_ = torch.tensor([[1, 2], [3, 4]])
    out = graphs((2, 64), codes_, torch.tensor([True, False]))
    assert out.tolist() == [67, 64]
    again = graphs((2, 64), codes_ * 2, torch.tensor([True, True]))
    assert again.tolist() == [70, 78]
    graphs((2, 128), codes_, torch.tensor([True, True]))
    assert len(graphs) == 2 and graphs.dropped == 0
    storage[0] = "cache at B"  # grown: its tensors moved
    graphs((2, 64), codes_, torch.tensor([True, True]))
    assert len(graphs) == 1 and graphs.dropped == 1  # every shape's buffers dropped
    assert calls == [(2, 64), (2, 64), (2, 128), (2, 64)]
    # Prepared shapes are made ready once (on CUDA: recorded), not run eagerly.
    assert graphs.prepare([(1, 64), (2, 64), (4, 64)], blank) == 2
    assert graphs.shapes == {(1, 64), (2, 64), (4, 64)} and len(calls) == 4
