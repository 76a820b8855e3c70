"""``xformers.ops`` as audiocraft uses it with torch's attention (see ../README.md)."""

from __future__ import annotations

from typing import Any

import torch


def unbind(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """As xformers' ``unbind``: the views ``torch.unbind`` returns."""
    return torch.unbind(x, dim)


def memory_efficient_attention(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("xformers' attention is not on this machine (a stand-in)")


class LowerTriangularMask:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("xformers' masks are not on this machine (a stand-in)")
