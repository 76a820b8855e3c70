"""The demo page from another computer: over https (``--tls-cert``) it records and
decodes Opus, MP3 and FLAC; over plain http it says why it cannot."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, running_server, self_signed
from test_cards import wait
from test_demo import chromium
from test_formats import choose, finished, submit

# (Each test's server on the module's event loop: conftest.py.)
pytestmark = pytest.mark.asyncio(loop_scope="module")

# Chromium resolves this name to this computer: a page from "another" host, so
# not a secure context by its address (as 127.0.0.1 and localhost are).
ELSEWHERE = "wavecast.test"
RESOLVE = f"--host-resolver-rules=MAP {ELSEWHERE} 127.0.0.1"


async def visit(browser: Any, url: str) -> Any:
    # (The test's certificate is its own authority, unknown to Chromium: its
    # errors are let through, as a user who trusts it would.)
    ctx = await browser.new_context(bypass_csp=True, ignore_https_errors=True)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(url)
    await wait(page, "window.wavecast.connected")
    return page


async def test_over_https_the_page_records_and_decodes(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = make_config()
    config = replace(config, network=replace(config.network, tls_cert=cert, tls_key=key))
    async with running_server(config) as server, chromium(RESOLVE) as browser:
        page = await visit(browser, f"https://{ELSEWHERE}:{server.port}/")
        # (Connected: its stream is wss://, a page over https may open no other.)
        assert await page.evaluate("window.isSecureContext")
        # The microphone: a recording becomes the clip to continue.
        assert not await page.is_disabled("#record")
        await page.click("#record")
        await page.wait_for_timeout(700)
        await page.click("#record")
        await wait(page, "document.querySelector('#upload-note').textContent.includes('recording')")
        await page.click("#clear-upload")
        # Opus, decoded by the browser as it comes.
        await choose(page, "opus")
        rid = await submit(page, "over https", duration="2")
        done = await finished(page, rid)
        assert done["status"] == "completed", done["error"]
        assert done["frames"] == done["serverSamples"] == 2 * 48000
        assert page.errors == []


async def test_over_plain_http_from_elsewhere_the_page_says_why(server: Any) -> None:
    async with chromium(RESOLVE) as browser:
        page = await visit(browser, f"http://{ELSEWHERE}:{server.port}/")
        assert not await page.evaluate("window.isSecureContext")
        # Recording: off, and the reason beside it.
        assert await page.is_disabled("#record")
        note = await page.text_content("#upload-note")
        assert note is not None and "Recording needs a secure page" in note
        # The encoded formats: off, PCM plays.
        await choose(page, "")
        disabled = await page.eval_on_selector_all(
            "#stream-format option", "els => els.filter(e => e.disabled).map(e => e.value)"
        )
        assert disabled == ["opus", "mp3", "flac"]
        rid = await submit(page, "over http", duration="1")
        done = await finished(page, rid)
        assert done["status"] == "completed", done["error"]
        assert page.errors == []
