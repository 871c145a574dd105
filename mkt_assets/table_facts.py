"""What the asset checks need to know about the tables, queried in DuckDB only.

No Dagster here, so a step can ask for these facts from a lean child process (see
``lean_process``) and keep DuckDB's working memory out of its own; ``checks`` turns them
into check results. Every query returns counts and short samples, never whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from mkt_assets.catalog import RESOURCES_BY_NAME, Column, ResourceSpec
from mkt_assets.warehouse import WarehouseFile, fully_qualified, quote_ident, streamed, table_exists

# How many offending keys a failing check lists in its metadata.
SAMPLE_SIZE = 20
# Rows a complete sync no longer found upstream are kept, marked; checks look at the rest.
LIVE = "_deleted_at IS NULL"



@dataclass(frozen=True)
class PrimaryKeyFacts:
    rows_without_key: int
    duplicated_keys: list[object]  # up to SAMPLE_SIZE + 1, in key order


@dataclass(frozen=True)
class RequiredFieldsFacts:
    rows_missing_by_column: dict[str, int]
    keys_missing_by_column: dict[str, list[object]]  # up to SAMPLE_SIZE each


@dataclass(frozen=True)
class SyncedTableFacts:
    primary_key: PrimaryKeyFacts
    required_fields: RequiredFieldsFacts
    live_rows: int


@dataclass(frozen=True)
class ReferenceFacts:
    """Live rows' references (a column, or a list's member field) that name no live row of
    the table they refer to."""

    missing_table: str | None = None  # a table the check needs that does not exist yet
    dangling: int = 0  # references
    rows: int = 0  # rows holding one or more of them
    keys: list[object] = field(default_factory=list)  # of those rows, up to SAMPLE_SIZE + 1
    values: list[object] = field(default_factory=list)  # the dangling values, up to SAMPLE_SIZE + 1


def primary_key_facts(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> PrimaryKeyFacts:
    table = fully_qualified(connection, schema, spec.name)
    key = quote_ident(spec.primary_key_column.name)
    (missing,) = connection.execute(f"SELECT count(*) FROM {table} WHERE {key} IS NULL").fetchone()  # type: ignore[misc]
    duplicated = connection.execute(
        f"SELECT {key} FROM {table} WHERE {key} IS NOT NULL GROUP BY {key} HAVING count(*) > 1"
        f" ORDER BY {key} LIMIT {SAMPLE_SIZE + 1}"
    ).fetchall()
    return PrimaryKeyFacts(int(missing), [_plain(row[0]) for row in duplicated])


def required_fields_facts(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> RequiredFieldsFacts:
    table = fully_qualified(connection, schema, spec.name)
    key = quote_ident(spec.primary_key_column.name)
    missing: dict[str, int] = {}
    samples: dict[str, list[object]] = {}
    for column in spec.columns:
        if not column.required:
            continue
        name = quote_ident(column.name)
        (count,) = connection.execute(f"SELECT count(*) FROM {table} WHERE {name} IS NULL AND {LIVE}").fetchone()  # type: ignore[misc]
        if count:
            missing[column.name] = int(count)
            samples[column.name] = [
                _plain(row[0])
                for row in connection.execute(
                    f"SELECT {key} FROM {table} WHERE {name} IS NULL AND {LIVE} ORDER BY {key} LIMIT {SAMPLE_SIZE}"
                ).fetchall()
            ]
    return RequiredFieldsFacts(missing, samples)


def live_rows(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> int:
    (rows,) = connection.execute(
        f"SELECT count(*) FROM {fully_qualified(connection, schema, spec.name)} WHERE {LIVE}"
    ).fetchone()  # type: ignore[misc]
    return int(rows)


def synced_table_facts(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> SyncedTableFacts:
    """Everything a synced table's own checks need."""
    return SyncedTableFacts(
        primary_key_facts(connection, schema, spec),
        required_fields_facts(connection, schema, spec),
        live_rows(connection, schema, spec),
    )


def synced_table_facts_in_file(warehouse: WarehouseFile, schema: str, spec: ResourceSpec) -> SyncedTableFacts:
    """``synced_table_facts`` as one call a lean child process can make."""
    # Counts and a GROUP BY on the key, which spills to disk past the limit: all streaming.
    with warehouse.open() as connection:
        return streamed(connection, lambda: synced_table_facts(connection, schema, spec))


def reference_facts(
    connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec, column: Column, member: Column | None
) -> ReferenceFacts:
    """The references of ``spec``'s live rows through ``column`` (or its list's ``member``)
    that find no live row of the resource they refer to; a null is no reference."""
    reference = (member or column).references
    assert reference is not None
    referenced = RESOURCES_BY_NAME[reference.resource]
    for needed in (spec, referenced):
        if not table_exists(connection, schema, needed.name):
            return ReferenceFacts(missing_table=f"{schema}.{needed.name}")
    source = fully_qualified(connection, schema, spec.name)
    target = fully_qualified(connection, schema, referenced.name)
    key = quote_ident(spec.primary_key_column.name)
    # Unnested in the SELECT list, not laterally: see NormalizedTable.select for why.
    value = f"unnest(s.{quote_ident(column.name)}).{quote_ident(member.name)}" if member else f"s.{quote_ident(column.name)}"
    # The scan streams; the aggregates below get the full limit (all dangling, a million
    # contacts need more than the streaming limit) and group rather than count DISTINCT,
    # since a grouping spills to disk past the limit and a DISTINCT count does not.
    streamed(
        connection,
        lambda: connection.execute(
            "CREATE OR REPLACE TEMP TABLE dangling AS"
            f" SELECT u.key, u.value FROM (SELECT s.{key} AS key, {value} AS value FROM {source} AS s WHERE s.{LIVE}) AS u"
            f" WHERE u.value IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {target} AS r"
            f" WHERE r.{quote_ident(referenced.primary_key_column.name)} = u.value AND r.{LIVE})"
        ),
    )
    try:
        (dangling,) = connection.execute("SELECT count(*) FROM dangling").fetchone()  # type: ignore[misc]
        (rows,) = connection.execute("SELECT count(*) FROM (SELECT key FROM dangling GROUP BY key)").fetchone()  # type: ignore[misc]
        keys = connection.execute(f"SELECT DISTINCT key FROM dangling ORDER BY key LIMIT {SAMPLE_SIZE + 1}").fetchall()
        values = connection.execute(
            f"SELECT DISTINCT value FROM dangling ORDER BY CAST(value AS VARCHAR) NULLS LAST LIMIT {SAMPLE_SIZE + 1}"
        ).fetchall()
    finally:
        connection.execute("DROP TABLE dangling")
    return ReferenceFacts(
        dangling=int(dangling),
        rows=int(rows),
        keys=[_plain(row[0]) for row in keys],
        values=[_plain(row[0]) for row in values],
    )


def all_reference_facts(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> dict[str, ReferenceFacts]:
    """Every reference check's facts for ``spec``, by check name."""
    return {(member or column).check_name: reference_facts(connection, schema, spec, column, member) for column, member in spec.references()}


def all_reference_facts_in_file(warehouse: WarehouseFile, schema: str, spec: ResourceSpec) -> dict[str, ReferenceFacts]:
    """``all_reference_facts`` as one call a lean child process can make."""
    # Anti joins and small samples: all streaming.
    with warehouse.open() as connection:
        return streamed(connection, lambda: all_reference_facts(connection, schema, spec))


def _plain(value: object) -> object:
    return value if isinstance(value, (int, str)) or value is None else str(value)
