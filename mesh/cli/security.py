"""`mesh security gen | perms`: per-role NATS users, their permissions and Kubernetes Secrets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.security import PermissionSet


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("security", help="NATS users with least-privilege permissions, credentials, Secrets")
    group = p.add_subparsers(dest="security_command", metavar="COMMAND", required=True)

    g = group.add_parser("gen", help="write nats-server's authorization config, credentials and Secrets")
    g.add_argument("--out", type=Path, required=True, help="output folder (keep it out of version control)")
    g.add_argument("--namespace", default="mesh", help="namespace of the Kubernetes Secrets")
    g.add_argument("--nodes", type=Path, default=None, help="role specs folder (default: MESH_NODES_DIR / nodes/)")
    g.add_argument("--force", action="store_true", help="overwrite an earlier output: rotates every password")
    g.add_argument("--edge", action="append", default=[], metavar="DOMAIN",
                   help="add a leaf-node user for the edge site with this JetStream domain (repeatable)")
    g.set_defaults(handler=_gen)

    s = group.add_parser("perms", help="print a user's publish/subscribe allow-lists as JSON")
    s.add_argument("user", help="a role, operator or observer")
    s.add_argument("--nodes", type=Path, default=None)
    s.set_defaults(handler=_perms)


def _permission_set(nodes: Path | None, edge: list[str] | None = None) -> PermissionSet:
    """Permissions for this topology; edge sites named on the command line are linked to it (their leaf
    users, and stream info of the hub's copies of their events)."""
    import dataclasses

    from mesh.bus.topology import Topology
    from mesh.config import get_settings
    from mesh.roles.spec import load_specs
    from mesh.security import PermissionSet

    topo = Topology.from_settings(get_settings())
    topo = dataclasses.replace(topo, edge_domains=tuple(dict.fromkeys([*topo.edge_domains, *(edge or [])])))
    return PermissionSet(topo, load_specs(nodes))


def _gen(a: argparse.Namespace) -> int:
    from mesh.security import generate

    users = _permission_set(a.nodes, a.edge).users(a.edge)
    out = generate(a.out, users, namespace=a.namespace, force=a.force)
    print(f"wrote {out.auth_conf} (bcrypt hashes), {out.out / 'secrets.yaml'} and "
          f"{len(out.credentials)} credential files in {out.out / 'credentials'}")
    print(f"users: {', '.join(c.user for c in out.credentials)}")
    print(f"next: kubectl apply -f {out.out / 'secrets.yaml'}   (these files hold passwords: keep them private)")
    return 0


def _perms(a: argparse.Namespace) -> int:
    perms = _permission_set(a.nodes).users().get(a.user)
    if perms is None and a.user == "admin":
        print(f"{a.user}: unrestricted")
        return 0
    if perms is None:
        print(f"mesh: error: no such user {a.user!r} (users: {', '.join(_permission_set(a.nodes).users())})",
              file=sys.stderr)
        return 1
    print(json.dumps({"inbox_prefix": perms.inbox_prefix, **perms.as_config()}, indent=2))
    return 0
