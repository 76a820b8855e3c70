"""The demo page's speech side in real headless Chromium, against the real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from helpers import higgs_engines, make_config, running_server, timeout
from test_cards import wait
from test_demo import ARTIFACTS, MS, card, chromium, open_page

# One speech server and one browser for the module (a server's start, with the
# codec's layers timed, was most of each test's time); each test has its own
# page in its own browser context. They share the module's event loop.
pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

HOP, K = 960, 4


def tone(path: Path, seconds: float, freq: float, rate: int = 24000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


async def start_typing(page: Any, max_new_tokens: int) -> str:
    """ "Speak as I type" on the page's speech model, with nothing written yet
    (the stream waits for its text): the new card's id."""
    await page.check("#as-typed")
    await page.fill("#param-max_new_tokens", str(max_new_tokens))
    await page.fill("#prompt", "")
    await page.click("#generate")
    return str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))


async def submit_and_wait(page: Any) -> tuple[str, dict[str, Any]]:
    """Press Generate; wait for the new card to complete or fail."""
    await page.click("#generate")
    rid = str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))
    await page.wait_for_function(
        "(id) => ['completed', 'error'].includes(window.wavecast.cards.get(id).status)",
        arg=rid,
        timeout=timeout(60) * MS,
    )
    return rid, await card(page, rid)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as browser:
        yield browser


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def speech_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    voices = tmp_path_factory.mktemp("voices")
    tone(voices / "belinda.wav", 1.5, 200)
    (voices / "belinda.txt").write_text("Twas the night before my birthday.")
    tone(voices / "chadwick.wav", 1.0, 110)
    config = make_config()
    config = replace(config, models=replace(config.models, voices_dir=voices))
    async with running_server(config, lambda: higgs_engines(voices)) as srv:
        yield srv


async def test_speech_form_dialogue_voices_and_upload(
    browser: Any,
    speech_server: Any,
    tmp_path: Path,
) -> None:
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    assert await page.text_content("#prompt-label") == "Text to speak"
    assert await page.is_visible("#dialogue") and await page.is_visible("#speakers")
    assert not await page.is_visible("#upload-reference")  # until "my own recording"
    assert not await page.is_visible("#upload")  # no continuation for speech
    assert "random weights" in await page.text_content("#model-note")
    options = await page.eval_on_selector_all(
        "#param-voice-0 option", "els => els.map(e => e.value)"
    )
    assert options == ["", "belinda", "chadwick", ":upload"]
    scenes = await page.eval_on_selector_all(
        "#param-scene-names option", "els => els.map(e => e.value)"
    )
    assert "quiet_indoor" in scenes
    assert await page.input_value("#param-scene") == "quiet_indoor"
    assert await page.input_value("#param-temperature") == "0.7"

    # The dialogue editor writes the text, one [SPEAKERn] line per turn.
    await page.click("#add-line")
    await page.fill("#dialogue-lines .line:nth-child(1) .line-text", "Hi, who is there?")
    await page.click("#add-line")
    await page.fill("#dialogue-lines .line:nth-child(2) .line-text", "Just me, 你好!")
    text = await page.input_value("#prompt")
    assert text == "[SPEAKER0] Hi, who is there?\n[SPEAKER1] Just me, 你好!"

    await page.select_option("#param-voice-0", "belinda")
    # A named voice can be heard before it is chosen.
    async with page.expect_response("**/v1/voices/belinda.wav") as heard:
        await page.click("#speakers .speaker[data-speaker='0'] .preview")
    response = await heard.value
    assert response.status == 200 and response.headers["content-type"] == "audio/wav"
    # SPEAKER1 speaks with my recording; its transcript field comes with it.
    assert not await page.is_visible("#param-reference_1_text")
    await page.select_option("#param-voice-1", ":upload")
    assert await page.is_visible("#upload-reference-1")
    assert await page.is_visible("#param-reference_1_text")
    await page.set_input_files("#reference_1", str(tone(tmp_path / "mine.wav", 1.0, 300)))
    await page.wait_for_function(
        "document.querySelector('#note-reference-1').textContent.includes('mine.wav')",
        timeout=timeout(10) * MS,
    )
    await page.fill("#param-max_new_tokens", "20")
    assert not await page.is_visible("#param-chunk_method")  # sampling and chunking: Advanced
    await page.click("#advanced summary")
    await page.select_option("#param-chunk_method", "speaker")
    rid, done = await submit_and_wait(page)
    assert done["status"] == "completed", done["error"]
    # two turns, each spoken to max_new_tokens, in one seamless stream
    assert done["frames"] == done["serverSamples"] == 2 * (20 - K) * HOP
    params = await page.evaluate("(id) => window.wavecast.cards.get(id).params", rid)
    assert params["voice"] == "belinda" and params["chunk_method"] == "speaker"
    assert "reference_1_text" not in params  # left empty
    sent = await page.evaluate("(id) => window.wavecast.cards.get(id).inputs", rid)
    assert sent == ["reference_1"]
    meta = await page.text_content("#cards article:first-child .meta")
    assert "test model" in meta and "voice belinda" in meta
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-speech.png"), full_page=True)
    # The finished clip downloads as a 24 kHz WAV.
    async with page.expect_download() as info:
        await page.click("article[data-status=completed] .download")
    path = tmp_path / "speech.wav"
    await (await info.value).save_as(path)
    wav = soundfile.info(str(path))
    assert (wav.samplerate, wav.frames) == (24000, 2 * (20 - K) * HOP)
    assert page.errors == []


