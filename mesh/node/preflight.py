"""Preflight: what a node verifies before it serves, so a misconfigured pod fails at start with the
reason instead of failing every task later. ``mesh node <role> --check`` prints the same findings, one
line per problem, and exits non-zero when there is any.

Checked: the role spec loads and validates; every ``shell_allow`` program resolves on the tools' PATH;
every tier a model-calling role may use (any, through the fallback order) has its key variable set, and
is not a simulator unless ``MESH_ALLOW_SIM=1``; with ``--check`` also that the bus answers and the mesh is
provisioned for this role (``mesh provision`` has run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from mesh.backends.tiers import TierConfig, load_tiers
from mesh.config import MeshSettings, default_nodes_dir
from mesh.errors import ConfigError, MeshError, NodeSpecError
from mesh.roles.spec import RoleSpec, load_specs
from mesh.tools.shell import SAFE_PATH


def load_role(role: str) -> tuple[RoleSpec, dict[str, RoleSpec]]:
    """The role's spec and every spec (the planner needs the workers'); ``NodeSpecError`` if it fails."""
    specs = load_specs(default_nodes_dir())
    if role not in specs:
        raise NodeSpecError(f"unknown role {role!r}; roles with a spec in nodes/: {', '.join(sorted(specs))}")
    return specs[role], specs


def spec_problems(spec: RoleSpec, settings: MeshSettings, environ: Mapping[str, str] | None = None) -> list[str]:
    """What keeps this role from working here (tools and tiers); empty when nothing does."""
    env = os.environ if environ is None else environ
    problems = [f"shell_allow: program {name!r} is not installed (looked on {SAFE_PATH})"
                for name in spec.shell_allow if shutil.which(name, path=SAFE_PATH) is None]
    if spec.kind == "recorder":
        return problems  # calls no model
    try:
        tiers = load_tiers(settings, environ=env)
    except ConfigError as exc:
        return [*problems, f"tiers: {exc}"]
    return problems + tier_problems(tiers, allow_sim=settings.allow_sim, environ=env)


def tier_problems(tiers: Mapping[str, TierConfig], *, allow_sim: bool, environ: Mapping[str, str]) -> list[str]:
    problems = []
    for name, cfg in tiers.items():
        if cfg.simulated and not allow_sim:
            problems.append(f"tier {name!r} is simulated ({'no endpoint configured' if cfg.kind == 'sim' else 'sim = true'}"
                            f"); set MESH_ALLOW_SIM=1 to allow simulated backends, or configure "
                            f"MESH_TIER_{name.upper()}_BASE_URL and _MODEL (docs/BACKENDS.md)")
        elif not cfg.simulated and cfg.api_key_env and not environ.get(cfg.api_key_env):
            problems.append(f"tier {name!r}: its key variable {cfg.api_key_env} is not set")
    return problems


async def bus_problem(settings: MeshSettings, role: str) -> str | None:
    """Whether a NATS server answers at ``MESH_NATS_URL`` (one attempt) with every stream and bucket
    provisioned and the tasks stream taking ``role``; creates nothing."""
    from mesh.bus.client import Bus

    try:
        bus = await Bus.connect(settings.model_copy(update={"connect_attempts": 1}), name="mesh-preflight",
                                check=False)
    except MeshError as exc:
        return f"bus: {exc}"
    try:
        await bus.require_topology([role])
    except MeshError as exc:
        return f"bus: {exc}"
    finally:
        await bus.close()
    return None


async def check(role: str, settings: MeshSettings) -> list[str]:
    """Every problem of ``mesh node <role> --check``."""
    try:
        spec, _ = load_role(role)
    except NodeSpecError as exc:
        problems = [f"role spec: {exc}"]
    else:
        problems = spec_problems(spec, settings)
    if (bus := await bus_problem(settings, role)) is not None:
        problems.append(bus)
    return problems
