"""Layer 5: the node runtime — one role process: lifecycle, health, metrics, heartbeats, drain."""
