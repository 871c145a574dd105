"""The DuckDB file, looked at before a run fetches anything.

A run reads the whole account before it writes: a file it cannot use, found only at the
write, cost every request of the fetch and ended in DuckDB's traceback. So before the first
request the file is checked, and a problem fails the run in one line naming the file, what is
wrong and what to do. Nothing is created or changed by the check, so a run that fails before
its write leaves no empty file behind:

- an existing file is a regular file that begins with DuckDB's header (a SQLite database
  would have DuckDB reach for its sqlite extension), can be opened for writing, opens in DuckDB
  and holds the blocks its header counts (a truncated file opens, and fails only when the
  merge reads a missing block);
- its directory can be written (DuckDB writes ``<file>.wal`` beside it, this project its lock
  ``<file>.lock``), and the lock and the write-ahead log, if they exist, can be opened for
  writing;
- a file that does not exist yet can be made: its directory can be written or, missing, can
  be created in its nearest existing ancestor.

"Can be written" is asked of the OS by opening for writing (an unnamed ``O_TMPFILE`` for a
directory), not by reading modes: root passes any mode, yet a read-only mount or an immutable
file (``chattr +i``) refuses root too.

Standard library and DuckDB only: it runs in the lean DuckDB worker.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from mkt_assets.core.errors import DATABASE_SETTING, WarehouseFileError
from mkt_assets.warehouse.connection import DUCKDB_LOCK_CONFLICT, NO_EXTENSION_DOWNLOADS, without_values

# DuckDB's main header and its two database headers, before the first block.
HEADER_BYTES = 3 * 4096
_DUCKDB_MAGIC = b"DUCK"  # at offset 8, after the main header's checksum
_SQLITE_MAGIC = b"SQLite format 3\x00"
_ELSEWHERE = f"or set {DATABASE_SETTING} to another file"


def _problem(path: Path, what: str, to_do: str) -> WarehouseFileError:
    return WarehouseFileError(f"{path}: {what}; {to_do}")


@contextmanager
def inspected(database: str) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """Check the file (raising ``WarehouseFileError``), then a read-only connection to it for
    more checks; None for a file that does not exist yet, or one a writer holds right now
    (a DuckDB file, then: the write checks it again when it has it)."""
    if database == ":memory:":
        yield None
        return
    path = Path(database)
    if not _check_path(path):
        yield None
        return
    try:
        connection = duckdb.connect(str(path), read_only=True, config={"threads": 1, **NO_EXTENSION_DOWNLOADS})
    except duckdb.Error as error:
        if DUCKDB_LOCK_CONFLICT.search(str(error)):
            yield None
            return
        raise _problem(
            path, f"DuckDB cannot open it ({without_values(str(error))})", f"restore it from a backup, {_ELSEWHERE}"
        ) from None
    with connection:
        _check_blocks(path, connection)
        yield connection


def _check_path(path: Path) -> bool:
    """What the OS says of the file, its directory and its lock; whether the file exists."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            # DuckDB follows the link: the file would be made at its target, whose directory
            # the write does not create (a volume not mounted, say).
            target = Path(os.path.realpath(path))
            if not target.parent.is_dir():
                raise _problem(
                    path,
                    f"it is a symbolic link to {target}, whose directory does not exist",
                    f"create {target.parent} (or mount its volume), {_ELSEWHERE}",
                ) from None
            _check_creatable(target)
            return False
        _check_creatable(path)
        return False
    except OSError as error:  # a parent that is a file, a directory we may not enter, a symlink loop
        raise _problem(path, f"it cannot be reached ({error.strerror})", f"fix the path, {_ELSEWHERE}") from None
    if stat.S_ISDIR(info.st_mode):
        raise _problem(
            path, "it is a directory, not a DuckDB file", f"set {DATABASE_SETTING} to a file, e.g. {path / 'mkt_assets.duckdb'}"
        )
    if not stat.S_ISREG(info.st_mode):
        raise _problem(path, "it is not a regular file", _ELSEWHERE.removeprefix("or "))
    try:
        with open(path, "rb") as file:
            header = file.read(HEADER_BYTES)
    except OSError as error:
        raise _problem(path, f"it cannot be read ({error.strerror})", f"give yourself read permission on it, {_ELSEWHERE}") from None
    if header.startswith(_SQLITE_MAGIC):
        raise _problem(path, "it is a SQLite database, not a DuckDB one", f"set {DATABASE_SETTING} to a DuckDB file")
    if header[8:12] != _DUCKDB_MAGIC:
        raise _problem(
            path,
            "it is not a DuckDB database (it does not begin with DuckDB's header)",
            f"set {DATABASE_SETTING} to a DuckDB file, or to a path where none exists yet to start one",
        )
    _check_opens_for_writing(path, path, "it")
    _check_writable_directory(path, path.parent)
    for companion, what in ((Path(f"{path}.lock"), "its lock file"), (Path(f"{path}.wal"), "its write-ahead log")):
        if os.path.lexists(companion):
            _check_opens_for_writing(path, companion, what)
    return True


