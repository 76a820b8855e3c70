"""The demo page's cards as a player and the form as a tool, in real headless
Chromium against the real server: one transport per card (pause, resume, stop,
seek, play again), one card playing at a time, removing cards, the form's own
checks and keys, stages and lengths the server reports."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import in_its_place, make_config, running_server, timeout, with_stereo
from test_demo import MS, card, generate, open_page

from wavecast.protocol import Generate, decode

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


async def wait(page: Any, test: str, arg: Any = None, seconds: float = 30) -> None:
    await page.wait_for_function(test, arg=arg, timeout=timeout(seconds) * MS)


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=timeout(10)) as response:
        return str(response.read().decode())


async def player(page: Any, rid: str) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        """(id) => { const p = window.wavecast.cards.get(id).player;
             return {playing: p.playing, position: p.position, consumed: p.consumed,
                     state: p.state, length: p.length}; }""",
        rid,
    )
    return result


async def test_one_transport_pause_resume_stop_seek_and_play_again(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server)
    rid = await generate(page, "a long one", 12)
    first = f"#cards article[data-id='{rid}']"
    await wait(page, "(id) => window.wavecast.cards.get(id).consumed > 0", rid)
    assert await page.text_content(f"{first} .play") == "❚❚ Pause"
    # Pause: the playhead stops while generation goes on.
    await page.click(f"{first} .play")
    await page.wait_for_timeout(250)  # the worklet's last position report
    paused = await player(page, rid)
    await page.wait_for_timeout(400)
    later = await player(page, rid)
    assert not later["playing"] and later["consumed"] == paused["consumed"]
    assert await page.text_content(f"{first} .play") == "▶ Play"
    # Resume from where it stopped.
    await page.click(f"{first} .play")
    await wait(
        page,
        "([id, n]) => window.wavecast.cards.get(id).consumed > n",
        [rid, later["consumed"]],
        10,
    )
    # Stop: back to the start, silent.
    await page.click(f"{first} .stop")
    await wait(page, "(id) => window.wavecast.cards.get(id).player.position === 0", rid, 5)
    stopped = await player(page, rid)
    assert not stopped["playing"]
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid, 60)
    # The same control plays the finished clip; a click on the waveform seeks.
    box = await page.query_selector(f"{first} .wave-box")
    assert box is not None
    bounds = await box.bounding_box()
    assert bounds is not None
    await page.mouse.click(bounds["x"] + bounds["width"] * 0.75, bounds["y"] + 10)
    await wait(
        page,
        "(id) => Math.abs(window.wavecast.cards.get(id).player.position - 9 * 32000) < 32000",
        rid,
        5,
    )
    left = await page.eval_on_selector(f"{first} .playhead", "e => parseFloat(e.style.left)")
    assert 70 <= left <= 80
    assert await page.get_attribute(f"{first} .wave-box", "aria-valuenow") in ("9.0", "8.9", "9.1")
    # A report the worklet sent before it saw the seek (still in flight) moves
    # nothing; one sent after it does.
    stale, current = await page.evaluate(
        """(id) => {
            const p = window.wavecast.cards.get(id).player;
            const at = p.position;
            const report = (position, epoch) => ({ kind: "position", position, epoch });
            p.onMessage(report(0, p.epoch - 1));
            const stale = p.position === at;
            p.onMessage(report(at + 1, p.epoch));
            const current = p.position === at + 1;
            p.seek(at);
            return [stale, current];
        }""",
        rid,
    )
    assert stale and current
    await page.click(f"{first} .play")
    await wait(
        page,
        "(id) => window.wavecast.cards.get(id).player.position > 9.2 * 32000",
        rid,
        10,
    )
    # The keyboard moves the playhead too.
    await page.focus(f"{first} .wave-box")
    await page.keyboard.press("Home")
    await wait(page, "(id) => window.wavecast.cards.get(id).player.position < 32000", rid, 5)
    assert page.errors == []


async def test_a_stream_ending_after_playback_caught_up_finishes(
    browser: Any,
    server: Any,
) -> None:
    """Generation slower than playback (a big model, a busy machine): the player
    plays what it has and waits for more ("buffering"); when the stream then
    ends with nothing more, it finishes (it used to wait for ever, and its play
    button paused it instead of playing the clip again)."""
    page = await open_page(browser, server)
    result = await page.evaluate(
        """async () => {
            const { Player } = await import("/player.js");
            const states = [];
            const p = new Player(
                { sampleRate: 32000, channels: 1, capacityFrames: 320000 },
                { onState: (state) => states.push(state) },
            );
            await p.ready;
            const until = async (test) => {
                for (let i = 0; i < 400 && !test(); i++) {
                    await new Promise((done) => setTimeout(done, 25));
                }
                return test();
            };
            // A quarter of a second in two chunks (at once: faster than real time,
            // so nothing more is held than the jitter buffer), then nothing.
            p.feed(new Float32Array(4000));
            p.feed(new Float32Array(4000));
            const waited = await until(() => p.state === "buffering");
            p.end();
            const finished = await until(() => p.state === "finished");
            return { waited, finished, playing: p.playing, consumed: p.consumed, states };
        }"""
    )
    assert result["waited"] and result["finished"], result
    assert not result["playing"] and result["consumed"] == 8000
    assert page.errors == []


async def test_one_card_plays_at_a_time(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    a = await generate(page, "first", 20)
    await wait(page, "(id) => window.wavecast.cards.get(id).consumed > 0", a)
    b = await generate(page, "second", 1)
    # The new card takes the speakers: the first one pauses.
    await wait(page, "(id) => !window.wavecast.cards.get(id).player.playing", a, 10)
    await wait(page, "(id) => window.wavecast.cards.get(id).consumed > 0", b)
    await page.wait_for_timeout(250)  # a's worklet's last position report
    held = (await player(page, a))["consumed"]
    await page.wait_for_timeout(300)
    assert (await player(page, a))["consumed"] == held
    # Playing the first again pauses the second.
    await page.click(f"#cards article[data-id='{a}'] .play")
    await wait(page, "(id) => window.wavecast.cards.get(id).player.playing", a, 5)
    assert not (await player(page, b))["playing"]
    # Unless asked to play them together.
    await page.check("#play-together")
    await page.click(f"#cards article[data-id='{b}'] .play")
    await wait(page, "(id) => window.wavecast.cards.get(id).player.playing", b, 5)
    assert (await player(page, a))["playing"]
    assert page.errors == []


async def test_new_cards_come_into_view_and_downloads_are_named(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server, viewport={"width": 1000, "height": 700})
    for i in range(3):
        rid = await generate(page, f"filler {i}", 0.5)
        await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    await page.fill("#prompt", "Dark Ambient: drones & rain!")
    await page.fill("#param-seed", "77")
    await page.keyboard.press("Control+Enter")
    await wait(page, "window.wavecast.cards.size === 4")
    rid = str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))
    article = f"#cards article[data-id='{rid}']"
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    top = await page.eval_on_selector(article, "e => e.getBoundingClientRect().top")
    assert 0 <= top < 700  # in view
    name = await page.get_attribute(f"{article} .download", "download")
    assert name == "wavecast-dark-ambient-drones-rain-seed77.wav"


async def test_cards_are_removed_and_cleared(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    ids = [await generate(page, f"clip {i}", 0.5) for i in range(3)]
    for rid in ids:
        await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    assert await page.locator("#cards article").count() == 3
    await page.click(f"#cards article[data-id='{ids[0]}'] .remove")
    assert await page.locator("#cards article").count() == 2
    assert await page.evaluate("window.wavecast.cards.size") == 2
    running = await generate(page, "still going", 300)  # (20 s was made before its remove once)
    await wait(page, "(id) => window.wavecast.cards.get(id).frames > 0", running)
    await page.click("#clear-cards")
    # The finished ones go; the running one stays.
    assert await page.evaluate("[...window.wavecast.cards.keys()]") == [running]
    await page.click(f"#cards article[data-id='{running}'] .remove")  # cancels it
    await server.scheduler.wait_idle(timeout(5))
    assert server.scheduler.snapshot()["cancelled"] == 1
    assert await page.locator("#cards article").count() == 0
    assert page.errors == []


async def test_accessible_names_and_a_quiet_live_region(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server)
    rid = await generate(page, "named things", 0.5)
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    article = f"#cards article[data-id='{rid}']"
    assert await page.get_attribute("#cards", "aria-live") is None  # no chattering stats
    for selector in (".play", ".stop", ".remove", ".progress", ".wave-box"):
        label = await page.get_attribute(f"{article} {selector}", "aria-label")
        assert label and label.endswith("named things"), selector
    await wait(
        page, "document.querySelector('#announcer').textContent === 'named things: completed'"
    )


async def test_form_checks_and_keys(browser: Any, server: Any) -> None:
    page = await open_page(browser, server)
    await page.fill("#prompt", "checked by the browser")
    # Ctrl+Enter goes through the browser's own checks: out of range, no request.
    await page.fill("#param-duration", "500")
    await page.focus("#prompt")
    await page.keyboard.press("Control+Enter")
    await page.wait_for_timeout(300)
    assert await page.evaluate("window.wavecast.cards.size") == 0
    assert await page.eval_on_selector("#param-duration", "e => !e.validity.valid")
    # Enter in a number field does not start a generation.
    await page.fill("#param-duration", "1")
    await page.focus("#param-duration")
    await page.keyboard.press("Enter")
    await page.wait_for_timeout(300)
    assert await page.evaluate("window.wavecast.cards.size") == 0
    await page.keyboard.press("Control+Enter")
    await wait(page, "window.wavecast.cards.size === 1")
    # Parameters show their descriptions, not only on hover.
    help_text = await page.text_content("#param-temperature-help")
    assert help_text and "0" in help_text
    # A parameter that needs an input (include prompt: a continuation) shows only with it.
    assert await page.query_selector("#param-include_prompt") is None
    assert page.errors == []


async def test_a_continuation_card_is_scaled_to_the_new_part(
    browser: Any,
    server: Any,
    tmp_path: Path,
) -> None:
    source = tmp_path / "riff.wav"
    t = np.arange(44100) / 44100
    soundfile.write(str(source), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    page = await open_page(browser, server)
    await page.set_input_files("#continuation", str(source))
    await page.wait_for_selector("#param-include_prompt")
    rid = await generate(page, "continue this", 3)
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    info = await page.evaluate(
        """(id) => { const c = window.wavecast.cards.get(id);
             return {duration: c.duration, statuses: c.statuses,
                     meta: c.el.querySelector('.meta').textContent,
                     played: c.el.querySelector('.played').style.width}; }""",
        rid,
    )
    assert info["duration"] == 2.0  # 3 s in all, 1 s was ours
    assert "2.0 s after your clip" in info["meta"]
    assert "analysing your clip…" in info["statuses"]
    done = await card(page, rid)
    assert done["frames"] == 2 * 32000


async def test_a_melody_request_shows_its_analysis_not_the_queue(
    browser: Any,
    tmp_path: Path,
) -> None:
    source = tmp_path / "hum.wav"  # (8 s: an analysis of many parts, a few ticks each)
    hum = 0.2 * np.random.default_rng(0).standard_normal(22050 * 8)
    soundfile.write(str(source), hum, 22050)
    async with running_server(factory=with_stereo) as srv:
        page = await open_page(browser, srv)
        await page.select_option("#model", "tiny-musicgen-melody")
        await page.set_input_files("#melody", str(source))
        await wait(page, "document.querySelector('#note-melody').textContent.includes('hum.wav')")
        rid = await generate(page, "follow the humming", 1)
        await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid, 60)
        statuses = await page.evaluate("(id) => window.wavecast.cards.get(id).statuses", rid)
        # queued, then the analysis, then generation: never "queued" once it left the queue
        at = statuses.index("analysing the melody…")
        assert all(not s.startswith("queued") for s in statuses[at:])
        assert statuses[-1] == "completed"
        # ... and how far the analysis is, as the server says it.
        shown = [
            int(s.rsplit(" ", 1)[1].rstrip("%"))
            for s in statuses[at + 1 :]
            if s.startswith("analysing the melody… ")
        ]
        assert shown and shown == sorted(shown) and shown[0] > 0 and shown[-1] < 100
        assert page.errors == []


async def run(*argv: str, cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout(120))
    return process.returncode or 0, out.decode()


async def test_copy_as_code_runs_and_a_link_fills_the_form(
    browser: Any,
    server: Any,
    tmp_path: Path,
) -> None:
    page = await open_page(browser, server, permissions=["clipboard-read", "clipboard-write"])
    await page.fill("#prompt", "it's a 'quoted' prompt")
    await page.fill("#param-duration", "0.5")
    await page.click("#advanced summary")
    await page.fill("#param-temperature", "0.5")
    await page.click("#generate")
    rid = str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    seed = await page.evaluate("(id) => window.wavecast.cards.get(id).seed", rid)
    article = f"#cards article[data-id='{rid}']"
    await page.click(f"{article} .show-code")
    python = await page.text_content(f"{article} .code-python")
    cli = await page.text_content(f"{article} .code-cli")
    frame = await page.text_content(f"{article} .code-json")
    assert python and cli and frame
    # The snippets are the exact request, seed included, and they run.
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "snippet.py").write_text(python)
    code, out = await run(sys.executable, "snippet.py", cwd=tmp_path / "py")
    assert code == 0, out
    (tmp_path / "cli").mkdir()
    words = shlex.split(cli)
    assert words[0] == "wavecast"
    code, out = await run(
        sys.executable, "-m", "wavecast.clients.cli", *words[1:], cwd=tmp_path / "cli"
    )
    assert code == 0, out
    a, rate = soundfile.read(str(tmp_path / "py" / "out.wav"))
    b, _ = soundfile.read(str(tmp_path / "cli" / "out.wav"))
    # Same seed, same clip: the same codes, the audio to float rounding (its chunks
    # fall where the server's steps were when it joined), so within one 16-bit step.
    assert rate == 32000 and len(a) == 16000 and np.abs(a - b).max() <= 1 / 32768
    clip = np.array(await page.evaluate("(id) => [...window.wavecast.cards.get(id).clip]", rid))
    assert np.abs(a - clip).max() < 1e-3  # and the page's (float32 vs int16 on the wire)
    websocat, json_frame = frame.split("\n", 1)
    assert websocat.startswith("websocat ") and "encoding=json" in websocat
    request = decode(json_frame)
    assert isinstance(request, Generate)
    given = {name: request.params[name] for name in ("duration", "temperature", "seed")}
    assert given == {"duration": 0.5, "temperature": 0.5, "seed": seed}
    # A link with the settings fills the form on a fresh page.
    await page.click(f"{article} .copy-link")
    link = await page.evaluate("navigator.clipboard.readText()")
    fresh = await open_page(browser, server)
    await fresh.goto(link)
    await wait(fresh, "document.querySelector('#prompt').value.includes('quoted')")
    assert await fresh.input_value("#param-duration") == "0.5"
    assert await fresh.input_value("#param-temperature") == "0.5"
    assert await fresh.input_value("#param-seed") == str(seed)
    # ...and opened in a new tab, once the models are known.
    opened = await (await browser.new_context(bypass_csp=True)).new_page()
    await opened.goto(link)
    await wait(opened, "document.querySelector('#prompt').value.includes('quoted')")
    assert await opened.input_value("#param-temperature") == "0.5"
    # Load settings and reuse seed, on the first page.
    await page.fill("#prompt", "something else")
    await page.fill("#param-seed", "")
    await page.click(f"{article} .reuse-seed")
    assert await page.input_value("#param-seed") == str(seed)
    await page.click(f"{article} .load-settings")
    assert await page.input_value("#prompt") == "it's a 'quoted' prompt"
    assert page.errors == [] and fresh.errors == []


async def test_history_survives_a_reload_bounded(
    browser: Any,
    server: Any,
    tmp_path: Path,
) -> None:
    ctx = await browser.new_context(accept_downloads=True, bypass_csp=True)
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await wait(page, "window.wavecast.connected && window.wavecast.restored")
    await page.evaluate("window.wavecast.history.limits.entries = 2")
    ids = []
    for i, seconds in enumerate((0.5, 1.0, 1.5)):
        rid = await generate(page, f"kept clip {i}", seconds)
        await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
        ids.append(rid)
    await wait(page, "window.wavecast.saving === 0")  # the last save
    await page.evaluate("window.wavecast.history.limits.entries = 3")
    cancelled = await generate(page, "cancelled but kept", 30)
    await wait(page, "(id) => window.wavecast.cards.get(id).frames > 0", cancelled)
    await page.click(f"#cards article[data-id='{cancelled}'] .cancel")
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'cancelled'", cancelled)
    frames = (await card(page, cancelled))["frames"]
    await wait(page, "window.wavecast.saving === 0")  # the last save
    await page.reload()
    await wait(page, "window.wavecast.connected && window.wavecast.restored")
    # Bounded: the oldest went; the rest are back, newest on top, as they were.
    order = await page.eval_on_selector_all("#cards article", "els => els.map(e => e.dataset.id)")
    assert order == [cancelled, ids[2], ids[1]]
    restored = await card(page, ids[2])
    assert restored["status"] == "completed" and restored["frames"] == 1.5 * 32000
    title = await page.text_content(f"#cards article[data-id='{ids[2]}'] .title")
    assert title == "kept clip 2"
    partial = await card(page, cancelled)
    assert partial["status"] == "cancelled" and partial["frames"] == frames
    # It plays, downloads and can be run again.
    await page.click(f"#cards article[data-id='{ids[1]}'] .play")
    await wait(page, "(id) => window.wavecast.cards.get(id).consumed > 0", ids[1], 10)
    async with page.expect_download() as info:
        await page.click(f"#cards article[data-id='{ids[1]}'] .download")
    path = tmp_path / "kept.wav"
    await (await info.value).save_as(path)
    assert soundfile.info(str(path)).frames == 32000
    await page.click(f"#cards article[data-id='{ids[1]}'] .rerun")
    await wait(page, "window.wavecast.cards.size === 4")
    rerun = str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rerun)
    assert await page.text_content(f"#cards article[data-id='{rerun}'] .title") == "kept clip 1"
    assert (await card(page, rerun))["frames"] == 32000
    # Removing a card forgets it.
    await page.click(f"#cards article[data-id='{ids[2]}'] .remove")
    await wait(page, "window.wavecast.saving === 0")  # the removal
    await page.reload()
    await wait(page, "window.wavecast.connected && window.wavecast.restored")
    order = await page.eval_on_selector_all("#cards article", "els => els.map(e => e.dataset.id)")
    assert ids[2] not in order and ids[1] in order and cancelled in order
    assert errors == []
    await ctx.close()


async def test_examples_styles_and_the_spectrogram(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server)
    await page.click("#examples .chip >> nth=0")
    prompt = await page.input_value("#prompt")
    assert prompt.startswith("warm lofi hip hop")
    await page.click("#styles .chip:has-text('jazz')")
    assert await page.input_value("#prompt") == prompt + ", jazz"
    # The spectrogram of a 1 kHz tone at 32 kHz peaks in bin 1000 / (32000 / 1024) = 32.
    found = await page.evaluate(
        """async () => {
          const { spectrogram } = await import('/spectrogram.js');
          const rate = 32000;
          const tone = new Float32Array(rate).map((_, i) => Math.sin(2 * Math.PI * 1e3 * i / rate));
          const spec = spectrogram(tone, 1, { columns: 10 });
          const column = [...spec.data.slice(5 * spec.bins, 6 * spec.bins)];
          return { filled: spec.filled, peak: column.indexOf(Math.max(...column)) };
        }"""
    )
    assert found == {"filled": 10, "peak": 32}
    rid = await generate(page, "see it", 1)
    await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
    article = f"#cards article[data-id='{rid}']"
    await page.click(f"{article} .view")
    assert await page.get_attribute(f"{article} .view", "aria-pressed") == "true"
    assert await page.is_visible(f"{article} .spectro")
    assert not await page.is_visible(f"{article} .wave")
    painted = await page.eval_on_selector(
        f"{article} .spectro",
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0;
                  return n / (c.width * c.height); }""",
    )
    assert painted > 0.95  # the whole clip, every pixel
    assert page.errors == []


