"""The MusicGen engine on the tiny random-weight model: fidelity and exactness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wavecast.protocol import InvalidField, resolve_params
from wavecast.server.engines import ModelLoadError, load_engines
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.codec_stream import StreamDecoder, _per_window, fastest_rows
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.musicgen.loading import load_musicgen_dir, save_musicgen
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen


def run(engine: Any, prompt: str, **params: Any) -> tuple[Any, list[np.ndarray], int]:
    resolved = resolve_params(engine.info.params, params)
    job = engine.prepare(EngineRequest("t", prompt, resolved))
    chunks, steps = [], 0
    while True:
        out = engine.step([job])[0]
        steps += 1
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            break
    return job, chunks, steps


def test_greedy_codes_equal_lm_generate(engine: Any) -> None:
    job, _, _ = run(engine, "a calm piano", duration=2.0, top_k=1, seed=3)
    codes = engine.codes_of(job)
    model = engine.model
    model.set_generation_params(duration=2.0, top_k=1, cfg_coef=3.0)
    _, reference = model.generate(["a calm piano"], return_tokens=True)
    assert codes.shape == reference.shape == (1, 4, 100)
    assert torch.equal(codes, reference)


def test_incremental_audio_equals_one_shot_decode(engine: Any) -> None:
    job, chunks, _ = run(engine, "drums", duration=3.0, seed=11)
    streamed = np.concatenate(chunks)
    full = engine.model.compression_model.decode(engine.codes_of(job), None)
    full = full[0].transpose(0, 1).numpy()
    assert streamed.shape == full.shape == (150 * 640, 1)
    assert np.abs(streamed - full).max() <= 1e-4
    assert len(chunks) > 5  # it really streamed


def test_first_audio_comes_early(engine: Any) -> None:
    resolved = resolve_params(engine.info.params, {"duration": 5.0})
    job = engine.prepare(EngineRequest("t", "x", resolved))
    first = next(n for n in range(1, 20) if engine.step([job])[0].audio is not None)
    # delay pattern (K=4) + 4 held-back frames + the first frame: the 8th LM step.
    assert first == 8


def test_same_seed_same_audio_other_seed_differs(engine: Any) -> None:
    a = np.concatenate(run(engine, "jazz", duration=1.0, seed=5)[1])
    b = np.concatenate(run(engine, "jazz", duration=1.0, seed=5)[1])
    c = np.concatenate(run(engine, "jazz", duration=1.0, seed=6)[1])
    # (chunk boundaries follow the stream's lead over real time: float rounding only)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6
    assert a.shape != c.shape or np.abs(a - c).max() > 1e-3


def test_interleaved_jobs_match_solo_runs(engine: Any) -> None:
    """Two requests stepped together: each sounds as it does alone."""
    solo_a = np.concatenate(run(engine, "rock", duration=1.5, seed=1)[1])
    solo_b = np.concatenate(run(engine, "ambient pads", duration=1.0, seed=2)[1])
    params_a = resolve_params(engine.info.params, {"duration": 1.5, "seed": 1})
    params_b = resolve_params(engine.info.params, {"duration": 1.0, "seed": 2})
    job_a = engine.prepare(EngineRequest("a", "rock", params_a))
    job_b = engine.prepare(EngineRequest("b", "ambient pads", params_b))
    out: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    active = {"a": job_a, "b": job_b}
    while active:
        names = list(active)
        for name, result in zip(names, engine.step([active[n] for n in names]), strict=True):
            if result.audio is not None:
                out[name].append(result.audio)
            if result.done:
                del active[name]
    # Their codec windows are decoded as one batch: the same audio up to float rounding.
    assert np.abs(np.concatenate(out["a"]) - solo_a).max() <= 1e-5
    assert np.abs(np.concatenate(out["b"]) - solo_b).max() <= 1e-5


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 0.0), (0.7, 5, 0.0), (1.0, 250, 0.9), (0.0, 250, 0.0)],
)
def test_sampling_modes_produce_valid_audio(
    engine: Any, temperature: float, top_k: int, top_p: float
) -> None:
    job, chunks, _ = run(
        engine,
        "x",
        duration=0.5,
        temperature=temperature,
        top_k=min(top_k, 64),
        top_p=top_p,
        seed=0,
    )
    codes = engine.codes_of(job)
    assert codes.min() >= 0 and codes.max() < engine.model.lm.card
    assert sum(c.shape[0] for c in chunks) == 25 * 640


def test_out_of_range_params_are_refused(engine: Any) -> None:
    with pytest.raises(InvalidField) as info:
        resolve_params(engine.info.params, {"duration": 300.5})
    assert info.value.field == "params.duration"
    with pytest.raises(InvalidField):
        resolve_params(engine.info.params, {"top_k": 1.5})
    with pytest.raises(InvalidField):
        resolve_params(engine.info.params, {"mbd_steps": 1})


def test_checkpoint_directory_round_trip(tmp_path: Path) -> None:
    """Save in audiocraft's layout, load back through audiocraft's loaders."""
    model = build_tiny_musicgen(seed=4)
    save_musicgen(model, tmp_path / "tiny-ckpt")
    assert {p.name for p in (tmp_path / "tiny-ckpt").iterdir()} >= {
        "state_dict.bin",
        "compression_state_dict.bin",
        "text_encoder",
    }
    loaded = load_musicgen_dir(tmp_path / "tiny-ckpt")
    original = MusicGenEngine(model, name="a", test_model=True)
    again = MusicGenEngine(loaded, name="b", test_model=True)
    a = np.concatenate(run(original, "same", duration=1.0, seed=9)[1])
    b = np.concatenate(run(again, "same", duration=1.0, seed=9)[1])
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_a_checkpoint_is_loaded_without_drawing_weights_first(tmp_path: Path) -> None:
    """Loading a checkpoint does not draw its weights at random before loading
    them (the global generator is where it was; drawing them took most of a
    large model's load on a CPU), and every weight and buffer is the saved one
    (the loads are strict); the initializers are torch's again afterwards."""
    model = build_tiny_musicgen(seed=4)
    save_musicgen(model, tmp_path / "ckpt")
    initializer = torch.nn.init.normal_
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loaded = load_musicgen_dir(tmp_path / "ckpt")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.nn.init.normal_ is initializer
    for part in ("lm", "compression_model"):
        saved = getattr(model, part).state_dict()
        again = getattr(loaded, part).state_dict()
        assert saved.keys() == again.keys(), part
        for name, tensor in saved.items():
            assert torch.equal(tensor, again[name]), (part, name)
    # A melody checkpoint in this layout holds no Demucs: its test Demucs is
    # drawn, not left unset.
    save_musicgen(build_tiny_musicgen(seed=4, melody=True), tmp_path / "melody")
    melody = load_musicgen_dir(tmp_path / "melody").lm.condition_provider.conditioners
    demucs = melody["self_wav"].demucs
    weights = [p for p in demucs.parameters() if p.dim() > 1]
    assert weights and all(bool(p.isfinite().all()) and float(p.abs().max()) > 0 for p in weights)


def test_load_engines_serves_a_checkpoint_directory(tmp_path: Path) -> None:
    save_musicgen(build_tiny_musicgen(seed=1), tmp_path / "mine")
    engines = load_engines([str(tmp_path / "mine")], "cpu")
    info = engines[str(tmp_path / "mine")].info
    assert info.sample_rate == 32000 and info.channels == 1


def test_unreachable_hub_model_names_the_test_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    # The hub reads HF_HUB_OFFLINE at import; set the switch itself so no retries run.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("AUDIOCRAFT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_engines(["facebook/musicgen-small"], "cpu")
    message = str(info.value)
    assert "facebook/musicgen-small" in message and "tiny-musicgen" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("left", "hold", "first", "chunk"),
    [(25, 4, 1, 10), (10, 4, 3, 7), (40, 6, 1, 1), (25, 4, 50, 50)],
)
def test_stream_decoder_geometries(
    engine: Any, left: int, hold: int, first: int, chunk: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (1, 4, 173), generator=gen)
    decode = engine.model.compression_model.decode
    full = decode(codes, None)[0].transpose(0, 1).numpy()
    stream = StreamDecoder(
        lambda c: decode(c, None),
        640,
        left_context=left,
        holdback=hold,
        first_frames=first,
        chunk_frames=chunk,
    )
    pieces = []
    sizes = torch.randint(1, 9, (200,), generator=gen).tolist()
    start = 0
    for size in sizes:
        if start >= 173:
            break
        out = stream.push(codes[..., start : start + size])
        start += size
        if out is not None:
            pieces.append(out)
        # bounded work: never more than left context + held back + new frames kept
        assert stream.held <= left + hold + max(first, chunk) + 8
    tail = stream.flush()
    if tail is not None:
        pieces.append(tail)
    streamed = np.concatenate(pieces)
    assert streamed.shape == full.shape
    assert np.abs(streamed - full).max() <= 1e-4


