"""The API, over HTTP only: the transport (retries, deadlines, bounded bodies), the shared
rate limiter and the client (pagination, records checked as they are read). Nothing of
DuckDB or Dagster."""
