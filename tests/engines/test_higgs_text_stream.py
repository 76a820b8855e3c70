"""Speech whose text comes as it is written (``text_stream``, PROTOCOL.md §3.4):
the engine speaks each whole sentence once the text before it is spoken, keeps
the request's row while it waits for more, and ends once the text has."""

from __future__ import annotations

import itertools
import random
import re
import time
from typing import Any

import numpy as np
import pytest
from helpers import tiny_higgs

from wavecast.protocol import InvalidField
from wavecast.server.engines.base import EngineRequest, Job
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.prompt import chunk_text, speakable

# Three sentences of three words: chunked by words (three a chunk), the whole
# text is the three sentences, as they come.
SENTENCES = ["One two three.", "Four five six.", "Seven eight nine."]
WHOLE = " ".join(SENTENCES)
CHUNKING = {"chunk_method": "word", "chunk_max_word_num": 3, "max_new_tokens": 60, "seed": 5}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "pipelined"])
def engine(request: pytest.FixtureRequest) -> HiggsEngine:
    engine: HiggsEngine = tiny_higgs(pipelined=request.param)
    return engine


def job_of(engine: HiggsEngine, text: str, text_stream: bool, **given: Any) -> Job:
    params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    params.update(CHUNKING, **given)
    request = EngineRequest("t", text, params, text_stream=text_stream)
    engine.check(request)
    return engine.prepare(request)


def step_until(engine: HiggsEngine, job: Job, audio: list[np.ndarray], codes: list[Any]) -> bool:
    """Step a job until it waits for text or ends (True where it ended); the
    output that says it waits is the last before its wait."""
    said = False
    while not engine.waiting(job):
        assert not said  # (an output says it waits only once it does)
        out = engine.step([job])[0]
        if out.audio is not None:
            audio.append(out.audio)
        codes.extend(out.codes or [])
        said = out.waiting
        if out.done:
            assert not out.waiting
            return True
    assert said
    return False


def whole_run(engine: HiggsEngine) -> tuple[np.ndarray, list[Any]]:
    job = job_of(engine, WHOLE, text_stream=False)
    audio: list[np.ndarray] = []
    codes: list[Any] = []
    assert step_until(engine, job, audio, codes)
    engine.finish(job)
    return np.concatenate(audio), codes


def test_sentences_are_cut_where_they_end() -> None:
    assert speakable("Hello there. How are", whole=False) == ("Hello there.", " How are")
    assert speakable("Mr. Smith went home. Then", whole=False)[0] == "Mr. Smith went home."
    assert speakable("e.g. this one? and", whole=False)[0] == "e.g. this one?"
    assert speakable('He said "hi." Then', whole=False)[0] == 'He said "hi."'
    assert speakable("你好。今天", whole=False) == ("你好。", "今天")
    assert speakable("a line\nand half", whole=False) == ("a line\n", "and half")
    assert speakable("no end yet", whole=False) == ("", "no end yet")
    assert speakable("3.14 is pi", whole=False) == ("", "3.14 is pi")
    assert speakable("no end yet", whole=True) == ("no end yet", "")
    # Two stops end a sentence even after a title; a title's own does not.
    assert speakable("Mr.. Then", whole=False)[0] == "Mr.."
    assert speakable("ask Mr. Then", whole=False)[0] == ""


# Where a sentence ends, as first written (PROTOCOL.md §3.4): the same pattern
# tried from every place of a run of stops. The server's reads each run once.
PLAIN_SENTENCE_END = re.compile(
    r"(?<![A-Z])(?<!\b[A-Z][a-z])(?<!\bMrs)(?<!\bProf)(?<!\b[Ee]\.g)(?<!\b[Ii]\.e)"
    r"(?:[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*(?=\s))"
    r"|[\u3002\uff01\uff1f]+[\u201d\u2019\u300d\u300f)\]]*"
    r"|\n"
)


def test_sentences_end_where_the_plain_pattern_ends_them() -> None:
    # Random texts of stops, closing quotes and brackets, spaces, titles'
    # and initials' letters, and the stops of scripts without spaces.
    letters = list(".!?\u2026\"'\u201d\u2019\u00bb)] \n\tAMrsPofeEgiIax\u3002\uff01\u300d3")
    rng = random.Random(11)
    for _ in range(20_000):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(0, 24)))
        ends = [m.end() for m in PLAIN_SENTENCE_END.finditer(text)]
        spoken, rest = speakable(text, whole=False)
        assert len(spoken) == (ends[-1] if ends else 0), repr(text)
        assert spoken + rest == text
        pieces = chunk_text(text, "sentence", 1000, 1)
        bounds = [0, *ends, len(text)]
        expected = [text[a:b].strip() for a, b in itertools.pairwise(bounds)]
        assert pieces == ([p for p in expected if p] or [text]), repr(text)


