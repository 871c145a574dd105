"""DuckDB side of a sync: open the file safely, type staged pages, merge them.

Knows DuckDB and the catalog, nothing of HTTP or Dagster. Every write is one transaction:
a failure anywhere (a cast, a crash, a kill) leaves the table as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TypeVar

import duckdb

from mkt_assets import lean_process
from mkt_assets.catalog import BOOKKEEPING_COLUMNS, Column, ResourceSpec
from mkt_assets.changes import record_change
from mkt_assets.errors import MassDeletion, MassDeletionError, StagingError, WarehouseBusyError, WarehouseWriteError
from mkt_assets.history import VALID_TO_COLUMN, Versions, ensure_history, history_table, record_versions
from mkt_assets.ownership import refuse_foreign, synced_table, versions_table
from mkt_assets.reads import newer_complete_read, newest_reads_cover, record_read
from mkt_assets.records import shortened
from mkt_assets.sql_names import fully_qualified, quote_ident, quote_literal, table_columns, table_exists
from mkt_assets.staging import StagedBatch

Result = TypeVar("Result")

# How long, at most, one opening of the file waits for others to let go of it: our own
# writers queue on the lock file, a DuckDB session opened by hand holds DuckDB's own lock.
DEFAULT_WAIT_SECONDS = 300.0
# A wait is logged once it has lasted this long, and again at this interval.
WAIT_LOG_SECONDS = 10.0
_POLL_SECONDS = (0.01, 0.25)  # first and longest pause between two tries

# Every connection the project opens: DuckDB never downloads or loads an extension on its
# own. A file it cannot read natively (a SQLite database at the path) would otherwise make it
# fetch one over plain http and run it. JSON and Parquet are built into the duckdb wheel.
NO_EXTENSION_DOWNLOADS: dict[str, str | bool | int | float | list[str]] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}

# DuckDB's JSON reader refuses a line longer than this unless told, and buffers about twice
# what it is told: so it is told the longest staged line, never less than its default.
_JSON_OBJECT_FLOOR = 16 << 20


# DuckDB may use this much memory before it spills to `<database>.tmp`: a sync's memory
# stays bounded however large the account. A merge of 100k contacts needs about 105 MB, so
# this cap leaves it whole and holds a million to 216 MB of worker (273 MB under 192MB),
# for about 1 s more of spilling (first load 9.3 s against 8.5 s).
DEFAULT_MEMORY_LIMIT = "128MB"
# Each DuckDB thread buffers its own JSON reader (16 MB and up) and its own row group of
# the table it writes (~70 MB of contacts): under the memory limit above, two threads run
# out of memory where one spills. One thread merged a million contacts in 12 s.
DEFAULT_THREADS = 1


# DuckDB keeps the blocks a scan reads cached up to its memory limit, so a statement that only
# streams a table (an unnest, a filter, a count, a CREATE TABLE AS) used the whole cap at a
# million contacts and a third of it at 100k. Such statements run under this limit, at the
# same speed (contact_field_values: 2.5 s either way at 1M). Aggregates that must hold
# distinct values (a count(DISTINCT) ran out of memory under 32MB) keep the full limit.
STREAMING_MEMORY_LIMIT = "16MB"
_MEMORY_LIMIT_VARIABLE = "mkt_memory_limit"


def configured_memory_limit(connection: duckdb.DuckDBPyConnection) -> str:
    # The limit as configured: DuckDB prints it rounded (244.1 MiB for 256MB), and setting
    # that back would shrink it a little each time.
    (limit,) = connection.execute(
        f"SELECT coalesce(getvariable({quote_literal(_MEMORY_LIMIT_VARIABLE)}), current_setting('memory_limit'))"
    ).fetchone()  # type: ignore[misc]
    return str(limit)


def streamed(connection: duckdb.DuckDBPyConnection, work: Callable[[], Result]) -> Result:
    """``work()`` under ``STREAMING_MEMORY_LIMIT``, then the configured limit restored.

    A table holding a large value (a 10 MB field) needs more than the streaming limit to
    scan: if ``work`` runs out of memory there, it runs once more under the full limit, so
    large values land everywhere while ordinary tables keep the small footprint. ``work``
    must be safe to run twice (read only, or one transaction that rolls back).
    """
    limit = configured_memory_limit(connection)
    connection.execute(f"SET memory_limit = {quote_literal(STREAMING_MEMORY_LIMIT)}")
    try:
        try:
            return work()
        except duckdb.OutOfMemoryException:
            connection.execute(f"SET memory_limit = {quote_literal(limit)}")
            return work()
    finally:
        connection.execute(f"SET memory_limit = {quote_literal(limit)}")


@contextmanager
def transaction(connection: duckdb.DuckDBPyConnection, what: str) -> Iterator[None]:
    """One transaction: committed whole, or rolled back leaving everything as it was.

    A COMMIT that fails (a full disk refusing the write-ahead log) leaves no transaction to
    roll back, and DuckDB's answer to the ROLLBACK would hide the real cause: it is the
    first error that is raised, naming the file and what went wrong.
    """
    database = _database_file(connection)  # asked now: a failed write may leave DuckDB unable to say
    connection.execute("BEGIN TRANSACTION")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException as error:
        try:
            connection.execute("ROLLBACK")
        except duckdb.Error:
            pass  # DuckDB already ended the transaction it could not commit
        # A failed read or write of a file, or a COMMIT the disk refused ("Failed to commit:
        # Could not write file ...: No space left on device").
        if isinstance(error, (duckdb.IOException, duckdb.TransactionException)):
            raise WarehouseWriteError(
                f"{database}: {what} failed and nothing of it was written: {without_values(str(error))}"
            ) from error
        raise


def _database_file(connection: duckdb.DuckDBPyConnection) -> str:
    row = connection.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return str(row[0]) if row and row[0] else "the DuckDB file"


@contextmanager
def connect(
    database: str,
    *,
    read_only: bool = False,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int = DEFAULT_THREADS,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    log: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the DuckDB file, holding its lock file for as long as it is open.

    DuckDB lets one process at a time open a file for writing and fails the others at
    once. The assets run in parallel processes, and scheduled and manual runs can overlap,
    so every opener queues on an OS lock beside the file instead of failing, and then
    waits for a DuckDB session opened by hand (which knows nothing of that lock) to close.
    Both waits together last at most ``wait_seconds``; a wait is logged (``log``, else the
    lean process's report) every ``WAIT_LOG_SECONDS`` with who holds the file.
    """
    if database == ":memory:":
        with duckdb.connect(database, config=NO_EXTENSION_DOWNLOADS) as connection:
            yield connection
        return
    path = Path(database)
    make_private_directories(path.parent)
    wait = _Wait(path, wait_seconds, log or lean_process.report)
    with open(f"{path}.lock", "a+b") as lock:
        while not _try_lock(lock):
            wait.pause(_lock_holder(lock))
        new = discard = False
        try:
            _say_who_holds(lock, "")
            while True:
                try:
                    new = not os.path.lexists(path)
                    connection = duckdb.connect(
                        str(path),
                        read_only=read_only and not new,
                        config={
                            "memory_limit": memory_limit,
                            "threads": threads,
                            "preserve_insertion_order": False,
                            **NO_EXTENSION_DOWNLOADS,
                        },
                    )
                    if new:
                        # The contacts' e-mails will be in it: the user's alone, as the staged chunks.
                        os.chmod(path, 0o600)
                    break
                except duckdb.IOException as error:
                    if not _DUCKDB_LOCK_CONFLICT.search(str(error)):
                        raise
                    outsider = _duckdb_lock_holder(str(error))
                    _say_who_holds(lock, f", itself waiting for {outsider}")
                    wait.pause(outsider)
            with connection:
                connection.execute(f"SET VARIABLE {_MEMORY_LIMIT_VARIABLE} = {quote_literal(memory_limit)}")
                try:
                    yield connection
                except BaseException:
                    discard = new and _holds_nothing(connection)
                    raise
        finally:
            if discard:
                # A run that failed leaves no empty file behind (the lock stays: a waiter may hold it open).
                for made in (path, Path(f"{path}.wal")):
                    made.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holds_nothing(connection: duckdb.DuckDBPyConnection) -> bool:
    """The file holds no schema or table of anyone's (its transaction rolled back); False when
    that cannot be asked."""
    try:
        row = connection.execute(
            "SELECT (SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND NOT temporary)"
            " + (SELECT count(*) FROM duckdb_views() WHERE database_name = current_database() AND NOT internal)"
            " + (SELECT count(*) FROM duckdb_schemas() WHERE database_name = current_database() AND NOT internal)"
        ).fetchone()
    except duckdb.Error:
        return False
    return row is not None and row[0] == 0


