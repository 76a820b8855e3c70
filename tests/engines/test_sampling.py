"""Batched per-row sampling: the rules, the distribution, and batch invariance."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from helpers import built_kernel

from wavecast.server.engines.sampling import (
    DrawPlan,
    RowSampling,
    candidates_for,
    codebook_keys,
    counter_uniform,
    finite_rows,
    redraw_keys,
    row_keys,
    sample,
)


def keys(seed: list[int] | torch.Tensor, step: list[int] | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(row_keys(np.asarray(seed), np.asarray(step)))


def rows(n: int, **values: float) -> dict[str, torch.Tensor]:
    return {
        "temperature": torch.full((n,), values.get("temperature", 1.0)),
        "top_k": torch.full((n,), int(values.get("top_k", 0)), dtype=torch.int64),
        "top_p": torch.full((n,), values.get("top_p", 0.0)),
        "key": keys([int(values.get("seed", 0))] * n, [int(values.get("step", 0))] * n),
    }


def test_noise_is_uniform_in_the_open_interval_and_keyed() -> None:
    seed = [0, 1, 2**62 + 5]
    step = [0, 0, 7]
    u = counter_uniform(keys(seed, step), 4, 4096)
    assert u.shape == (3, 4, 4096)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    # Every key gives other noise: seed, step and codebook.
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0, 0], u[0, 1])
    again = counter_uniform(keys([1], [1]), 4, 4096)
    assert not torch.equal(again[0], u[1])
    # Neighbouring tokens and codebooks are not correlated.
    flat = u[:, 0].flatten()
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.02
    # A pure function of its key.
    assert torch.equal(counter_uniform(keys(seed, step), 4, 4096), u)


def test_keys_per_codebook_made_on_the_host_give_the_same_noise() -> None:
    """The engines hand the draw keys per codebook, mixed on the host: the same
    integers as the device mixes from row keys, so the same noise and codes."""
    seed, step = np.array([0, 1, 2**62 + 5, 7]), np.array([0, 0, 7, 123456])
    row = row_keys(seed, step)
    per_codebook = torch.from_numpy(codebook_keys(row, 4))
    assert per_codebook.shape == (4, 4)
    assert torch.equal(
        counter_uniform(per_codebook, 4, 4096), counter_uniform(torch.from_numpy(row), 4, 4096)
    )
    logits = torch.randn(4, 4, 64)
    params = rows(4, top_k=8)
    alone = sample(logits, **params)
    params["key"] = torch.from_numpy(codebook_keys(params["key"].numpy(), 4))
    assert torch.equal(sample(logits, **params), alone)


def test_the_noise_kernel_is_the_librarys_noise_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row kernel's noise (on this project's machines) equals the library's
    operations' bit for bit: for a vocabulary's tokens written out or not, for
    the candidates a draw takes (ids in any order, any count, not a multiple of
    eight), at the keys' extremes; a key past 32 bits (which ``codebook_keys``
    never makes) falls back to the library's, so the noise is the same still;
    and so are the codes drawn, greedy and sampled, with top-k and top-p."""
    kernel = built_kernel()
    from wavecast.server.engines import sampling

    def library(call: Any) -> Any:
        with monkeypatch.context() as patched:
            patched.setattr(sampling, "ROW_KERNEL", False)
            return call()

    seed, step = np.array([0, 1, 2**62 + 5, 7, 9]), np.array([0, 0, 7, 123456, 3])
    key = torch.from_numpy(codebook_keys(row_keys(seed, step), 4))
    key[3, 0], key[3, 1] = 0, 2**32 - 1
    for vocab in (1, 7, 64, 2051):
        u = counter_uniform(key, 4, vocab)
        assert torch.equal(u, library(partial(counter_uniform, key, 4, vocab)))
        assert torch.equal(kernel.uniforms(key, None, vocab), u)
    tokens = torch.randint(0, 2**31, (5, 4, 37)).flip(-1)  # (a view, ids in no order)
    drawn = kernel.uniforms(key, tokens)
    assert drawn is not None
    assert torch.equal(drawn, library(lambda: sampling._token_uniform(key, tokens)))
    far = key.clone()
    far[2, 3] = 2**32
    assert kernel.uniforms(far, tokens) is None
    assert torch.equal(
        sampling._token_uniform(far, tokens), library(lambda: sampling._token_uniform(far, tokens))
    )
    logits = torch.randn(5, 4, 2048) * 3
    for values in ({"top_k": 250}, {"top_p": 0.9}, {"temperature": 0.0}, {"top_k": 0}):
        params = rows(5, **values)
        params["key"] = key
        assert torch.equal(sample(logits, **params), library(partial(sample, logits, **params)))


