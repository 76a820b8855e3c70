"""Two ``wavecast serve`` replicas behind Debian's nginx with docker/nginx.conf,
for the tests (``scripts/setup-venv --test`` installs nginx)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import start_serve, timeout

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx.conf"
MODEL = "tiny-musicgen"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("nginx is not installed: scripts/setup-venv --test installs Debian's nginx")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render(config: str, replicas: list[int], port: int) -> str:
    """docker/nginx.conf with the replicas and the listen port of this test."""
    servers = re.findall(r"^\s*server wavecast-\d+:5555 .*;$", config, flags=re.M)
    assert len(servers) == len(replicas), servers
    for line, replica in zip(servers, replicas, strict=True):
        config = config.replace(line, re.sub(r"wavecast-\d+:5555", f"127.0.0.1:{replica}", line))
    assert config.count("listen 8080;") == 1
    return config.replace("listen 8080;", f"listen 127.0.0.1:{port};")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout(10)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def connections(port: int) -> int:
    """Open WebSocket connections of one replica, from its /metrics."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    match = re.search(r"^wavecast_connections (\S+)$", text, flags=re.M)
    assert match, text
    return int(float(match.group(1)))


async def eventually(check: object, seconds: float) -> None:
    """Wait until ``check()`` (sync, run off the loop) is true."""
    assert callable(check)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout(seconds)
    while not await asyncio.to_thread(check):
        assert loop.time() < deadline, f"not within {seconds} s: {check}"
        await asyncio.sleep(0.05)


@dataclass
class Cluster:
    replicas: list[tuple[subprocess.Popen[bytes], int]]
    port: int  # nginx

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"


@asynccontextmanager
async def open_cluster(
    tmp_path: Path, *more: str, drain_seconds: float = 3.0
) -> AsyncIterator[Cluster]:
    """Two replicas (``more`` flags for both) behind nginx; the first drains for
    ``drain_seconds``."""
    nginx = nginx_binary()
    common = ["--model", MODEL, "--threads", "1", "--max-active", "16", "--admission", "slots"]
    common += ["--forwarded-allow-ips", "127.0.0.1", *more]
    # The first replica is the one drained: a few seconds' grace, so that new
    # connections arrive while it still listens (and answers them 503).
    started = await asyncio.gather(
        asyncio.to_thread(
            start_serve, [*common, "--drain-seconds", str(drain_seconds)], tmp_path / "a.log"
        ),
        asyncio.to_thread(start_serve, common, tmp_path / "b.log"),
    )
    replicas = list(started)
    port = free_port()
    site = tmp_path / "wavecast.conf"
    site.write_text(render(NGINX_CONF.read_text(), [p for _, p in replicas], port))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\npid {tmp_path / 'nginx.pid'};\n"
        f"events {{ worker_connections 256; }}\n"
        "http {\n  log_format upstreams '$request_uri $status $upstream_addr $upstream_status';\n"
        f"  access_log {tmp_path / 'access.log'} upstreams;\n{temp}\n  include {site};\n}}\n"
    )
    error_log = tmp_path / "error.log"
    command = [nginx, "-p", str(tmp_path), "-c", str(main), "-e", str(error_log)]
    proxy = await asyncio.to_thread(subprocess.Popen, [*command, "-g", "daemon off;"])
    try:
        await eventually(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 20)
        yield Cluster(replicas, port)
    finally:
        proxy.terminate()
        for process, _ in replicas:
            if process.poll() is None:
                process.kill()
        for process in [proxy, *(p for p, _ in replicas)]:
            process.wait(timeout(30))


def gauge(port: int, name: str) -> float:
    """One gauge of one replica's /metrics."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    match = re.search(rf"^{name} (\S+)$", text, flags=re.M)
    assert match, text
    return float(match.group(1))
