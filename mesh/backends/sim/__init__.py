"""The sim backend: a deterministic, seeded model of the three tiers (answers, quality, latency,
prices, faults), in-process (``SimBackend``) or over HTTP (``SimServer`` / ``mesh sim-server``)."""

from mesh.backends.sim.backend import SimBackend
from mesh.backends.sim.faults import FaultPlan
from mesh.backends.sim.server import SimServer
from mesh.backends.sim.world import PROFILES, SimProfile, SimWorld, tier_for_model

__all__ = ["PROFILES", "FaultPlan", "SimBackend", "SimProfile", "SimServer", "SimWorld", "tier_for_model"]
