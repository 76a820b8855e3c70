"""What a model's warm-up measured, kept for the next start on the same machine.

A warm-up times its codec's layers in each form (``choose_forms``), the codec
batch (``fastest_rows``) and what a second of context costs a step
(``step_cost``): some seconds on a CPU for the test models, about fifteen for
MusicGen-small's shapes; where nothing they depend on changed, a start before
measured the same. A start that finds them kept takes them and measures
nothing; one that does not measures and keeps them (``bench/bench_starts.py
--kept``).

They are kept in ``WAVECAST_CACHE_DIR`` (``rowkernel.cache_folder``: by default
``~/.cache/wavecast``), under ``measures/``, in a file named for the model and
a hash of everything a measure depends on (``Measures.open``'s ``settings``):
the model's shapes (its parameters' and buffers' names, shapes and types: not
their values, so that a test model made again with other random weights finds
them), the engine's settings (the requests it is readied for, the codec's
chunking, the data type), the device (the CPU's name and vector extensions and
the cores this process may run on, or the GPU's name), torch's threads and
version, and the engines' own source (a changed measure, or a changed step,
measures again). An empty ``WAVECAST_CACHE_DIR`` keeps nothing; ``wavecast
serve --remeasure`` measures again and replaces them.

A file that cannot be read, or holds what this engine cannot use (another
decoder's forms), is measured again and replaced; one that cannot be written
leaves the start as it was, measured. Of one model's files, the eight written
last are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import rowkernel

__all__ = ["Measures", "fingerprint"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What each kept value is, in a log's words.
SAID = {
    "codec_forms": "the codec's forms",
    "codec_batch": "its chunks per call",
    "context_cost": "the context's cost",
}

# Bumped when what a file holds changes its meaning.
FORMAT = 1

# Files kept for one model (its last settings, machines and sources).
KEPT_PER_MODEL = 8

# ``wavecast serve --remeasure``: every engine measures again and replaces what
# was kept (set by ``load_engines`` before any engine warms up).
REMEASURE = False


class Measures:
    """One engine's kept measures: ``get`` what a start before kept, ``put``
    what this one measured (the file written again at once)."""

    def __init__(self, name: str, path: Path | None, kept: Mapping[str, Any], when: str) -> None:
        self.name = name
        self.path = path
        self._values: dict[str, Any] = dict(kept)
        self._when = when  # (when the kept ones were measured; "" for none)
        self.taken: list[str] = []  # what this start took from the file

    @classmethod
    def open(cls, name: str, settings: Mapping[str, object], cpu: bool = True) -> Measures:
        """The measures kept for model ``name`` under ``settings`` (what they
        depend on besides the machine, torch and the engines' source: a JSON
        object's values), or none (a folder to keep them in, or not). ``cpu``:
        the model runs on a CPU, where the row kernel's build is one of them (a
        GPU's start does not build it for this)."""
        described = {
            **settings,
            "format": FORMAT,
            "device": _machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "kernel": _kernel() if cpu else None,
            "source": _source(),
        }
        key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
        folder = rowkernel.cache_folder()
        if folder is None:
            return cls(name, None, {}, "")
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[-60:]
        path = folder / "measures" / f"{slug}-{key.hexdigest()[:24]}.json"
        if REMEASURE:
            return cls(name, path, {}, "")
        try:
            held = json.loads(path.read_text())
            kept, when = held["values"], held["measured"]
            if not isinstance(kept, dict) or not isinstance(when, str):
                raise TypeError("not a file of measures")
        except FileNotFoundError:
            return cls(name, path, {}, "")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: the measures kept in %s are not read (%s)", name, path, exc)
            return cls(name, path, {}, "")
        return cls(name, path, kept, when)

    def get(self, what: str) -> Any | None:
        """The value kept as ``what`` (as JSON holds it), or None."""
        return self._values.get(what)

    def recall(
        self,
        what: str,
        usable: Callable[[Any], T | None],
        measure: Callable[[], T],
        keep: Callable[[T], Any] | None = None,
    ) -> tuple[T, bool]:
        """``what`` as a start before kept it, where ``usable`` makes a value of
        it (not None: this engine can use it); else measured (``measure``) and
        kept (``keep`` of the value, JSON's types; by default the value). The
        value, and whether it was measured."""
        held = self._values.get(what)
        if held is not None and (value := usable(held)) is not None:
            self.taken.append(what)
            return value, False
        value = measure()
        self.put(what, value if keep is None else keep(value))
        return value, True

    def put(self, what: str, value: Any) -> None:
        """Keep ``value`` (JSON's types) as ``what``, in the file at once (whole
        or not at all: a copy beside it, renamed)."""
        self._values[what] = value
        if self.path is None:
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        beside = self.path.with_name(f"{self.path.name}.{os.getpid()}.part")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            beside.write_text(json.dumps({"measured": when, "values": self._values}, indent=1))
            os.replace(beside, self.path)
        except OSError as exc:
            log.debug("%s: measures not kept in %s: %s", self.name, self.path.parent, exc)
            return
        self._prune()

    def _prune(self) -> None:
        """Keep the ``KEPT_PER_MODEL`` files of this model written last (others
        were for its settings, machines or sources before: an upgrade measures
        anew, and the files it left would pile up)."""
        assert self.path is not None
        model = self.path.name.rsplit("-", 1)[0]
        try:
            files = sorted(
                (
                    path
                    for path in self.path.parent.glob(f"{model}-*.json")
                    if path.name.rsplit("-", 1)[0] == model
                ),
                key=lambda path: path.stat().st_mtime,
                reverse=True,
            )
            for path in files[KEPT_PER_MODEL:]:
                path.unlink()
        except OSError as exc:
            log.debug("%s: older measures not removed: %s", self.name, exc)

    def log_taken(self) -> None:
        """Say what this start took from the file (nothing where it took nothing)."""
        if self.taken:
            log.info(
                "%s: %s as measured by a start at %s (kept in %s; --remeasure measures again)",
                self.name,
                ", ".join(SAID.get(what, what) for what in self.taken),
                self._when,
                self.path,
            )


def fingerprint(modules: Iterable[torch.nn.Module]) -> str:
    """A hash of ``modules``' parameters' and buffers' names, shapes and types
    (not their values)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:24]


@cache
def _machine() -> str:
    """The CPU's name and vector extensions and the cores this process may run
    on, and each visible GPU's name."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                name,
            )
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    capability = torch.backends.cpu.get_cpu_capability()
    return "; ".join([f"{name} ({capability}, {cores} cores)", *gpus])


def _kernel() -> str | None:
    """Which row kernel this process runs (its build), or None."""
    kernel = rowkernel.built()
    if kernel is None:
        return None
    return hashlib.sha256(rowkernel.SOURCE.encode()).hexdigest()[:16] + (
        " wide" if kernel.wide else ""
    )


@cache
def _source() -> str:
    """A hash of the engines' source files (a step or a measure changed: measured again)."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]
