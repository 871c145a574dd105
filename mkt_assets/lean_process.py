"""Run one function in a fresh, lean Python process and return its result.

Used for the DuckDB work of a sync (merges, table builds, the checks' queries). A Dagster step process holds
about 130 MB before it does anything, and DuckDB's JSON reader and joins take up to its
memory cap on top; a child that imports only DuckDB and this package's DuckDB modules
starts at about 36 MB, so every process of a sync stays small however large the account.

The function must be importable at module level from a module that does not import
Dagster. Its arguments and its result, or the exception it raised, travel pickled over
the child's stdin and stdout: both ends run this package's code from the same
interpreter. If the caller is interrupted, the child is killed and DuckDB rolls back the
open transaction. What the child says while it works (``report``: a wait for the database
file, say) reaches the caller's ``log`` as it happens, through a pipe of its own. The child
inherits the caller's staging locks (see ``private_files``).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from mkt_assets import private_files

Result = TypeVar("Result")
# The descriptor of the pipe a child reports on, handed down in the environment.
_REPORT_FD_ENV = "MKT_LEAN_REPORT_FD"


class LeanProcessError(RuntimeError):
    """The child ended without an answer: killed (e.g. by the OOM killer) or crashed."""


def call(
    function: Callable[..., Result], /, *args: Any, log: Callable[[str], None] | None = None, **kwargs: Any
) -> Result:
    """``function(*args, **kwargs)`` in a fresh child; what it ``report``s goes to ``log``."""
    from mkt_assets.resource import API_KEY_ENV  # the caller's side only: the child stays lean

    request = pickle.dumps((function.__module__, function.__qualname__, args, kwargs))
    reports, report_end = os.pipe()
    # DuckDB work never needs the API key: the child does not get it.
    environment = {name: value for name, value in os.environ.items() if name != API_KEY_ENV}
    environment[_REPORT_FD_ENV] = str(report_end)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            # The child holds this process's staging locks too: should this process be killed,
            # the files the child may still be reading stay claimed until it ends.
            pass_fds=(report_end, *private_files.area_lock_fds()),
        )
    except BaseException:
        os.close(reports)
        raise
    finally:
        os.close(report_end)
    listener = threading.Thread(target=_relay, args=(reports, log), name="lean-reports", daemon=True)
    listener.start()
    try:
        stdout, stderr = child.communicate(request)
    except BaseException:
        child.kill()  # interrupted: DuckDB rolls the child's transaction back
        child.wait()
        raise
    finally:
        listener.join()
    if child.returncode != 0 or not stdout:
        raise LeanProcessError(
            f"{function.__qualname__} ran in a child process that {_how_it_ended(child.returncode)}"
            f" without an answer; what it printed: {stderr.decode(errors='replace')[-2000:]!r}"
        )
    succeeded, value = pickle.loads(stdout)
    if succeeded:
        return value  # type: ignore[no-any-return]
    raise value


_report_fd: int | None = None  # set in a lean child: where ``report`` writes


def report(message: str) -> None:
    """Say something to whoever runs this work: the caller's log from a lean child, else stderr."""
    line = message.replace("\n", " ") + "\n"
    if _report_fd is None:
        sys.stderr.write(line)
        return
    try:
        os.write(_report_fd, line.encode("utf-8", "replace"))
    except OSError:
        pass  # the caller stopped listening: the work itself goes on


def _relay(reports: int, log: Callable[[str], None] | None) -> None:
    with os.fdopen(reports, "rb") as lines:
        for line in lines:  # read to the end even if logging fails, so the child never blocks
            if log is not None:
                try:
                    log(line.decode("utf-8", "replace").rstrip("\n"))
                except Exception:  # noqa: BLE001 - a log that fails must not fail the work
                    pass


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _serve() -> None:
    """The child's side: read one call from stdin, write its outcome to stdout."""
    # Taken out of the environment, so nothing this child starts writes to that number; set
    # on the module as the work imports it (this one runs as __main__).
    descriptor = os.environ.pop(_REPORT_FD_ENV, None)
    importlib.import_module("mkt_assets.lean_process")._report_fd = int(descriptor) if descriptor else None
    module_name, qualname, args, kwargs = pickle.loads(sys.stdin.buffer.read())
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    try:
        outcome: tuple[bool, object] = (True, target(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - every failure is the caller's to handle
        error.add_note(f"raised in a lean child process:\n{traceback.format_exc()}")
        outcome = (False, error)
    try:
        answer = pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle: keep its type name and message
        failed = outcome[1]
        answer = pickle.dumps((False, RuntimeError(f"{type(failed).__name__}: {failed}")))
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve()