def test_a_long_run_of_stops_is_read_once() -> None:
    # Tried from each of its places, a run of 20,000 stops that no space
    # follows took seconds to cut (the plain pattern: some 10 s on a 2-core
    # VM), holding the interpreter's lock, so every stream's step, that long.
    for text in ("." * 20_000, "Mr" + "." * 20_000, "a" + "?!" * 10_000, "\u2026" * 20_000):
        start = time.perf_counter()
        assert speakable(text, whole=False) == ("", text)
        assert chunk_text(text, "sentence", 30, 1) == [text]
        assert time.perf_counter() - start < 0.5, text[:4]


def test_text_that_comes_ahead_of_the_speech_is_the_whole_texts_speech(
    engine: HiggsEngine,
) -> None:
    """Each part comes before the speech needs it: the same codes as the whole
    text sent at once, chunked the same way, and its audio (to float rounding:
    where the codec's calls split follows the stream's lead over real time)."""
    audio, codes = whole_run(engine)
    job = job_of(engine, "One two thr", text_stream=True)
    assert engine.waiting(job)  # (no whole sentence yet)
    engine.add_text(job, "ee. Four five", flush=False, end=False)
    assert not engine.waiting(job)
    got: list[np.ndarray] = []
    got_codes: list[Any] = []
    out = engine.step([job])[0]  # (its first step: the first chunk's prompt)
    engine.add_text(job, " six. Seven eight nine.", flush=False, end=True)
    if out.audio is not None:
        got.append(out.audio)
    got_codes.extend(out.codes or [])
    assert step_until(engine, job, got, got_codes)
    engine.finish(job)
    assert got_codes == codes
    joined = np.concatenate(got)
    assert joined.shape == audio.shape and np.allclose(joined, audio, atol=1e-5)


def test_by_sentence_the_text_is_cut_the_same_however_it_comes(engine: HiggsEngine) -> None:
    """``chunk_method: sentence``: each sentence a chunk, so that parts cut
    mid-sentence, and two sentences that come at once, give the whole text's
    chunks and codes (by words or whole, the two would be one chunk)."""
    text = "Yes. Four five six seven. Eight nine! Ten eleven twelve?"
    by_sentence = {"chunk_method": "sentence", "chunk_max_word_num": 200}
    whole = job_of(engine, text, text_stream=False, **by_sentence)
    assert whole.state.chunks == [
        "Yes.",
        "Four five six seven.",
        "Eight nine!",
        "Ten eleven twelve?",
    ]
    codes: list[Any] = []
    assert step_until(engine, whole, [], codes)
    engine.finish(whole)
    job = job_of(engine, "Yes. Four fi", text_stream=True, **by_sentence)
    got_codes: list[Any] = []
    out = engine.step([job])[0]
    got_codes.extend(out.codes or [])
    engine.add_text(job, "ve six seven. Eight nine! Ten elev", flush=False, end=False)
    while job.state.index < 2:  # (the two sentences that came together, cut apart)
        got_codes.extend(engine.step([job])[0].codes or [])
    assert job.state.chunks[1:3] == ["Four five six seven.", "Eight nine!"]
    engine.add_text(job, "en twelve?", flush=False, end=True)
    assert step_until(engine, job, [], got_codes)
    engine.finish(job)
    assert got_codes == codes


def test_a_stream_that_waits_for_text_goes_on_from_where_it_waited(engine: HiggsEngine) -> None:
    """Each sentence comes once the one before is spoken: the same codes (its
    row kept while it waits, its draws counted on); all of the audio so far
    goes out as it waits, and the same length of audio in all."""
    audio, codes = whole_run(engine)
    hop = engine.hop
    job = job_of(engine, SENTENCES[0] + " ", text_stream=True)
    got: list[np.ndarray] = []
    got_codes: list[Any] = []
    paused_at: list[int] = []
    for i, sentence in enumerate(SENTENCES[1:]):
        assert not step_until(engine, job, got, got_codes)
        assert engine.waiting(job)
        st = job.state
        # Every frame made so far is in the audio sent (none held back).
        assert sum(len(a) for a in got) == st.produced * hop
        paused_at.append(st.produced * hop)
        assert st.slot is not None  # (its row kept)
        engine.add_text(job, sentence, flush=i == 0, end=i == 1)
    assert step_until(engine, job, got, got_codes)
    engine.finish(job)
    assert got_codes == codes
    joined = np.concatenate(got)
    assert joined.shape == audio.shape
    # Up to the codec's look-ahead before the first wait, the whole text's audio
    # (from there, the end of the audio as it waited, then the speech after it).
    lookahead = 16 * hop
    before = slice(0, paused_at[0] - lookahead)
    assert np.allclose(joined[before], audio[before], atol=1e-5)
    assert not np.allclose(joined, audio, atol=1e-5)
    # From it on, the codec goes on from the frames before the wait (its
    # context): the whole text's audio again, to float rounding.
    after = slice(paused_at[0], paused_at[1] - lookahead)
    assert after.start < after.stop
    assert np.allclose(joined[after], audio[after], atol=1e-5)


