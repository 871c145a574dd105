"""Tables an analyst can join, built in DuckDB from the synced tables.

Each is one SQL query over the live rows of the tables it reads, rebuilt whole in the run's
transaction whenever one of them changes (or its query does). Most are generated from the catalog: one per
list column declared with a ``NestedTable`` (contact_tags, contact_field_values,
course_modules); ``contact_profiles`` is declared here. DuckDB only (no Dagster), so a build
runs in a lean worker.

A deployment may sync only some resources (``normalized_tables``). A table is left out with
the resource whose rows it follows (contact_tags, contact_field_values and contact_profiles
with contacts, course_modules with course_resources); it is built without any other it reads:
a link table keeps the names its parent's lists hold instead of the referenced rows' current
ones, and contact_profiles' lists from a left-out resource are empty (tag_names then come
from the contacts' own lists, course_ids without enrollments and community_ids without
memberships are ``[]``).
"""

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import duckdb

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, Column, ResourceSpec, holds_personal_data
from mkt_assets.warehouse.changes import change_tokens
from mkt_assets.warehouse.connection import transaction
from mkt_assets.warehouse.diagnostics import preview_markdown
from mkt_assets.warehouse.ownership import BUILT_STAMP, OwnedTable, built_table, refuse_foreign
from mkt_assets.warehouse.sql_names import fully_qualified, made_table, quote_ident, quote_literal

LIVE = "_deleted_at IS NULL"
# The check that a table has exactly the rows it should (see ``expected_rows``).
MATCHES_PARENT_CHECK = "matches_nested_lists"


@dataclass(frozen=True)
class NormalizedTable:
    name: str
    description: str
    # The synced tables it reads; the first is the one whose rows it follows.
    reads: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (name, DuckDB type)
    not_null: tuple[str, ...]
    # SELECT over {contacts}, {tags}, ...: placeholders for the fully qualified table names.
    # Lists are unnested in a SELECT list, never laterally (``FROM t, unnest(t.list)``):
    # DuckDB runs a lateral unnest as a dependent join that copies every list to a temporary
    # buffer first, which made contact_field_values take 17 s at a million contacts, not 2 s.
    select: str
    # How many rows it must have (same placeholders), and the check that says so.
    expected_rows: str
    row_check: str = MATCHES_PARENT_CHECK
    row_check_description: str = ""
    # The column naming the row of ``reads[0]`` each row comes from: a refresh of some of those
    # rows replaces theirs alone (see ``update_in_place``). Empty: it is rebuilt whole.
    row_key: str = ""

    @property
    def definition(self) -> str:
        """A digest of what the table holds: it changes whenever the query or a column does."""
        text = repr((self.columns, self.select))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def owned(self) -> OwnedTable:
        """How a table of this name is told to be the project's (see ``ownership``)."""
        return built_table(self.name, (name for name, _ in self.columns))


def _left_out(names: Sequence[str]) -> str:
    return f" Built without {', '.join(names)}, left out of the synced resources:"


