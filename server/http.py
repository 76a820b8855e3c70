"""Plain HTTP on the WebSocket port: health, info, and the demo page.

Static files are read once at start-up, so answering never touches the disk
from the event loop.
"""

from __future__ import annotations

import hmac
import http
import ipaddress
import mimetypes
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = [
    "STREAM_PATH",
    "HttpRoutes",
    "client_address",
    "key_accepted",
    "load_static",
    "origin_allowed",
    "presented_key",
    "trusted_proxies",
]

STREAM_PATH = "/v1/stream"
ENCODINGS = ("json", "msgpack")  # ?encoding= of the stream (§2.1)
MAX_STATIC_BYTES = 16 << 20
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}


def load_static(root: Path) -> dict[str, tuple[bytes, str]]:
    """Read every file under ``root`` into memory: url path -> (body, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    total = 0
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.parts):
            continue
        body = path.read_bytes()
        total += len(body)
        if total > MAX_STATIC_BYTES:
            raise ValueError(f"static files under {root} exceed {MAX_STATIC_BYTES} bytes")
        url = "/" + path.relative_to(root).as_posix()
        kind = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        files[url] = (body, kind or "application/octet-stream")
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


# The demo page loads nothing from elsewhere: scripts, styles, the worklet and
# the socket are this server's; audio plays from blobs; the microphone records.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; worker-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
}


def _response(status: http.HTTPStatus, body: bytes, content_type: str, **extra: str) -> Response:
    """A response with ``extra`` headers (``Retry_After="1"``: ``Retry-After: 1``)."""
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-cache"
    for name, value in SECURITY_HEADERS.items():
        headers[name] = value
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status.value, status.phrase, headers, body)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may open a stream.

    No ``Origin`` (not a browser: the Python client, websocat) and the page's own
    origin (its host is the ``Host`` the browser connected to) always may; other
    origins only when listed (``*``: any). So a page on another site cannot drive
    this server from its visitors' browsers.
    """
    if origin is None or "*" in allowed:
        return True
    if origin.rstrip("/") in (a.rstrip("/") for a in allowed):
        return True
    netloc = origin.partition("://")[2]
    return bool(host) and netloc.lower() == (host or "").lower()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_proxies(given: tuple[str, ...]) -> tuple[Network, ...] | None:
    """``--forwarded-allow-ips`` as networks (an address is a /32 or /128);
    ``None`` for ``*`` (any peer). Raises ``ValueError`` for a malformed entry."""
    if "*" in given:
        return None
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in given)


def _trusted(address: str, proxies: tuple[Network, ...] | None) -> bool:
    if proxies is None:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(
    peer: str, forwarded_for: str | None, proxies: tuple[Network, ...] | None
) -> str:
    """The client's IP address: the peer's, or, when the peer is a trusted proxy
    (a load balancer), the nearest address in ``X-Forwarded-For`` that is not
    itself a trusted proxy (read from the right: each proxy appends the address
    it saw, and only the trusted ones' entries can be believed).

    With no trusted proxies (the default) the header is ignored: any client
    could write it.
    """
    if proxies == () or forwarded_for is None or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer


def presented_key(request: Request) -> str | None:
    """The API key a request carries: ``Authorization: Bearer KEY``, or a ``token``
    query parameter (browsers cannot set headers on a WebSocket or an ``<audio>``)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    query = request.path.partition("?")[2]
    tokens = urllib.parse.parse_qs(query).get("token")
    return tokens[0] if tokens else None


def key_accepted(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Whether ``presented`` is one of ``keys``, compared in constant time (every
    key is compared, whatever matches)."""
    given = (presented or "").encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched and presented is not None


class HttpRoutes:
    """The ``process_request`` hook of the WebSocket server.

    With API keys configured, the stream, ``/v1/*`` and ``/metrics`` need one
    (401 otherwise); ``/healthz``, ``/readyz`` and the demo page's files stay open.
    """

    def __init__(
        self,
        static: dict[str, tuple[bytes, str]],
        info: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
        listings: dict[str, Callable[[], dict[str, Any]]] | None = None,
        ready: Callable[[], bool] | None = None,
        allowed_origins: tuple[str, ...] = (),
        metrics: Callable[[], str] | None = None,
        api_keys: tuple[str, ...] = (),
    ) -> None:
        self.static = static
        self.info = info
        self.healthy = healthy
        self.ready = ready or healthy
        self.listings = listings or {}
        self.allowed_origins = allowed_origins
        self.metrics = metrics
        self.api_keys = api_keys

    def _needs_key(self, path: str) -> bool:
        return bool(self.api_keys) and (
            path == STREAM_PATH or path == "/metrics" or path.startswith("/v1/")
        )

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if self._needs_key(path) and not key_accepted(presented_key(request), self.api_keys):
            return _response(
                http.HTTPStatus.UNAUTHORIZED,
                b"this server needs an API key: Authorization: Bearer KEY, or ?token=KEY\n",
                "text/plain",
                WWW_Authenticate='Bearer realm="wavecast"',
            )
        if path == STREAM_PATH:
            if "upgrade" not in request.headers.get("Connection", "").lower():
                return _response(
                    http.HTTPStatus.UPGRADE_REQUIRED,
                    b"connect with a WebSocket client\n",
                    "text/plain",
                )
            query = urllib.parse.parse_qs(request.path.partition("?")[2])
            if any(value not in ENCODINGS for value in query.get("encoding", [])):
                return _response(
                    http.HTTPStatus.BAD_REQUEST,
                    b"unknown encoding: ?encoding=json or ?encoding=msgpack (the default)\n",
                    "text/plain",
                )
            if not self.ready():
                # Draining (or not yet warmed up): a load balancer tries another
                # replica (nginx: proxy_next_upstream http_503).
                return _response(
                    http.HTTPStatus.SERVICE_UNAVAILABLE,
                    b"this server is shutting down: connect again (another replica)\n",
                    "text/plain",
                    Retry_After="1",
                )
            origin = request.headers.get("Origin")
            if not origin_allowed(origin, request.headers.get("Host"), self.allowed_origins):
                return _response(
                    http.HTTPStatus.FORBIDDEN,
                    b"this origin may not open streams here (see --allow-origin)\n",
                    "text/plain",
                )
            return None  # the WebSocket handshake goes on
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # A WebSocket client at the wrong path (the demo page's address):
            # not the page with a 200, which the client would take for a refusal.
            return _response(
                http.HTTPStatus.NOT_FOUND,
                f"WebSocket streams are at {STREAM_PATH}\n".encode(),
                "text/plain",
            )
        if path == "/healthz":
            if self.healthy():
                return _response(http.HTTPStatus.OK, b"ok\n", "text/plain")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"unavailable\n", "text/plain")
        if path == "/readyz":
            if self.ready():
                return _response(http.HTTPStatus.OK, b"ready\n", "text/plain")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"not ready\n", "text/plain")
        if path == "/metrics" and self.metrics is not None:
            body = self.metrics().encode()
            return _response(http.HTTPStatus.OK, body, METRICS_CONTENT_TYPE)
        if path == "/v1/info":
            return _response(http.HTTPStatus.OK, orjson.dumps(self.info()), "application/json")
        listing = self.listings.get(path)
        if listing is not None:
            return _response(http.HTTPStatus.OK, orjson.dumps(listing()), "application/json")
        found = self.static.get(path)
        if found is not None:
            return _response(http.HTTPStatus.OK, *found)
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
