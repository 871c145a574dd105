"""Reading staged pages in DuckDB: the SQL that types each record's values as its column
holds them, and the typing of a staged chunk to Parquet while the fetch goes on.
"""

from __future__ import annotations

import json

import duckdb

from mkt_assets.core.catalog import BOOKKEEPING_COLUMNS, Column, ResourceSpec
from mkt_assets.warehouse.connection import NO_EXTENSION_DOWNLOADS
from mkt_assets.warehouse.sql_names import (
    forget_columns,
    fully_qualified,
    made_table,
    quote_ident,
    quote_literal,
    table_columns,
    table_exists,
)

# DuckDB's JSON reader refuses a line longer than this unless told, and buffers about twice
# what it is told: so it is told the longest staged line, never less than its default.
_JSON_OBJECT_FLOOR = 16 << 20


def column_definitions(spec: ResourceSpec) -> list[str]:
    definitions = []
    for column in (*spec.columns, *BOOKKEEPING_COLUMNS):
        constraint = " PRIMARY KEY" if column.api_name == spec.primary_key else ""
        definitions.append(f"{quote_ident(column.name)} {column.sql_type}{constraint}")
    return definitions


def ensure_table(connection: duckdb.DuckDBPyConnection, schema: str, table: str, spec: ResourceSpec) -> None:
    """Create the table, or add the columns the catalog gained since it was created."""
    target = fully_qualified(connection, schema, table)
    if not table_exists(connection, schema, table):
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {fully_qualified(connection, schema)}")
        connection.execute(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(column_definitions(spec))})")
        made_table(connection, schema, table, [column.name for column in (*spec.columns, *BOOKKEEPING_COLUMNS)])
    existing = table_columns(connection, schema, table)
    for column in (*spec.columns, *BOOKKEEPING_COLUMNS):
        if column.name not in existing:
            forget_columns(connection, schema, table)
            connection.execute(
                f"ALTER TABLE {target} ADD COLUMN {quote_ident(column.name)} {column.sql_type}"
            )


def typed_expression(column: Column, record: str = "r") -> str:
    """SQL that reads ``column`` out of the JSON record ``record`` as its DuckDB type."""
    key = quote_literal(column.api_name)
    if column.member:
        return f"CAST({record} -> {key} ->> {quote_literal(column.member)} AS {column.duckdb_type})"
    if not column.fields:
        if column.duckdb_type == "JSON":
            return f"({record} -> {key})"
        return f"CAST({record} ->> {key} AS {column.duckdb_type})"
    # Read with the API's names, then renamed. from_json, not a CAST to STRUCT: a CAST refuses
    # members with fields the catalog does not know, which the raw path keeps in _extra.
    structure = quote_literal(json.dumps([{m.api_name: m.sql_type for m in column.fields}]))
    renamed = ", ".join(f"{quote_ident(m.name)} := x.{quote_ident(m.api_name)}" for m in column.fields)
    return (
        f"CAST(list_transform(from_json({record} -> {key}, {structure}),"
        f" lambda x: struct_pack({renamed})) AS {column.sql_type})"
    )


def json_object_limit(longest_line: int) -> int:
    """What DuckDB's JSON reader is told a staged line may be long."""
    return max(_JSON_OBJECT_FLOOR, longest_line + 1024)


def records_sql(longest_line: int) -> str:
    """Each staged record as raw JSON: slow (every field is parsed from text again), but
    it sees every field, so it finds the unknown ones and names a value that does not cast."""
    return (
        "SELECT page, unnest(body.items) AS r, generate_subscripts(body.items, 1) AS position"
        " FROM read_json($path, format = 'newline_delimited', maximum_object_size = "
        f"{json_object_limit(longest_line)}, columns = {{'page': 'BIGINT', 'body': 'STRUCT(items JSON[])'}})"
    )


def _api_type(column: Column) -> str:
    """The column's type with the API's own field names, as DuckDB's JSON reader reads it."""
    if column.member:
        return f"STRUCT({quote_ident(column.member)} {column.duckdb_type})"
    if not column.fields:
        return column.duckdb_type
    members = ", ".join(f"{quote_ident(member.api_name)} {_api_type(member)}" for member in column.fields)
    return f"STRUCT({members})[]"


def _typed_records_sql(spec: ResourceSpec, longest_line: int) -> str:
    """Each staged record as a typed struct, parsed once by DuckDB's JSON reader (fields the
    catalog does not know are skipped: the stager says when there are any)."""
    item = ", ".join(f"{quote_ident(column.api_name)} {_api_type(column)}" for column in spec.columns)
    body = quote_literal(f"STRUCT(items STRUCT({item})[])")
    return (
        "SELECT page, unnest(body.items) AS r, generate_subscripts(body.items, 1) AS position"
        " FROM read_json($path, format = 'newline_delimited', maximum_object_size = "
        f"{json_object_limit(longest_line)}, columns = {{'page': 'BIGINT', 'body': {body}}})"
    )