async def test_the_page_asks_for_a_key_when_the_server_needs_one(
    browser: Any,
) -> None:
    config = make_config()
    config = replace(config, network=replace(config.network, api_keys=("page-key",)))
    async with running_server(config) as srv:
        ctx = await browser.new_context(bypass_csp=True)
        page = await ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"http://127.0.0.1:{srv.port}/")
        await page.wait_for_selector("#key-box:not([hidden])", timeout=timeout(20) * MS)
        assert await page.text_content("#conn-text") == "needs an API key"
        await page.fill("#api-key", "wrong")
        await page.click("#key-box button")
        await wait(page, "document.querySelector('#conn-text').textContent.includes('refused')")
        await page.fill("#api-key", "page-key")
        await page.click("#key-box button")
        await page.wait_for_selector("#conn[data-state=open]", timeout=timeout(20) * MS)
        assert not await page.is_visible("#key-box")
        rid = await generate(page, "with a key", 0.5)
        await wait(page, "(id) => window.wavecast.cards.get(id).status === 'completed'", rid)
        # The key is kept: a reload connects at once.
        await page.reload()
        await page.wait_for_selector("#conn[data-state=open]", timeout=timeout(20) * MS)
        assert not await page.is_visible("#key-box")
        assert errors == []
        await ctx.close()


