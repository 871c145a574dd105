"""Private directories and files, and the per-process staging areas swept after a kill.

The processes here are real and synchronised through pipes, a FIFO and the areas' own locks:
no test sleeps to wait for another process.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mkt_assets.core.catalog import RESOURCES_BY_NAME
from mkt_assets.core.errors import ConfigurationError, PrivateDirectoryError, PrivateFileError
from mkt_assets.plumbing import private_files
from mkt_assets.plumbing.private_files import (
    AREA_LOCK_NAME,
    area_lock_fds,
    claim_area,
    open_private_file,
    private_directory,
    sweep_dead_areas,
)
from mkt_assets.staging.pages import PageStager

TAGS = RESOURCES_BY_NAME["tags"]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail, rather than hang the suite, if a blocking call inside does not return in time."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- private directories -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], ids=["022", "000", "277"])
def test_a_new_private_directory_and_its_missing_parents_are_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        made = private_directory(tmp_path / "a" / "b" / "leaf")
    finally:
        os.umask(previous)

    assert made == tmp_path / "a" / "b" / "leaf"
    assert [mode(path) for path in (tmp_path / "a", tmp_path / "a" / "b", made)] == [0o700, 0o700, 0o700]


def test_a_private_directory_is_returned_absolute_and_an_existing_one_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir(mode=0o700)
    (tmp_path / "mine" / "kept").write_text("x")

    assert private_directory("mine") == tmp_path / "mine"
    assert (tmp_path / "mine" / "kept").read_text() == "x"


def test_a_directory_of_another_user_is_refused_naming_it_and_what_to_do(tmp_path: Path, give_away: Callable[[Path], int]) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    owner = give_away(theirs)

    with pytest.raises(PrivateDirectoryError) as refused:
        private_directory(theirs)

    assert str(refused.value) == (
        f"refusing {theirs} for private files: it is owned by uid {owner}, not you (uid {os.getuid()});"
        " remove it, or set staging_dir / quota_state_dir to a directory of your own (mode 0700)"
    )
    assert isinstance(refused.value, ConfigurationError)


@pytest.mark.parametrize("opened", [0o755, 0o750, 0o701, 0o702])
def test_a_directory_group_or_others_have_access_to_is_refused(tmp_path: Path, opened: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(opened)

    with pytest.raises(PrivateDirectoryError, match=rf"shared for private files: its mode is {opened:04o}: group or others have access"):
        private_directory(shared)
    assert mode(shared) == opened  # refused, not silently "fixed": someone may already be in it


def test_a_symlink_to_a_private_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")

    with pytest.raises(PrivateDirectoryError, match=r"link for private files: it is a symbolic link"):
        private_directory(tmp_path / "link")


def test_a_file_where_the_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(PrivateDirectoryError, match=r"file for private files: it is not a directory"):
        private_directory(tmp_path / "file")


# --- private files ---------------------------------------------------------------------------


def test_a_private_file_is_made_0600_even_under_an_open_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        descriptor = open_private_file(tmp_path / "state", os.O_RDWR | os.O_CREAT)
    finally:
        os.umask(previous)
    os.close(descriptor)

    assert mode(tmp_path / "state") == 0o600


def test_a_symlinked_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("precious")
    (tmp_path / "target").chmod(0o600)
    (tmp_path / "state").symlink_to(tmp_path / "target")

    with pytest.raises(PrivateFileError, match=rf"refusing {re.escape(str(tmp_path / 'state'))}: it is a symbolic link \(to {re.escape(str(tmp_path / 'target'))}\)"):
        open_private_file(tmp_path / "state", os.O_RDWR | os.O_CREAT)
    assert (tmp_path / "target").read_text() == "precious"


def test_a_file_of_another_user_or_readable_by_others_is_refused(tmp_path: Path, give_away: Callable[[Path], int]) -> None:
    (tmp_path / "open").write_text("")
    (tmp_path / "open").chmod(0o644)
    with pytest.raises(PrivateFileError, match=r"open: its mode is 0644"):
        open_private_file(tmp_path / "open", os.O_RDONLY)

    (tmp_path / "theirs").write_text("")
    (tmp_path / "theirs").chmod(0o600)
    owner = give_away(tmp_path / "theirs")
    with pytest.raises(PrivateFileError, match=rf"theirs: it is owned by uid {owner}, not you"):
        open_private_file(tmp_path / "theirs", os.O_RDONLY)


def test_a_directory_is_no_private_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)

    with pytest.raises(PrivateFileError, match=r"dir: it is not a regular file"):
        open_private_file(tmp_path / "dir", os.O_RDONLY)


# --- areas: claimed per process, swept once their owners are gone -------------------------


def test_a_process_claims_one_private_area_per_directory_and_holds_its_lock(tmp_path: Path) -> None:
    area = claim_area(tmp_path)

    assert claim_area(tmp_path) == area
    assert area.parent == tmp_path and re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{16}}", area.name)
    assert (mode(area), mode(area / AREA_LOCK_NAME)) == (0o700, 0o600)
    other = os.open(area / AREA_LOCK_NAME, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # held for the life of this process
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    lock = os.stat(area / AREA_LOCK_NAME)
    assert any((os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (lock.st_dev, lock.st_ino) for fd in area_lock_fds())


def test_the_sweep_never_touches_this_process_area_nor_what_is_not_an_area(tmp_path: Path) -> None:
    area = claim_area(tmp_path)
    (area / "chunk.ndjson").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "123-not-an-area").mkdir()

    assert sweep_dead_areas(tmp_path) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["123-not-an-area", "notes", area.name])
    assert (area / "chunk.ndjson").exists()


def test_an_area_whose_lock_nobody_holds_is_swept_without_following_its_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("kept")
    staging = private_directory(tmp_path / "staging")
    dead = staging / "4242-0123456789abcdef"
    dead.mkdir(mode=0o700)
    os.close(open_private_file(dead / AREA_LOCK_NAME, os.O_RDWR | os.O_CREAT))
    (dead / "mkt_contacts_00001_abcdefgh.ndjson").write_text("{}")
    (dead / "escape").symlink_to(outside)

    assert sweep_dead_areas(staging) == [dead]

    assert not dead.exists()
    assert (outside / "kept").read_text() == "kept"


def test_a_claim_cut_short_is_swept_only_once_it_is_old(tmp_path: Path) -> None:
    young = tmp_path / ".claiming-4242-0123456789abcdef"
    old = tmp_path / ".claiming-4243-0123456789abcdef"
    young.mkdir(mode=0o700)
    old.mkdir(mode=0o700)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    assert sweep_dead_areas(tmp_path) == [old]
    assert young.exists()  # may be a claim in progress, its lock not yet taken


STAGING_RUN = textwrap.dedent(
    """
    import json, sys
    from mkt_assets.core.catalog import RESOURCES_BY_NAME
    from mkt_assets.core.page import Page
    from mkt_assets.staging.pages import PageStager

    items = [{"id": 1, "name": "a", "createdAt": None}]
    with PageStager(RESOURCES_BY_NAME["tags"], directory=sys.argv[1]) as stager:
        stager.add(Page("tags", 1, "/api/tags", {}, items, False, json.dumps({"items": items}).encode()))
        print(stager.finish().paths[0], flush=True)
        sys.stdin.read()  # staged, and holding its claim, until told to go or killed
    """
)


def start_staging_run(staging: Path) -> tuple[subprocess.Popen[str], Path]:
    run = subprocess.Popen(
        [sys.executable, "-c", STAGING_RUN, str(staging)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    with within(60):
        line = run.stdout.readline().strip()
    assert line, f"the staging run ended first (status {run.wait()})"
    return run, Path(line)


def test_the_next_stager_sweeps_the_area_of_a_killed_run_and_leaves_a_live_runs(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    killed, killed_chunk = start_staging_run(staging)
    live, live_chunk = start_staging_run(staging)
    try:
        killed.kill()  # SIGKILL: no cleanup of its own runs
        killed.wait()
        assert killed_chunk.exists()

        with PageStager(TAGS, directory=str(staging)) as stager:
            swept = stager.swept
            stager.finish().discard()

        assert swept == [killed_chunk.parent]
        assert not killed_chunk.parent.exists()
        assert live_chunk.read_text().startswith('{"page":1')
    finally:
        live.communicate("")  # told to go: it leaves normally
    assert not live_chunk.parent.exists()  # and tidied its own area as it went


ORPHANING_STEP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mkt_assets.plumbing import lean_process
    from mkt_assets.plumbing.private_files import claim_area

    print(claim_area(sys.argv[1]), flush=True)
    # A lean child that reads the FIFO until the test closes it: it outlives this step once killed.
    lean_process.call(Path.read_text, Path(sys.argv[2]))
    """
)


