"""The versions of every synced row: ``<table>_history`` beside each synced table.

The API has no ``updatedAt``: a sync sees a change only as a difference from what is stored.
So the merge keeps the versions, in its own transaction and from its own change detection
(the row hash). A version opens when a row first lands or its values change, and closes when
they change again or a complete read no longer finds the row. Its ``_valid_to`` is exactly the
``_valid_from`` of the version that follows it, the time of the sync that saw the change, so
the versions of one key never overlap. A row that comes back after a deletion opens a new
version: the gap between the two is when the API did not list it.

DuckDB only, nothing of HTTP or Dagster. Each function works inside the merge's transaction,
on the temporary tables the merge made: ``staged`` (the batch, typed) and tables of keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

from mkt_assets.core.catalog import DELETED_AT_COLUMN, EXTRA_COLUMN, SYNCED_AT_COLUMN, Column, ResourceSpec
from mkt_assets.warehouse.sql_names import forget_columns, fully_qualified, made_table, quote_ident, table_columns, table_exists

SUFFIX = "_history"
VALID_FROM_COLUMN = Column(
    "_valid_from", "TIMESTAMPTZ", "When a sync first saw these values: the row landed, changed, or came back."
)
VALID_TO_COLUMN = Column(
    "_valid_to", "TIMESTAMPTZ", "When a sync saw them change or the row go; NULL while they are current."
)


def history_table(table: str) -> str:
    return f"{table}{SUFFIX}"


def data_columns(spec: ResourceSpec) -> tuple[Column, ...]:
    """What a version holds of the row: the catalog's columns and ``_extra``."""
    return (*spec.columns, EXTRA_COLUMN)


@dataclass(frozen=True)
class Versions:
    opened: int = 0
    closed: int = 0


def ensure_history(
    connection: duckdb.DuckDBPyConnection, schema: str, table: str, spec: ResourceSpec, synced_at: datetime
) -> None:
    """Create ``<table>_history``, or add the columns the catalog gained since it was.

    A history created beside a table that already holds rows starts from them: each stored
    row is a version since it was last written (``_synced_at``, or ``synced_at`` for a row
    written before that was recorded), one marked deleted a version closed when it was
    (``_deleted_at``). What happened before is not known."""
    name = history_table(table)
    target = fully_qualified(connection, schema, name)
    columns = data_columns(spec)
    if not table_exists(connection, schema, name):
        definitions = [f"{quote_ident(c.name)} {c.sql_type}" for c in columns]
        definitions += [
            f"{quote_ident(VALID_FROM_COLUMN.name)} {VALID_FROM_COLUMN.sql_type} NOT NULL",
            f"{quote_ident(VALID_TO_COLUMN.name)} {VALID_TO_COLUMN.sql_type}",
        ]
        connection.execute(f"CREATE TABLE {target} ({', '.join(definitions)})")
        made_table(connection, schema, name)
        names = ", ".join(quote_ident(c.name) for c in columns)
        connection.execute(
            f"INSERT INTO {target} SELECT {names}, coalesce({quote_ident(SYNCED_AT_COLUMN.name)}, $synced_at),"
            f" {quote_ident(DELETED_AT_COLUMN.name)} FROM {fully_qualified(connection, schema, table)}",
            {"synced_at": synced_at},
        )
        return
    existing = table_columns(connection, schema, name)
    for column in columns:
        if column.name not in existing:
            forget_columns(connection, schema, name)
            connection.execute(f"ALTER TABLE {target} ADD COLUMN {quote_ident(column.name)} {column.sql_type}")


def record_versions(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    spec: ResourceSpec,
    synced_at: datetime,
    *,
    opened: Sequence[str],
    closed: Sequence[str],
) -> Versions:
    """Close the open version of every key in the temporary key tables ``closed``, then open
    one with the staged values for every key in ``opened`` (each key in one of them at most)."""
    target = fully_qualified(connection, schema, history_table(table))
    key = quote_ident(spec.primary_key_column.name)
    valid_from, valid_to = quote_ident(VALID_FROM_COLUMN.name), quote_ident(VALID_TO_COLUMN.name)
    closed_count = opened_count = 0
    if closed:
        keys = " UNION ALL ".join(f"SELECT {key} FROM {name}" for name in closed)
        (closed_count,) = connection.execute(
            f"UPDATE {target} SET {valid_to} = $synced_at WHERE {valid_to} IS NULL AND {key} IN ({keys})",
            {"synced_at": synced_at},
        ).fetchone()  # type: ignore[misc]
    if opened:
        keys = " UNION ALL ".join(f"SELECT {key} FROM {name}" for name in opened)
        names = ", ".join(quote_ident(c.name) for c in data_columns(spec))
        (opened_count,) = connection.execute(
            f"INSERT INTO {target} ({names}, {valid_from}, {valid_to})"
            f" SELECT {names}, $synced_at, NULL FROM staged WHERE {key} IN ({keys})",
            {"synced_at": synced_at},
        ).fetchone()  # type: ignore[misc]
    return Versions(opened=int(opened_count), closed=int(closed_count))
