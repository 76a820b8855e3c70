from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    """Reference computations in these tests run as inference does, without autograd."""
    with torch.no_grad():
        yield