def test_the_kernels_sort_is_the_librarys_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row kernel's sort (on this project's machines) gives torch's stable
    sort's values bit for bit: rows of every length up to ``MOST_SORTED`` (a
    block of eight and its tails), ties, signed zeros, infinities and NaN of
    either sign, a view that is not contiguous; past ``MOST_SORTED``, nothing
    (the library sorts). And ``warp`` scores the same with it as without it:
    forced tokens, every warper, rows all but one ``-inf``, ties at top-k's
    k-th score."""
    from wavecast.server.engines import rowkernel, sampling

    kernel = built_kernel()
    generator = torch.Generator().manual_seed(7)
    for n in (1, 2, 7, 8, 9, 15, 66, 130, 511, rowkernel.MOST_SORTED):
        x = torch.round(torch.randn(6, n, generator=generator) * 3) / 2  # (ties)
        x[0, ::2] = -0.0
        x[1, ::3] = float("nan")
        x[2, 1::4] = -float("nan")
        x[3, ::5] = float("-inf")
        x[4, ::6] = float("inf")
        for rows in (x, x.t().contiguous().t(), x.view(2, 3, n)):
            got = kernel.sort(rows)
            exact = torch.sort(rows, dim=-1, stable=True).values
            assert got is not None and got.shape == rows.shape
            assert torch.equal(got.view(torch.int32), exact.view(torch.int32)), n
    assert kernel.sort(torch.randn(2, rowkernel.MOST_SORTED + 1)) is None
    assert kernel.sort(torch.randn(0, 5)) is not None

    logits = torch.round(torch.randn(5, 4, 66, generator=generator) * 4) / 4
    logits[1] = float("-inf")
    logits[1, :, 3] = 0.5
    forced = torch.tensor([[-1, 64, -1, -1], [-1] * 4, [65, 65, -1, 7], [-1] * 4, [-1] * 4])
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.0, 0.9])
    top_k = torch.tensor([50, 5, 0, 3, 1])
    top_p = torch.tensor([0.95, 1.0, 0.6, 0.2, 0.5])
    fast = sampling.warp(logits, forced, temperature, top_k, top_p)
    monkeypatch.setattr(sampling, "ROW_KERNEL", False)
    slow = sampling.warp(logits, forced, temperature, top_k, top_p)
    assert torch.equal(fast, slow)


def test_a_steps_draw_keys_are_the_hosts_hashes_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The draw keys the row kernel makes in one call (on this project's
    machines) are ``codebook_keys`` of ``row_keys``, and of their
    ``redraw_keys``, bit for bit: for seeds of every size (negative ones and
    those past 32 bits too) and steps, for a table's first rows."""
    kernel = built_kernel()
    from wavecast.server.engines import sampling

    rng = np.random.default_rng(0)
    seed = np.concatenate(
        [[0, 1, 2**32 - 1, 2**32, 2**63 - 1, -1, -(2**63)], rng.integers(-(2**63), 2**63 - 1, 25)]
    )
    step = rng.integers(0, 2**40, len(seed))
    keys, again = kernel.draw_keys(seed, step, 8)
    rows = row_keys(seed, step)
    assert np.array_equal(keys, codebook_keys(rows, 8))
    assert np.array_equal(again, codebook_keys(redraw_keys(rows), 8))
    table = RowSampling(len(seed), "cpu")
    table.seed[:], table.step[:] = seed, step
    fast = table.draw_keys(20, 4), table.draw_and_redraw_keys(20, 4)
    monkeypatch.setattr(sampling, "ROW_KERNEL", False)
    slow = table.draw_keys(20, 4), table.draw_and_redraw_keys(20, 4)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[0], keys[:20, :4])
    assert all(np.array_equal(a, b) for a, b in zip(fast[1], slow[1], strict=True))


def test_greedy_and_top_1_take_the_argmax() -> None:
    logits = torch.randn(5, 4, 64)
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, **rows(5, temperature=0.0)), expected)
    assert torch.equal(sample(logits, **rows(5, top_k=1, seed=3)), expected)
    assert torch.equal(sample(logits, **rows(5, top_p=1e-6, seed=3)), expected)


def draws(logits: torch.Tensor, n: int, **values: float) -> torch.Tensor:
    """``n`` draws for one row: ``n`` rows with the same logits, seed and successive steps."""
    params = rows(n, **values)
    params["key"] = keys([int(values.get("seed", 0))] * n, list(range(n)))
    return sample(logits.expand(n, *logits.shape[1:]), **params)[:, 0]


