"""The environment is exactly the lock, and the lock satisfies pyproject.toml.

``scripts/setup-venv`` installs with ``requirements.lock`` as constraints and
reinstalls when the lock changes; these tests catch a stale or hand-modified
environment, and a pyproject range that the lock no longer meets.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# Installed beside the lock and not part of it: the installer, this project, and
# the CUDA runtime that PyPI's torch wheel of the locked version pulls in on a GPU host.
NOT_LOCKED = re.compile(r"^(pip|wavecast|nvidia-.*|triton|cuda-.*)$")


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }


def test_lock_pins_every_requirement_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in ("engines", "test"):
        requirements += project["optional-dependencies"][extra]
    pins = locked()
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is required but not locked: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock's {name}=={pins[name]} is outside pyproject's {text!r}: run scripts/lock"
        )


def test_installed_versions_equal_the_lock() -> None:
    pins, present = locked(), installed()
    missing = sorted(name for name in pins if name not in present)
    drifted = sorted(
        f"{name} {present[name]} (locked {version})"
        for name, version in pins.items()
        if name in present and not SpecifierSet(f"=={version}").contains(present[name])
    )
    unlocked = sorted(name for name in present if name not in pins and not NOT_LOCKED.match(name))
    assert not missing and not drifted and not unlocked, (
        "the environment is not requirements.lock (run scripts/setup-venv --test): "
        f"missing {missing}, other versions {drifted}, not in the lock {unlocked}"
    )


@pytest.mark.parametrize("path", ["scripts/setup-venv", "docker/Dockerfile"])
def test_every_install_path_uses_the_lock(path: str) -> None:
    assert "requirements.lock" in (ROOT / path).read_text()
