"""What a stream in MP3, Ogg Opus or FLAC costs, weighs, and when it is heard.

A request may ask for its audio as one compressed file (``format``: ``mp3``,
``opus``, ``flac``); the server encodes each chunk as it comes, in a pool of
threads apart from the inference thread (``server.encode``). Two parts:

- in process, for each format at the models' rates: the encoder's CPU time per
  second of audio, the file's bit rate, and how much audio (pushed in 20 ms
  chunks, as the engines' first chunks are) goes in before the file holds a
  first decodable sample;
- through a server (``wavecast serve``, the tiny test models): one stream's
  first chunk and first decodable audio after ``started``, its bytes per
  second of audio and its real-time factor, for each format, the requests
  taking turns.

    .venv/bin/python bench/bench_formats.py --runs 15

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from typing import Any

import av
import numpy as np
from bench_stream import print_header, tiny_server

from wavecast.clients import connect
from wavecast.protocol import Audio, Done, Started
from wavecast.server.encode import Encoder

CASES = [  # (format, rate, channels): the models' rates, and Opus's 48 kHz for music
    ("opus", 48000, 1),
    ("opus", 24000, 1),
    ("opus", 48000, 2),
    ("mp3", 32000, 1),
    ("mp3", 24000, 1),
    ("mp3", 32000, 2),
    ("flac", 32000, 1),
    ("flac", 24000, 1),
    ("flac", 32000, 2),
]
FORMATS = ["pcm_s16le", "opus", "mp3", "flac"]


def signal_like_music(rate: int, seconds: float, channels: int) -> np.ndarray[Any, Any]:
    """Chords of harmonics under a varying envelope, and a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    out = np.zeros_like(t)
    for root in (110.0, 138.6, 164.8):
        for harmonic in range(1, 8):
            out += np.sin(2 * np.pi * root * harmonic * t + rng.random() * 6) / harmonic
    out *= 0.05 * (1.2 + np.sin(2 * np.pi * 0.5 * t))
    out += 0.01 * rng.standard_normal(t.size)
    return np.repeat(out[:, None], channels, axis=1).astype(np.float32)


def decodable_frames(data: bytes) -> int:
    """Samples a (maybe partial) file decodes to; 0 where none yet."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return sum(frame.samples for frame in container.decode(audio=0))
    except (av.FFmpegError, IndexError, ValueError):
        return 0


def in_process(seconds: float) -> list[str]:
    rows = []
    for format, rate, channels in CASES:
        audio = signal_like_music(rate, seconds, channels)
        step = rate // 50  # 20 ms
        costs, sizes = [], []
        for _ in range(3):
            encoder = Encoder(format, rate, channels)
            began = time.process_time()
            size = sum(
                len(encoder.push(audio[at : at + step])) for at in range(0, len(audio), step)
            )
            size += len(encoder.close())
            costs.append((time.process_time() - began) / seconds * 1e3)
            sizes.append(size)
        encoder = Encoder(format, rate, channels)
        data, pushed, first = b"", 0, 0
        while pushed < len(audio) and not first:
            data += encoder.push(audio[pushed : pushed + step])
            pushed += step
            first = decodable_frames(data) if data else 0
        kbits = statistics.median(sizes) * 8 / seconds / 1e3
        rows.append(
            f"| {format} | {rate} | {channels} | {statistics.median(costs):.2f} | "
            f"{kbits:.0f} | {pushed / rate * 1e3:.0f} ms |"
        )
    return rows


async def one(url: str, model: str, format: str, seed: int) -> dict[str, float]:
    """One request: its first chunk and first decodable audio after ``started``
    (ms), its bytes per second of audio, its real-time factor."""
    async with connect(url) as client:
        if model == "tiny-higgs":
            stream = await client.speak(
                model, "Hello there, how are you?", max_new_tokens=120, seed=seed, format=format
            )
        else:
            stream = await client.generate(model, "x", duration=4.0, seed=seed, format=format)
        started = first_chunk = first_audio = None
        data = b""
        async for event in stream:
            now = time.perf_counter()
            if isinstance(event, Started):
                started = now
            elif isinstance(event, Audio) and started is not None:
                data += event.data
                first_chunk = first_chunk or now - started
                if first_audio is None and (format.startswith("pcm") or decodable_frames(data) > 0):
                    first_audio = now - started
            elif isinstance(event, Done):
                assert event.status == "completed" and event.stats is not None, event
                assert first_chunk is not None and first_audio is not None
                return {
                    "chunk": first_chunk * 1e3,
                    "audio": first_audio * 1e3,
                    "bytes": len(data) / event.stats.audio_seconds,
                    "rtf": event.stats.real_time_factor,
                }
    raise AssertionError("no done")


async def through_server(args: argparse.Namespace) -> list[str]:
    models = ["tiny-musicgen", "tiny-higgs"]
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tiny_server(models) as url:
        for model in models:
            for format in FORMATS:
                await one(url, model, format, 0)  # (warm: the encoders' first streams)
        for run in range(args.runs):
            for model in models:
                for format in FORMATS:  # taking turns
                    results.setdefault((model, format), []).append(
                        await one(url, model, format, run)
                    )
    rows = []
    for (model, format), runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        rows.append(
            f"| {model} | {format} | {median['chunk']:.1f} | {median['audio']:.1f} | "
            f"{median['bytes'] * 8 / 1e3:.0f} | x{median['rtf']:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="requests per model and format")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio a case, in process")
    args = parser.parse_args()
    print_header(
        "streams in MP3, Ogg Opus and FLAC",
        f"python bench/bench_formats.py --runs {args.runs} --seconds {args.seconds:g}",
    )
    print(
        f"In process, {args.seconds:g} s of chords and a little noise pushed in 20 ms chunks "
        "(medians of three); the audio pushed before the file decodes to a first sample:"
    )
    print()
    print(
        "| format | rate (Hz) | channels | CPU ms per s of audio | kbit/s "
        "| audio in before a first sample |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(in_process(args.seconds)))
    print()
    print(
        f"Through the server (tiny models: random weights, noise; one request at a time, "
        f"{args.runs} each, the formats taking turns; medians). After `started`: the first "
        "chunk, and the first that makes the file decode to a sample:"
    )
    print()
    print("| model | format | first chunk (ms) | first audio (ms) | kbit/s | real-time factor |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(asyncio.run(through_server(args))))


if __name__ == "__main__":
    main()
