"""Layer 2: the ledger's DuckDB store — schema, exactly-once columnar ingest, guarded read-only
queries and parquet export. Knows the contracts, nothing of the bus."""

from mesh.store.ledger import Ledger
from mesh.store.schema import SCHEMA_VERSION, TABLES

__all__ = ["SCHEMA_VERSION", "TABLES", "Ledger"]