def _cpu_like(rows: int) -> float:
    # A call's overhead, then a cost per window that doubles past four windows.
    return 0.5 + rows * (1.0 if rows <= 4 else 2.0)


def _remainder_dear(rows: int) -> float:
    # Per window: 3, 2, 1.67, 1.2, 1.0, 0.99, then 2 (the jump) at 12.
    return {1: 3.0, 2: 4.0, 3: 5.0, 4: 4.8, 6: 6.0, 8: 7.92, 12: 24.0}[rows]


def _gpu_like(rows: int) -> float:
    return 1.0 + 0.1 * rows


@pytest.mark.parametrize(
    ("cost", "chosen", "tried", "spike"),
    [
        (_cpu_like, 4, [1, 2, 3, 4, 6], None),  # past the jump, larger batches are not tried
        (_gpu_like, 16, [1, 2, 3, 4, 6, 8, 12, 16], None),  # a GPU's
        (lambda rows: 1.0 * rows, 1, [1, 2, 3, 4, 6, 8, 12, 16], None),  # no saving: the least
        # Eight cost about what six do each, but calls of at most six leave
        # calls of the rest, dear each: seven streams pay 29% more than in one
        # call, eight 26%; in calls of at most eight, no crowd pays 13% more.
        (_remainder_dear, 8, [1, 2, 3, 4, 6, 8, 12], None),
        # One slow call (the machine's, not the batch's) in the sweep at six
        # windows: timed again, the sweep goes on.
        (_gpu_like, 16, [1, 2, 3, 4, 6, 8, 12, 16], 6),
    ],
)
def test_fastest_rows_takes_the_cap_no_crowd_pays_much_for(
    engine: Any, cost: Any, chosen: int, tried: list[int], spike: int | None
) -> None:
    """The real codec decodes every batch tried; the clock says what each call cost."""
    decode = engine.model.compression_model.decode
    now = [0.0]
    shapes: list[tuple[int, ...]] = []

    def timed(codes: torch.Tensor) -> torch.Tensor:
        rows = int(codes.shape[0])
        shapes.append(tuple(codes.shape))
        # (The size's second call: its first timed one.)
        slow = rows == spike and shapes.count(tuple(codes.shape)) == 2
        now[0] += cost(rows) * (10 if slow else 1)
        return decode(codes, None)

    assert fastest_rows(timed, 4, 39, 16, clock=lambda: now[0]) == chosen
    # Windows of 4 x 39: a sweep up the sizes, each twice (to allocate, timed;
    # a jump, or the spike, timed once more), then each size timed in turns
    # three more times.
    again = {tried[-1]} if tried[-1] < 16 else set()  # (the sweep stopped at a jump)
    if spike is not None:
        again.add(spike)
    sweep = [(rows, 4, 39) for rows in tried for _ in range(3 if rows in again else 2)]
    assert shapes == sweep + [(rows, 4, 39) for _ in range(3) for rows in tried]


