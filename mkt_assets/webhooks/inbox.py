"""The webhook inbox: every accepted delivery, durable and deduplicated, in a private SQLite file.

The receiver adds deliveries from its request threads; Dagster (a sensor in the code server or
the daemon, a refresh run) reads them from other processes, by ``seq``. SQLite in WAL mode
lets one writer and any number of readers in other processes work at once, each reader seeing
whole commits only; ``synchronous=FULL`` makes a commit durable (its write-ahead log synced)
before ``add`` returns, so a delivery answered 2xx survives a crash of the receiver, or of the
machine, right after. Every wait for another process's lock is bounded (``busy_seconds``).

``seq`` is the order of arrival and a reader's cursor: SQLite commits one write at a time and
``add`` takes its ``seq`` inside its transaction, so a higher ``seq`` never becomes visible
before a lower one, and a reader that has seen ``seq`` n has seen everything up to n. An
AUTOINCREMENT key is never reused, even for the last row once deleted.

The same body twice (the platform retrying a delivery it thinks failed) is one delivery: the
digest of the raw body is unique. So is the same change sent twice with the same body, such
as a tag added, removed and added again to one contact if the platform's bodies carry no time
or delivery id: the refresh that the first one starts reads the contact as it is then.

The file holds contacts' data: it is made 0600 in a directory nobody else may write in (a
missing one is made 0700), opened only if it is a regular file of this user's, 0600, not a
symlink, as are the write-ahead log and shared-memory files SQLite keeps beside it (SQLite
gives those the database's mode). A file that is not an inbox (the DuckDB file, another SQLite
database) is refused, never altered.

No Dagster, no DuckDB, no HTTP: the standard library and the private files.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mkt_assets.core.deliveries import Delivery, DeliveryFacts, body_digest
from mkt_assets.core.errors import (
    ConfigurationError,
    InboxBusyError,
    InboxError,
    InboxUnavailableError,
    PrivateDirectoryError,
    PrivateFileError,
)
from mkt_assets.plumbing.private_files import guarded_directory, open_private_file

INBOX_SUFFIX = ".webhooks.sqlite"
DUCKDB_SUFFIX = ".duckdb"
# The longest an opening, a write or a read waits for another process holding the file.
DEFAULT_BUSY_SECONDS = 10.0
# The most deliveries one ``since`` returns: a reader pages on from the last one's seq.
MAX_READ = 10_000
# Marks the file as this project's inbox (PRAGMA application_id): b"mktw".
APPLICATION_ID = 0x6D6B7477
SCHEMA_VERSION = 1
# The files SQLite keeps beside the database (WAL mode uses the first two).
_COMPANIONS = ("-wal", "-shm", "-journal")
_SQLITE_HEADER = b"SQLite format 3\x00"
_DUCKDB_MAGIC = b"DUCK"  # at offset 8
_ADVICE = "keep the inbox in a directory of your own (mode 0700), or give another path (--inbox)"

_SCHEMA = """
CREATE TABLE deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL UNIQUE,
    received_at TEXT NOT NULL,
    event_type TEXT,
    contact_id INTEGER CHECK (contact_id IS NULL OR contact_id > 0),
    signature_verified INTEGER NOT NULL CHECK (signature_verified IN (0, 1)),
    body TEXT NOT NULL
)
"""
_COLUMNS = "seq, received_at, event_type, contact_id, signature_verified, digest, body"


def default_inbox_path(database: str) -> Path:
    """``<database without .duckdb>.webhooks.sqlite`` beside the warehouse's DuckDB file: one
    inbox per warehouse file, so per component instance. A relative ``database`` is taken
    from the working directory, as the warehouse takes it."""
    if database == ":memory:":
        raise ConfigurationError(
            "an in-memory warehouse (:memory:) has no file to keep the webhook inbox beside: give the inbox's path"
        )
    path = Path(os.path.abspath(database))
    stem = path.name.removesuffix(DUCKDB_SUFFIX) if path.name != DUCKDB_SUFFIX else path.name
    return path.with_name(stem + INBOX_SUFFIX)


class Inbox:
    """The inbox at ``path``, created if missing. Safe to share between threads; any number of
    processes may open the same file at once."""

    def __init__(self, path: str | os.PathLike[str], *, busy_seconds: float = DEFAULT_BUSY_SECONDS) -> None:
        if not busy_seconds > 0:
            raise ValueError(f"busy_seconds must be positive, got {busy_seconds}")
        self.path = Path(os.path.abspath(path))
        self.busy_seconds = busy_seconds
        self._lock = threading.Lock()
        self._db = self._open()

    def __repr__(self) -> str:
        return f"Inbox({str(self.path)!r})"

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- writing

    def add(
        self,
        body: bytes,
        facts: DeliveryFacts,
        *,
        signature_verified: bool = True,
        received_at: datetime | None = None,
    ) -> tuple[int, bool]:
        """Keep a delivery (``body`` as received, UTF-8 JSON) durably: committed to disk when
        this returns. Its ``seq`` and whether it is new; the same body again is not kept twice
        and answers the first one's ``seq``."""
        digest = body_digest(body)
        text = body.decode("utf-8")
        when = (received_at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat()
        with self._lock, self._sqlite_errors("keep a delivery"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # Looked up first, inside the write transaction: an INSERT that meets the
                # UNIQUE digest would still use up a seq.
                found = self._db.execute("SELECT seq FROM deliveries WHERE digest = ?", (digest,)).fetchall()
                if found:
                    seq, new = int(found[0][0]), False
                else:
                    (row,) = self._db.execute(
                        "INSERT INTO deliveries (digest, received_at, event_type, contact_id, signature_verified, body)"
                        " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
                        (digest, when, facts.event_type, facts.contact_id, int(signature_verified), text),
                    ).fetchall()
                    seq, new = int(row[0]), True
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return seq, new

    # ---------------------------------------------------------------- reading

    def since(self, seq: int, limit: int = 1000) -> list[Delivery]:
        """The deliveries after ``seq`` (0: from the first), in order, at most ``limit``."""
        if not 1 <= limit <= MAX_READ:
            raise ValueError(f"limit must be 1..{MAX_READ}, got {limit}")
        with self._lock, self._sqlite_errors("read deliveries"):
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        return [_delivery(row) for row in rows]

    def last_seq(self) -> int:
        """The ``seq`` of the latest delivery; 0 if there is none."""
        with self._lock, self._sqlite_errors("read the last seq"):
            (row,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM deliveries").fetchall()
        return int(row[0])

    def count(self) -> int:
        with self._lock, self._sqlite_errors("count deliveries"):
            (row,) = self._db.execute("SELECT count(*) FROM deliveries").fetchall()
        return int(row[0])

    # ---------------------------------------------------------------- opening

    def _open(self) -> sqlite3.Connection:
        try:
            guarded_directory(self.path.parent, _ADVICE)
            try:
                descriptor = open_private_file(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
                created = True
                os.fchmod(descriptor, 0o600)  # exactly, whatever the umask: SQLite must write it
            except FileExistsError:
                descriptor = open_private_file(self.path, os.O_RDWR)
                created = False
        except PrivateDirectoryError as error:  # PrivateFileError included
            raise InboxError(f"the webhook inbox: {error}") from None
        except OSError as error:
            raise InboxError(f"the webhook inbox {self.path} cannot be opened ({error.strerror}); {_ADVICE}") from None
        try:
            opened = os.fstat(descriptor)
            self._check_header(os.pread(descriptor, 16, 0))
            self._check_companions()
            try:
                database = sqlite3.connect(
                    str(self.path), timeout=self.busy_seconds, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as error:
                raise InboxError(f"the webhook inbox {self.path} cannot be opened by SQLite ({error})") from None
            now = os.stat(self.path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                database.close()
                raise InboxError(f"the webhook inbox {self.path} was replaced as it was opened; {_ADVICE}")
        finally:
            os.close(descriptor)
        try:
            with self._sqlite_errors("open the inbox"):
                self._prepare(database)
        except BaseException:
            database.close()
            raise
        if created:
            _sync_directory(self.path.parent)  # a new file: its name must survive a crash too
        return database

    def _check_header(self, header: bytes) -> None:
        if not header or header.startswith(_SQLITE_HEADER):
            return
        if header[8:12] == _DUCKDB_MAGIC:
            what = "a DuckDB database (the warehouse's file?)"
        else:
            what = "not a SQLite database"
        raise InboxError(f"the webhook inbox {self.path}: it is {what}, not a webhook inbox; give the inbox its own path")

    def _check_companions(self) -> None:
        for suffix in _COMPANIONS:
            companion = Path(f"{self.path}{suffix}")
            if not os.path.lexists(companion):
                continue
            try:
                os.close(open_private_file(companion, os.O_RDONLY))
            except PrivateFileError as error:
                raise InboxError(f"the webhook inbox: {error}") from None

    def _prepare(self, database: sqlite3.Connection) -> None:
        # A schema is SQL the file carries: none of its functions or triggers may run here.
        database.execute("PRAGMA trusted_schema = OFF")
        # Judged before anything is changed (WAL mode rewrites the header): a file of something
        # else is refused as it was found. An inbox already made needs no write lock to open,
        # so a reader opens it while the receiver writes.
        if self._judge(database):
            self._set_modes(database)
            return
        self._set_modes(database)
        database.execute("BEGIN IMMEDIATE")
        try:
            if not self._judge(database):  # not made meanwhile by another process
                database.execute(_SCHEMA)
                database.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                database.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            database.execute("COMMIT")
        except BaseException:
            if database.in_transaction:
                database.execute("ROLLBACK")
            raise

    def _judge(self, database: sqlite3.Connection) -> bool:
        """Whether the file is an inbox of this format (False: an empty database, to be made
        one); ``InboxError`` for anything else."""
        (application,) = database.execute("PRAGMA application_id").fetchone()
        (version,) = database.execute("PRAGMA user_version").fetchone()
        (objects,) = database.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        if application == 0 and objects == 0:
            return False
        if application != APPLICATION_ID:
            raise InboxError(
                f"the webhook inbox {self.path}: it is a SQLite database of something else, not a webhook inbox;"
                " it is left as it is: give the inbox its own path"
            )
        if version != SCHEMA_VERSION:
            raise InboxError(
                f"the webhook inbox {self.path} has version {version} of its format, this version reads"
                f" {SCHEMA_VERSION}: run the version of mkt-assets that made it, or give another path"
            )
        return True

    def _set_modes(self, database: sqlite3.Connection) -> None:
        (mode,) = database.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise InboxError(f"the webhook inbox {self.path}: SQLite cannot keep it in WAL mode (it stays {mode})")
        # Every commit waits for its write-ahead log to reach the disk: a delivery answered is kept.
        database.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _sqlite_errors(self, what: str) -> Iterator[None]:
        """SQLite's errors as the project's, naming the file; a lock held past the bounded
        wait is ``InboxBusyError``."""
        try:
            yield
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                raise InboxBusyError(
                    f"the webhook inbox {self.path}: could not {what}: another process held it for more than"
                    f" {self.busy_seconds:g} s"
                ) from None
            raise InboxUnavailableError(f"the webhook inbox {self.path}: could not {what}: {error}") from None
        except sqlite3.DatabaseError as error:
            raise InboxError(f"the webhook inbox {self.path}: could not {what}: {error}") from None


def _delivery(row: tuple[Any, ...]) -> Delivery:
    seq, received_at, event_type, contact_id, verified, digest, body = row
    return Delivery(
        seq=int(seq),
        received_at=datetime.fromisoformat(str(received_at)),
        event_type=None if event_type is None else str(event_type),
        contact_id=None if contact_id is None else int(contact_id),
        signature_verified=bool(verified),
        digest=str(digest),
        body=str(body),
    )


def _sync_directory(directory: Path) -> None:
    """Make the file's name in ``directory`` durable, as SQLite does for its write-ahead log."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # a file system that cannot sync a directory
            raise
    finally:
        os.close(descriptor)
