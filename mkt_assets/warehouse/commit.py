"""The run's one transaction: every table a sync writes, merged and built together, then the
facts its checks need.

A reader of the file sees every table of one sync or every table of the one before, never
contacts of one beside contact_tags of another: a sync that fails anywhere, or is killed at any
moment, leaves every table as it was. DuckDB only, no Dagster: it runs in a lean worker
process (see ``lean_process``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import duckdb

from mkt_assets.core.catalog import ResourceSpec, holds_personal_data
from mkt_assets.core.errors import MassDeletion, MassDeletionError, SyncError
from mkt_assets.staging.pages import StagedBatch
from mkt_assets.warehouse.connection import WarehouseFile, attached_file, streamed, transaction, without_values
from mkt_assets.warehouse.database_file import inspected
from mkt_assets.warehouse.defaults import DEFAULT_MAX_DROP
from mkt_assets.warehouse.diagnostics import explain_cast_failure, preview_markdown
from mkt_assets.warehouse.merge import (
    CAST_FAILURES,
    MASS_DELETION_ALLOWANCE,
    MergeResult,
    merge_batch,
    newest_key,
)
from mkt_assets.warehouse.normalized_tables import (
    BuildResult,
    NormalizedTable,
    build_facts,
    build_in_transaction,
    is_current,
    update_in_place,
)
from mkt_assets.warehouse.ownership import BOOKKEEPING_TABLES, OwnedTable, refuse_foreign, synced_table, versions_table
from mkt_assets.warehouse.sql_names import table_exists
from mkt_assets.warehouse.table_facts import (
    HistoryFacts,
    ReferenceFacts,
    SyncedTableFacts,
    all_reference_facts,
    history_facts,
    synced_table_facts,
)


class MissingTableError(SyncError):
    """A normalized table asked for reads a table that was never synced."""


@dataclass(frozen=True)
class Written:
    """What the run's transaction did to one table."""

    table: str
    seconds: float
    preview: str
    merge: MergeResult | None = None  # a synced table
    build: BuildResult | None = None  # a normalized table


@dataclass(frozen=True)
class Facts:
    """What the checks need, queried once everything is committed (or why it could not be)."""

    synced: dict[str, SyncedTableFacts] = field(default_factory=dict)
    # By synced table, then by reference check.
    references: dict[str, dict[str, ReferenceFacts]] = field(default_factory=dict)
    # By synced table, when the run keeps their history.
    history: dict[str, HistoryFacts] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class RunCommit:
    written: dict[str, Written]
    # None: still being gathered once the commit returned (``CommitRequest.facts_after``).
    facts: Facts | None
    seconds: float
    # Normalized tables not rebuilt because a table they read does not exist yet, and why.
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refresh:
    """A refresh's read: the keys it read one by one, and those of them the API answered 404 for."""

    keys: tuple[int, ...]
    gone: tuple[int, ...] = ()


@dataclass(frozen=True)
class CommitRequest:
    """Everything a run writes, and how: the argument of its one transaction (``commit``)."""

    file: WarehouseFile
    schema: str
    batches: tuple[StagedBatch, ...]
    tables: tuple[NormalizedTable, ...]
    deletions: str
    history: bool = True
    # Tables the run was asked for (the others are rebuilt only to keep up with their reads).
    asked: frozenset[str] = frozenset()
    # The resources the deployment syncs (None: all): references to others are not checked.
    within: frozenset[str] | None = None
    # The share of a table's live rows a complete read may mark gone unconfirmed, and whether
    # this run confirms more (see ``merge.is_mass_deletion``).
    max_drop: float = DEFAULT_MAX_DROP
    confirm_mass_deletion: bool = False
    # A refresh of some records of the one batch's resource (see ``commit_refresh``); None: a sync.
    refresh: Refresh | None = None
    # Gather every fact the checks need (False: a refresh whose checks need none but the
    # merge's row count, which every run has).
    facts: bool = True
    # Return as soon as the transaction commits, and gather the facts after it on the same
    # connection (the file still held), while the caller reports the tables written: the
    # checks then take them from ``gathered_facts``. A run's Dagster events for its outputs
    # take longer than the facts' queries, so these leave the run's critical path.
    facts_after: bool = False


