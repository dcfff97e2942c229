"""Backend tiers from configuration: which endpoint, model, window, prices and limits each tier has.

Sources, later wins: built-in defaults (every tier ``sim``) → the TOML file named by
``MESH_TIERS_FILE`` → ``MESH_TIER_<NAME>_<FIELD>`` environment variables. A tier with a
``base_url`` is a real endpoint; a tier without one is simulated. API keys are never stored here:
``api_key_env`` names the variable that holds the key, read at call time.

Prices are USD per 1M tokens. The defaults for known models are the providers' list prices as
published in April 2026 (DeepSeek V4 Pro/Flash, Kimi K2.6); providers change them, so they are
defaults to override in config, not facts.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.contracts import TIERS, Tier
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

Kind = Literal["openai", "anthropic", "sim"]


class Prices(BaseModel):
    """USD per 1M tokens: prompt tokens served from cache, prompt tokens not cached, output tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_hit: float = Field(default=0.0, ge=0)
    input_miss: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)

    def cost(self, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        miss = max(prompt_tokens - cached_tokens, 0)
        return (cached_tokens * self.input_hit + miss * self.input_miss + completion_tokens * self.output) / 1e6


class SwarmConfig(BaseModel):
    """Bounds of swarm mode: parallel sub-agents per step and tool calls across all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sub_agents: int = Field(default=8, ge=1, le=300)
    max_tool_calls: int = Field(default=64, ge=0)


class TierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Tier
    kind: Kind = "sim"
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, description="NAME of the env var holding the key.")
    model: str
    context_window: int = Field(ge=512)
    output_reserve: int = Field(ge=1, description="Most tokens one call on this tier writes (larger asks are capped).")
    prices: Prices = Field(default_factory=Prices)
    max_concurrency: int = Field(default=8, ge=1)
    timeout: float = Field(default=300.0, gt=0, description="Seconds per call attempt.")
    thinking: bool = Field(default=False, description="Thinking on when the caller does not decide.")
    send_hints: bool = Field(
        default=False, description="Send the request's small scalar metadata (role, difficulty, goal options) "
                                   "as an X-Mesh-Hints header: the sim-server reads it, real providers need not see it.")
    sim: bool = Field(
        default=False, description="The endpoint is a simulator (a mesh sim-server) although spoken to over HTTP: "
                                   "its answers are simulated whatever they say.")
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature when the request sets none (0: deterministic).")
    seed: int | None = Field(default=None, description="Sampling seed sent to servers that take one (llama.cpp, vLLM).")
    tools: bool | None = Field(
        default=None, description="Native tool calling: true, false (tool use is asked for as text: fenced file "
                                  "blocks, diffs, run blocks — mesh/tools/textproto.py), or unset = discovered "
                                  "(off for the llamacpp dialect, whose servers ignore tools with small models' "
                                  "chat formats; on elsewhere).")
    dialect: Literal["deepseek", "kimi", "vllm", "llamacpp", "generic"] | None = Field(
        default=None, description="OpenAI-compatible dialect; guessed from model and base URL when unset."
    )

    @property
    def simulated(self) -> bool:
        """The tier's config says sim: kind ``sim`` (in process) or ``sim = true`` (a sim-server over HTTP)."""
        return self.kind == "sim" or self.sim

    @property
    def endpoint(self) -> str:
        """Identity of the deployment (one circuit breaker each): model at base URL."""
        return f"{self.model}@{self.base_url or 'sim'}"

    def api_key(self) -> str | None:
        """The key, read from the environment now (never cached, never logged)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class KnownModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    context_window: int
    prices: Prices
    thinking: bool = False


# List prices of models the tiers are designed around (see module docstring).
KNOWN_MODELS: dict[str, KnownModel] = {
    "deepseek-v4-pro": KnownModel(
        context_window=1_048_576, prices=Prices(input_hit=0.0145, input_miss=1.74, output=3.48)
    ),
    "deepseek-v4-flash": KnownModel(
        context_window=1_048_576, prices=Prices(input_hit=0.0028, input_miss=0.14, output=0.28)
    ),
    "kimi-k2.6": KnownModel(
        context_window=262_144, prices=Prices(input_hit=0.16, input_miss=0.95, output=4.00), thinking=True
    ),
}

# What each tier is when nothing is configured: a sim with the real class's profile.
SIM_DEFAULTS: dict[str, dict[str, Any]] = {
    "edge": {
        "model": "sim-edge", "context_window": 8192, "output_reserve": 1024, "max_concurrency": 4, "timeout": 60.0,
        "prices": Prices(input_hit=0.0, input_miss=0.02, output=0.04),
    },
    "long_context": {
        "model": "sim-long-context", "context_window": 1_048_576, "output_reserve": 16_384, "max_concurrency": 8,
        "timeout": 600.0, "prices": KNOWN_MODELS["deepseek-v4-pro"].prices,
    },
    "swarm": {
        "model": "sim-swarm", "context_window": 262_144, "output_reserve": 16_384, "max_concurrency": 8, "timeout": 600.0,
        "prices": KNOWN_MODELS["kimi-k2.6"].prices, "thinking": True,
    },
}

_ENV_FIELDS = (
    "kind", "base_url", "api_key_env", "model", "context_window", "output_reserve", "max_concurrency",
    "timeout", "thinking", "dialect", "send_hints", "tools", "temperature", "seed", "sim",
)


def _from_env(name: str, environ: Mapping[str, str]) -> dict[str, Any]:
    prefix = f"MESH_TIER_{name.upper()}_"
    out: dict[str, Any] = {f: environ[prefix + f.upper()] for f in _ENV_FIELDS if prefix + f.upper() in environ}
    prices = {p: environ[f"{prefix}PRICE_{p.upper()}"] for p in Prices.model_fields if f"{prefix}PRICE_{p.upper()}" in environ}
    if prices:
        out["prices"] = prices
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict | BaseModel):
            prior = out[key].model_dump() if isinstance(out[key], BaseModel) else out[key]
            out[key] = {**prior, **value}
        else:
            out[key] = value
    return out


def _tier(name: Tier, override: dict[str, Any]) -> TierConfig:
    """One tier: the sim defaults, or for an endpoint the known model's window, prices and thinking
    default, then the overrides from file and environment."""
    kind = override.get("kind") or ("openai" if override.get("base_url") else "sim")
    base = dict(SIM_DEFAULTS[name])
    if kind != "sim":
        model = override.get("model")
        if not override.get("base_url") or not model:
            raise ConfigError(
                f"tier {name!r}: kind {kind!r} needs a base_url and a model "
                f"(MESH_TIER_{name.upper()}_BASE_URL, MESH_TIER_{name.upper()}_MODEL)"
            )
        known = KNOWN_MODELS.get(str(model))
        base.update(prices=Prices(), thinking=False)
        if known is not None:
            base.update(context_window=known.context_window, prices=known.prices, thinking=known.thinking)
        elif "prices" not in override:
            log.warning("tier %s: no prices configured for model %r; its cost counts as 0", name, model)
    try:
        return TierConfig(name=name, **_merge(base, {**override, "kind": kind}))
    except ValidationError as exc:
        raise ConfigError(f"tier {name!r} is misconfigured: {exc}") from exc


def load_tiers(settings: Any = None, *, environ: Mapping[str, str] | None = None) -> dict[str, TierConfig]:
    """Every tier, from defaults, ``settings.tiers_file`` / ``MESH_TIERS_FILE`` and env overrides."""
    env = os.environ if environ is None else environ
    path = getattr(settings, "tiers_file", None) or env.get("MESH_TIERS_FILE")
    from_file: dict[str, Any] = {}
    if path:
        try:
            from_file = tomllib.loads(Path(path).read_text()).get("tiers", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read tiers file {path}: {exc}") from exc
        unknown = set(from_file) - set(TIERS)
        if unknown:
            raise ConfigError(f"tiers file {path} names unknown tiers {sorted(unknown)}; known: {list(TIERS)}")
    return {
        name: _tier(name, _merge(from_file.get(name, {}), _from_env(name, env)))
        for name in TIERS
    }


def is_simulated(tiers: Mapping[str, TierConfig]) -> bool:
    """True when any tier is simulated: its outputs are not a real model's, and the CLI says so."""
    return any(t.simulated for t in tiers.values())