def test_warm_up_measures_the_codec_batch(engine: Any) -> None:
    engine.warm_up()
    assert 1 <= engine.codec_batch <= engine.max_active


def test_the_codec_batch_flag_reaches_both_engines() -> None:
    import argparse

    from wavecast.server.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args([])).models.codec_batch == 0  # measured
    config = config_from_args(parser.parse_args(["--codec-batch", "3"]))
    batch = config.models.codec_batch
    engines = load_engines(["tiny-musicgen", "tiny-higgs"], "cpu", codec_batch=batch)
    for engine in engines.values():
        engine.warm_up()
        assert engine.codec_batch == 3, engine.info.name


def test_the_server_packs_the_step_weights_once_every_engine_is_warm(monkeypatch: Any) -> None:
    """The scheduler sizes every engine's table, then warms each up (each
    reserving its table), then packs each one's step weights: the copies take
    what memory is left. (The tiny
    models' weights are packed here only because ``PACKED_FROM`` is lowered.)"""
    import asyncio

    from wavecast.server.engines import dense
    from wavecast.server.scheduler import Scheduler

    monkeypatch.setattr(dense, "PACKED_FROM", 1)
    engines = load_engines(["tiny-musicgen", "tiny-higgs"], "cpu", codec_batch=2)
    order: list[str] = []
    for name, engine in engines.items():
        for method in ("size", "warm_up", "pack_weights"):
            bound = getattr(engine, method)

            def called(*args: Any, b: Any = bound, n: str = name, m: str = method) -> Any:
                if f"{m} {n}" not in order:  # (warm_up sizes, where not done yet)
                    order.append(f"{m} {n}")
                return b(*args)

            monkeypatch.setattr(engine, method, called)

    async def serve() -> None:
        scheduler = Scheduler(
            asyncio.get_running_loop(), lambda: engines, max_queue=1, max_active=1
        )
        await scheduler.start()
        scheduler.stop(timeout=10)

    asyncio.run(serve())
    assert order == [
        "size tiny-musicgen",
        "size tiny-higgs",
        "warm_up tiny-musicgen",
        "warm_up tiny-higgs",
        "pack_weights tiny-musicgen",
        "pack_weights tiny-higgs",
    ]
    for engine in engines.values():
        assert engine.decoder.packing.weights > 0, engine.info.name
        assert engine.decoder.packing.skipped is None


