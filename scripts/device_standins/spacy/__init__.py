"""A stand-in for ``spacy`` on the GPU machines (see ../README.md): imports, and
raises on any use."""

from typing import Any


def __getattr__(name: str) -> Any:
    raise AttributeError(f"spacy.{name}: not on this machine (a stand-in)")