def commit(request: CommitRequest) -> RunCommit:
    """The run's one transaction (``commit_run``, or ``commit_refresh``), as the one call its
    DuckDB worker makes."""
    if request.refresh is not None:
        (batch,) = request.batches
        return commit_refresh(
            request.file,
            request.schema,
            batch,
            request.refresh,
            request.tables,
            deletions=request.deletions,
            history=request.history,
            asked=request.asked,
            within=request.within,
            facts=request.facts,
            facts_after=request.facts_after,
        )
    return commit_run(
        request.file,
        request.schema,
        request.batches,
        request.tables,
        deletions=request.deletions,
        history=request.history,
        asked=request.asked,
        within=request.within,
        max_drop=request.max_drop,
        confirm_mass_deletion=request.confirm_mass_deletion,
        facts_after=request.facts_after,
    )


def commit_run(
    file: WarehouseFile,
    schema: str,
    batches: Sequence[StagedBatch],
    tables: Sequence[NormalizedTable],
    *,
    deletions: str,
    history: bool = True,
    asked: frozenset[str] = frozenset(),
    within: frozenset[str] | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    confirm_mass_deletion: bool = False,
    facts_after: bool = False,
) -> RunCommit:
    """Merge every batch and rebuild every table in one transaction, then gather the facts the
    checks need: per synced table, its own and those of its references.

    A table rebuilt only because it reads a table the run writes is skipped while another
    table it reads does not exist yet; one in ``asked`` cannot be, and fails the write. A run
    that writes synced tables keeps, unrebuilt, a table none of whose reads changed since it was
    built (in this run or any other, see ``changes``) and whose definition is the one it was
    built from; a run that writes none rebuilds what it is asked.
    ``within``: the resources the deployment syncs; references to others are not checked.
    A mass deletion (see ``merge.is_mass_deletion``) not confirmed fails the write; every
    batch is merged first, so the error names each table that would lose too many rows.
    ``facts_after``: see ``CommitRequest``."""
    started = time.monotonic()
    written: dict[str, Written] = {}
    skipped: dict[str, str] = {}
    with ExitStack() as opened:
        connection = opened.enter_context(file.open())
        with _write(connection, f"the sync's writes ({', '.join(_names(batches, tables))})"):
            # Checked again here, in the write's transaction, for every table it merges or
            # builds at once: a table made since the run's check is refused as well, and never
            # altered.
            owned = [
                *(owned for batch in batches for owned in (synced_table(batch.spec), versions_table(batch.spec))),
                *(table.owned for table in tables),
            ]
            refuse_foreign(connection, schema, owned, attached_file(connection))
            refused: list[MassDeletion] = []
            for batch in batches:
                began = time.monotonic()
                try:
                    merge = _merge(
                        connection,
                        schema,
                        batch,
                        deletions=deletions,
                        history=history,
                        max_drop=max_drop,
                        confirm_mass_deletion=confirm_mass_deletion,
                        foreign_refused=True,
                    )
                except MassDeletionError as error:
                    refused.extend(error.refused)  # rolled back with the rest once every batch is seen
                    continue
                written[batch.spec.name] = Written(batch.spec.name, time.monotonic() - began, "", merge=merge)
            if refused:
                raise MassDeletionError(tuple(refused), max_drop, MASS_DELETION_ALLOWANCE)
            changed = {name for name, done in written.items() if done.merge is not None and done.merge.changed}
            for table in tables:
                if not _reads_exist(connection, schema, table, asked, skipped):
                    continue
                began = time.monotonic()
                if batches and not changed & set(table.reads) and is_current(connection, schema, table):
                    # Already what a rebuild would make: the same query over the same rows.
                    build = build_facts(connection, schema, table, rebuilt=False)
                else:
                    build = build_in_transaction(connection, schema, table, foreign_refused=True)
                written[table.name] = Written(table.name, time.monotonic() - began, build.preview, build=build)
        for batch in batches:
            name = batch.spec.name
            written[name] = Written(name, written[name].seconds, _preview(connection, schema, batch.spec), merge=written[name].merge)
        gather = partial(_facts, connection, schema, [batch.spec for batch in batches], history, within)
        facts = _gather_after(gather, opened.pop_all()) if facts_after else gather()
    return RunCommit(written, facts, time.monotonic() - started, skipped)