def read_only(file: WarehouseFile, log: Callable[[str], None] | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection, waiting (as ``connect`` does, up to the file's bound) while a
    writer holds the file; it holds DuckDB's shared lock until it is closed."""
    path = Path(file.database)
    wait = _Wait(path, file.wait_seconds, log or lean_process.report)
    while True:
        try:
            connection = duckdb.connect(
                str(path),
                read_only=True,
                config={"memory_limit": file.memory_limit, "threads": file.threads, **NO_EXTENSION_DOWNLOADS},
            )
            connection.execute(f"SET VARIABLE {_MEMORY_LIMIT_VARIABLE} = {quote_literal(file.memory_limit)}")
            return connection
        except duckdb.IOException as error:
            if not _DUCKDB_LOCK_CONFLICT.search(str(error)):
                raise
            wait.pause(_duckdb_lock_holder(str(error)))


def make_private_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700, as the project's other private
    directories (the file will hold contacts' e-mails); one that exists is left as it is."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile by a concurrent run
        os.chmod(path, 0o700)  # whatever the umask, so the next level can be made in it


class _Wait:
    """One opening's wait for the file: bounded, paced, and said out loud while it lasts."""

    def __init__(self, path: Path, seconds: float, log: Callable[[str], None]) -> None:
        self.path, self.seconds, self.log = path, seconds, log
        self.started: float | None = None
        self.next_log = 0.0
        self.delay = _POLL_SECONDS[0]

    def pause(self, holder: str) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started, self.next_log = now, now + WAIT_LOG_SECONDS
        waited = now - self.started
        if waited >= self.seconds:
            what_to_do = (
                "close DuckDB sessions open on it"
                if "outside this project" in holder
                else "let that sync finish, or stop it if it hangs,"
            )
            raise WarehouseBusyError(
                f"{self.path} stayed locked for {waited:.0f} s, longer than the {self.seconds:g} s a sync"
                f" waits (MKT_DUCKDB_WAIT_SECONDS), by {holder}: {what_to_do} and run again; every"
                " table is as it was"
            )
        if now >= self.next_log:
            self.next_log = now + WAIT_LOG_SECONDS
            self.log(
                f"waiting {waited:.0f} s for {self.path} (at most {self.seconds:g} s,"
                f" MKT_DUCKDB_WAIT_SECONDS): held by {holder}"
            )
        time.sleep(min(self.delay, max(self.seconds - waited, 0.0)))
        self.delay = min(self.delay * 2, _POLL_SECONDS[1])


def _try_lock(lock: IO[bytes]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _say_who_holds(lock: IO[bytes], doing: str) -> None:
    """Written into the lock file, so a waiter can say who it waits for."""
    lock.seek(0)
    lock.truncate()
    lock.write(f"PID {os.getpid()} (a sync of this project{doing})".encode())
    lock.flush()


def _lock_holder(lock: IO[bytes]) -> str:
    lock.seek(0)
    return lock.read(400).decode("utf-8", "replace").strip() or "another process of this project"


# What DuckDB says when another process has the file open (not any error that names a path
# with "lock" in it).
_DUCKDB_LOCK_CONFLICT = re.compile(r"Could not set lock on file|Conflicting lock is held")
_DUCKDB_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.+?) \(PID (?P<pid>\d+)\)")


def _duckdb_lock_holder(message: str) -> str:
    """Who holds DuckDB's own lock, as DuckDB's error names it."""
    found = _DUCKDB_HOLDER.search(message)
    if found is None:
        return f"a process outside this project ({message})"
    return f"PID {found['pid']} ({found['program']}), a DuckDB session outside this project"


@dataclass(frozen=True)
class WarehouseFile:
    """The DuckDB file and the memory DuckDB may use on it: all a worker process needs."""

    database: str
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    threads: int = DEFAULT_THREADS
    wait_seconds: float = DEFAULT_WAIT_SECONDS

    def open(self, log: Callable[[str], None] | None = None) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """``connect`` with these settings: the lock, the bounded wait, the limits."""
        return connect(
            self.database,
            memory_limit=self.memory_limit,
            threads=self.threads,
            wait_seconds=self.wait_seconds,
            log=log,
        )


def column_definitions(spec: ResourceSpec) -> list[str]:
    definitions = []
    for column in (*spec.columns, *BOOKKEEPING_COLUMNS):
        constraint = " PRIMARY KEY" if column.api_name == spec.primary_key else ""
        definitions.append(f"{quote_ident(column.name)} {column.sql_type}{constraint}")
    return definitions


def ensure_table(connection: duckdb.DuckDBPyConnection, schema: str, table: str, spec: ResourceSpec) -> None:
    """Create the table, or add the columns the catalog gained since it was created."""
    connection.execute(f"CREATE SCHEMA IF NOT EXISTS {fully_qualified(connection, schema)}")
    target = fully_qualified(connection, schema, table)
    connection.execute(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(column_definitions(spec))})")
    existing = table_columns(connection, schema, table)
    for column in (*spec.columns, *BOOKKEEPING_COLUMNS):
        if column.name not in existing:
            connection.execute(
                f"ALTER TABLE {target} ADD COLUMN {quote_ident(column.name)} {column.sql_type}"
            )


def _typed_expression(column: Column, record: str = "r") -> str:
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


def _records_sql(longest_line: int) -> str:
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
        records = _records_sql(longest_line)
        typed = [f"{_typed_expression(c)} AS {quote_ident(c.name)}" for c in spec.columns]
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


def _known_fields_patch(spec: ResourceSpec) -> str:
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


def without_values(message: str) -> str:
    """A DuckDB message without the JSON it quotes (a whole record, e-mail included)."""
    return shortened_message(re.sub(r"[\[{].*[\]}]", "{...}", message, flags=re.S))


def shortened_message(message: str, limit: int = 600) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


DELETIONS_MODES = ("mark", "delete")

# The share of a table's live rows a complete read may mark gone unconfirmed (the row count
# check's MKT_ROW_COUNT_MAX_DROP), and how many rows may always go whatever the share: a user
# deleting 1 of 5 tags is 20%, and must not need to confirm it. Never every live row.
DEFAULT_MAX_DROP = 0.1
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
) -> MergeResult:
    """Merge ``batch`` into ``schema.table`` on the primary key, inside the caller's transaction.

    When the batch is a complete read of the resource, rows it lacks were deleted upstream:
    they get ``_deleted_at`` (or are removed, with ``deletions="delete"``). A partial read
    (an incremental one) says nothing about rows it did not fetch, so it marks nothing.
    Unless ``confirm_mass_deletion``, a read that lacks more live rows than ``is_mass_deletion``
    allows raises ``MassDeletionError`` before any is marked: the caller's transaction then
    rolls back what the merge wrote.
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
    newer_read = newer_complete_read(connection, schema, table, batch.synced_at)
    if newer_read is not None:
        return _superseded(connection, target, newer_read)
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
        parameters["known"] = _known_fields_patch(spec)
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
        problem = _duplicated_field(connection, batch, parameters)
        if problem is not None:
            raise StagingError(problem)
    # Checked again here, in the write's transaction: a table made since the run's check is
    # refused as well, and never altered.
    refuse_foreign(connection, schema, (synced_table(spec, table), versions_table(spec, table)), _database_file(connection))
    created = not table_exists(connection, schema, table)
    ensure_table(connection, schema, table, spec)
    if history:
        ensure_history(connection, schema, table, spec, batch.synced_at)
    # Typed once, into a temporary table DuckDB spills to disk past its memory limit.
    connection.execute(f"CREATE OR REPLACE TEMP TABLE staged AS {staged}", parameters)
    (staged_rows,) = connection.execute("SELECT count(*) FROM staged").fetchone()  # type: ignore[misc]
    # Runs may overlap and land in either order: what a sync that began after this one wrote
    # (changed, inserted, found gone) is newer than what this batch read, and is left alone.
    newer = _newer_rows(
        connection, schema, table, target, key, batch, newest_reads_cover(connection, schema, table, batch.synced_at)
    )
    not_newer = f" AND s.{key} NOT IN (SELECT {key} FROM newer)" if newer else ""
    # A row marked deleted that the API lists again has changed: it is back. (Two different
    # rows hashing alike, 1 in 2^64 per changed row, would be taken as unchanged.)
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE changed AS SELECT s.{key} FROM"
        f" (SELECT {key}, hash({', '.join(data_columns)}) AS h FROM staged) AS s JOIN"
        f" (SELECT {key}, hash({', '.join(data_columns)}) AS h, {deleted_at} FROM {target}) AS t"
        f" ON s.{key} = t.{key} WHERE (s.h <> t.h OR t.{deleted_at} IS NOT NULL){not_newer}"
    )
    updated = 0
    if _holds_rows(connection, "changed"):
        (updated,) = connection.execute(
            f"MERGE INTO {target} AS t"
            f" USING (SELECT * FROM staged SEMI JOIN changed USING ({key})) AS s ON t.{key} = s.{key}"
            f" WHEN MATCHED THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in written_columns)},"
            f" {deleted_at} = NULL"
        ).fetchone()  # type: ignore[misc]
    # The keys new to the table, once: the insert takes them, and so does the history.
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT s.{key} FROM staged AS s ANTI JOIN {target} AS t ON s.{key} = t.{key}"
        + (f" ANTI JOIN newer AS n ON s.{key} = n.{key}" if newer else "")
    )
    inserted = 0
    if _holds_rows(connection, "fresh"):
        (inserted,) = connection.execute(
            f"INSERT INTO {target} ({', '.join(written_columns)})"
            f" SELECT {', '.join(f's.{c}' for c in written_columns)} FROM staged AS s SEMI JOIN fresh USING ({key})"
        ).fetchone()  # type: ignore[misc]
    deleted = 0
    gone: list[str] = []
    if batch.complete:
        missing_upstream = f"NOT EXISTS (SELECT 1 FROM staged AS s WHERE s.{key} = t.{key})"
        if newer:
            missing_upstream += f" AND t.{key} NOT IN (SELECT {key} FROM newer)"
        # The live rows the API no longer lists: marked (or removed), and their versions closed.
        connection.execute(
            f"CREATE OR REPLACE TEMP TABLE gone AS SELECT t.{key} FROM {target} AS t"
            f" WHERE t.{deleted_at} IS NULL AND {missing_upstream}"
        )
        gone.append("gone")
        (gone_rows,) = connection.execute("SELECT count(*) FROM gone").fetchone()  # type: ignore[misc]
        if gone_rows and not confirm_mass_deletion:
            # An outage answering an empty list looks like a mass deletion: refused unless confirmed.
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
        keys = {name: _holds_rows(connection, name) for name in ("changed", "fresh", *gone)}
        versions = record_versions(
            connection,
            schema,
            table,
            spec,
            batch.synced_at,
            opened=[name for name in ("changed", "fresh") if keys[name]],
            closed=[name for name in ("changed", *gone) if keys[name]],
        )
    (row_count, total_rows) = connection.execute(
        f"SELECT count(*) FILTER (WHERE {deleted_at} IS NULL), count(*) FROM {target}"
    ).fetchone()  # type: ignore[misc]
    newer_in_batch = 0
    if newer:
        (newer_in_batch,) = connection.execute(f"SELECT count(*) FROM staged SEMI JOIN newer USING ({key})").fetchone()  # type: ignore[misc]
    for temporary in ("staged", "changed", "fresh", *gone, "newer"):
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
) -> int:
    """Collect into the temporary table ``newer`` the keys a sync that began after ``batch``'s
    has written: stored rows it inserted, changed or marked deleted, and rows it removed (in
    ``delete`` mode), which only the history remembers, whatever this run keeps; and, stored or
    staged, the keys above ``covered_after``, which newer incremental reads read (see ``reads``:
    one of them may have read a row unchanged, or found it gone). Returns how many there are (0
    unless runs overlapped)."""
    _, synced_at, deleted_at = (quote_ident(c.name) for c in BOOKKEEPING_COLUMNS)
    removed = ""
    if table_exists(connection, schema, history_table(table)):
        versions = fully_qualified(connection, schema, history_table(table))
        valid_to = quote_ident(VALID_TO_COLUMN.name)
        removed = (
            f" UNION SELECT h.{key} FROM {versions} AS h WHERE h.{valid_to} > $synced_at"
            f" AND NOT EXISTS (SELECT 1 FROM {target} AS t WHERE t.{key} = h.{key})"
        )
    parameters: dict[str, object] = {"synced_at": batch.synced_at}
    covered = ""
    if covered_after is not None:
        covered = f" UNION SELECT {key} FROM {target} WHERE {key} > $after UNION SELECT {key} FROM staged WHERE {key} > $after"
        parameters["after"] = covered_after
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE newer AS SELECT t.{key} FROM {target} AS t"
        f" WHERE greatest(t.{synced_at}, coalesce(t.{deleted_at}, t.{synced_at})) > $synced_at{removed}{covered}",
        parameters,
    )
    (count,) = connection.execute("SELECT count(*) FROM newer").fetchone()  # type: ignore[misc]
    return int(count)


def _holds_rows(connection: duckdb.DuckDBPyConnection, table: str) -> bool:
    return connection.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None


def merge_staged(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    batch: StagedBatch,
    *,
    deletions: str = "mark",
    history: bool = True,
    max_drop: float = DEFAULT_MAX_DROP,
    confirm_mass_deletion: bool = False,
) -> MergeResult:
    """``merge_batch`` in a transaction of its own: the table is merged whole or left as it was,
    and a value DuckDB cannot type is named."""
    try:
        with transaction(connection, f"the merge into {schema}.{table}"):
            return merge_batch(
                connection,
                schema,
                table,
                batch,
                deletions=deletions,
                history=history,
                max_drop=max_drop,
                confirm_mass_deletion=confirm_mass_deletion,
            )
    except CAST_FAILURES as error:
        raise explain_cast_failure(connection, batch.spec, batch, error) from None


# What DuckDB raises for a value a column's type cannot hold (its JSON reader says InvalidInput).
CAST_FAILURES = (duckdb.ConversionException, duckdb.InvalidInputException)


def merge_staged_file(
    warehouse: WarehouseFile, schema: str, table: str, batch: StagedBatch, *, deletions: str = "mark", history: bool = True
) -> tuple[MergeResult, str]:
    """Open the file, merge ``batch`` and preview the table: the whole write of a sync,
    as one call a lean worker process can make (see ``lean_process``)."""
    with warehouse.open() as connection:
        result = merge_staged(connection, schema, table, batch, deletions=deletions, history=history)
        return result, preview_markdown(connection, schema, table)


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
            expression = _typed_expression(column).replace("CAST(", "TRY_CAST(")
            value = f"(r -> {quote_literal(column.api_name)})"
            if column.member:
                value = f"(r -> {quote_literal(column.api_name)} -> {quote_literal(column.member)})"
            row = connection.execute(
                f"WITH records AS ({_records_sql(batch.longest_line)})"
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


def _duplicated_field(connection: duckdb.DuckDBPyConnection, batch: StagedBatch, parameters: dict[str, object]) -> str | None:
    """A record sending one of its fields twice, found where the raw path would read the
    first copy (DuckDB's ``->>``) while the client checked the last (Python's parser)."""
    row = connection.execute(
        f"WITH records AS ({_records_sql(batch.longest_line)})"
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


def database_path(path: str) -> str:
    """Resolve a relative database path against the working directory, as users expect."""
    return path if path == ":memory:" else os.path.abspath(path)


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


def newest_key(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> int | None:
    """The highest primary key stored (rows marked deleted included: ids are never reused)."""
    if not table_exists(connection, schema, spec.name):
        return None
    key = quote_ident(spec.primary_key_column.name)
    (newest,) = connection.execute(f"SELECT max({key}) FROM {fully_qualified(connection, schema, spec.name)}").fetchone()  # type: ignore[misc]
    return newest