def test_a_text_that_ends_while_it_waits_ends_the_request(engine: HiggsEngine) -> None:
    job = job_of(engine, SENTENCES[0] + " ", text_stream=True)
    got: list[np.ndarray] = []
    assert not step_until(engine, job, got, [])
    made = job.state.produced
    engine.add_text(job, "", flush=False, end=True)
    assert not engine.waiting(job)
    out = engine.step([job])[0]
    assert out.done and out.audio is None and out.fraction == 1.0
    assert sum(len(a) for a in got) == made * engine.hop
    assert job.state.slot is None  # (its row given back)
    engine.finish(job)


def test_an_empty_beginning_waits_and_text_after_its_end_is_refused(
    engine: HiggsEngine,
) -> None:
    job = job_of(engine, "", text_stream=True)
    assert engine.waiting(job)
    engine.begin([job])  # (its row taken; nothing to say yet)
    assert engine.waiting(job)
    engine.add_text(job, "Hi", flush=True, end=True)
    audio: list[np.ndarray] = []
    assert step_until(engine, job, audio, [])
    assert audio
    with pytest.raises(InvalidField, match="has ended"):
        engine.add_text(job, "more", flush=False, end=False)
    engine.finish(job)


def test_text_holding_a_control_token_is_refused(engine: HiggsEngine) -> None:
    # (In parts: the token whole once they are joined.)
    job = job_of(engine, "Hello there.", text_stream=True)
    engine.add_text(job, " Say <|AUDIO", flush=False, end=False)
    with pytest.raises(InvalidField, match="control token") as info:
        engine.add_text(job, "_OUT|> now.", flush=False, end=False)
    assert info.value.field == "text"
    engine.finish(job)


def test_a_stream_waiting_for_text_leaves_its_neighbours_as_they_were(
    engine: HiggsEngine,
) -> None:
    """A neighbour of a stream that waits (its row out of the steps) makes what
    it makes alone."""
    alone = job_of(engine, WHOLE, text_stream=False, seed=9)
    solo: list[Any] = []
    assert step_until(engine, alone, [], solo)
    engine.finish(alone)
    other = job_of(engine, WHOLE, text_stream=False, seed=9)
    waiting = job_of(engine, SENTENCES[0] + " ", text_stream=True)
    beside: list[Any] = []
    waited = 0
    done = False
    while not done:
        jobs = [other] if engine.waiting(waiting) else [other, waiting]
        waited += len(jobs) == 1
        outs = engine.step(jobs)
        beside.extend(outs[0].codes or [])
        done = outs[0].done
    assert waited > 0 and beside == solo
    engine.finish(other)
    engine.finish(waiting)


def test_a_text_picked_up_with_its_flushes_is_cut_as_its_parts_were(engine: HiggsEngine) -> None:
    """A stream picked up (``text_flushes``: where the cut try's flushed parts
    ended, in characters of its prompt, all of its text so far) is cut into the
    chunks its parts were, and leaves the same text unspoken, whatever the text
    and however it came: random texts of sentences (titles, numbers, quotes,
    Chinese, lines), in random parts, some flushed."""
    rng = np.random.default_rng(11)
    words = ["one", "Mr.", "e.g.", "3.14", '"hi."', "two!", "three?", "你好。", "four.", "five\n"]
    by_sentence = {"chunk_method": "sentence", "chunk_max_word_num": 200}
    for _ in range(200):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 14))))
        cuts = sorted({int(c) for c in rng.integers(0, len(text) + 1, size=rng.integers(0, 6))})
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        flushed = [bool(rng.integers(0, 2)) for _ in parts[1:]]
        job = job_of(engine, parts[0], text_stream=True, **by_sentence)
        flushes, so_far = [], len(parts[0])
        for part, flush in zip(parts[1:], flushed, strict=True):
            engine.add_text(job, part, flush=flush, end=False)
            so_far += len(part)
            if flush and (not flushes or flushes[-1] < so_far):
                flushes.append(so_far)
        params: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
        params.update(CHUNKING, **by_sentence)
        request = EngineRequest("p", text, params, text_stream=True, text_flushes=tuple(flushes))
        chunks, unspoken, _ = engine._text_chunks(request)
        assert (chunks, unspoken) == (job.state.chunks, job.state.unspoken), (parts, flushed)
        engine.finish(job)
