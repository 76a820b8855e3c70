"""The demo page in real headless Chromium (Debian's), against the real server."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import soundfile
from helpers import make_config, running_server, timeout, with_stereo

playwright_api = pytest.importorskip("playwright.async_api")

# (One browser for the module, and each test's server, on the module's event
# loop: conftest.py.)
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = os.environ.get("WAVECAST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
GOLDEN = Path(__file__).resolve().parents[1] / "protocol" / "golden.json"
MS = 1000


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # a fake microphone (a beep) that needs no permission prompt
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


@asynccontextmanager
async def chromium(*args: str) -> AsyncIterator[Any]:
    """Debian's Chromium, headless, with the tests' flags and these."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - a stat before the browser starts
        pytest.fail(f"Chromium not found at {CHROMIUM}: scripts/setup-venv --test installs it")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *args])
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Any, server: Any, csp: bool = False, **context: Any) -> Any:
    """A page on the demo. Playwright's waiting helpers evaluate strings, which the
    server's Content-Security-Policy forbids: tests bypass it, except those that
    check the page under it (``csp=True``; there, a violation is an error)."""
    ctx = await browser.new_context(accept_downloads=True, bypass_csp=not csp, **context)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    page.errors = errors
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await page.wait_for_selector("#conn[data-state=open]", timeout=timeout(20) * MS)
    return page


async def generate(page: Any, prompt: str, duration: float) -> str:
    await page.fill("#prompt", prompt)
    await page.fill("#param-duration", str(duration))
    await page.click("#generate")
    return str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))


async def card(page: Any, rid: str) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        """(id) => { const c = window.wavecast.cards.get(id);
             return {status: c.status, frames: c.frames, consumed: c.consumed,
                     serverSamples: c.serverSamples ?? null,
                     error: c.el.querySelector('.error').textContent}; }""",
        rid,
    )
    return result


async def test_page_lists_models_and_params(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    options = await page.eval_on_selector_all("#model option", "els => els.map(e => e.textContent)")
    assert options == ["tiny-musicgen — TEST MODEL (noise)"]
    assert "random weights" in await page.text_content("#model-note")
    # What it is and where it runs (a test model's description is the note above).
    facts = await page.text_content("#model-facts")
    assert facts == "32 kHz mono · up to 300 s · cpu, float32"
    # A released model's line starts with its description; an older server's
    # greeting says no device or format.
    lines = await page.evaluate(
        """async () => {
          const { modelFacts } = await import("./form.js");
          const model = { description: "MusicGen small", test_model: false, sample_rate: 32000,
                          channels: 2, max_duration: 30, device: "cuda:0", dtype: "float16" };
          return [modelFacts(model), modelFacts({ ...model, device: "", dtype: "",
                                                  sample_rate: 44100, channels: 1 })];
        }"""
    )
    assert lines == [
        "MusicGen small · 32 kHz stereo · up to 30 s · cuda:0, float16",
        "MusicGen small · 44100 Hz mono · up to 30 s",
    ]
    assert await page.input_value("#param-duration") == "10"
    assert await page.get_attribute("#param-duration", "max") == "300"
    # Each field says what it is in words, its protocol name in the label's title;
    # a parameter the page has no words for shows its name, spaced.
    labels = await page.eval_on_selector_all(
        "#params label, #advanced-params label", "els => els.map(e => [e.textContent, e.title])"
    )
    assert ["Duration (s)", "params.duration"] in labels
    assert ["Multi-Band Diffusion", "params.mbd"] in labels
    assert ["Guidance (CFG)", "params.cfg_coef"] in labels
    spaced = await page.evaluate(
        """async () => (await import("./form.js")).paramLabel("some_new_knob")"""
    )
    assert spaced == "some new knob"
    assert await page.get_attribute("#param-seed", "placeholder") == "random"
    assert await page.text_content("#conn-text") == "connected"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-empty.png"), full_page=True)
    assert page.errors == []


async def test_playback_starts_before_generation_ends(
    browser: Any, server: Any, tmp_path: Path
) -> None:
    page = await open_page(browser, server)
    rid = await generate(page, "slow evolving pads", 20)
    # The worklet has played audio while the server is still generating.
    await page.wait_for_function(
        """(id) => { const c = window.wavecast.cards.get(id);
             return c.consumed > 0 && c.status === 'generating'; }""",
        arg=rid,
        timeout=timeout(30) * MS,
    )
    during = await card(page, rid)
    assert during["consumed"] > 0 and during["status"] == "generating"
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).status === 'completed'",
        arg=rid,
        timeout=timeout(60) * MS,
    )
    done = await card(page, rid)
    assert done["frames"] == done["serverSamples"] == 20 * 32000
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-completed.png"), full_page=True)
    # Download the finished clip.
    async with page.expect_download() as info:
        await page.click("article[data-status=completed] .download")
    download = await info.value
    path = tmp_path / "clip.wav"
    await download.save_as(path)
    wav = soundfile.info(str(path))
    assert (wav.samplerate, wav.channels, wav.frames) == (32000, 1, 20 * 32000)
    assert page.errors == []


