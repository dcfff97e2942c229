"""Layer 3: tools and workspaces, pure of the bus (storage is passed in as callables)."""
