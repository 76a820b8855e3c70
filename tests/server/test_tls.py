"""HTTPS and WSS from the server itself (``--tls-cert``, ``--tls-key``; server/tls.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    WAVECAST,
    make_config,
    run_cli,
    running_server,
    self_signed,
    start_serve,
    timeout,
)
from websockets.exceptions import InvalidMessage

from wavecast.clients import SyncClient, connect
from wavecast.server.app import WavecastServer
from wavecast.server.probe import readyz_url
from wavecast.server.tls import Certificates, TlsError


def tls_config(cert: Path, key: Path | None) -> Any:
    config = make_config()
    return replace(config, network=replace(config.network, tls_cert=cert, tls_key=key))


def https_get(url: str, cert: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=cert)
    with urllib.request.urlopen(url, context=context, timeout=timeout(10)) as response:
        return response.status, response.read()


def sync_models(url: str, cert: Path) -> list[str]:
    with SyncClient(url, ca_file=cert) as client:
        return [model.name for model in client.hello.models]


def presented(port: int) -> str:
    """The SHA-256 of the certificate the server at ``port`` presents now."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout(10)) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


async def test_streams_and_pages_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with running_server(tls_config(cert, key)) as server:
        assert server.url == f"wss://127.0.0.1:{server.port}/v1/stream"
        assert server.page_url == f"https://127.0.0.1:{server.port}/"
        # A stream, trusting the server's own certificate; the demo page's address works too.
        async with connect(server.page_url, ca_file=cert) as client:
            result = await (await client.generate("tiny-musicgen", "x", duration=0.5)).collect()
        assert result.status == "completed" and len(result.pcm) == 2 * 16000
        # The page and the HTTP endpoints, over https.
        status, page = await asyncio.to_thread(https_get, server.page_url, cert)
        assert status == 200 and b"<html" in page
        status, _ = await asyncio.to_thread(https_get, f"{server.page_url}healthz", cert)
        assert status == 200
        # Not trusted without it (the system's authorities do not know it), and in
        # the clear nothing but TLS answers.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(server.url, open_timeout=timeout(5))
        with pytest.raises(InvalidMessage):
            await connect(server.url.replace("wss://", "ws://"), open_timeout=timeout(5))
        # WAVECAST_CA_FILE, and the blocking client.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WAVECAST_CA_FILE", str(cert))
            async with connect(server.url) as client:
                assert "tiny-musicgen" in client.models
        assert await asyncio.to_thread(sync_models, server.url, cert) == ["tiny-musicgen"]


