"""One page of one resource as the API sent it: what the source reads and the staging keeps.

Pure data, in the core so that the staging, which takes pages, depends on neither the HTTP
client that makes them nor anything the DuckDB worker should not import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Page:
    """One page of one resource as the API sent it."""

    resource: str
    number: int  # 1-based
    path: str
    query: Mapping[str, object]
    items: list[dict[str, Any]]
    has_more: bool
    body: bytes  # the raw JSON, so a stager can hand it to DuckDB without re-encoding
    # Fields of its records the catalog does not know (``tags[].color`` for a list member's).
    unknown_fields: frozenset[str] = frozenset()
    # Where the walk stands once this page is handed over (JSON values): handed back to
    # ``iter_pages(resume=...)``, it continues with the page after, as if never stopped.
    position: Mapping[str, Any] | None = None
