"""The demo page streaming Opus, MP3 and FLAC (PROTOCOL.md §4.5): decoded in the
page as the file comes, played live, offered as the file itself. Real headless
Chromium against the real server; the page's samples are checked against
FFmpeg's decoding of the same bytes."""

from __future__ import annotations

import asyncio
import base64
import io
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import higgs_engines, running_server, slow_link
from test_cards import run, wait
from test_demo import card, open_page
from test_speech import start_typing

from wavecast.protocol.messages import CODEC_RATES
from wavecast.server.encode import bit_rate

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

MP3_DELAY = 1105  # LAME's: a streamed MP3 carries no count to take it off

# A typed array of a card's, as bytes (page.evaluate returns base64 of its buffer).
AS_BASE64 = """([id, expr]) => {
  const card = window.wavecast.cards.get(id);
  const value = new Function("card", `return ${expr};`)(card);
  const bytes = new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) {
    text += String.fromCharCode(...bytes.subarray(i, i + 8192));
  }
  return btoa(text);
}"""

# The stream's rate, and the samples' in the page (Opus: decoded at 48 kHz).
RATES = "(id) => { const c = window.wavecast.cards.get(id); return [c.streamRate, c.sampleRate]; }"


async def card_bytes(page: Any, rid: str, expr: str) -> bytes:
    return base64.b64decode(await page.evaluate(AS_BASE64, [rid, expr]))


