"""The server's lifecycle: start the inference thread, serve, shut down.

Liveness and readiness: ``/healthz`` answers 200 once the models are loaded and
warmed up and the server listens; ``/readyz`` the same, and 503 from the moment
a shutdown starts, so that a load balancer stops sending new clients.

Shutdown (SIGTERM, SIGINT) drains: ``/readyz`` turns 503, new requests on
open connections are refused with ``shutting_down`` and new stream handshakes
with 503 (the server keeps listening while it drains, so that a load balancer
retries elsewhere), the ones running get ``shutdown_grace`` seconds
(``--drain-seconds``) to finish, then end with ``shutting_down``, and every
connection closes with 1001. A queued one starts only where it would finish in
half that time at the measured speed, after those ahead of it; the others end
``shutting_down`` at once (they had not started: their clients may ask again,
elsewhere or after the restart).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from wavecast.protocol import AUDIO_FORMATS, ShuttingDown, __version__

from . import encode
from .audio import to_wav
from .config import Config
from .engines import load_engines
from .engines.base import Engine
from .engines.higgs.voices import BUILTIN_SCENES, Scene, Voice, load_scenes, load_voices
from .http import (
    STREAM_PATH,
    HttpRoutes,
    client_address,
    load_static,
    presented_key,
    trusted_proxies,
)
from .metrics import Samples
from .metrics import render as render_metrics
from .scheduler import EngineFactory, Scheduler
from .session import Session
from .tls import Certificates, TlsError

__all__ = ["WavecastServer"]

log = logging.getLogger(__name__)

WEB_DEMO = Path(__file__).resolve().parent.parent / "web_demo"


class ListenError(OSError):
    """The server cannot listen where it was told (the message says why)."""


def check_port(host: str, port: int, reuse_port: bool) -> None:
    """That the server can listen at ``host``:``port`` (port 0: any free one): a
    socket bound there for a moment, as the server's will be, so that a port in
    use is said at once, not after the models load.

    Raises:
        ListenError: Something listens there (or the address is not this machine's).
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"--host {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise listen_error(host, port, exc) from None


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """One line for the operator: why the server cannot listen at ``host``:``port``."""
    if exc.errno == errno.EADDRINUSE:
        return ListenError(
            f"{host}:{port} is in use: another server listens there (--port; a server "
            "started with --reuse-port lets a new one, started with it too, listen "
            "beside it for a restart)"
        )
    return ListenError(f"cannot listen at {host}:{port}: {exc.strerror or exc}")


class WavecastServer:
    """A running wavecast server.

    Args:
        config: The configuration.
        engine_factory: Loads the engines on the inference thread; by default
            the models named in ``config.models``.
    """

    def __init__(self, config: Config, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self._factory = engine_factory or self._default_factory
        self.scheduler: Scheduler | None = None
        self.sessions: set[Session] = set()
        self.draining = False  # a shutdown has started
        self._per_address: dict[str, int] = {}  # open connections by client address
        self._proxies = trusted_proxies(config.network.forwarded_allow_ips)
        self._server: Server | None = None
        self._started = time.monotonic()
        self.voices: dict[str, Voice] = {}
        self.scenes: dict[str, Scene] = {}
        self._encoder_threads = 0  # (set at start)
        self.certificates: Certificates | None = None  # (read at start: --tls-cert)

    def _default_factory(self) -> Mapping[str, Engine]:
        models = self.config.models
        return load_engines(
            models.names,
            models.device,
            dtype=models.dtype,
            threads=models.threads,
            left_context=models.left_context_frames,
            holdback=models.holdback_frames,
            first_frames=models.first_chunk_frames,
            chunk_frames=models.chunk_frames,
            max_chunk_frames=models.max_chunk_frames,
            codec_batch=models.codec_batch,
            codec_windows=models.codec_windows,
            remeasure=models.remeasure,
            max_prompt_tokens=models.max_prompt_tokens,
            max_duration=self.config.limits.max_duration,
            max_upload_seconds=self.config.limits.max_upload_seconds,
            mbd=models.mbd,
            higgs_codec=models.higgs_codec,
            voices=self.voices,
            scenes=self.scenes,
            max_new_tokens=models.max_new_tokens,
            prefill_budget_ms=models.prefill_budget_ms,
            prefix_cache_mb=models.prefix_cache_mb,
            cuda_graphs=models.cuda_graphs,
            pipelined_steps=models.pipelined_steps,
            max_active=self.config.limits.max_active,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        sockname = next(iter(self._server.sockets)).getsockname()
        return int(sockname[1])

    @property
    def url(self) -> str:
        """The stream endpoint: ``ws://host:port/v1/stream`` (``wss://`` with TLS)."""
        return f"{'wss' if self.certificates else 'ws'}://{self._netloc}{STREAM_PATH}"

    @property
    def page_url(self) -> str:
        """The demo page: ``http://host:port/`` (``https://`` with TLS)."""
        return f"{'https' if self.certificates else 'http'}://{self._netloc}/"

    @property
    def _netloc(self) -> str:
        host = self.config.network.host
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Load the models, warm them up and listen.

        Raises:
            TlsError: The TLS certificate or key cannot be used (checked first,
                before the models load).
            ListenError: The server cannot listen at its host and port (checked
                first, and when it listens).
        """
        loop = asyncio.get_running_loop()
        network = self.config.network
        limits = self.config.limits
        models = self.config.models
        await asyncio.to_thread(check_port, network.host, network.port, network.reuse_port)
        if network.tls_cert is not None:
            self.certificates = await asyncio.to_thread(
                Certificates, network.tls_cert, network.tls_key
            )
        self.voices = await asyncio.to_thread(load_voices, models.voices_dir)
        self.scenes = await asyncio.to_thread(load_scenes, models.scenes_dir or BUILTIN_SCENES)
        self.scheduler = Scheduler(
            loop,
            self._factory,
            max_queue=limits.max_queue,
            max_active=limits.max_active,
            prefill_budget=self.config.models.prefill_budget_ms / 1000.0,
            admission=limits.admission,
        )
        await self.scheduler.start()
        self._encoder_threads = encode.configure(models.encoder_threads)
        log.info("%d encoder thread(s) for streams in mp3, opus or flac", self._encoder_threads)
        web_root = network.web_demo or WEB_DEMO
        static = load_static(web_root)
        # Each named voice as a WAV, to hear it before choosing it (read at start).
        previews = await asyncio.to_thread(voice_previews, self.voices)
        routes = HttpRoutes(
            {**static, **previews},
            self.info,
            self._healthy,
            listings={"/v1/voices": self._voice_list, "/v1/scenes": self._scene_list},
            ready=self._ready,
            allowed_origins=network.allowed_origins,
            metrics=self.metrics,
            api_keys=network.api_keys,
        )
        try:
            self._server = await self._listen(routes)
        except OSError as exc:  # (something began to listen there since the check)
            await asyncio.to_thread(self.scheduler.stop, 10.0)
            raise listen_error(network.host, network.port, exc) from None
        names = ", ".join(self.scheduler.models)
        log.info("serving %s at %s (demo page: %s)", names, self.url, self.page_url)

    async def _listen(self, routes: HttpRoutes) -> Server:
        network = self.config.network
        limits = self.config.limits
        timeouts = self.config.timeouts
        return await serve(
            self._handle,
            network.host,
            network.port,
            process_request=routes,
            compression=None,  # PCM does not compress; save the CPU
            max_size=limits.max_frame_bytes,
            max_queue=16,
            # The transport takes a frame, and the writer waits past 16 KiB until
            # the kernel has it all: on a slow link a message sent next waits
            # behind that, the kernel's (session.UNSENT_BYTES) and a piece
            # (session.PIECE_BYTES), not 64 KiB more (bench/RESULTS.md).
            write_limit=(16 << 10, 0),
            ping_interval=timeouts.ping_interval,
            ping_timeout=timeouts.ping_timeout,
            open_timeout=timeouts.open_timeout,
            server_header=f"wavecast/{__version__}",
            ssl=self.certificates.context if self.certificates else None,
            reuse_port=network.reuse_port or None,
        )

    async def reload_certificates(self) -> None:
        """Read the TLS certificate and key again (``SIGHUP``): the handshakes from
        now on present them; the open connections go on. A file that cannot be used
        is logged, and the ones loaded before stay. Without TLS, nothing."""
        if self.certificates is None:
            return  # (serving without --tls-cert)
        try:
            await asyncio.to_thread(self.certificates.reload)
        except TlsError as exc:
            log.error("the TLS certificate was not read again (the one before stays): %s", exc)
        else:
            log.info("TLS certificate read again from %s", self.certificates.cert)

    def _healthy(self) -> bool:
        return self.scheduler is not None and self._server is not None

    def _ready(self) -> bool:
        return self._healthy() and not self.draining

    def _voice_list(self) -> dict[str, Any]:
        voices = [voice.describe() for voice in self.voices.values()]
        return {"voices": voices, "count": len(voices)}

    def _scene_list(self) -> dict[str, Any]:
        scenes = [scene.describe() for scene in self.scenes.values()]
        return {"scenes": scenes, "count": len(scenes)}

    def metrics(self) -> str:
        """``GET /metrics``: the live gauges and the scheduler's records."""
        assert self.scheduler is not None
        snapshot = self.scheduler.snapshot()
        capacity = snapshot["capacity"]
        per_model = self.scheduler.per_model()
        gauges: dict[str, tuple[str, float | Samples]] = {
            "wavecast_up": ("1 once the models are loaded and warmed up.", 1.0),
            "wavecast_ready": (
                "1 while new requests are taken (0 while draining).",
                float(self._ready()),
            ),
            "wavecast_uptime_seconds": (
                "Seconds since the server started.",
                time.monotonic() - self._started,
            ),
            "wavecast_connections": ("Open WebSocket connections.", float(len(self.sessions))),
            "wavecast_requests_queued": ("Requests waiting for a slot.", float(snapshot["queued"])),
            "wavecast_requests_active": ("Requests being generated.", float(snapshot["active"])),
            "wavecast_requests_rendering": (
                "Requests past their live stream, rendering Multi-Band Diffusion.",
                float(snapshot["rendering"]),
            ),
            "wavecast_requests_waiting_for_text": (
                "Requests whose text comes as it is written, waiting for more (of the "
                "active, at the last step).",
                float(snapshot["waiting_for_text"]),
            ),
        }
        gauges["wavecast_model_requests_queued"] = (
            "Requests waiting for a slot, by model.",
            [({"model": m}, float(c["queued"])) for m, c in per_model.items()],
        )
        gauges["wavecast_model_requests_active"] = (
            "Requests holding a slot (preparing or decoding), by model.",
            [({"model": m}, float(c["active"])) for m, c in per_model.items()],
        )
        gauges["wavecast_send_buffer_bytes"] = (
            "Bytes queued for clients and not yet written, over all connections.",
            float(sum(session.buffered_bytes for session in self.sessions)),
        )
        if capacity.get("tick_ms") is not None:
            gauges["wavecast_tick_seconds"] = (
                "Measured time of one scheduler tick (every running request one step).",
                float(capacity["tick_ms"]) / 1000.0,
            )
        if capacity.get("tick_fixed_ms") is not None:
            gauges["wavecast_tick_fixed_seconds"] = (
                "A tick's fixed part (fitted to the measured ticks: fixed + per stream * n).",
                float(capacity["tick_fixed_ms"]) / 1000.0,
            )
            gauges["wavecast_tick_per_stream_seconds"] = (
                "What each stream adds to a tick (the same fit).",
                float(capacity["tick_per_stream_ms"]) / 1000.0,
            )
        if capacity.get("realtime_streams") is not None:
            gauges["wavecast_realtime_streams"] = (
                "Streams the server estimates it keeps faster than real time.",
                float(capacity["realtime_streams"]),
            )
        counters: dict[str, tuple[str, float | Samples]] = {
            "wavecast_steps_total": (
                "Scheduler steps run (one batched step per model).",
                float(snapshot["steps_total"]),
            ),
        }
        graphs = self.scheduler.graphs()
        if graphs:  # --cuda-graphs
            gauges["wavecast_step_graphs"] = (
                "Step shapes recorded as CUDA graphs (ready to replay), by model.",
                [({"model": m}, float(ready)) for m, (ready, _) in graphs.items()],
            )
            counters["wavecast_step_graph_drops"] = (
                "Times every CUDA graph of a model was dropped (its cache grew; the next "
                "steps record their shapes again), by model.",
                [({"model": m}, float(drops)) for m, (_, drops) in graphs.items()],
            )
        return render_metrics(self.scheduler.metrics, gauges, counters)

    def info(self) -> dict[str, Any]:
        from wavecast.protocol import to_wire

        from .session import hello_message

        assert self.scheduler is not None
        hello = to_wire(
            hello_message(self.config, self.scheduler.models, self.scheduler.max_active)
        )
        hello.pop("type")
        hello["uptime_seconds"] = round(time.monotonic() - self._started, 3)
        hello["connections"] = len(self.sessions)
        hello["scheduler"] = self.scheduler.snapshot()
        hello["formats"] = list(AUDIO_FORMATS)
        hello["encoder_threads"] = self._encoder_threads
        return hello

    async def _handle(self, websocket: ServerConnection) -> None:
        assert self.scheduler is not None
        limits = self.config.limits
        if len(self.sessions) >= limits.max_connections:
            await websocket.close(1013, "too many connections")
            return
        address = self._client_address(websocket)
        if self._per_address.get(address, 0) >= limits.max_connections_per_ip:
            await websocket.close(1013, "too many connections from this address")
            return
        self._per_address[address] = self._per_address.get(address, 0) + 1
        session = Session(
            websocket,
            self.scheduler,
            self.config,
            address=address,
            client=self._client_of(websocket, address),
            on_close=self.sessions.discard,
        )
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()

    async def stop(self) -> None:
        """Graceful shutdown (see the module docstring)."""
        scheduler = self.scheduler
        server = self._server
        self.draining = True  # /readyz: 503 from now on
        if scheduler is not None:
            grace = self.config.timeouts.shutdown_grace
            scheduler.refuse_new(grace)
            if not await scheduler.wait_idle(grace):
                for session in list(self.sessions):
                    for request in list(session.requests.values()):
                        scheduler.cancel(request, ShuttingDown("the server is shutting down"))
                await scheduler.wait_idle(2.0)
            await asyncio.sleep(0.05)  # let the last `done` frames reach the writers
        if server is not None:
            server.close(close_connections=True)
            await server.wait_closed()
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop, 10.0)

    def _client_of(self, websocket: ServerConnection, address: str) -> str:
        """Who a connection's requests are queued for (the queue is shared among
        clients in turns): the API key it presented (a digest of it), where the
        server has keys, else its address."""
        request = websocket.request
        key = presented_key(request) if self.config.network.api_keys and request else None
        if key is None:
            return address
        return "key " + hashlib.sha256(key.encode()).hexdigest()[:16]

    def _client_address(self, websocket: ServerConnection) -> str:
        """The client's IP address: the peer's, or the one a trusted load balancer
        names in ``X-Forwarded-For`` (``--forwarded-allow-ips``)."""
        peer = websocket.remote_address
        host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        request = websocket.request
        forwarded = request.headers.get("X-Forwarded-For") if request is not None else None
        return client_address(host, forwarded, self._proxies)


def voice_previews(voices: Mapping[str, Voice]) -> dict[str, tuple[bytes, str]]:
    """``GET /v1/voices/NAME.wav``: each voice's clip (mono, 16-bit), by path."""
    return {
        f"/v1/voices/{name}.wav": (to_wav(voice.audio, voice.sample_rate), "audio/wav")
        for name, voice in voices.items()
    }