def _check_opens_for_writing(path: Path, file: Path, what: str) -> None:
    """``file`` opens read-write (as the write will open it), else the problem; nothing is written."""
    try:
        os.close(os.open(file, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        named = "it" if file == path else f"{what} {file}"
        raise _problem(path, f"{named} cannot be opened for writing ({error.strerror})", _writable_advice(error)) from None


def _check_writable_directory(path: Path, directory: Path) -> None:
    """DuckDB writes its write-ahead log and this project its lock in ``directory``."""
    problem = _directory_write_problem(directory)
    if problem is not None:
        raise _problem(
            path,
            f"its directory {directory} cannot be written ({problem.strerror}), and the sync writes"
            f" {path.name}.wal and {path.name}.lock in it",
            _writable_advice(problem),
        )


def _check_creatable(path: Path) -> None:
    """A new file: its directory, or the nearest existing ancestor that would hold the missing
    ones (created 0700 by the write), must be a directory that can be written."""
    directory = path.parent
    ancestor = directory
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        raise _problem(path, f"{ancestor} is not a directory, so the file cannot be created", f"fix the path, {_ELSEWHERE}")
    problem = _directory_write_problem(ancestor)
    if problem is None:
        return
    if ancestor == directory:
        what = f"it does not exist, and its directory {directory} cannot be written ({problem.strerror})"
    else:
        what = f"it does not exist, and its directory {directory} cannot be created in {ancestor} ({problem.strerror})"
    raise _problem(path, what, _writable_advice(problem))


def _directory_write_problem(directory: Path) -> OSError | None:
    """Why nothing can be created in ``directory`` (None: it can). An unnamed temporary file
    leaves nothing behind; a file system without them is asked with access(2)."""
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        return None
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return error
    except AttributeError:
        pass  # no O_TMPFILE outside Linux
    if os.access(directory, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    return OSError(errno.EACCES, os.strerror(errno.EACCES))


def _writable_advice(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return f"mount it read-write, {_ELSEWHERE}"
    if error.errno == errno.EPERM:
        # What even root meets on an immutable or append-only file or directory.
        return f"it may be marked immutable or append-only (lsattr shows it, chattr -i -a clears it), {_ELSEWHERE}"
    if error.errno == errno.EISDIR:
        return f"it is a directory: remove it, {_ELSEWHERE}"
    return f"give yourself write permission on it, {_ELSEWHERE}"


def _check_blocks(path: Path, connection: duckdb.DuckDBPyConnection) -> None:
    """The file holds whole blocks, at least as many as are in use: DuckDB reads a block only
    when a query needs it, so a truncated file would fail in the middle of the merge.

    Not every block the header counts: a checkpoint cuts free blocks off the end of the file
    (a table dropped, a normalized table rebuilt smaller) while ``total_blocks`` still counts
    them, and a healthy file would be refused."""
    row = connection.execute(
        "SELECT block_size, used_blocks FROM pragma_database_size() WHERE database_name = current_database()"
    ).fetchone()
    if row is None:
        return
    block_size, used = int(row[0]), int(row[1])
    size = os.stat(path).st_size
    whole, cut = divmod(max(size - HEADER_BYTES, 0), block_size)
    if size < HEADER_BYTES or cut or whole < used:
        counted = HEADER_BYTES + block_size * max(used, whole + (1 if cut else 0))
        raise _problem(
            path,
            f"it is truncated: it holds {size} bytes where its blocks need {counted}",
            f"restore it from a backup, or move it away to start a new file, {_ELSEWHERE}",
        )
