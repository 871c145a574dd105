"""Names in DuckDB's SQL: quoting, the fully qualified name of a table, what exists."""

from __future__ import annotations

import weakref

import duckdb


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def fully_qualified(connection: duckdb.DuckDBPyConnection, schema: str, table: str | None = None) -> str:
    """``"catalog"."schema"."table"``: a file named like the schema (marketing.duckdb holding
    schema marketing) makes two-part names ambiguous in DuckDB, so our own SQL never uses them."""
    name = f"{quote_ident(_catalog(connection))}.{quote_ident(schema)}"
    return f"{name}.{quote_ident(table)}" if table is not None else name


def table_exists(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    known = _known_to_exist.get(connection)
    if known is not None and (schema, table) in known:
        return True
    exists = bool(
        connection.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
            [schema, table],
        ).fetchone()[0]  # type: ignore[index]
    )
    if exists and known is not None:
        known.add((schema, table))
    return exists


# A run asks whether a table exists about ninety times, and each question is a catalog query
# costing more than a millisecond. Once a transaction has begun on a connection, "yes" holds
# while it stays open: this package never drops a table of the schema (CREATE OR REPLACE keeps
# it), and no other process can, DuckDB's file lock being the connection's. "No" is asked again:
# a table may be made. Forgotten when a transaction rolls back, which may undo a CREATE.
_known_to_exist: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
# The database a connection is attached to as its default: this package never runs USE.
_catalogs: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, str] = weakref.WeakKeyDictionary()


def remember_existing_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """From now until ``forget_existing_tables``, a table found to exist is not asked for again."""
    _known_to_exist.setdefault(connection, set())


def forget_existing_tables(connection: duckdb.DuckDBPyConnection) -> None:
    _known_to_exist.pop(connection, None)


def _catalog(connection: duckdb.DuckDBPyConnection) -> str:
    catalog = _catalogs.get(connection)
    if catalog is None:
        (catalog,) = connection.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
        _catalogs[connection] = catalog
    return catalog


def table_columns(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> set[str]:
    """The names of the columns ``schema.table`` has (none if it does not exist)."""
    rows = connection.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
        [schema, table],
    ).fetchall()
    return {row[0] for row in rows}
