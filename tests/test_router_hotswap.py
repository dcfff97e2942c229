"""Publishing router models and hot-swapping them, on a real nats-server: nodes follow the KV
pointer, refuse bad models and keep the one they have, and lose no decision while swapping."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import pytest

from mesh.backends.tiers import load_tiers
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import DagPosition, Goal, RouteDecided, sha256_hex
from mesh.errors import ModelRejected
from mesh.metrics import Metrics
from mesh.roles.calls import ModelCaller
from mesh.roles.hotswap import POINTER_KEY, ModelPointer, current_pointer, publish_model, watch_models
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.features import FEATURE_VERSION
from mesh.router.model import DEFAULT_MODEL
from mesh.router.runtime import Router, default_router
from tests.meshkit import in_process_mesh, run_goal
from tests.routerkit import context, model_variant

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent
Eventually = Callable[..., Awaitable[None]]


async def _put_raw(bus: Bus, data: bytes, version: str, feature_version: str = FEATURE_VERSION) -> None:
    """What a broken or foreign publisher might do: store any bytes and move the pointer to them."""
    digest = sha256_hex(data)
    await (await bus.object_store(bus.topology.obj_models)).put(digest, data)
    pointer = ModelPointer(digest=digest, version=version, feature_version=feature_version, size=len(data))
    await (await bus.kv(bus.topology.kv_models)).put(POINTER_KEY, pointer.model_dump_json().encode())


async def test_publish_moves_the_pointer_and_a_watching_router_swaps(bus: Bus, eventually: Eventually) -> None:
    assert await current_pointer(bus) is None
    router, stop = default_router(epsilon=0.0), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch_models(bus, router, stop))
        pointer = await publish_model(bus, model_variant(version="v2"))
        await eventually(lambda: router.version == "v2", message="swap to v2")
        assert (await current_pointer(bus)) == pointer and pointer.feature_version == FEATURE_VERSION
        again = await publish_model(bus, model_variant(version="v2"))  # same bytes: stored once, pointer moves
        assert again.digest == pointer.digest
        stop.set()
    assert router.version == "v2"
    # a node started later picks up the published model at once
    late, stop = default_router(epsilon=0.0), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch_models(bus, late, stop))
        await eventually(lambda: late.version == "v2", message="late node on v2")
        stop.set()


async def test_publish_refuses_a_bad_model_and_leaves_the_pointer(bus: Bus) -> None:
    good = await publish_model(bus, DEFAULT_MODEL.read_bytes())
    with pytest.raises(ModelRejected, match="feature spec 'route-f9'"):
        await publish_model(bus, model_variant(version="v9", feature_version="route-f9"))
    assert await current_pointer(bus) == good


@pytest.mark.parametrize(("data", "reason"), [
    (b"this is not onnx", "not a loadable ONNX model"),
    (model_variant(version="old-spec", feature_version="route-f0"), "feature spec 'route-f0'"),
    (model_variant(version="odd-outputs", rename_output="scores"), "expected tier_probs, thinking_probs"),
])
async def test_a_bad_published_model_is_rejected_and_the_current_one_kept(
        bus: Bus, eventually: Eventually, caplog: pytest.LogCaptureFixture, data: bytes, reason: str) -> None:
    router, stop = default_router(epsilon=0.0), asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch_models(bus, router, stop))
        await publish_model(bus, model_variant(version="good-1"))
        await eventually(lambda: router.version == "good-1", message="swap to good-1")
        with caplog.at_level(logging.ERROR, logger="mesh.roles.hotswap"):
            await _put_raw(bus, data, version="bad-1")
            await eventually(lambda: "rejected, keeping good-1" in caplog.text, message="rejection logged")
        assert reason in caplog.text
        assert router.version == "good-1"
        assert router.decide(context()).model_version == "good-1"  # still routing, on the kept model
        await publish_model(bus, model_variant(version="good-2"))  # and a later good model still swaps in
        await eventually(lambda: router.version == "good-2", message="swap to good-2")
        stop.set()


async def test_a_pointer_to_a_missing_object_is_rejected(bus: Bus, eventually: Eventually,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    router, stop = default_router(epsilon=0.0), asyncio.Event()
    pointer = ModelPointer(digest="0" * 64, version="ghost", feature_version=FEATURE_VERSION, size=10)
    with caplog.at_level(logging.ERROR, logger="mesh.roles.hotswap"):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(watch_models(bus, router, stop))
            await (await bus.kv(bus.topology.kv_models)).put(POINTER_KEY, pointer.model_dump_json().encode())
            await eventually(lambda: "not in the object store" in caplog.text, message="missing model logged")
            stop.set()
    assert router.version == "sim-default-1"


async def test_a_hot_swap_under_load_loses_no_decisions(bus: Bus, settings: MeshSettings,
                                                        eventually: Eventually) -> None:
    """Eight tasks route as fast as they can (each decision is published as route.decided) while two
    new models are published; every decision reaches the event stream, on one of the three models."""
    spec = load_specs(default_nodes_dir())["coder"]
    router = Router(default_router().model, epsilon=0.1, seed=7)
    caller = ModelCaller(bus, load_tiers(settings), router, "router-test", Metrics("coder"))
    goal_id, per_task, stop = "loadgoal", 60, asyncio.Event()
    made: list[str] = []

    async def load(k: int) -> None:
        for i in range(per_task):
            decision = await caller.route(
                spec, goal_id=goal_id, step_id=f"s{k}-{i}", needed_tokens=3000 + 500 * i, difficulty=0.5,
                position=DagPosition(fan_out=2), attempt=1, prior_failures=0, budget_fraction_left=0.9,
                event_id=f"{goal_id}.s{k}-{i}.route", instruction=f"Implement part {i}")
            made.append(decision.model_version)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch_models(bus, router, stop))
        loads = [tg.create_task(load(k)) for k in range(8)]
        await eventually(lambda: len(made) >= 80, message="load running")
        await publish_model(bus, model_variant(version="hot-1"))
        await eventually(lambda: router.version == "hot-1" or all(t.done() for t in loads), message="hot-1")
        await publish_model(bus, model_variant(version="hot-2"))
        await asyncio.gather(*loads)
        await eventually(lambda: router.version == "hot-2", message="swap to hot-2")
        stop.set()

    seen: list[RouteDecided] = []
    async with aclosing(bus.watch_events(goal_id)) as events:
        async for event in events:
            assert isinstance(event, RouteDecided)
            seen.append(event)
            if len(seen) == 8 * per_task:
                break
    assert len({e.event_id for e in seen}) == len(made) == 8 * per_task
    versions = Counter(e.decision.model_version for e in seen)
    assert set(versions) <= {"sim-default-1", "hot-1", "hot-2"} and versions["sim-default-1"] >= 80
    assert len(versions) >= 2, versions  # the swap happened while the load ran


async def test_nodes_route_with_the_published_model(fast: MeshSettings, bus: Bus) -> None:
    """The node runtime owns the watcher: a model published while the mesh runs routes its goals."""
    async with in_process_mesh(fast.model_copy(update={"router_epsilon": 0.0})):
        await publish_model(bus, model_variant(version="fleet-2"))
        events = await run_goal(bus, Goal(brief="Build me a login system"))
    decided = [e for e in events if isinstance(e, RouteDecided)]
    assert decided and all(e.decision.feature_version == FEATURE_VERSION for e in decided)
    by_node: dict[str, list[str]] = {}
    for e in decided:
        by_node.setdefault(e.node or "", []).append(e.decision.model_version)
    assert any("fleet-2" in v for v in by_node.values())
    for versions in by_node.values():  # per node: the default until the swap, the published model after
        first = versions.index("fleet-2") if "fleet-2" in versions else len(versions)
        assert set(versions[:first]) <= {"sim-default-1"} and set(versions[first:]) <= {"fleet-2"}


async def test_mesh_router_publish(settings: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    model = tmp_path / "cli.onnx"
    model.write_bytes(model_variant(version="cli-7"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_NATS_URL=settings.nats_url or "", PYTHONPATH=str(ROOT))
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mesh", "router", "publish", str(model)],
                                   env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "published cli-7" in done.stdout
    pointer = await current_pointer(bus)
    assert pointer is not None and pointer.version == "cli-7" and pointer.digest == sha256_hex(model.read_bytes())
    model.write_bytes(b"garbage")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mesh", "router", "publish", str(model)],
                                   env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "not a loadable ONNX model" in done.stderr
    assert (await current_pointer(bus)) == pointer
