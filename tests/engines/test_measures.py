"""What a warm-up measured, kept for the next start (``engines/measures.py``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from wavecast.server.engines import measures, step_cost
from wavecast.server.engines.codec_incremental import IncrementalCodec, steady_decode
from wavecast.server.engines.codec_stream import CodecStreams
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import load_higgs
from wavecast.server.engines.musicgen.engine import MusicGenEngine
from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

KEPT = ("codec_forms", "codec_batch", "context_cost")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WAVECAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(measures, "REMEASURE", False)
    return tmp_path / "cache" / "measures"


def music(seed: int = 0, max_active: int = 2) -> MusicGenEngine:
    """A tiny MusicGen engine, its weights made from ``seed`` (its shapes the same)."""
    model = build_tiny_musicgen(seed=seed)
    return MusicGenEngine(model, name="tiny-musicgen", test_model=True, max_active=max_active)


def measured(engine: Any) -> tuple[object, int, float]:
    """What ``engine``'s warm-up chose: its codec's forms, chunks per call, context cost."""
    inc = engine.codec_streams.incremental
    assert inc is not None
    return inc.kept_forms(), engine.codec_batch, engine.context_cost


def nothing_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every measure of a warm-up fails the test if it runs."""

    def measuring(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured, where the measures were kept")

    monkeypatch.setattr(IncrementalCodec, "choose_forms", measuring)
    monkeypatch.setattr(CodecStreams, "fastest_rows", measuring)
    monkeypatch.setattr(step_cost, "context_cost", measuring)


def test_a_warm_up_keeps_its_measures_and_the_next_start_takes_them(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A warm-up keeps what it measured, in one file for the model; the next
    start's engine (the same shapes with other random weights, as a test model
    is made again) takes it all and measures nothing, and says so."""
    first = music(seed=0)
    first.warm_up()
    (kept,) = cache.iterdir()
    held = json.loads(kept.read_text())
    assert sorted(held["values"]) == sorted(KEPT)
    chosen = measured(first)
    assert chosen[0] == held["values"]["codec_forms"]
    assert chosen[1:] == (held["values"]["codec_batch"], held["values"]["context_cost"])

    nothing_measured(monkeypatch)
    again = music(seed=5)
    with caplog.at_level(logging.INFO, logger="wavecast.server.engines"):
        again.warm_up()
    assert measured(again) == chosen
    assert "as kept" in caplog.text
    assert f"as measured by a start at {held['measured']}" in caplog.text
    assert [path.name for path in cache.iterdir()] == [kept.name]


def test_kept_forms_decode_as_the_chosen_ones(cache: Path) -> None:
    """The forms taken from the file are the forms chosen, layer by layer, and
    decode streams as they do: one stream's calls and a crowd's."""
    first = music()
    first.warm_up()
    again = music()
    again.warm_up()
    a, b = first.codec_streams.incremental, again.codec_streams.incremental
    assert a is not None and b is not None
    assert [(op.one, op.many, op.many_from) for op in a._ops if hasattr(op, "one")] == [
        (op.one, op.many, op.many_from) for op in b._ops if hasattr(op, "one")
    ]
    like = first.codec_streams.like
    for streams in (1, 2):
        codes = torch.randint(0, 64, (streams, 4, 12), generator=torch.Generator().manual_seed(1))
        chosen = steady_decode(a, like, streams, 4)(codes)
        taken = steady_decode(b, like, streams, 4)(codes)
        assert torch.equal(chosen, taken)


def test_other_settings_or_shapes_measure_again(cache: Path) -> None:
    """Measures kept for one table size are not another's: another file."""
    music(max_active=2).warm_up()
    music(max_active=3).warm_up()
    assert len(list(cache.iterdir())) == 2


def test_each_model_keeps_its_own(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A speech engine keeps and takes its measures as a music engine does."""
    loaded = load_higgs("tiny-higgs", None, "cpu", torch.float32)
    first = HiggsEngine(loaded, name="tiny-higgs", max_active=2)
    first.warm_up()
    nothing_measured(monkeypatch)
    again = HiggsEngine(loaded, name="tiny-higgs", max_active=2)
    again.warm_up()
    assert measured(again) == measured(first)


def test_a_spoiled_file_is_measured_again_and_replaced(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = music()
    first.warm_up()
    (kept,) = cache.iterdir()
    whole = kept.read_text()
    kept.write_text(whole[: len(whole) // 2])  # (cut short)
    with caplog.at_level(logging.WARNING, logger="wavecast.server.engines"):
        music().warm_up()
    assert "are not read" in caplog.text
    assert json.loads(kept.read_text())["values"].keys() == set(KEPT)


def test_kept_values_this_engine_cannot_use_are_measured_again(cache: Path) -> None:
    """Forms for another count of layers, a form a layer does not have, a codec
    batch over the table's requests: each measured again, and kept anew."""
    first = music()
    first.warm_up()
    (kept,) = cache.iterdir()
    held = json.loads(kept.read_text())
    forms = held["values"]["codec_forms"]
    for spoiled in (
        {**forms, "layers": forms["layers"][:-1]},
        {**forms, "layers": [["sideways", "direct"], *forms["layers"][1:]]},
        {**forms, "units": [[1, 0]] * len(forms["units"])},
    ):
        held["values"].update(codec_forms=spoiled, codec_batch=99, context_cost="slow")
        kept.write_text(json.dumps(held))
        again = music()
        again.warm_up()
        values = json.loads(kept.read_text())["values"]
        assert values["codec_forms"] == measured(again)[0]  # (measured: maybe not the first's)
        assert len(values["codec_forms"]["layers"]) == len(forms["layers"])
        assert 1 <= values["codec_batch"] <= again.max_active
        assert isinstance(values["context_cost"], float)


def test_remeasure_measures_again_and_keeps_that(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    music().warm_up()
    (kept,) = cache.iterdir()
    held = json.loads(kept.read_text())
    held["values"]["context_cost"] = 12.5  # (what no tiny model costs)
    kept.write_text(json.dumps(held))
    monkeypatch.setattr(measures, "REMEASURE", True)
    again = music()
    again.warm_up()
    assert again.context_cost != 12.5
    assert json.loads(kept.read_text())["values"]["context_cost"] == again.context_cost


def test_a_models_files_beyond_the_last_eight_are_removed(cache: Path) -> None:
    """Files a model's other settings, machines or sources left: the eight
    written last are kept (the new one among them); another model's stay."""
    cache.mkdir(parents=True)
    for i in range(10):
        old = cache / f"tiny-musicgen-{i:024x}.json"
        old.write_text("{}")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    other = cache / f"tiny-musicgen-melody-{0:024x}.json"
    other.write_text("{}")
    os.utime(other, (1_000, 1_000))
    music().warm_up()
    kept = sorted(path.name for path in cache.glob("tiny-musicgen-*.json") if path != other)
    assert len(kept) == measures.KEPT_PER_MODEL and other.exists()
    newest = [f"tiny-musicgen-{i:024x}.json" for i in range(10 - measures.KEPT_PER_MODEL + 1, 10)]
    assert set(newest) < set(kept)  # (the oldest went)


def test_a_gpu_models_measures_do_not_build_the_row_kernel(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row kernel's build names a CPU model's measures (its forms depend on
    it); a GPU model's start does not build it for them."""

    def building() -> None:
        raise AssertionError("the row kernel built for a GPU model's measures")

    monkeypatch.setattr(measures.rowkernel, "built", building)
    gpu = measures.Measures.open("m", {"max_active": 2}, cpu=False)
    assert gpu.path is not None and gpu.get("codec_batch") is None


def test_an_empty_cache_folder_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAVECAST_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    music().warm_up()
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_leaves_the_start_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("WAVECAST_CACHE_DIR", str(tmp_path / "file" / "cache"))
    engine = music()
    engine.warm_up()
    assert engine.codec_batch is not None and engine.context_cost >= 0.0


def test_the_remeasure_flag_and_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from wavecast.server.cli import add_serve_arguments, config_from_args

    def remeasure(*args: str) -> bool:
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return config_from_args(parser.parse_args(list(args))).models.remeasure

    monkeypatch.delenv("WAVECAST_REMEASURE", raising=False)
    assert not remeasure()
    assert remeasure("--remeasure")
    monkeypatch.setenv("WAVECAST_REMEASURE", "1")
    assert remeasure()


def test_load_engines_passes_remeasure_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from wavecast.server.engines import load_engines

    monkeypatch.setattr(measures, "REMEASURE", False)
    load_engines(["tiny-musicgen"], "cpu", remeasure=True)
    assert measures.REMEASURE