def _typed_member_expression(column: Column) -> str:
    field = f"r.{quote_ident(column.api_name)}"
    if column.member:
        return f"{field}.{quote_ident(column.member)}"
    if not column.fields:
        return field
    renamed = ", ".join(f"{quote_ident(m.name)} := x.{quote_ident(m.api_name)}" for m in column.fields)
    return f"CAST(list_transform({field}, lambda x: struct_pack({renamed})) AS {column.sql_type})"


def _typed_rows_sql(spec: ResourceSpec, longest_line: int) -> str:
    """``page, position`` and the table's data columns of staged JSON pages, typed by
    DuckDB's JSON reader as it parses them (what ``type_staged_chunk`` writes to Parquet)."""
    typed = [f"{_typed_member_expression(c)} AS {quote_ident(c.name)}" for c in spec.columns]
    records = _typed_records_sql(spec, longest_line)
    return f"SELECT page, position, {', '.join(typed)} FROM ({records})"


def staged_select_sql(
    spec: ResourceSpec,
    *,
    raw: bool = True,
    deduplicate: bool = True,
    json: bool = True,
    parquet: bool = False,
    longest_line: int = 0,
    unknown_fields: tuple[str, ...] = (),
) -> str:
    """One typed row per key, the last one seen winning, as the table's columns.

    ``raw`` reads records as JSON text, which keeps unknown fields in ``_extra``; otherwise
    DuckDB types the records as it parses them, several times faster, and staged chunks
    already typed to Parquet (``$typed``) are read with the JSON ones (``$path``): ``json``
    and ``parquet`` say which of the two there are. ``deduplicate`` may be off when the
    stager saw every key once.
    """
    names = [quote_ident(c.name) for c in spec.columns]
    if raw:
        records = records_sql(longest_line)
        typed = [f"{typed_expression(c)} AS {quote_ident(c.name)}" for c in spec.columns]
        extra = _extra_sql(spec, unknown_fields)
    else:
        sources = ([f"SELECT page, position, {', '.join(names)} FROM read_parquet($typed)"] if parquet else []) + (
            [_typed_rows_sql(spec, longest_line)] if json else []
        )
        records = " UNION ALL ".join(sources)
        typed = names
        extra = "CAST(NULL AS JSON)"
    key = quote_ident(spec.primary_key_column.name)
    sql = (
        f"WITH records AS ({records}) "
        f"SELECT {', '.join(typed)}, {extra} AS \"_extra\","
        " CAST($synced_at AS TIMESTAMPTZ) AS \"_synced_at\""
        " FROM records"
    )
    if deduplicate:
        sql += f" QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY page DESC, position DESC) = 1"
    return sql


def type_staged_chunk(spec: ResourceSpec, json_path: str, parquet_path: str, memory_limit: str, longest_line: int) -> None:
    """Type one chunk of staged pages into a Parquet file, in an in-memory DuckDB.

    Runs in a lean child while the fetch goes on: the JSON parsing, most of a first load's
    merge, then overlaps the wait for the API on a core the fetch leaves idle."""
    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": memory_limit,
        "threads": 1,
        "preserve_insertion_order": False,
        **NO_EXTENSION_DOWNLOADS,
    }
    with duckdb.connect(":memory:", config=config) as connection:
        connection.execute(
            f"COPY ({_typed_rows_sql(spec, longest_line)}) TO {quote_literal(parquet_path)} (FORMAT parquet)",
            {"path": json_path},
        )


def known_fields_patch(spec: ResourceSpec) -> str:
    # An RFC 7396 merge patch that nulls every known field leaves only the unknown ones.
    return json.dumps({name: None for name in sorted(spec.known_fields)})


def _extra_sql(spec: ResourceSpec, unknown_fields: tuple[str, ...]) -> str:
    """``_extra`` of a raw record: the fields the catalog does not know, and whole any list
    whose members carry such fields (``tags[].color``: the typed column keeps only the known
    members' fields, so the list as sent is kept beside it)."""
    extra = "json_merge_patch(r, $known)"
    with_unknown_members = {name.split("[]", 1)[0] for name in unknown_fields if "[]." in name}
    for column in spec.columns:
        if column.api_name not in with_unknown_members:
            continue
        key = quote_literal(column.api_name)
        known = "[" + ", ".join(quote_literal(member.api_name) for member in column.fields) + "]"
        carries_unknown = (
            f"len(list_filter(CAST(r -> {key} AS JSON[]), lambda m: json_type(m) = 'OBJECT'"
            f" AND len(list_filter(json_keys(m), lambda k: NOT list_contains({known}, k))) > 0)) > 0"
        )
        extra = f"json_merge_patch({extra}, CASE WHEN coalesce({carries_unknown}, false) THEN json_object({key}, r -> {key}) ELSE '{{}}' END)"
    return f"CAST(nullif({extra}, '{{}}') AS JSON)"