async def test_a_busy_server_is_asked_again_until_there_is_room(browser: Any) -> None:
    config = make_config(max_active=1, max_queue=0, admission="slots")
    statuses = "(id) => window.wavecast.cards.get(id).statuses"
    waiting = f"(id) => ({statuses})(id).some((s) => s.startsWith('server busy: trying again in'))"
    async with running_server(config) as server:
        page = await open_page(browser, server)
        # Each generate the server took in, by request id (busy or not).
        tries: dict[str, int] = {}
        submit = server.scheduler.submit

        def counted(request: Any) -> None:
            tries[request.id] = tries.get(request.id, 0) + 1
            submit(request)

        server.scheduler.submit = counted
        first = await generate(page, "first", 300)
        await wait(page, "(id) => window.wavecast.cards.get(id).startedAt !== null", first)
        # No room: the card counts down to its next try instead of failing.
        second = await generate(page, "second", 1)
        await wait(page, waiting, second)
        assert (await card(page, second))["error"] == ""
        await page.click(f".card[data-id='{first}'] .cancel")
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", second, 60)
        done = await card(page, second)
        assert done["status"] == "completed", done
        assert done["frames"] == done["serverSamples"] == 32000
        said = await page.evaluate(statuses, second)
        assert any(s.startswith("server busy: asked again (") for s in said), said

        # Cancelled while it waits: ended at once, without asking the server.
        third = await generate(page, "third", 300)
        await wait(page, "(id) => window.wavecast.cards.get(id).startedAt !== null", third)
        fourth = await generate(page, "fourth", 1)
        await wait(page, waiting, fourth)
        await page.click(f".card[data-id='{fourth}'] .cancel")
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", fourth, 5)
        assert (await card(page, fourth))["status"] == "cancelled"
        await page.click(f".card[data-id='{third}'] .cancel")
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", third)
        await asyncio.sleep(1.0)  # (a try after the cancel would have gone by now)
        assert tries[fourth] == 1 and tries[second] >= 2, tries
        assert page.errors == []