def commit_refresh(
    file: WarehouseFile,
    schema: str,
    batch: StagedBatch,
    refresh: Refresh,
    tables: Sequence[NormalizedTable],
    *,
    deletions: str,
    history: bool = True,
    asked: frozenset[str] = frozenset(),
    within: frozenset[str] | None = None,
    facts: bool = True,
    facts_after: bool = False,
) -> RunCommit:
    """A refresh's one transaction: ``batch`` (the records read by key) merged with their
    history as a sync merges them, the keys of ``refresh.gone`` marked gone as a complete read
    marks what it lacks, and each of ``tables`` (every normalized table reading the resource)
    brought up to date for the refreshed keys alone (``update_in_place``) when it was current
    before the merge, rebuilt whole otherwise, and kept when nothing changed. A failure anywhere
    leaves every table as it was. ``facts``: gather the checks' facts (every one of them reads
    the whole table); without, only the merge's counts are reported. ``facts_after``: see
    ``CommitRequest``."""
    started = time.monotonic()
    spec = batch.spec
    written: dict[str, Written] = {}
    skipped: dict[str, str] = {}
    found: Facts | None = Facts()
    with ExitStack() as opened:
        connection = opened.enter_context(file.open())
        with _write(connection, f"the refresh of {len(refresh.keys)} {spec.name} ({', '.join(_names([batch], tables))})"):
            # Asked before the merge changes what they read: a table built from every row as
            # it stood can be brought up to date for the rows that change alone.
            current = {
                table.name: table_exists(connection, schema, table.name) and is_current(connection, schema, table)
                for table in tables
            }
            began = time.monotonic()
            merge = _merge(connection, schema, batch, deletions=deletions, history=history, gone=refresh.gone)
            written[spec.name] = Written(spec.name, time.monotonic() - began, "", merge=merge)
            connection.execute(
                "CREATE OR REPLACE TEMP TABLE refreshed_keys AS SELECT DISTINCT unnest($keys::BIGINT[]) AS key",
                {"keys": list(refresh.keys)},
            )
            for table in tables:
                if not _reads_exist(connection, schema, table, asked, skipped):
                    continue
                began = time.monotonic()
                if current[table.name] and not merge.changed:
                    build = build_facts(connection, schema, table, rebuilt=False)
                elif current[table.name] and table.row_key and table.reads[0] == spec.name:
                    build = update_in_place(connection, schema, table, "refreshed_keys")
                else:
                    build = build_in_transaction(connection, schema, table)
                written[table.name] = Written(table.name, time.monotonic() - began, build.preview, build=build)
            connection.execute("DROP TABLE refreshed_keys")
        written[spec.name] = replace(written[spec.name], preview=_preview(connection, schema, spec))
        if facts:
            gather = partial(_facts, connection, schema, [spec], history, within)
            found = _gather_after(gather, opened.pop_all()) if facts_after else gather()
    return RunCommit(written, found, time.monotonic() - started, skipped)


