"""Text to speech: real-time factor and time to first audio through the server,
against transformers' own ``generate`` plus a one-shot codec decode (what the
replaced HTTP server did: the whole clip at the end) on the same model.

The server runs as its own process (``wavecast serve``), as in production:

    .venv/bin/python bench/bench_tts.py --model tiny-higgs --max-new-tokens 250
    .venv/bin/python bench/bench_tts.py --model random-higgs-3b --device cuda

``--engine-only`` steps the engine in the benchmark's own process instead of
starting a server (for models too large to hold twice in memory).
``--voice-seconds S``: every request (and the baseline) speaks in a named voice
of S seconds with its transcript (the server's ``--voices-dir``);
``--prefix-cache-mb``: the server's (its default if not given).

Prints a Markdown section for bench/RESULTS.md. Client-side times run from
sending ``generate`` to the first ``audio`` frame and to ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from bench_stream import (
    Crowd,
    add_server_arguments,
    measure_server,
    report,
    speech_text,
    sync,
    timed,
)
from transformers import GenerationConfig

from wavecast.clients import connect
from wavecast.server.engines import resolve_device
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.higgs.engine import HiggsEngine
from wavecast.server.engines.higgs.loading import load_higgs
from wavecast.server.engines.higgs.prompt import PromptAudio
from wavecast.server.engines.higgs.voices import load_voices

VOICE = "bench"
TRANSCRIPT = "This is how I sound when I read a story aloud, slowly and clearly."

TEXT = (
    "The sun rises in the east and sets in the west. This simple fact has been "
    "observed by humans for thousands of years."
)


def params(engine: HiggsEngine, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    given: dict[str, Any] = {spec.name: spec.default for spec in engine.info.params}
    given.update(max_new_tokens=args.max_new_tokens, seed=seed)
    if args.voice_seconds:
        given.update(voice=VOICE)
    if args.chunk_words:
        given.update(chunk_method="word", chunk_max_word_num=args.chunk_words)
    return given


def baseline(engine: HiggsEngine, args: argparse.Namespace, device: str) -> list[float]:
    """Wall seconds of the original loop: ``generate`` per chunk, each prompted with
    the chunks before it, with the server's defaults; then one decode of it all."""
    config = None
    k = engine.num_codebooks
    times = []
    for _ in range(args.runs):
        st = engine.prepare(EngineRequest("b", TEXT, params(engine, args, 0))).state
        config = GenerationConfig(
            do_sample=True,
            temperature=st.temperature,
            top_k=st.top_k,
            top_p=st.top_p,
            max_new_tokens=args.max_new_tokens,
            ras_win_len=st.ras_win_len,
            ras_win_max_num_repeat=st.ras_max_repeat,
            return_dict_in_generate=True,
        )
        sync(device)
        start = time.perf_counter()
        spoken = []
        for index, chunk in enumerate(st.chunks):
            st.index = index
            input_ids, audio_ids = engine.tokenize(engine.chunk_prompt(st))
            kwargs: dict[str, Any] = {}
            if audio_ids is not None:
                kwargs["audio_input_ids"] = audio_ids
                kwargs["audio_input_ids_mask"] = torch.ones(
                    audio_ids.shape[:2], dtype=torch.bool, device=audio_ids.device
                )
            out = engine.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                **kwargs,
            )
            start_row = 0 if audio_ids is None else audio_ids.shape[1]
            rows = out.audio_sequences[0, start_row + 1 :]
            frames = rows.shape[0] - (k - 1)
            codes = torch.stack([rows[i : i + frames, i] for i in range(k)]).clamp(
                0, engine.stream_bos - 1
            )
            spoken.append(codes)
            st.history.append((chunk, PromptAudio(codes.cpu().numpy())))
        engine.codec.decode(torch.cat(spoken, dim=1).unsqueeze(0))
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def engine_run(engine: HiggsEngine, args: argparse.Namespace, seed: int) -> dict[str, float]:
    job = engine.prepare(EngineRequest("e", TEXT, params(engine, args, seed)))
    start = time.perf_counter()
    first = None
    samples = 0
    while True:
        (out,) = engine.step([job])
        if out.audio is not None:
            samples += out.audio.shape[0]
            if first is None:
                first = time.perf_counter() - start
        if out.done:
            break
    wall = time.perf_counter() - start
    engine.finish(job)
    assert first is not None
    audio = samples / engine.sample_rate
    return {"ttfa": first, "wall": wall, "audio": audio, "rtf": audio / wall}


