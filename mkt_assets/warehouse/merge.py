"""The merge of a resource's staged read into its table: new, changed and gone rows, the
history from the same change detection, the guard against a mass deletion, and what the
run's checks read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

from mkt_assets.core.catalog import BOOKKEEPING_COLUMNS, ResourceSpec
from mkt_assets.core.errors import MassDeletion, MassDeletionError, StagingError
from mkt_assets.staging.pages import StagedBatch
from mkt_assets.warehouse.changes import record_change
from mkt_assets.warehouse.connection import attached_file
from mkt_assets.warehouse.defaults import DEFAULT_MAX_DROP
from mkt_assets.warehouse.diagnostics import duplicated_field
from mkt_assets.warehouse.history import VALID_TO_COLUMN, Versions, ensure_history, history_table, record_versions
from mkt_assets.warehouse.ownership import refuse_foreign, synced_table, versions_table
from mkt_assets.warehouse.reads import later_reads, record_read
from mkt_assets.warehouse.sql_names import fully_qualified, quote_ident, table_exists
from mkt_assets.warehouse.staged_sql import ensure_table, known_fields_patch, staged_select_sql

DELETIONS_MODES = ("mark", "delete")

# How many rows a complete read may always mark gone whatever the share DEFAULT_MAX_DROP
# allows: a user deleting 1 of 5 tags is 20%, and must not need to confirm it.
MASS_DELETION_ALLOWANCE = 5


def is_mass_deletion(gone: int, live: int, max_drop: float) -> bool:
    """Whether marking ``gone`` of ``live`` rows gone needs the run's confirmation."""
    return gone > 0 and (gone >= live or gone > max(max_drop * live, MASS_DELETION_ALLOWANCE))


@dataclass(frozen=True)
class MergeResult:
    inserted: int
    updated: int  # includes rows that came back after being marked deleted
    unchanged: int
    deleted: int  # rows this sync marked deleted (or removed, in "delete" mode)
    row_count: int  # live rows: not marked deleted
    total_rows: int  # live rows and rows marked deleted
    # Records dropped because a later record of the same sync had the same key (it won).
    duplicate_keys: int = 0
    # Versions of <table>_history this merge opened and closed (see ``history``).
    versions_opened: int = 0
    versions_closed: int = 0
    # Rows a sync that began after this one had already written (runs overlapped and that one
    # landed first): newer than what this batch read, so left as that sync wrote them.
    newer_kept: int = 0
    # When a complete read of the table began that was committed first although it began after
    # this batch's: the batch is older than what that read saw, so it was not applied at all.
    superseded_by: datetime | None = None

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


