"""Type staged chunks to Parquet while the fetch goes on.

A fetch leaves CPU idle: the client waits on the API's answer, then parses it, one page at
a time. Each full chunk the stager closes is typed by DuckDB in a lean child process (one at
a time, in this object's one thread, at the lowest CPU priority so it never slows the fetch),
so the merge mostly reads Parquet instead of parsing all the JSON after the last page. A chunk that fails to type is simply left to the
merge, which reads it as JSON and, if a value really does not cast, says which one.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from mkt_assets import lean_process
from mkt_assets.catalog import ResourceSpec
from mkt_assets.warehouse import type_staged_chunk, without_values


def type_chunk_at_lowest_priority(
    spec: ResourceSpec, json_path: str, parquet_path: str, memory_limit: str, longest_line: int
) -> None:
    """``type_staged_chunk`` at nice 19, in the child: the fetch (and, on one machine, the
    API) keeps the cores it needs, and the typing takes only what they leave idle."""
    os.nice(19)
    # DuckDB creates the Parquet with the umask's mode: the contacts' e-mails in it are for
    # this user alone, like the JSON chunk beside it (0600).
    os.umask(0o077)
    type_staged_chunk(spec, json_path, parquet_path, memory_limit, longest_line)


class ChunkTyper:
    def __init__(self, spec: ResourceSpec, memory_limit: str) -> None:
        self.spec = spec
        self.memory_limit = memory_limit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"type-{spec.name}")
        self._pending: list[tuple[Path, Path, Future[None]]] = []
        self.failures: list[str] = []  # why a chunk was left to the merge, for the run's log

    def __enter__(self) -> ChunkTyper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            for _, parquet, _ in self._pending:
                parquet.unlink(missing_ok=True)
        self._executor.shutdown(wait=True)

    def submit(self, json_path: Path, longest_line: int) -> None:
        parquet = json_path.with_suffix(".parquet")
        future = self._executor.submit(
            lean_process.call,
            type_chunk_at_lowest_priority,
            self.spec,
            str(json_path),
            str(parquet),
            self.memory_limit,
            longest_line,
        )
        self._pending.append((json_path, parquet, future))

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