async def test_cancel_stops_server_and_playback_and_keeps_the_partial_clip(
    browser: Any, server: Any, tmp_path: Path
) -> None:
    page = await open_page(browser, server)
    rid = await generate(page, "cancel me", 30)
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).consumed > 0", arg=rid, timeout=timeout(30) * MS
    )
    await page.click("#cards article:first-child .cancel")
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).status === 'cancelled'",
        arg=rid,
        timeout=timeout(20) * MS,
    )
    await page.wait_for_timeout(250)  # the worklet's last position report
    first = await card(page, rid)
    await page.wait_for_timeout(400)
    later = await card(page, rid)
    assert later["consumed"] == first["consumed"]  # silence after cancel
    assert 0 < later["frames"] < 30 * 32000
    assert await page.text_content("#cards article:first-child .status") == "cancelled (partial)"
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1
    # What was made stays: it plays again, and downloads as a partial clip.
    await page.click("#cards article:first-child .play")
    await page.wait_for_function(
        "([id, n]) => window.wavecast.cards.get(id).consumed > n",
        arg=[rid, later["consumed"]],
        timeout=timeout(10) * MS,
    )
    async with page.expect_download() as info:
        await page.click("#cards article:first-child .download")
    download = await info.value
    assert download.suggested_filename.endswith("-partial.wav")
    path = tmp_path / "partial.wav"
    await download.save_as(path)
    assert soundfile.info(str(path)).frames == later["frames"]
    assert page.errors == []


async def test_server_errors_are_shown(browser: Any) -> None:
    async with running_server(make_config(max_active=1, max_queue=0)) as srv:
        page = await open_page(browser, srv)
        first = await generate(page, "keeps the only slot", 30)
        await page.wait_for_function(
            "(id) => window.wavecast.cards.get(id).frames > 0", arg=first, timeout=timeout(30) * MS
        )
        # (Busy, the page asks again for two minutes: here, not at all.)
        await page.evaluate("async () => { (await import('./card.js')).retry.forMs = 0; }")
        second = await generate(page, "no room", 2)
        await page.wait_for_function(
            "(id) => window.wavecast.cards.get(id).status === 'error'",
            arg=second,
            timeout=timeout(20) * MS,
        )
        shown = await card(page, second)
        assert "busy" in shown["error"]
        await page.click("#cards article:nth-child(2) .cancel")
        await page.wait_for_function(
            "(id) => window.wavecast.cards.get(id).status === 'cancelled'",
            arg=first,
            timeout=timeout(20) * MS,
        )


# The AudioWorklet player on its own, in a page's script: ``node`` (a jitter
# buffer of 0.15 s at 32 kHz, mono), the ``states`` it reports, the frames it has
# ``consumed``, ``feed(n)`` (n frames), ``sleep(ms)`` and ``waitFor(test)``.
WORKLET = """
          const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
          const waitFor = async (test) => {  // polls; a loaded machine only makes it slower
            for (let i = 0; i < 200 && !test(); i++) await sleep(50);
          };
          const ctx = new AudioContext({ sampleRate: 32000 });
          await ctx.audioWorklet.addModule('/worklet.js');
          await ctx.resume();
          const node = new AudioWorkletNode(ctx, 'wavecast-stream-player', {
            numberOfInputs: 0, outputChannelCount: [1],
            processorOptions: { channels: 1, capacityFrames: 32000 * 5, startFrames: 4800 },
          });
          node.connect(ctx.destination);
          const states = [];
          let consumed = 0;
          node.port.onmessage = (e) => {
            if (e.data.kind === 'state') states.push(e.data.state);
            if (e.data.consumed !== undefined) consumed = e.data.consumed;
          };
          const feed = (n) => node.port.postMessage(
            { kind: 'chunk', samples: new Float32Array(n).fill(0.1) });
"""


