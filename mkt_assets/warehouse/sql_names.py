"""Names in DuckDB's SQL: quoting, the fully qualified name of a table, what exists."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

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
    if known is not None:
        return _named(schema, table) in known
    return bool(
        connection.execute(
            f"SELECT count(*) FROM information_schema.tables WHERE table_catalog = current_database() AND {_SAME_NAME}",
            [schema, table],
        ).fetchone()[0]  # type: ignore[index]
    )


# A run asks whether a table exists about ninety times, and what columns a table has a dozen,
# each question a catalog query costing a millisecond or more. Once a transaction has begun on
# a connection, the catalog is read once, and then answers both while it stays open: no other
# process can change it, DuckDB's file lock being the connection's, and this package never
# drops a table of the schema (CREATE OR REPLACE keeps it) and says where it makes one
# (``made_table``: a first sync makes some thirty, each asked about before and after). A
# table's columns hold until this package changes them (``forget_columns``, where it adds one
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


def made_table(
    connection: duckdb.DuckDBPyConnection, schema: str, table: str, columns: Iterable[str] | None = None
) -> None:
    """``schema.table`` has just been made (or replaced): it exists, with ``columns`` (None:
    to be read from the catalog when asked)."""
    known = _known_to_exist.get(connection)
    if known is not None:
        known.add(_named(schema, table))
    forget_columns(connection, schema, table)
    known_columns = _known_columns.get(connection)
    if known_columns is not None and columns is not None:
        known_columns[_named(schema, table)] = frozenset(columns)


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
    columns = _known_columns.get(connection)
    known = columns.get(_named(schema, table)) if columns is not None else None
    if known is not None:
        return set(known)
    rows = connection.execute(
        f"SELECT column_name FROM information_schema.columns WHERE table_catalog = current_database() AND {_SAME_NAME}",
        [schema, table],
    ).fetchall()
    if columns is not None and rows:
        columns[_named(schema, table)] = frozenset(row[0] for row in rows)
    return {row[0] for row in rows}