async def test_speech_errors_and_recorded_reference(
    browser: Any,
    speech_server: Any,
) -> None:
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    # Record a reference voice from the (fake) microphone.
    await page.select_option("#param-voice-0", ":upload")
    record = "#upload-reference .record"
    await page.click(record)
    await page.wait_for_function(
        f"document.querySelector('{record}').getAttribute('aria-pressed') === 'true'",
        timeout=timeout(10) * MS,
    )
    await page.wait_for_timeout(1200)
    await page.click(record)
    await page.wait_for_function(
        "document.querySelector('#note-reference').textContent.includes('your recording')",
        timeout=timeout(10) * MS,
    )
    await page.fill("#prompt", "Say it in my voice.")
    await page.fill("#param-max_new_tokens", "12")
    _, done = await submit_and_wait(page)
    assert done["status"] == "completed", done["error"]
    assert done["frames"] == (12 - K) * HOP
    # A value the server refuses is shown at its field, not as a code on an empty
    # card (the form's `required` check passes a blank line; the server refuses it).
    cards = await page.evaluate("window.wavecast.cards.size")
    await page.fill("#prompt", " ")
    await page.click("#generate")
    await page.wait_for_selector("#prompt[aria-invalid=true]", timeout=timeout(20) * MS)
    note = await page.text_content(".field-error")
    assert note and "text" in note and "invalid_field" not in note
    assert await page.evaluate("window.wavecast.cards.size") == cards
    assert await page.evaluate("document.activeElement.id") == "prompt"
    await page.fill("#prompt", "Fixed.")  # typing clears the error
    assert await page.get_attribute("#prompt", "aria-invalid") is None
    assert await page.query_selector(".field-error") is None
    assert page.errors == []


async def test_dialogue_editor_keeps_typed_lines_and_cards_read_well(
    browser: Any,
    speech_server: Any,
) -> None:
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    assert await page.input_value("#param-chunk_method") != "speaker"
    # Lines typed by hand become editor lines when the editor is opened...
    await page.fill("#prompt", "[SPEAKER0] Typed by hand.\nA plain line.")
    await page.click("#add-line")
    await page.fill("#dialogue-lines .line:nth-child(3) .line-text", "Added here.")
    expected = "[SPEAKER0] Typed by hand.\nA plain line.\n[SPEAKER1] Added here."
    assert await page.input_value("#prompt") == expected
    # ...and stay when a line is edited after more was typed by hand.
    await page.fill("#prompt", expected + "\n[SPEAKER0] Typed again.")
    assert await page.locator("#dialogue-lines .line").count() == 4
    await page.fill("#dialogue-lines .line:nth-child(1) .line-text", "Edited.")
    text = await page.input_value("#prompt")
    assert (
        text == "[SPEAKER0] Edited.\nA plain line.\n[SPEAKER1] Added here.\n[SPEAKER0] Typed again."
    )
    # A dialogue is spoken a turn at a time.
    assert await page.input_value("#param-chunk_method") == "speaker"
    estimate = await page.text_content("#estimate")
    assert estimate and estimate.startswith("About") and "300" in estimate
    await page.fill("#param-max_new_tokens", "8")
    rid, done = await submit_and_wait(page)
    assert done["status"] == "completed", done["error"]
    shown = await page.evaluate(
        """(id) => { const el = window.wavecast.cards.get(id).el;
             return {title: el.querySelector('.title').textContent,
                     meta: el.querySelector('.meta').textContent,
                     generated: el.querySelector('.s-generated').textContent}; }""",
        rid,
    )
    assert "[SPEAKER" not in shown["title"]
    assert shown["title"].startswith("A: Edited. / A plain line. / B: Added here.")
    assert "up to" in shown["meta"]
    # "generated" counts the audio received, not the progress estimate
    assert shown["generated"] == f"{done['frames'] / 24000:.2f} s"
    assert page.errors == []