def test_draws_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.125, 0.125]]]))
    counts = torch.bincount(draws(logits, 20000, seed=11), minlength=4).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.25, 0.125, 0.125]), atol=0.015)
    # Temperature flattens it.
    hot = torch.bincount(draws(logits, 20000, seed=11, temperature=100.0), minlength=4) / 20000
    assert float(hot.min()) > 0.22


def test_top_k_and_top_p_keep_what_audiocraft_keeps() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 50)
    probs = torch.softmax(logits, -1)[0, 0]
    order = torch.argsort(probs, descending=True)
    top5 = set(order[:5].tolist())
    assert set(draws(logits, 4000, top_k=5).tolist()) == top5
    # The nucleus: tokens while the mass before them is at most p.
    before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = set(order[before <= 0.6].tolist())
    seen = set(draws(logits, 4000, top_p=0.6).tolist())
    assert seen == nucleus and len(nucleus) > 1


def test_rows_do_not_depend_on_their_neighbours() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 4, 128)
    params = {
        "temperature": torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.9]),
        "top_k": torch.tensor([0, 10, 0, 250, 1, 0]),
        "top_p": torch.tensor([0.0, 0.0, 0.0, 0.9, 0.0, 0.5]),
        "key": keys([1, 2, 3, 4, 5, 6], [0, 9, 3, 100, 2, 1]),
    }
    together = sample(logits, **params)
    for i in range(6):
        alone = sample(logits[i : i + 1], **{k: v[i : i + 1] for k, v in params.items()})
        assert torch.equal(alone[0], together[i])
    # The table's scales, made as each row is set (as the engines pass them),
    # draw the same tokens.
    table = RowSampling(8, "cpu")
    for row in range(6):
        table.set_row(
            row,
            temperature=float(params["temperature"][row]),
            top_k=int(params["top_k"][row]),
            top_p=float(params["top_p"][row]),
            seed=row,
        )
    scale = table.grown(10).scale[:6]
    assert scale.shape == (6, 1, 1)
    assert scale.flatten().tolist() == pytest.approx([1.0, 0.7, 1.0, 1.3, 1.0, 0.9])
    assert torch.equal(sample(logits, **params, scale=scale), together)


@pytest.mark.parametrize("vocab", [None, 64])
def test_rows_set_together_are_the_rows_set_one_by_one(vocab: int | None) -> None:
    """A crowd's rows go in one ``set_rows``: every table (the device's
    parameters, the warpers, the host's seeds, steps and plans) holds what
    ``set_row`` row by row leaves."""
    rows = [5, 0, 3, 6]
    params = {
        "temperature": [0.7, 0.0, 1.3, 1.0],
        "top_k": [10, 0, 250, 0],
        "top_p": [0.0, 0.0, 0.9, 0.5],
        "seed": [11, 12, 13, 2**62],
    }
    one_by_one, together = RowSampling(8, "cpu", vocab), RowSampling(8, "cpu", vocab)
    for table in (one_by_one, together):
        table.set_row(1, temperature=0.5, top_k=3, top_p=0.0, seed=7, step=4)  # kept
    for i, row in enumerate(rows):
        one_by_one.set_row(row, **{name: values[i] for name, values in params.items()})
    together.set_rows(rows, **params)
    for name in ("temperature", "top_k", "top_p", "scale"):
        assert torch.equal(getattr(together, name), getattr(one_by_one, name)), name
    if vocab is not None:
        assert together.warpers is not None and one_by_one.warpers is not None
        for mine, theirs in zip(together.warpers, one_by_one.warpers, strict=True):
            assert torch.equal(mine, theirs)
    for name in ("seed", "step", "wants", "nucleus", "greedy"):
        assert np.array_equal(getattr(together, name), getattr(one_by_one, name)), name
    flagged = np.ones(8, dtype=bool)
    assert together.plan(flagged, 64) == one_by_one.plan(flagged, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampling_traces_as_one_graph(dtype: torch.dtype) -> None:
    logits = torch.randn(3, 4, 64).to(dtype)
    params = rows(3, top_k=5, seed=2)
    compiled = torch.compile(sample, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits, **params), sample(logits, **params))


