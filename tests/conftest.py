"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from helpers import running_server, tiny_engines


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    """Reference computations in tests run as inference does, without autograd.

    (Thread-local: the server's inference thread sets its own mode.)
    """
    import torch

    with torch.no_grad():
        yield


@pytest.fixture
async def server() -> AsyncIterator[Any]:
    async with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def engine() -> Any:
    return tiny_engines()["tiny-musicgen"]
