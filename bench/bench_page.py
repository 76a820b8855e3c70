"""The demo page streaming PCM, Opus, MP3 and FLAC: what it receives, and when
it first has audio to play.

The page asks for float PCM, or for a file of an encoded format which it cuts
into the codec's frames and decodes as it comes (web_demo/decode.js, the
browser's WebCodecs decoder). For each format, in headless Chromium against
``wavecast serve`` (the tiny test models, on the CPU), the requests taking
turns: the card's first audio (ms from ``started`` to the first samples it
can play: a PCM chunk, or the decoder's first output), what it received per
second of audio (kbit/s, container included), and whether the samples it
played number what the server made.

    .venv/bin/python bench/bench_page.py --runs 5

Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
from typing import Any

from bench_stream import print_header, tiny_server
from playwright.async_api import async_playwright

FORMATS = ["", "opus", "mp3", "flac"]  # ("": PCM, as the page asks for it: float)
CASES = {  # model -> the form's fields
    "tiny-musicgen": {"#prompt": "bench", "#param-duration": "10"},
    "tiny-higgs": {
        "#prompt": "A sentence or two for the page to speak while it is made.",
        "#param-max_new_tokens": "250",
    },
}

CARD = """(id) => { const c = window.wavecast.cards.get(id);
  return { ended: c.ended, status: c.status, first: c.firstAudioAt - c.startedAt,
           bytes: c.bytes, frames: c.frames, server: c.serverSamples ?? null,
           rate: c.sampleRate, streamRate: c.streamRate }; }"""


async def one(page: Any, model: str, format: str) -> dict[str, Any]:
    await page.select_option("#model", model)
    await page.select_option("#stream-format", format)
    for selector, value in CASES[model].items():
        await page.fill(selector, value)
    await page.click("#generate")
    rid = await page.evaluate("[...window.wavecast.cards.keys()].at(-1)")
    await page.wait_for_function(
        "(id) => window.wavecast.cards.get(id).ended", arg=rid, timeout=120_000
    )
    card: dict[str, Any] = await page.evaluate(CARD, rid)
    await page.click(f"#cards article[data-id='{rid}'] .remove")
    return card


async def measure(url: str, runs: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    chromium = os.environ.get("WAVECAST_CHROMIUM") or shutil.which("chromium") or "chromium"
    page_url = url.replace("ws://", "http://").rsplit("/v1/", 1)[0] + "/"
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"],
        )
        page = await (await browser.new_context(bypass_csp=True)).new_page()
        await page.goto(page_url)
        await page.wait_for_selector("#conn[data-state=open]")
        await page.click("#advanced summary")
        for model in CASES:
            await one(page, model, "")  # (warm: the page's decoders, the server's shapes)
            for _ in range(runs):
                for format in FORMATS:
                    results.setdefault((model, format), []).append(await one(page, model, format))
        await browser.close()
    return results


def report(results: dict[tuple[str, str], list[dict[str, Any]]], runs: int) -> None:
    print_header(
        "The demo page in each format",
        f"python bench/bench_page.py --runs {runs}",
    )
    print("| model | format | first audio in the page (ms, median) | kbit/s | samples as made |")
    print("| --- | --- | ---: | ---: | --- |")
    for (model, format), cards in results.items():
        first = statistics.median(c["first"] for c in cards)
        kbps = statistics.median(
            c["bytes"] * 8 / (c["server"] / c["streamRate"]) / 1000 for c in cards if c["server"]
        )
        exact = all(
            c["status"] == "completed"
            and c["frames"] == round(c["server"] * c["rate"] / c["streamRate"])
            for c in cards
        )
        rate = {c["rate"] for c in cards} - {cards[0]["streamRate"]}
        decoded = f" (played at {rate.pop() // 1000} kHz)" if rate else ""
        print(
            f"| {model} | {format or 'pcm_f32le'} | {first:.0f} | {kbps:.0f} | "
            f"{'all' if exact else 'NOT all'}{decoded} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="requests per model and format")
    args = parser.parse_args()
    with tiny_server(list(CASES)) as url:
        results = asyncio.run(measure(url, args.runs))
    report(results, args.runs)


if __name__ == "__main__":
    main()
