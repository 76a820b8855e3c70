"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import running_server, tiny_engines


@pytest.fixture
async def server() -> AsyncIterator[Any]:
    async with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def engine() -> Any:
    return tiny_engines()["tiny-musicgen"]
