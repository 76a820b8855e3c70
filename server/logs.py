"""Logging set-up for the entry point: plain text or JSON lines (orjson).

The event loop and the inference thread never write a log line themselves: a
record is formatted where it is made (its message and traceback, so that it
says what it said then) and handed to a queue, and a thread of its own writes
it. A log that cannot keep up (a pipe nobody reads, a logging driver that
blocks) would otherwise stall every stream at its next line. The queue is
bounded: past ``QUEUE_RECORDS`` waiting, records are dropped and counted, and
the writer says how many once it has caught up.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

__all__ = ["QUEUE_RECORDS", "JsonFormatter", "LogWriter", "setup_logging"]

_CONTEXT_KEYS = ("conn", "req")

# Records waiting for the writer, at most (a few MB of them).
QUEUE_RECORDS = 10_000


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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return orjson.dumps(entry).decode()


class _Handoff(logging.handlers.QueueHandler):
    """Puts records on the writer's queue without waiting: a full queue drops
    the record and counts it (``take_dropped``)."""

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | None], most: int) -> None:
        super().__init__(records)
        self.records = records
        self.most = most
        self.dropped = 0
        self._lock = threading.Lock()
        self._plain = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message and traceback as text now (their arguments may change or
        # die before the writer gets to them); the rest as the record has it.
        # (A copy: other handlers, a test's, see the record as it was made.)
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = record.exc_text or self._plain.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        # (A SimpleQueue, whose put costs a fraction of a Queue's: the bound is
        # checked here, give or take the records of other threads meanwhile.)
        if self.records.qsize() < self.most:
            self.records.put_nowait(record)
        else:
            with self._lock:
                self.dropped += 1

    def take_dropped(self) -> int:
        """Records dropped since the last call."""
        with self._lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class LogWriter:
    """The thread that writes the records (``setup_logging`` starts it); ``stop``
    writes what is queued and ends it."""

    # Seconds between two batches of lines, at least.
    PAUSE = 0.02

    def __init__(self, handler: logging.Handler, records: int = QUEUE_RECORDS) -> None:
        self.records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self.handoff = _Handoff(self.records, records)
        self.handler = handler
        self._thread = threading.Thread(target=self._write, name="wavecast-log", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while self._write_queued(self.records.get()):
            self._note_dropped()  # caught up: what could not wait, counted
            # A pause between batches: records logged meanwhile wake no one (a
            # wake-up costs the logging thread more than its put).
            time.sleep(self.PAUSE)

    def _write_queued(self, record: logging.LogRecord | None) -> bool:
        """Write ``record`` and every record queued after it; False at the end
        (``stop``)."""
        while record is not None:
            if record.levelno >= self.handler.level:
                self.handler.handle(record)
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                return True
        return False

    def _note_dropped(self) -> None:
        dropped = self.handoff.take_dropped()
        if dropped:
            message = f"{dropped} log records dropped: the log did not keep up"
            self.handler.handle(
                logging.LogRecord(__name__, logging.WARNING, __file__, 0, message, None, None)
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Write every record queued so far, end the thread and close the log
        (at exit: later records are not written). A log still stuck after
        ``timeout`` seconds is left as it is, to the process's exit."""
        if self._thread.is_alive():
            self.records.put(None)
            self._thread.join(timeout)
        if self._thread.is_alive():
            return
        self._note_dropped()
        self.handler.close()


def setup_logging(
    fmt: str = "text",
    file: Path | None = None,
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
) -> LogWriter:
    """Configure the root logger (call once, from the entry point): records go
    to ``file``, or ``stream`` (default: stderr), from a thread of their own.
    Stop the returned writer at exit."""
    handler: logging.Handler = (
        logging.FileHandler(file, encoding="utf-8")
        if file
        else logging.StreamHandler(stream or sys.stderr)
    )
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    writer = LogWriter(handler)
    root = logging.getLogger()
    root.handlers[:] = [writer.handoff]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at INFO; keep it quieter.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))
    return writer
