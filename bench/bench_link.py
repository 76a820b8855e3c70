"""Streams over a slow link: when a listener can start playing without a stop.

``wavecast serve`` (tiny-musicgen, on the CPU) with a TCP proxy in front of it
that carries the server's bytes to the client at ``--links`` kbit/s (the other
way unlimited; the proxy reads the server's bytes as the link carries them,
from a 16 KiB receive buffer, so that the server's own buffers and its pacing,
not the proxy, hold what the link has not carried yet: an earlier version, its
reader's buffer and a 64 KiB receive buffer, held some 260 kB). For each link
and ``--formats`` format, one client asks through the link for a ``--seconds``
clip while another asks for the same clip directly, at once (both run:
``--admission slots``). Reported for the client behind the link:

- its first audio, from asking;
- when playback may start and never stop: the earliest start from asking such
  that every chunk arrives before it is due (for an encoded format, a chunk's
  audio time counted from its bytes, as if the bit rate were constant);
- the stream's bit rate and how it ended;

and for the direct client, its real-time factor: what the slow one costs the
others.

With ``--cancel``, the client behind the link asks for a ``--seconds`` clip,
cancels it ``--cancel`` seconds after its first audio, and at once asks for a
one-second clip on the same connection (a listener who stops one stream and
starts another). Reported: the cancelled stream's bytes that came after the
cancel, its done from the cancel, and the new clip's first audio from asking;
with ``--runs``, each the median of that many (where in a chunk the cancel
falls is chance), at ``--rate`` Hz where given (at higher rates a chunk holds
more bytes).

With ``--beside``, the client behind the link asks for a ``--seconds`` clip and,
``--beside`` seconds after its first audio, for a second clip (``--second``
seconds long) on the same connection, while the first goes on (a listener who
starts another stream beside the one playing). Reported: the second clip's
first audio from asking, and for each clip when it may start playing and never
stop (from its asking) and how it ended.

    .venv/bin/python bench/bench_link.py
    .venv/bin/python bench/bench_link.py --links 2000,512 --seconds 10
    .venv/bin/python bench/bench_link.py --links 2000,1000 --formats pcm_f32le,opus \
        --seconds 60 --cancel 2
    .venv/bin/python bench/bench_link.py --links 1000,500 --formats pcm_f32le \
        --seconds 10 --cancel 2 --runs 5 --rate 96000
    .venv/bin/python bench/bench_link.py --links 2000,1000 --formats pcm_s16le,opus \
        --seconds 60 --beside 5 --second 10

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_stream import print_header, start_server
from websockets.exceptions import ConnectionClosed

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, offset_unit

MODEL = "tiny-musicgen"
FORMATS = ("pcm_f32le", "pcm_s16le", "flac", "opus", "mp3")


# The proxy's receive buffer from the server (the kernel's, set before it
# connects; Linux doubles it): what the link's far end holds not yet carried, some
# 0.2 s of a 1 Mbit/s link. The proxy reads it a piece at a time, as the link
# carries them, holding nothing more itself.
RECEIVE_BUFFER = 16 << 10


class SlowLink:
    """A TCP proxy to ``port`` whose server-to-client direction carries ``kbits``
    kbit/s (each piece sent once the link has carried the one before)."""

    def __init__(self, port: int, kbits: float) -> None:
        self.target = port
        self.rate = kbits * 1000 / 8  # bytes a second
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", self.target))

        async def up() -> None:  # (the client's frames, unlimited)
            while data := await reader.read(65536):
                await loop.sock_sendall(sock, data)

        async def down() -> None:  # (the server's bytes, each piece once the link is free)
            free_at = loop.time()  # when the link has carried what it was given
            piece = max(512, int(self.rate * 0.02))  # (20 ms of link)
            while data := await loop.sock_recv(sock, piece):
                now = loop.time()
                free_at = max(free_at, now) + len(data) / self.rate
                await asyncio.sleep(free_at - now)
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            writer.close()
            sock.close()


@contextlib.contextmanager
def serving(path: str | None) -> Iterator[str]:
    """``wavecast serve`` of tiny-musicgen (``path`` first on its Python path:
    another commit's), both clients' requests at once (``--admission slots``);
    its stream URL while the block runs."""
    args = argparse.Namespace(
        model=[MODEL], device="cpu", concurrency=[2], threads=0, admission="slots",
        codec_batch=0, codec_windows=False,
    )  # fmt: skip
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(args, Path(tmp) / "server.log", env)
        try:
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


async def listen(url: str, format: str, seconds: float, seed: int) -> dict[str, Any]:
    """One request on a connection of its own; when each chunk came and what it held."""
    async with connect(url) as client:
        asked = time.perf_counter()
        stream = await client.generate(MODEL, "a slow link", duration=seconds, seed=seed,
                                       format=format)  # fmt: skip
        return await follow(stream, format, seconds, asked)


async def follow(
    stream: Any, format: str, seconds: float, asked: float, playing: asyncio.Event | None = None
) -> dict[str, Any]:
    """A request's stream read to its end: when each chunk came (from ``asked``)
    and what it held, how it ended; ``playing`` set at its first chunk (and at
    its end, where none came)."""
    arrivals: list[tuple[float, int]] = []  # (from asking, bytes)
    done = None
    try:
        async for event in stream:
            if isinstance(event, Audio) and event.rendition is None:
                arrivals.append((time.perf_counter() - asked, len(event.data)))
                if playing is not None:
                    playing.set()
            elif isinstance(event, Done):
                done = event
    except ConnectionClosed as exc:  # (the client's keepalive, say)
        end = f"connection lost after {time.perf_counter() - asked:.0f} s: {exc}"
    else:
        assert done is not None
        end = done.error.code if done.error else done.status
    finally:
        if playing is not None:
            playing.set()
    stats = done.stats if done else None
    return {
        "arrivals": arrivals,
        "end": end,
        "seconds": stats.audio_seconds if stats else seconds,
        "rtf": stats.real_time_factor if stats else 0.0,
        "unit": offset_unit(format, 1) * 32000,  # (PCM: bytes a second of audio)
        "encoded": format not in ("pcm_f32le", "pcm_s16le"),
    }


def playable_from(run: dict[str, Any]) -> float | None:
    """The earliest start (from asking) from which every chunk comes before it
    is due."""
    arrivals, seconds = run["arrivals"], run["seconds"]
    total = sum(size for _, size in arrivals)
    if not arrivals or total == 0:
        return None
    if run["end"] != "completed":
        return None  # (not the whole clip)
    per_second = total / seconds if run["encoded"] else run["unit"]
    start = 0.0
    before = 0
    for at, size in arrivals:
        start = max(start, at - before / per_second)  # (its first sample due at start + ...)
        before += size
    return start


async def case(url: str, link_url: str, format: str, seconds: float, seed: int) -> str:
    slow, direct = await asyncio.gather(
        listen(link_url, format, seconds, seed), listen(url, format, seconds, seed)
    )
    arrivals = slow["arrivals"]
    first = f"{arrivals[0][0] * 1000:.0f} ms" if arrivals else "-"
    start = playable_from(slow)
    kbits = sum(size for _, size in arrivals) * 8 / 1000 / max(slow["seconds"], 1e-9)
    return (
        f"{format} | {kbits:.0f} | {first} | "
        f"{'-' if start is None else f'{start:.2f} s'} | {slow['end']} | "
        f"x{direct['rtf']:.2f} |"
    )


async def cancel_case(
    link_url: str, format: str, seconds: float, after: float, seed: int, rate: int | None
) -> tuple[int, float, str, float | None]:
    """A stream cancelled ``after`` seconds past its first audio, and a new one
    asked at once on the same connection: the cancelled stream's bytes read
    after the cancel, its done from the cancel and how it ended, the new one's
    first audio from asking."""
    async with connect(link_url) as client:
        stream = await client.generate(MODEL, "a slow link", duration=seconds, seed=seed,
                                       format=format, sample_rate=rate)  # fmt: skip
        events = aiter(stream)
        while not isinstance(await anext(events), Audio):
            pass
        await asyncio.sleep(after)
        cancelled = time.perf_counter()
        await stream.cancel()
        again = await client.generate(MODEL, "the next", duration=1.0, seed=seed + 1,
                                      format=format, sample_rate=rate)  # fmt: skip
        asked = time.perf_counter()
        late = 0
        async for event in events:
            if isinstance(event, Audio):
                late += len(event.data)
            elif isinstance(event, Done):
                ended = time.perf_counter() - cancelled
                status = event.error.code if event.error else event.status
        first = None
        async for event in again:
            if isinstance(event, Audio) and first is None:
                first = time.perf_counter() - asked
    return late, ended, status, first


async def cancel_cases(link_url: str, format: str, args: argparse.Namespace, seed: int) -> str:
    """``--runs`` cancels (each a row's cell: the median, and the least and the
    most where more than one): where in its chunk the cancel falls is chance."""
    runs = [
        await cancel_case(link_url, format, args.seconds, args.cancel, seed + 2 * run, args.rate)
        for run in range(args.runs)
    ]

    def cell(values: list[float], unit: str, scale: float = 1.0) -> str:
        values = sorted(v * scale for v in values)
        median = statistics.median(values)
        spread = f" ({values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
        return f"{median:.2f} {unit}{spread}"

    statuses = ", ".join(sorted({status for _, _, status, _ in runs}))
    firsts = [first for _, _, _, first in runs if first is not None]
    return (
        f"{format} | {cell([late for late, _, _, _ in runs], 'MB', 1e-6)} | "
        f"{cell([ended for _, ended, _, _ in runs], 's')} ({statuses}) | "
        f"{cell(firsts, 's') if firsts else '-'} |"
    )


async def beside_case(
    link_url: str, format: str, seconds: float, after: float, second: float, seed: int
) -> str:
    """A second clip asked ``after`` seconds past the first's first audio, on the
    same connection, while the first goes on."""
    async with connect(link_url) as client:
        asked = time.perf_counter()
        stream = await client.generate(MODEL, "a slow link", duration=seconds, seed=seed,
                                       format=format)  # fmt: skip
        playing = asyncio.Event()
        first_task = asyncio.ensure_future(follow(stream, format, seconds, asked, playing))
        await playing.wait()
        await asyncio.sleep(after)
        asked_again = time.perf_counter()
        again = await client.generate(MODEL, "beside it", duration=second, seed=seed + 1,
                                      format=format)  # fmt: skip
        other = await follow(again, format, second, asked_again)
        one = await first_task
    cells = []
    for run in (other, one):
        start = playable_from(run)
        cells.append(f"{'-' if start is None else f'{start:.2f} s'} ({run['end']})")
    first_audio = other["arrivals"][0][0] if other["arrivals"] else None
    return (
        f"{format} | {'-' if first_audio is None else f'{first_audio:.2f} s'} | "
        f"{cells[0]} | {cells[1]} |"
    )


async def bench(args: argparse.Namespace) -> None:
    links = [float(kbits) for kbits in args.links.split(",")]
    formats = args.formats.split(",")
    servers = [("this tree", None)]
    if args.before_path:
        servers.insert(0, (args.before_name, args.before_path))
    if args.cancel is not None:
        print("| server | link (kbit/s) | format | the cancelled stream's bytes after its "
              "cancel | its done, from the cancel | the next clip's first audio, from asking "
              "|")  # fmt: skip
        print("| --- | ---: | --- | ---: | ---: | ---: |")
    elif args.beside is not None:
        print("| server | link (kbit/s) | format | the second clip's first audio, from asking "
              "| it plays without a stop from (how it ended) | the first clip plays without a "
              "stop from (how it ended) |")  # fmt: skip
        print("| --- | ---: | --- | ---: | ---: | ---: |")
    else:
        print("| server | link (kbit/s) | format | stream's kbit/s | first audio | plays without "
              "a stop from | how it ended | the direct client's real-time factor |")  # fmt: skip
        print("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for name, path in servers:
        with serving(path) as url:
            port = int(url.split(":")[2].split("/")[0])
            for format in formats:  # (warm: each encoder's first stream)
                await listen(url, format, 1.0, 0)
            for kbits in links:
                link = SlowLink(port, kbits)
                link_port = await link.start()
                link_url = f"ws://127.0.0.1:{link_port}/v1/stream"
                try:
                    for seed, format in enumerate(formats):
                        if args.cancel is not None:
                            row = await cancel_cases(link_url, format, args, 1000 * seed)
                        elif args.beside is not None:
                            row = await beside_case(
                                link_url, format, args.seconds, args.beside, args.second, 2 * seed
                            )
                        else:
                            row = await case(url, link_url, format, args.seconds, seed)
                        print(f"| {name} | {kbits:g} | {row}", flush=True)
                finally:
                    await link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="4000,1000,256", help="link rates, kbit/s")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--seconds", type=float, default=10.0, help="each clip's length")
    parser.add_argument(
        "--cancel", type=float, help="cancel each stream this long after its first audio"
    )
    parser.add_argument(
        "--beside", type=float, help="ask for a second clip this long after the first's audio"
    )
    parser.add_argument("--second", type=float, default=10.0, help="the second clip's length")
    parser.add_argument("--runs", type=int, default=1, help="cancels a cell (--cancel)")
    parser.add_argument("--rate", type=int, help="the streams' sample rate (--cancel)")
    parser.add_argument("--before-path", help="another commit's package folder: its server too")
    parser.add_argument("--before-name", default="before", help="what to call that commit")
    args = parser.parse_args()
    print_header(
        "streams over a slow link"
        + (": a clip asked beside another" if args.beside is not None else ""),
        f"python bench/bench_link.py --links {args.links} --formats {args.formats} "
        f"--seconds {args.seconds:g}"
        + (f" --cancel {args.cancel:g}" if args.cancel is not None else "")
        + (f" --runs {args.runs}" if args.runs != 1 else "")
        + (f" --rate {args.rate}" if args.rate else "")
        + (f" --beside {args.beside:g} --second {args.second:g}" if args.beside is not None else "")
        + (
            f" --before-path {args.before_path} --before-name {args.before_name}"
            if args.before_path
            else ""
        ),
    )
    if args.cancel is not None:
        print(
            f"tiny-musicgen (32 kHz mono, streamed at {args.rate or 32000} Hz): a "
            f"{args.seconds:g} s clip through a link of the rate given, cancelled "
            f"{args.cancel:g} s after its first audio; a 1 s clip asked at once on the same "
            "connection."
            + (
                f" Each cell: the median of {args.runs} runs (the least and the most)."
                if args.runs > 1
                else ""
            )
        )
    elif args.beside is not None:
        print(
            f"tiny-musicgen (32 kHz mono): a {args.seconds:g} s clip through a link of the rate "
            f"given; {args.beside:g} s after its first audio, a {args.second:g} s clip asked on "
            "the same connection while it goes on. When each clip may start playing and never "
            "stop: from its own asking."
        )
    else:
        print(
            f"tiny-musicgen (32 kHz mono), {args.seconds:g} s clips: one client through a link "
            "of the rate given, one directly, at once."
        )
    print()
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
