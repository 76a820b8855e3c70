"""The server's log: written by a thread of its own, from a bounded queue."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wavecast.server.logs import QUEUE_RECORDS, setup_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as the test found it, afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_log_that_does_not_keep_up_never_blocks_the_caller(root_logging: None) -> None:
    """Records go to a pipe nobody reads: logging three queues' worth returns all
    the same (the writer blocks, the callers do not); what did not fit is
    dropped and counted, and once the pipe is read again the log says how many
    (every record is either written or counted)."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", encoding="utf-8")
    writer = setup_logging(stream=stream)
    log = logging.getLogger("wavecast.test")
    total = 3 * QUEUE_RECORDS

    def flood() -> None:
        for i in range(total):
            log.info("line %d", i)

    flooding = threading.Thread(target=flood)
    flooding.start()
    flooding.join(60)
    assert not flooding.is_alive(), "logging blocked on a log that does not keep up"

    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b""))
    )
    reader.start()
    for _ in range(6000):  # (until the writer has caught up: at most a minute)
        if writer.records.empty():
            break
        threading.Event().wait(0.01)
    log.info("caught up")
    writer.stop(timeout=60)
    stream.close()
    reader.join(60)
    os.close(read_end)
    lines = b"".join(chunks).decode().splitlines()
    written = [int(m.group(1)) for line in lines if (m := re.search(r": line (\d+)$", line))]
    dropped = [
        int(m.group(1)) for line in lines if (m := re.search(r"(\d+) log records dropped", line))
    ]
    assert written == sorted(written) and written[0] == 0
    assert len(dropped) == 1 and dropped[0] > 0
    assert len(written) + dropped[0] == total
    assert sum(line.endswith(": caught up") for line in lines) == 1


def test_records_say_what_they_said_when_made(root_logging: None, tmp_path: Path) -> None:
    """A record's arguments are read when it is made (not when the writer gets
    to it); a traceback reaches the log, as a JSON field or after the line."""
    for fmt in ("json", "text"):
        path = tmp_path / f"{fmt}.log"
        writer = setup_logging(fmt, path)
        log = logging.getLogger("wavecast.test")
        state = ["before"]
        log.info("state %s", state)
        state[0] = "after"
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("it failed")
        writer.stop()
        text = path.read_text()
        if fmt == "json":
            entries = [json.loads(line) for line in text.splitlines()]
            assert entries[0]["message"] == "state ['before']"
            assert entries[1]["message"] == "it failed"
            assert "ValueError: broken" in entries[1]["exception"]
        else:
            assert "wavecast.test: state ['before']" in text
            assert "it failed\nTraceback" in text and "ValueError: broken" in text
