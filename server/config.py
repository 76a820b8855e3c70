"""Server configuration: one frozen dataclass with grouped fields.

The CLI maps flags and ``WAVECAST_*`` environment variables onto it; nothing
else parses arguments. Every limit here is documented in PROTOCOL.md §7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DTYPES",
    "Config",
    "LimitsConfig",
    "LoggingConfig",
    "ModelsConfig",
    "NetworkConfig",
    "TimeoutsConfig",
]

DEFAULT_MODEL = "facebook/musicgen-small"
# The generators' number formats (--dtype); "auto": what each family ships for the
# device (CUDA: bfloat16 for HiggsAudio, float16 for MusicGen; CPU: float32).
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    # Listen with SO_REUSEPORT: a new server may listen on the port of one still
    # running (both started with it), so that a restart on one host has no gap.
    reuse_port: bool = False
    web_demo: Path | None = None  # folder served at /; None: the bundled page
    # Browser origins besides the page's own that may open streams ("*": any).
    allowed_origins: tuple[str, ...] = ()
    # Peers (load balancers) whose X-Forwarded-For names the client (CIDR or "*");
    # none: the header is ignored and the peer is the client.
    forwarded_allow_ips: tuple[str, ...] = ()
    # Keys a client must present (Authorization: Bearer KEY, or ?token=KEY); none: open.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # HTTPS and WSS (server/tls.py): the certificate chain (PEM) and its key (PEM; None:
    # in the certificate's file); no certificate: plain HTTP and WS.
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_frame_bytes: int = 24 << 20
    max_requests_per_connection: int = 8
    max_queue: int = 32
    # Requests decoded at once per device; 0: as many as the device's memory holds
    # (``kv.auto_most``: up to 64 on a GPU, 16 on a CPU, 4 for a model slower there
    # than 4x real time), found as the models load.
    max_active: int = 0
    # "realtime": admit a request only while every running stream stays faster
    # than real time (measured); "slots": up to max_active, whatever the speed.
    admission: str = "realtime"
    max_prompt_chars: int = 10000  # speech texts may be long (chunked)
    send_buffer_bytes: int = 8 << 20
    max_connections: int = 256
    max_connections_per_ip: int = 32  # open connections from one client address
    max_upload_bytes: int = 16 << 20
    max_upload_seconds: float = 60.0
    max_duration: float = 300.0  # long form: beyond a model's window, by extension


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    shutdown_grace: float = 5.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    open_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    names: tuple[str, ...] = (DEFAULT_MODEL,)
    device: str = "auto"
    dtype: str = "auto"  # one of DTYPES
    threads: int = 0  # torch's CPU threads; 0: one core fewer than the machine has
    # Threads encoding streams asked for in MP3, Opus or FLAC (server/encode.py);
    # 0: a core each but two, from one to eight.
    encoder_threads: int = 0
    mbd: bool = False  # load the released Multi-Band Diffusion for the 32 kHz models
    # Replay the batched decode step as CUDA graphs; None: where the device is CUDA.
    cuda_graphs: bool | None = None
    # Launch each decode step before the last one's outputs are handled, so that
    # on a GPU the host's part of a step overlaps the device's next one.
    pipelined_steps: bool = False
    # Exact streaming geometry (frames of codes): see engines/codec_stream.py.
    # The left context is what a continuation's prompt primes the codec with
    # (and each window's, when windows are decoded); the hold-back is the
    # windows' alone (the incremental decoder waits for its own lookahead).
    left_context_frames: int = 25
    holdback_frames: int = 4
    first_chunk_frames: int = 1
    chunk_frames: int = 10
    max_chunk_frames: int = 50  # MusicGen: chunks grow to this while well ahead of real time
    # Streams' codec chunks decoded in one call at most (many due in a step);
    # 0: measured at warm-up (on a CPU a few at once cost least per chunk).
    codec_batch: int = 0
    # Re-decode windows of codes instead of running the codec's decoder
    # incrementally (engines/codec_incremental.py), to compare the two.
    codec_windows: bool = False
    # Measure the warm-up's measures again rather than take those a start before
    # kept (engines/measures.py).
    remeasure: bool = False
    # Preparing new requests (conditioning, uploads, prompts) runs between decode
    # steps for at most this long per step (at least one bounded unit of work).
    prefill_budget_ms: float = 20.0
    max_prompt_tokens: int = 512  # MusicGen: longest description in text-encoder tokens
    # Text to speech (HiggsAudio v2).
    higgs_codec: str | None = None  # audio tokenizer; default: the model folder's or released
    voices_dir: Path | None = None  # NAME.wav (+ NAME.txt transcript) per voice
    scenes_dir: Path | None = None  # NAME.txt per scene; None: the built-in scenes
    max_new_tokens: int = 2048  # largest params.max_new_tokens (frames per chunk)
    # Keys and values kept of speech prompts' shared beginnings (system text,
    # scene, reference voices), prefilled once: MiB per model (0: none kept).
    prefix_cache_mb: float = 256.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "text"  # text | json
    file: Path | None = None
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
