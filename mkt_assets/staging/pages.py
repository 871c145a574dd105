"""Stream API pages to staging files that DuckDB ingests in bulk.

Each page is written as it arrives, as one line ``{"page": N, "body": <the API's JSON>}``:
the raw body is kept, so no record is re-encoded in Python and none is held after its
page is written. Pages go to chunk files of ``chunk_pages`` pages; each full chunk is
handed to ``on_chunk`` as soon as it is written (to be typed while the fetch goes on).
The IO manager types and merges the chunks in DuckDB.

Chunks hold contacts' e-mail addresses: they are written 0600 in this process's own area
(see ``private_files``) of a private staging directory. The first stager of a process sweeps
what runs that died (killed, say) left in that directory. A resumable read stages into its own
directory instead, checkpointed, and keeps what it checkpointed when the fetch fails (see
``resume``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.core.errors import StagingError
from mkt_assets.core.page import Page
from mkt_assets.plumbing.private_files import claim_area, default_private_directory, private_directory, sweep_dead_areas
from mkt_assets.staging import resume


@dataclass(frozen=True)
class StagedBatch:
    """Every record of one sync of one resource, staged on disk, ready to merge."""

    spec: ResourceSpec
    paths: tuple[Path, ...]  # the JSON chunks, in page order
    records: int
    pages: int
    unknown_fields: tuple[str, ...]
    synced_at: datetime
    # Every record of the resource (a full read run to its end), not only new ones: what
    # it lacks was deleted upstream.
    complete: bool = True
    # An incremental read: it read every record whose key is above this one (ids only grow).
    after: int | None = None
    # Keys came strictly ascending (or descending) across each end of the walk, whose ends
    # keep disjoint keys (see client.WalkFrontiers), so no key repeats and the merge can
    # skip deduplicating.
    keys_unique: bool = False
    # (JSON chunk, the same pages typed to Parquet) for the chunks typed during the fetch.
    typed: tuple[tuple[Path, Path], ...] = ()
    # The longest staged line: DuckDB's JSON reader must be told a page may be that long.
    longest_line: int = 0
    # A resumable read's own directory (see ``resume``), which goes with the batch.
    resumable: Path | None = None

    def discard(self) -> None:
        """Remove the staged pages: the batch was written (or can never be)."""
        for path in (*self.paths, *(parquet for _, parquet in self.typed)):
            path.unlink(missing_ok=True)
        if self.resumable is not None:
            resume.remove(self.resumable)

    def keep(self) -> None:
        """The run failed before writing this batch: a resumable one stays, checkpointed as
        read to its end, for the next run to write without reading it again; another goes."""
        if self.resumable is None:
            self.discard()
        else:
            for _, parquet in self.typed:
                parquet.unlink(missing_ok=True)
            resume.release(self.resumable)


# 25,000 contacts, 14 MB of JSON: typed in about 0.25 s, small against a process start.
DEFAULT_CHUNK_PAGES = 250

# Staging directories this process has swept: once is enough, later dead runs are the next
# process's to sweep.
_swept_directories: set[Path] = set()
_swept_lock = threading.Lock()


def staging_directory(directory: str | None) -> Path:
    """The private staging directory: ``directory``, or ``<temp>/mkt_assets-<uid>/staging``."""
    return private_directory(directory) if directory else default_private_directory("staging")


def sweep_once(parent: Path) -> list[Path]:
    """Sweep ``parent`` of dead runs' areas, the first time this process stages there."""
    with _swept_lock:
        if parent in _swept_directories:
            return []
        _swept_directories.add(parent)
    return sweep_dead_areas(parent)