def ffmpeg_decode(data: bytes, channels: int) -> tuple[Any, int]:
    """The file's samples as FFmpeg decodes them: float, [frames, channels], its rate."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        parts = []
        for frame in container.decode(stream):
            array = frame.to_ndarray()
            array = array.reshape(-1, channels) if frame.format.is_packed else array.T
            if array.dtype == np.int16:
                array = array / 32768.0
            parts.append(array.astype(np.float32))
    return np.concatenate(parts), rate


async def choose(page: Any, format: str, bitrate: int | None = None) -> None:
    if not await page.is_visible("#stream-format"):
        await page.click("#advanced summary")
    await page.select_option("#stream-format", format)
    if bitrate is not None:
        await page.fill("#bitrate", str(bitrate))


async def submit(page: Any, prompt: str, **params: str) -> str:
    """Fill the prompt and these parameters' fields, press Generate: the new card's id."""
    for name, value in params.items():
        await page.fill(f"#param-{name}", value)
    await page.fill("#prompt", prompt)
    await page.click("#generate")
    return str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))


async def finished(page: Any, rid: str, seconds: float = 60) -> dict[str, Any]:
    await wait(
        page,
        "(id) => { const c = window.wavecast.cards.get(id); return c.ended; }",
        rid,
        seconds,
    )
    return await card(page, rid)


@pytest.mark.parametrize(
    ("format", "bitrate", "rate"),
    [("opus", None, 48000), ("mp3", 96, 32000), ("flac", None, 32000)],
)
async def test_an_encoded_stream_plays_as_it_comes_and_downloads_as_its_file(
    browser: Any,
    server: Any,
    tmp_path: Path,
    format: str,
    bitrate: int | None,
    rate: int,
) -> None:
    page = await open_page(browser, server)
    await choose(page, format, bitrate)
    help_text = await page.text_content("#stream-format-help")
    assert "kbit/s" in help_text
    rid = await submit(page, f"{format} on the wire", duration="10")
    # Played while the server is still generating: decoded as the file comes.
    await wait(
        page,
        """(id) => { const c = window.wavecast.cards.get(id);
             return c.consumed > 0 && c.status === 'generating'; }""",
        rid,
    )
    done = await finished(page, rid)
    assert done["status"] == "completed", done["error"]
    # Music at 32 kHz goes out as Opus at 48 kHz; the others at the model's rate.
    rates = await page.evaluate(RATES, rid)
    assert rates == [rate, rate]
    assert done["frames"] == done["serverSamples"] == 10 * rate
    file = await card_bytes(page, rid, "card.fileBytes")
    if format == "mp3":
        assert file[0] == 0xFF and file[1] & 0xE0 == 0xE0  # a frame's sync: no tag
    else:
        assert file[:4] == {"opus": b"OggS", "flac": b"fLaC"}[format]
    clip = np.frombuffer(await card_bytes(page, rid, "card.clip"), dtype=np.float32)
    heard, file_rate = ffmpeg_decode(file, 1)
    assert file_rate == rate
    if format == "mp3":
        heard = heard[MP3_DELAY:]
    heard = heard[: len(clip), 0]
    assert len(heard) == len(clip)
    # FLAC: exactly the 16-bit samples; MP3: the same decoder; Opus: libopus's
    # decoder here, FFmpeg's own there.
    tolerance = {"flac": 0.0, "mp3": 1e-5, "opus": 5e-3}[format]
    assert np.abs(heard - clip).max() <= tolerance
    if format == "flac":
        assert np.array_equal(np.rint(clip * 32768), clip * 32768)
    received = await page.text_content(f"#cards article[data-id='{rid}'] .s-bytes")
    kbps = float(received.split("(")[1].split(" ")[0])
    expected = len(file) * 8 / 10 / 1000
    assert abs(kbps - expected) <= 1 + 0.01 * expected
    if bitrate:
        assert abs(kbps - bitrate) < 0.1 * bitrate  # (MP3 at a constant bit rate)
    meta = await page.text_content(f"#cards article[data-id='{rid}'] .meta")
    label = {"opus": "Opus", "mp3": "MP3 96 kbit/s", "flac": "FLAC"}[format]
    assert label in meta.split(" · ")
    # The file as it came, and the decoded clip as WAV.
    async with page.expect_download() as info:
        await page.click(f"#cards article[data-id='{rid}'] .download-file")
    download = await info.value
    assert download.suggested_filename.endswith(f".{format}")
    path = tmp_path / download.suggested_filename
    await download.save_as(path)
    assert path.read_bytes() == file
    async with page.expect_download() as info:
        await page.click(f"#cards article[data-id='{rid}'] .download")
    wav = tmp_path / "clip.wav"
    await (await info.value).save_as(wav)
    assert soundfile.info(str(wav)).frames == 10 * rate
    assert page.errors == []


@pytest.mark.parametrize("format", ["opus", "mp3", "flac"])
async def test_an_encoded_card_cut_by_a_lost_connection_is_picked_up_and_plays_on(
    browser: Any, server: Any, format: str
) -> None:
    """A card streaming a file when its connection is lost asks again from the
    bytes it has and the frames they hold (``resume``, ``resume_until``) with
    the codes its audio came with: its file goes on from the next packet, its
    decoder on through it. The page decodes each frame once (its clip as long
    as the stream) and as FFmpeg decodes the joined file; that file is, to the
    codec's rounding, the one the seed makes alone."""
    from wavecast.clients import connect
    from wavecast.clients.client import decode_file

    get = "(id) => window.wavecast.cards.get(id)"
    page = await open_page(browser, server)
    await choose(page, format)
    rid = await submit(page, f"{format} picked up", duration="6")
    await wait(page, f"(id) => ({get})(id).until >= 32000", rid)
    for session in list(server.sessions):
        await session.ws.close(1012, "restart")
    done = await finished(page, rid)
    assert done["status"] == "completed", done["error"]
    request = await page.evaluate(f"(id) => ({get})(id).request", rid)
    assert request["resume"] > 0 and request["resume_until"] >= 32000, request
    assert len(request["resume_codes"]) > 0
    said = await page.evaluate(f"(id) => ({get})(id).statuses", rid)
    assert any(s.startswith("picked up at ") for s in said), said
    rate = 48000 if format == "opus" else 32000
    assert done["frames"] == done["serverSamples"] == 6 * rate
    file = await card_bytes(page, rid, "card.fileBytes")
    clip = np.frombuffer(await card_bytes(page, rid, "card.clip"), dtype=np.float32)
    heard, _ = ffmpeg_decode(file, 1)
    heard = heard[MP3_DELAY if format == "mp3" else 0 :][: len(clip), 0]
    assert len(heard) == len(clip)
    assert np.abs(heard - clip).max() <= {"flac": 0.0, "mp3": 1e-5, "opus": 5e-3}[format]
    seed = await page.evaluate(f"(id) => ({get})(id).seed", rid)
    async with connect(server.url) as client:
        alone = await (
            await client.generate(
                "tiny-musicgen", f"{format} picked up", duration=6, seed=seed, format=format
            )
        ).collect()
    whole = decode_file(alone.pcm, format).astype(np.float64)
    joined = decode_file(file, format).astype(np.float64)
    assert joined.shape == whole.shape
    assert np.abs(joined - whole).max() <= (1 if format == "flac" else 0.02)
    assert page.errors == []


