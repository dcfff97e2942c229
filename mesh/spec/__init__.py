"""Language-neutral specification generated from the contracts: JSON Schemas and an AsyncAPI 3.0
document. Kept apart from runtime code (as FastStream keeps AsyncAPI apart); nothing at run time
imports it."""

from mesh.spec.export import export, render

__all__ = ["export", "render"]
