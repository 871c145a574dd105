"""Tables an analyst can join, built in DuckDB from the synced tables' nested lists.

Declared once as data, like the catalog: each is one SQL query over the live rows of
the tables it reads, rebuilt whole (in one transaction) after those tables sync, and
downstream of them in the lineage. No second fetch from the API.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import duckdb

from mkt_assets.resource import WarehouseResource
from mkt_assets.warehouse import fully_qualified, preview_markdown, quote_ident

NORMALIZED_GROUP = "marketing_normalized"


@dataclass(frozen=True)
class NormalizedTable:
    name: str
    description: str
    # The synced tables it reads; the first holds the nested list it unnests.
    reads: tuple[str, ...]
    list_column: str
    columns: tuple[tuple[str, str], ...]  # (name, DuckDB type)
    not_null: tuple[str, ...]
    # SELECT over {contacts}, {tags}, ...: placeholders for the fully qualified table names.
    select: str


NORMALIZED_TABLES: tuple[NormalizedTable, ...] = (
    NormalizedTable(
        name="contact_tags",
        description="One row per tag on a live contact, with the tag's current name.",
        reads=("contacts", "tags"),
        list_column="tags",
        columns=(("contact_id", "BIGINT"), ("tag_id", "BIGINT"), ("tag_name", "VARCHAR")),
        not_null=("contact_id", "tag_id"),
        select=(
            "SELECT c.id AS contact_id, u.tag.id AS tag_id, coalesce(t.name, u.tag.name) AS tag_name"
            " FROM {contacts} AS c, unnest(c.tags) AS u(tag)"
            " LEFT JOIN {tags} AS t ON t.id = u.tag.id AND t._deleted_at IS NULL"
            " WHERE c._deleted_at IS NULL"
        ),
    ),
    NormalizedTable(
        name="contact_field_values",
        description="One row per custom field value on a live contact, with the field's current name.",
        reads=("contacts", "contact_fields"),
        list_column="fields",
        columns=(("contact_id", "BIGINT"), ("slug", "VARCHAR"), ("field_name", "VARCHAR"), ("value", "VARCHAR")),
        not_null=("contact_id", "slug"),
        select=(
            "SELECT c.id AS contact_id, u.field.slug AS slug,"
            " coalesce(f.field_name, u.field.field_name) AS field_name, u.field.value AS value"
            " FROM {contacts} AS c, unnest(c.fields) AS u(field)"
            " LEFT JOIN {contact_fields} AS f ON f.slug = u.field.slug AND f._deleted_at IS NULL"
            " WHERE c._deleted_at IS NULL"
        ),
    ),
    NormalizedTable(
        name="course_modules",
        description="One row per module of a live course, in course order (module ids may be null).",
        reads=("course_resources",),
        list_column="modules",
        columns=(("course_id", "BIGINT"), ("module_id", "BIGINT"), ("position", "BIGINT"), ("module_name", "VARCHAR")),
        not_null=("course_id", "position"),
        select=(
            "SELECT c.id AS course_id, m.module.id AS module_id, m.position, m.module.name AS module_name"
            " FROM {course_resources} AS c,"
            " (SELECT unnest(c.modules) AS module, generate_subscripts(c.modules, 1) AS position) AS m"
            " WHERE c._deleted_at IS NULL"
        ),
    ),
)

MATCHES_PARENT_CHECK = "matches_nested_lists"
NOT_NULL_CHECK = "keys_present"


@dataclass(frozen=True)
class BuildResult:
    row_count: int
    expected_rows: int  # the length of the nested lists of the live parent rows
    null_keys: dict[str, int]
    preview: str


def build_table(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> BuildResult:
    """Rebuild ``table`` from the synced tables, in one transaction."""
    names = {parent: fully_qualified(connection, schema, parent) for parent in table.reads}
    target = fully_qualified(connection, schema, table.name)
    columns = ", ".join(f"CAST({quote_ident(n)} AS {t}) AS {quote_ident(n)}" for n, t in table.columns)
    connection.execute("BEGIN TRANSACTION")
    try:
        # No ORDER BY: sorting millions of rows is what made the build run out of memory.
        connection.execute(
            f"CREATE OR REPLACE TABLE {target} AS SELECT {columns} FROM ({table.select.format(**names)})"
        )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    parent = names[table.reads[0]]
    (row_count,) = connection.execute(f"SELECT count(*) FROM {target}").fetchone()  # type: ignore[misc]
    (expected,) = connection.execute(
        f"SELECT coalesce(sum(len({quote_ident(table.list_column)})), 0) FROM {parent} WHERE _deleted_at IS NULL"
    ).fetchone()  # type: ignore[misc]
    null_keys = {}
    for column in table.not_null:
        (count,) = connection.execute(
            f"SELECT count(*) FROM {target} WHERE {quote_ident(column)} IS NULL"
        ).fetchone()  # type: ignore[misc]
        null_keys[column] = count
    return BuildResult(row_count, int(expected), null_keys, preview_markdown(connection, schema, table.name))


def check_results(table: NormalizedTable, result: BuildResult, schema: str) -> list[dg.AssetCheckResult]:
    matches = result.row_count == result.expected_rows
    missing = {column: count for column, count in result.null_keys.items() if count}
    return [
        dg.AssetCheckResult(
            check_name=MATCHES_PARENT_CHECK,
            passed=matches,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if matches
            else (
                f"{schema}.{table.name} has {result.row_count} rows but the live {table.reads[0]}"
                f" carry {result.expected_rows} {table.list_column}"
            ),
            metadata={"row_count": result.row_count, "nested_list_entries": result.expected_rows},
        ),
        dg.AssetCheckResult(
            check_name=NOT_NULL_CHECK,
            passed=not missing,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if not missing
            else f"{schema}.{table.name}: " + "; ".join(f"{n} rows without {c}" for c, n in missing.items()),
            metadata={"null_keys": dg.MetadataValue.json(result.null_keys)},
        ),
    ]


def build_normalized_asset(
    table: NormalizedTable, schema: str, owners: list[str], freshness_policy: dg.FreshnessPolicy
) -> dg.AssetsDefinition:
    key = dg.AssetKey([schema, table.name])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey([schema, parent]) for parent in table.reads],
        group_name=NORMALIZED_GROUP,
        description=table.description,
        kinds={"duckdb", "sql"},
        owners=owners,
        freshness_policy=freshness_policy,
        check_specs=[
            dg.AssetCheckSpec(
                MATCHES_PARENT_CHECK,
                asset=key,
                description=f"One row per entry of the live {table.reads[0]}' {table.list_column} lists.",
            ),
            dg.AssetCheckSpec(NOT_NULL_CHECK, asset=key, description=f"No row lacks {', '.join(table.not_null)}."),
        ],
        metadata={
            "dagster/table_name": f"{schema}.{table.name}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(name, column_type) for name, column_type in table.columns]
            ),
        },
    )
    def normalized(warehouse: WarehouseResource) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        with warehouse.connection() as connection:
            result = build_table(connection, warehouse.schema_name, table)
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.row_count,
                "preview": dg.MetadataValue.md(result.preview),
            }
        )
        yield from check_results(table, result, warehouse.schema_name)

    return normalized
