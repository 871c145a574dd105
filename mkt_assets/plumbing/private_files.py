"""Private files: what a sync keeps outside the database's own directory.

Staged chunks hold contacts' e-mail addresses and the quota state decides how long every
sync on the machine waits, so both live in a directory only this user can enter: by default
``<temp>/mkt_assets-<uid>/`` (the pattern of tmux and ssh-agent), created 0700 and, when it
already exists, checked on every start to be a real directory of ours that nobody else may
enter. In it every file is opened without following a symlink and checked to be ours and
0600, so a file planted or redirected by someone else is refused, never obeyed or overwritten.

Staging is claimed per process: a process stages in an area of its own, ``<pid>-<random>/``,
and holds an exclusive ``flock`` on the area's lock file for its whole life. Its lean child
processes inherit that lock's open file description (``lean_process`` passes it on), and a
flock lasts while any descriptor of it is open, so the area stays locked while any of them
lives, even one orphaned by a killed step. An area whose lock can be taken has no owner
left: the next run sweeps it.

Standard library only: the DuckDB worker imports this module.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mkt_assets.core.errors import PrivateDirectoryError, PrivateFileError

AREA_LOCK_NAME = ".lock"
_AREA_NAME = re.compile(r"\d+-[0-9a-f]{16}")
_CLAIMING_PREFIX = ".claiming-"
# A claim takes microseconds: a half-made one this old was cut short by a kill.
_ABANDONED_CLAIM_SECONDS = 3600.0
_ADVICE = "remove it, or set staging_dir / quota_state_dir to a directory of your own (mode 0700)"


def default_work_directory() -> Path:
    """``<temp>/mkt_assets-<uid>``: one per user, so users never share (or fight over) it."""
    return Path(tempfile.gettempdir()) / f"mkt_assets-{os.getuid()}"


def default_private_directory(name: str) -> Path:
    """``<temp>/mkt_assets-<uid>/<name>``, the work directory checked private as well: whoever
    owned it could swap the subdirectory for a symlink under our feet."""
    return private_directory(private_directory(default_work_directory()) / name)


def private_directory(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` 0700 (and missing parents, 0700 too), or check the existing one is a
    real directory of ours that group and others cannot enter; its absolute path."""
    directory = Path(os.path.abspath(path))
    try:
        info = os.lstat(directory)
        created = False
    except FileNotFoundError:
        created = _make_directory(directory)
        info = _lstat(directory)
    if created and _directory_problem(info) is None and stat.S_IMODE(info.st_mode) != 0o700:
        # Ours, new and empty, narrowed by the umask (mkdir's 0o700 can only lose bits):
        # set it exactly so the owner can use it whatever the umask.
        os.chmod(directory, 0o700)
        info = _lstat(directory)
    problem = _directory_problem(info)
    if problem is not None:
        raise PrivateDirectoryError(f"refusing {directory} for private files: {problem}")
    return directory


def guarded_directory(path: str | os.PathLike[str], advice: str) -> Path:
    """Create ``path`` 0700 (and missing parents, 0700 too), or check the existing directory
    (reached through symlinks, as the DuckDB file's directory may be) is ours or root's and
    that nobody else may create, rename or remove files in it; its absolute path.

    Laxer than ``private_directory``: for private files (0600, opened without following a
    symlink) kept beside files of the user's own, such as the DuckDB file's directory, which
    others may list. What must hold is that nobody else can plant a file or a symlink under a
    name one of ours will take. ``advice``: what to do instead, ending each refusal."""
    directory = Path(os.path.abspath(path))
    if not os.path.lexists(directory):
        try:
            _make_directory(directory)
        except PrivateDirectoryError as error:
            cause = error.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else str(error)
            raise PrivateDirectoryError(f"cannot create {directory} for private files: {reason}; {advice}") from cause
    try:
        info = os.stat(directory)
    except OSError as error:
        raise PrivateDirectoryError(
            f"refusing {directory} for private files: it cannot be reached ({error.strerror}); {advice}"
        ) from None
    uid = os.getuid()
    problem = None
    if not stat.S_ISDIR(info.st_mode):
        problem = "it is not a directory"
    elif info.st_uid not in (uid, 0):
        problem = f"it is owned by uid {info.st_uid}, not you (uid {uid})"
    elif stat.S_IMODE(info.st_mode) & 0o022:
        problem = f"its mode is {stat.S_IMODE(info.st_mode):04o}: group or others may create files in it"
    if problem is not None:
        raise PrivateDirectoryError(f"refusing {directory} for private files: {problem}; {advice}")
    return directory