def test_fewer_candidates_draw_the_same_tokens() -> None:
    """Where no row needs the whole vocabulary, the draw over the max(top_k) most
    likely tokens equals the draw over all of them, row by row."""
    torch.manual_seed(2)
    logits = torch.randn(4, 4, 512)
    params = {
        "temperature": torch.tensor([1.0, 0.8, 0.0, 1.2]),
        "top_k": torch.tensor([250, 5, 250, 40]),
        "top_p": torch.zeros(4),
    }
    for step in range(20):
        params["key"] = keys([7, 8, 9, 10], [step] * 4)
        everything = sample(logits, **params)
        assert torch.equal(sample(logits, **params, candidates=250), everything)
        alone = sample(logits[1:2], **{k: v[1:2] for k, v in params.items()}, candidates=5)
        assert torch.equal(alone[0], everything[1])
        # Where no row uses top-p, skipping the nucleus's operations draws the same.
        assert torch.equal(sample(logits, **params, nucleus=False), everything)
        assert torch.equal(sample(logits, **params, candidates=250, nucleus=False), everything)


def test_candidates_in_no_order_draw_the_same_tokens() -> None:
    """Where every sampled row keeps all the candidates (one top-k for all), the
    draw over them unsorted, and without the greedy argmax where no row is
    greedy, equals the ranked one, step after step; the plan asks for ranking
    only where some row keeps fewer."""
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 1024) * 3
    params = rows(3, top_k=250, temperature=0.9)
    for step in range(30):
        params["key"] = keys([5, 6, 7], [step] * 3)
        ranked = sample(logits, **params, candidates=250, nucleus=False)
        assert torch.equal(
            sample(logits, **params, candidates=250, nucleus=False, ranked=False, greedy=False),
            ranked,
        )
    table = RowSampling(4, "cpu")
    for row in range(3):
        table.set_row(row, temperature=0.9, top_k=250, top_p=0.0, seed=row)
    plan = table.plan(np.array([True, True, True]), 1024)
    assert (plan.candidates, plan.ranked, plan.greedy, plan.nucleus) == (250, False, False, False)
    table.set_row(3, temperature=0.0, top_k=250, top_p=0.0, seed=3)  # greedy: any top-k
    assert table.plan(np.ones(4, bool), 1024) == DrawPlan(250, False, False, True)
    table.set_row(3, temperature=1.0, top_k=1, top_p=0.0, seed=3)  # sampled top-1: the max
    assert table.plan(np.ones(4, bool), 1024) == DrawPlan(250, False, True, False)
    assert not table.plan(np.array([True, True, True, False]), 1024).ranked  # 3 not stepped
    table.set_row(3, temperature=1.0, top_k=0, top_p=0.0, seed=3)  # the whole vocabulary
    assert table.plan(np.ones(4, bool), 1024) == DrawPlan(1024, False, True, False)
    table.set_row(3, temperature=1.0, top_k=0, top_p=0.5, seed=3)
    assert table.plan(np.ones(4, bool), 1024) == DrawPlan(1024, True, True, False)
    for row in range(3):
        table.set_row(row, temperature=1.0, top_k=0, top_p=0.0, seed=row)
    table.set_row(3, temperature=1.0, top_k=0, top_p=0.0, seed=3)
    assert table.plan(np.ones(4, bool), 1024) == DrawPlan(1024, False, False, False)


def test_finite_rows() -> None:
    scores = torch.zeros(5, 4, 64)
    scores[1, 2, 3] = float("nan")
    scores[2, 0, 0] = float("inf")
    scores[3, 3, 63] = float("-inf")
    assert finite_rows(scores).tolist() == [True, False, False, False, True]
    # Half precision sums in float32: large finite scores are not taken for overflow.
    big = torch.full((2, 4, 1024), 60000.0, dtype=torch.float16)
    big[1, 0, 0] = float("nan")
    assert finite_rows(big).tolist() == [True, False]


def test_the_candidates_a_batch_needs() -> None:
    table = RowSampling(4, "cpu")
    table.set_row(0, temperature=1.0, top_k=250, top_p=0.0, seed=1)
    table.set_row(1, temperature=0.0, top_k=0, top_p=0.0, seed=1)  # greedy
    assert candidates_for(table.wants[:2], 2048) == 250
    assert candidates_for(table.wants[:2], 100) == 100
    assert candidates_for(table.wants[1:2], 2048) == 1
    assert not table.nucleus[:2].any()
    table.set_row(2, temperature=1.0, top_k=250, top_p=0.9, seed=1)
    assert candidates_for(table.wants[:3], 2048) == 2048
    assert table.nucleus.tolist() == [False, False, True, False]
    table.set_row(3, temperature=1.0, top_k=0, top_p=0.0, seed=1)
    assert candidates_for(table.wants[3:], 2048) == 2048
    grown = table.grown(8)
    assert grown.seed.shape == (8,) and list(grown.wants[:4]) == list(table.wants)
