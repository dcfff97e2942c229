"""The CLI starts fast because it imports only what the command needs: `mesh --help`, `mesh goals` and
`mesh submit` (against a real server) load none of the model SDKs, onnxruntime, DuckDB or pydantic-settings,
nor what nodes and the gateway serve with (Prometheus, OpenTelemetry, Starlette, uvicorn, Jinja2), a ledger node none of the model SDKs or onnxruntime, and help neither settings, contracts nor the bus.
Checked in a fresh interpreter's ``sys.modules``; the times are figures for bench/RESULTS.md ("cli"), not
asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.bus import Bus

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("openai", "anthropic", "onnxruntime", "duckdb", "pydantic_settings")  # the last: mesh.config reads the env
# What a command's handler imports, never the parser that `mesh --help` builds from every command module.
RUNTIME = ("pydantic", "pydantic_settings", "nats", "msgpack", "mesh.config", "mesh.contracts", "mesh.bus")


def probe(modules: tuple[str, ...]) -> str:
    """A script that runs `mesh <its arguments>` and prints its exit code and which of ``modules`` it loaded."""
    return f"""
import json, sys
from mesh.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "loaded": [m for m in {modules!r} if m in sys.modules]}}))
"""


# What nodes and the gateway serve with (metrics, tracing, HTTP, templates): no client command needs them.
SERVER_SIDE = ("prometheus_client", "opentelemetry", "starlette", "uvicorn", "jinja2")
PROBE = probe(HEAVY + SERVER_SIDE)


def _probe(code: str, args: list[str], nats_url: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_NATS_URL=nats_url, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


@pytest.mark.parametrize("args", [["--help"], ["goals"], ["goals", "--json"], ["submit", "a goal"],
                                  ["ledger", "--help"], ["sim-server", "--help"]])
async def test_cli_commands_import_no_heavy_or_server_side_module(bus: Bus, args: list[str]) -> None:
    assert bus.settings.nats_url
    result = _probe(PROBE, args, bus.settings.nats_url)
    assert result["code"] in (0, None), result
    assert result["loaded"] == [], f"`mesh {' '.join(args)}` imported {result['loaded']}"


@pytest.mark.parametrize("args", [["--help"], ["goals", "--help"], ["submit", "--help"], ["approve", "--help"],
                                  ["ledger", "status", "--help"]])
def test_help_loads_no_settings_contracts_or_bus(args: list[str]) -> None:
    """Help is argparse alone: the command modules import settings, contracts and the bus (pydantic,
    nats-py: 0.15 s of CPU) in their handlers."""
    result = _probe(probe(RUNTIME), args, "nats://127.0.0.1:4222")
    assert result["code"] == 0, result
    assert result["loaded"] == [], f"`mesh {' '.join(args)}` imported {result['loaded']}"


def test_a_ledger_node_imports_no_model_sdk_or_onnxruntime() -> None:
    code = ("import json, sys, mesh.node.runtime, mesh.roles.recorder\n"
            f"print(json.dumps({{'code': 0, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    assert _probe(code, [], "nats://127.0.0.1:4222")["loaded"] == ["duckdb"]


def test_the_bus_loads_nats_without_aiohttp_which_stays_importable() -> None:
    """nats-py's websocket transport (aiohttp, ~40% of ``import nats``) is not loaded with the bus; the
    modules that use aiohttp still can, afterwards."""
    code = ("import json, sys, mesh.bus, nats.aio.transport as t\n"
            "before = 'aiohttp' in sys.modules\n"
            "import aiohttp\n"
            "print(json.dumps({'code': 0, 'loaded': [before, t.aiohttp is None, bool(aiohttp.ClientSession)]}))")
    assert _probe(code, [], "nats://127.0.0.1:4222")["loaded"] == [False, True, True]


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`mesh … | head`: a reader that went away is no traceback; the command stops with 141 (128 + SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write meets EPIPE
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = str(ROOT)
    try:
        proc = subprocess.run([sys.executable, "-m", "mesh", "security", "perms", "planner"], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 141, proc.stderr[-3000:]
