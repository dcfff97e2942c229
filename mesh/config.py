"""Configuration from the environment (``MESH_*``), read once per process.

Secrets (NATS passwords, tokens, API keys) are ``SecretStr`` so they never print in logs or events.

The variables are read as pydantic-settings would read them for these fields (all of them scalar: the
variable's text is validated as the field's type), without importing it: its import was ~30 ms of CPU
of every `mesh` command.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from mesh.errors import NodeSpecError


class MeshSettings(BaseModel):
    """Every knob of a Mesh process. Environment variable = ``MESH_`` + field name, in any case; a keyword
    argument wins over the variable."""

    model_config = ConfigDict(extra="ignore", validate_default=True)

    # --- NATS ---
    nats_url: str | None = Field(
        default=None,
        description="Comma-separated NATS server URLs. Unset: `mesh up`/`mesh run` start an embedded server.",
    )
    subject_prefix: str = Field(default="mesh", description="Prefix of every subject, stream and bucket.")
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_creds: Path | None = Field(default=None, description="NATS .creds file (JWT + nkey seed).")
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    nats_inbox_prefix: str = Field(
        default="_INBOX",
        description="Reply-subject prefix. Per-role users get their own (`mesh security gen`) so one role "
                    "cannot subscribe to another's replies and pull deliveries.",
    )
    connect_timeout: float = 5.0
    max_reconnect_attempts: int = Field(default=-1, description="-1 reconnects forever.")
    connect_attempts: int = Field(default=3, ge=1, description="Attempts per server at start before NotConnected.")
    reconnect_wait: float = 0.5
    replicas: int = Field(default=1, ge=1, le=5, description="JetStream replicas per stream (3 in a cluster).")
    edge_domains: str = Field(
        default="",
        description="Comma-separated JetStream domains of edge sites (leaf nodes); a hub keeps a copy of each "
                    "site's events in stream <PREFIX>_EVENTS_<DOMAIN>.",
    )

    events_max_age: float = Field(
        default=0, ge=0,
        description="Seconds the event stream keeps an event; 0 keeps every one (the ledger can replay them all). "
                    "Set it in production once the ledger and its backups are the record: nats-server's memory "
                    "grows with the stream. The ledger must never fall this far behind.")

    # --- messages ---
    max_message_bytes: int = Field(default=8 * 1024 * 1024, description="Decoded messages above this are refused.")
    claim_check_bytes: int = Field(
        default=256 * 1024, description="Bodies above this go to the object store and travel by reference."
    )

    # --- consumers ---
    ack_wait: float = Field(default=30.0, gt=0, description="Seconds before an unacked task is redelivered.")
    max_deliver: int = Field(default=5, ge=1, description="Deliveries before a task goes to the DLQ.")
    nak_delay: float = Field(default=1.0, ge=0, description="Base delay before a retryable failure is retried.")

    # --- model backends (mesh.backends) ---
    tiers_file: Path | None = Field(default=None, description="TOML file with [tiers.<name>] endpoint tables.")
    sim_seed: int = Field(default=0, description="Seed of the sim backend's outputs and faults.")
    sim_faults: str = Field(default="", description='Sim fault rates, e.g. "429:0.1,500:0.05,timeout:0.02,cut:0.02".')
    sim_latency_scale: float = Field(default=1.0, ge=0, description="Multiplies sim latencies; 0 = instant.")
    sim_latency_ms: float | None = Field(default=None, ge=0, description="Fixed sim latency per call (benchmarks).")
    edge_model: str = Field(
        default="auto", description='Local edge model of `mesh up`/`run`: "auto" (SmolLM2 when the edge extra is '
        'installed), "off" (sim), or a GGUF file path.')
    tiers: str = Field(
        default="", description='"local": `mesh up`/`run` serve EVERY tier from the local edge model (SmolLM2, the '
        'edge extra), or an OpenAI-compatible base URL: every tier on that server; empty: each tier as configured.')

    # --- router (mesh.router) ---
    allow_sim: bool = Field(
        default=False, description="Allow simulated tiers and sim-server answers (`mesh up`/`mesh run`, tests and "
                                   "benchmarks set it). Unset, a node refuses sim tiers and a simulated answer fails.")
    router_epsilon: float = Field(default=0.05, ge=0, le=1, description="Share of routing decisions that explore.")
    router_model: Path | None = Field(
        default=None, description="ONNX router model to start with; unset: the packaged default.")

    # --- tools (mesh.tools): limits of one shell.run command ---
    approval_timeout: float = Field(default=24 * 3600, gt=0, description="Seconds an approval gate waits for a "
                                    "decision (docs/APPROVALS.md); a goal may set its own (approve_timeout).")
    approval_on_timeout: Literal["fail", "approve", "reject"] = Field(
        default="fail", description="What a gate does when its deadline passes: fail the goal, approve, or reject.")
    shell_timeout: float = Field(default=120.0, gt=0, description="shell.run wall-clock limit (seconds).")
    shell_cpu_seconds: int = Field(default=120, ge=1, description="shell.run CPU-time limit (seconds).")
    shell_memory_mb: int = Field(default=1024, ge=64, description="shell.run address-space limit (MiB).")
    shell_output_kb: int = Field(default=64, ge=1, description="shell.run output kept per stream (KiB).")
    shell_processes: int = Field(default=128, ge=8, description="shell.run processes (threads) at once.")
    shell_open_files: int = Field(default=512, ge=16, description="shell.run open files per process.")
    sandbox: Literal["auto", "bwrap", "fallback"] = Field(
        default="auto", description='Where shell.run commands run: "auto" (bubblewrap namespaces where the host '
        'allows them, else the weaker fallback, with a warning), "bwrap" (required: the node will not start '
        'without it), "fallback" (docs/TOOLS.md).')

    # --- node process ---
    health_host: str = Field(default="0.0.0.0", description="Bind address of /healthz, /readyz, /metrics.")
    health_port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port (local mesh).")
    drain_seconds: float = Field(default=30.0, ge=0, description="Grace period for in-flight work on SIGTERM.")

    # --- gateway (mesh.gateway: `mesh gateway`, also started by `mesh up`/`mesh run`) ---
    gateway_host: str = Field(default="127.0.0.1", description="Bind address; a non-loopback one needs tokens.")
    gateway_port: int = Field(default=8600, ge=0, le=65535, description="0 picks a free port.")
    gateway_tokens_file: Path | None = Field(
        default=None, description="TOML file of hashed bearer tokens with per-goal budget caps (docs/GATEWAY.md).")
    gateway_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Largest request body.")
    gateway_rate_per_minute: float = Field(default=600.0, gt=0, description="Requests a minute per token, "
                                           "per gateway replica, unless the token sets its own.")
    gateway_request_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a non-streaming chat completion waits for its goal (then 504; "
        "the goal keeps running).")
    gateway_keepalive: float = Field(default=15.0, gt=0, description="Seconds of silence before an SSE keep-alive.")

    # --- ledger (mesh.store, mesh.roles.recorder) ---
    ledger_path: Path | None = Field(
        default=None, description="The ledger's DuckDB file; unset: <data_dir>/ledger.duckdb.")
    ledger_query_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a ledger query may run before it is stopped.")
    ledger_max_rows: int = Field(default=10_000, ge=1, description="Rows a ledger query returns at most.")
    ledger_max_result_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Bytes (as JSON) a ledger query's answer may hold; a larger "
        "answer is refused, never cut short. The query service also keeps it under the server's max_payload.")
    ledger_max_queries: int = Field(
        default=4, ge=1, description="Ledger queries served at once; more are refused as busy (retry later).")
    ledger_batch_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024 * 1024, description="Bytes of events (wire + claim-checked bodies) the "
        "recorder decodes into one batch, besides its 20,000-event bound: decoded events stay ≤ ~32× this.")

    # --- local data ---
    data_dir: Path = Field(default=Path(".mesh"), description="Embedded server data, ledger file, caches.")
    out_dir: Path = Field(default=Path("mesh-out"), description="Where `mesh run` writes workspaces and results.")
    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, values: Any) -> Any:
        """The fields not given, from their environment variables."""
        if not isinstance(values, dict):
            return values
        env = {name.lower(): value for name, value in os.environ.items()}
        return {**{f: env[f"mesh_{f}"] for f in cls.model_fields if f"mesh_{f}" in env}, **values}

    @field_validator("subject_prefix")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v or any(c in v for c in " .*>\t"):
            raise ValueError("subject_prefix must be one NATS token (no spaces, dots or wildcards)")
        return v

    @property
    def ledger_file(self) -> Path:
        return self.ledger_path or self.data_dir / "ledger.duckdb"

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in (self.nats_url or "").split(",") if u.strip()]


@lru_cache(maxsize=1)
def get_settings() -> MeshSettings:
    """The process-wide settings, read from the environment on first use."""
    return MeshSettings()


def default_nodes_dir() -> Path:
    """The role specs' folder: ``MESH_NODES_DIR``, else ``nodes/`` beside the package (a source checkout),
    else the packaged copy."""
    env = os.environ.get("MESH_NODES_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "nodes", here / "nodes"):
        if candidate.is_dir():
            return candidate
    raise NodeSpecError("no nodes/ directory found; set MESH_NODES_DIR")
