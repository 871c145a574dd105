"""Dagster assets that keep a DuckDB copy of the systeme.io marketing API fresh."""

from mkt_assets.definitions import defs

__all__ = ["defs"]
