"""Logging set-up for the entry point: plain text or JSON lines (orjson)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["JsonFormatter", "setup_logging"]

_CONTEXT_KEYS = ("conn", "req")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the connection and request ids as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(fmt: str = "text", file: Path | None = None, level: str = "INFO") -> None:
    """Configure the root logger; call once, from the entry point."""
    handler: logging.Handler = (
        logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    )
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep it quieter.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))