def nested_table(spec: ResourceSpec, column: Column, within: Collection[str] | None = None) -> NormalizedTable:
    """The table a list column declares (``Column.table``): one row per member of a live row.

    ``within``: the resources synced (None: all); a referenced one left out is not joined."""
    nested = column.table
    assert nested is not None
    key = spec.primary_key_column
    members = {member.api_name: member for member in column.fields}
    referencing = next((member for member in column.fields if member.references is not None), None)
    referenced = RESOURCES_BY_NAME[referencing.references.resource] if referencing and referencing.references else None
    description = nested.description
    if referenced is not None and within is not None and referenced.name not in within:
        description += _left_out([referenced.name]) + f" names as the {spec.name}' lists hold them."
        referenced = None
    columns = [(spec.key_name, key.sql_type)]
    selected = [f"u.{quote_ident(spec.key_name)}"]
    for item in nested.layout or tuple(members):
        if item == "position":
            columns.append(("position", "BIGINT"))
            selected.append("u.position")
            continue
        member = members[item]
        name = f"{nested.prefix}{member.name}"
        value = f"u.member.{quote_ident(member.name)}"
        if referenced is not None and member is not referencing and member.api_name in referenced.known_fields:
            # The referenced row's current value (a renamed tag), else the copy the list holds.
            value = f"coalesce(r.{quote_ident(referenced.column(member.api_name).name)}, {value})"
        columns.append((name, member.sql_type))
        selected.append(f"{value} AS {quote_ident(name)}")
    listed = quote_ident(column.name)
    position = f", generate_subscripts(c.{listed}, 1) AS position" if "position" in nested.layout else ""
    select = (
        f"SELECT {', '.join(selected)} FROM (SELECT c.{quote_ident(key.name)} AS {quote_ident(spec.key_name)},"
        f" unnest(c.{listed}) AS member{position} FROM {{{spec.name}}} AS c WHERE c.{LIVE}) AS u"
    )
    reads: tuple[str, ...] = (spec.name,)
    if referenced is not None and referencing is not None:
        reads += (referenced.name,)
        select += (
            f" LEFT JOIN {{{referenced.name}}} AS r ON r.{quote_ident(referenced.primary_key_column.name)}"
            f" = u.member.{quote_ident(referencing.name)} AND r.{LIVE}"
        )
    not_null_member = f"{nested.prefix}{referencing.name}" if referencing else ("position" if "position" in nested.layout else "")
    return NormalizedTable(
        name=nested.name,
        description=description,
        reads=reads,
        columns=tuple(columns),
        not_null=(spec.key_name, *([not_null_member] if not_null_member else [])),
        select=select,
        expected_rows=f"SELECT coalesce(sum(len({listed})), 0) FROM {{{spec.name}}} WHERE {LIVE}",
        row_check_description=f"One row per entry of the live {spec.name}' {column.name} lists.",
        row_key=spec.key_name,
    )


def contact_profiles(within: Collection[str] | None = None) -> NormalizedTable | None:
    """Where an analyst starts: every live contact with what it carries and belongs to.

    ``within``: the resources synced (None: all). None without contacts; built without any of
    tags, enrollments and memberships left out, whose lists are then what the contacts hold
    (tag names) or empty."""
    has = (set(RESOURCES_BY_NAME) if within is None else set(within)).__contains__
    if not has("contacts"):
        return None
    left_out = [name for name in ("tags", "enrollments", "memberships") if not has(name)]
    # The tags' current names through a map of the (few) live tags, looked up per contact: a
    # grouping of every contact's tags would hold a million lists at once.
    tag_name = "coalesce(names.names[tag.id], tag.name)" if has("tags") else "tag.name"
    select = (
        "SELECT c.id AS contact_id, c.email, c.unsubscribed,"
        " list_sort(list_distinct([tag.id FOR tag IN coalesce(c.tags, []) IF tag.id IS NOT NULL])) AS tag_ids,"
        f" list_sort(list_distinct([{tag_name} FOR tag IN coalesce(c.tags, [])"
        f" IF {tag_name} IS NOT NULL])) AS tag_names,"
        f" {'coalesce(e.course_ids, [])' if has('enrollments') else 'CAST([] AS BIGINT[])'} AS course_ids,"
        f" {'coalesce(m.community_ids, [])' if has('memberships') else 'CAST([] AS BIGINT[])'} AS community_ids"
        " FROM {contacts} AS c"
    )
    if has("tags"):
        select += " CROSS JOIN (SELECT coalesce(map(list(id), list(name)), map()) AS names FROM {tags} WHERE _deleted_at IS NULL) AS names"
    if has("enrollments"):
        select += (
            " LEFT JOIN (SELECT contact_id, list(DISTINCT course_id ORDER BY course_id) AS course_ids FROM {enrollments}"
            " WHERE _deleted_at IS NULL AND course_id IS NOT NULL GROUP BY contact_id) AS e ON e.contact_id = c.id"
        )
    if has("memberships"):
        select += (
            " LEFT JOIN (SELECT contact_id, list(DISTINCT community_id ORDER BY community_id) AS community_ids"
            " FROM {memberships} WHERE _deleted_at IS NULL AND community_id IS NOT NULL GROUP BY contact_id) AS m"
            " ON m.contact_id = c.id"
        )
    select += " WHERE c._deleted_at IS NULL"
    description = (
        "One row per live contact: its email and subscription, the ids and current names of its"
        " tags, the courses it is enrolled in and the communities it is a member of (each list"
        " distinct and ascending; empty, not null, when there is none)."
    )
    emptied = {"tags": "tag_names as the contacts' lists hold them", "enrollments": "course_ids always empty",
               "memberships": "community_ids always empty"}  # fmt: skip
    if left_out:
        description += _left_out(left_out) + " " + ", ".join(emptied[name] for name in left_out) + "."
    return NormalizedTable(
        name="contact_profiles",
        description=description,
        reads=("contacts", *(name for name in ("tags", "enrollments", "memberships") if has(name))),
        columns=(
            ("contact_id", "BIGINT"),
            ("email", "VARCHAR"),
            ("unsubscribed", "BOOLEAN"),
            ("tag_ids", "BIGINT[]"),
            ("tag_names", "VARCHAR[]"),
            ("course_ids", "BIGINT[]"),
            ("community_ids", "BIGINT[]"),
        ),
        not_null=("contact_id",),
        select=select,
        expected_rows="SELECT count(*) FROM {contacts} WHERE _deleted_at IS NULL",
        row_check="one_row_per_live_contact",
        row_check_description="One row per live contact.",
        row_key="contact_id",
    )


