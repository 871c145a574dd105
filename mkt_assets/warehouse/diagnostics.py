"""What a failed write says: which record and field DuckDB could not type, messages without
the values they quote, and a preview of a table for the materialization's metadata.
"""

from __future__ import annotations

import re

import duckdb

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.core.errors import StagingError
from mkt_assets.core.records import shortened
from mkt_assets.staging.pages import StagedBatch
from mkt_assets.warehouse.connection import without_values
from mkt_assets.warehouse.sql_names import fully_qualified, quote_literal
from mkt_assets.warehouse.staged_sql import records_sql, typed_expression


def explain_cast_failure(
    connection: duckdb.DuckDBPyConnection,
    spec: ResourceSpec,
    batch: StagedBatch,
    error: duckdb.Error,
) -> StagingError:
    """Find which column and value could not be typed, which DuckDB's message does not say.

    The client has checked every value's type already: what is left is what DuckDB reads
    differently from Python (a field sent twice in one object, a timestamp form DuckDB does
    not know, text that is not valid Unicode). Runs after the rollback: an aborted
    transaction answers no further query."""
    duplicated = re.search(r'has duplicate key "([^"]*)"', str(error))
    if duplicated is not None:
        return StagingError(
            f"{spec.name}: a record sends the field {duplicated[1]!r} twice; DuckDB and the checks would"
            " read different values, so nothing is written"
        )
    try:
        for column in spec.columns:
            expression = typed_expression(column).replace("CAST(", "TRY_CAST(")
            value = f"(r -> {quote_literal(column.api_name)})"
            if column.member:
                value = f"(r -> {quote_literal(column.api_name)} -> {quote_literal(column.member)})"
            row = connection.execute(
                f"WITH records AS ({records_sql(batch.longest_line)})"
                f" SELECT page, position, {value} FROM records"
                f" WHERE json_type({value}) IS DISTINCT FROM 'NULL' AND {value} IS NOT NULL"
                f" AND {expression} IS NULL LIMIT 1",
                {"path": [str(path) for path in batch.paths]},
            ).fetchone()
            if row is not None:
                page, position, value = row
                shown = shortened(str(value)) if column.duckdb_type in ("BIGINT", "BOOLEAN", "TIMESTAMPTZ") else "it"
                return StagingError(
                    f"{spec.name}: record {position} of page {page}: field"
                    f" {column.api_name!r} (column {column.name} {column.sql_type}) cannot hold {shown}"
                )
    except duckdb.Error as unreadable:
        return StagingError(f"{spec.name}: the staged pages could not be read: {without_values(str(unreadable))}")
    return StagingError(f"{spec.name}: a value could not be typed: {without_values(str(error))}")


def duplicated_field(connection: duckdb.DuckDBPyConnection, batch: StagedBatch, parameters: dict[str, object]) -> str | None:
    """A record sending one of its fields twice, found where the raw path would read the
    first copy (DuckDB's ``->>``) while the client checked the last (Python's parser)."""
    row = connection.execute(
        f"WITH records AS ({records_sql(batch.longest_line)})"
        " SELECT page, position, k FROM (SELECT page, position, unnest(json_keys(r)) AS k FROM records)"
        " GROUP BY ALL HAVING count(*) > 1 LIMIT 1",
        {"path": parameters["path"]},
    ).fetchone()
    if row is None:
        return None
    page, position, name = row
    return (
        f"{batch.spec.name}: record {position} of page {page} sends the field {name!r} twice; DuckDB and"
        " the checks would read different values, so nothing is written"
    )


def preview_markdown(connection: duckdb.DuckDBPyConnection, schema: str, table: str, rows: int = 5) -> str:
    """The first rows of a table, by primary key order, as a markdown table."""
    result = connection.execute(f"SELECT * FROM {fully_qualified(connection, schema, table)} ORDER BY 1 LIMIT {int(rows)}")
    names = [column[0] for column in result.description or []]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in result.fetchall():
        lines.append("| " + " | ".join(_markdown_cell(value) for value in row) + " |")
    return "\n".join(lines)


def _markdown_cell(value: object) -> str:
    text = "" if value is None else str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text.replace("|", "\\|").replace("\n", " ")
