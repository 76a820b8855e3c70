"""``python -m wavecast.server.probe``: exit 0 while the server on this machine takes
requests (its ``GET /readyz`` answers 200), 1 otherwise, saying why on stderr.

The container image's healthcheck. It finds the server as the server finds its
settings, in its environment: ``WAVECAST_PORT``, ``WAVECAST_HOST`` (an address of
every interface means this machine's loopback) and ``WAVECAST_TLS_CERT`` (https;
the certificate is not checked: the server asks itself).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from collections.abc import Mapping

__all__ = ["main", "readyz_url"]


def readyz_url(environ: Mapping[str, str]) -> str:
    """The ``/readyz`` of the server these ``WAVECAST_*`` settings start."""
    host = environ.get("WAVECAST_HOST") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if environ.get("WAVECAST_TLS_CERT") else "http"
    return f"{scheme}://{host}:{environ.get('WAVECAST_PORT') or 5555}/readyz"


def main() -> int:
    url = readyz_url(os.environ)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            status = response.status
    except OSError as exc:  # (urllib's errors, a 503 included, are OSErrors)
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
