"""Publishing router models and hot-swapping them in running nodes.

A model's bytes live in the ``<prefix>_models`` object store under their sha256; the KV bucket of the
same name holds the pointer ``router`` → ``ModelPointer`` (JSON). ``publish_model`` checks a model,
stores it and moves the pointer; every node runs ``watch_models``, which follows the pointer, loads
the named model off the event loop (a thread), checks and warms it up, and swaps it in atomically.
A model that is missing, corrupt or incompatible is refused with an error in the log and the node
keeps routing with the model it has.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing, suppress
from datetime import datetime

from pydantic import BaseModel, Field

from mesh.aio import unless_set
from mesh.bus.client import Bus
from mesh.contracts.models import utcnow
from mesh.errors import BlobNotFound, BusError, ModelRejected
from mesh.router.model import META_FEATURE_VERSION, OnnxModel
from mesh.router.runtime import Router

log = logging.getLogger(__name__)

POINTER_KEY = "router"
RETRY_SECONDS = 2.0


class ModelPointer(BaseModel):
    """What the KV pointer says: which object is the current router model."""

    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: str
    feature_version: str
    size: int
    published_at: datetime = Field(default_factory=utcnow)


async def publish_model(bus: Bus, data: bytes) -> ModelPointer:
    """Check ``data`` (``ModelRejected`` if unusable), store it and point every node at it."""
    model = await asyncio.to_thread(OnnxModel.load, data, source="the model to publish")
    pointer = ModelPointer(digest=model.digest, version=model.version,
                           feature_version=model.metadata[META_FEATURE_VERSION], size=len(data))
    await bus.put_blob(data, media_type="application/onnx", name=pointer.version,
                       bucket=bus.topology.obj_models)  # content-addressed: the same bytes are stored once
    await bus.kv_put(bus.topology.kv_models, POINTER_KEY, pointer.model_dump_json().encode())
    return pointer


async def current_pointer(bus: Bus) -> ModelPointer | None:
    """The published pointer, or None when nothing was ever published."""
    entry = await bus.kv_get(bus.topology.kv_models, POINTER_KEY)
    return None if entry is None else ModelPointer.model_validate_json(entry.value)


async def fetch_model(bus: Bus, pointer: ModelPointer) -> OnnxModel:
    """Download, verify and load the model a pointer names (``ModelRejected`` when unusable)."""
    try:
        data = await bus.get_blob(pointer.digest, bucket=bus.topology.obj_models)  # checks the digest
    except BlobNotFound as exc:
        raise ModelRejected(f"the pointer names model {pointer.digest}, which is not in the object store") from exc
    return await asyncio.to_thread(OnnxModel.load, data, source=f"router model {pointer.version} ({pointer.digest[:12]})")


async def watch_models(bus: Bus, router: Router, stop: asyncio.Event) -> None:
    """Follow the pointer until ``stop`` is set, swapping each good model into ``router``.

    A watch that cannot be set up (JetStream busy or unreachable) is retried every
    ``RETRY_SECONDS``: meanwhile the node routes on, it only misses swaps.
    """
    while not stop.is_set():
        try:
            await unless_set(stop, _follow(bus, router))
            return
        except BusError as exc:
            log.warning("cannot watch the router model pointer, retrying in %.0fs: %s", RETRY_SECONDS, exc)
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RETRY_SECONDS)


async def _follow(bus: Bus, router: Router) -> None:
    async with aclosing(bus.kv_watch(bus.topology.kv_models, POINTER_KEY)) as pointers:
        async for raw in pointers:  # deletes and purges of the pointer are skipped: keep the current model
            await apply_pointer(bus, router, raw)


async def apply_pointer(bus: Bus, router: Router, raw: bytes) -> bool:
    """Swap in the model ``raw`` points at; on any problem log it, keep the current model, return False."""
    try:
        pointer = ModelPointer.model_validate_json(raw)
    except ValueError as exc:
        log.error("ignoring an unreadable router model pointer (keeping %s): %s", router.version, exc)
        return False
    current = router.model
    if isinstance(current, OnnxModel) and current.digest == pointer.digest:
        return True
    try:
        model = await fetch_model(bus, pointer)
    except (ModelRejected, BusError) as exc:
        log.error("router model %s rejected, keeping %s: %s", pointer.version, router.version, exc)
        return False
    router.swap(model)
    return True
