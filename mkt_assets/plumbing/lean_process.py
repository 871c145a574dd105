"""Run functions in a lean Python process, one call after another, and return their results.

Used for the DuckDB work of a sync (typing staged chunks, the run's one transaction, the
checks' queries). A Dagster process holds about 130 MB before it does anything, and DuckDB's
JSON reader and joins take up to its memory cap on top; a child that imports only DuckDB and
this package's DuckDB modules starts at about 36 MB, so every process of a sync stays small
however large the account. A ``Worker`` is started once and serves many calls, so a run pays
for one process start, not one per call; ``call`` is a worker for a single call.

A function must be importable at module level from a module that does not import Dagster.
Its arguments and its result, or the exception it raised, travel pickled over the child's
stdin and stdout: both ends run this package's code from the same interpreter. If the caller
is interrupted during a call, the child is killed and DuckDB rolls back the open
transaction. What the child says while it works (``report``: a wait for the database file,
say) reaches the caller's ``log`` as it happens, through a pipe of its own. The child
inherits the caller's staging locks (see ``private_files``).
"""

from __future__ import annotations

import collections
import ctypes
import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, TypeVar

from mkt_assets.core.errors import API_KEY_ENV
from mkt_assets.plumbing import private_files

Result = TypeVar("Result")
Log = Callable[[str], None]
_PARENT_ENV = "MKT_LEAN_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # prctl(2)
_FRAME = struct.Struct("!cQ")  # each message: its kind and its length
_ANSWER, _REPORT = b"A", b"R"  # from the child: a call's outcome (pickled), or a line it reports
# What a child printed last, kept to explain how it died.
_STDERR_TAIL_LINES = 40


class LeanProcessError(RuntimeError):
    """The child ended without an answer: killed (e.g. by the OOM killer) or crashed."""


class Worker:
    """One lean child process serving calls in order until it is closed."""

    def __init__(self, name: str = "lean worker", preload: tuple[str, ...] = ()) -> None:
        """``preload``: modules the child imports as soon as it starts, so that the first call
        does not wait for them (DuckDB's import takes a good part of a second)."""
        self.name = name
        self._lock = threading.Lock()
        # DuckDB work never needs the API key: the child does not get it.
        environment = {key: value for key, value in os.environ.items() if key != API_KEY_ENV}
        environment[_PARENT_ENV] = str(os.getpid())
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            # The child holds this process's staging locks too: should this process be killed,
            # the files the child may still be reading stay claimed until it ends.
            pass_fds=private_files.area_lock_fds(),
        )
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_reader = threading.Thread(target=self._keep_stderr, name=f"{name}-stderr", daemon=True)
        self._stderr_reader.start()

    def call(self, function: Callable[..., Result], /, *args: Any, log: Log | None = None, **kwargs: Any) -> Result:
        """``function(*args, **kwargs)`` in the child; what it ``report``s goes to ``log``."""
        request = pickle.dumps((function.__module__, function.__qualname__, args, kwargs))
        with self._lock:
            try:
                assert self._child.stdin is not None and self._child.stdout is not None
                _write_frame(self._child.stdin, _ANSWER, request)
                while True:
                    kind, data = _read_frame(self._child.stdout)
                    if kind == _ANSWER:
                        break
                    _tell(log, data.decode("utf-8", "replace"))
            except BaseException as error:
                self.kill()  # interrupted, or the child died: DuckDB rolls its transaction back
                if isinstance(error, (OSError, EOFError)):
                    raise self._died(function) from None
                raise
        succeeded, value = pickle.loads(data)
        if succeeded:
            return value
        raise value

    def finish(self) -> None:
        """Tell the child no call follows, without waiting: it ends its last call's work (a
        thread it left running) and exits while this process goes on; ``close`` waits for it."""
        with self._lock:
            if self._child.stdin is not None and not self._child.stdin.closed:
                try:
                    self._child.stdin.close()
                except OSError:
                    pass  # the child is gone already: ``close`` says nothing more either

    def close(self) -> None:
        """Let the child finish and exit; kill it if it does not."""
        if self._child.poll() is None and self._child.stdin is not None:
            try:
                self._child.stdin.close()
                self._child.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._join()

    def kill(self) -> None:
        if self._child.poll() is None:
            self._child.kill()
        self._child.wait()
        self._join()

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    def _died(self, function: Callable[..., Any]) -> LeanProcessError:
        self._child.wait()
        self._join()
        printed = "".join(self._stderr)[-2000:]
        return LeanProcessError(
            f"{function.__qualname__} ran in a child process that {_how_it_ended(self._child.returncode)}"
            f" without an answer; what it printed: {printed!r}"
        )

    def _join(self) -> None:
        self._stderr_reader.join(timeout=30)

    def _keep_stderr(self) -> None:
        assert self._child.stderr is not None
        for line in self._child.stderr:
            self._stderr.append(line.decode("utf-8", "replace"))