def merge_batch(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    batch: StagedBatch,
    *,
    deletions: str = "mark",
    history: bool = True,
    max_drop: float = DEFAULT_MAX_DROP,
    confirm_mass_deletion: bool = False,
    gone: Sequence[int] = (),
    foreign_refused: bool = False,
) -> MergeResult:
    """Merge ``batch`` into ``schema.table`` on the primary key, inside the caller's transaction.

    When the batch is a complete read of the resource, rows it lacks were deleted upstream:
    they get ``_deleted_at`` (or are removed, with ``deletions="delete"``). A partial read
    (an incremental one) says nothing about rows it did not fetch, so it marks nothing; one
    of records read by key (a refresh) marks the keys in ``gone``, which the API answered 404
    for, as a complete read marks those it lacks.
    Unless ``confirm_mass_deletion``, a read that lacks more live rows than ``is_mass_deletion``
    allows raises ``MassDeletionError`` before any is marked: the caller's transaction then
    rolls back what the merge wrote. ``foreign_refused``: the caller has already refused, in
    this transaction, a table or history of that name the project did not make.
    With ``history``, ``<table>_history`` keeps every version, from the same change detection.
    Runs may overlap and land in the other order (see ``reads``): a batch older than a complete
    read already committed is not applied at all (``superseded_by``); otherwise the rows a sync
    that began after this batch's had already written, or read incrementally, are newer than what
    it read, and are left as they are (``newer_kept``). The read is recorded for later batches.

    Staged rows are told apart by a join on the key and a hash of the data columns, which
    keeps the join's memory to a few bytes a row. New rows are bulk-inserted and only changed
    rows go through ``MERGE``: DuckDB's MERGE holds its whole source in memory and inserted a
    million rows five times slower than INSERT (30 s against 6 s).
    """
    if deletions not in DELETIONS_MODES:
        raise ValueError(f"deletions must be one of {DELETIONS_MODES}, got {deletions!r}")
    spec = batch.spec
    target = fully_qualified(connection, schema, table)
    later = later_reads(connection, schema, table, batch.synced_at)
    if later.complete is not None:
        return _superseded(connection, target, later.complete)
    key = quote_ident(spec.primary_key_column.name)
    extra, synced_at, deleted_at = (quote_ident(c.name) for c in BOOKKEEPING_COLUMNS)
    data_columns = [*(quote_ident(c.name) for c in spec.columns), extra]
    written_columns = [*data_columns, synced_at]
    raw = bool(batch.unknown_fields)
    # Unknown fields are kept from the JSON text, so then every chunk is read as JSON.
    typed = dict(batch.typed) if not raw else {}
    json_paths = [str(path) for path in batch.paths if path not in typed]
    parameters: dict[str, object] = {"synced_at": batch.synced_at}
    if json_paths:
        parameters["path"] = json_paths
    if typed:
        parameters["typed"] = [str(path) for path in typed.values()]
    if raw:
        parameters["known"] = known_fields_patch(spec)
    staged = staged_select_sql(
        spec,
        raw=raw,
        deduplicate=not batch.keys_unique,
        json=bool(json_paths),
        parquet=bool(typed),
        longest_line=batch.longest_line,
        unknown_fields=batch.unknown_fields,
    )
    if raw and json_paths:
        problem = duplicated_field(connection, batch, parameters)
        if problem is not None:
            raise StagingError(problem)
    # Checked again here, in the write's transaction: a table made since the run's check is
    # refused as well, and never altered.
    if not foreign_refused:
        refuse_foreign(connection, schema, (synced_table(spec, table), versions_table(spec, table)), attached_file(connection))
    created = not table_exists(connection, schema, table)
    ensure_table(connection, schema, table, spec)
    if history:
        ensure_history(connection, schema, table, spec, batch.synced_at)
    # Typed once, into a temporary table DuckDB spills to disk past its memory limit. Each
    # CREATE TABLE AS answers how many rows it made: no count(*) after it.
    (staged_rows,) = connection.execute(f"CREATE OR REPLACE TEMP TABLE staged AS {staged}", parameters).fetchone()  # type: ignore[misc]
    temporaries = ["staged", "changed", "fresh", "newer"]
    # A read by key (neither complete nor after a key: a refresh) says nothing of other keys,
    # so what concerns them is not even looked at: its cost follows the keys, not the table.
    read_keys = None
    if not batch.complete and batch.after is None:
        connection.execute("CREATE OR REPLACE TEMP TABLE answered_gone AS SELECT unnest($keys::BIGINT[]) AS key", {"keys": list(gone)})
        temporaries.append("answered_gone")
        read_keys = f"(SELECT {key} FROM staged UNION ALL SELECT key FROM answered_gone)"
    # Runs may overlap and land in either order: what a sync that began after this one wrote
    # (changed, inserted, found gone) is newer than what this batch read, and is left alone.
    newer = _newer_rows(
        connection, schema, table, target, key, batch, later.covered_after, read_keys
    )
    not_newer = f" AND s.{key} NOT IN (SELECT {key} FROM newer)" if newer else ""
    # A row marked deleted that the API lists again has changed: it is back. (Two different
    # rows hashing alike, 1 in 2^64 per changed row, would be taken as unchanged.)
    (changed_rows,) = connection.execute(
        f"CREATE OR REPLACE TEMP TABLE changed AS SELECT s.{key} FROM"
        f" (SELECT {key}, hash({', '.join(data_columns)}) AS h FROM staged) AS s JOIN"
        f" (SELECT {key}, hash({', '.join(data_columns)}) AS h, {deleted_at} FROM {target}) AS t"
        f" ON s.{key} = t.{key} WHERE (s.h <> t.h OR t.{deleted_at} IS NOT NULL){not_newer}"
    ).fetchone()  # type: ignore[misc]
    updated = 0
    if changed_rows:
        (updated,) = connection.execute(
            f"MERGE INTO {target} AS t"
            f" USING (SELECT * FROM staged SEMI JOIN changed USING ({key})) AS s ON t.{key} = s.{key}"
            f" WHEN MATCHED THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in written_columns)},"
            f" {deleted_at} = NULL"
        ).fetchone()  # type: ignore[misc]
    # The keys new to the table, once: the insert takes them, and so does the history.
    (fresh_rows,) = connection.execute(
        f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT s.{key} FROM staged AS s ANTI JOIN {target} AS t ON s.{key} = t.{key}"
        + (f" ANTI JOIN newer AS n ON s.{key} = n.{key}" if newer else "")
    ).fetchone()  # type: ignore[misc]
    inserted = 0
    if fresh_rows:
        (inserted,) = connection.execute(
            f"INSERT INTO {target} ({', '.join(written_columns)})"
            f" SELECT {', '.join(f's.{c}' for c in written_columns)} FROM staged AS s SEMI JOIN fresh USING ({key})"
        ).fetchone()  # type: ignore[misc]
    deleted = 0
    holds_rows = {"changed": bool(changed_rows), "fresh": bool(fresh_rows)}
    if batch.complete or gone:
        if batch.complete:
            missing_upstream = f"NOT EXISTS (SELECT 1 FROM staged AS s WHERE s.{key} = t.{key})"
        else:
            if read_keys is None:
                raise ValueError(f"{table}: keys answered gone go with a read by key (neither complete nor after a key)")
            # A key both answered and gone (never, in one read) keeps its answer.
            missing_upstream = f"t.{key} IN (SELECT key FROM answered_gone) AND NOT EXISTS (SELECT 1 FROM staged AS s WHERE s.{key} = t.{key})"
        if newer:
            missing_upstream += f" AND t.{key} NOT IN (SELECT {key} FROM newer)"
        # The live rows the API no longer lists: marked (or removed), and their versions closed.
        (gone_rows,) = connection.execute(
            f"CREATE OR REPLACE TEMP TABLE gone AS SELECT t.{key} FROM {target} AS t"
            f" WHERE t.{deleted_at} IS NULL AND {missing_upstream}"
        ).fetchone()  # type: ignore[misc]
        temporaries.append("gone")
        holds_rows["gone"] = bool(gone_rows)
        # An outage answering an empty list looks like a mass deletion: refused unless confirmed.
        # A 404 to a request naming the row is no such guess (``read_records`` has made sure the
        # API serves rows by key at all), so rows found gone that way are marked as found.
        if gone_rows and batch.complete and not confirm_mass_deletion:
            (live,) = connection.execute(f"SELECT count(*) FROM {target} WHERE {deleted_at} IS NULL").fetchone()  # type: ignore[misc]
            found = MassDeletion(f"{schema}.{table}", int(staged_rows), int(gone_rows), int(live) - int(inserted), deletions)
            if is_mass_deletion(found.gone, found.live, max_drop):
                raise MassDeletionError((found,), max_drop, MASS_DELETION_ALLOWANCE)
        if deletions == "delete":
            (deleted,) = connection.execute(f"DELETE FROM {target} AS t WHERE {missing_upstream}").fetchone()  # type: ignore[misc]
        elif gone_rows:
            (deleted,) = connection.execute(
                f"UPDATE {target} SET {deleted_at} = $synced_at WHERE {key} IN (SELECT {key} FROM gone)",
                {"synced_at": batch.synced_at},
            ).fetchone()  # type: ignore[misc]
    versions = Versions()
    if history:
        versions = record_versions(
            connection,
            schema,
            table,
            spec,
            batch.synced_at,
            opened=[name for name in ("changed", "fresh") if holds_rows[name]],
            closed=[name for name in ("changed", "gone") if holds_rows.get(name)],
        )
    (row_count, total_rows) = connection.execute(
        f"SELECT count(*) FILTER (WHERE {deleted_at} IS NULL), count(*) FROM {target}"
    ).fetchone()  # type: ignore[misc]
    newer_in_batch = 0
    if newer:
        (newer_in_batch,) = connection.execute(f"SELECT count(*) FROM staged SEMI JOIN newer USING ({key})").fetchone()  # type: ignore[misc]
    for temporary in temporaries:
        connection.execute(f"DROP TABLE {temporary}")
    record_read(connection, schema, table, batch.synced_at, complete=batch.complete, after=batch.after)
    if created or inserted or updated or deleted:
        record_change(connection, schema, table)  # what is built from it is rebuilt (see ``changes``)
    return MergeResult(
        inserted=int(inserted),
        updated=int(updated),
        unchanged=int(staged_rows) - int(inserted) - int(updated) - int(newer_in_batch),
        deleted=int(deleted),
        row_count=row_count,
        total_rows=total_rows,
        duplicate_keys=0 if batch.keys_unique else batch.records - int(staged_rows),
        versions_opened=versions.opened,
        versions_closed=versions.closed,
        newer_kept=newer,
    )