async def test_player_waits_when_it_catches_up_and_resumes(browser: Any, server: Any) -> None:
    """The AudioWorklet player on its own: jitter buffer, buffering, resume, end."""
    page = await open_page(browser, server)
    result = await page.evaluate(
        "async () => {"
        + WORKLET
        + """
          feed(3200);                 // 0.1 s: less than the 0.15 s jitter buffer
          await sleep(400);
          const beforeStart = [...states];
          feed(6400);                 // 0.3 s in all: plays, then runs dry
          await waitFor(() => states.includes('buffering'));
          const afterDry = [...states];
          feed(6400);                 // more arrives: resumes
          node.port.postMessage({ kind: 'end' });
          await waitFor(() => states.includes('finished'));
          await sleep(200);  // the last position report
          return { beforeStart, afterDry, states, consumed };
        }"""
    )
    assert result["beforeStart"] == []
    assert result["afterDry"] == ["playing", "buffering"]
    assert result["states"] == ["playing", "buffering", "playing", "finished"]
    assert result["consumed"] == 16000  # every sample played once, none dropped


async def test_player_holds_more_where_the_audio_comes_slower_than_real_time(
    browser: Any, server: Any
) -> None:
    """Slower than real time, the page raises what the worklet holds before it
    starts (``lead``: what covers the rest at the speed measured, as the
    ``--play`` command does): 0.3 s fed, past the jitter buffer, and it still
    waits for the 0.5 s asked; at 0.6 s it plays, every sample once. The page's
    rule (``leadSeconds``), and a ``Player`` fed 0.05 s every 0.1 s (half of real
    time) with 1 s in all: after half of it, it holds about what the rest takes
    away."""
    page = await open_page(browser, server)
    result = await page.evaluate(
        "async () => {"
        + WORKLET
        + """
          node.port.postMessage({ kind: 'lead', frames: 16000 });
          feed(9600);
          await sleep(400);
          const held = [...states];
          feed(9600);
          await waitFor(() => states.includes('playing'));
          node.port.postMessage({ kind: 'end' });
          await waitFor(() => states.includes('finished'));
          await sleep(200);

          const { leadSeconds, PLAY_MARGIN, Player } = await import('/player.js');
          const rule = [
            leadSeconds(null, 0.5), leadSeconds(10, null), leadSeconds(10, 2),
            leadSeconds(10, 0.5 / PLAY_MARGIN), leadSeconds(0, 0.1),
          ];
          const player = new Player(
            { sampleRate: 32000, channels: 1, capacityFrames: 32000 * 2, paused: true }, {});
          const before = player.lead;  // (all of it, until the speed is measured)
          player.total = 1.0;
          const fed = [];
          for (let i = 0; i < 10; i++) {
            player.feed(new Float32Array(1600));
            fed.push(performance.now());
            await sleep(100);
          }
          const speed = 0.45 / ((fed[9] - fed[0]) / 1000);  // (as the player measures it)
          const expected = leadSeconds(0.5, speed);
          const lead = player.lead / 32000;
          player.close();
          return { held, states, consumed, rule, lead, expected, speed, before };
        }"""
    )
    assert result["held"] == []
    assert result["states"] == ["playing", "finished"]
    assert result["consumed"] == 19200
    assert result["rule"] == [0, 0, 0, pytest.approx(10), 0]
    assert result["before"] == float("inf")
    # 0.5 s left, coming at 0.5x or less (0.45x counted): 0.61 s or more held.
    assert result["speed"] <= 0.5 and result["lead"] >= 0.6, result
    assert result["lead"] == pytest.approx(result["expected"], rel=0.05), result


async def test_reconnects_after_the_connection_drops(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    for session in list(server.sessions):
        await session.ws.close(1012, "restart")
    await page.wait_for_function(
        "document.querySelector('#conn').dataset.state === 'disconnected'",
        timeout=timeout(10) * MS,
    )
    assert await page.text_content("#conn-text") == "disconnected (restart) — reconnecting…"
    await page.wait_for_function(
        "document.querySelector('#conn').dataset.state === 'open'", timeout=timeout(20) * MS
    )
    rid = await generate(page, "after the reconnect", 1)
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).status === 'completed'",
        arg=rid,
        timeout=timeout(30) * MS,
    )