async def test_requests_not_started_at_a_restart_are_asked_of_the_server_that_comes_back(
    browser: Any,
) -> None:
    config = make_config(max_active=1, max_queue=4, admission="slots")
    statuses = "(id) => window.wavecast.cards.get(id).statuses"
    started = "(id) => window.wavecast.cards.get(id).startedAt !== null"
    ended = "(id) => window.wavecast.cards.get(id).ended"
    queued = "(id) => window.wavecast.cards.get(id).statuses.includes('queued #1')"
    picked_up = (
        "(id) => window.wavecast.cards.get(id).statuses.some((s) => s.startsWith('picked up at'))"
    )
    async with running_server(config) as old:
        page = await open_page(browser, old)
        port = old.port
        first = await generate(page, "first", 300)
        await wait(page, started, first)
        second = await generate(page, "second", 1)
        await wait(page, queued, second)
        # A drain (one second's grace); nothing listens for a moment; then a
        # server on the same port.
        await asyncio.wait_for(old.stop(), timeout(30))
        await wait(page, "document.querySelector('#conn').dataset.state !== 'open'")
        await asyncio.sleep(1.0)
        new = in_its_place(config, port)
        async with running_server(new) as server:
            # The one under way is picked up where it was cut (cancelled here, to
            # leave the one slot).
            await wait(page, picked_up, first, 60)
            said = await page.evaluate(statuses, first)
            assert "server restarting: picking the stream up once reconnected" in said, said
            await page.click(f".card[data-id='{first}'] .cancel")
            await wait(page, ended, second, 60)
            done = await card(page, second)
            assert done["status"] == "completed", done
            assert done["frames"] == done["serverSamples"] == 32000
            said = await page.evaluate(statuses, second)
            assert "server restarting: asking again once reconnected" in said, said
            assert any(s.startswith("asked again (") for s in said), said
            assert (await card(page, first))["status"] == "cancelled"

            # A connection lost before a request started: the same.
            third = await generate(page, "third", 300)
            await wait(page, started, third)
            fourth = await generate(page, "fourth", 1)
            await wait(page, queued, fourth)
            for session in list(server.sessions):
                await session.ws.close(1012, "restart")
            await wait(page, picked_up, third, 60)
            await page.click(f".card[data-id='{third}'] .cancel")
            await wait(page, ended, fourth, 60)
            assert (await card(page, fourth))["status"] == "completed"
            said = await page.evaluate(statuses, fourth)
            assert "connection lost: restart: asking again once reconnected" in said, said
            said = await page.evaluate(statuses, third)
            assert "connection lost: restart: picking the stream up once reconnected" in said
            assert page.errors == []


