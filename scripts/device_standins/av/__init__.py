"""A stand-in for ``av`` on the GPU machines (see ../README.md): imports, and
raises on any use."""

from typing import Any


def __getattr__(name: str) -> Any:
    raise AttributeError(f"av.{name}: not on this machine (a stand-in)")
