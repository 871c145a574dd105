"""Opening the DuckDB file: the project's lock, DuckDB's own, the wait for either, the
settings every connection gets (memory, threads, no extension downloads), and transactions.

Knows DuckDB, nothing of HTTP or Dagster. Every write is one transaction: a failure anywhere
(a cast, a crash, a kill) leaves the file as it was.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import duckdb

from mkt_assets.core.errors import WarehouseBusyError, WarehouseWriteError
from mkt_assets.core.setting_names import ENVIRONMENT
from mkt_assets.plumbing import lean_process
from mkt_assets.warehouse.defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_WAIT_SECONDS
from mkt_assets.warehouse.sql_names import forget_existing_tables, quote_literal, remember_existing_tables

Result = TypeVar("Result")

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


# Each streamed statement restores the limit afterwards: kept here as the connection is made
# rather than asked of DuckDB again each time.
_configured_limits: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, str] = weakref.WeakKeyDictionary()


def configure_memory_limit(connection: duckdb.DuckDBPyConnection, memory_limit: str) -> None:
    connection.execute(f"SET VARIABLE {_MEMORY_LIMIT_VARIABLE} = {quote_literal(memory_limit)}")
    _configured_limits[connection] = memory_limit


def configured_memory_limit(connection: duckdb.DuckDBPyConnection) -> str:
    # The limit as configured: DuckDB prints it rounded (244.1 MiB for 256MB), and setting
    # that back would shrink it a little each time.
    known = _configured_limits.get(connection)
    if known is not None:
        return known
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
    database = attached_file(connection)  # asked now: a failed write may leave DuckDB unable to say
    connection.execute("BEGIN TRANSACTION")
    try:
        remember_existing_tables(connection)  # within: should reading the catalog fail, it rolls back
        yield
        connection.execute("COMMIT")
    except BaseException as error:
        forget_existing_tables(connection)
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


def attached_file(connection: duckdb.DuckDBPyConnection) -> str:
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
    wait_setting: str | None = ENVIRONMENT.duckdb_wait,
    log: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the DuckDB file, holding its lock file for as long as it is open.

    DuckDB lets one process at a time open a file for writing and fails the others at
    once. The assets run in parallel processes, and scheduled and manual runs can overlap,
    so every opener queues on an OS lock beside the file instead of failing, and then
    waits for a DuckDB session opened by hand (which knows nothing of that lock) to close.
    Both waits together last at most ``wait_seconds``; a wait is logged (``log``, else the
    lean process's report) every ``WAIT_LOG_SECONDS`` with who holds the file, naming
    ``wait_setting`` as what sets the bound.
    """
    if database == ":memory:":
        with duckdb.connect(database, config=NO_EXTENSION_DOWNLOADS) as connection:
            yield connection
        return
    path = Path(database)
    make_private_directories(path.parent)
    wait = _Wait(path, wait_seconds, log or lean_process.report, wait_setting)
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
                    if not DUCKDB_LOCK_CONFLICT.search(str(error)):
                        raise
                    outsider = _duckdb_lock_holder(str(error))
                    _say_who_holds(lock, f", itself waiting for {outsider}")
                    wait.pause(outsider)
            with connection:
                configure_memory_limit(connection, memory_limit)
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
    wait = _Wait(path, file.wait_seconds, log or lean_process.report, file.wait_setting)
    while True:
        try:
            connection = duckdb.connect(
                str(path),
                read_only=True,
                config={"memory_limit": file.memory_limit, "threads": file.threads, **NO_EXTENSION_DOWNLOADS},
            )
            configure_memory_limit(connection, file.memory_limit)
            return connection
        except duckdb.IOException as error:
            if not DUCKDB_LOCK_CONFLICT.search(str(error)):
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

    def __init__(self, path: Path, seconds: float, log: Callable[[str], None], setting: str | None) -> None:
        # What sets the bound, as the messages name it: none where their reader cannot set it.
        self.path, self.seconds, self.log, self.setting = path, seconds, log, setting
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
                f" waits{f' ({self.setting})' if self.setting else ''}, by {holder}: {what_to_do} and run again; every"
                " table is as it was"
            )
        if now >= self.next_log:
            self.next_log = now + WAIT_LOG_SECONDS
            self.log(
                f"waiting {waited:.0f} s for {self.path} (at most {self.seconds:g} s{f', {self.setting}' if self.setting else ''}): held by {holder}"
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
DUCKDB_LOCK_CONFLICT = re.compile(r"Could not set lock on file|Conflicting lock is held")
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
    wait_setting: str | None = ENVIRONMENT.duckdb_wait

    def open(self, log: Callable[[str], None] | None = None) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """``connect`` with these settings: the lock, the bounded wait, the limits."""
        return connect(
            self.database,
            memory_limit=self.memory_limit,
            threads=self.threads,
            wait_seconds=self.wait_seconds,
            wait_setting=self.wait_setting,
            log=log,
        )


def database_path(path: str) -> str:
    """Resolve a relative database path against the working directory, as users expect."""
    return path if path == ":memory:" else os.path.abspath(path)


def without_values(message: str) -> str:
    """A DuckDB message without the JSON it quotes (a whole record, e-mail included)."""
    return shortened_message(re.sub(r"[\[{].*[\]}]", "{...}", message, flags=re.S))


def shortened_message(message: str, limit: int = 600) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