def _preview(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> str:
    """The table's first rows for its materialization's metadata; none of a table of people."""
    return "" if holds_personal_data(spec) else preview_markdown(connection, schema, spec.name)


def _reads_exist(
    connection: duckdb.DuckDBPyConnection, schema: str, table: NormalizedTable, asked: frozenset[str], skipped: dict[str, str]
) -> bool:
    """Whether every table ``table`` reads exists. If one does not, a table in ``asked`` fails
    the write; one built only to keep up with its reads is skipped, and ``skipped`` says why."""
    missing = [name for name in table.reads if not table_exists(connection, schema, name)]
    if not missing:
        return True
    reason = f"{', '.join(f'{schema}.{name}' for name in missing)} does not exist yet: materialize it first"
    if table.name in asked:
        raise MissingTableError(f"{schema}.{table.name} cannot be built: {reason}")
    skipped[table.name] = reason
    return False


class _Untyped(Exception):
    """A value DuckDB could not type while ``batch`` was merged, carried out of the transaction
    to be explained once it has rolled back (an aborted transaction answers no query)."""

    def __init__(self, batch: StagedBatch, error: duckdb.Error) -> None:
        super().__init__(str(error))
        self.batch, self.error = batch, error


def _merge(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    batch: StagedBatch,
    *,
    deletions: str,
    history: bool,
    max_drop: float = DEFAULT_MAX_DROP,
    confirm_mass_deletion: bool = False,
    gone: Sequence[int] = (),
    foreign_refused: bool = False,
) -> MergeResult:
    """``merge_batch`` of ``batch`` into its table, inside a ``_write``: a value it cannot type
    fails the write naming the record and the field."""
    try:
        return merge_batch(
            connection,
            schema,
            batch.spec.name,
            batch,
            deletions=deletions,
            history=history,
            max_drop=max_drop,
            confirm_mass_deletion=confirm_mass_deletion,
            gone=gone,
            foreign_refused=foreign_refused,
        )
    except CAST_FAILURES as error:
        raise _Untyped(batch, error) from error


@contextmanager
def _write(connection: duckdb.DuckDBPyConnection, what: str) -> Iterator[None]:
    """``transaction``; a value one of its ``_merge``s could not type is then explained (which
    record, which field), any other failure, a cast failure outside a merge included, left as it is."""
    try:
        with transaction(connection, what):
            yield
    except _Untyped as untyped:
        raise explain_cast_failure(connection, untyped.batch.spec, untyped.batch, untyped.error) from None


def _names(batches: Sequence[StagedBatch], tables: Sequence[NormalizedTable]) -> list[str]:
    return [*(batch.spec.name for batch in batches), *(table.name for table in tables)] or ["nothing"]


def _facts(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    specs: Sequence[ResourceSpec],
    history: bool,
    within: frozenset[str] | None = None,
) -> Facts:
    """The checks' facts; the tables have changed by now, so a query that fails says why in
    ``error`` (the checks then fail) instead of failing the run."""
    try:
        synced = {spec.name: streamed(connection, partial(synced_table_facts, connection, schema, spec)) for spec in specs}
        references = {spec.name: streamed(connection, partial(all_reference_facts, connection, schema, spec, within)) for spec in specs}
        versions = {spec.name: streamed(connection, partial(history_facts, connection, schema, spec)) for spec in specs if history}
    except duckdb.Error as error:
        return Facts(error=without_values(str(error)))
    return Facts(synced, references, versions)


# In the DuckDB worker: the facts a commit is gathering after it returned (``facts_after``).
_pending_facts: Future[Facts] | None = None


def _gather_after(gather: Callable[[], Facts], opened: ExitStack) -> Facts | None:
    """None, with ``gather()`` running in a thread of its own, then ``opened`` (the connection
    and the file's lock) closed: ``gathered_facts`` waits for them. Not a daemon: the worker's
    process ends once they are gathered, never in the middle of a query."""
    global _pending_facts
    future: Future[Facts] = Future()

    def work() -> None:
        try:
            with opened:
                facts = gather()
        except BaseException as error:  # noqa: BLE001 (handed to the caller, which raises it)
            future.set_exception(error)
        else:
            future.set_result(facts)

    _pending_facts = future
    threading.Thread(target=work, name="facts after commit").start()
    return None


def gathered_facts() -> Facts:
    """The facts the last commit made with ``facts_after`` gathered, once it has."""
    global _pending_facts
    future, _pending_facts = _pending_facts, None
    if future is None:
        raise RuntimeError("no commit in this process is gathering the checks' facts")
    return future.result()


def run_tables(resources: Sequence[ResourceSpec], tables: Sequence[NormalizedTable]) -> tuple[OwnedTable, ...]:
    """The tables a run writes or reads in the target schema: its synced tables, their
    histories (read even when the run keeps none), the tables it builds, the bookkeeping."""
    return (
        *(synced_table(spec) for spec in resources),
        *(versions_table(spec) for spec in resources),
        *(table.owned for table in tables),
        *BOOKKEEPING_TABLES,
    )


def check_before_fetch(
    file: WarehouseFile, schema: str, tables: Sequence[OwnedTable], *, newest_of: Sequence[ResourceSpec] = ()
) -> dict[str, int | None] | None:
    """Fail at once (``WarehouseFileError``) on a file the run could not write, or a table of
    ``tables`` it did not create: before the fetch, not after it. Changes nothing.

    The same look reads the highest key stored of each of ``newest_of`` (as ``newest_keys``
    does), so an incremental run knows where to start without waiting for a DuckDB worker to
    start; None when a writer held the file, which ``newest_keys`` then waits for."""
    with inspected(file.database) as connection:
        if connection is not None:
            refuse_foreign(connection, schema, tables, file.database)
            return {spec.name: newest_key(connection, schema, spec) for spec in newest_of}
    if file.database != ":memory:" and os.path.lexists(file.database):
        return None
    return dict.fromkeys((spec.name for spec in newest_of), None)


def newest_keys(file: WarehouseFile, schema: str, specs: Sequence[ResourceSpec]) -> dict[str, int | None]:
    """The highest key stored for each of ``specs`` (None: nothing stored yet). A file that
    does not exist yet is not created: a run that then fails leaves none behind."""
    if file.database != ":memory:" and not os.path.lexists(file.database):
        return dict.fromkeys((spec.name for spec in specs), None)
    with file.open() as connection:
        return {spec.name: newest_key(connection, schema, spec) for spec in specs}
