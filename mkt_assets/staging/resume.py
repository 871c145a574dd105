"""Reads that outlive a failed run: staged pages kept with a checkpoint, for the next run to
continue instead of reading every page again.

A resumable read stages into a directory of its own, ``<staging>/resumable/<resource>-<id>/``,
named by what identifies the read (``read_identity``: the base URL, the account, the catalog's
spec of the resource, the walk's order, the warehouse and its deletions mode, and an
incremental read's starting key). Beside its chunks it keeps ``checkpoint.json``: the chunks
and how many of their bytes hold whole pages, and where each end of the walk stopped. The
checkpoint is replaced atomically (temp file, fsync, rename, fsync of the directory) only
after the chunk bytes it names are on disk, so a kill at any moment leaves either the old
checkpoint or the new one, each naming only bytes that were written.

While a run reads, it holds an exclusive ``flock`` on the directory's ``.lock``: a second run
of the same read finds it taken and reads afresh elsewhere. A read no one holds is adopted
by the next run with the same identity if its first attempt began within the window, and
swept otherwise. The account is known by a digest of its key; neither the key nor its own
hash is stored.

Standard library only: the DuckDB worker imports ``staging``, which imports this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from mkt_assets.plumbing.private_files import AREA_LOCK_NAME, open_private_file, private_directory

RESUMABLE_DIRECTORY = "resumable"
CHECKPOINT_NAME = "checkpoint.json"
# Bumped whenever the checkpoint's meaning changes: an older one is then swept, never adopted.
CHECKPOINT_FORMAT = 1
_TEMPORARY = ".checkpoint.json.tmp"
# What the stager names its chunks (mkstemp adds 8 characters): nothing else is ever adopted.
_CHUNK_NAME = re.compile(r"mkt_[a-z0-9_]+_\d{5}_[a-z0-9_]{8}\.ndjson")
_READ_NAME = re.compile(r"[a-z0-9_]+-[0-9a-f]{32}")

# The locks of the reads this process holds, by directory: released on commit or failure.
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def read_identity(
    *, base_url: str, api_key: str, order: str, database: str, schema: str, deletions: str
) -> str:
    """What a resumable read of this deployment shares with any other it may continue: a
    digest, in which the key is itself only a digest (never stored, nor its hash alone)."""
    account = hashlib.sha256(api_key.encode()).hexdigest()
    parts = [CHECKPOINT_FORMAT, base_url.rstrip("/"), account, order, database, schema, deletions]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def resource_identity(common: str, spec: object, after: int | None) -> str:
    """``common`` narrowed to one resource as the catalog now describes it (its whole spec:
    a changed column or path is another read) and to where an incremental read starts."""
    parts = [common, repr(spec), after]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ResumeOptions:
    """What a run needs to resume reads: its identity (without the resource), how long a
    read may be continued after its first attempt began (zero: never), and who it is."""

    identity: str
    window: timedelta
    run_id: str


@dataclass
class ResumableRead:
    """One resource's read in its own directory, locked by this process."""

    directory: Path
    identity: str
    resource: str
    run_id: str
    # The checkpoint left by an earlier attempt, adopted (None: a fresh read).
    adopted: dict[str, Any] | None = None
    # Why an earlier attempt's pages were not adopted, for the run's log (None: none found).
    refused: str | None = None
    began: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # A checkpoint is on disk (adopted, or saved by this run): there is something to resume.
    checkpointed: bool = False

    @property
    def first_run(self) -> str:
        return str(self.adopted["first_run"]) if self.adopted else self.run_id

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the checkpoint with ``state`` (plus who and when), durably and atomically."""
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "resource": self.resource,
            "run_id": self.run_id,
            "first_run": self.first_run,
            "began": self.began.isoformat(),
            **state,
        }
        data = json.dumps(checkpoint).encode()
        temporary = self.directory / _TEMPORARY
        descriptor = open_private_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.rename(temporary, self.directory / CHECKPOINT_NAME)
        _fsync_directory(self.directory)
        self.checkpointed = True


def open_read(
    parent: Path, resource: str, identity: str, run_id: str, window: timedelta, *, setting: str | None
) -> ResumableRead | None:
    """The read of ``resource`` with ``identity`` in ``parent``, locked: adopting the pages an
    earlier attempt left if they match and are within ``window`` (set by ``setting``, which a
    refusal names), else emptied for a fresh read. None when another live process holds it
    (this run then reads without resuming)."""
    directory = private_directory(private_directory(parent / RESUMABLE_DIRECTORY) / f"{resource}-{identity[:32]}")
    lock = open_private_file(directory / AREA_LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    except BaseException:
        os.close(lock)
        raise
    with _held_lock:
        _held[directory] = lock
    read = ResumableRead(directory, identity, resource, run_id)
    checkpoint, problem = _load(directory)
    if checkpoint is not None:
        problem = _mismatch(checkpoint, identity, resource, window, setting)
    if checkpoint is not None and problem is None:
        problem = _restore_chunks(directory, checkpoint)
    if checkpoint is not None and problem is None:
        read.adopted = checkpoint
        read.checkpointed = True
        read.began = datetime.fromisoformat(checkpoint["began"])
    else:
        read.refused = problem if checkpoint is not None else None
        _empty(directory)
    return read


def release(directory: Path) -> None:
    """Let the next run adopt the read in ``directory`` (this process holds it no more)."""
    with _held_lock:
        lock = _held.pop(directory, None)
    if lock is not None:
        os.close(lock)


def remove(directory: Path) -> None:
    """The read was committed (or is of no further use): remove it, then release it."""
    shutil.rmtree(directory, ignore_errors=True)
    release(directory)


def sweep(
    parent: Path, window: timedelta, *, setting: str | None, now: datetime | None = None
) -> list[tuple[Path, str]]:
    """Remove the reads in ``parent`` no process holds whose window has passed (all of them
    when ``window`` is zero), or whose checkpoint cannot be read; each with why, naming
    ``setting`` as what sets the window (none where its reader cannot set it)."""
    now = now or datetime.now(timezone.utc)
    swept = []
    for directory in _reads(parent / RESUMABLE_DIRECTORY):
        with _held_lock:
            if directory in _held:
                continue
        try:
            lock = open_private_file(directory / AREA_LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            lock = None  # cut short as it was made: nothing in it to keep
        except OSError:
            continue  # not a read this code made: not ours to judge
        try:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run reads it
            checkpoint, problem = _load(directory)
            if checkpoint is not None and problem is None:
                began = _began(checkpoint)
                if began is None:
                    problem = "its checkpoint has no valid start time"
                elif window <= timedelta(0):
                    problem = f"resuming is off ({setting}=0)" if setting else "resuming is off"
                elif now - began > window:
                    problem = f"its read began at {began:%Y-%m-%d %H:%M:%S} UTC, more than {window_text(window, setting)} ago"
            elif problem is None:
                problem = "it holds no checkpoint"
            if problem is not None:
                shutil.rmtree(directory, ignore_errors=True)
                swept.append((directory, problem))
        finally:
            if lock is not None:
                os.close(lock)
    return swept


def window_text(window: timedelta, setting: str | None) -> str:
    """``6 hours (MKT_RESUME_HOURS)``: the window as a message says it, naming ``setting`` if any."""
    hours = window / timedelta(hours=1)
    return f"{hours:g} hour{'' if hours == 1 else 's'}" + (f" ({setting})" if setting else "")


def _load(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        descriptor = open_private_file(directory / CHECKPOINT_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"its checkpoint cannot be opened ({error})"
    try:
        with os.fdopen(descriptor, "rb") as handle:
            checkpoint = json.loads(handle.read())
    except (OSError, ValueError) as error:
        return None, f"its checkpoint does not read ({type(error).__name__})"
    if not isinstance(checkpoint, dict):
        return None, "its checkpoint is not an object"
    return checkpoint, None


def _began(checkpoint: Mapping[str, Any]) -> datetime | None:
    try:
        began = datetime.fromisoformat(str(checkpoint.get("began")))
    except ValueError:
        return None
    return began if began.tzinfo is not None else None


def _mismatch(
    checkpoint: Mapping[str, Any], identity: str, resource: str, window: timedelta, setting: str | None
) -> str | None:
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        return f"its checkpoint is of another format ({checkpoint.get('format')!r}, this version writes {CHECKPOINT_FORMAT})"
    if checkpoint.get("identity") != identity or checkpoint.get("resource") != resource:
        return "it is another read (account, base URL, catalog, order, warehouse or deletions mode differ)"
    began = _began(checkpoint)
    if began is None:
        return "its checkpoint has no valid start time"
    age = datetime.now(timezone.utc) - began
    if age > window:
        return f"its read began at {began:%Y-%m-%d %H:%M:%S} UTC, more than {window_text(window, setting)} ago"
    if age < timedelta(0):
        return f"its read began at {began:%Y-%m-%d %H:%M:%S} UTC, in the future (the clock moved)"
    return None


def _restore_chunks(directory: Path, checkpoint: Mapping[str, Any]) -> str | None:
    """Cut each chunk back to the bytes the checkpoint names (a page written after it is read
    again); None, or why the pages cannot be adopted."""
    chunks = checkpoint.get("chunks")
    if not isinstance(chunks, list):
        return "its checkpoint lists no chunks"
    for chunk in chunks:
        name, size = chunk.get("name") if isinstance(chunk, dict) else None, chunk.get("bytes") if isinstance(chunk, dict) else None
        if not isinstance(name, str) or not _CHUNK_NAME.fullmatch(name) or not isinstance(size, int) or size < 0:
            return "its checkpoint names a chunk it should not"
        try:
            descriptor = open_private_file(directory / name, os.O_RDWR)
        except OSError as error:
            return f"chunk {name} is missing or refused ({type(error).__name__})"
        try:
            if os.fstat(descriptor).st_size < size:
                return f"chunk {name} is shorter than its checkpoint says"
            os.ftruncate(descriptor, size)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    kept = {chunk["name"] for chunk in chunks} | {CHECKPOINT_NAME, AREA_LOCK_NAME}
    # Pages past the checkpoint, and Parquet typed from chunks: the new run makes its own.
    for entry in _entries(directory):
        if entry.name not in kept:
            _unlink(entry)
    return None


def _empty(directory: Path) -> None:
    for entry in _entries(directory):
        if entry.name != AREA_LOCK_NAME:
            _unlink(entry)


def _unlink(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _entries(directory: Path) -> Iterable[Path]:
    try:
        with os.scandir(directory) as entries:
            return [Path(entry.path) for entry in entries]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _reads(directory: Path) -> Iterable[Path]:
    """The reads in ``directory``: only what ``open_read`` names so, nothing a user put there."""
    return [path for path in _entries(directory) if _READ_NAME.fullmatch(path.name) and not path.is_symlink()]


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
