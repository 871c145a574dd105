"""What the asset checks need to know about the tables, queried in DuckDB only.

No Dagster here, so a step can ask for these facts from a lean child process (see
``lean_process``) and keep DuckDB's working memory out of its own; ``checks`` turns them
into check results. Every query returns counts and short samples, never whole columns.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import duckdb

from mkt_assets.core.catalog import RESOURCES_BY_NAME, Column, ResourceSpec
from mkt_assets.warehouse.connection import streamed
from mkt_assets.warehouse.history import VALID_FROM_COLUMN, VALID_TO_COLUMN, history_table
from mkt_assets.warehouse.sql_names import fully_qualified, quote_ident, table_exists

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


def all_reference_facts(
    connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec, within: Collection[str] | None = None
) -> dict[str, ReferenceFacts]:
    """Every reference check's facts for ``spec``, by check name (only the references to
    ``within``, the resources synced, when given)."""
    return {
        (member or column).check_name: reference_facts(connection, schema, spec, column, member)
        for column, member in spec.references(within)
    }


@dataclass(frozen=True)
class HistoryFacts:
    """How ``<table>_history`` stands against the table it keeps the versions of."""

    missing_table: str | None = None
    versions: int = 0
    # Live keys with no open version, or with more than one.
    live_without_one_open: int = 0
    # Open versions of keys that are not live (marked deleted, or gone from the table).
    open_not_live: int = 0
    # Versions that end before they begin, or after the next version of their key begins.
    overlapping: int = 0
    keys: list[object] = field(default_factory=list)  # the keys at fault, up to SAMPLE_SIZE + 1


def history_facts(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> HistoryFacts:
    """Every live key has exactly one open version, nothing else has one, and no two
    versions of a key overlap."""
    name = history_table(spec.name)
    if not table_exists(connection, schema, name):
        return HistoryFacts(missing_table=f"{schema}.{name}")
    history = fully_qualified(connection, schema, name)
    table = fully_qualified(connection, schema, spec.name)
    key = quote_ident(spec.primary_key_column.name)
    valid_from, valid_to = quote_ident(VALID_FROM_COLUMN.name), quote_ident(VALID_TO_COLUMN.name)
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE open_versions AS SELECT {key}, count(*) AS n FROM {history}"
        f" WHERE {valid_to} IS NULL GROUP BY {key}"
    )
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE history_faults AS"
        f" SELECT t.{key} AS key, 'live' AS fault FROM {table} AS t LEFT JOIN open_versions AS o ON o.{key} = t.{key}"
        f" WHERE t.{LIVE} AND coalesce(o.n, 0) <> 1"
        f" UNION ALL SELECT o.{key}, 'open' FROM open_versions AS o"
        f" WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE t.{key} = o.{key} AND t.{LIVE})"
        f" UNION ALL SELECT {key}, 'overlap' FROM (SELECT {key}, {valid_from} AS since, {valid_to} AS until,"
        f" lead({valid_from}) OVER (PARTITION BY {key} ORDER BY {valid_from}, {valid_to} NULLS LAST) AS next FROM {history})"
        " WHERE until < since OR (next IS NOT NULL AND (until IS NULL OR until > next))"
    )
    try:
        (versions,) = connection.execute(f"SELECT count(*) FROM {history}").fetchone()  # type: ignore[misc]
        counts = dict(connection.execute("SELECT fault, count(*) FROM history_faults GROUP BY fault").fetchall())
        keys = connection.execute(f"SELECT DISTINCT key FROM history_faults ORDER BY key LIMIT {SAMPLE_SIZE + 1}").fetchall()
    finally:
        connection.execute("DROP TABLE open_versions")
        connection.execute("DROP TABLE history_faults")
    return HistoryFacts(
        versions=int(versions),
        live_without_one_open=int(counts.get("live", 0)),
        open_not_live=int(counts.get("open", 0)),
        overlapping=int(counts.get("overlap", 0)),
        keys=[_plain(row[0]) for row in keys],
    )


def _plain(value: object) -> object:
    return value if isinstance(value, (int, str)) or value is None else str(value)