async def test_a_card_cut_under_way_by_a_restart_is_picked_up_and_plays_on(
    browser: Any,
) -> None:
    """A card streaming when its server restarts waits with its player, is asked
    of the server that comes back from the frame it had (its seed, ``resume``),
    and ends with the clip asked for, whole: the one a client gets for that seed.
    The codes its audio came with go back with it (``resume_codes``)."""
    from wavecast.clients import connect

    config = make_config(max_active=1, admission="slots")
    config = replace(config, timeouts=replace(config.timeouts, shutdown_grace=0.2))
    get = "(id) => window.wavecast.cards.get(id)"
    async with running_server(config) as old:
        page = await open_page(browser, old)
        port = old.port
        rid = await generate(page, "picked up", 12)
        await wait(page, f"(id) => ({get})(id).frames >= 32000", rid)
        await page.evaluate(f"(id) => {{ window.heldPlayer = ({get})(id).player; }}", rid)
        await asyncio.wait_for(old.stop(), timeout(30))  # (a drain of 0.2 s: it is cut)
        await asyncio.sleep(1.0)
        new = in_its_place(config, port)
        async with running_server(new) as server:
            await wait(page, f"(id) => ({get})(id).ended", rid, 60)
            done = await card(page, rid)
            assert done["status"] == "completed", done
            assert done["frames"] == done["serverSamples"] == 12 * 32000
            said = await page.evaluate(f"(id) => ({get})(id).statuses", rid)
            assert "server restarting: picking the stream up once reconnected" in said, said
            at = [s for s in said if s.startswith("picked up at ")]
            assert len(at) == 1 and 1.0 <= float(at[0].split()[3]) < 12, said
            # The same player played on (it was not started again), and the new
            # server was asked to send the stream from where the card had it.
            assert await page.evaluate(f"(id) => ({get})(id).player === window.heldPlayer", rid)
            metrics = await asyncio.to_thread(http_text, f"http://127.0.0.1:{port}/metrics")
            assert 'wavecast_resumed_requests_total{model="tiny-musicgen"} 1.0' in metrics
            # From the codes the card's audio came with: the part it had was
            # decoded again, not generated again.
            taken = re.search(
                r'wavecast_resumed_from_codes_seconds_total\{model="tiny-musicgen"\} (\S+)', metrics
            )
            assert taken is not None and float(taken[1]) >= float(at[0].split()[3]) - 0.1
            seed = await page.evaluate(f"(id) => ({get})(id).seed", rid)
            clip = np.array(await page.evaluate(f"(id) => [...({get})(id).clip]", rid))
            async with connect(server.url) as client:
                alone = await (
                    await client.generate(
                        "tiny-musicgen", "picked up", duration=12, seed=seed, format="pcm_f32le"
                    )
                ).collect()
            assert np.abs(alone.to_numpy()[:, 0] - clip).max() < 1e-4

            # Its time to ask again counts from the cut: a card cut by a lost
            # connection after more than that time is picked up.
            await page.evaluate("async () => { (await import('./card.js')).retry.forMs = 1500; }")
            rid = await generate(page, "cut later", 120)
            await wait(page, f"(id) => ({get})(id).frames >= 32000", rid)
            await asyncio.sleep(1.6)
            for session in list(server.sessions):
                await session.ws.close(1012, "restart")
            picked = f"(id) => ({get})(id).statuses.some((s) => s.startsWith('picked up at'))"
            await wait(page, picked, rid)
            await page.click(f".card[data-id='{rid}'] .cancel")
            await wait(page, f"(id) => ({get})(id).ended", rid)
            assert (await card(page, rid))["status"] == "cancelled"
            assert page.errors == []