def normalized_tables(resources: Sequence[ResourceSpec] = RESOURCES) -> tuple[NormalizedTable, ...]:
    """The normalized tables a deployment syncing ``resources`` has (see the module's text)."""
    within = {spec.name for spec in resources}
    profiles = contact_profiles(within)
    return (
        *(
            nested_table(spec, column, within)
            for spec in RESOURCES
            if spec.name in within
            for column in spec.columns
            if column.table is not None
        ),
        *([profiles] if profiles is not None else []),
    )


NORMALIZED_TABLES: tuple[NormalizedTable, ...] = normalized_tables()


@dataclass(frozen=True)
class BuildResult:
    row_count: int
    expected_rows: int  # what the table's expected_rows query counts
    null_keys: dict[str, int]
    preview: str
    # False: kept as it was, since nothing it reads changed since it was built and its definition is the same.
    rebuilt: bool = True
    # Not rebuilt but updated in place: the rows of some rows of the table it follows replaced
    # (a refresh, see ``update_in_place``), and how many went and came.
    updated_in_place: bool = False
    rows_removed: int = 0
    rows_added: int = 0


def _built_from(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> str:
    """How the table's comment ends: the definition it is built from and the state (``changes``)
    of each table it reads, ``[mkt_assets definition 0123abcd0123abcd, read contacts@..., tags@...]``."""
    tokens = change_tokens(connection, schema, table.reads)
    return f"{BUILT_STAMP}{table.definition}, read {', '.join(f'{name}@{tokens[name]}' for name in table.reads)}]"


def build_in_transaction(
    connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable, *, foreign_refused: bool = False
) -> BuildResult:
    """Rebuild ``table`` from the synced tables, inside the caller's transaction.
    ``foreign_refused``: the caller has already refused, in this transaction, a table of that
    name the project did not make."""
    names = {parent: fully_qualified(connection, schema, parent) for parent in table.reads}
    target = fully_qualified(connection, schema, table.name)
    if not foreign_refused:
        refuse_foreign(connection, schema, [table.owned])  # CREATE OR REPLACE would drop it
    columns = ", ".join(f"CAST({quote_ident(n)} AS {t}) AS {quote_ident(n)}" for n, t in table.columns)
    # No ORDER BY: sorting millions of rows is what made the build run out of memory.
    connection.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {columns} FROM ({table.select.format(**names)})")
    made_table(connection, schema, table.name)
    comment = f"{table.description} {_built_from(connection, schema, table)}"
    connection.execute(f"COMMENT ON TABLE {target} IS {quote_literal(comment)}")
    return build_facts(connection, schema, table)


def update_in_place(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable, keys: str) -> BuildResult:
    """Replace, inside the caller's transaction, the rows of ``table`` that come from the rows of
    the table it follows (``reads[0]``) whose keys the temporary table ``keys`` holds (a column
    ``key``): theirs are deleted, and its query is run over those rows alone and inserted.

    It costs what those rows hold, not what the tables do, and makes what a rebuild would, given
    that the table was current (``is_current``) before those rows, and nothing else it reads,
    changed: each row of it comes from one row of the table it follows, joined with what the
    other tables hold of that row (rows naming it by key, read for those keys alone) or of
    everything (the tags' names, read whole: they are few)."""
    if not table.row_key:
        raise ValueError(f"{table.name} names no row of {table.reads[0]}: it can only be rebuilt whole")
    follows = RESOURCES_BY_NAME[table.reads[0]]
    chosen = f"IN (SELECT key FROM {quote_ident(keys)})"
    names = {}
    for name in table.reads:
        source = fully_qualified(connection, schema, name)
        if name == follows.name:
            source = f"(SELECT * FROM {source} WHERE {quote_ident(follows.primary_key_column.name)} {chosen})"
        else:
            naming = [column for column, member in RESOURCES_BY_NAME[name].references() if member is None and column.references.resource == follows.name]  # type: ignore[union-attr]
            if naming:
                source = f"(SELECT * FROM {source} WHERE {' OR '.join(f'{quote_ident(column.name)} {chosen}' for column in naming)})"
        names[name] = source
    target = fully_qualified(connection, schema, table.name)
    refuse_foreign(connection, schema, [table.owned])
    (removed,) = connection.execute(f"DELETE FROM {target} WHERE {quote_ident(table.row_key)} {chosen}").fetchone()  # type: ignore[misc]
    listed = ", ".join(quote_ident(n) for n, _ in table.columns)
    columns = ", ".join(f"CAST({quote_ident(n)} AS {t}) AS {quote_ident(n)}" for n, t in table.columns)
    (added,) = connection.execute(
        f"INSERT INTO {target} ({listed}) SELECT {columns} FROM ({table.select.format(**names)})"
    ).fetchone()  # type: ignore[misc]
    # Now what a rebuild over the rows its reads hold now would make: said so, as a rebuild says.
    connection.execute(f"COMMENT ON TABLE {target} IS {quote_literal(f'{table.description} {_built_from(connection, schema, table)}')}")
    built = build_facts(connection, schema, table, rebuilt=False)
    return replace(built, updated_in_place=True, rows_removed=int(removed), rows_added=int(added))


def is_current(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> bool:
    """``table`` exists, built from the definition it has now over the rows its reads hold now:
    none of them changed since, in this run or any other (a run that left it out, say). A
    table whose comment records no reads (built by an older version) is not."""
    row = connection.execute(
        "SELECT comment FROM duckdb_tables() WHERE database_name = current_database()"
        " AND lower(schema_name) = lower(?) AND lower(table_name) = lower(?)",
        [schema, table.name],
    ).fetchone()
    return row is not None and (row[0] or "").endswith(_built_from(connection, schema, table))


def build_facts(
    connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable, *, rebuilt: bool = True
) -> BuildResult:
    """What the checks of ``table`` need, as it stands."""
    names = {parent: fully_qualified(connection, schema, parent) for parent in table.reads}
    target = fully_qualified(connection, schema, table.name)
    # One statement: each costs a millisecond or so however small the table.
    nulls = "".join(f", count(*) FILTER (WHERE {quote_ident(column)} IS NULL)" for column in table.not_null)
    row_count, expected, *null_counts = connection.execute(
        f"SELECT count(*), ({table.expected_rows.format(**names)}){nulls} FROM {target}"
    ).fetchone()  # type: ignore[misc]
    null_keys = dict(zip(table.not_null, null_counts, strict=True))
    personal = any(holds_personal_data(RESOURCES_BY_NAME[name]) for name in table.reads)
    preview = "" if personal else preview_markdown(connection, schema, table.name)
    return BuildResult(row_count, int(expected), null_keys, preview, rebuilt)


def build_table(connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable) -> BuildResult:
    """Rebuild ``table`` from the synced tables, in a transaction of its own."""
    with transaction(connection, f"the build of {schema}.{table.name}"):
        return build_in_transaction(connection, schema, table)


