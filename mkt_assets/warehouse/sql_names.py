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


# DuckDB's names ignore case: ``"marketing"."contacts"`` is a table of the schema an analyst
# made as ``Marketing``. The catalog is asked with both sides lowercased, as ``ownership`` does.
_SAME_NAME = "lower(table_schema) = lower(?) AND lower(table_name) = lower(?)"


def _named(schema: str, table: str) -> tuple[str, str]:
    return schema.lower(), table.lower()


def table_exists(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    known = _known_to_exist.get(connection)
    if known is not None and _named(schema, table) in known:
        return True
    exists = bool(
        connection.execute(
            f"SELECT count(*) FROM information_schema.tables WHERE table_catalog = current_database() AND {_SAME_NAME}",
            [schema, table],
        ).fetchone()[0]  # type: ignore[index]
    )
    if exists and known is not None:
        known.add(_named(schema, table))
    return exists


# A run asks whether a table exists about ninety times, and what columns a table has a dozen,
# each question a catalog query costing a millisecond or more. Once a transaction has begun on
# a connection, the catalog is read once: "yes, it exists" then holds while it stays open, this
# package never dropping a table of the schema (CREATE OR REPLACE keeps it) and no other process
# able to, DuckDB's file lock being the connection's; "no" is asked again, a table may be made.
# A table's columns hold until this package changes them (``forget_columns``, where it adds one
# or replaces the table). Kept once the transaction commits, the connection still holding the
# file (the checks' facts are read then), and read afresh as the next one begins; forgotten
# when one rolls back, which may undo a CREATE.
_known_to_exist: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
_known_columns: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, dict[tuple[str, str], frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)
# The database a connection is attached to as its default: this package never runs USE.
_catalogs: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, str] = weakref.WeakKeyDictionary()


def remember_existing_tables(connection: duckdb.DuckDBPyConnection) -> None:
    """From now until ``forget_existing_tables``, the tables and columns the catalog holds now
    are known without asking it again (see above). Called as a transaction begins."""
    columns: dict[tuple[str, str], set[str]] = {}
    for schema, table, column in connection.execute(
        "SELECT schema_name, table_name, column_name FROM duckdb_columns() WHERE database_name = current_database()"
    ).fetchall():
        columns.setdefault(_named(schema, table), set()).add(column)
    _known_to_exist[connection] = set(columns)
    _known_columns[connection] = {name: frozenset(names) for name, names in columns.items()}


def forget_existing_tables(connection: duckdb.DuckDBPyConnection) -> None:
    _known_to_exist.pop(connection, None)
    _known_columns.pop(connection, None)


def forget_columns(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> None:
    """``schema.table``'s columns are about to change (a column added, the table replaced)."""
    known = _known_columns.get(connection)
    if known is not None:
        known.pop(_named(schema, table), None)


def _catalog(connection: duckdb.DuckDBPyConnection) -> str:
    catalog = _catalogs.get(connection)
    if catalog is None:
        (catalog,) = connection.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
        _catalogs[connection] = catalog
    return catalog


def table_columns(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> set[str]:
    """The names of the columns ``schema.table`` has (none if it does not exist)."""
    known = _known_columns.get(connection, {}).get(_named(schema, table))
    if known is not None:
        return set(known)
    rows = connection.execute(
        f"SELECT column_name FROM information_schema.columns WHERE table_catalog = current_database() AND {_SAME_NAME}",
        [schema, table],
    ).fetchall()
    return {row[0] for row in rows}
