"""Plain HTTP on the WebSocket port: health, info, and the demo page.

Static files are read once at start-up, so answering never touches the disk
from the event loop.
"""

from __future__ import annotations

import http
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["STREAM_PATH", "HttpRoutes", "load_static"]

STREAM_PATH = "/v1/stream"
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


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-cache"
    headers["X-Content-Type-Options"] = "nosniff"
    return Response(status.value, status.phrase, headers, body)


class HttpRoutes:
    """The ``process_request`` hook of the WebSocket server."""

    def __init__(
        self,
        static: dict[str, tuple[bytes, str]],
        info: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
        listings: dict[str, Callable[[], dict[str, Any]]] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.static = static
        self.info = info
        self.healthy = healthy
        self.ready = ready or healthy
        self.listings = listings or {}

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == STREAM_PATH:
            if "upgrade" not in request.headers.get("Connection", "").lower():
                return _response(
                    http.HTTPStatus.UPGRADE_REQUIRED,
                    b"connect with a WebSocket client\n",
                    "text/plain",
                )
            return None  # the WebSocket handshake goes on
        if path == "/healthz":
            if self.healthy():
                return _response(http.HTTPStatus.OK, b"ok\n", "text/plain")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"unavailable\n", "text/plain")
        if path == "/readyz":
            if self.ready():
                return _response(http.HTTPStatus.OK, b"ready\n", "text/plain")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"not ready\n", "text/plain")
        if path == "/v1/info":
            return _response(http.HTTPStatus.OK, orjson.dumps(self.info()), "application/json")
        listing = self.listings.get(path)
        if listing is not None:
            return _response(http.HTTPStatus.OK, orjson.dumps(listing()), "application/json")
        found = self.static.get(path)
        if found is not None:
            return _response(http.HTTPStatus.OK, *found)
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