@pytest.mark.parametrize("format", ["mp3", "flac"])
async def test_speech_typed_in_an_encoded_format_plays_all_of_it_at_each_wait(
    browser: Any, format: str
) -> None:
    """ "Speak as I type" in MP3 and FLAC: where the stream waits for more text,
    the page has decoded all of the speech so far (the server's file ends on a
    whole frame there, filled with silence; a FLAC frame, told apart by the
    next one's header, is handed to the decoder at the wait); the clip is the
    speech and that silence, as FFmpeg decodes the file."""
    async with running_server(factory=higgs_engines) as srv:
        page = await open_page(browser, srv)
        await page.select_option("#model", "tiny-higgs")
        await choose(page, format)
        # 19 frames of 960 samples a sentence: not a whole number of FLAC blocks
        rid = await start_typing(page, 23)
        await page.type("#prompt", "Hello there. ", delay=5)
        await wait(page, "(id) => window.wavecast.cards.get(id).waitingForText", rid)
        said = 19 * 960
        await wait(page, f"(id) => window.wavecast.cards.get(id).frames >= {said}", rid, 10)
        await page.type("#prompt", "And one more", delay=5)
        await page.click("#generate")  # ("End text")
        done = await finished(page, rid)
        assert done["status"] == "completed", done["error"]
        silence = await page.evaluate("(id) => window.wavecast.cards.get(id).silence", rid)
        assert done["serverSamples"] == 2 * said and 0 < silence < 0.4 * 24000
        assert done["frames"] == 2 * said + silence
        file = await card_bytes(page, rid, "card.fileBytes")
        clip = np.frombuffer(await card_bytes(page, rid, "card.clip"), dtype=np.float32)
        heard, _ = ffmpeg_decode(file, 1)
        heard = heard[MP3_DELAY if format == "mp3" else 0 :][: len(clip), 0]
        assert len(heard) == len(clip)
        assert np.abs(heard - clip).max() <= {"flac": 0.0, "mp3": 1e-5}[format]
        assert page.errors == []


async def test_opus_speech_cancelled_and_mbd_music_in_flac(
    browser: Any,
    tmp_path: Path,
) -> None:
    async with running_server(factory=higgs_engines) as srv:
        page = await open_page(browser, srv)
        # Speech at 24 kHz is an Opus rate; Chromium's decoder gives 48 kHz.
        await page.select_option("#model", "tiny-higgs")
        await choose(page, "opus", 24)
        # (Random weights speak on to the limit: a short one.)
        text = "Hello there, this is a long enough sentence to speak."
        rid = await submit(page, text, max_new_tokens="150")
        done = await finished(page, rid)
        assert done["status"] == "completed", done["error"]
        state = await page.evaluate(RATES, rid)
        assert state == [24000, 48000]
        assert done["frames"] == 2 * done["serverSamples"] > 0
        meta = await page.text_content(f"#cards article[data-id='{rid}'] .meta")
        assert "decoded at 48 kHz" in meta and "Opus 24 kbit/s" in meta
        file = await card_bytes(page, rid, "card.fileBytes")
        heard, _ = ffmpeg_decode(file, 1)
        clip = np.frombuffer(await card_bytes(page, rid, "card.clip"), dtype=np.float32)
        assert len(heard) == len(clip) and np.abs(heard[:, 0] - clip).max() <= 5e-3

        # Cancelled: the file the server closed, whole; offered as a partial one.
        await page.select_option("#model", "tiny-musicgen")
        await choose(page, "flac")
        cut = await submit(page, "cut short", duration="30")
        await wait(page, "(id) => window.wavecast.cards.get(id).frames > 0", cut)
        await page.click(f"#cards article[data-id='{cut}'] .cancel")
        partial = await finished(page, cut)
        assert partial["status"] == "cancelled"
        assert 0 < partial["frames"] == partial["serverSamples"] < 30 * 32000
        async with page.expect_download() as info:
            await page.click(f"#cards article[data-id='{cut}'] .download-file")
        download = await info.value
        assert download.suggested_filename.endswith("-partial.flac")
        assert (
            await page.text_content(f"#cards article[data-id='{cut}'] .download-file")
            == "Download what was made (FLAC)"
        )
        path = tmp_path / "partial.flac"
        await download.save_as(path)
        heard, _ = ffmpeg_decode(path.read_bytes(), 1)
        assert len(heard) == partial["frames"]

        # Multi-Band Diffusion's version: a second file, decoded whole, both offered.
        await page.check("#param-mbd")
        mbd = await submit(page, "polished, losslessly", duration="1")
        done = await finished(page, mbd)
        assert done["status"] == "completed", done["error"]
        frames = await page.evaluate("(id) => window.wavecast.cards.get(id).mbdFrames", mbd)
        assert frames == 32000
        file = await card_bytes(page, mbd, "card.renditionFiles.mbd")
        heard, _ = ffmpeg_decode(file, 1)
        version = np.frombuffer(await card_bytes(page, mbd, "card.mbd"), dtype=np.float32)
        assert np.array_equal(heard[:, 0], version)
        link = f"#cards article[data-id='{mbd}'] .download-mbd-file"
        assert await page.get_attribute(link, "download") == (
            "wavecast-polished-losslessly-seed"
            + str(await page.evaluate("(id) => window.wavecast.cards.get(id).seed", mbd))
            + "-mbd.flac"
        )
        assert page.errors == []


