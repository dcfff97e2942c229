"""Layer 5: local infrastructure the embedded default runs on (a real nats-server child process)."""

from mesh.embedded.natsserver import ClusterSpec, EmbeddedCluster, EmbeddedNats, find_nats_server, free_port

__all__ = ["ClusterSpec", "EmbeddedCluster", "EmbeddedNats", "find_nats_server", "free_port"]
