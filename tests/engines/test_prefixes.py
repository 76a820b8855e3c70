"""Prompt beginnings shared between speech requests: prefilled once, copied after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import observed_logits, step_together

from wavecast.server.engines.base import EngineRequest, Job
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import HiggsModel, load_higgs
from wavecast.server.engines.higgs.prompt import build_preamble
from wavecast.server.engines.higgs.voices import Scene, Voice
from wavecast.server.engines.prefixes import PrefixStore

# -- the store ---------------------------------------------------------------------------


def block(positions: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((2, 1, positions, 4), value)  # [layers, H, P, d]: 32 bytes a position


def test_the_store_keeps_the_most_recently_used_within_its_budget() -> None:
    store = PrefixStore(budget=2 * 2 * 10 * 32)  # two beginnings of 10 positions
    assert store.put(b"a", block(10), block(10)) and store.put(b"b", block(10), block(10))
    assert store.bytes == 1280 and len(store) == 2
    assert store.get(b"a") is not None  # a is now the more recently used
    assert store.put(b"c", block(10), block(10))  # b goes
    assert b"a" in store and b"c" in store and b"b" not in store
    assert store.get(b"b") is None
    assert store.bytes == 1280
    assert store.put(b"d", block(20), block(20))  # as large as the budget: all else goes
    assert len(store) == 1 and store.bytes == 1280
    assert not store.put(b"e", block(21), block(21))  # larger than the budget: not kept
    assert b"d" in store


def test_the_store_keeps_copies_and_refuses_what_is_not_finite() -> None:
    store = PrefixStore(budget=1 << 20)
    keys = block(3)
    assert store.put(b"a", keys, block(3))
    keys += 1  # (the row it came from is written again)
    held = store.get(b"a")
    assert held is not None and bool((held[0] == 1).all())
    assert not store.put(b"a", block(3, 5.0), block(3))  # kept already: unchanged
    broken = block(3)
    broken[1, 0, 2, 0] = float("nan")
    assert not store.put(b"nan", broken, block(3))
    assert not store.put(b"inf", block(3), block(3, float("inf")))
    assert len(store) == 1
    assert not PrefixStore(budget=0).put(b"a", block(1), block(1))


def test_a_beginning_whose_finiteness_is_on_its_way_is_kept_but_not_given_out(
    monkeypatch: Any,
) -> None:
    """As on a GPU, where whether a beginning is finite is known once the
    device has computed it (``HostCopy``): until then it is kept and not given
    out; then given out, or, not finite, given up (its bytes freed)."""
    from wavecast.server.engines import pipelining

    there = [False]
    monkeypatch.setattr(pipelining.HostCopy, "ready", lambda self: there[0])
    store = PrefixStore(budget=1 << 20)
    broken = block(3)
    broken[0, 0, 1, 1] = float("inf")
    assert store.put(b"ok", block(3), block(3)) and store.put(b"inf", broken, block(3))
    assert store.get(b"ok") is None and store.get(b"inf") is None and len(store) == 2
    there[0] = True
    assert store.get(b"inf") is None and b"inf" not in store
    held = store.get(b"ok")
    assert held is not None and bool((held[0] == 1).all())
    assert store.bytes == 2 * 3 * 32


# -- the speech engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> HiggsModel:
    return load_higgs("tiny-higgs", None, "cpu")


VOICES = {
    "belinda": Voice(
        "belinda",
        Path("belinda.wav"),
        "I am Belinda, and this is how I sound.",
        np.sin(440 * np.arange(16000) / 16000),
        16000,
    )
}
SCENES = {"hall": Scene("hall", Path("hall.txt"), "A large echoing hall.")}
TEXTS = ("Good morning to you.", "Please hold the line, I will be right back.", "Yes.", "No!")


def engine_for(loaded: HiggsModel, **kwargs: Any) -> HiggsEngine:
    return HiggsEngine(loaded, name="t", voices=VOICES, scenes=SCENES, **kwargs)


def request(engine: HiggsEngine, rid: str, text: str, **given: Any) -> Job:
    params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    params.update({"max_new_tokens": 12, "seed": len(text), "voice": "belinda", **given})
    return engine.prepare(EngineRequest(rid, text, params, {}))


class Fed:
    """The prompt positions an engine's decoder is fed, per call."""

    def __init__(self, engine: HiggsEngine) -> None:
        self.calls: list[int] = []
        original = engine.decoder.prefill

        def counted(rows: list[int], tokens: torch.Tensor, *args: Any) -> torch.Tensor:
            sizes = args[3]
            self.calls.append(int(tokens.numel()) if sizes is None else int(sum(sizes)))
            return original(rows, tokens, *args)

        engine.decoder.prefill = counted  # type: ignore[method-assign]

    @property
    def total(self) -> int:
        return sum(self.calls)


