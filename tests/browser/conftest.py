"""The browser tests' fixtures: one Chromium for each module (its start was
about a second of each test), each test with its own page in its own browser
context; each test's server on the module's event loop, which the modules'
tests share (``pytest.mark.asyncio(loop_scope="module")``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from helpers import running_server
from test_demo import chromium


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def server() -> AsyncIterator[Any]:
    """The tiny music model's server, for one test."""
    async with running_server() as srv:
        yield srv


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pages_closed(browser: Any) -> AsyncIterator[None]:
    """Each test's pages close with it: a page left open would play and
    reconnect through the next tests."""
    yield
    for context in browser.contexts:
        await context.close()
