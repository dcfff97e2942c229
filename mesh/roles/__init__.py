"""Layer 4: roles — orchestrator, worker, recorder — where bus, backends, router, tools and store meet."""
