"""Webhook deliveries on their way in: the receiver that verifies them and the inbox that keeps
them for Dagster. No Dagster, no DuckDB, no HTTP client: the standard library, the core's
delivery format and the private files."""