@dataclass
class PageStager:
    """Validates each page's records and appends the page to a staging file."""

    spec: ResourceSpec
    directory: str | None = None
    records: int = 0
    pages: int = 0
    unknown_fields: set[str] = field(default_factory=set)
    synced_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    complete: bool = True
    after: int | None = None
    keys_monotonic: bool = True
    chunk_pages: int = DEFAULT_CHUNK_PAGES
    # Called with each full chunk's path and longest line once it is closed; the last chunk
    # is never handed over (the merge reads it as it is, rather than wait for it to be typed).
    on_chunk: Callable[[Path, int], None] | None = None
    # What this stager swept on entering: the staging areas of runs that died.
    swept: list[Path] = field(default_factory=list)
    # Stage into this read's own directory, checkpointed, and keep what is checkpointed when
    # the fetch fails (see ``resume``); its adopted pages are this batch's first.
    resumable: resume.ResumableRead | None = None
    # Pages and records adopted from an earlier attempt.
    pages_resumed: int = 0
    records_resumed: int = 0
    # Per end of the walk (the page's `order`): the last key seen and the direction keys took.
    _previous_keys: dict[object, object] = field(default_factory=dict)
    _directions: dict[object, int] = field(default_factory=dict)
    _file: BinaryIO | None = None
    _paths: list[Path] = field(default_factory=list)
    _chunk_pages_written: int = 0
    _chunk_longest_line: int = 0
    longest_line: int = 0
    _area: Path | None = None
    # Bytes of whole pages in each chunk, as a checkpoint names them.
    _chunk_bytes: list[int] = field(default_factory=list)
    # A full chunk closed at its last page, handed to ``on_chunk`` when the next page comes.
    _handover: tuple[Path, int] | None = None
    _checkpointed: set[Path] = field(default_factory=set)

    def __enter__(self) -> PageStager:
        parent = staging_directory(self.directory)
        if self.resumable is None:
            self._area = claim_area(parent)
        else:
            self._area = self.resumable.directory
            self.synced_at = self.resumable.began  # the read began with its first attempt
            if self.resumable.adopted is not None:
                self._adopt(self.resumable.adopted)
        self.swept = sweep_once(parent)
        return self

    def _adopt(self, checkpoint: dict[str, object]) -> None:
        assert self._area is not None
        for chunk in checkpoint["chunks"]:  # type: ignore[attr-defined]
            self._paths.append(self._area / chunk["name"])
            self._chunk_bytes.append(chunk["bytes"])
        self._checkpointed = set(self._paths)
        self.pages = self.pages_resumed = int(checkpoint["pages"])  # type: ignore[call-overload]
        self.records = self.records_resumed = int(checkpoint["records"])  # type: ignore[call-overload]
        self.unknown_fields.update(cast("list[str]", checkpoint["unknown_fields"]))
        self.longest_line = int(checkpoint["longest_line"])  # type: ignore[call-overload]
        # The key order goes on across attempts: each end resumes past its last key.
        self.keys_monotonic = bool(checkpoint["keys_monotonic"])
        self._previous_keys = {end: key for end, key in checkpoint["previous_keys"]}  # type: ignore[attr-defined]
        self._directions = {end: direction for end, direction in checkpoint["directions"]}  # type: ignore[attr-defined]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                if exc_type is None:
                    raise
                # Already failing (often for the same full disk): that error is the one to show.
        if exc_type is not None:
            for path in self._paths:
                # A resumable read keeps what its checkpoint names (cut back to it on adoption).
                if path not in self._checkpointed:
                    path.unlink(missing_ok=True)

    def add(self, page: Page) -> None:
        self._check_records(page)
        assert self._area is not None, "use PageStager as a context manager"
        if self._file is None:
            if self._handover is not None and self.on_chunk is not None:
                self.on_chunk(*self._handover)
            self._handover = None
            self._open_chunk()
        assert self._file is not None
        # JSON text never holds a raw newline inside a string, so folding them keeps one page a line.
        body = page.body.replace(b"\r", b" ").replace(b"\n", b" ")
        line = b'{"page":%d,"body":%s}\n' % (page.number, body)
        try:
            self._file.write(line)
        except OSError as error:
            raise self._write_failed(error, f"page {page.number}") from None
        self._chunk_longest_line = max(self._chunk_longest_line, len(line))
        self.longest_line = max(self.longest_line, len(line))
        self._chunk_pages_written += 1
        self._chunk_bytes[-1] += len(line)
        self.pages += 1
        self.records += len(page.items)
        if self._chunk_pages_written == self.chunk_pages:
            # Closed at once, so a checkpoint taken now names it whole.
            self._close_chunk()
            self._handover = (self._paths[-1], self._chunk_longest_line)

    @property
    def chunk_closed(self) -> bool:
        """The last page filled its chunk, which is closed: a checkpoint costs one fsync less."""
        return self._file is None and self._handover is not None

    def checkpoint(self, position: object) -> None:
        """Save where the read stands (``position``: the last page's, see ``core.page.Page``): the
        pages staged so far are made durable first, so the checkpoint only names bytes on disk."""
        assert self.resumable is not None
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as error:
                raise self._write_failed(error, "a checkpoint") from None
        self.resumable.save(
            {
                "chunks": [{"name": path.name, "bytes": size} for path, size in zip(self._paths, self._chunk_bytes, strict=True)],
                "pages": self.pages,
                "records": self.records,
                "unknown_fields": sorted(self.unknown_fields),
                "longest_line": self.longest_line,
                "keys_monotonic": self.keys_monotonic,
                "previous_keys": list(self._previous_keys.items()),
                "directions": list(self._directions.items()),
                "position": position,
            }
        )
        self._checkpointed = set(self._paths)

    def finish(self) -> StagedBatch:
        assert self._area is not None, "use PageStager as a context manager"
        if self._file is not None:
            self._close_chunk()
        elif not self._paths:
            self._open_chunk()  # nothing read: one empty chunk, which merges as no rows
            self._close_chunk()
        if self.resumable is not None:
            self.checkpoint({"walk": "done"})
        return StagedBatch(
            spec=self.spec,
            paths=tuple(self._paths),
            records=self.records,
            pages=self.pages,
            unknown_fields=tuple(sorted(self.unknown_fields)),
            synced_at=self.synced_at,
            complete=self.complete,
            after=self.after,
            keys_unique=self.keys_monotonic,
            longest_line=self.longest_line,
            resumable=self.resumable.directory if self.resumable is not None else None,
        )

    def _close_chunk(self) -> None:
        assert self._file is not None
        file, self._file = self._file, None
        try:
            if self.resumable is not None:
                file.flush()
                os.fsync(file.fileno())  # a checkpoint may name it: its pages must be on disk
            file.close()  # flushes what is buffered: a full disk can refuse it here
        except OSError as error:
            raise self._write_failed(error, "a chunk") from None

    def _write_failed(self, error: OSError, what: str) -> StagingError:
        return StagingError(
            f"{self.spec.name}: could not stage {what} to {self._paths[-1]}:"
            f" {error.strerror or error} (errno {error.errno}); nothing was written to the"
            " database. Free space there, or point staging_dir at a disk that has it."
        )

    def _open_chunk(self) -> None:
        handle, name = tempfile.mkstemp(  # 0600
            prefix=f"mkt_{self.spec.name}_{len(self._paths) + 1:05d}_", suffix=".ndjson", dir=self._area
        )
        self._file = os.fdopen(handle, "wb")
        self._paths.append(Path(name))
        self._chunk_bytes.append(0)
        self._chunk_pages_written = 0
        self._chunk_longest_line = 0

    def _check_records(self, page: Page) -> None:
        # The client has checked every record's key and values (see ``records``).
        self.unknown_fields.update(page.unknown_fields)
        if self.keys_monotonic:
            key, end = self.spec.primary_key, page.query.get("order")
            for record in page.items:
                self._follow_key_order(end, record[key])

    def _follow_key_order(self, end: object, key: object) -> None:
        previous, self._previous_keys[end] = self._previous_keys.get(end), key
        if previous is None:
            return
        if not isinstance(key, int) or not isinstance(previous, int) or key == previous:
            self.keys_monotonic = False
            return
        direction = 1 if key > previous else -1
        if self._directions.setdefault(end, direction) != direction:
            self.keys_monotonic = False