def _superseded(connection: duckdb.DuckDBPyConnection, target: str, newer_read: datetime) -> MergeResult:
    """What a batch that a newer complete read superseded leaves: the table as it is."""
    _, _, deleted_at = (quote_ident(c.name) for c in BOOKKEEPING_COLUMNS)
    (row_count, total_rows) = connection.execute(
        f"SELECT count(*) FILTER (WHERE {deleted_at} IS NULL), count(*) FROM {target}"
    ).fetchone()  # type: ignore[misc]
    return MergeResult(0, 0, 0, 0, row_count, total_rows, superseded_by=newer_read)


def _newer_rows(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    target: str,
    key: str,
    batch: StagedBatch,
    covered_after: int | None,
    read_keys: str | None = None,
) -> int:
    """Collect into the temporary table ``newer`` the keys a sync that began after ``batch``'s
    has written: stored rows it inserted, changed or marked deleted, and rows it removed (in
    ``delete`` mode), which only the history remembers, whatever this run keeps; and, stored or
    staged, the keys above ``covered_after``, which newer incremental reads read (see ``reads``:
    one of them may have read a row unchanged, or found it gone). ``read_keys``: a query of the
    keys a read by key asked for, the only ones looked at then. Returns how many there are (0
    unless runs overlapped)."""
    _, synced_at, deleted_at = (quote_ident(c.name) for c in BOOKKEEPING_COLUMNS)
    among = f" AND t.{key} IN {read_keys}" if read_keys else ""
    removed = ""
    if table_exists(connection, schema, history_table(table)):
        versions = fully_qualified(connection, schema, history_table(table))
        valid_to = quote_ident(VALID_TO_COLUMN.name)
        removed = (
            f" UNION SELECT h.{key} FROM {versions} AS h WHERE h.{valid_to} > $synced_at"
            f" AND NOT EXISTS (SELECT 1 FROM {target} AS t WHERE t.{key} = h.{key})"
            + (f" AND h.{key} IN {read_keys}" if read_keys else "")
        )
    parameters: dict[str, object] = {"synced_at": batch.synced_at}
    covered = ""
    if covered_after is not None:
        covered = (
            f" UNION SELECT {key} FROM {target} AS t WHERE {key} > $after{among}"
            f" UNION SELECT {key} FROM staged WHERE {key} > $after"
        )
        parameters["after"] = covered_after
    (count,) = connection.execute(
        f"CREATE OR REPLACE TEMP TABLE newer AS SELECT t.{key} FROM {target} AS t"
        f" WHERE greatest(t.{synced_at}, coalesce(t.{deleted_at}, t.{synced_at})) > $synced_at{among}{removed}{covered}",
        parameters,
    ).fetchone()  # type: ignore[misc]
    return int(count)


# What DuckDB raises for a value a column's type cannot hold (its JSON reader says InvalidInput).
CAST_FAILURES = (duckdb.ConversionException, duckdb.InvalidInputException)


def newest_key(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> int | None:
    """The highest primary key stored (rows marked deleted included: ids are never reused)."""
    if not table_exists(connection, schema, spec.name):
        return None
    key = quote_ident(spec.primary_key_column.name)
    (newest,) = connection.execute(f"SELECT max({key}) FROM {fully_qualified(connection, schema, spec.name)}").fetchone()  # type: ignore[misc]
    return newest
