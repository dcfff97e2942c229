"""The embedded nats-server: starts ready, restarts on the same port with its data, fails clearly."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from mesh.embedded import EmbeddedNats
from mesh.errors import EmbeddedServerError


async def test_started_server_has_jetstream_on_loopback(nats_server: EmbeddedNats) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits.max_streams != 0
    finally:
        await nc.close()


async def test_restart_on_same_port_keeps_streams(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
    await nc.jetstream().publish("keep.a", b"survives")
    await nc.close()
    port = nats_server.port

    nats_server.kill()
    assert not nats_server.running
    await nats_server.start()

    assert nats_server.port == port
    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg("KEEP", 1)
        assert msg.data == b"survives"
    finally:
        await nc.close()


async def test_port_in_use_is_a_clear_error(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="already taken") as err:
        await EmbeddedNats(tmp_path / "other", port=nats_server.port).start()
    assert "address already in use" in str(err.value)  # the server's own words, from its log tail


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="cannot run"):
        await EmbeddedNats(tmp_path / "x", binary=tmp_path / "no-such-nats-server").start()


async def test_stop_is_graceful_and_idempotent(tmp_path: Path) -> None:
    server = await EmbeddedNats(tmp_path / "s").start()
    await server.stop()
    assert not server.running
    assert server._proc is not None and server._proc.returncode == 0  # SIGTERM: a clean exit
    await server.stop()


@pytest.mark.parametrize("operator", [None, "2"])
async def test_the_server_runs_on_one_go_processor_unless_the_operator_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operator: str | None) -> None:
    if operator is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", operator)
    async with EmbeddedNats(tmp_path / "nats") as server:
        assert server.pid is not None
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{server.pid}/environ").read_text().split("\0") if "=" in item)
    assert environ["GOMAXPROCS"] == (operator or "1")