def run(engine: HiggsEngine, jobs: list[Job]) -> dict[str, tuple[torch.Tensor, list[Any]]]:
    """Step ``jobs`` together to their end: each one's codes and logits."""
    with observed_logits(engine) as seen:
        step_together(engine, jobs)
    out = {
        job.request.request_id: (engine.codes_of(job), seen.get(job.request.request_id, []))
        for job in jobs
    }
    for job in jobs:
        engine.finish(job)
    return out


def same(got: tuple[torch.Tensor, list[Any]], want: tuple[torch.Tensor, list[Any]]) -> None:
    assert torch.equal(got[0], want[0])
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def prompt_length(engine: HiggsEngine, job: Job) -> int:
    input_ids, _ = engine.tokenize(engine.chunk_prompt(job.state))
    return int(input_ids.shape[1])


def test_a_voice_is_prefilled_once_and_speaks_as_when_prefilled_again(
    loaded: HiggsModel,
) -> None:
    """The first request of a named voice prefills its whole prompt and keeps the
    beginning (system text, the voice's transcript and audio); the next ones, with
    other texts, prefill only their own turn, and speak as they do where nothing
    is kept (the same codes, logits within 1e-5)."""
    plain = engine_for(loaded, prefix_cache=0)
    shared = engine_for(loaded)
    fed = Fed(shared)
    first = request(shared, "a", TEXTS[0])
    whole = prompt_length(shared, first)
    st = first.state
    preamble, _ = shared.tokenize(build_preamble(st.system, st.scene, st.speakers, st.references))
    same(run(shared, [first])["a"], run(plain, [request(plain, "a", TEXTS[0])])["a"])
    assert fed.total == whole and len(shared.prefixes) == 1
    begins = shared.prefixes.bytes // (2 * 2 * 2 * 16 * 4)  # positions: 2 layers, 2 heads, d 16
    assert begins == int(preamble.shape[1]) and whole - begins == 43  # the text's own turn
    for rid, text in zip("bc", TEXTS[1:3], strict=True):
        fed.calls.clear()
        job = request(shared, rid, text)
        length = prompt_length(shared, job)
        same(run(shared, [job])[rid], run(plain, [request(plain, rid, text)])[rid])
        assert fed.total == length - begins, rid
    assert len(shared.prefixes) == 1


@pytest.mark.parametrize("chunk", [256, 64])
def test_a_crowd_of_one_voice_prefills_its_beginning_once(loaded: HiggsModel, chunk: int) -> None:
    """Four requests of one voice joining together: the oldest feeds the
    beginning, the others, in the call where the oldest's chunk reaches its end
    (the first; with chunks of 64 positions, the third), only what follows it,
    the beginning copied from the oldest's row layer by layer. Each speaks as
    alone."""
    plain = engine_for(loaded, prefix_cache=0)
    shared = engine_for(loaded, prefill_chunk=chunk)
    fed = Fed(shared)
    crowd = [request(shared, str(i), text) for i, text in enumerate(TEXTS)]
    lengths = [prompt_length(shared, job) for job in crowd]
    got = run(shared, crowd)
    begins = shared.prefixes.bytes // (2 * 2 * 2 * 16 * 4)
    rest = sum(n - begins for n in lengths[1:])
    if chunk == 256:
        assert fed.calls == [lengths[0] + rest]
    else:
        assert begins == 142 and fed.calls[:2] == [64, 64]
        assert fed.calls[2] == lengths[0] - 128 + sum(min(n - begins, 64) for n in lengths[1:])
        assert fed.total == lengths[0] + rest
    for i, text in enumerate(TEXTS):
        same(got[str(i)], run(plain, [request(plain, str(i), text)])[str(i)])


