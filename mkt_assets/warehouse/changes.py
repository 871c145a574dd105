"""Which state each synced table is in: ``<schema>._mkt_changes``.

A normalized table is kept unrebuilt only while the tables it reads hold exactly the rows it
was built from (``normalized_tables.is_current``). That none of them changed *in this run* is
not enough: while ``MKT_RESOURCES`` leaves contacts out, contact_tags is no asset and is not
rebuilt as tags change, and when contacts come back nothing it reads changes in that run.

So every merge that changes a table's rows (or creates the table) draws a new random token for
it here, in its own transaction, and a normalized table records beside its definition the
tokens of the tables it read as it was built: the same tokens, the same rows. A token, not
a row count or the newest ``_synced_at``: a merge of an older read (overlapping runs, see
``reads``) writes ``_synced_at`` older than the newest, and a ``delete`` mode merge may remove
as many rows as it adds, so both can stay equal while rows change. Random, not a counter: a
bookkeeping table dropped and made again never hands out a token a table recorded before.
DuckDB only, nothing of HTTP or Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from mkt_assets.warehouse.sql_names import fully_qualified, made_table, quote_literal, table_exists

CHANGES_TABLE = "_mkt_changes"
CHANGES_COLUMNS = frozenset({"table_name", "token"})
# What a table never changed since the bookkeeping began stands at.
UNRECORDED = "none"
_DESCRIPTION = (
    "mkt_assets bookkeeping: a token each synced table gets anew whenever a sync changes its rows,"
    " so that a normalized table is rebuilt once anything it reads changed since it was built."
    " Written by every sync; not meant to be edited."
)


def record_change(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> None:
    """``table``'s rows have just changed: a new token for it."""
    target = fully_qualified(connection, schema, CHANGES_TABLE)
    if not table_exists(connection, schema, CHANGES_TABLE):
        connection.execute(f"CREATE TABLE {target} (table_name VARCHAR NOT NULL, token VARCHAR NOT NULL)")
        made_table(connection, schema, CHANGES_TABLE)
        connection.execute(f"COMMENT ON TABLE {target} IS {quote_literal(_DESCRIPTION)}")
    connection.execute(f"DELETE FROM {target} WHERE table_name = ?", [table])
    # 64 random bits: short enough for a table's comment, never drawn twice in practice.
    connection.execute(f"INSERT INTO {target} VALUES (?, md5(CAST(gen_random_uuid() AS VARCHAR))[:16])", [table])


def change_tokens(connection: duckdb.DuckDBPyConnection, schema: str, tables: Sequence[str]) -> dict[str, str]:
    """The current token of each of ``tables`` (``UNRECORDED`` for one never changed since)."""
    tokens = dict.fromkeys(tables, UNRECORDED)
    if tables and table_exists(connection, schema, CHANGES_TABLE):
        rows = connection.execute(
            f"SELECT table_name, token FROM {fully_qualified(connection, schema, CHANGES_TABLE)} WHERE list_contains(?, table_name)",
            [list(tables)],
        ).fetchall()
        tokens.update({name: token for name, token in rows})
    return tokens
