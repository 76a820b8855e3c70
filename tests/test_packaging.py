"""The distribution installs `wavecast.*` and no generic top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import timeout

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents_and_import(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=timeout(300),
    )
    wheel = next(tmp_path.glob("wavecast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {
        "wavecast",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for module in (
        "protocol/__init__.py",
        "protocol/PROTOCOL.md",
        "server/app.py",
        "server/engines/musicgen.py",
        "server/engines/testing/musicgen.py",
        "server/engines/testing/higgs.py",
        "clients/client.py",
    ):
        assert f"wavecast/{module}" in names
    # Import the protocol and client straight from the wheel, away from the checkout:
    # -S skips site-packages' .pth files (and so the editable install's finder).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]); "
        "import wavecast.protocol, wavecast.clients; "
        "assert wavecast.protocol.__file__.startswith(sys.argv[1]), wavecast.protocol.__file__"
    )
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)  # what an installer lays out
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(installed), site_packages],
        check=True,
        cwd=tmp_path,
        timeout=timeout(60),
    )


def test_editable_install_maps_the_folders() -> None:
    code = (
        "import wavecast.protocol, wavecast.server, wavecast.clients, pathlib, sys; "
        "root = pathlib.Path(sys.argv[1]); "
        "assert pathlib.Path(wavecast.protocol.__file__).parent == root / 'protocol'; "
        "assert pathlib.Path(wavecast.server.__file__).parent == root / 'server'"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], check=True, cwd="/", timeout=timeout(60)
    )
