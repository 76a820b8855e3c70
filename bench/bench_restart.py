"""A server restarted under load: what becomes of the requests its clients had
asked for.

``--clients`` clients (the Python client library, ``retry_for``) each ask for one
``--duration`` clip (of a speech model, ``--model tiny-higgs``: a text in
chunks of 10 s at most); the server runs ``--max-active`` at once and queues the rest.
``--after`` seconds later it is sent SIGTERM (``--drain-seconds``: the running
ones get that long to finish); ``--down`` seconds after it exits, a new server
listens on the same port. With ``--reuse-port`` (both servers' flag), the new
server is started first, beside the old one, and the old one is sent SIGTERM
once the new one listens: the port is never closed. Each request ends as one of:

- completed (by either server); of them, picked up: cut under way by the first
  and picked up where it was cut on the second (``generate.resume``), with the
  seconds of audio each had when cut;
- cut: ``shutting_down`` after it started (what it made so far came through);
- not run: ``shutting_down`` before it started, or its connection lost;
- another error.

Reported for each round: how many ended each way, and how long the
completed ones took from being asked (median, longest), how long the server
was away (SIGTERM to the new one listening: of it, SIGTERM to the old one's
exit, and the new one's start from its process to listening), and how long
after it came back (with ``--reuse-port``: after the SIGTERM) its clients'
tries that took came (they wait between tries: the ones asking again, median
and last) and the last request completed; and for each stream picked up,
from its try that took to its first audio past the cut (what its listener
waits for, once the server is back). ``--before-path
FOLDER`` runs another commit's server and clients in turns with this tree's (a
folder holding a worktree's ``wavecast`` package, put first on their path).

    .venv/bin/python bench/bench_restart.py --rounds 3
    .venv/bin/python bench/bench_restart.py --rounds 3 --before-path /tmp/before-py

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_stream import machine

# One client run, in its own process (so that another commit's client can run
# from its own path): asks at once, prints each request's outcome as JSON.
CLIENTS = r"""
import asyncio, json, sys, time
from wavecast.clients import connect
from wavecast.protocol import Audio
from websockets.exceptions import ConnectionClosed

url, model = sys.argv[1], sys.argv[2]
clients, duration, retry_for = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])