async def test_the_format_travels_with_the_card(
    browser: Any,
    server: Any,
    tmp_path: Path,
) -> None:
    context = {"permissions": ["clipboard-read", "clipboard-write"]}
    page = await open_page(browser, server, **context)
    await choose(page, "opus", 48)
    rid = await submit(page, "small on the wire", duration="0.5")
    assert (await finished(page, rid))["status"] == "completed"
    article = f"#cards article[data-id='{rid}']"
    await page.click(f"{article} .show-code")
    python = await page.text_content(f"{article} .code-python")
    cli = await page.text_content(f"{article} .code-cli")
    frame = await page.text_content(f"{article} .code-json")
    assert 'format="opus"' in python and "bitrate=48000" in python
    assert 'result.save("out.opus")' in python
    assert "-o out.opus" in cli and "--bitrate 48" in cli
    assert '"format":"opus"' in frame and '"bitrate":48000' in frame
    # The command runs, and writes the same stream's file (same seed, same codes).
    words = shlex.split(cli)
    code, out = await run(sys.executable, "-m", "wavecast.clients.cli", *words[1:], cwd=tmp_path)
    assert code == 0, out
    audio, rate = soundfile.read(str(tmp_path / "out.opus"))
    clip = np.frombuffer(await card_bytes(page, rid, "card.clip"), dtype=np.float32)
    assert rate == 48000 and len(audio) == len(clip) == 24000
    # A link fills the form again, format and bit rate too.
    await page.click(f"{article} .copy-link")
    link = await page.evaluate("navigator.clipboard.readText()")
    fresh = await open_page(browser, server, **context)
    await fresh.goto(link)
    await wait(fresh, "document.querySelector('#prompt').value === 'small on the wire'")
    assert await fresh.input_value("#stream-format") == "opus"
    assert await fresh.input_value("#bitrate") == "48"
    # Run again: the same format.
    await page.click(f"{article} .rerun")
    await wait(page, "window.wavecast.cards.size === 2")
    again = str(await page.evaluate("[...window.wavecast.cards.keys()].at(-1)"))
    assert (await finished(page, again))["status"] == "completed"
    assert await page.evaluate("(id) => window.wavecast.cards.get(id).format", again) == "opus"
    # Kept over a reload, with its file.
    await wait(page, "window.wavecast.saving === 0")
    await page.reload()
    await wait(page, "window.wavecast.connected && window.wavecast.restored")
    async with page.expect_download() as info:
        await page.click(f"{article} .download-file")
    path = tmp_path / "kept.opus"
    await (await info.value).save_as(path)
    assert soundfile.info(str(path)).frames == 24000
    assert page.errors == [] and fresh.errors == []


