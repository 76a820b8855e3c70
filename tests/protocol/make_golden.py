"""Regenerate golden.json from test_codec.MESSAGES (run by hand after a spec change)."""

from __future__ import annotations

import json
from pathlib import Path

from test_codec import GOLDEN, MESSAGES

from wavecast.protocol import encode

if __name__ == "__main__":
    entries = [
        {
            "name": type(m).__name__,
            "msgpack": encode(m).hex(),  # type: ignore[union-attr]
            "json": json.loads(encode(m, text=True)),
        }
        for m in MESSAGES
    ]
    Path(GOLDEN).write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