async def test_behind_a_proxy_a_drained_replicas_queued_card_runs_on_the_other_at_once(
    browser: Any,
    tmp_path: Path,
) -> None:
    """The page through nginx to two replicas of one slot each. The replica the
    page is on is sent SIGTERM: the queued card would not finish in its drain
    (behind the running one), so it ends at once; the page opens a new connection for new requests,
    which nginx takes to the other replica, and asks there, while the running
    card streams on from the draining one."""
    from cluster import connections, eventually, open_cluster

    started = "(id) => window.wavecast.cards.get(id).startedAt !== null"
    queued = "(id) => window.wavecast.cards.get(id).statuses.includes('queued #1')"
    async with open_cluster(tmp_path, "--max-active", "1", drain_seconds=8) as cluster:
        ctx = await browser.new_context(bypass_csp=True)
        page = await ctx.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        await page.goto(f"http://127.0.0.1:{cluster.port}/")
        await page.wait_for_selector("#conn[data-state=open]", timeout=timeout(20) * MS)
        (process_a, port_a), (process_b, port_b) = cluster.replicas
        await eventually(lambda: connections(port_a) + connections(port_b) == 1, 10)
        drained = process_a if await asyncio.to_thread(connections, port_a) == 1 else process_b
        first = await generate(page, "first", 300)
        await wait(page, started, first)
        # (It would start when the first ends: past half the drain time.)
        second = await generate(page, "second", 5)
        await wait(page, queued, second)
        drained.send_signal(signal.SIGTERM)
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", second, 60)
        done = await card(page, second)
        assert done["status"] == "completed", done
        said = await page.evaluate("(id) => window.wavecast.cards.get(id).statuses", second)
        assert "server restarting: asking again once reconnected" in said, said
        # The first streams on from the draining replica meanwhile, and is cancelled there.
        assert not await page.evaluate("(id) => window.wavecast.cards.get(id).ended", first)
        assert drained.poll() is None
        await page.click(f".card[data-id='{first}'] .cancel")
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", first)
        assert (await card(page, first))["status"] == "cancelled"
        assert await page.text_content("#conn-text") == "connected"
        assert page.errors == []
        await ctx.close()
