"""Helpers for the router tests: realistic route contexts and variants of the packaged model."""

from __future__ import annotations

import onnx

from mesh.backends.tiers import load_tiers
from mesh.contracts import TIERS, DagPosition
from mesh.router.features import RouteContext, call_costs
from mesh.router.model import DEFAULT_MODEL, META_FEATURE_VERSION, META_VERSION, OUTPUTS

TIER_CONFIGS = load_tiers(environ={})
# The default team's output kinds by role name (what the router sees of a role); other names keep their own.
KIND_OF = {"planner": "plan", "researcher": "note", "coder": "code", "reviewer": "review", "tester": "test_report",
           "synthesizer": "synthesis"}


def context(role: str = "tester", prompt: int = 2000, output: int = 4096, difficulty: float = 0.5, *,
            fan_out: int = 1, tools: int = 2, thinking: str = "auto", swarm_capable: bool = False,
            attempt: int = 1, available: dict[str, bool] | None = None, remaining_usd: float | None = None,
            instruction: str = "Test the implementation for: Build me a login system") -> RouteContext:
    needed = prompt + output
    return RouteContext(
        role=role, output_kind=KIND_OF.get(role, role), needed_tokens=needed, windows={t: c.context_window for t, c in TIER_CONFIGS.items()},
        available=available or {t: True for t in TIERS}, preferred=["long_context", "swarm", "edge"],
        difficulty=difficulty, position=DagPosition(depth=2, fan_out=fan_out, dependents=1, total_steps=12),
        attempt=attempt, prior_failures=attempt - 1, thinking=thinking, swarm_capable=swarm_capable, tools=tools,
        instruction=instruction, costs=call_costs(TIER_CONFIGS, needed, output), remaining_usd=remaining_usd,
    )


def model_variant(*, version: str | None = None, feature_version: str | None = None,
                  rename_output: str | None = None) -> bytes:
    """The packaged default model with its version, feature version or an output name changed."""
    proto = onnx.load_model_from_string(DEFAULT_MODEL.read_bytes())
    for prop in proto.metadata_props:
        if prop.key == META_VERSION and version is not None:
            prop.value = version
        if prop.key == META_FEATURE_VERSION and feature_version is not None:
            prop.value = feature_version
    if rename_output is not None:
        old = OUTPUTS[0]
        for node in proto.graph.node:
            node.input[:] = [rename_output if i == old else i for i in node.input]
            node.output[:] = [rename_output if o == old else o for o in node.output]
        for out in proto.graph.output:
            if out.name == old:
                out.name = rename_output
    return proto.SerializeToString()