async def one(index):
    began = time.perf_counter()
    whys = []
    back = [None]  # when its last wait to try again ended: the try that took

    def waiting(why, seconds):
        whys.append(why)
        back[0] = time.perf_counter() + seconds

    try:
        client = await connect(url, retry_for=retry_for, on_retry=waiting)
    except Exception as exc:
        return {"end": "not run", "why": repr(exc)}
    chunks = 0
    new = None  # picked up: from its try that took to its first audio past the cut
    try:
        if client.models[model].family == "higgs":  # (speech: chunks of 10 s or less)
            chunks = max(1, -(-int(duration) // 10))
            text = " ".join(f"Sentence {i} of request {index}." for i in range(chunks))
            rows = round(duration * 25 / chunks) + 4  # (25 frames a second, after 4 rows)
            stream = await client.speak(model, text, seed=index, max_new_tokens=rows,
                                        chunk_method="word", chunk_max_word_num=5)
        else:
            stream = await client.generate(model, f"restart {index}", duration=duration,
                                           seed=index)
        async for event in stream:
            chunks += isinstance(event, Audio)
            cut = any(" up at " in w for w in whys)
            if isinstance(event, Audio) and new is None and cut and back[0] is not None:
                new = time.perf_counter() - back[0]
    except ConnectionClosed:
        return {"end": "not run" if stream.started is None else "cut", "why": "connection lost"}
    finally:
        await client.close()
    took = time.perf_counter() - began
    if stream.done.status == "completed":
        # ("... (picking the stream up at 12.34 s)": the audio it had when cut)
        picked = [float(w.split(" up at ")[1].split(" s)")[0]) for w in whys if " up at " in w]
        return {"end": "completed", "took": took, "at": time.perf_counter(), "picked": picked,
                "back": back[0], "new": new}
    code = stream.done.error.code if stream.done.error else stream.done.status
    if code == "shutting_down":
        return {"end": "cut" if chunks else "not run", "why": code}
    return {"end": "error", "why": code}

async def main():
    print(json.dumps(await asyncio.gather(*(one(i) for i in range(clients)))))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(
    args: argparse.Namespace, port: int, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``wavecast serve`` on ``port``, once it listens."""
    command = [
        sys.executable, "-m", "wavecast.clients.cli", "serve", "--model", args.model,
        "--device", "cpu", "--port", str(port), "--max-active", str(args.max_active),
        "--admission", "slots", "--max-queue", str(args.clients),
        "--max-connections-per-ip", str(args.clients + 4),
        "--drain-seconds", str(args.drain_seconds), "--threads", str(args.threads),
        "--log-file", str(log),
    ] + (["--reuse-port"] if args.reuse_port else [])  # fmt: skip
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log.exists() and "serving " in log.read_text():
            return process
        if process.poll() is not None:
            raise SystemExit(f"the server did not start: {log.read_text()}")
        time.sleep(0.1)
    raise SystemExit("the server did not start in time")


def round_(
    args: argparse.Namespace, path: str | None, folder: Path
) -> tuple[list[dict[str, Any]], float, float, float, float]:
    """The requests' outcomes; when SIGTERM was sent, when the old server exited,
    when the new one was started and when it listened (``perf_counter``, the same
    clock as the clients' process's)."""
    port = free_port()
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    first = serve(args, port, folder / "first.log", env)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    command = [sys.executable, "-c", CLIENTS, url, args.model, str(args.clients)]
    command += [str(args.duration), str(args.retry_for)]
    clients = subprocess.Popen(command, env=env, stdout=subprocess.PIPE)
    second = None
    try:
        time.sleep(args.after)
        if args.reuse_port:  # (the new one first: it listens beside the old one)
            started = time.perf_counter()
            second = serve(args, port, folder / "second.log", env)
            listening = time.perf_counter()
        sent = time.perf_counter()
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        exited = time.perf_counter()
        if not args.reuse_port:
            time.sleep(args.down)
            started = time.perf_counter()
            second = serve(args, port, folder / "second.log", env)
            listening = time.perf_counter()
        out, _ = clients.communicate(timeout=300)
    finally:
        for process in (first, second, clients):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if second is not None and second.poll() is None:
            second.wait()
    if second is not None:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    outcomes: list[dict[str, Any]] = json.loads(out)
    return outcomes, sent, exited, started, listening


def summary(run: tuple[list[dict[str, Any]], float, float, float, float]) -> dict[str, Any]:
    outcomes, sent, exited, started, listening = run
    ends = [o["end"] for o in outcomes]
    since = max(listening, sent)  # (the new server listening; with --reuse-port, SIGTERM)
    after = [o["at"] - since for o in outcomes if o["end"] == "completed"]
    backs = sorted(o["back"] - since for o in outcomes if o.get("back") is not None)
    took = sorted(o["took"] for o in outcomes if o["end"] == "completed")
    return {
        "completed": ends.count("completed"),
        "picked": sum(bool(o.get("picked")) for o in outcomes),
        "picked at": sorted(at for o in outcomes for at in o.get("picked", [])),
        "new audio": sorted(o["new"] for o in outcomes if o.get("new") is not None),
        "cut": ends.count("cut"),
        "not run": ends.count("not run"),
        "error": ends.count("error"),
        "took": (statistics.median(took), took[-1]) if took else (0.0, 0.0),
        "down": listening - sent,
        "exit": exited - sent,
        "start": listening - started,
        "last": max(after) if after and max(after) > 0 else None,
        "back": (statistics.median(backs), backs[-1]) if backs else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-musicgen")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-active", type=int, default=4)
    parser.add_argument("--after", type=float, default=1.0, help="SIGTERM this long after")
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--down", type=float, default=1.0, help="nothing listens this long")
    parser.add_argument("--retry-for", type=float, default=60.0)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="the servers' --reuse-port: the new one listens beside the old one, then SIGTERM",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--before-path", help="another commit's package folder: its servers and clients run too"
    )
    parser.add_argument("--before-name", default="before", help="what to call that commit")
    args = parser.parse_args()
    ways: list[tuple[str, str | None]] = [("this tree", None)]
    if args.before_path:
        ways.insert(0, (args.before_name, args.before_path))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for name, path in ways:  # (in turns)
                folder = Path(tmp) / f"{name.replace(' ', '-')}-{index}"
                folder.mkdir()
                results[name].append(summary(round_(args, path, folder)))
                print(name, results[name][-1], file=sys.stderr, flush=True)
    print(f"### a server restarted under load: {args.model} on cpu\n")
    print(f"- machine: {machine('cpu')}, {args.threads} torch thread(s)")
    print(f"- command: `python bench/bench_restart.py {' '.join(sys.argv[1:])}`")
    print(f"- date: {time.strftime('%Y-%m-%d')}; {args.rounds} round(s) each, in turns")
    print(
        f"- {args.clients} clients ask for a {args.duration:g} s clip each at once "
        f"(`retry_for={args.retry_for:g}`); {args.max_active} run at once; SIGTERM after "
        f"{args.after:g} s (`--drain-seconds {args.drain_seconds:g}`); "
        + (
            "a new server (`--reuse-port`, both) listening on the port beside it first\n"
            if args.reuse_port
            else f"a new server {args.down:g} s after it exits\n"
        )
    )
    print("| server and clients | round | completed | of them picked up where cut (at) "
          "| cut while running | not run | other errors | "
          "completed: median, longest from asking | SIGTERM to the new server listening "
          "(SIGTERM to exit; start) | "
          "from then (or SIGTERM, the later) to its clients' try that took: median, last | "
          "to the last completed | "
          "picked up: from the try that took to the first new audio |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, _ in ways:
        for index, row in enumerate(results[name]):
            median, longest = row["took"]
            last = "none after it" if row["last"] is None else f"{row['last']:.1f} s"
            first = "none" if row["back"] is None else "{:.1f} s, {:.1f} s".format(*row["back"])
            at = f" ({', '.join(f'{a:.1f}' for a in row['picked at'])} s)" if row["picked"] else ""
            away = "none, it listened first" if row["down"] < 0 else f"{row['down']:.1f} s"
            new = ", ".join(f"{n:.2f}" for n in row.get("new audio", [])) or "none"
            new += " s" if row.get("new audio") else ""
            print(
                f"| {name} | {index + 1} | {row['completed']} | {row['picked']}{at} | {row['cut']} "
                f"| {row['not run']} "
                f"| {row['error']} | {median:.1f} s, {longest:.1f} s | {away} "
                f"({row['exit']:.1f} s; {row['start']:.1f} s) "
                f"| {first} | {last} | {new} |"
            )


if __name__ == "__main__":
    main()
