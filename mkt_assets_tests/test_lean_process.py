"""The lean child process that runs a sync's DuckDB work outside the Dagster step."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mkt_assets.plumbing import lean_process
from mkt_assets.plumbing.private_files import AREA_LOCK_NAME, area_lock_fds, claim_area
from mkt_assets_tests._lean_child import leave_a_thread_waiting


def test_the_child_returns_the_function_result() -> None:
    assert lean_process.call(pow, 2, 10) == 1024
    assert lean_process.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_the_child_runs_in_another_process() -> None:
    assert lean_process.call(os.getpid) != os.getpid()


def test_the_child_imports_the_duckdb_modules_without_dagster() -> None:
    # What makes it lean: Dagster alone would add about 50 MB to every merge.
    loaded = "__import__('mkt_assets.warehouse.normalized_tables') and sorted(__import__('sys').modules)"
    modules = lean_process.call(eval, loaded)
    assert "duckdb" in modules and "mkt_assets.warehouse" in modules
    assert "dagster" not in modules and "requests" not in modules


def test_an_exception_in_the_child_is_raised_in_the_caller_with_the_child_traceback() -> None:
    with pytest.raises(ValueError, match="invalid literal") as raised:
        lean_process.call(int, "not a number")
    assert any("raised in a lean child process" in note for note in raised.value.__notes__)


def test_a_child_killed_without_an_answer_is_a_clear_error() -> None:
    with pytest.raises(lean_process.LeanProcessError, match="abort ran in a child process that was killed by SIGABRT"):
        lean_process.call(os.abort)


def test_the_child_does_not_get_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKT_API_KEY", "secret-key-for-this-test")
    monkeypatch.setenv("MKT_DUCKDB_PATH", "kept.duckdb")

    assert lean_process.call(os.getenv, "MKT_API_KEY") is None
    assert lean_process.call(os.getenv, "MKT_DUCKDB_PATH") == "kept.duckdb"


def test_the_child_inherits_the_callers_staging_locks(tmp_path: Path) -> None:
    # A flock lasts while any descriptor of it is open: a child still reading staged files
    # keeps them claimed should its step be killed (see test_private_files).
    lock = os.stat(claim_area(tmp_path) / AREA_LOCK_NAME)
    (descriptor,) = [fd for fd in area_lock_fds() if os.fstat(fd).st_ino == lock.st_ino]

    inherited = lean_process.call(os.fstat, descriptor)

    assert (inherited.st_dev, inherited.st_ino) == (lock.st_dev, lock.st_ino)


def test_what_the_child_reports_reaches_the_callers_log_as_it_happens() -> None:
    heard: list[str] = []

    assert lean_process.call(lean_process.report, "waiting 10 s for the file\nheld by PID 7", log=heard.append) is None

    assert heard == ["waiting 10 s for the file held by PID 7"]


def test_reports_arrive_in_order_before_the_answer() -> None:
    heard: list[str] = []
    with lean_process.Worker() as worker:
        worker.call(lean_process.report, "first", log=heard.append)
        worker.call(lean_process.report, "second", log=heard.append)
        assert worker.call(pow, 2, 3, log=heard.append) == 8
    assert heard == ["first", "second"]


def test_a_log_that_fails_does_not_fail_the_work() -> None:
    def broken_log(line: str) -> None:
        raise RuntimeError("the log is gone")

    assert lean_process.call(lean_process.report, "hello", log=broken_log) is None


def test_a_worker_serves_many_calls_from_one_process() -> None:
    with lean_process.Worker() as worker:
        pids = {worker.call(os.getpid) for _ in range(5)}
        assert worker.call(pow, 3, 4) == 81

    assert len(pids) == 1 and os.getpid() not in pids


def test_what_a_call_prints_cannot_corrupt_the_answers() -> None:
    with lean_process.Worker() as worker:
        assert worker.call(print, "noise on stdout") is None
        assert worker.call(pow, 2, 5) == 32


def test_a_worker_whose_child_dies_says_how_and_later_calls_fail_too() -> None:
    with lean_process.Worker() as worker:
        with pytest.raises(lean_process.LeanProcessError, match="killed by SIGABRT"):
            worker.call(os.abort)
        with pytest.raises(lean_process.LeanProcessError):
            worker.call(pow, 2, 2)


def test_a_finished_worker_ends_the_work_its_last_call_left_without_the_caller_waiting(tmp_path: Path) -> None:
    lock, marker = tmp_path / "held", tmp_path / "done"
    lock.write_text("")
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = lean_process.Worker()
        try:
            child = os.pidfd_open(worker.call(os.getpid))
            worker.call(leave_a_thread_waiting, str(lock), str(marker))
            # finish() returns although the child cannot exit yet: its thread waits for the lock.
            finishing = threading.Thread(target=worker.finish)
            finishing.start()
            finishing.join(timeout=30)
            assert not finishing.is_alive()
            assert not marker.exists()
            fcntl.flock(held, fcntl.LOCK_UN)
            # Then it exits of itself, once its thread is done: nobody closed it.
            exited, _, _ = select.select([child], [], [], 30)
            assert exited and marker.read_text() == "done"
            os.close(child)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            worker.close()


_KILLED_PARENT = """
import os, sys, threading, time
from mkt_assets.plumbing import lean_process
worker = lean_process.Worker()
print(worker.call(os.getpid), flush=True)
# The worker busy in a call (as in the middle of a transaction) when its parent is killed.
threading.Thread(target=worker.call, args=(time.sleep, 120), daemon=True).start()
sys.stdin.read()  # held here until killed
"""


def test_a_worker_dies_with_its_parent_however_the_parent_dies() -> None:
    # Otherwise a run killed with SIGKILL leaves its DuckDB worker to commit after the run failed.
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = os.pidfd_open(int(parent.stdout.readline()))  # readable once the worker has exited
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)

        exited, _, _ = select.select([child], [], [], 10)
    finally:
        os.close(child)
    assert exited, "the worker outlived its killed parent"
