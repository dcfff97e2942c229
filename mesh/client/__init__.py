"""Layer 4 (beside roles): ``MeshClient``, the library door to a running mesh."""

from mesh.client.client import FINAL_EVENTS, GoalResults, MeshClient, NodeInfo

__all__ = ["FINAL_EVENTS", "GoalResults", "MeshClient", "NodeInfo"]