def call(function: Callable[..., Result], /, *args: Any, log: Log | None = None, **kwargs: Any) -> Result:
    """``function(*args, **kwargs)`` in a fresh child of its own; what it ``report``s goes to ``log``."""
    with Worker(function.__qualname__) as worker:
        return worker.call(function, *args, log=log, **kwargs)


_answers: IO[bytes] | None = None  # set in a lean child: where answers and reports go
_answers_lock = threading.Lock()


def report(message: str) -> None:
    """Say something to whoever runs this work: the caller's log from a lean child, else stderr."""
    line = message.replace("\n", " ")
    if _answers is None:
        sys.stderr.write(line + "\n")
        return
    with _answers_lock:
        _write_frame(_answers, _REPORT, line.encode("utf-8", "replace"))


def _tell(log: Log | None, line: str) -> None:
    if log is not None:
        try:
            log(line)
        except Exception:  # noqa: BLE001, S110 - a log that fails must not fail the work
            pass


def lower_priority() -> None:
    """Run this child's later calls at nice 19: they take only CPU the rest leaves idle."""
    os.nice(19)


def _write_frame(stream: IO[bytes], kind: bytes, data: bytes) -> None:
    stream.write(_FRAME.pack(kind, len(data)) + data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> tuple[bytes, bytes]:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        raise EOFError("the other end closed")
    kind, length = _FRAME.unpack(head)
    data = stream.read(length)
    if len(data) < length:
        raise EOFError("the other end closed mid-message")
    return kind, data


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _die_with_the_parent(parent: int) -> None:
    """Be killed when the process that started this one dies, however it dies.

    Otherwise a caller killed with SIGKILL (the OOM killer, a stopped run) would leave this
    child to commit its transaction after the run had failed: a killed sync must leave every
    table as it was. Linux only (prctl); elsewhere the child outlives a killed parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the signal was asked for


def _serve() -> None:
    """The child's side: answer calls from stdin on stdout, one after another, until stdin ends."""
    _die_with_the_parent(int(os.environ.pop(_PARENT_ENV, os.getppid())))
    # Answers go to a private copy of stdout; what the work prints goes to stderr instead, so
    # it can never corrupt an answer. Set on the module as the work imports it (this one
    # runs as __main__), for ``report``.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    module = importlib.import_module("mkt_assets.plumbing.lean_process")
    module._answers = answers  # type: ignore[attr-defined]  # this module, imported under its own name
    for name in sys.argv[1:]:
        importlib.import_module(name)
    requests = sys.stdin.buffer
    while True:
        try:
            _, request = _read_frame(requests)
        except EOFError:
            return
        outcome = _answer(request)
        with module._answers_lock:
            _write_frame(answers, _ANSWER, outcome)


def _answer(request: bytes) -> bytes:
    module_name, qualname, args, kwargs = pickle.loads(request)
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    try:
        outcome: tuple[bool, object] = (True, target(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - every failure is the caller's to handle
        error.add_note(f"raised in a lean child process:\n{traceback.format_exc()}")
        outcome = (False, error)
    try:
        return pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: keep its type name and message
        failed = outcome[1]
        return pickle.dumps((False, RuntimeError(f"{type(failed).__name__}: {failed}")))


if __name__ == "__main__":
    _serve()
