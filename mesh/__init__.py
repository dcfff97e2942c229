"""Mesh: an edge message-bus agent mesh for long-running autonomous AI work."""

from mesh.errors import MeshError

__version__ = "0.1.0"
__all__ = ["MeshError", "__version__"]
