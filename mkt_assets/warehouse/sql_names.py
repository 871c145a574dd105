"""Names in DuckDB's SQL: quoting, the fully qualified name of a table, what exists."""

from __future__ import annotations

import duckdb


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def fully_qualified(connection: duckdb.DuckDBPyConnection, schema: str, table: str | None = None) -> str:
    """``"catalog"."schema"."table"``: a file named like the schema (marketing.duckdb holding
    schema marketing) makes two-part names ambiguous in DuckDB, so our own SQL never uses them."""
    (catalog,) = connection.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
    name = f"{quote_ident(catalog)}.{quote_ident(schema)}"
    return f"{name}.{quote_ident(table)}" if table is not None else name


def table_exists(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return bool(
        connection.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
            [schema, table],
        ).fetchone()[0]  # type: ignore[index]
    )


def table_columns(connection: duckdb.DuckDBPyConnection, schema: str, table: str) -> set[str]:
    """The names of the columns ``schema.table`` has (none if it does not exist)."""
    rows = connection.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_catalog = current_database() AND table_schema = ? AND table_name = ?",
        [schema, table],
    ).fetchall()
    return {row[0] for row in rows}
