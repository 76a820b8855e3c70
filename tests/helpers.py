"""Test helpers: the tiny model, a real server on 127.0.0.1 port 0, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wavecast.server.config import Config, LimitsConfig, ModelsConfig, NetworkConfig, TimeoutsConfig

if TYPE_CHECKING:
    from wavecast.server.engines.rowkernel import RowKernel

# Every timeout in the tests scales with this one variable (slow machines: raise it).
TIMEOUT_SCALE = float(os.environ.get("WAVECAST_TEST_TIMEOUT_SCALE", "1"))


def timeout(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


_ENGINES: dict[str, Any] = {}


def tiny_engines() -> Mapping[str, Any]:
    """The tiny-musicgen engine, built once per test session (same seed, same weights)."""
    if not _ENGINES:
        from wavecast.server.engines import load_engines

        _ENGINES.update(load_engines(["tiny-musicgen"], "cpu"))
    return _ENGINES


def make_config(**limits: Any) -> Config:
    return Config(
        network=NetworkConfig(host="127.0.0.1", port=0),
        limits=replace(LimitsConfig(), **limits),
        timeouts=TimeoutsConfig(shutdown_grace=1.0),
        models=ModelsConfig(names=("tiny-musicgen",), device="cpu"),
    )


@asynccontextmanager
async def running_server(
    config: Config | None = None, factory: Callable[[], Mapping[str, Any]] | None = None
) -> AsyncIterator[Any]:
    from wavecast.server.app import WavecastServer

    server = WavecastServer(config or make_config(), factory or tiny_engines)
    await asyncio.wait_for(server.start(), timeout(120))
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(), timeout(30))


@asynccontextmanager
async def slow_link(port: int, kbits: float) -> AsyncIterator[int]:
    """A TCP proxy to ``port`` on 127.0.0.1 whose server-to-client direction
    carries ``kbits`` kbit/s (a slow connection: it reads the server's bytes a
    piece at a time as the link carries them, from a 16 KiB receive buffer, so
    that the server's own buffers hold what the link has not carried, as
    bench_link.py's proxy does); its port while the block runs."""
    rate = kbits * 1000 / 8  # bytes a second

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))

        async def up() -> None:
            while data := await reader.read(65536):
                await loop.sock_sendall(sock, data)

        async def down() -> None:
            free_at = loop.time()  # when the link has carried what it was given
            piece = max(512, int(rate * 0.02))  # (20 ms of link)
            while data := await loop.sock_recv(sock, piece):
                now = loop.time()
                free_at = max(free_at, now) + len(data) / rate
                await asyncio.sleep(free_at - now)
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        with contextlib.suppress(OSError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()
        sock.close()

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield proxy.sockets[0].getsockname()[1]
    finally:
        proxy.close()
        await proxy.wait_closed()


def in_its_place(config: Config, port: int) -> Config:
    """``config`` listening on ``port``: a server that comes back where one was."""
    return replace(config, network=replace(config.network, port=port))


WAVECAST = [sys.executable, "-m", "wavecast.clients.cli"]


def self_signed(folder: Path, name: str = "wavecast-test") -> tuple[Path, Path]:
    """A self-signed certificate (its own authority) for 127.0.0.1, localhost and
    wavecast.test, by OpenSSL's command: the certificate's and the key's files."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    options = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    names = "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:wavecast.test"
    command = ["openssl", "req", *options.split(), "-subj", f"/CN={name}", "-addext", names]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


@contextmanager
def served(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """``wavecast serve`` as a process (``start_serve``) for the block: its port.
    Then SIGTERM, and it must exit 0 (it is killed if the block failed)."""
    process, port = start_serve(args, log_file, env)
    try:
        yield port
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout(30)) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def steps_in_order(
    engine: Any, job: Any, marks: Mapping[str, Callable[..., str | None]], monkeypatch: Any
) -> tuple[list[list[str]], list[Any]]:
    """Step ``job`` alone to its end (then finish it), the engine's methods named
    in ``marks`` noted as they are called: each call of ``step``'s notes in
    order (``marks[name](*args)``: the note, None for the name itself), and
    every output."""
    notes: list[str] = []

    def noting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def noted(*args: Any, **kwargs: Any) -> Any:
            notes.append(marks[name](*args) or name)
            return method(*args, **kwargs)

        return noted

    for name in marks:
        monkeypatch.setattr(engine, name, noting(name, getattr(engine, name)))
    calls: list[list[str]] = []
    outputs: list[Any] = []
    try:
        while not outputs or not outputs[-1].done:
            notes.clear()
            outputs += engine.step([job])
            calls.append(list(notes))
    finally:
        engine.finish(job)
    return calls, outputs


def cancelled_in_flight_leave_nothing(engine: Any, jobs: list[Any], steps: int) -> None:
    """``jobs`` stepped ``steps`` times by a pipelined engine, then all finished
    with their codes in flight, and no step after (an idle server): no slot
    taken, no codec window waiting, none of their states reachable."""
    import gc
    import weakref

    for _ in range(steps):
        engine.step(jobs)
    assert engine._in_flight is not None and len(engine._in_flight.drew) == len(jobs)
    states = [weakref.ref(job.state) for job in jobs]
    for job in jobs:
        engine.finish(job)
    del jobs
    gc.collect()
    assert all(owner is None for owner in engine._slots.owners) and not engine._due
    assert all(state() is None for state in states)


@contextmanager
def observed_logits(engine: Any) -> Iterator[dict[str, list[Any]]]:
    """While in: every sampled request's raw logits, step by step, by request id
    (the engine's ``logits_observer``)."""
    seen: dict[str, list[Any]] = {}

    def observe(logits: Mapping[str, Any]) -> None:
        for rid, row in logits.items():
            seen.setdefault(rid, []).append(row.clone())

    engine.logits_observer = observe
    try:
        yield seen
    finally:
        engine.logits_observer = None


def step_together(
    engine: Any,
    jobs: Sequence[Any],
    joins: Sequence[int] | None = None,
    *,
    cancel_at: int | None = None,
    cancel: int = 2,
    begin: bool = False,
) -> dict[str, list[Any]]:
    """Step an engine's ``jobs`` together to their end, job ``i`` joining at step
    ``joins[i]`` (all at the first by default); after ``cancel_at`` steps, the first
    ``cancel`` still running are cancelled (finished). Each request's audio chunks.
    ``begin``: the jobs joining at a step begun together before it (``Engine.begin``,
    as the scheduler does)."""
    audio: dict[str, list[Any]] = {job.request.request_id: [] for job in jobs}
    waiting = sorted(zip(joins or [0] * len(jobs), range(len(jobs)), strict=True))
    running: list[Any] = []
    steps = 0
    while waiting or running:
        joining = []
        while waiting and waiting[0][0] <= steps:
            joining.append(jobs[waiting.pop(0)[1]])
        if begin and joining:
            engine.begin(joining)
        running += joining
        if running:
            outs = engine.step(running)
            for job, out in zip(running, outs, strict=True):
                if out.audio is not None:
                    audio[job.request.request_id].append(out.audio)
            running = [job for job, out in zip(running, outs, strict=True) if not out.done]
        steps += 1
        if steps == cancel_at:
            for job in running[:cancel]:
                engine.finish(job)
            running = running[cancel:]
    return audio


def count_codec_calls(engine: Any) -> list[int]:
    """From now on, how many chunks (streams' windows, or their new frames) each
    of ``engine``'s codec calls decodes."""
    calls: list[int] = []
    incremental = engine.codec_streams.incremental
    if incremental is None:
        decode = engine._decode

        def counting(codes: Any) -> Any:
            calls.append(int(codes.shape[0]))
            return decode(codes)

        engine._decode = engine.codec_streams.decode = counting
    else:
        run = incremental.decode

        def counting_states(codes: Any, states: Any, **kwargs: Any) -> Any:
            calls.append(int(codes.shape[0]))
            return run(codes, states, **kwargs)

        incremental.decode = counting_states
    return calls


def crowds_leave_memory_as_found(
    engine: Any, crowd: Callable[[int], Sequence[Any]], cuda_graphs: bool
) -> None:
    """Warm ``engine`` up, then three crowds (``crowd(i)`` runs the ``i``-th and
    returns its jobs): the GPU's allocated memory after each is where the first
    left it (nothing kept per request); with graphs, where warm-up left it (the
    table and graphs are made once). The speech engine's kept prompt beginnings
    (``PrefixStore``: kept by design for later requests, within their budget)
    are given up before each reading."""
    import torch

    def allocated() -> int:
        prefixes = getattr(engine, "prefixes", None)
        if prefixes is not None:
            prefixes.clear()
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated())

    engine.warm_up()
    warm = allocated()
    after = []
    for i in range(3):
        jobs = crowd(i)
        for job in jobs:
            engine.finish(job)
        del jobs
        after.append(allocated())
    assert after[1] == after[0] and after[2] == after[0]
    if cuda_graphs:
        assert after[0] == warm
        assert engine._graphs is not None and engine._graphs.dropped == 0


def graphs_at_warm_up_serve_as_eager(
    eager: Any, graphed: Any, jobs_of: Callable[[Any], Sequence[Any]]
) -> None:
    """Warming ``graphed`` up (CUDA graphs) records every shape of its
    ``max_active`` requests; ``jobs_of(engine)`` joining at steps 0, 3, 9 and 20
    then replay only (nothing recorded, nothing dropped), and their codes equal
    the ``eager`` engine's."""
    import torch

    graphed.warm_up()
    graphs = graphed._graphs
    assert graphs is not None and graphs.recorded == len(graphs) > 0
    recorded = graphs.recorded
    results = []
    for engine in (eager, graphed):
        jobs = jobs_of(engine)
        step_together(engine, jobs, (0, 3, 9, 20))
        results.append([engine.codes_of(job) for job in jobs])
    assert graphs.recorded == recorded and graphs.dropped == 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def collect_audio(engine: Any, job: Any) -> Any:
    """Step an engine's job alone to its end; its audio ``[frames, channels]``."""
    import numpy as np

    chunks = []
    while True:
        out = engine.step([job])[0]
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            return np.concatenate(chunks)


async def first_audio(stream: Any) -> Any:
    """Read a request's events up to its first audio chunk, and return that chunk."""
    from wavecast.protocol import Audio

    async for event in stream:
        if isinstance(event, Audio):
            return event
    raise AssertionError(f"no audio before done: {stream.done}")


async def reach(kind: type, *streams: Any) -> None:
    """Read each request's events up to its first of ``kind`` (``Started``,
    ``Queued``, ...)."""
    for stream in streams:
        async for event in stream:
            if isinstance(event, kind):
                break
        else:
            raise AssertionError(f"no {kind.__name__} before done: {stream.done}")


def start_serve(
    args: list[str], log_file: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """``wavecast serve`` as a process on 127.0.0.1 port 0: the process and its port
    (read from its log, once it serves)."""
    process = subprocess.Popen(
        [*WAVECAST, "serve", "--port", "0", "--log-file", str(log_file), *args], env=env
    )
    for _ in range(int(timeout(120) * 10)):
        if log_file.exists():
            match = re.search(r"wss?://127\.0\.0\.1:(\d+)/v1/stream", log_file.read_text())
            if match:
                return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(log_file.read_text() if log_file.exists() else "no log")


async def run_cli(
    *args: str,
    interrupt_after: str | re.Pattern[str] | None = None,
    then: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Run ``wavecast ARGS``; its exit code and output. At the first line holding
    ``interrupt_after`` (or that it matches, a pattern): ``then()`` if given,
    else a Ctrl-C (SIGINT) to it."""
    process = await asyncio.create_subprocess_exec(
        *WAVECAST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    output = []
    while line := await asyncio.wait_for(process.stdout.readline(), timeout(60)):
        text = line.decode()
        output.append(text)
        if interrupt_after is not None and (
            interrupt_after.search(text)
            if isinstance(interrupt_after, re.Pattern)
            else interrupt_after in text
        ):
            if then is not None:
                then()
            else:
                process.send_signal(signal.SIGINT)
            interrupt_after = None
    return await asyncio.wait_for(process.wait(), timeout(30)), "".join(output)


_STEREO: dict[str, Any] = {}


def with_stereo() -> Mapping[str, Any]:
    """tiny-musicgen, -stereo and -melody, built once."""
    if not _STEREO:
        from wavecast.server.engines import load_engines

        _STEREO.update(tiny_engines())
        _STEREO.update(load_engines(["tiny-musicgen-stereo", "tiny-musicgen-melody"], "cpu"))
    return _STEREO


_HIGGS: dict[str, Any] = {}


def tiny_higgs(**given: Any) -> Any:
    """A tiny-higgs engine (``HiggsEngine``'s arguments ``given``) over the model
    built once per session."""
    from wavecast.server.engines.higgs.engine import HiggsEngine
    from wavecast.server.engines.higgs.loading import load_higgs

    if not _HIGGS:
        _HIGGS["model"] = load_higgs("tiny-higgs", None, "cpu")
    return HiggsEngine(_HIGGS["model"], name="tiny-higgs", **given)


def higgs_engines(voices_dir: Any = None) -> Mapping[str, Any]:
    """tiny-higgs with the built-in scenes and the voices in ``voices_dir``, plus
    tiny-musicgen."""
    from wavecast.server.engines.higgs.voices import BUILTIN_SCENES, load_scenes, load_voices

    voices, scenes = load_voices(voices_dir), load_scenes(BUILTIN_SCENES)
    return {"tiny-higgs": tiny_higgs(voices=voices, scenes=scenes), **tiny_engines()}


async def steps_after_disconnect(server: Any, start: Callable[[Any], Any]) -> int:
    """Start a request with ``start(client)``, drop the connection at its first audio,
    and return the steps the scheduler took from the start until it is idle; checks
    that nothing runs on afterwards and that the request was cancelled."""
    from wavecast.clients import connect
    from wavecast.protocol import Audio

    scheduler = server.scheduler
    await asyncio.wait_for(scheduler.wait_idle(timeout(10)), timeout(11))
    before = int(scheduler.steps_total)
    cancelled = scheduler.snapshot()["cancelled"]
    async with connect(server.url) as client:
        stream = await start(client)
        async for event in stream:
            if isinstance(event, Audio):
                break
        await client.ws.close()
    await asyncio.wait_for(scheduler.wait_idle(timeout(10)), timeout(11))
    steps = int(scheduler.steps_total)
    await asyncio.sleep(0.3)
    assert scheduler.steps_total == steps  # nothing runs on for the closed connection
    assert scheduler.snapshot()["cancelled"] >= cancelled + 1
    return steps - before


def voiced_prompt(engine: Any, codebooks: int, bos: int) -> tuple[Any, Any, Any]:
    """A speech prompt with a voice reference's codes, tokenized by ``engine`` (ids
    and audio codes), and six audio frames to feed after it."""
    import torch

    from wavecast.server.engines.higgs.prompt import SYSTEM, PromptAudio, build_prompt

    codes = torch.randint(0, bos, (codebooks, 30), generator=torch.Generator().manual_seed(1))
    parts = build_prompt(
        SYSTEM, "A quiet room.", [], [("Ref.", PromptAudio(codes.numpy()))], "Now."
    )
    ids, audio = engine.tokenize(parts)
    assert audio is not None
    frames = torch.randint(0, bos, (6, codebooks), generator=torch.Generator().manual_seed(2))
    return ids, audio, frames


def model_forward(model: Any, ids: Any, audio: Any, frames: Any) -> list[Any]:
    """transformers' own HiggsAudio forward: the prompt, then one frame at a time
    (its cache); the next frame's logits ``[K, card]`` after each."""
    import torch
    from transformers import DynamicCache

    codebooks = int(frames.shape[1])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        mask = torch.ones(audio.shape[:2], dtype=torch.bool)
        out = model(input_ids=ids, audio_input_ids=audio, audio_input_ids_mask=mask, cache=cache)
        logits = [out.logits[0, -1].view(codebooks, -1)]
        for frame in frames:
            out = model(audio_input_ids=frame.view(1, 1, codebooks), cache=cache)
            logits.append(out.logits[0, -1].view(codebooks, -1))
    return logits


def same_audio(a: bytes, b: bytes) -> bool:
    """The same 16-bit clip to float rounding: where the codec's chunks split (it
    follows a stream's lead over real time) or how many rows a batch decodes moves
    a sample by one step at most."""
    import numpy as np

    x, y = np.frombuffer(a, np.int16), np.frombuffer(b, np.int16)
    return len(x) > 0 and x.shape == y.shape and int(np.abs(x.astype(int) - y).max()) <= 1


def built_kernel() -> RowKernel:
    """The row kernel, which this project's machines (x86-64 with AVX2, a C
    compiler) build; elsewhere ``load`` must say why it did not."""
    import platform
    import shutil

    import pytest

    from wavecast.server.engines import rowkernel

    kernel = rowkernel.load()
    if not isinstance(kernel, rowkernel.RowKernel):
        assert platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("cc"), (
            kernel
        )
        pytest.skip(f"no row kernel here: {kernel}")
    return kernel


def left_out_now_and_then(engine: Any, jobs: dict[str, Any], leave: str | None) -> Any:
    """Step ``jobs`` (by request id) together to their ends, ``leave`` left out of
    every fifth call (as a scheduler should not, but might); each one's codes
    and audio."""
    import numpy as np

    live, audio, codes, call = dict(jobs), {rid: [] for rid in jobs}, {}, 0
    while live:
        rids = [rid for rid in live if not (rid == leave and call % 5 == 4)]
        outputs = engine.step([live[rid] for rid in rids])
        for rid, out in zip(rids, outputs, strict=True):
            assert out.error is None, out.error
            if out.audio is not None:
                audio[rid].append(out.audio)
            if out.done:
                codes[rid] = engine.codes_of(live[rid])
                engine.finish(live.pop(rid))
        call += 1
    return {rid: (codes[rid], np.concatenate(audio[rid])) for rid in jobs}


def random_rules(
    codebooks: int, bos: int, eos: int, trials: int, device: str = "cpu"
) -> Iterator[tuple[Any, ...]]:
    """Speech rules (``RowRules``, on ``device``) in random states, ``trials``
    times: the rules, the rows of a step and its window, and the step's
    repetition windows, rows drawing and codes (the stream markers among them:
    ``bos`` and ``eos``, a codebook's last two ids). Rows past the step's are
    random too."""
    import torch

    from wavecast.server.engines.higgs.rules import RowRules
    from wavecast.server.engines.higgs.utterance import Markers

    k = codebooks
    markers = Markers(
        codebooks=k, stream_bos=bos, stream_eos=eos, audio=1, delay=2, audio_bos=3, end=4
    )
    gen = torch.Generator().manual_seed(0)
    for trial in range(trials):
        rows = int(torch.randint(1, 9, (1,), generator=gen))
        window = [1, 8, 16, 64][trial % 4]
        rules = RowRules(rows + 2, markers, max(bos, eos) + 1, torch.device(device))
        state = torch.empty_like(rules.state, device="cpu")
        state[:, :k] = torch.randint(-3, 6, (rows + 2, k), generator=gen)  # bos
        state[:, k] = torch.randint(0, 6, (rows + 2,), generator=gen)  # drawn
        state[:, k + 1 : 2 * k + 1] = torch.randint(-2, 5, (rows + 2, k), generator=gen)  # eos
        state[:, 2 * k + 1] = torch.randint(0, 2, (rows + 2,), generator=gen)  # delay
        width = state.shape[1] - 2 * k - 2  # the last row and the window
        state[:, 2 * k + 2 :] = torch.randint(-1, eos + 1, (rows + 2, width), generator=gen)
        rules.state.copy_(state)
        ras_len = torch.randint(0, window + 1, (rows,), generator=gen).to(device)
        stepped = torch.randint(0, 2, (rows,), generator=gen).bool().to(device)
        tokens = torch.randint(0, max(bos, eos) + 1, (rows, k), generator=gen).to(device)
        yield rules, rows, window, ras_len, stepped, tokens


# What a tensor read on the host is (on a GPU each waits for the device's work).
_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


@contextmanager
def waits_in(engine: Any, name: str, exempt: Sequence[tuple[Any, str]] = ()) -> Iterator[list[str]]:
    """Each call the engine's own code makes, in its method ``name``, that would
    wait for the device on a GPU: a tensor read on the host (``item``,
    ``tolist``, ``bool``, ...), a result whose shape depends on values
    (``nonzero``, indexing by a boolean mask), a copy to a device
    (``to(device)``, ``tensor(device=...)``, which from pageable memory waits
    for the work in flight). As ``"call at file:line"``, listed while
    ``with``-in.

    On a CPU nothing waits, and host and device are one: this tells the code's
    calls apart by what they are, not by what they did. The calls that move
    tensors without waiting are ``pipelining``'s (pinned memory and events),
    so its own are not listed; nor are the libraries' (transformers',
    audiocraft's), which the GPU tests catch under ``torch.cuda``'s sync
    debug mode. Nor are those of the ``exempt`` methods (``(owner, name)``) it
    calls."""
    import traceback

    import torch
    from torch.overrides import TorchFunctionMode

    import wavecast.server as ours

    root = str(Path(ours.__file__).parent)
    allowed = str(Path(root) / "engines" / "pipelining.py")
    library = str(Path(torch.__file__).parent)
    found: list[str] = []

    def masks(index: Any) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    def moves(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        called = getattr(func, "__name__", "")
        if called in _HOST_READS:
            return True
        # Shapes that depend on a tensor's values: counted on the host.
        if called in ("nonzero", "masked_select", "unique", "argwhere", "nonzero_static"):
            return called != "nonzero_static"
        if called in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            return masks(args[1]) if len(args) > 1 else False
        if called == "where" and len(args) == 1 and not kwargs:
            return True
        if called == "to":
            given = [*args[1:], kwargs.get("device")]
            return any(isinstance(a, (torch.device, str)) or (type(a) is int) for a in given)
        return called in ("tensor", "as_tensor") and kwargs.get("device") is not None

    aside = [0]  # exempt calls under way

    class Audit(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            if not aside[0] and moves(func, args, kwargs):
                frames = traceback.extract_stack()[:-1]
                caller = next(
                    f
                    for f in reversed(frames)
                    if not f.filename.startswith(library) and f.filename != __file__
                )
                if caller.filename.startswith(root) and caller.filename != allowed:
                    where = Path(caller.filename).relative_to(root)
                    found.append(f"{getattr(func, '__name__', func)} at {where}:{caller.lineno}")
            return func(*args, **kwargs)

    @contextmanager
    def audited() -> Iterator[None]:
        with Audit():
            yield

    @contextmanager
    def set_aside() -> Iterator[None]:
        aside[0] += 1
        try:
            yield
        finally:
            aside[0] -= 1

    with _methods_within({(engine, name): audited, **dict.fromkeys(exempt, set_aside)}):
        yield found


@contextmanager
def cuda_syncs_fail_in(
    engine: Any, name: str, exempt: Sequence[tuple[Any, str]] = ()
) -> Iterator[None]:
    """While ``with``-in, the engine's method ``name`` raises where it waits for
    the device (``torch.cuda``'s sync debug mode), but in the ``exempt``
    methods (``(owner, name)``: an object's or a class's) it calls."""
    import torch

    def mode(name: str) -> Callable[[], Any]:
        @contextmanager
        def within() -> Iterator[None]:
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(name)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(before)

        return within

    with _methods_within({(engine, name): mode("error"), **dict.fromkeys(exempt, mode("default"))}):
        yield


@contextmanager
def _methods_within(contexts: Mapping[tuple[Any, str], Callable[[], Any]]) -> Iterator[None]:
    """While ``with``-in, each method ``(owner, name)`` (an object's or a
    class's) runs within a new context of its ``contexts`` factory; then the
    methods as they were."""
    saved = [(owner, name, vars(owner).get(name)) for owner, name in contexts]

    def within(method: Any, context: Callable[[], Any]) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with context():
                return method(*args, **kwargs)

        return call

    for (owner, name), context in contexts.items():
        # (On a class: called with its instance.)
        setattr(owner, name, within(getattr(owner, name), context))
    try:
        yield
    finally:
        for owner, name, before in reversed(saved):
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def in_parts(pieces: Any) -> tuple[int, Any]:
    """Work in parts (a generator pausing between them) run to its end: how many
    pauses it made, and its result."""
    parts = 0
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return parts, done.value
        parts += 1
