"""Pipelined MusicGen steps (``pipelined``): each step launched before the last
one's codes are read, the codes in flight fed on the device.

The codes and the logits are the plain step's; each step's outputs come a step
later; a request waits a step where the codes in flight end its window. The
batching tests' cases (neighbours joining, cancelled, failing; long form and
continuation in the batch) run here on a pipelined engine too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import test_batching as batching
import test_musicgen_features as features
import torch
from helpers import (
    cancelled_in_flight_leave_nothing,
    left_out_now_and_then,
    steps_in_order,
    waits_in,
)
from test_batching import codes, drive, make
from test_musicgen_features import decode, wav_bytes

from wavecast.server.engines.base import Job
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.musicgen.windows import FED_TOKEN
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen


@pytest.fixture(scope="module")
def pipelined() -> tuple[Any, MusicGenEngine]:
    model = build_tiny_musicgen(window=2.0, seed=3)
    engine = MusicGenEngine(
        model, name="tiny-2s", test_model=True, max_duration=12.0, pipelined=True
    )
    return model, engine


def joins(engine: MusicGenEngine, clip: Any) -> dict[int, list[tuple[str, Job]]]:
    """a and b from the start, c (a continuation) joining at step 5, d at 37 (b
    in its second window by then, d's stride short: windows every second)."""
    continuation = {"inputs": {"continuation": wav_bytes(clip, 32000)}}
    return {
        0: [("a", make(engine, "a")), ("b", make(engine, "b"))],
        5: [("c", make(engine, "c", **continuation))],
        37: [("d", make(engine, "d"))],
    }


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-buffers"])
def test_pipelined_steps_draw_the_plain_steps_codes(graphs: bool) -> None:
    """A crowd joining apart, over window boundaries and with a continuation:
    each request's logits within 1e-5 of the plain step's and its codes equal,
    its audio the plain stream's (within 1e-5; the codec's calls group the
    streams' chunks differently) and a one-shot decode's; the pipelined crowd
    takes a step more than the plain one at each window's end and one at the
    end (the codes in flight are read a step later)."""
    model = build_tiny_musicgen(window=2.0, seed=3)
    clip = decode(model, torch.randint(0, 64, (1, 4, 40)))
    engines = [
        MusicGenEngine(
            model,
            name="tiny-2s",
            test_model=True,
            max_duration=12.0,
            cuda_graphs=graphs,
            pipelined=pipelined,
        )
        for pipelined in (False, True)
    ]
    plain, steps_plain = drive(engines[0], joins(engines[0], clip))
    piped, steps_piped = drive(engines[1], joins(engines[1], clip))
    for rid, run in plain.items():
        other = piped[rid]
        assert run.error is None and other.error is None
        assert len(other.logits) == len(run.logits), rid
        pairs = zip(other.logits, run.logits, strict=True)
        assert max(float((x - y).abs().max()) for x, y in pairs) <= 1e-5, rid
        assert torch.equal(codes(engines[1], other), codes(engines[0], run)), rid
        streamed = np.concatenate(other.audio)
        assert streamed.shape == np.concatenate(run.audio).shape
        assert np.abs(streamed - np.concatenate(run.audio)).max() <= 1e-5, rid
        if rid != "c":  # (a continuation streams its new part only)
            full = decode(model, codes(engines[1], other))
            assert np.abs(streamed - full).max() <= 1e-4, rid
    assert codes(engines[1], piped["b"]).shape[-1] > 150  # (two window extensions)
    assert steps_piped > steps_plain
    for engine in engines:
        assert engine._in_flight is None or not engine._in_flight.drew


def test_a_step_is_launched_before_the_last_ones_codes_are_read(
    pipelined: tuple[Any, MusicGenEngine], monkeypatch: Any
) -> None:
    """Within a call: this step's launch, then the last step's codes read; a
    running request's input column is fed on the device (``FED_TOKEN``), but
    where its window ends (its next window's prompt is made of the codes in
    flight: it waits a step); its first output (nothing yet) comes before any
    codes are read."""
    _, engine = pipelined

    def fed(given: torch.Tensor) -> str:
        return "fed" if bool((given == FED_TOKEN).any()) else "known"

    marks = {"_launch": lambda *_: "launch", "_collect": lambda *_: "collect", "_feed": fed}
    job = make(engine, "d")  # 2.5 s: windows of 2 s, moving on by 1 s
    calls, outputs = steps_in_order(engine, job, marks, monkeypatch)
    assert calls[0] == ["launch", "known"]  # (the first column: the special token)
    assert outputs[0].audio is None and outputs[0].fraction == 0.0
    # At each window's end the request sits a step out (nothing of its own is
    # launched, its last codes are read); the next window's first step feeds
    # what the host knows (its prompt, prefilled in the same call).
    waits = [i for i, call in enumerate(calls) if call == ["launch", "collect"]]
    assert len(waits) == 2 and waits[-1] == len(calls) - 1 and outputs[-1].done
    assert calls[waits[0] + 1] == ["launch", "known"]
    running = set(range(len(calls))) - {0, waits[0] + 1, *waits}
    assert all(calls[i] == ["launch", "fed", "collect"] for i in running)


def test_rows_in_a_pipelined_batch_equal_their_solo_runs(
    pipelined: tuple[Any, MusicGenEngine],
) -> None:
    batching.test_rows_in_a_batch_equal_their_solo_runs(pipelined)


def test_a_cancelled_neighbour_in_flight_and_a_reused_slot_change_nothing(
    pipelined: tuple[Any, MusicGenEngine],
) -> None:
    batching.test_a_cancelled_neighbour_and_a_reused_slot_change_nothing(pipelined)


def test_a_request_failing_alone_in_flight_ends_alone(
    pipelined: tuple[Any, MusicGenEngine], monkeypatch: Any
) -> None:
    """Non-finite logits found when its codes are read (a step later), and its
    bookkeeping failing: each ends alone, with the plain step's counts of
    logits drawn before it."""
    batching.test_a_request_that_fails_alone_ends_alone(pipelined, monkeypatch)


def test_finished_and_cancelled_pipelined_requests_leave_nothing_behind(
    pipelined: tuple[Any, MusicGenEngine],
) -> None:
    """A request cancelled with its codes in flight is dropped from the step in
    flight: once finished, nothing of any request stays reachable."""
    model, _ = pipelined
    engine = MusicGenEngine(
        model, name="tiny-2s", test_model=True, max_duration=12.0, pipelined=True
    )
    batching.crowds_leave_nothing(engine)
    cancelled_in_flight_leave_nothing(engine, [make(engine, "a"), make(engine, "b")], 3)


# -- against audiocraft, pipelined ------------------------------------------------------


@pytest.mark.parametrize(("duration", "stride"), [(7.3, 1.5), (4.0, 0.5)])
def test_pipelined_long_form_equals_audiocraft_extension(
    pipelined: tuple[Any, MusicGenEngine], duration: float, stride: float
) -> None:
    features.test_long_form_equals_audiocraft_extension(pipelined, duration, stride)


def test_a_pipelined_continuation_with_its_prompt_equals_generate_continuation(
    pipelined: tuple[Any, MusicGenEngine],
) -> None:
    features.test_continuation_matches_generate_continuation(pipelined, True)


def test_a_pipelined_melody_over_windows_equals_generate_with_chroma() -> None:
    """A melody's chroma wrapped across windows, each next window's conditioning
    computed a segment a step while the request waits (pipelined: after its
    codes in flight are read)."""
    model = build_tiny_musicgen(melody=True, window=2.0, seed=5)
    engine = MusicGenEngine(
        model, name="tiny-melody", test_model=True, max_duration=10.0, pipelined=True
    )
    features.test_melody_matches_generate_with_chroma((model, engine), 5.0)


def test_a_request_left_out_of_calls_loses_nothing(pipelined: tuple[Any, MusicGenEngine]) -> None:
    """A request left out of calls while its codes are in flight (the scheduler
    leaves none out, but should it): its codes go into its window, its output
    waits for its next call, and it streams what it streams when not left out."""
    _, engine = pipelined
    runs = [
        left_out_now_and_then(engine, {rid: make(engine, rid) for rid in "ab"}, leave)
        for leave in (None, "b")
    ]
    for rid in "ab":
        (codes_, audio), (left_codes, left_audio) = runs[0][rid], runs[1][rid]
        assert torch.equal(left_codes, codes_), rid
        assert left_audio.shape == audio.shape and np.abs(left_audio - audio).max() <= 1e-5


def test_a_step_waits_for_nothing_on_the_device() -> None:
    """A pipelined step's host part (its launch, then the last step's codes
    read and written into the windows) runs while the step it launched
    computes: on a GPU, anything in it that waits for the device (a tensor
    read on the host, a copy from pageable memory) waits for that step, and
    the overlap is lost. A crowd joining apart (descriptions encoded
    together, new rows' sampling and guidance set), a continuation's prompt
    and the long-form windows' re-prefills fed in pieces under a time budget:
    the step's own code reads nothing back and copies nothing but through
    ``pipelining``'s calls (pinned memory, events; the codes read back once
    there). Left out: the codec's calls (on a stream of their own) and the
    windows' patterns (audiocraft's, on host tensors). (The text encoder's
    own check of its mask is transformers'; the GPU tests leave it out.)"""
    model = build_tiny_musicgen(window=2.0, seed=3)
    clip = decode(model, torch.randint(0, 64, (1, 4, 40)))
    engine = MusicGenEngine(
        model,
        name="tiny-2s",
        test_model=True,
        max_duration=12.0,
        pipelined=True,
        prefill_chunk=8,
        prefill_budget_ms=5.0,
    )
    exempt = [(engine, "_decode_due"), (engine.windows, "start")]
    with waits_in(engine, "step", exempt) as waits:
        runs, _ = drive(engine, joins(engine, clip))
    assert waits == []
    assert all(run.error is None for run in runs.values())
    assert len(engine.prefill._calls) > 0  # (prompts fed in pieces, timed)


def test_the_audit_of_waits_finds_the_engines_copies(
    pipelined: tuple[Any, MusicGenEngine],
) -> None:
    """``waits_in`` lists what the engine's own code does that waits (here a
    codec call's codes copied to the device), not ``pipelining``'s copies
    (pinned, without waiting) nor the watching code's own reads."""
    from wavecast.server.engines import pipelining

    _, engine = pipelined
    engine.model.compression_model.eval()

    def call(codes: torch.Tensor) -> None:
        engine._decode(codes)
        pipelining.upload({"a": [1, 2]}, engine.device)
        int(codes.sum())

    engine.work = call  # type: ignore[attr-defined]
    with torch.no_grad(), waits_in(engine, "work") as waits:
        engine.work(torch.zeros(1, 4, 3, dtype=torch.int64))  # type: ignore[attr-defined]
    assert len(waits) == 1 and waits[0].startswith("to at engines/musicgen/engine.py:"), waits


def test_an_upload_is_its_arrays_whatever_their_shapes() -> None:
    """``upload``: host arrays of any shape (empty ones, lists, host tensors) in
    one copy, as int64 tensors of their shapes, in the order given; a tensor
    already on the device passed through."""
    from wavecast.server.engines.pipelining import upload

    cpu = torch.device("cpu")
    on_device = torch.arange(6).view(2, 3)
    arrays: dict[str, Any] = {
        "ids": np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int32),
        "none": np.zeros((0, 4), dtype=np.int64),
        "rows": [3, 1],
        "host": torch.tensor([True, False]),
        "there": on_device,
    }
    sent = upload(arrays, cpu)
    assert list(sent) == list(arrays)
    assert sent["there"] is on_device
    for name, array in arrays.items():
        expected = torch.as_tensor(np.asarray(array)).to(torch.int64)
        assert sent[name].dtype == torch.int64 and torch.equal(sent[name], expected), name


def test_a_step_timer_and_a_host_copy_on_a_cpu_are_there_at_once() -> None:
    """Off CUDA the work is done when a call returns: the timer gives each
    call's time by the clock at once, and a host copy is ready at once (a
    copy: the tensor written afterwards does not change it)."""
    from wavecast.server.engines.pipelining import HostCopy, StepTimer

    now = [1.0]
    timer = StepTimer(torch.device("cpu"), clock=lambda: now[0])
    began = timer.start()
    now[0] += 0.25
    assert timer.stop(began, 7) == [(7, 0.25)] and timer.done() == []
    flag = torch.tensor([1, 2])
    copy = HostCopy(flag)
    flag += 1
    assert copy.ready() and copy.values().tolist() == [1, 2]
