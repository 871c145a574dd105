"""Type staged chunks to Parquet while the fetch goes on.

A fetch leaves CPU idle: the client waits on the API's answer, then parses it, one page at
a time. Each full chunk a stager closes is typed by DuckDB in one lean worker process for the
whole run, one chunk at a time, at the lowest CPU priority so it never slows the fetch, so the
merge mostly reads Parquet instead of parsing all the JSON after the last page. A chunk that
fails to type is simply left to the merge, which reads it as JSON and, if a value really does
not cast, says which one.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.plumbing import lean_process
from mkt_assets.warehouse.connection import without_values
from mkt_assets.warehouse.staged_sql import type_staged_chunk


def type_chunk_privately(spec: ResourceSpec, json_path: str, parquet_path: str, memory_limit: str, longest_line: int) -> None:
    """``type_staged_chunk`` in the worker, its Parquet readable by this user alone."""
    # DuckDB creates the Parquet with the umask's mode: the contacts' e-mails in it are for
    # this user alone, like the JSON chunk beside it (0600).
    os.umask(0o077)
    type_staged_chunk(spec, json_path, parquet_path, memory_limit, longest_line)


class TypingQueue:
    """The run's one typing worker and the single thread that feeds it, shared by every
    resource's ``ChunkTyper``. The worker starts with the first chunk, at nice 19."""

    def __init__(self, memory_limit: str) -> None:
        self.memory_limit = memory_limit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-typing")
        self._worker: lean_process.Worker | None = None
        # Guards the worker against a chunk starting one as the queue is aborted.
        self._lock = threading.Lock()
        self._aborted = False

    def __enter__(self) -> TypingQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        self._executor.shutdown(wait=True)
        if self._worker is not None:
            self._worker.close()

    def abort(self) -> None:
        """Drop the chunks not yet typed and kill the worker, waiting for neither (a run that
        fails or is interrupted merges nothing: a chunk's typing is of no use to it)."""
        with self._lock:
            self._aborted = True
            worker, self._worker = self._worker, None
        self._executor.shutdown(wait=False, cancel_futures=True)
        if worker is not None:
            worker.kill()

    def submit(self, spec: ResourceSpec, json_path: Path, parquet: Path, longest_line: int) -> Future[None]:
        return self._executor.submit(self._type, spec, json_path, parquet, longest_line)

    def _type(self, spec: ResourceSpec, json_path: Path, parquet: Path, longest_line: int) -> None:
        worker = self._worker
        try:
            if worker is None:
                worker = lean_process.Worker("chunk typing")
                with self._lock:
                    if self._aborted:  # while it started: abort() could not see it
                        worker.kill()
                        raise lean_process.LeanProcessError("the typing queue was aborted")
                    self._worker = worker
                worker.call(lean_process.lower_priority)
            worker.call(type_chunk_privately, spec, str(json_path), str(parquet), self.memory_limit, longest_line)
        except lean_process.LeanProcessError:
            with self._lock:
                if self._worker is worker:
                    self._worker = None  # it died (killed, out of memory): the next chunk starts another
            raise


class ChunkTyper:
    """One resource's chunks handed to the run's typing queue as the stager closes them."""

    def __init__(self, spec: ResourceSpec, queue: TypingQueue) -> None:
        self.spec = spec
        self.queue = queue
        self._pending: list[tuple[Path, Path, Future[None]]] = []
        self.failures: list[str] = []  # why a chunk was left to the merge, for the run's log

    def __enter__(self) -> ChunkTyper:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None:
            for _, parquet, future in self._pending:
                future.cancel()
                if not future.cancelled():
                    future.exception()  # wait: the file may still be being written
                parquet.unlink(missing_ok=True)

    def submit(self, json_path: Path, longest_line: int) -> None:
        parquet = json_path.with_suffix(".parquet")
        self._pending.append((json_path, parquet, self.queue.submit(self.spec, json_path, parquet, longest_line)))

    def finish(self) -> tuple[tuple[Path, Path], ...]:
        """Wait for the chunks handed over; the (JSON, Parquet) pairs of those typed."""
        typed = []
        for json_path, parquet, future in self._pending:
            error = future.exception()
            if error is None:
                typed.append((json_path, parquet))
            else:
                parquet.unlink(missing_ok=True)
                self.failures.append(f"{json_path.name} left to the merge to read as JSON: {without_values(str(error))}")
        return tuple(typed)
