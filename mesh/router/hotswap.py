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
from contextlib import suppress
from datetime import datetime

import nats.errors
from nats.js import api
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from mesh.bus.client import Bus
from mesh.contracts.models import sha256_hex, utcnow
from mesh.errors import BusError, ModelRejected
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
    store = await bus.object_store(bus.topology.obj_models)
    try:
        try:
            await store.get_info(pointer.digest)  # content-addressed: the same bytes are stored once
        except (ObjectNotFoundError, NotFoundError):
            await store.put(pointer.digest, data,
                            meta=api.ObjectMeta(name=pointer.digest, description=pointer.version))
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"storing router model {pointer.digest} failed: {exc!r}") from exc
    return await _point(bus, pointer)


async def _point(bus: Bus, pointer: ModelPointer) -> ModelPointer:
    kv = await bus.kv(bus.topology.kv_models)
    try:
        await kv.put(POINTER_KEY, pointer.model_dump_json().encode())
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"moving the router model pointer failed: {exc!r}") from exc
    return pointer


async def current_pointer(bus: Bus) -> ModelPointer | None:
    """The published pointer, or None when nothing was ever published."""
    kv = await bus.kv(bus.topology.kv_models)
    try:
        entry = await kv.get(POINTER_KEY)
    except NotFoundError:  # KeyNotFoundError and KeyDeletedError are NotFoundErrors
        return None
    return ModelPointer.model_validate_json(entry.value or b"")


async def fetch_model(bus: Bus, pointer: ModelPointer) -> OnnxModel:
    """Download, verify and load the model a pointer names (``ModelRejected`` when unusable)."""
    store = await bus.object_store(bus.topology.obj_models)
    try:
        result = await store.get(pointer.digest)
    except (ObjectNotFoundError, NotFoundError) as exc:
        raise ModelRejected(f"the pointer names model {pointer.digest}, which is not in the object store") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"reading router model {pointer.digest} failed: {exc!r}") from exc
    data = bytes(result.data or b"")
    if sha256_hex(data) != pointer.digest:
        raise ModelRejected(f"router model {pointer.digest} failed its digest check ({len(data)} bytes read)")
    return await asyncio.to_thread(OnnxModel.load, data, source=f"router model {pointer.version} ({pointer.digest[:12]})")


async def watch_models(bus: Bus, router: Router, stop: asyncio.Event) -> None:
    """Follow the pointer until ``stop`` is set, swapping each good model into ``router``.

    A watch that cannot be set up (JetStream busy or unreachable) is retried every
    ``RETRY_SECONDS``: meanwhile the node routes on, it only misses swaps.
    """
    while not stop.is_set():
        try:
            watcher = await (await bus.kv(bus.topology.kv_models)).watch(POINTER_KEY)
        except (BusError, nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot watch the router model pointer, retrying in %.0fs: %r", RETRY_SECONDS, exc)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
            continue
        try:
            async with asyncio.TaskGroup() as tg:
                following = tg.create_task(_follow(bus, router, watcher))
                stopping = tg.create_task(stop.wait())
                await asyncio.wait([following, stopping], return_when=asyncio.FIRST_COMPLETED)
                following.cancel()
                stopping.cancel()
        finally:
            with suppress(Exception):  # the connection may already be gone at shutdown
                await watcher.stop()
        return


async def _follow(bus: Bus, router: Router, watcher: KeyValue.KeyWatcher) -> None:
    async for entry in watcher:
        if entry is None or entry.operation is not None or not entry.value:
            continue  # the "caught up" marker, or a delete/purge of the pointer: keep the current model
        await apply_pointer(bus, router, entry.value)


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
