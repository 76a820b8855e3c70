"""``wavecast serve``: flags and ``WAVECAST_*`` environment variables -> Config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .config import (
    DEFAULT_MODEL,
    DTYPES,
    Config,
    LimitsConfig,
    LoggingConfig,
    ModelsConfig,
    NetworkConfig,
    TimeoutsConfig,
)

__all__ = ["add_serve_arguments", "config_from_args", "run_serve"]

log = logging.getLogger("wavecast.server")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"WAVECAST_{name}", default)


def _graphs_env() -> bool | None:
    """``WAVECAST_CUDA_GRAPHS``: 1 on, 0 off; unset (or empty), on where the device
    is CUDA."""
    value = _env("CUDA_GRAPHS", "") or ""
    if value not in ("", "0", "1"):
        raise SystemExit(f"WAVECAST_CUDA_GRAPHS must be 1 or 0, not {value!r}")
    return None if value == "" else value == "1"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    limits = LimitsConfig()
    parser.add_argument(
        "--host",
        default=_env("HOST", NetworkConfig().host),
        help="address to listen on (env WAVECAST_HOST; default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", "5555") or 5555),
        help="port; 0 picks a free one (env WAVECAST_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=_env("REUSE_PORT", "") == "1",
        help="listen with SO_REUSEPORT, so that a new server (started with it too) may "
        "listen on the port while this one still runs: start the new one, wait for its "
        "/readyz, then SIGTERM this one (a restart with no gap; env WAVECAST_REUSE_PORT=1)",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model to serve, repeatable: a Hugging Face name such as "
        f"{DEFAULT_MODEL} or bosonai/higgs-audio-v2-generation-3B-base, a local "
        "checkpoint folder, or tiny-musicgen / tiny-higgs "
        "(offline random-weight test models) (env WAVECAST_MODEL, "
        f"comma-separated; default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--device",
        default=_env("DEVICE", "auto"),
        help="auto | cpu | cuda | cuda:N (env WAVECAST_DEVICE)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=_env("DTYPE", "auto"),
        help="the generators' number format (the codecs decode in float32); auto: "
        "bfloat16 for HiggsAudio and float16 for MusicGen on CUDA, float32 on a CPU "
        "(bfloat16 on a CPU with AMX or AVX-512 BF16 makes a large model's steps over "
        "several requests much cheaper) (env WAVECAST_DTYPE; default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(_env("THREADS", "0") or 0),
        help="CPU threads of the model's operations (env WAVECAST_THREADS; default 0: "
        "one core fewer than the machine has, leaving one to the network)",
    )
    parser.add_argument(
        "--encoder-threads",
        type=int,
        default=int(_env("ENCODER_THREADS", "0") or 0),
        help="threads encoding the streams asked for in MP3, Ogg Opus or FLAC, off the "
        "inference thread and below its priority (env WAVECAST_ENCODER_THREADS; default 0: "
        "a core each but two, from one to eight)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=int(_env("MAX_QUEUE", str(limits.max_queue)) or 0)
    )
    parser.add_argument(
        "--max-active",
        type=int,
        default=int(_env("MAX_ACTIVE", str(limits.max_active)) or 0),
        help="requests generated at once per device, one batched step for all of a "
        "model's (env WAVECAST_MAX_ACTIVE; default 0: as many as the device's memory "
        "holds, up to 64 on a GPU and 16 on a CPU, 4 for a model slower there than 4x real "
        "time)",
    )
    parser.add_argument(
        "--admission",
        choices=("realtime", "slots"),
        default=_env("ADMISSION", limits.admission),
        help="realtime: start a request only while every running stream stays faster "
        "than real time (measured); slots: up to --max-active whatever the speed "
        "(env WAVECAST_ADMISSION; default %(default)s)",
    )
    parser.add_argument(
        "--max-requests-per-connection", type=int, default=limits.max_requests_per_connection
    )
    parser.add_argument("--max-frame-bytes", type=int, default=limits.max_frame_bytes)
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=limits.max_prompt_chars,
        help="longest prompt (music description or text to speak)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help="open connections at once (beyond: closed with 1013)",
    )
    parser.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=limits.max_connections_per_ip,
        help="open connections from one client address (beyond: closed with 1013)",
    )
    parser.add_argument("--send-buffer-bytes", type=int, default=limits.send_buffer_bytes)
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=float(_env("DRAIN_SECONDS", str(TimeoutsConfig().shutdown_grace)) or 5.0),
        help="on SIGTERM: /readyz turns 503, new requests are refused, and the ones "
        "running get this long to finish before they end with shutting_down; a queued one "
        "starts only where it would finish in half the time left, else ends at once",
    )
    parser.add_argument(
        "--max-duration",
        type=float,
        default=float(_env("MAX_DURATION", str(limits.max_duration)) or 0),
        help="longest request in seconds; past a model's window it is "
        "generated in windows (env WAVECAST_MAX_DURATION; default %(default)s)",
    )
    parser.add_argument("--max-upload-bytes", type=int, default=limits.max_upload_bytes)
    parser.add_argument("--max-upload-seconds", type=float, default=limits.max_upload_seconds)
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=ModelsConfig().chunk_frames,
        help="codec frames per audio chunk after the first",
    )
    parser.add_argument(
        "--prefill-budget-ms",
        type=float,
        default=ModelsConfig().prefill_budget_ms,
        help="time per decoding step given to preparing new requests and prefilling "
        "prompts (default %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=ModelsConfig().prefix_cache_mb,
        help="memory per speech model for the keys and values of prompt beginnings "
        "that requests share (a named voice, a scene), prefilled once "
        "(default %(default)s; 0: none kept)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=ModelsConfig().max_prompt_tokens,
        help="MusicGen: longest description in the text encoder's tokens (default %(default)s)",
    )
    parser.add_argument(
        "--codec-batch",
        type=int,
        default=ModelsConfig().codec_batch,
        help="streams' audio chunks decoded in one codec call at most; more streams "
        "take their chunks on other steps (default: measured at warm-up)",
    )
    parser.add_argument(
        "--codec-windows",
        action="store_true",
        default=ModelsConfig().codec_windows,
        help="re-decode windows of codes for each chunk instead of running the codec's "
        "decoder incrementally (the same audio, more work; to compare)",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        default=_env("REMEASURE", "") == "1",
        help="measure what the warm-up measures (the codec's forms and chunks per call, "
        "the context's cost) again, and keep that, rather than take what a start before "
        "kept for the same model, settings and machine in WAVECAST_CACHE_DIR (env "
        "WAVECAST_REMEASURE=1)",
    )
    parser.add_argument(
        "--max-chunk-frames",
        type=int,
        default=ModelsConfig().max_chunk_frames,
        help="MusicGen: largest chunk, while a stream is well ahead of real time "
        "(larger chunks cost less codec work per second of audio)",
    )
    parser.add_argument(
        "--mbd",
        action="store_true",
        default=_env("MBD", "") == "1",
        help="load Multi-Band Diffusion (from the hub) so that requests may ask for mbd "
        "(env WAVECAST_MBD=1)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=_graphs_env(),
        help="replay the batched decode step as CUDA graphs, one per shape, all "
        "recorded at start-up for --max-active requests (default: on where the "
        "device is CUDA, where a step launches in a fraction of the eager step's "
        "time; env WAVECAST_CUDA_GRAPHS=1 or 0)",
    )
    parser.add_argument(
        "--pipelined-steps",
        action=argparse.BooleanOptionalAction,
        default=_env("PIPELINED_STEPS", "") == "1",
        help="launch each decode step before the last one's outputs are handled, so "
        "that on a GPU the host's part of a step (the codes' bookkeeping, the codec's "
        "calls, the messages) runs while the device computes the next (MusicGen: "
        "before the last one's codes are read; speech: once its rules are kept); the "
        "same codes and audio, each step's output a step later (default: off; env "
        "WAVECAST_PIPELINED_STEPS=1)",
    )
    parser.add_argument(
        "--voices-dir",
        type=Path,
        default=_env("VOICES_DIR", None),
        help="text to speech: a folder of NAME.wav reference voices, each with an optional "
        "NAME.txt transcript (env WAVECAST_VOICES_DIR)",
    )
    parser.add_argument(
        "--scenes-dir",
        type=Path,
        default=_env("SCENES_DIR", None),
        help="text to speech: a folder of NAME.txt scene descriptions "
        "(env WAVECAST_SCENES_DIR; default: the built-in scenes)",
    )
    parser.add_argument(
        "--higgs-codec",
        default=_env("HIGGS_CODEC", None),
        metavar="NAME",
        help="HiggsAudio audio tokenizer: a Hugging Face name or folder (default: the model "
        "folder's audio_tokenizer/, else bosonai/higgs-audio-v2-tokenizer)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=int(_env("MAX_NEW_TOKENS", "2048") or 2048),
        help="text to speech: largest max_new_tokens a request may ask for (audio frames "
        "per chunk; default %(default)s)",
    )
    parser.add_argument("--web-demo", type=Path, default=None, help="serve this folder at /")
    env_keys = _env("API_KEYS", "")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        default=[k.strip() for k in (env_keys or "").split(",") if k.strip()],
        help="require this key (Authorization: Bearer KEY, or ?token=KEY) for streams, "
        "/v1/* and /metrics; repeat for more (WAVECAST_API_KEYS: comma-separated)",
    )
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        default=_env("API_KEYS_FILE", None),
        metavar="FILE",
        help="keys, one per line (# comments), as --api-key",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("TLS_CERT", None),
        metavar="FILE",
        help="serve https and wss with this certificate (PEM, intermediates after it; "
        "its key too unless --tls-key); SIGHUP reads it again (env WAVECAST_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=_env("TLS_KEY", None),
        metavar="FILE",
        help="the certificate's private key (PEM, not encrypted; env WAVECAST_TLS_KEY)",
    )
    env_origins = _env("ALLOW_ORIGINS", "")
    parser.add_argument(
        "--allow-origin",
        action="append",
        dest="allowed_origins",
        metavar="ORIGIN",
        default=[o.strip() for o in (env_origins or "").split(",") if o.strip()],
        help="a browser origin (https://app.example.com) whose pages may open streams, "
        "besides this server's own page and non-browser clients; repeat for more; '*': any",
    )
    env_proxies = _env("FORWARDED_ALLOW_IPS", "")
    parser.add_argument(
        "--forwarded-allow-ips",
        action="append",
        dest="forwarded_allow_ips",
        metavar="ADDRESS",
        default=[a.strip() for a in (env_proxies or "").split(",") if a.strip()],
        help="a load balancer's address or network (10.0.0.0/8; '*': any peer) whose "
        "X-Forwarded-For header names the client, for --max-connections-per-ip and the "
        "logs; repeat for more; default: none (the header is ignored)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", "text")
    )
    parser.add_argument("--log-file", type=Path, default=_env("LOG_FILE", None))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))


def _api_keys(given: list[str], file: Path | None) -> tuple[str, ...]:
    keys = list(given)
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"wavecast: cannot read --api-keys-file {file}: {exc}") from exc
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def _proxies(given: list[str]) -> tuple[str, ...]:
    from .http import trusted_proxies

    try:
        trusted_proxies(tuple(given))
    except ValueError as exc:
        raise SystemExit(f"wavecast: --forwarded-allow-ips: {exc}") from exc
    return tuple(given)


def _tls_key(cert: Path | None, key: Path | None) -> Path | None:
    if key is not None and cert is None:
        raise SystemExit("wavecast: --tls-key needs --tls-cert (the certificate it is the key of)")
    return key


def config_from_args(args: argparse.Namespace) -> Config:
    env_models = _env("MODEL", None)
    names = tuple(args.models or (env_models.split(",") if env_models else [DEFAULT_MODEL]))
    return Config(
        network=NetworkConfig(
            host=args.host,
            port=args.port,
            reuse_port=args.reuse_port,
            web_demo=args.web_demo,
            allowed_origins=tuple(args.allowed_origins),
            forwarded_allow_ips=_proxies(args.forwarded_allow_ips),
            api_keys=_api_keys(args.api_keys, args.api_keys_file),
            tls_cert=args.tls_cert,
            tls_key=_tls_key(args.tls_cert, args.tls_key),
        ),
        limits=LimitsConfig(
            max_frame_bytes=args.max_frame_bytes,
            max_prompt_chars=args.max_prompt_chars,
            max_connections=args.max_connections,
            max_connections_per_ip=max(1, args.max_connections_per_ip),
            max_requests_per_connection=args.max_requests_per_connection,
            max_queue=args.max_queue,
            max_active=args.max_active,
            admission=args.admission,
            send_buffer_bytes=args.send_buffer_bytes,
            max_duration=args.max_duration,
            max_upload_bytes=args.max_upload_bytes,
            max_upload_seconds=args.max_upload_seconds,
        ),
        timeouts=TimeoutsConfig(shutdown_grace=max(0.0, args.drain_seconds)),
        models=ModelsConfig(
            names=names,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            encoder_threads=max(0, args.encoder_threads),
            chunk_frames=args.chunk_frames,
            max_chunk_frames=args.max_chunk_frames,
            codec_batch=max(0, args.codec_batch),
            codec_windows=args.codec_windows,
            remeasure=args.remeasure,
            prefill_budget_ms=args.prefill_budget_ms,
            max_prompt_tokens=args.max_prompt_tokens,
            mbd=args.mbd,
            cuda_graphs=args.cuda_graphs,
            pipelined_steps=args.pipelined_steps,
            higgs_codec=args.higgs_codec,
            voices_dir=args.voices_dir,
            scenes_dir=args.scenes_dir,
            max_new_tokens=args.max_new_tokens,
            prefix_cache_mb=max(0.0, args.prefix_cache_mb),
        ),
        logging=LoggingConfig(format=args.log_format, file=args.log_file, level=args.log_level),
    )


async def _serve(config: Config) -> None:
    from .app import ListenError, WavecastServer
    from .engines import ModelLoadError
    from .engines.higgs.voices import VoiceLoadError
    from .tls import TlsError

    server = WavecastServer(config)
    try:
        await server.start()
    except TlsError as exc:
        log.error("--tls-cert: %s", exc)
        raise SystemExit(1) from None
    except (ModelLoadError, VoiceLoadError, ListenError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload_certificates())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if server.certificates is not None:
        # SIGHUP: a renewed certificate (as nginx reads its own); without TLS, the default.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def run_serve(args: argparse.Namespace) -> NoReturn:
    """Serve until SIGINT or SIGTERM, then end the process.

    Once the server has stopped (its requests ended, its inference thread joined,
    its log written), the process ends at once, without the interpreter's
    teardown: that is garbage collections over the models' objects and every
    module's, seconds on a CPU (bench/RESULTS.md, a restart), while a restart's
    clients wait for the next server. A failed start raises as any error does.
    """
    from .logs import setup_logging

    config = config_from_args(args)
    writer = setup_logging(config.logging.format, config.logging.file, config.logging.level)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is not available on every platform
            asyncio.run(_serve(config))
        else:
            uvloop.run(_serve(config))
    finally:
        writer.stop()  # (the last lines: shutting down, and any error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="wavecast serve")
    add_serve_arguments(parser)
    run_serve(parser.parse_args())
