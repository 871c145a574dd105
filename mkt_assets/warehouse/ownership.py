"""Which tables in the target schema this project made, and so may alter.

The schema is shared with whoever else writes the file. A table bearing one of the project's
names that the project did not make (an analyst's ``marketing.contacts(id, note)``) is
refused by name, before anything is fetched and again in the write's transaction, and
never altered: the merge would otherwise add its columns to it and mark its rows deleted,
a build would replace it. Tables of other names are left alone.

A table is recognised by what every version of the project gave it, so that files made
before this check are accepted as they are:

- a synced table has the catalog's key column, ``_extra`` and ``_synced_at``, the project's
  bookkeeping columns since its first version (``_deleted_at`` came later, and is added to
  an older table like any column the catalog gains);
- ``<name>_history`` has the key column and the history's ``_valid_from`` and ``_valid_to``;
- a normalized table carries the comment its build stamps (``[mkt_assets definition ...]``),
  or has exactly the columns the project builds it with (one built before the stamp, or whose
  comment a user changed). It is rebuilt whole from the synced tables, so an older build that
  matches neither loses nothing by being dropped.

A bookkeeping table of the project's own (named ``_mkt...``) is one more ``OwnedTable`` in
``BOOKKEEPING_TABLES``.

DuckDB only, nothing of HTTP or Dagster: it runs in the lean DuckDB worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import duckdb

from mkt_assets.core.catalog import EXTRA_COLUMN, SYNCED_AT_COLUMN, ResourceSpec
from mkt_assets.core.errors import DATABASE_SETTING, ForeignTableError
from mkt_assets.warehouse.changes import CHANGES_COLUMNS, CHANGES_TABLE
from mkt_assets.warehouse.history import VALID_FROM_COLUMN, VALID_TO_COLUMN, history_table
from mkt_assets.warehouse.reads import READS_COLUMNS, READS_TABLE

# What a normalized table's comment holds once the project built it (see normalized_tables).
BUILT_STAMP = "[mkt_assets definition "


@dataclass(frozen=True)
class OwnedTable:
    """A name the project creates in the target schema, and how its table is recognised."""

    name: str
    # Columns the project gave it in every version: a table lacking one is not the project's.
    columns: frozenset[str]
    # Set for a table whose build stamps its comment with this: a table without the stamp is
    # the project's only when its columns are exactly ``columns``.
    stamp: str | None = None

    def lacks(self, columns: frozenset[str], comment: str | None) -> str | None:
        """What shows a table named like this one was not made by the project (None: it was)."""
        if self.stamp is not None:
            # Exactly the columns the project builds: built before the stamp, or commented by a user.
            if (comment and self.stamp in comment) or columns == self.columns:
                return None
            return (
                f"the comment mkt_assets stamps on the tables it builds, {self.stamp}...], and the columns"
                f" it builds it with, {', '.join(sorted(self.columns))}"
            )
        missing = sorted(self.columns - columns)
        if missing:
            return f"the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        return None


def synced_table(spec: ResourceSpec, name: str | None = None) -> OwnedTable:
    columns = {spec.primary_key_column.name, EXTRA_COLUMN.name, SYNCED_AT_COLUMN.name}
    return OwnedTable(name or spec.name, frozenset(columns))


def versions_table(spec: ResourceSpec, name: str | None = None) -> OwnedTable:
    columns = {spec.primary_key_column.name, VALID_FROM_COLUMN.name, VALID_TO_COLUMN.name}
    return OwnedTable(history_table(name or spec.name), frozenset(columns))


def built_table(name: str, columns: Iterable[str]) -> OwnedTable:
    return OwnedTable(name, frozenset(columns), stamp=BUILT_STAMP)


# The project's own bookkeeping tables (their names start with _mkt): one entry each.
BOOKKEEPING_TABLES: tuple[OwnedTable, ...] = (OwnedTable(READS_TABLE, READS_COLUMNS), OwnedTable(CHANGES_TABLE, CHANGES_COLUMNS))


def foreign_tables(connection: duckdb.DuckDBPyConnection, schema: str, owned: Iterable[OwnedTable]) -> list[str]:
    """``schema.name exists but ...`` for each of ``owned`` present in ``schema`` without the
    marks of the project. DuckDB's names ignore case: ``Contacts`` is ``contacts`` to it, and a
    schema made as ``Marketing`` is the ``marketing`` asked for."""
    wanted = {table.name.lower(): table for table in owned}
    if not wanted:
        return []
    # Three small queries: one joining duckdb_tables() to duckdb_columns() took 10 ms, these 2.
    where = "database_name = current_database() AND lower(schema_name) = $schema AND lower({name}) IN $names"
    parameters = {"schema": schema.lower(), "names": list(wanted)}
    rows: list[tuple[str, str, str | None, tuple[str, ...]]] = [
        (name, "view", None, ())
        for (name,) in connection.execute(f"SELECT view_name FROM duckdb_views() WHERE {where.format(name='view_name')}", parameters).fetchall()
    ]
    tables = connection.execute(
        f"SELECT table_name, comment FROM duckdb_tables() WHERE {where.format(name='table_name')}", parameters
    ).fetchall()
    if tables:
        columns: dict[str, set[str]] = {}
        for name, column in connection.execute(
            f"SELECT table_name, column_name FROM duckdb_columns() WHERE {where.format(name='table_name')}", parameters
        ).fetchall():
            columns.setdefault(name, set()).add(column)
        rows += [(name, "table", comment, tuple(columns.get(name, ()))) for name, comment in tables]
    problems = []
    for name, kind, comment, present in sorted(rows, key=lambda row: row[0]):
        table = wanted[name.lower()]
        lacks = "it is a view" if kind == "view" else table.lacks(frozenset(present), comment)
        if lacks is not None:
            because = lacks if kind == "view" else f"it lacks {lacks}"
            problems.append(f"{schema}.{name} exists but was not created by mkt_assets ({because})")
    return problems


def refuse_foreign(
    connection: duckdb.DuckDBPyConnection, schema: str, owned: Iterable[OwnedTable], database: str = "the DuckDB file"
) -> None:
    """Raise ``ForeignTableError`` naming every table of ``owned`` the project did not make."""
    problems = foreign_tables(connection, schema, owned)
    if problems:
        raise ForeignTableError(
            f"{database}: {'; '.join(problems)}. mkt_assets never alters a table it did not create:"
            f" rename {'it' if len(problems) == 1 else 'them'} (ALTER TABLE or ALTER VIEW ... RENAME TO ...), or set"
            f" {DATABASE_SETTING} to another DuckDB file"
        )
