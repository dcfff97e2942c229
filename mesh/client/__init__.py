"""Layer 4 (beside roles): ``MeshClient``, the library door to a running mesh."""

from mesh.client.client import FINAL_EVENTS, GoalResults, MeshClient, NodeInfo
from mesh.client.decisions import parse_decision

__all__ = ["FINAL_EVENTS", "GoalResults", "MeshClient", "NodeInfo", "parse_decision"]
