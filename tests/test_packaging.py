"""The distribution installs `wavecast.*` and no generic top-level names."""

from __future__ import annotations

import json
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
        "server/engines/musicgen/engine.py",
        "server/engines/higgs/engine.py",
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


def test_the_images_files_agree_with_the_project() -> None:
    """What docker/ builds from: every path the Dockerfile copies exists, the CUDA
    lock pins the torch of requirements.lock, the server runs as a user with a
    readiness healthcheck, and the scale-out compose file mounts the nginx
    config that tests/server/test_scale_out.py runs."""
    import re

    import yaml

    docker = ROOT / "docker"
    dockerfile = (docker / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source

    def pins(path: Path) -> dict[str, str]:
        found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", path.read_text(), flags=re.M)
        return {name.lower(): version for name, version in found}

    assert pins(docker / "cuda.lock")["torch"] == pins(ROOT / "requirements.lock")["torch"]
    assert (
        "TORCH_VERSION=" + pins(ROOT / "requirements.lock")["torch"]
        in (ROOT / "scripts" / "setup-venv").read_text()
    )
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    # (the probe asks /readyz: tests/server/test_tls.py)
    probe = r'^HEALTHCHECK .*\n.*"-m", "wavecast\.server\.probe"'
    assert re.search(probe, dockerfile, flags=re.M)
    assert dockerfile.startswith("#") and "FROM nvidia/cuda:" in dockerfile

    single = yaml.safe_load((docker / "compose.yml").read_text())
    assert single["services"]["wavecast"]["deploy"]["resources"]["reservations"]["devices"]
    scaled = yaml.safe_load((docker / "compose.scale.yml").read_text())
    mounts = scaled["services"]["nginx"]["volumes"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in mounts
    upstreams = re.findall(r"server (wavecast-\d+):5555", (docker / "nginx.conf").read_text())
    assert sorted(upstreams) == sorted(s for s in scaled["services"] if s.startswith("wavecast"))


def test_vendored_msgpack_is_the_pinned_version() -> None:
    root = Path(__file__).resolve().parents[1] / "web_demo"
    pinned = json.loads((root / "package.json").read_text())["dependencies"]["@msgpack/msgpack"]
    assert (root / "vendor" / "msgpack" / "VERSION").read_text().strip() == pinned
    assert (
        "ISC" in (root / "vendor" / "msgpack" / "LICENSE").read_text()
        or "Permission" in (root / "vendor" / "msgpack" / "LICENSE").read_text()
    )
