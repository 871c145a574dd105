"""Dagster assets that keep a DuckDB copy of the systeme.io marketing API fresh.

``defs`` is built on first access (PEP 562), not on import: Dagster finds it as before
(``-m mkt_assets``), while the DuckDB worker process can import ``mkt_assets.warehouse``
without loading Dagster, which keeps its memory small.
"""

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from mkt_assets.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "defs"])