async def test_a_full_server_is_shown_as_such_and_tried_again(browser: Any) -> None:
    """At its connection limit the server closes a new connection with 1013: the
    page says the server is full (not that the connection was lost), and
    connects once there is room."""
    from wavecast.clients import connect

    async with running_server(make_config(max_connections_per_ip=1)) as srv:
        client = await connect(srv.url)
        ctx = await browser.new_context(bypass_csp=True)
        page = await ctx.new_page()
        await page.goto(f"http://127.0.0.1:{srv.port}/")
        await page.wait_for_function(
            "document.querySelector('#conn').dataset.state === 'disconnected'",
            timeout=timeout(20) * MS,
        )
        assert await page.text_content("#conn-text") == (
            "the server is full: too many connections from this address — trying again…"
        )
        await client.close()
        await page.wait_for_function(
            "document.querySelector('#conn').dataset.state === 'open'", timeout=timeout(20) * MS
        )
        await ctx.close()


async def test_phone_sized_screen_and_keyboard(browser: Any, server: Any) -> None:
    page = await open_page(
        browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing overflows sideways
    await page.focus("#prompt")
    await page.keyboard.type("keyboard only")
    await page.fill("#param-duration", "1")
    await page.focus("#prompt")
    await page.keyboard.press("Control+Enter")
    await page.wait_for_function(
        "[...window.wavecast.cards.values()].some(c => c.status === 'completed')",
        timeout=timeout(30) * MS,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-phone.png"), full_page=True)


async def test_js_protocol_matches_golden_frames(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    golden = json.loads(GOLDEN.read_text())
    results = await page.evaluate(
        """async (golden) => {
          const p = await import('/protocol.js');
          const hex = (b) => [...b].map(x => x.toString(16).padStart(2, '0')).join('');
          const unhex = (h) => new Uint8Array(h.match(/../g).map(x => parseInt(x, 16)));
          const b64 = (bytes) => btoa(String.fromCharCode(...bytes));
          return golden.map((g) => {
            const unbin = (m) => {  // bytes -> base64, as the golden JSON holds them
              for (const k of ['data', 'codes', 'resume_codes']) {
                if (m[k] instanceof Uint8Array) m[k] = b64(m[k]);
              }
              for (const k of Object.keys(m.inputs || {})) m.inputs[k] = b64(m.inputs[k]);
              return m;
            };
            const m = unbin(p.decodeMessage(unhex(g.msgpack)));
            const fromJson = unbin(p.decodeMessage(JSON.stringify(g.json)));
            const out = {decoded: m, fromJson};
            if (['generate', 'cancel', 'text'].includes(g.json.type)) {
              const msg = p.decodeMessage(JSON.stringify(g.json));  // inputs as bytes
              out.encoded = hex(p.encodeMessage(msg));
            }
            return out;
          });
        }""",
        golden,
    )
    for entry, result in zip(golden, results, strict=True):
        assert result["decoded"] == entry["json"], entry["name"]
        assert result["fromJson"] == entry["json"], entry["name"]
        if "encoded" in result:
            assert result["encoded"] == entry["msgpack"], entry["name"]


async def test_continue_an_uploaded_file(browser: Any, server: Any, tmp_path: Path) -> None:
    import numpy as np

    source = tmp_path / "riff.wav"
    t = np.arange(44100) / 44100
    soundfile.write(str(source), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    page = await open_page(browser, server)
    assert await page.is_visible("#upload")
    await page.set_input_files("#continuation", str(source))
    await page.wait_for_function(
        "document.querySelector('#upload-note').textContent.includes('riff.wav')",
        timeout=timeout(10) * MS,
    )
    rid = await generate(page, "continue this", 3)
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).status === 'completed'",
        arg=rid,
        timeout=timeout(30) * MS,
    )
    done = await card(page, rid)
    assert done["frames"] == done["serverSamples"] == 2 * 32000  # 3 s in all, 1 s was ours


async def test_record_from_the_microphone(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    await page.click("#record")
    await page.wait_for_function(
        "document.querySelector('#record').getAttribute('aria-pressed') === 'true'",
        timeout=timeout(10) * MS,
    )
    await page.wait_for_timeout(1200)
    await page.click("#record")
    await page.wait_for_function(
        "document.querySelector('#upload-note').textContent.includes('your recording')",
        timeout=timeout(10) * MS,
    )
    rid = await generate(page, "continue my humming", 3)
    await page.wait_for_function(
        "(id) => ['completed', 'error'].includes(window.wavecast.cards.get(id).status)",
        arg=rid,
        timeout=timeout(30) * MS,
    )
    done = await card(page, rid)
    assert done["status"] == "completed", done["error"]
    assert 0 < done["frames"] < 3 * 32000


async def test_mbd_version_is_offered(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    await page.check("#param-mbd")
    rid = await generate(page, "polish it", 1)
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).status === 'completed'",
        arg=rid,
        timeout=timeout(60) * MS,
    )
    frames = await page.evaluate("(id) => window.wavecast.cards.get(id).mbdFrames", rid)
    assert frames == 32000
    # The live version has played to its end (on a busy machine it may still be
    # playing, and the play button below would pause it).
    await page.wait_for_function(
        "(id) => { const p = window.wavecast.cards.get(id).player; return !p || !p.playing; }",
        arg=rid,
        timeout=timeout(30) * MS,
    )
    # An A/B switch between the two versions, in the card's one player.
    mbd = "#cards article:first-child .renditions [data-rendition=mbd]"
    await page.click(mbd)
    assert await page.get_attribute(mbd, "aria-pressed") == "true"
    assert await page.evaluate("(id) => window.wavecast.cards.get(id).rendition", rid) == "mbd"
    before = (await card(page, rid))["consumed"]
    await page.click("#cards article:first-child .play")
    await page.wait_for_function(
        "([id, n]) => window.wavecast.cards.get(id).consumed > n",
        arg=[rid, before],
        timeout=timeout(10) * MS,
    )
    assert await page.get_attribute("#cards article:first-child .download-mbd", "download")
    assert page.errors == []


async def test_melody_picker_only_for_melody_models(browser: Any, tmp_path: Path) -> None:
    import numpy as np

    source = tmp_path / "hum.wav"
    soundfile.write(str(source), (0.2 * np.random.default_rng(0).standard_normal(22050)), 22050)
    async with running_server(factory=with_stereo) as srv:
        page = await open_page(browser, srv)
        await page.select_option("#model", "tiny-musicgen")
        assert not await page.is_visible("#upload-melody")
        await page.select_option("#model", "tiny-musicgen-melody")
        assert await page.is_visible("#upload-melody")
        await page.set_input_files("#melody", str(source))
        await page.wait_for_function(
            "document.querySelector('#note-melody').textContent.includes('hum.wav')",
            timeout=timeout(10) * MS,
        )
        rid = await generate(page, "follow the humming", 1)
        await page.wait_for_function(
            "(id) => window.wavecast.cards.get(id).status === 'completed'",
            arg=rid,
            timeout=timeout(60) * MS,
        )
        assert (await card(page, rid))["frames"] == 32000


async def test_the_page_works_under_its_content_security_policy(browser: Any, server: Any) -> None:
    """Every part of the page the server's CSP governs — scripts, styles, the
    worklet, the socket, blob audio, the spectrogram — with the policy enforced."""
    page = await open_page(browser, server, csp=True)
    await page.click("#examples .chip >> nth=1")
    await page.fill("#param-duration", "1")
    await page.click("#generate")
    done = "#cards article[data-status=completed]"
    await page.wait_for_selector(done, timeout=timeout(30) * MS)
    await page.click(f"{done} .view")
    await page.click(f"{done} .show-code")
    # The live stream plays to its end in the worklet, then plays again on request.
    await page.wait_for_selector(f"{done} .play:has-text('Play')", timeout=timeout(10) * MS)
    await page.click(f"{done} .play")
    await page.wait_for_selector(f"{done} .play:has-text('Pause')", timeout=timeout(10) * MS)
    async with page.expect_download() as info:
        await page.click(f"{done} .download")
    assert (await info.value).suggested_filename.endswith(".wav")
    assert await page.evaluate("window.wavecast.cards.size") == 1
    assert page.errors == []
