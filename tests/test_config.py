"""`MeshSettings` reads `MESH_<FIELD>` as pydantic-settings did for it (which it no longer imports): any case,
the text validated as the field's type, keyword arguments first, unknown variables ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh.config import MeshSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower().startswith("mesh_"):
            monkeypatch.delenv(name)


def test_each_field_is_read_from_its_variable_as_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"MESH_NATS_URL": "nats://a:1, nats://b:2", "MESH_REPLICAS": "3", "MESH_ALLOW_SIM": "1",
                        "MESH_SIM_LATENCY_MS": "5", "MESH_DATA_DIR": "/tmp/d", "MESH_NATS_TOKEN": "s3cret",
                        "MESH_SANDBOX": "bwrap", "MESH_EVENTS_MAX_AGE": "3600"}.items():
        monkeypatch.setenv(name, value)
    s = MeshSettings()
    assert s.servers == ["nats://a:1", "nats://b:2"]
    assert (s.replicas, s.allow_sim, s.sim_latency_ms, s.sandbox, s.events_max_age) == (3, True, 5.0, "bwrap", 3600.0)
    assert s.data_dir == Path("/tmp/d") and s.ledger_file == Path("/tmp/d/ledger.duckdb")
    assert s.nats_token is not None and s.nats_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_defaults_without_variables_and_names_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    s = MeshSettings()
    assert (s.nats_url, s.replicas, s.allow_sim, s.data_dir) == (None, 1, False, Path(".mesh"))
    assert isinstance(s.events_max_age, float)  # defaults are validated too: 0 is the float 0.0
    monkeypatch.setenv("mesh_replicas", "2")
    monkeypatch.setenv("Mesh_Subject_Prefix", "edge")
    assert (MeshSettings().replicas, MeshSettings().subject_prefix) == (2, "edge")


def test_keywords_win_over_variables_and_unknown_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_NATS_URL", "nats://env:1")
    monkeypatch.setenv("MESH_ACK_WAIT", "7")
    monkeypatch.setenv("MESH_NODES_DIR", "/nodes")  # read elsewhere (default_nodes_dir), not a settings field
    monkeypatch.setenv("MESH_TIER_EDGE_MODEL", "m")
    s = MeshSettings(nats_url="nats://kw:1")
    assert (s.nats_url, s.ack_wait) == ("nats://kw:1", 7.0)
    assert MeshSettings(nats_url=None).nats_url is None
    assert s.model_copy(update={"replicas": 3}).nats_url == "nats://kw:1"


@pytest.mark.parametrize(("name", "value", "field"), [("MESH_REPLICAS", "9", "replicas"),
                                                      ("MESH_SANDBOX", "docker", "sandbox"),
                                                      ("MESH_SUBJECT_PREFIX", "a.b", "subject_prefix"),
                                                      ("MESH_ACK_WAIT", "soon", "ack_wait")])
def test_a_bad_value_is_refused_naming_its_field(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                  field: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        MeshSettings()
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]
