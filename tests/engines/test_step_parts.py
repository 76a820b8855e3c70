"""The pieces a decode step is made of, taken once instead of in every layer:
the same floats as the operations they stand for."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import built_kernel
from torch.nn import functional as F

from wavecast.server.engines import dense as dense_module
from wavecast.server.engines import rowkernel
from wavecast.server.engines.dense import Dense, pack
from wavecast.server.engines.kv import LayerMask, StaticKV
from wavecast.server.engines.rowkernel import random_units


@pytest.mark.parametrize("bias", [False, True])
def test_a_dense_layer_is_f_linear_bit_for_bit(bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    b = torch.randn(24) if bias else None
    dense = Dense(weight, b)
    rows = torch.randn(5, 16)
    strided = torch.randn(5, 3, 16)[:, -1]  # (a prefill's last positions: a view)
    for x in (rows, strided):
        assert torch.equal(dense.rows(x), F.linear(x, weight, b))
    positions = torch.randn(5, 3, 16)
    assert torch.equal(dense(positions), F.linear(positions, weight, b))


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_dense_layer_multiplies_a_few_rows_by_its_packed_copy(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The row kernel turned off: the next tests take it.)"""
    monkeypatch.setattr(dense_module, "KERNEL_ROWS", 0)
    torch.manual_seed(0)
    weight = torch.randn(1024, 512) * 0.05  # as large as PACKED_FROM
    b = torch.randn(1024) if bias else None
    dense = Dense(weight, b)
    assert pack([dense]) == dense_module.Packing(1, weight.numel() * 4, no_kernel="turned off")
    assert dense.packed is not None
    x = torch.randn(dense_module.PACKED_ROWS + 1, 512)
    packed = torch.ops.mkldnn._linear_pointwise(x, dense.packed, b, "none", [], "")
    for rows in (2, 5, dense_module.PACKED_ROWS):
        got = dense.rows(x[:rows])
        assert torch.equal(got, packed[:rows])  # each row the same whatever the others
        assert torch.allclose(got, F.linear(x[:rows], weight, b), rtol=0, atol=1e-5)
    # A prefill's positions, as many (a view, as a last position's rows are).
    positions = torch.randn(3, 11, 512)[:, :-1]
    expected = torch.ops.mkldnn._linear_pointwise(positions, dense.packed, b, "none", [], "")
    assert torch.equal(dense(positions), expected)
    assert torch.allclose(dense(positions), F.linear(positions, weight, b), rtol=0, atol=1e-5)
    # One row (a matrix-vector product), more rows than PACKED_ROWS, and anything
    # under autocast: the library's product, as before.
    more = torch.randn(3, 11, 512)
    for some in (x[:1], x):
        assert torch.equal(dense.rows(some), F.linear(some, weight, b))
        assert torch.equal(dense(some), F.linear(some, weight, b))
    assert torch.equal(dense(more), F.linear(more, weight, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(dense.rows(x[:4]), F.linear(x[:4], weight, b))
        assert torch.equal(dense(positions), F.linear(positions, weight, b))


def test_only_large_float32_weights_on_a_cpu_are_packed_where_memory_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dense_module, "KERNEL_ROWS", 0)
    large = torch.randn(1024, 512)
    small = Dense(torch.randn(1024, 511))
    half = Dense(large.bfloat16())
    meta = Dense(large.to("meta"))
    none = pack([small, half, meta])
    assert none == dense_module.Packing(0, 0)
    assert str(none) == "none packed (only large float32 weights on a CPU are)"
    assert small.packed is half.packed is meta.packed is None
    # The copies may take half of what is available, at most; short of that,
    # oneDNN multiplies the weights as they lie (not a view it cannot read so).
    first, second = Dense(large), Dense(large.clone())
    strided = Dense(torch.randn(1024, 1025)[:, 1:])
    need = 2 * large.numel() * 4
    roomy = pack([Dense(large), Dense(large)], available=lambda: 2 * need)
    assert roomy == dense_module.Packing(2, need, no_kernel="turned off")
    assert (
        str(roomy)
        == "no row kernel: turned off; 2 weights packed for steps of 2-32 rows (4 MiB more)"
    )
    need += strided.weight.numel() * 4
    short = pack([first, second, strided], available=lambda: 2 * need - 1)
    assert (short.weights, short.bytes, short.direct) == (0, need, 2) and short.skipped
    for dense in (first, second):
        assert dense.packed is not None and dense.packed.data_ptr() == dense.weight.data_ptr()
    assert strided.packed is None
    said = str(short)
    assert said.startswith("no row kernel: turned off; weights not packed: the copies would take")
    assert said.endswith("; 2 weights multiplied by oneDNN as they lie for steps of 3-32 rows")
    unknown = Dense(large)
    assert pack([unknown], available=lambda: None).direct == 1
    assert unknown.packed is not None and unknown.packed.shape == large.shape


@pytest.mark.parametrize("bias", [False, True])
def test_weights_left_as_they_lie_are_multiplied_by_onednn_from_three_rows(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where memory holds no copies: from ``DIRECT_ROWS`` rows to ``PACKED_ROWS``
    the product is oneDNN's over the weight itself, whose floats are the packed
    copy's; one and two rows, and more, keep the library's product. (The row
    kernel turned off.)"""
    monkeypatch.setattr(dense_module, "KERNEL_ROWS", 0)
    torch.manual_seed(0)
    weight = torch.randn(1024, 512) * 0.05
    b = torch.randn(1024) if bias else None
    direct, copied = Dense(weight, b), Dense(weight, b)
    assert pack([direct], available=lambda: 0).direct == 1
    assert pack([copied]).weights == 1
    assert direct.fewest == dense_module.DIRECT_ROWS == 3
    x = torch.randn(dense_module.PACKED_ROWS + 1, 512)
    for rows in (3, 7, dense_module.PACKED_ROWS):
        got = direct.rows(x[:rows])
        assert torch.equal(got, copied.rows(x[:rows]))
        assert torch.allclose(got, F.linear(x[:rows], weight, b), rtol=0, atol=1e-5)
    positions = torch.randn(2, 5, 512)
    assert torch.equal(direct(positions), copied(positions))
    for some in (x[:1], x[:2], x):
        assert torch.equal(direct.rows(some), F.linear(some, weight, b))
        assert torch.equal(direct(some), F.linear(some, weight, b))
    assert torch.equal(direct(positions[:1, :2]), F.linear(positions[:1, :2], weight, b))


def on_three_threads(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``run()`` on three of torch's threads, every kernel call split over them
    (however little its work)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(rowkernel, "PER_THREAD", 1)
    monkeypatch.setattr(rowkernel, "PER_THREAD_PRODUCT", 1)
    try:
        torch.set_num_threads(3)
        return run()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("outputs", "size"), [(37, 203), (64, 512), (1, 8), (6, 3), (21, 1024), (13, 1100)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_row_kernel_is_a_linear_product_each_row_alone_bit_for_bit(
    outputs: int, size: int, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any shape (outputs odd or even, inputs not a multiple of the lanes, rows
    of the weight fetched ahead or not), any number of rows (blocks of one to
    eight, then again), a row at any place of the call, views and prefills'
    positions, one thread or several: each row's result is the same bits as
    when it is alone, and float64's to rounding."""
    kernel = built_kernel()
    torch.manual_seed(0)
    weight = torch.randn(outputs, size)
    b = torch.randn(outputs) if bias else None
    x = torch.randn(19, size)
    exact = (x.double() @ weight.double().T + (0 if b is None else b.double())).float()
    alone = torch.cat([kernel.product(weight, b, x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(alone, exact, rtol=0, atol=1e-5 * exact.abs().max().item())
    for start, stop in [(0, 2), (3, 7), (0, 8), (5, 14), (0, 19)]:
        assert torch.equal(kernel.product(weight, b, x[start:stop]), alone[start:stop])
    strided = torch.cat([x[:5, None], torch.randn(5, 2, size)], 1)[:, 0]  # rows 3 * size apart
    assert not strided.is_contiguous()
    assert torch.equal(kernel.product(weight, b, strided), alone[:5])
    positions = x[:18].view(3, 6, size)
    assert torch.equal(kernel.product(weight, b, positions), alone[:18].view(3, 6, outputs))
    assert kernel.product(weight, b, x[:0]).shape == (0, outputs)
    with pytest.raises(TypeError, match="float32"):
        kernel.product(weight, b, x.double())
    assert torch.equal(on_three_threads(monkeypatch, lambda: kernel.product(weight, b, x)), alone)


def test_the_kernels_threads_serve_two_callers_at_once_and_sleep_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernels' calls split over threads kept for them (started once, not a
    call). Two threads calling at once (one of them starts threads of its own
    while the other has the kept ones) get their products right, call after
    call; once no call comes, the kept threads sleep: the process takes no CPU
    time while it waits."""
    kernel = built_kernel()
    monkeypatch.setattr(rowkernel, "PER_THREAD_PRODUCT", 1)
    torch.manual_seed(0)
    weights = [torch.randn(61, 300), torch.randn(16, 1030)]
    xs = [torch.randn(8, 300), torch.randn(3, 1030)]
    wants = [kernel.product(w, None, x) for w, x in zip(weights, xs, strict=True)]
    wrong: list[int] = []

    def calls(which: int) -> None:
        torch.set_num_threads(4)  # (each thread's own setting)
        for _ in range(300):
            if not torch.equal(kernel.product(weights[which], None, xs[which]), wants[which]):
                wrong.append(which)

    threads = [threading.Thread(target=calls, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    time.sleep(0.2)  # (the kept threads spin a little after a call, then sleep)
    before = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - before < 0.1  # (a thread spinning on: 0.3)


def test_a_forked_child_multiplies_without_its_parents_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child forked from a process whose calls started kept threads has none
    of them: its calls start threads of their own, and return."""
    kernel = built_kernel()
    torch.manual_seed(0)
    weight, x = torch.randn(40, 64), torch.randn(4, 64)
    want = kernel.product(weight, None, x)
    on_three_threads(monkeypatch, lambda: kernel.product(weight, None, x))  # (threads kept)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 if right (the parent waits with a time limit)
        try:
            got = on_three_threads(monkeypatch, lambda: kernel.product(weight, None, x))
            os._exit(0 if torch.equal(got, want) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's call did not return")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize(("outputs", "size"), [(37, 203), (64, 512), (6, 3), (23, 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_row_kernel_multiplies_bfloat16_each_row_alone_bit_for_bit(
    outputs: int, size: int, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model run in bfloat16: weight, bias and rows in bfloat16, the products
    and sums in float32, each output rounded to bfloat16; float64's product of
    the same values to that rounding; each row's result the same bits alone or
    beside others, on one thread or several; float32 and bfloat16 not mixed."""
    kernel = built_kernel()
    torch.manual_seed(0)
    weight = torch.randn(outputs, size).bfloat16()
    b = torch.randn(outputs).bfloat16() if bias else None
    x = torch.randn(9, size).bfloat16()
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    alone = torch.cat([kernel.product(weight, b, x[i : i + 1]) for i in range(len(x))])
    assert alone.dtype == torch.bfloat16
    assert torch.allclose(alone.double(), exact, rtol=2**-8, atol=1e-6 * exact.abs().max().item())
    for rows in range(2, 10):
        assert torch.equal(kernel.product(weight, b, x[:rows]), alone[:rows])
    positions = x[:8].view(2, 4, size)
    assert torch.equal(kernel.product(weight, b, positions), alone[:8].view(2, 4, outputs))
    assert torch.equal(on_three_threads(monkeypatch, lambda: kernel.product(weight, b, x)), alone)
    with pytest.raises(TypeError, match=r"must be torch\.bfloat16"):
        kernel.product(weight.float(), None, x)


def test_bfloat16_layers_take_the_row_kernel_for_a_few_rows() -> None:
    """A large bfloat16 weight multiplies one to ``HALF_ROWS`` rows by the row
    kernel, more by the library's product; small ones stay the library's."""
    kernel = built_kernel()
    torch.manual_seed(0)
    weight, b = torch.randn(1024, 512).bfloat16(), torch.randn(1024).bfloat16()
    small = Dense(torch.randn(64, 512).bfloat16())
    dense = Dense(weight, b)
    packing = pack([dense, small])
    assert (packing.halves, packing.kernel, packing.weights, packing.direct) == (1, 0, 0, 0)
    most = dense_module.HALF_ROWS
    assert (
        str(packing)
        == f"1 bfloat16 weights multiplied by the row kernel for steps of 1-{most} rows"
    )
    assert small.kernel is None
    x = torch.randn(most + 3, 512).bfloat16()
    for rows in range(1, len(x) + 1):
        way = kernel.product(weight, b, x[:rows]) if rows <= most else F.linear(x[:rows], weight, b)
        assert torch.equal(dense.rows(x[:rows]), way)
        assert torch.equal(dense(x[:rows]), way)


def test_a_build_is_kept_for_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's library is compiled once a machine, not once a process (a
    server's start): a build is kept in ``WAVECAST_CACHE_DIR`` under a name from
    its source, command and compiler, and loaded from there; one that is not a
    library is built again in its place; an empty ``WAVECAST_CACHE_DIR`` keeps
    none, and a folder that cannot be made keeps none without failing. (A small
    source stands for the kernel's: the same path, compiled in milliseconds.)"""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or rowkernel.built() is None:
        pytest.skip("no C compiler or no x86-64 CPU with AVX2: no row kernel here")
    compiles: list[list[str]] = []
    run = subprocess.run

    def counted(command: list[str], **kwargs: Any) -> Any:
        if "-o" in command:
            compiles.append(command)
        return run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    monkeypatch.setattr(rowkernel, "SOURCE", "int answer(void) { return 42; }\n")
    monkeypatch.setenv("WAVECAST_CACHE_DIR", str(tmp_path / "cache"))

    def answer() -> int:
        library = rowkernel._build(compiler)
        assert not isinstance(library, str), library
        return int(library.answer())

    assert answer() == 42 and len(compiles) == 1
    [kept] = (tmp_path / "cache").iterdir()  # (no part of a copy left beside it)
    assert kept.name.startswith("rows-") and kept.suffix == ".so"
    assert answer() == 42 and len(compiles) == 1  # loaded, not compiled
    # (A loaded library's file is never written in place: another folder's.)
    spoiled = tmp_path / "spoiled" / kept.name
    spoiled.parent.mkdir()
    spoiled.write_bytes(b"not a library")
    monkeypatch.setenv("WAVECAST_CACHE_DIR", str(spoiled.parent))
    assert answer() == 42 and len(compiles) == 2
    assert [spoiled] == list(spoiled.parent.iterdir())
    assert spoiled.read_bytes() == kept.read_bytes()
    # Another source (or command, or compiler): another build.
    monkeypatch.setattr(rowkernel, "SOURCE", "int answer(void) { return 7; }\n")
    assert answer() == 7 and len(compiles) == 3
    assert len(list(spoiled.parent.iterdir())) == 2
    monkeypatch.setenv("WAVECAST_CACHE_DIR", "")
    assert rowkernel.cache_folder() is None
    assert answer() == 7 and len(compiles) == 4
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("WAVECAST_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert answer() == 7 and answer() == 7 and len(compiles) == 6
    monkeypatch.delenv("WAVECAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rowkernel.cache_folder() == tmp_path / "xdg" / "wavecast"


def test_the_wide_build_gives_the_plain_builds_bits() -> None:
    """Where the CPU has AVX-512 the server runs the row kernel's wide build
    (``load``), whose products go by larger blocks: every output is summed in
    the same order as by the plain build, so the two give the same bits, for
    every block of one to eight rows and the weight's rows left after the
    blocks, over float32 and bfloat16 weights; the attention is the plain
    build's; and the codec's calls, which the wide build makes over vectors of
    sixteen samples where the plain one's hold eight (the convolutions, a
    transposed one's phases stored in place among them, ELU, Snake, a whole
    residual unit), give the same bits too: for every length of a last block,
    and Snake's arguments past the polynomial's range beside others in one
    vector."""
    kernel = built_kernel()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert not kernel.wide
        pytest.skip("no AVX-512 on this CPU: the plain build alone runs here")
    plain = rowkernel.build(wide=False)
    assert kernel.wide and isinstance(plain, rowkernel.RowKernel) and not plain.wide
    torch.manual_seed(0)
    for outputs, size in [(37, 203), (64, 512), (1, 8), (6, 3), (23, 1100)]:
        weight, b = torch.randn(outputs, size), torch.randn(outputs)
        x = torch.randn(19, size)
        for rows in range(1, 20):
            assert torch.equal(
                kernel.product(weight, b, x[:rows]), plain.product(weight, b, x[:rows])
            )
            assert torch.equal(
                kernel.product(weight, None, x[-rows:]), plain.product(weight, None, x[-rows:])
            )
    for outputs, size in [(37, 203), (23, 1100), (6, 3), (100, 64)]:
        weight, b = torch.randn(outputs, size).bfloat16(), torch.randn(outputs).bfloat16()
        x = torch.randn(19, size).bfloat16()
        for rows in range(1, 20):
            assert torch.equal(
                kernel.product(weight, b, x[:rows]), plain.product(weight, b, x[:rows])
            )
            assert torch.equal(
                kernel.product(weight, None, x[-rows:]), plain.product(weight, None, x[-rows:])
            )
    q, k, v = torch.randn(5, 4, 1, 32), torch.randn(5, 2, 40, 32), torch.randn(5, 2, 40, 32)
    mask = torch.zeros(5, 1, 1, 40)
    mask[..., 30:] = float("-inf")
    assert torch.equal(kernel.attend(q, k, v, mask), plain.attend(q, k, v, mask))
    x = torch.randn(2, 5, 300)
    weight, b = torch.randn(3, 5, 7), torch.randn(3)
    assert torch.equal(kernel.conv(x, weight, b, 2), plain.conv(x, weight, b, 2))
    for length in (1, 7, 8, 9, 15, 16, 17, 40, 129, 300):
        for outputs, phases in [(1, 1), (2, 1), (3, 1), (5, 1), (4, 2), (6, 3), (8, 4), (16, 8)]:
            weight, b = torch.randn(outputs, 5, 2), torch.randn(outputs)
            got = kernel.conv(x[..., : length + 1], weight, b, phases=phases)
            assert torch.equal(got, plain.conv(x[..., : length + 1], weight, b, phases=phases))
        alpha = torch.rand(1, 5, 1) + 0.1
        wild = x[..., :length].clone()
        wild[0, 0, 0] = 1e5  # (the C library's sine, its vector's others the polynomial's)
        assert torch.equal(
            kernel.snake(wild, alpha, alpha.reciprocal()),
            plain.snake(wild, alpha, alpha.reciprocal()),
        )
        assert torch.equal(kernel.elu(x[..., :length], 0.7), plain.elu(x[..., :length], 0.7))
    for channels, hidden, taps, elu in [(1, 1, 7, False), (4, 4, 7, False), (8, 4, 3, True)]:
        units = random_units(channels, hidden, taps, 3, elu)
        span = (taps - 1) * 3
        for length in (5, 16, 333, 3000):
            y = torch.randn(3, channels, length) * 3
            buffer, waiting = torch.randn(3, channels, span), torch.randn(3, channels, 9)
            ours = kernel.residual_unit(y, buffer, waiting, *units)
            theirs = plain.residual_unit(y, buffer, waiting, *units)
            assert ours is not None and theirs is not None
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize(
    ("outputs", "channels", "taps", "dilation"),
    [
        (1, 4, 7, 1),
        (2, 4, 3, 3),
        (3, 5, 1, 1),
        (4, 8, 3, 1),
        (6, 3, 2, 1),
        (7, 3, 2, 2),
        (16, 2, 3, 9),
        (32, 5, 2, 1),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_convolution_kernel_is_the_librarys_each_sample_the_same_wherever_it_lies(
    outputs: int,
    channels: int,
    taps: int,
    dilation: int,
    bias: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every block width (one, two, three outputs at a time, four and what is
    left), dilations, an input that is a view, lengths that end inside a block:
    float64's convolution to rounding, and each output sample the same bits
    whatever stream of the call it is in and wherever in time the call starts
    (a stream's chunks do not change its audio), on one thread or several; as
    a transposed convolution's phases, the same samples, interleaved (in
    place from the sums: 2, or a multiple of 4; by way of a buffer: others)."""
    kernel = built_kernel()
    torch.manual_seed(0)
    reach = (taps - 1) * dilation
    x = torch.randn(5, channels + 2, 203 + reach)[:, 1:-1]  # a view: streams and channels apart
    weight = torch.randn(outputs, channels, taps)
    b = torch.randn(outputs) if bias else None
    got = kernel.conv(x, weight, b, dilation)
    exact = F.conv1d(
        x.double(), weight.double(), None if b is None else b.double(), dilation=dilation
    )
    assert got.shape == exact.shape == (5, outputs, 203)
    assert torch.allclose(got, exact.float(), rtol=0, atol=1e-5 * exact.abs().max().item())
    for stream in range(5):
        one = slice(stream, stream + 1)
        assert torch.equal(kernel.conv(x[one], weight, b, dilation), got[one])
    for start in (1, 5, 17, 64, 202):
        assert torch.equal(kernel.conv(x[..., start:], weight, b, dilation), got[..., start:])
    assert torch.equal(kernel.conv(x[:2, :, : reach + 9], weight, b, dilation), got[:2, :, :9])
    assert kernel.conv(x[..., :reach], weight, b, dilation).shape == (5, outputs, 0)
    for phases in (2, 3, 4, 7, 8, 16):  # a transposed convolution's phases, interleaved
        if outputs % phases == 0:
            phased = got.view(5, outputs // phases, phases, 203).transpose(2, 3)
            assert torch.equal(
                kernel.conv(x, weight, b, dilation, phases),
                phased.reshape(5, outputs // phases, 203 * phases),
            )
    with pytest.raises(ValueError, match="phases"):
        kernel.conv(x, weight, b, dilation, outputs + 1)
    threaded = on_three_threads(monkeypatch, lambda: kernel.conv(x, weight, b, dilation))
    assert torch.equal(threaded, got)
    with pytest.raises(TypeError, match="float32"):
        kernel.conv(x.double(), weight, b, dilation)
    with pytest.raises(ValueError, match=r"weight \[O, C, U\]"):
        kernel.conv(x[:, 1:], weight, b, dilation)


@pytest.mark.parametrize(
    ("heads", "groups", "size"), [(2, 2, 8), (2, 2, 16), (3, 3, 24), (16, 16, 64), (6, 2, 128)]
)
def test_the_attention_kernel_is_the_library_attention_each_row_alone_bit_for_bit(
    heads: int, groups: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One query a row against views of a cache (as a step's are: the query a
    view of its projections, the keys and values the first positions of a
    longer table), heads in groups or not, masks leaving out the positions past
    each row's length and some within: float64's attention to rounding, the
    library's within 1e-6, each row's result the same bits alone or beside
    others, over any span that holds its positions (a step's span follows its
    longest row), on one thread or several; a row with nothing to attend to
    gives zeros, as the library's does."""
    kernel = built_kernel()
    torch.manual_seed(0)
    rows, span = 5, 37
    q = torch.randn(rows, 3, heads, 1, size)[:, 0]  # a view: rows 3 * heads * size apart
    table = torch.randn(2, rows, groups, 50, size)
    k, v = table[0, :, :, :span], table[1, :, :, :span]
    keep = torch.arange(span) < torch.tensor([1, 12, 37, 20, 0])[:, None]
    keep[3, 4:9] = False
    mask = torch.zeros(rows, 1, 1, span).masked_fill_(~keep.view(rows, 1, 1, span), float("-inf"))
    table[:, 3, :, 4:9] = float("nan")  # (masked positions are not read)
    got = kernel.attend(q, k, v, mask)
    assert got.shape == (rows, heads, 1, size) and got.is_contiguous()
    assert torch.equal(got[4], torch.zeros(heads, 1, size))
    clean = torch.where(keep.view(rows, 1, span, 1), table[:, :, :, :span], 0)
    exact = F.scaled_dot_product_attention(
        q.double(), clean[0].double(), clean[1].double(), attn_mask=mask.double(), enable_gqa=True
    )
    assert torch.allclose(got, exact.float(), rtol=0, atol=1e-6)
    library = F.scaled_dot_product_attention(q, clean[0], clean[1], attn_mask=mask, enable_gqa=True)
    assert torch.allclose(got, library, rtol=0, atol=1e-6)
    for row in range(rows):
        one = slice(row, row + 1)
        assert torch.equal(kernel.attend(q[one], k[one], v[one], mask[one]), got[one])
    for shorter in range(12, span):  # row 1 attends to its first 12 positions
        k1, v1, mask1 = k[1:2, :, :shorter], v[1:2, :, :shorter], mask[1:2, ..., :shorter]
        assert torch.equal(kernel.attend(q[1:2], k1, v1, mask1), got[1:2]), shorter
    assert torch.equal(on_three_threads(monkeypatch, lambda: kernel.attend(q, k, v, mask)), got)
    assert kernel.attend(q[:0], k[:0], v[:0], mask[:0]).shape == (0, heads, 1, size)
    with pytest.raises(TypeError, match="float32"):
        kernel.attend(q, k.double(), v, mask)
    with pytest.raises(ValueError, match="one query a row"):
        kernel.attend(q[..., :-1], k[..., :-1], v[..., :-1], mask)  # heads not of 8s
    with pytest.raises(ValueError, match="one query a row"):
        kernel.attend(torch.randn(rows, heads, 2, size), k, v, mask)


def test_steps_attend_with_the_kernel_where_it_suits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 on a CPU, heads of a multiple of 8 up to ``MOST_HEAD`` (the test
    models' 16 included), the kernel turned on; else the library's."""
    kernel = built_kernel()
    cpu = torch.device("cpu")
    for head in (8, 16, 64, 128, rowkernel.MOST_HEAD):
        assert dense_module.step_attention(cpu, torch.float32, head) == kernel.attend
    for head in (60, rowkernel.MOST_HEAD + 8):
        assert dense_module.step_attention(cpu, torch.float32, head) is None
    assert dense_module.step_attention(cpu, torch.bfloat16, 64) is None
    assert dense_module.step_attention(torch.device("meta"), torch.float32, 64) is None
    monkeypatch.setattr(dense_module, "KERNEL_ROWS", 0)
    assert dense_module.step_attention(cpu, torch.float32, 64) is None


@pytest.mark.parametrize("room", [True, False])
def test_packed_layers_take_the_row_kernel_for_up_to_eight_rows(room: bool) -> None:
    """With the row kernel, a packed layer multiplies one to ``KERNEL_ROWS``
    rows by it (a step's rows, a prefill's positions), then oneDNN's product
    (its copy, or the weight as it lies) up to ``PACKED_ROWS``, then the
    library's; under autocast, the library's."""
    kernel = built_kernel()
    torch.manual_seed(0)
    weight = torch.randn(1024, 512) * 0.05
    b = torch.randn(1024)
    dense, onednn = Dense(weight, b), Dense(weight, b)
    packing = pack([dense], available=lambda: 100 * 2**20 if room else 0)
    assert (packing.weights, packing.direct, packing.kernel) == (int(room), int(not room), 1)
    built = " (its wide build)" if kernel.wide else ""
    said = f"1 weights multiplied by the row kernel{built} for steps of 1-8 rows; "
    said += (
        "1 weights packed for steps of 9-32 rows (2 MiB more)"
        if room
        else "weights not packed: the copies would take 2 MiB, 0 MiB available; "
        "1 weights multiplied by oneDNN as they lie for steps of 9-32 rows"
    )
    assert str(packing) == said
    onednn.packed, onednn.fewest = dense.packed, dense.fewest  # (oneDNN's alone)
    onednn._route()
    x = torch.randn(dense_module.PACKED_ROWS + 1, 512)
    for rows in (1, 2, 5, 8):
        assert torch.equal(dense.rows(x[:rows]), kernel.product(weight, b, x[:rows]))
    positions = torch.randn(2, 4, 512)
    assert torch.equal(dense(positions), kernel.product(weight, b, positions))
    for rows in (9, dense_module.PACKED_ROWS):
        assert torch.equal(dense.rows(x[:rows]), onednn.rows(x[:rows]))
    assert torch.equal(dense.rows(x), F.linear(x, weight, b))
    prefill = torch.randn(3, 11, 512)[:, 1:]  # 30 positions
    assert torch.equal(dense(prefill), onednn(prefill))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(dense.rows(x[:4]), F.linear(x[:4], weight, b))
    # A bias that is a strided view (the kernel reads it as contiguous floats).
    strided = torch.stack([b, torch.randn(1024)], 1)[:, 0]
    assert not strided.is_contiguous()
    other = Dense(weight, strided)
    assert pack([other], available=lambda: 0).kernel == 1
    assert torch.equal(other.rows(x[:3]), kernel.product(weight, b, x[:3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_mask_attends_as_the_boolean_one(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 2, 1, 8, dtype=dtype)
    k, v = torch.randn(3, 2, 10, 8, dtype=dtype), torch.randn(3, 2, 10, 8, dtype=dtype)
    lengths = torch.tensor([1, 6, 10])  # one position, some, all of them
    keep = (torch.arange(10) < lengths[:, None]).view(3, 1, 1, 10)
    mask = LayerMask(keep)
    additive = mask.for_(q)
    assert additive.dtype == dtype
    assert mask.for_(q) is additive  # made once, for every layer
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_the_cache_views_follow_the_cache_as_it_grows() -> None:
    kv = StaticKV(2, 2, 4, rows=2, length=8, device="cpu", dtype=torch.float32)
    keys, values = kv.layers(2, 4)[1]
    assert keys.shape == values.shape == (2, 2, 4, 4)
    assert kv.layers(2, 4)[1][0] is keys  # made once per shape
    key, value = torch.ones(2, 2, 1, 4), torch.full((2, 2, 1, 4), 2.0)
    kv.step_writer(torch.tensor([3, 0]))(1, key, value)
    assert torch.equal(keys[0, :, 3], key[0, :, 0]) and torch.equal(values[1, :, 0], value[1, :, 0])
    kv.grow(rows=3, length=12)  # the tensors move: the views are made again
    grown, _ = kv.layers(2, 4)[1]
    assert grown is not keys and grown.data_ptr() == kv.k[1].data_ptr()
    assert torch.equal(grown, keys)  # what was stored came along
    kv.step_writer(torch.tensor([5, 5]))(1, 3 * key, value)
    assert torch.equal(kv.layers(4, 8)[1][0][:2, :, 5], 3 * key[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_writes_a_layers_keys_and_values_side_by_side_as_one_by_one(
    dtype: torch.dtype,
) -> None:
    """``step_pair_writer`` (a joint projection's key and value, side by side,
    in one write) stores what ``step_writer`` stores from them apart, in the
    keys' and values' own tensors (still contiguous), before and after the
    cache grows; other rows and positions are untouched."""
    made = [StaticKV(3, 2, 8, rows=4, length=6, device="cpu", dtype=dtype) for _ in range(2)]
    for grown in (False, True):
        if grown:
            for kv in made:
                kv.grow(rows=5, length=9)
        positions = torch.tensor([2, 0, 5])
        pair = torch.randn(3, 2, 2, 1, 8)  # [R, (key, value), H, 1, d]
        made[0].step_pair_writer(positions)(1, pair)
        made[1].step_writer(positions)(1, pair[:, 0], pair[:, 1])
        joint, apart = made
        assert torch.equal(joint.k, apart.k) and torch.equal(joint.v, apart.v)
        assert joint.k.is_contiguous() and joint.v.is_contiguous()
        assert torch.equal(joint.k[1, 0, :, 2], pair[0, 0, :, 0].to(dtype))
        assert torch.equal(joint.v[1, 2, :, 5], pair[2, 1, :, 0].to(dtype))
        assert int(joint.k[0].count_nonzero()) == 0 and int(joint.v[2].count_nonzero()) == 0


def test_a_steps_keys_and_values_by_the_row_kernel_are_torchs_scatter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CPU a float32 cache's step writes each layer's keys and values by
    one call of the row kernel (``PairTable.writer``): the floats torch's
    scatter puts there, from a joint projection's output as it lies (a view
    with the queries between rows, as MusicGen's; a row's keys and values
    alone, as the speech model's), every other row and position untouched; a
    position outside the table is refused and nothing written."""
    kernel = built_kernel()
    asked: list[int] = []
    writer = rowkernel.PairTable.writer

    def counted(self: rowkernel.PairTable, *args: Any) -> Any:
        asked.append(1)
        return writer(self, *args)

    monkeypatch.setattr(rowkernel.PairTable, "writer", counted)
    gen = torch.Generator().manual_seed(3)
    for rows, heads, size in ((3, 2, 8), (5, 4, 16), (1, 1, 64)):
        ours, theirs = (
            StaticKV(2, heads, size, rows=rows + 1, length=9, device="cpu", dtype=torch.float32)
            for _ in range(2)
        )
        ours._both.copy_(torch.randn(ours._both.shape, generator=gen))
        theirs._both.copy_(ours._both)
        positions = torch.randint(0, 9, (rows,), generator=gen)
        qkv = torch.randn(rows, 3, heads, 1, size, generator=gen)
        write = ours.step_pair_writer(positions)
        views = theirs.pair_views(rows)
        where = positions.view(1, rows, 1, 1, 1).expand(2, rows, heads, 1, size)
        for layer, pair in ((1, qkv[:, 1:]), (0, qkv[:, :2].contiguous())):
            write(layer, pair)
            views[layer].scatter_(3, where, pair.transpose(0, 1))
            assert torch.equal(ours._both, theirs._both)
        before = ours._both.clone()
        wrong = ours.step_pair_writer(torch.full((rows,), 9))
        with pytest.raises(IndexError):
            wrong(0, qkv[:, 1:])
        assert torch.equal(ours._both, before)
    assert len(asked) == 6
    assert kernel.pair_table([torch.zeros(2, 1, 1, 4, 8, dtype=torch.bfloat16)]) is None


def test_musicgen_codebook_embeddings_sum_as_the_model_does() -> None:
    from wavecast.server.engines.musicgen.decoder import MusicGenDecoder
    from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

    lm = build_tiny_musicgen().lm
    decoder = MusicGenDecoder(lm, rows=2, length=16, cross_length=4, dtype=torch.float32)
    codes = torch.randint(
        0, lm.card, (3, lm.num_codebooks, 5), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        theirs = sum(lm.emb[k](codes[:, k]) for k in range(lm.num_codebooks))
        assert torch.equal(decoder.embed(codes), theirs)


def test_musicgen_cross_masks_follow_the_rows_conditions_in_place() -> None:
    from wavecast.server.engines.musicgen.decoder import MusicGenDecoder
    from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

    lm = build_tiny_musicgen().lm
    decoder = MusicGenDecoder(lm, rows=4, length=16, cross_length=6, dtype=torch.float32)
    dim = decoder.dim
    with torch.no_grad():
        decoder.set_conditions([0, 1], torch.randn(2, 6, dim))
        decoder.set_conditions([2], torch.randn(1, 3, dim))
        table = decoder._cross_mask(torch.float32)
        half = decoder._cross_mask(torch.bfloat16)
        decoder.set_conditions([1], torch.randn(1, 2, dim))  # a row reused: a shorter prompt
    lengths = decoder.cross_lengths.tolist()
    assert lengths[:3] == [6, 2, 3]
    assert decoder._cross_mask(torch.float32) is table  # updated in place
    for mask in (table, half):
        for row, length in enumerate(lengths):
            assert bool((mask[row, 0, 0, :length] == 0).all())
            assert bool((mask[row, 0, 0, length:] == float("-inf")).all())
    with torch.no_grad():  # two requests' conditions in one call, padded to the longer
        decoder.set_conditions([0, 2], torch.randn(2, 5, dim), lengths=[5, 1])
    assert decoder.cross_lengths.tolist()[:3] == [5, 2, 1]
    assert decoder._cross_mask(torch.float32) is table
    assert bool((table[2, 0, 0, 1:] == float("-inf")).all()) and bool(
        (table[0, 0, 0, :5] == 0).all()
    )
    with torch.no_grad():
        decoder.set_conditions([3], torch.randn(1, 9, dim))  # the conditions' cache grows
    grown = decoder._cross_mask(torch.float32)
    assert grown.shape[-1] == decoder.cross.length >= 9
    assert bool((grown[3, 0, 0, :9] == 0).all()) and bool(
        (grown[1, 0, 0, 2:] == float("-inf")).all()
    )


def test_musicgen_prompts_of_any_length_and_place_prefill_together_as_alone() -> None:
    """Rows at different places with different lengths in one call (padded to
    the longest in the call's inputs; each a guidance pair's two rows, which
    attend together) leave each row's cache and last logits as its own call
    does; the padding is not computed: nothing lands past a row's new length."""
    from wavecast.server.engines.musicgen.decoder import MusicGenDecoder
    from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

    lm = build_tiny_musicgen().lm
    gen = torch.Generator().manual_seed(3)
    starts, sizes = [0, 0, 5, 5, 2, 2], [7, 7, 3, 3, 1, 1]
    count, width = len(sizes), max(sizes)

    def prepared() -> MusicGenDecoder:
        decoder = MusicGenDecoder(lm, rows=8, length=32, cross_length=6, dtype=torch.float32)
        conditions = torch.randn(count, 6, decoder.dim, generator=torch.Generator().manual_seed(4))
        decoder.set_conditions(list(range(count)), conditions, lengths=[6, 6, 2, 2, 4, 4])
        for row, start in enumerate(starts):
            if start:
                head = torch.randn(
                    1, start, decoder.dim, generator=torch.Generator().manual_seed(row)
                )
                decoder.prefill([row], head, 0)
        return decoder

    inputs = torch.randn(count, width, lm.dim, generator=gen)
    with torch.no_grad():
        alone = prepared()
        expected = [
            alone.prefill([row], inputs[row : row + 1, : sizes[row]], starts[row])[0]
            for row in range(count)
        ]
        together = prepared()
        got = together.prefill(list(range(count)), inputs, starts, sizes)
    ends = [a + b for a, b in zip(starts, sizes, strict=True)]
    assert together.lengths[:count].tolist() == ends
    for row in range(count):
        assert torch.allclose(got[row], expected[row], atol=1e-5), row
        assert torch.allclose(together.kv.k[:, row], alone.kv.k[:, row], atol=1e-5), row
        assert not together.kv.k[:, row, :, ends[row] :].any(), row


@pytest.mark.parametrize("pattern", ["delay", "unroll"])
def test_musicgen_window_starts_where_audiocraft_starts_it(pattern: str) -> None:
    """A window's first step (its prompt's length as timesteps), read from the
    window layout instead of walking audiocraft's pattern, for every prompt."""
    from audiocraft.modules.codebooks_patterns import (
        DelayedPatternProvider,
        UnrolledPatternProvider,
    )

    from wavecast.server.engines.musicgen.windows import Windows
    from wavecast.server.engines.testing.musicgen import build_tiny_musicgen

    lm = build_tiny_musicgen().lm
    k = lm.num_codebooks
    if pattern == "unroll":
        lm.pattern_provider = UnrolledPatternProvider(k)
    assert isinstance(lm.pattern_provider, DelayedPatternProvider | UnrolledPatternProvider)
    windows = Windows(lm, window=1.0, frame_rate=50)
    for gen_len in (1, 7, 50):
        pattern_of = lm.pattern_provider.get_pattern(gen_len)
        for prompt_len in range(gen_len):
            prompt = torch.zeros(1, k, prompt_len, dtype=torch.long).numpy() if prompt_len else None
            window = windows.start(gen_len / 50, 0, prompt)
            assert window.start_offset == pattern_of.get_first_step_with_timesteps(prompt_len)


def test_speech_rotary_embedding_is_the_models_bit_for_bit() -> None:
    from wavecast.server.engines.higgs.decoder import HiggsDecoder

    torch.manual_seed(0)
    x = torch.randn(5, 3, 1, 16)
    cos, sin = torch.randn(5, 1, 1, 16), torch.randn(5, 1, 1, 16)
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)  # transformers' rotate_half
    signed = torch.cat((-sin[..., :8], sin[..., 8:]), dim=-1)  # as the decoder's table holds it
    assert torch.equal(HiggsDecoder._rotate(x, cos, signed), x * cos + rotated * sin)
