"""The runtime image can run the tester: the package installed the way the Dockerfile installs it
(``pip install ".[tester]"`` of pyproject.toml, README.md and mesh/ into a fresh virtual environment),
then ``mesh node tester --check`` from that environment passes its preflight against a real nats-server.

Downloads and installs every runtime dependency from the package index, as the image build does: the one
test that needs the network beyond loopback, so it runs only with MESH_LONG=1 (never in `make test` or CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(os.environ.get("MESH_LONG") != "1",
                                 reason="installs the package from the index: MESH_LONG=1")]


def _dockerfile_install() -> str:
    """The requirement the Dockerfile's build stage installs (e.g. ``.[tester]``)."""
    found = re.search(r'^RUN pip install --no-compile "?([^"\s]+)"? ', (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert found, "the Dockerfile's build stage no longer pip-installs the package"
    return found.group(1)


def test_the_image_install_passes_the_tester_preflight(tmp_path: Path, nats_url: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what the Dockerfile copies
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mesh", src / "mesh", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    requirement = _dockerfile_install()
    assert "tester" in requirement.removeprefix(".[").removesuffix("]").split(","), requirement
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], cwd=src, check=True, timeout=800)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON"))}
    env |= {"MESH_NATS_URL": nats_url, "MESH_NODES_DIR": str(ROOT / "nodes"), "MESH_ALLOW_SIM": "1",
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    done = subprocess.run([str(venv / "bin" / "mesh"), "node", "tester", "--check"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tester: preflight ok" in done.stdout
    # Without pytest in the environment the same check names it (what the image lacked before the extra).
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-q", "-y", "pytest"], check=True, timeout=120)
    missing = subprocess.run([str(venv / "bin" / "mesh"), "node", "tester", "--check"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 1 and "shell_allow: program 'pytest' is not installed" in missing.stderr