def open_private_file(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` that never follows a symlink and only returns a regular file of ours, 0600."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise PrivateFileError(
                f"refusing {path}: it is a symbolic link (to {os.readlink(path)}), which would point"
                " this file's writes at another file; remove it"
            ) from None
        raise
    try:
        problem = _file_problem(os.fstat(descriptor))
    except BaseException:
        os.close(descriptor)
        raise
    if problem is not None:
        os.close(descriptor)
        raise PrivateFileError(f"refusing {path}: {problem}")
    return descriptor


@dataclass(frozen=True)
class ProcessArea:
    """A process's own staging subdirectory, and the open lock that says its owner lives."""

    path: Path
    lock_fd: int


_claims_lock = threading.Lock()
_claims: dict[Path, ProcessArea] = {}


def claim_area(parent: str | os.PathLike[str]) -> Path:
    """This process's own area in ``parent`` (made private), claimed on first use, then cached."""
    directory = Path(os.path.abspath(parent))
    with _claims_lock:
        area = _claims.get(directory)
        if area is not None:
            if os.path.isdir(area.path):
                return area.path
            os.close(area.lock_fd)  # removed by hand under a live process: claim afresh
        area = _claims[directory] = _claim(private_directory(directory))
        return area.path


def area_lock_fds() -> tuple[int, ...]:
    """The lock descriptors of this process's areas, for its children to inherit."""
    with _claims_lock:
        return tuple(area.lock_fd for area in _claims.values())


def sweep_dead_areas(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove the areas in ``parent`` no live process holds; the paths removed."""
    directory = Path(os.path.abspath(parent))
    with _claims_lock:
        own = {area.path for area in _claims.values()}
    now = time.time()
    swept: list[Path] = []
    for entry in _entries(directory):
        path = Path(entry.path)
        if path in own or not entry.is_dir(follow_symlinks=False):
            continue
        if _AREA_NAME.fullmatch(entry.name):
            if _remove_unlocked(path, missing_lock_means_dead=False):
                swept.append(path)
        elif entry.name.startswith(_CLAIMING_PREFIX) and _AREA_NAME.fullmatch(entry.name[len(_CLAIMING_PREFIX) :]):
            # A young one may be a claim in progress, its lock file made but not yet locked.
            old = now - entry.stat(follow_symlinks=False).st_mtime > _ABANDONED_CLAIM_SECONDS
            if old and _remove_unlocked(path, missing_lock_means_dead=True):
                swept.append(path)
    return swept


def _claim(parent: Path) -> ProcessArea:
    name = f"{os.getpid()}-{secrets.token_hex(8)}"
    # Made under a name the sweep does not take for an area, and renamed once locked: an area
    # is never seen with its lock free while its owner lives.
    claiming = private_directory(parent / f"{_CLAIMING_PREFIX}{name}")
    lock = open_private_file(claiming / AREA_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(lock, f"{os.getpid()}\n".encode())  # for a human looking
        area = parent / name
        os.rename(claiming, area)
    except BaseException:
        os.close(lock)
        shutil.rmtree(claiming, ignore_errors=True)
        raise
    return ProcessArea(area, lock)


def _remove_unlocked(area: Path, *, missing_lock_means_dead: bool) -> bool:
    try:
        lock: int | None = open_private_file(area / AREA_LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        if not missing_lock_means_dead:
            return False  # not made by a claim (which locks before it names an area): leave it
        lock = None
    except OSError:  # PrivateFileError included: not an area this code made, not ours to judge
        return False
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its process, or a child it started, still lives
        # Descriptor-based on Linux: never follows a symlink inside, refuses one at the top.
        shutil.rmtree(area, ignore_errors=True)
        return not os.path.lexists(area)
    finally:
        if lock is not None:
            os.close(lock)


def _release_claims() -> None:
    # At a normal exit, tidy up at once what the next run would otherwise sweep, unless a
    # child still holds the lock (it may be using the files).
    with _claims_lock:
        areas = list(_claims.values())
        _claims.clear()
    for area in areas:
        os.close(area.lock_fd)
        _remove_unlocked(area.path, missing_lock_means_dead=False)


def _forget_inherited_claims() -> None:
    # A forked child keeps its parent's lock descriptors open (so the parent's area stays
    # locked while it lives, which is right: it may use the files), but the areas are the
    # parent's: the child claims its own, and must not remove the parent's at its exit.
    global _claims_lock
    _claims_lock = threading.Lock()
    _claims.clear()


atexit.register(_release_claims)
os.register_at_fork(after_in_child=_forget_inherited_claims)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _make_directory(directory: Path) -> bool:
    """Create ``directory`` 0700 with any missing parents; whether this call created it."""
    missing = []
    ancestor = directory.parent
    while not os.path.lexists(ancestor):
        missing.append(ancestor)
        ancestor = ancestor.parent
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # made meanwhile by a concurrent start
            os.chmod(path, 0o700)  # a umask like 0277 would leave it unusable for the next level
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return False
    except OSError as error:
        raise PrivateDirectoryError(
            f"cannot create {directory} for private files: {error.strerror}; set staging_dir /"
            " quota_state_dir to a directory you may create"
        ) from error
    return True


def _lstat(directory: Path) -> os.stat_result:
    try:
        return os.lstat(directory)
    except FileNotFoundError:
        raise PrivateDirectoryError(f"refusing {directory} for private files: it vanished as it was made") from None


def _directory_problem(info: os.stat_result) -> str | None:
    uid = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        return f"it is a symbolic link, which could lead anywhere; {_ADVICE}"
    if not stat.S_ISDIR(info.st_mode):
        return f"it is not a directory; {_ADVICE}"
    if info.st_uid != uid:
        return f"it is owned by uid {info.st_uid}, not you (uid {uid}); {_ADVICE}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            f"its mode is {mode:04o}: group or others have access to it; if it is yours and holds"
            f" nothing of anyone else, chmod 700 it, or {_ADVICE}"
        )
    return None


def _file_problem(info: os.stat_result) -> str | None:
    uid = os.getuid()
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file; remove it"
    if info.st_uid != uid:
        return f"it is owned by uid {info.st_uid}, not you (uid {uid}); remove it"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return f"its mode is {mode:04o}: group or others may read or change it; remove it"
    return None
