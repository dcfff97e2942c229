"""`mesh provision`: create or update the mesh's streams, KV buckets and object stores, as the admin.

Role nodes only verify the topology and create their own durable consumers, so this runs first: by
`mesh up` / `mesh run` locally, by the provisioning Job in Kubernetes, and once per JetStream domain of
an edge site (``--domain``). The worker roles (the tasks stream's subjects) come from one folder of role
specs, not from whichever node started last.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from urllib.parse import urlsplit


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("provision", help="create/update every stream, KV bucket and object store (admin credentials)")
    p.add_argument("--nodes", type=Path, default=None, help="role specs folder (default: MESH_NODES_DIR / nodes/)")
    p.add_argument("--domain", default=None, metavar="DOMAIN",
                   help="provision this JetStream domain (an edge site's own streams) instead of the server's default")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="keep consumers of roles that are no worker role (default: delete them)")
    p.set_defaults(handler=lambda a: asyncio.run(_provision(a)))


async def _provision(a: argparse.Namespace) -> int:
    for line in await provision_mesh(a.nodes, domain=a.domain, prune=a.prune):
        print(line)
    return 0


async def provision_mesh(nodes: Path | None = None, *, domain: str | None = None, prune: bool = True) -> list[str]:
    """Provision the mesh at MESH_NATS_URL (else a running `mesh up`) for the role specs in ``nodes``; returns
    what was done, for printing."""
    import dataclasses

    from mesh.bus.client import Bus
    from mesh.bus.topology import Topology, worker_roles
    from mesh.config import get_settings
    from mesh.embedded.localauth import local_settings
    from mesh.errors import NotConnected
    from mesh.roles.spec import load_specs

    settings = local_settings(get_settings())
    if not settings.nats_url:
        raise NotConnected("no NATS server configured: set MESH_NATS_URL (and the admin's MESH_NATS_USER / "
                           "MESH_NATS_PASSWORD) or start `mesh up`")
    specs = load_specs(nodes)
    topo = dataclasses.replace(Topology.from_settings(settings), task_roles=worker_roles(nodes))
    if domain:  # an edge site's own topology: the hub's copies of sites' events live at the hub only
        topo = dataclasses.replace(topo, edge_domains=())
    async with await Bus.connect(settings, name="mesh-provision", check=False, domain=domain, topology=topo) as bus:
        changes = await bus.provision(specs, prune=prune)
    hosts = ", ".join(urlsplit(u).hostname or "?" for u in settings.servers)  # never a URL's credentials
    where = f"JetStream domain {domain!r} at {hosts}" if domain else hosts
    summary = f"provisioned {where}: {len(changes) or 'nothing'} changed; worker roles: {', '.join(topo.task_roles)}"
    return [*changes, summary]
