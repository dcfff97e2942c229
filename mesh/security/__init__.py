"""Least-privilege NATS access for the mesh: per-user subject permissions derived from the topology
and role specs (``permissions``), and the generator of credentials, nats-server config and Kubernetes
Secrets behind ``mesh security gen`` (``gen``)."""

from mesh.security.gen import Credential, Generated, generate
from mesh.security.permissions import EMITS, Permissions, PermissionSet, inbox_prefix

__all__ = ["EMITS", "Credential", "Generated", "PermissionSet", "Permissions", "generate", "inbox_prefix"]
