"""Layer 2: the NATS bus — topology, typed publish, claim-check, KV/object store, the pull-consumer loop."""

from mesh.bus import _nats  # noqa: F401  (first: nats-py without its websocket transport)
from mesh.bus.client import Bus
from mesh.bus.consumer import Delivery, PullConsumer
from mesh.bus.dlq import DLQ_REASON_HEADER, DeadLetter
from mesh.bus.topology import Topology, provision

__all__ = ["DLQ_REASON_HEADER", "Bus", "DeadLetter", "Delivery", "PullConsumer", "Topology", "provision"]