def test_where_a_crowds_call_fails_each_is_fed_alone_with_its_beginning(
    loaded: HiggsModel,
) -> None:
    """The call of a beginning's feeder and its copiers fails for the feeder's
    sake: each is fed alone, the feeder fails alone, and the others, with no row
    to copy from, feed their beginning themselves and speak as alone."""
    plain = engine_for(loaded, prefix_cache=0)
    shared = engine_for(loaded)
    crowd = [request(shared, str(i), text) for i, text in enumerate(TEXTS[:3])]
    original = shared.decoder.prefill
    calls: list[int] = []

    def faulty(rows: list[int], tokens: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(int(sum(args[3])))
        if crowd[0].state.slot in rows:
            raise RuntimeError("a bug in the feeder's prompt")
        return original(rows, tokens, *args)

    shared.decoder.prefill = faulty  # type: ignore[method-assign]
    lengths = [prompt_length(shared, job) for job in crowd]
    outputs = shared.step(crowd)
    del shared.decoder.prefill
    assert [out.error is not None for out in outputs] == [True, False, False]
    assert calls[1:] == lengths  # after the call: each alone, whole
    shared.finish(crowd[0])
    got = run(shared, crowd[1:])  # (from the second step: the first's logits unseen)
    for i, text in enumerate(TEXTS[1:3], start=1):
        codes, logits = run(plain, [request(plain, str(i), text)])[str(i)]
        same(got[str(i)], (codes, logits[1:]))
    assert len(shared.prefixes) == 0  # (no one fed it from its start: nothing kept)


def test_beginnings_differ_by_voice_scene_and_system(loaded: HiggsModel) -> None:
    """Another scene, no voice, or a dialogue's system text: another beginning,
    prefilled whole and kept beside the first."""
    shared = engine_for(loaded)
    fed = Fed(shared)
    cases: list[tuple[str, dict[str, Any]]] = [
        (TEXTS[0], {}),
        (TEXTS[0], {"scene": "hall"}),
        (TEXTS[0], {"voice": ""}),
        ("[SPEAKER0] Hi.\n[SPEAKER1] Hello.", {"voice": ""}),
    ]
    for i, (text, given) in enumerate(cases):
        fed.calls.clear()
        job = request(shared, str(i), text, **given)
        length = prompt_length(shared, job)
        run(shared, [job])
        assert fed.total == length, given
        assert len(shared.prefixes) == i + 1


def test_a_waiting_request_prefills_the_beginning_itself_if_its_owner_goes(
    loaded: HiggsModel,
) -> None:
    """The request prefilling a beginning for a crowd is cancelled before the
    beginning is in: the next one prefills it (in chunks of 8 positions here)
    and speaks as alone."""
    plain = engine_for(loaded, prefix_cache=0)
    shared = engine_for(loaded, prefill_chunk=8)
    owner, waiting = request(shared, "a", TEXTS[0]), request(shared, "b", TEXTS[1])
    shared.step([owner, waiting])
    shared.step([owner, waiting])
    assert waiting.state.utterance is not None and waiting.state.utterance.fed == 0
    shared.finish(owner)
    assert len(shared.prefixes) == 0
    same(run(shared, [waiting])["b"], run(plain, [request(plain, "b", TEXTS[1])])["b"])
    assert len(shared.prefixes) == 1


def test_the_prefix_cache_flag_reaches_the_speech_engine() -> None:
    import argparse

    from wavecast.server.cli import add_serve_arguments, config_from_args
    from wavecast.server.engines import load_engines

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args([])).models.prefix_cache_mb == 256
    for given, budget in (("0.5", 2**19), ("0", 0), ("-3", 0)):
        config = config_from_args(parser.parse_args(["--prefix-cache-mb", given]))
        mb = config.models.prefix_cache_mb
        (engine,) = load_engines(["tiny-higgs"], "cpu", prefix_cache_mb=mb).values()
        assert isinstance(engine, HiggsEngine) and engine.prefixes.budget == budget, given


def test_a_prompt_tokenizes_as_laid_out_with_one_placeholder_a_block(loaded: HiggsModel) -> None:
    """The ids of prompts with voices (described, and with transcripts), spoken
    chunks and a text that holds the placeholder itself equal the tokenizer's
    ids of the prompt laid out with every audio row's placeholder."""
    from wavecast.server.engines.higgs.prompt import (
        AUDIO_DELAY,
        AUDIO_OUT,
        SYSTEM,
        PromptAudio,
        build_prompt,
    )

    engine = engine_for(loaded)
    k = engine.num_codebooks
    gen = torch.Generator().manual_seed(5)
    a, b = (PromptAudio(torch.randint(0, 64, (k, n), generator=gen).numpy()) for n in (9, 30))
    prompts = [
        build_prompt(SYSTEM, "", [], [], "Plain."),
        build_prompt(SYSTEM, "A hall.", [("SPEAKER0", a), ("SPEAKER1", b)], [], "Two."),
        build_prompt(SYSTEM, "", [], [("I am here.", a), ("Said before.", b)], "Next."),
        build_prompt(SYSTEM, "", [], [("Odd.", a)], f"A text with {AUDIO_OUT} in it."),
    ]
    for parts in prompts:
        laid_out = "".join(
            part
            if isinstance(part, str)
            else AUDIO_OUT * (part.codes.shape[1] + 2) + AUDIO_DELAY * (k - 1)
            for part in parts
        )
        expected = engine.tokenizer(laid_out, add_special_tokens=False)["input_ids"]
        ids, audio = engine.tokenize(parts)
        assert ids[0].tolist() == expected
        blocks = [part.codes.shape[1] + 2 + k - 1 for part in parts if not isinstance(part, str)]
        assert (0 if audio is None else audio.shape[1]) == sum(blocks)


def test_the_store_keeps_nothing_the_device_has_no_room_for(monkeypatch: Any) -> None:
    from wavecast.server.engines import prefixes

    store = PrefixStore(budget=1 << 20)
    monkeypatch.setattr(prefixes, "free_memory", lambda device: 4 * 2 * 10 * 32 - 1)
    assert not store.put(b"a", block(10), block(10))  # 640 bytes: more than a quarter
    monkeypatch.setattr(prefixes, "free_memory", lambda device: 4 * 2 * 10 * 32)
    assert store.put(b"a", block(10), block(10))
    monkeypatch.setattr(prefixes, "free_memory", lambda device: None)  # (cannot be told)
    assert store.put(b"b", block(10), block(10))