async def one(url: str, model: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    text = speech_text(seed) if args.varied_texts else TEXT
    async with connect(url) as client:
        start = time.perf_counter()
        chunking: dict[str, Any] = {}
        if args.chunk_words:
            chunking = {"chunk_method": "word", "chunk_max_word_num": args.chunk_words}
        voice = VOICE if args.voice_seconds else None
        stream = await client.speak(
            model,
            text,
            voice=voice,
            max_new_tokens=args.max_new_tokens,
            seed=seed,
            sample_rate=args.sample_rate,
            format=args.format,
            **chunking,
        )
        return await timed(stream, start)


def voices_dir(folder: Path, seconds: float) -> Path:
    """A voices folder (``--voices-dir``) holding one voice of ``seconds``, with
    its transcript."""
    t = np.arange(int(16000 * seconds)) / 16000
    sound = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    soundfile.write(folder / f"{VOICE}.wav", sound, 16000)
    (folder / f"{VOICE}.txt").write_text(TRANSCRIPT)
    return folder


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args.server_extra = []
        voices = None
        if args.voice_seconds:
            folder = voices_dir(Path(tmp), args.voice_seconds)
            voices = load_voices(folder)
            args.server_extra += ["--voices-dir", str(folder)]
        if args.prefix_cache_mb is not None:
            args.server_extra += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
        await _bench(args, voices)


async def _bench(args: argparse.Namespace, voices: Any) -> None:
    device = resolve_device(args.device)
    engine = HiggsEngine(load_higgs(args.model, None, device), name=args.model, voices=voices)
    chunks = len(engine.prepare(EngineRequest("n", TEXT, params(engine, args, 0))).state.chunks)
    # Random weights speak until max_new_tokens in every chunk.
    audio_seconds = chunks * (args.max_new_tokens - engine.num_codebooks) / engine.frame_rate
    base = baseline(engine, args, device)
    conc: dict[int, list[Crowd]] = {}
    if args.engine_only:
        engine_run(engine, args, 0)  # warm-up
        seq = [engine_run(engine, args, seed) for seed in range(args.runs)]
    else:
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        seq, conc = await measure_server(
            args, lambda url, index: one(url, args.model, args, max(index, 0))
        )

    report(
        f"{args.model} on {device}, speech, {chunks} chunk(s) of {args.max_new_tokens} "
        f"frames ({audio_seconds:g} s), {args.runs} runs (median)"
        + (", texts of different lengths" if args.varied_texts else "")
        + (f", a named voice of {args.voice_seconds:g} s" if args.voice_seconds else "")
        + ("" if args.prefix_cache_mb is None else f", --prefix-cache-mb {args.prefix_cache_mb:g}")
        + (f", at {args.sample_rate} Hz" if args.sample_rate else "")
        + (f", in {args.format}" if args.format != "pcm_s16le" else ""),
        device,
        ("transformers `generate` + decode", "generate"),
        base,
        audio_seconds,
        ("engine in-process" if args.engine_only else "wavecast stream, 1 client", seq),
        conc,
        args.threads,
        getattr(args, "server_cpu", None),
        getattr(args, "server_codec", None),
        getattr(args, "client_cpu", None),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-higgs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=250)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--engine-only", action="store_true")
    add_server_arguments(parser)
    parser.add_argument(
        "--chunk-words",
        type=int,
        default=0,
        help="speak the text in chunks of this many words (0: in one go)",
    )
    parser.add_argument(
        "--varied-texts",
        action="store_true",
        help="through the server: request i speaks the i-th of eight texts of different "
        "lengths (a crowd's prompts differ), not all the same one",
    )
    parser.add_argument(
        "--voice-seconds", type=float, default=0.0, help="a named voice this long (0: none)"
    )
    parser.add_argument(
        "--prefix-cache-mb", type=float, default=None, help="the server's (default: its own)"
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=None,
        help="through the server: every stream at this rate (resampled as it streams)",
    )
    parser.add_argument(
        "--format",
        default="pcm_s16le",
        help="through the server: every stream in this format (mp3, opus, flac: encoded "
        "by the server as it streams)",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
