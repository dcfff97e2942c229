"""A 3-node JetStream cluster on loopback: R3 streams keep taking and delivering work when a node stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mesh.bus import Bus, Delivery, PullConsumer
from mesh.config import MeshSettings
from mesh.contracts import Step, Task
from mesh.embedded import EmbeddedCluster
from mesh.errors import PublishError

pytestmark = pytest.mark.timeout(90)


def _task(n: int) -> Task:
    return Task(task_id=Task.make_id("g1", f"s{n}", 1), goal_id="g1",
                step=Step(step_id=f"s{n}", role="coder", instruction="do it"))


async def test_r3_streams_survive_losing_a_node(nats_cluster: EmbeddedCluster, tmp_path: Path,
                                                eventually: Callable[..., Awaitable[None]],
                                                retry: Callable[..., Awaitable[object]]) -> None:
    async def dispatch(n: int) -> None:  # publishes time out while the cluster elects new leaders
        await retry(lambda: bus.dispatch(_task(n)), errors=(PublishError,))

    settings = MeshSettings(nats_url=nats_cluster.url, replicas=3, ack_wait=2.0, reconnect_wait=0.1,
                            data_dir=tmp_path / "mesh")
    seen: list[str] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message(Task).task_id)

    async with await Bus.connect(settings, roles=["coder"]) as bus:
        info = await bus._js.stream_info(bus.topology.tasks_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        assert len(info.cluster.replicas or []) == 2  # the leader plus two followers

        consumer = PullConsumer.for_role(bus, "coder", handler)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(consumer.run())
            await dispatch(1)
            await eventually(lambda: seen == ["g1.s1.1"])

            connected = next(s for s in nats_cluster.servers if s.url.endswith(f":{bus._nc.connected_url.port}"))
            await connected.stop()  # the node this client talks to
            await dispatch(2)
            await dispatch(3)
            await eventually(lambda: sorted(seen) == ["g1.s1.1", "g1.s2.1", "g1.s3.1"], timeout=30)
            consumer.stop()
        assert bus._nc.connected_url.port != connected.port
