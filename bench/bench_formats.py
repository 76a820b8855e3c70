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
  taking turns;
- a stream picked up (``generate.resume``, from its codes): a clip of
  ``--pickup-seconds`` of tiny-musicgen cut half way, asked again from its
  client's bytes (a file: and their ``until``), to its first new audio, in
  PCM and each format (a file's audio made again is all encoded again);
- MP3 as the server writes it (each frame with its own bits) against LAME
  with its bit reservoir: the signal to noise of the decoded file.

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
from wavecast.server.encode import _MUXERS, Encoder, bit_rate

MP3_DELAY = 1105  # LAME's encoder delay, in samples

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


# A clip picked up: each format at the server's rate for it, and PCM at 48 kHz
# (resampled from the model's 32 kHz).
PICKUPS = [(format, None) for format in FORMATS] + [("pcm_s16le", 48000)]


async def picked_up(
    url: str, format: str, rate: int | None, seconds: float, seed: int
) -> tuple[float, float]:
    """A clip of ``seconds`` made whole, then asked again cut half way (from its
    codes): ms to the first audio of each."""
    async with connect(url) as client:
        asked = {"duration": seconds, "seed": seed, "format": format, "codes": True}
        asked["sample_rate"] = rate
        began = time.perf_counter()
        whole, first = [], None
        async for event in await client.generate("tiny-musicgen", "x", **asked):
            if isinstance(event, Audio) and event.rendition is None:
                first = first or time.perf_counter() - began
                whole.append(event)
        have: list[Audio] = []
        for event in whole:  # (half way: by frames, or by what a file's bytes hold)
            held = event.until if event.until is not None else event.offset + event.frames
            have.append(event)
            if held >= seconds * event.sample_rate / 2:
                break
        encoded = have[-1].until is not None
        resume = sum(len(a.data) for a in have) if encoded else held
        began = time.perf_counter()
        stream = await client.generate(
            "tiny-musicgen",
            "x",
            **asked,
            resume=resume,
            resume_until=held if encoded else None,
            resume_codes=b"".join(a.codes or b"" for a in have),
        )
        again = None
        async for event in stream:
            if isinstance(event, Audio) and again is None:
                again = time.perf_counter() - began
        assert first is not None and again is not None
        return first * 1e3, again * 1e3


async def pickups(args: argparse.Namespace) -> list[str]:
    results: dict[tuple[str, int | None], list[tuple[float, float]]] = {}
    with tiny_server(["tiny-musicgen"]) as url:
        for format, rate in PICKUPS:
            await picked_up(url, format, rate, args.pickup_seconds, 0)  # (warm)
        for run in range(args.runs):
            for format, rate in PICKUPS:  # taking turns
                results.setdefault((format, rate), []).append(
                    await picked_up(url, format, rate, args.pickup_seconds, run)
                )
    return [
        f"| {format} | {rate or 'its own'} | {statistics.median(r[0] for r in runs):.1f} | "
        f"{statistics.median(r[1] for r in runs):.1f} |"
        for (format, rate), runs in results.items()
    ]


def mp3_snr(audio: np.ndarray[Any, Any], rate: int, reservoir: bool) -> float:
    """The decoded MP3's signal to noise (dB), LAME with or without its bit
    reservoir (the server's: without), at the server's bit rate."""
    if not reservoir:
        encoder = Encoder("mp3", rate, audio.shape[1])
        data = encoder.push(audio) + encoder.close()
    else:
        out = io.BytesIO()
        options = {"fflags": "+bitexact", "id3v2_version": "0", "write_xing": "0"}
        with av.open(out, mode="w", format=_MUXERS["mp3"][0], options=options) as container:
            layout = "mono" if audio.shape[1] == 1 else "stereo"
            stream: Any = container.add_stream("libmp3lame", rate=rate, layout=layout)
            stream.bit_rate = bit_rate("mp3", rate, audio.shape[1])
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio).reshape(1, -1), format="flt", layout=layout
            )
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
        data = out.getvalue()
    with av.open(io.BytesIO(data)) as container:
        parts = [
            f.to_ndarray().reshape(-1, audio.shape[1]) if f.format.is_packed else f.to_ndarray().T
            for f in container.decode(audio=0)
        ]
    decoded = np.concatenate(parts)[MP3_DELAY : MP3_DELAY + len(audio)].astype(np.float64)
    error = decoded - audio[: len(decoded)]
    return float(10 * np.log10((audio[: len(decoded)] ** 2).sum() / (error**2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="requests per model and format")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio a case, in process")
    parser.add_argument(
        "--pickup-seconds", type=float, default=30.0, help="the clip picked up half way"
    )
    args = parser.parse_args()
    print_header(
        "streams in MP3, Ogg Opus and FLAC",
        f"python bench/bench_formats.py --runs {args.runs} --seconds {args.seconds:g} "
        f"--pickup-seconds {args.pickup_seconds:g}",
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
    print()
    print(
        f"A stream picked up: tiny-musicgen, {args.pickup_seconds:g} s clips made whole, then "
        "asked again cut half way from their codes (medians); to the first audio:"
    )
    print()
    print("| format | rate (Hz) | a fresh request (ms) | picked up half way (ms) |")
    print("| --- | --- | ---: | ---: |")
    print("\n".join(asyncio.run(pickups(args))))
    print()
    print(
        f"MP3 as the server writes it, each frame with its own bits, against LAME with its bit "
        f"reservoir ({args.seconds:g} s of the chords above, the server's bit rates): the "
        "decoded file's signal to noise:"
    )
    print()
    print("| rate (Hz) | channels | kbit/s | reservoir (dB) | own bits (dB) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rate, channels in [(24000, 1), (32000, 1), (32000, 2), (48000, 1)]:
        audio = signal_like_music(rate, args.seconds, channels)
        print(
            f"| {rate} | {channels} | {bit_rate('mp3', rate, channels) // 1000} | "
            f"{mp3_snr(audio, rate, True):.2f} | {mp3_snr(audio, rate, False):.2f} |"
        )


if __name__ == "__main__":
    main()