def probe(port: int, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WAVECAST_PORT": str(port), **environ}
    env.pop("WAVECAST_HOST", None)
    command = [sys.executable, "-m", "wavecast.server.probe"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout(30))


async def test_the_images_probe_asks_over_https_where_the_server_does(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with running_server(tls_config(cert, key)) as server:
        served = await asyncio.to_thread(probe, server.port, WAVECAST_TLS_CERT=str(cert))
        assert served.returncode == 0, served.stderr
        plain = await asyncio.to_thread(probe, server.port)
        assert plain.returncode == 1
        assert f"http://127.0.0.1:{server.port}/readyz" in plain.stderr
        server.draining = True  # (/readyz: 503)
        draining = await asyncio.to_thread(probe, server.port, WAVECAST_TLS_CERT=str(cert))
        assert draining.returncode == 1 and "503" in draining.stderr
        server.draining = False
    assert readyz_url({"WAVECAST_HOST": "0.0.0.0"}) == "http://127.0.0.1:5555/readyz"
    assert readyz_url({"WAVECAST_HOST": "::", "WAVECAST_PORT": "80"}) == "http://[::1]:80/readyz"
    assert readyz_url({"WAVECAST_TLS_CERT": "c.pem"}) == "https://127.0.0.1:5555/readyz"


async def test_a_handshake_that_never_comes_is_closed(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = tls_config(cert, key)
    config = replace(config, timeouts=replace(config.timeouts, open_timeout=1.0))
    async with running_server(config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = asyncio.get_running_loop().time()
        # Nothing sent: closed after the opening handshake's time (websockets' open_timeout).
        assert await asyncio.wait_for(reader.read(), timeout(20)) == b""
        assert asyncio.get_running_loop().time() - started < 10  # (the loop's own: 60 s)
        writer.close()
        async with connect(server.url, ca_file=cert) as client:
            assert "tiny-musicgen" in client.models


async def test_key_in_the_certificate_file(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    both = tmp_path / "both.pem"
    both.write_text(key.read_text() + cert.read_text())
    async with (
        running_server(tls_config(both, None)) as server,
        connect(server.url, ca_file=cert) as client,
    ):
        assert "tiny-musicgen" in client.models


@pytest.mark.parametrize("case", ["missing", "not PEM", "another key", "key alone"])
def test_unusable_certificates_are_refused(tmp_path: Path, case: str) -> None:
    cert, key = self_signed(tmp_path)
    _, other = self_signed(tmp_path, "other")
    files: dict[str, tuple[Path, Path | None]] = {
        "missing": (tmp_path / "nothing.pem", None),
        "not PEM": (tmp_path / "garbage.pem", key),
        "another key": (cert, other),
        "key alone": (key, None),
    }
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError) as caught:
        Certificates(*files[case])
    assert ("no such file" if case == "missing" else "not a PEM certificate") in str(caught.value)


async def test_a_renewed_certificate_is_read_again(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    live, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(cert, live)
    shutil.copy(key, live_key)
    async with running_server(tls_config(live, live_key)) as server:
        assert await asyncio.to_thread(presented, server.port) == fingerprint(cert)
        async with connect(server.url, ca_file=cert) as first:
            long = await first.generate("tiny-musicgen", "x", duration=4)
            renewed, renewed_key = self_signed(tmp_path, "renewed")
            shutil.copy(renewed, live)
            shutil.copy(renewed_key, live_key)
            await server.reload_certificates()
            # New handshakes present the new one; the stream under way goes on.
            assert await asyncio.to_thread(presented, server.port) == fingerprint(renewed)
            async with connect(server.url, ca_file=renewed) as second:
                assert "tiny-musicgen" in second.models
            assert (await long.collect()).status == "completed"
        # A broken file is not taken: the renewed one stays.
        live.write_text("half a certificate\n")
        await server.reload_certificates()
        assert await asyncio.to_thread(presented, server.port) == fingerprint(renewed)


async def test_serve_with_tls_and_sighup(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    log = tmp_path / "serve.log"
    args = ["--model", "tiny-musicgen", "--tls-cert", str(cert), "--tls-key", str(key)]
    process, port = start_serve(args, log)
    try:
        text = log.read_text()
        assert f"wss://127.0.0.1:{port}/v1/stream (demo page: https://127.0.0.1:{port}/)" in text
        page = f"https://127.0.0.1:{port}/"
        code, out = await run_cli("models", "--url", page, "--ca-file", str(cert))
        assert code == 0 and "tiny-musicgen" in out, out
        code, out = await run_cli("models", "--url", page)
        assert code == 2 and "certificate is not trusted" in out and "--ca-file" in out, out
        code, out = await run_cli("models", "--url", f"ws://127.0.0.1:{port}")
        assert code == 2 and "(or one with TLS: wss://, https://)" in out, out
        # SIGHUP reads the certificate again, and the server goes on.
        process.send_signal(signal.SIGHUP)
        for _ in range(int(timeout(10) * 10)):
            if "TLS certificate read again" in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert f"TLS certificate read again from {cert}" in log.read_text()
        code, out = await run_cli("models", "--url", page, "--ca-file", str(cert))
        assert code == 0, out
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, timeout(30)) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_serve_refuses_an_unusable_certificate_before_loading(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    process = await asyncio.create_subprocess_exec(
        *WAVECAST, "serve", "--port", "0", "--log-file", str(log), "--model", "tiny-musicgen",
        "--tls-cert", str(tmp_path / "absent.pem"),
    )  # fmt: skip
    assert await asyncio.wait_for(process.wait(), timeout(60)) == 1
    text = log.read_text()
    assert f"--tls-cert: no such file: {tmp_path / 'absent.pem'}" in text
    assert "loading tiny-musicgen" not in text
    # A key without its certificate: refused at the command line.
    code, out = await run_cli("serve", "--port", "0", "--tls-key", str(tmp_path / "k.pem"))
    assert code == 1 and "--tls-key needs --tls-cert" in out, out


async def test_wss_to_a_server_without_tls(server: WavecastServer) -> None:
    code, out = await run_cli("models", "--url", f"https://127.0.0.1:{server.port}/")
    assert code == 2 and "no TLS connection" in out and "ws://" in out, out