def test_a_servers_models_are_readied_for_the_least_of_their_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``max_active`` 0 with two models: each is sized in its part of the memory
    (half each) before any reserves, and the server runs the least of their
    numbers; the model with room for more is readied (its table, its codec's
    calls, its context's cost measured) for that number, not for its own. Here
    the speech model's part holds two requests' tables, the music model's 16."""
    import asyncio

    from wavecast.server.engines import kv
    from wavecast.server.scheduler import Scheduler

    engines = load_engines(["tiny-musicgen", "tiny-higgs"], "cpu", max_active=0)
    music, speech = engines["tiny-musicgen"], engines["tiny-higgs"]
    assert music.memory_share == speech.memory_share == 0.5
    free = 2**40
    monkeypatch.setattr(kv, "free_memory", lambda device: free)
    two = speech.decoder.bytes_for(rows=2, length=speech._table_length())
    speech.memory_share = two / (kv.AUTO_SHARE * free)  # (two fit there; four do not)
    scheduler = None

    async def serve() -> None:
        nonlocal scheduler
        scheduler = Scheduler(
            asyncio.get_running_loop(), lambda: engines, max_queue=1, max_active=0
        )
        await scheduler.start()
        scheduler.stop(timeout=10)

    asyncio.run(serve())
    assert scheduler is not None and scheduler.max_active == 2
    assert music.size() == 16  # (what its own part held)
    assert music.max_active == speech.max_active == 2
    assert music.decoder.rows == 2 * 2  # (a request's two rows: with and without its text)
    assert speech.decoder.rows == 2
    assert music.codec_batch <= 2 and speech.codec_batch <= 2


def test_max_duration_job_streams_whole_clip(engine: Any) -> None:
    _, chunks, steps = run(engine, "long", duration=30.0, seed=0)
    assert sum(c.shape[0] for c in chunks) == 1500 * 640
    assert steps == 1500 + 3  # one LM step per timestep, plus the codebook delays


def test_a_call_of_a_size_not_measured_is_priced_between_its_neighbours() -> None:
    """A crowd's rest may make a call of a size the warm-up did not measure (five,
    between four and six): its cost per window lies on the line between theirs."""
    measured = {1: 3.0, 2: 2.0, 4: 2.0, 6: 1.0}
    assert _per_window(measured, 5) == pytest.approx(1.5)
    assert _per_window(measured, 3) == pytest.approx(2.0)
    assert _per_window(measured, 4) == 2.0 and _per_window(measured, 0) == 0.0
