"""Tables an analyst can join, built in DuckDB from the synced tables' nested lists.

Declared once as data, like the catalog: each is one SQL query over the live rows of
the tables it reads, rebuilt whole (in one transaction) after those tables sync. This
module is DuckDB only (no Dagster), so a build runs in a lean child process; the assets
are in ``normalized``.
"""

from dataclasses import dataclass

import duckdb

from mkt_assets.warehouse import WarehouseFile, fully_qualified, preview_markdown, quote_ident, streamed, transaction


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
    # Lists are unnested in a SELECT list, never laterally (``FROM t, unnest(t.list)``):
    # DuckDB runs a lateral unnest as a dependent join that copies every list to a temporary
    # buffer first, which made contact_field_values take 17 s at a million contacts, not 2 s.
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
            "SELECT u.contact_id, u.tag.id AS tag_id, coalesce(t.name, u.tag.name) AS tag_name"
            " FROM (SELECT c.id AS contact_id, unnest(c.tags) AS tag FROM {contacts} AS c"
            " WHERE c._deleted_at IS NULL) AS u"
            " LEFT JOIN {tags} AS t ON t.id = u.tag.id AND t._deleted_at IS NULL"
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
            "SELECT u.contact_id, u.field.slug AS slug,"
            " coalesce(f.field_name, u.field.field_name) AS field_name, u.field.value AS value"
            " FROM (SELECT c.id AS contact_id, unnest(c.fields) AS field FROM {contacts} AS c"
            " WHERE c._deleted_at IS NULL) AS u"
            " LEFT JOIN {contact_fields} AS f ON f.slug = u.field.slug AND f._deleted_at IS NULL"
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
            "SELECT m.course_id, m.module.id AS module_id, m.position, m.module.name AS module_name"
            " FROM (SELECT c.id AS course_id, unnest(c.modules) AS module,"
            " generate_subscripts(c.modules, 1) AS position"
            " FROM {course_resources} AS c WHERE c._deleted_at IS NULL) AS m"
        ),
    ),
)

@dataclass(frozen=True)
class BuildResult:
    row_count: int
    expected_rows: int  # the length of the nested lists of the live parent rows
    null_keys: dict[str, int]
    preview: str


def build_in_transaction(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> BuildResult:
    """Rebuild ``table`` from the synced tables, inside the caller's transaction."""
    names = {parent: fully_qualified(connection, schema, parent) for parent in table.reads}
    target = fully_qualified(connection, schema, table.name)
    columns = ", ".join(f"CAST({quote_ident(n)} AS {t}) AS {quote_ident(n)}" for n, t in table.columns)
    # No ORDER BY: sorting millions of rows is what made the build run out of memory.
    connection.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {columns} FROM ({table.select.format(**names)})")
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


def build_table(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> BuildResult:
    """Rebuild ``table`` from the synced tables, in a transaction of its own."""
    with transaction(connection, f"the build of {schema}.{table.name}"):
        return build_in_transaction(connection, schema, table)


def build_table_in_file(warehouse: WarehouseFile, schema: str, table: NormalizedTable) -> BuildResult:
    """Open the file and rebuild ``table``: one call a lean worker process can make.

    Every statement of a build streams (an unnest, a join to a small table, counts)."""
    with warehouse.open() as connection:
        return streamed(connection, lambda: build_table(connection, schema, table))