async def test_speech_form_fits_a_phone(
    browser: Any,
    speech_server: Any,
) -> None:
    page = await open_page(
        browser, speech_server, viewport={"width": 390, "height": 844}, is_mobile=True
    )
    await page.select_option("#model", "tiny-higgs")
    await page.click("#add-line")
    await page.click("#add-line")
    await page.select_option("#param-voice-1", ":upload")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    # a dialogue line's text box gets most of the width
    speaker = await page.eval_on_selector(
        "#dialogue-lines .line .speaker", "e => e.getBoundingClientRect().width"
    )
    text = await page.eval_on_selector(
        "#dialogue-lines .line .line-text", "e => e.getBoundingClientRect().width"
    )
    assert text > speaker
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-speech-phone.png"), full_page=True)
    assert page.errors == []


async def test_speech_at_a_telephones_rate_plays_and_downloads_at_it(
    browser: Any,
    speech_server: Any,
    tmp_path: Path,
) -> None:
    """The output rate (Advanced): offered beside the model's own, sent as
    ``sample_rate``; the card plays and downloads the stream at it, its code
    and its link carry it, and "load settings" brings it back."""
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    await page.fill("#prompt", "Hello there.")
    await page.fill("#param-max_new_tokens", "20")
    await page.click("#advanced summary")
    rates = await page.eval_on_selector_all("#output-rate option", "els => els.map(e => e.value)")
    assert rates[0] == "" and "8000" in rates and "48000" in rates
    assert "24000" not in rates  # the model's own is the first
    assert "24 kHz" in await page.text_content("#output-rate option:first-child")
    assert await page.get_attribute("label[for=output-rate]", "title") == "sample_rate"
    await page.select_option("#output-rate", "8000")
    rid, done = await submit_and_wait(page)
    assert done["status"] == "completed", done["error"]
    assert done["frames"] == done["serverSamples"] == (20 - K) * HOP // 3
    await page.wait_for_function(
        "(id) => { const c = window.wavecast.cards.get(id); return c.consumed >= c.frames; }",
        arg=rid,
        timeout=timeout(30) * MS,
    )  # (played to its end, at 8 kHz)
    assert "8000 Hz" in await page.text_content(f"article[data-id='{rid}'] .meta")
    async with page.expect_download() as info:
        await page.click(f"article[data-id='{rid}'] .download")
    path = tmp_path / "call.wav"
    await (await info.value).save_as(path)
    wav = soundfile.info(str(path))
    assert (wav.samplerate, wav.frames) == (8000, (20 - K) * HOP // 3)
    code = await page.evaluate("(id) => window.wavecast.cards.get(id).code()", rid)
    assert "sample_rate=8000" in code["python"] and "--sample-rate 8000" in code["cli"]
    assert '"sample_rate":8000' in code["json"]
    # Its link, and "load settings" after the form went back to the model's rate.
    link = await page.evaluate(
        """async (id) => (await import("./code.js"))
             .settingsLink(window.wavecast.cards.get(id).settings())""",
        rid,
    )
    assert "rate=8000" in link
    await page.select_option("#output-rate", "")
    await page.click(f"article[data-id='{rid}'] .load-settings")
    assert await page.input_value("#output-rate") == "8000"
    assert page.errors == []


async def test_speech_as_it_is_typed(browser: Any, speech_server: Any) -> None:
    """ "Speak as I type": Generate opens the stream with what is written; each
    sentence typed after is spoken once it ends, the rest at "End text"."""
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    assert await page.is_visible("#as-typed-box")
    rid = await start_typing(page, 20)
    assert (await page.text_content("#generate") or "").startswith("End text")
    request = await page.evaluate("(id) => window.wavecast.cards.get(id).request", rid)
    # A sentence a chunk, with its codes: picked up where it is cut (§3.4).
    assert request["text_stream"] is True and request["codes"] is True
    assert request["params"]["chunk_method"] == "sentence"
    # Typed a character at a time, as a person types: the first sentence is
    # spoken once it ends, before the rest is written.
    await page.type("#prompt", "Hello there. ", delay=5)
    await wait(page, "(id) => window.wavecast.cards.get(id).frames > 0", rid)
    # Said, the stream waits for more, and its card says so.
    await wait(
        page,
        "(id) => window.wavecast.cards.get(id).statuses.some((s) => s.includes('more text'))",
        rid,
    )
    await page.type("#prompt", "And one more", delay=5)
    # "End text": the rest is spoken, and the stream ends.
    ended, done = await submit_and_wait(page)
    assert ended == rid and done["status"] == "completed", done["error"]
    # Two utterances of max_new_tokens rows each, every frame's audio.
    assert done["frames"] == done["serverSamples"] == 2 * (20 - K) * HOP
    assert (await page.text_content("#generate") or "").startswith("Generate")
    # A plain speech request again once unchecked: the text box is required.
    await page.uncheck("#as-typed")
    assert await page.input_value("#param-chunk_method") == "none"
    assert await page.get_attribute("#prompt", "required") is not None
    assert page.errors == []


async def test_the_card_shows_the_text_it_is_saying(browser: Any, speech_server: Any) -> None:
    """Speech is asked for with captions (PROTOCOL.md §4.9): under the waveform,
    the card shows the text chunk the playhead is in, each in its turn."""
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    await page.fill("#prompt", "One two three. Four five six.")
    await page.fill("#param-max_new_tokens", "30")
    await page.click("#advanced summary")
    await page.select_option("#param-chunk_method", "word")
    await page.fill("#param-chunk_max_word_num", "3")
    rid, done = await submit_and_wait(page)
    assert done["status"] == "completed", done["error"]
    request = await page.evaluate("(id) => window.wavecast.cards.get(id).request", rid)
    assert request["captions"] is True
    captions = await page.evaluate("(id) => window.wavecast.cards.get(id).captions", rid)
    assert captions == [
        {"offset": 0, "text": "One two three."},
        {"offset": (30 - K) * HOP, "text": "Four five six."},
    ]
    # Played from its start (in real time: 2.08 s), each chunk's text in its turn.
    await page.evaluate("(id) => window.wavecast.cards.get(id).seekTo(0)", rid)
    caption = f"#cards article[data-id='{rid}'] .caption"
    shown: list[str] = []
    for _ in range(int(timeout(20) / 0.05)):
        text = await page.text_content(caption) if await page.is_visible(caption) else None
        if text and (not shown or shown[-1] != text):
            shown.append(text)
        if shown[-1:] == ["Four five six."]:
            break
        await asyncio.sleep(0.05)
    assert shown[-2:] == ["One two three.", "Four five six."]
    assert page.errors == []


@pytest.mark.parametrize("format", [None, "opus"], ids=["pcm", "opus"])
async def test_speech_typed_and_cut_by_a_lost_connection_is_picked_up(
    browser: Any, speech_server: Any, format: str | None
) -> None:
    """ "Speak as I type" cuts a sentence a chunk: a stream cut by a lost
    connection is picked up where it was (its prompt all of the text typed so
    far, from the codes its audio came with), and goes on with what is typed
    after. An Opus stream, cut as it waits for more text, is picked up with
    where its file got silence (``resume_waits``): its clip the samples the
    server made and that silence once."""
    get = "(id) => window.wavecast.cards.get(id)"
    page = await open_page(browser, speech_server)
    await page.select_option("#model", "tiny-higgs")
    if format is not None:
        await page.click("#advanced summary")
        await page.select_option("#stream-format", format)
    rid = await start_typing(page, 150)
    await page.type("#prompt", "Hello there. ", delay=5)
    await wait(page, f"(id) => ({get})(id).frames > 0", rid)
    if format is not None:  # (said, it waits for more)
        await wait(page, f"(id) => ({get})(id).waits.size > 0", rid)
    for session in list(speech_server.sessions):
        await session.ws.close(1012, "restart")
    await wait(page, f"(id) => ({get})(id).statuses.some((s) => s.startsWith('picked up at'))", rid)
    await page.type("#prompt", "And one more", delay=5)
    ended, done = await submit_and_wait(page)
    assert ended == rid and done["status"] == "completed", done["error"]
    # Two utterances of max_new_tokens rows each, every frame's audio, once.
    assert done["serverSamples"] == 2 * (150 - K) * HOP
    request = await page.evaluate(f"(id) => ({get})(id).request", rid)
    assert request["prompt"] == "Hello there. " and request["resume"] > 0
    if format is None:
        assert done["frames"] == done["serverSamples"]
    else:
        silence = await page.evaluate(f"(id) => ({get})(id).silence", rid)
        (wait_at,) = request["resume_waits"]
        assert wait_at == [(150 - K) * HOP, silence] and 0 < silence < 1200
        # (decoded at Opus' 48 kHz: the samples at 24 kHz, twice)
        assert done["frames"] == 2 * (done["serverSamples"] + silence)
    assert page.errors == []
