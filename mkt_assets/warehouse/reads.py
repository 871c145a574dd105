"""Which reads of the API each synced table holds: ``<schema>._mkt_reads``.

Two syncs of one account may overlap (two Dagster instances on one file, a manual run beside
a scheduled one) and land in either order. A row stamped by a newer sync shows that sync wrote
it, but a row the newer sync read unchanged carries no stamp, so the older sync, landing last,
would write its older read over it (a value that went A, B, A while both read lands as B). So
each merge records, in its own transaction, when the read it applied began, and whether it was
complete (every record) or incremental (every key above ``after``). A later batch compares its
own begin with them (``later_reads``):

- a complete read that began after it has committed: everything the batch read is older than
  what that read saw, so the batch is not applied at all;
- incremental reads that began after it have committed: the keys above their lowest ``after``
  were read by a newer sync, so the batch leaves them as they are.

Begin times are the syncs' own clocks (``StagedBatch.synced_at``), as ``_synced_at`` is.
Only what can still decide something is kept: the newest complete read of each table and the
incremental reads that began after it, a few rows a table. DuckDB only, nothing of HTTP or
Dagster; every function runs inside the merge's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from mkt_assets.warehouse.sql_names import fully_qualified, made_table, quote_literal, table_exists

# The project's own bookkeeping, beside the synced tables it describes.
READS_TABLE = "_mkt_reads"
READS_COLUMNS = frozenset({"table_name", "read_began", "complete", "after_key", "committed_at"})
_DESCRIPTION = (
    "mkt_assets bookkeeping: the reads of the API each synced table holds (when each began, and"
    " whether it was complete), so that a sync that began earlier but lands later never writes"
    " its older read over a newer one. Written by every sync; not meant to be edited."
)


def ensure_reads(connection: duckdb.DuckDBPyConnection, schema: str) -> str:
    """Create the bookkeeping table if needed; its fully qualified name."""
    target = fully_qualified(connection, schema, READS_TABLE)
    if not table_exists(connection, schema, READS_TABLE):
        connection.execute(
            f"CREATE TABLE {target} (table_name VARCHAR NOT NULL, read_began TIMESTAMPTZ NOT NULL,"
            " complete BOOLEAN NOT NULL, after_key BIGINT, committed_at TIMESTAMPTZ NOT NULL)"
        )
        made_table(connection, schema, READS_TABLE)
        connection.execute(f"COMMENT ON TABLE {target} IS {quote_literal(_DESCRIPTION)}")
    return target


@dataclass(frozen=True)
class LaterReads:
    """What the committed reads of a table that began after a batch's read say of it."""

    # When the newest of them that was complete began (None: none was).
    complete: datetime | None
    # The lowest key above which those that were incremental read every record (None: none).
    covered_after: int | None


def later_reads(connection: duckdb.DuckDBPyConnection, schema: str, table: str, began: datetime) -> LaterReads:
    """The committed reads of ``table`` that began after ``began``, in one look. The reads of a
    table dropped since (by hand, to load it again) described rows that are gone: they are
    forgotten."""
    if not table_exists(connection, schema, READS_TABLE):
        return LaterReads(None, None)
    if not table_exists(connection, schema, table):
        connection.execute(f"DELETE FROM {fully_qualified(connection, schema, READS_TABLE)} WHERE table_name = ?", [table])
        return LaterReads(None, None)
    (complete, covered_after) = connection.execute(
        "SELECT max(read_began) FILTER (WHERE complete),"
        " min(after_key) FILTER (WHERE NOT complete AND after_key IS NOT NULL)"
        f" FROM {fully_qualified(connection, schema, READS_TABLE)} WHERE table_name = ? AND read_began > ?",
        [table, began],
    ).fetchone()  # type: ignore[misc]
    return LaterReads(complete, covered_after)


def record_read(
    connection: duckdb.DuckDBPyConnection, schema: str, table: str, began: datetime, *, complete: bool, after: int | None
) -> None:
    """Record a read just applied to ``table``, and forget those that can decide nothing any more:
    every read that began before the newest complete one (a batch older than them is superseded
    by that one anyway)."""
    target = ensure_reads(connection, schema)
    connection.execute(
        f"INSERT INTO {target} VALUES (?, ?, ?, ?, current_timestamp)", [table, began, complete, None if complete else after]
    )
    connection.execute(
        f"DELETE FROM {target} WHERE table_name = $table AND read_began <"
        f" (SELECT max(read_began) FROM {target} WHERE table_name = $table AND complete)",
        {"table": table},
    )
