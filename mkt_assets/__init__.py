"""Dagster assets that keep a DuckDB copy of the systeme.io marketing API fresh.

The definitions are in ``mkt_assets.definitions`` (``dg`` and ``dagster -m mkt_assets.definitions``
find them there). This package imports nothing of Dagster itself, so the DuckDB worker process
can import ``mkt_assets.warehouse`` without loading Dagster, which keeps its memory small.
"""