def wait_until_unlocked(area: Path) -> None:
    descriptor = os.open(area / AREA_LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # returns once the last holder has ended
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def test_a_killed_steps_lean_child_dies_with_it_and_their_area_is_swept(tmp_path: Path) -> None:
    # The child inherits the area's lock (should it outlive the step, the files it reads stay
    # claimed), but it is killed with the step (see lean_process): nothing then holds the area.
    staging = private_directory(tmp_path / "staging")
    fifo = tmp_path / "hold"
    os.mkfifo(fifo, 0o600)
    step = subprocess.Popen([sys.executable, "-c", ORPHANING_STEP, str(staging), str(fifo)], stdout=subprocess.PIPE, text=True)
    assert step.stdout is not None
    try:
        with within(60):
            area = Path(step.stdout.readline().strip())
            hold = open(fifo, "w")  # noqa: SIM115 - returns once the lean child has opened the FIFO
    except BaseException:
        step.kill()
        os.close(os.open(fifo, os.O_RDWR))  # never blocks: lets a lean child reach the end of it
        raise
    try:
        step.kill()
        step.wait()
        with within(60):
            wait_until_unlocked(area)  # returns once the child, the last holder, has died

        assert sweep_dead_areas(staging) == [area]
        assert not area.exists()
    finally:
        hold.close()


def test_areas_claimed_before_a_fork_stay_the_parents(tmp_path: Path) -> None:
    parent_area = claim_area(tmp_path)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the forked child reports through the pipe
        try:
            os.close(reader)
            own = claim_area(tmp_path)
            os.write(writer, f"{own}\n{sweep_dead_areas(tmp_path)}\n".encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe, within(60):
        child_area, child_swept = pipe.read().splitlines()
    os.waitpid(child, 0)

    assert Path(child_area) != parent_area and Path(child_area).parent == tmp_path
    assert child_swept == "[]" and parent_area.is_dir()
    assert private_files.claim_area(tmp_path) == parent_area