async def test_refusals_at_their_fields_and_no_decoder_no_formats(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server)
    # Opus takes five rates: another is refused, at the rate's field.
    await choose(page, "opus")
    await page.select_option("#output-rate", "44100")
    assert "Opus takes 8, 12, 16, 24 or 48 kHz" in await page.text_content("#stream-format-help")
    await page.fill("#prompt", "refused")
    await page.click("#generate")
    await wait(page, "!!document.querySelector('#output-rate-error')")
    assert "44100" in await page.text_content("#output-rate-error")
    assert await page.get_attribute("#output-rate", "aria-invalid") == "true"
    # More than Opus carries in one channel: refused at the bit rate's field.
    await page.select_option("#output-rate", "")
    await page.fill("#bitrate", "300")
    await page.click("#generate")
    await wait(page, "!!document.querySelector('#bitrate-error')")
    assert await page.get_attribute("#bitrate", "aria-invalid") == "true"
    assert await page.evaluate("window.wavecast.cards.size") == 0
    # The page's copy of the server's defaults and Opus's rates is the server's.
    rates = (8000, 16000, 24000, 48000)
    cases = [(f, r, c) for f in ("opus", "mp3") for r in rates for c in (1, 2)]
    mirrored = await page.evaluate(
        """async (cases) => { const form = await import("./form.js");
             return [cases.map(([f, r, c]) => form.defaultBitrate(f, r, c)), form.OPUS_RATES]; }""",
        cases,
    )
    assert mirrored == [[bit_rate(*case) for case in cases], list(CODEC_RATES["opus"])]
    # PCM asks for no bit rate.
    await choose(page, "")
    assert not await page.is_visible("#bitrate")
    assert page.errors == []

    # Where the browser has no decoder for them (a page served over plain http
    # from elsewhere), the page streams PCM and says why.
    ctx = await browser.new_context(bypass_csp=True)
    await ctx.add_init_script("delete window.AudioDecoder;")
    bare = await ctx.new_page()
    await bare.goto(f"http://127.0.0.1:{server.port}/#model=tiny-musicgen&prompt=x&format=opus")
    await wait(bare, "window.wavecast.connected && document.querySelector('#prompt').value === 'x'")
    disabled = await bare.eval_on_selector_all(
        "#stream-format option", "els => els.filter(e => e.disabled).map(e => e.value)"
    )
    assert disabled == ["opus", "mp3", "flac"]
    assert await bare.input_value("#stream-format") == ""
    assert "secure pages only" in await bare.text_content("#stream-format-help")
    await ctx.close()
    # A browser that lacks one codec is not offered that one.
    ctx = await browser.new_context(bypass_csp=True)
    await ctx.add_init_script(
        """const asked = AudioDecoder.isConfigSupported.bind(AudioDecoder);
           AudioDecoder.isConfigSupported = (config) => config.codec === "mp3"
             ? Promise.resolve({ supported: false, config }) : asked(config);"""
    )
    partial = await ctx.new_page()
    await partial.goto(f"http://127.0.0.1:{server.port}/")
    await wait(
        partial,
        "document.querySelector('#stream-format option[value=mp3]').disabled",
    )
    labels = await partial.eval_on_selector_all(
        "#stream-format option:not([disabled])", "els => els.map(e => e.value)"
    )
    assert labels == ["", "opus", "flac"]
    assert "cannot decode" in await partial.text_content("#stream-format option[value=mp3]")
    await ctx.close()


async def test_a_lost_connection_keeps_what_was_decoded(
    browser: Any,
    server: Any,
) -> None:
    page = await open_page(browser, server)
    # (A card cut under way is picked up for two minutes: here, not at all.)
    await page.evaluate("async () => { (await import('./card.js')).retry.forMs = -1; }")
    await choose(page, "flac")
    rid = await submit(page, "the line goes down", duration="60")
    await wait(page, "(id) => window.wavecast.cards.get(id).frames > 32000", rid)
    for session in list(server.sessions):
        await session.ws.close()
    done = await finished(page, rid)
    assert done["status"] == "error" and 0 < done["frames"] < 60 * 32000
    assert "connection" in done["error"]
    await asyncio.sleep(0)
    assert page.errors == []


async def test_over_a_slow_connection_a_card_says_the_connection_is_what_it_waits_for(
    browser: Any, server: Any
) -> None:
    """Through a 400 kbit/s link, the page's float PCM stream (1,024 kbit/s)
    comes slower than real time while the server makes it some ten times
    faster: its live progress, sent ahead of the audio waiting (PROTOCOL.md
    §4.4), says how far ahead, and the card, waiting for audio, names the
    connection and what would fit it (Opus), not the model. (On a direct
    connection it never does: the other tests' cards.) Cancelled, though the
    model has made it all by then, it ends at once: ``cancelled``."""
    async with slow_link(server.port, 400) as port:
        page = await open_page(browser, SimpleNamespace(port=port))
        rid = await submit(page, "through a slow link", duration="10")
        said = """(id) => window.wavecast.cards.get(id).statuses.some(
                    (s) => s.startsWith('buffering: the connection is slower than this stream'))"""
        await wait(page, said, rid, 60)
        statuses = await page.evaluate("(id) => window.wavecast.cards.get(id).statuses", rid)
        assert any("(Opus needs a tenth of it" in s for s in statuses), statuses
        await page.click(f".card[data-id='{rid}'] .cancel")
        await wait(page, "(id) => window.wavecast.cards.get(id).ended", rid)
        assert (await card(page, rid))["status"] == "cancelled"
        assert page.errors == []
        await page.context.close()
