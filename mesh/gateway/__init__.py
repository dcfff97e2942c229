"""Layer 5: ``mesh gateway``, the HTTP front door — Mesh API, OpenAI-compatible, A2A v1.0 and MCP — over
``MeshClient`` only (docs/GATEWAY.md)."""
