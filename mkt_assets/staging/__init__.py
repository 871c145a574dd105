"""The read on its way to the warehouse: pages staged to private files as they arrive, and
the checkpoints that let a failed run's read be resumed. Nothing of HTTP, DuckDB or Dagster."""
