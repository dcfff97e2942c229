"""The local mesh's NATS token: `mesh up` / `mesh run` generate one per start for the embedded nats-server,
so another local user cannot use the bus (an unauthenticated loopback server makes every local user admin).

The token lives in ``<data_dir>/nats-token`` (mode 0600, written atomically) and reaches the server in a
0600 configuration file, never on a command line; the nodes ``mesh up`` starts get it in their environment
(``MESH_NATS_TOKEN``; tool runs get an environment built from nothing), and every other `mesh` command reads
the file (``local_settings``) when it talks to the mesh that data dir's ``local.json`` names.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from mesh.config import MeshSettings

TOKEN_FILE = "nats-token"
LOCAL_FILE = "local.json"


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def write_private(path: Path, text: str) -> None:
    """``text`` in a file only its owner can read, replacing any earlier one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_token(data_dir: Path) -> SecretStr:
    """A fresh token for this start of the local mesh, saved for the other `mesh` commands."""
    token = secrets.token_urlsafe(32)
    write_private(token_path(data_dir), token)
    return SecretStr(token)


def read_token(data_dir: Path) -> SecretStr | None:
    try:
        return SecretStr(token_path(data_dir).read_text().strip())
    except FileNotFoundError:
        return None


def local_settings(settings: MeshSettings) -> MeshSettings:
    """``settings`` pointed at the mesh to talk to: MESH_NATS_URL, else the `mesh up` running from the same
    data dir; with that mesh's token when the URL is the one it runs and no credentials were given (a token
    is never sent to a server it was not made for). ``nats_url`` stays None when there is no mesh."""
    path = settings.data_dir / LOCAL_FILE
    running = str(json.loads(path.read_text()).get("nats_url") or "") if path.exists() else ""
    url = settings.nats_url or running or None
    update: dict[str, object] = {"nats_url": url}
    given = settings.nats_token or settings.nats_user or settings.nats_creds
    if url and url == running and not given:
        update["nats_token"] = read_token(settings.data_dir)
    return settings.model_copy(update=update)
