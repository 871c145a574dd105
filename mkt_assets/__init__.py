"""Dagster assets that keep a DuckDB copy of the systeme.io marketing API fresh.

The definitions are in ``mkt_assets.definitions`` (``dg`` and ``dagster -m mkt_assets.definitions``
find them there), built from one instance of the component ``mkt_assets.MarketingSync`` in
``mkt_assets/defs``. This package imports nothing of Dagster itself, so the DuckDB worker process
can import ``mkt_assets.warehouse`` without loading Dagster, which keeps its memory small: the
component is imported the first time it is asked for (dg's registry asks, through ``dir``).
"""

from typing import Any

__all__ = ["MarketingSync"]


def __getattr__(name: str) -> Any:
    if name == "MarketingSync":
        from mkt_assets.component import MarketingSync

        return MarketingSync
    raise AttributeError(f"module 'mkt_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
