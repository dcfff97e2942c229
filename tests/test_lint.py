"""The code's own checks, run by the test command so CI fails on a violation: the layering of
docs/ARCHITECTURE.md (import-linter contracts in pyproject.toml), ruff and mypy over ``mesh``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)

CHECKS = {
    "layers": [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
    "ruff": [sys.executable, "-m", "ruff", "check", "mesh"],
    "mypy": [sys.executable, "-m", "mypy", "mesh"],
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_no_violations(check: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # import-linter analyses the `mesh` it can import: this one
    proc = subprocess.run(CHECKS[check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
                          check=False)
    assert proc.returncode == 0, f"{check} found violations:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
