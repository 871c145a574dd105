"""Staging and the DuckDB merge: typed columns, merge semantics, atomic failure."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

import mkt_assets.warehouse.connection as connection_module
from mkt_assets.core.catalog import BOOKKEEPING_COLUMNS, RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.core.errors import PrivateDirectoryError, StagingError, WarehouseBusyError, WarehouseWriteError
from mkt_assets.core.page import Page
from mkt_assets.plumbing.private_files import AREA_LOCK_NAME
from mkt_assets.staging.pages import DEFAULT_CHUNK_PAGES, PageStager, StagedBatch
from mkt_assets.warehouse.chunk_typing import ChunkTyper, TypingQueue
from mkt_assets.warehouse.connection import WarehouseFile, connect, streamed, transaction
from mkt_assets.warehouse.defaults import DEFAULT_MEMORY_LIMIT
from mkt_assets.warehouse.merge import is_mass_deletion
from mkt_assets.warehouse.sql_names import forget_columns, fully_qualified, made_table, table_columns, table_exists
from mkt_assets.warehouse.staged_sql import ensure_table
from mkt_assets_tests.warehouse_calls import (
    all_reference_facts_in_file,
    build_table_in_file,
    merge_staged,
    merge_staged_file,
    synced_table_facts_in_file,
)

CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
FIELDS = RESOURCES_BY_NAME["contact_fields"]
COURSES = RESOURCES_BY_NAME["course_resources"]


def contact(contact_id: int, **changes: Any) -> dict[str, Any]:
    record = {
        "id": contact_id,
        "email": f"c{contact_id}@example.com",
        "registeredAt": "2024-03-01T10:00:00+02:00",
        "locale": "jp",
        "sourceURL": None,
        "unsubscribed": False,
        "bounced": False,
        "needsConfirmation": True,
        "fields": [{"fieldName": "City", "slug": "city", "value": "Zürich"}, {"fieldName": "Phone", "slug": "phone_number", "value": None}],
        "tags": [{"id": 7, "name": "Café ☕"}],
    }
    record.update(changes)
    return record


def unknown_fields(spec: ResourceSpec, items: list[dict[str, Any]]) -> frozenset[str]:
    """What the client tells the stager about a page: the fields the catalog does not know."""
    names = {name for item in items for name in item if name not in spec.known_fields}
    for column in spec.columns:
        known = {member.api_name for member in column.fields}
        for item in items:
            for member in item.get(column.api_name) or [] if column.fields else []:
                names.update(f"{column.api_name}[].{name}" for name in (member or {}) if name not in known)
    return frozenset(names)


def stage(
    spec: ResourceSpec,
    pages: list[list[dict[str, Any]]],
    directory: Path,
    when: datetime | None = None,
    complete: bool = True,
    *,
    chunk_pages: int = DEFAULT_CHUNK_PAGES,
    typed: bool = False,
) -> StagedBatch:
    """Stage ``pages`` as the sync asset does; ``typed`` types each full chunk as it closes."""
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as queue, ChunkTyper(spec, queue) as typer:
        stager = PageStager(
            spec, directory=str(directory), complete=complete, chunk_pages=chunk_pages, on_chunk=typer.submit if typed else None
        )
        if when is not None:
            stager.synced_at = when
        with stager:
            for number, items in enumerate(pages, start=1):
                body = json.dumps({"items": items, "hasMore": number < len(pages)}, ensure_ascii=False, indent=1).encode()
                unknown = unknown_fields(spec, items)
                stager.add(Page(spec.name, number, f"/api{spec.path}", {}, items, number < len(pages), body, unknown))
            batch = stager.finish()
        return replace(batch, typed=typer.finish())


def staged_files(directory: Path) -> list[Path]:
    """The chunks staged under ``directory`` (in this process's area, beside its lock)."""
    return sorted(path for path in directory.rglob("*") if path.is_file() and path.name != AREA_LOCK_NAME)


# How a batch was staged: in one JSON file, or a page a chunk with every chunk but the last
# typed to Parquet during the fetch. The merge must land the same rows either way.
STAGINGS = {"one JSON chunk": {}, "typed chunks": {"chunk_pages": 1, "typed": True}}


@pytest.fixture(params=list(STAGINGS))
def staging(request: pytest.FixtureRequest) -> dict[str, Any]:
    return STAGINGS[request.param]


@pytest.fixture()
def database(tmp_path: Path) -> str:
    # Named like the schema on purpose: DuckDB then finds `marketing.x` ambiguous, and the
    # merge must still work.
    return str(tmp_path / "marketing.duckdb")


def rows(database: str, table: str) -> list[tuple[Any, ...]]:
    with connect(database) as connection:
        return connection.execute(f"SELECT * FROM {fully_qualified(connection, 'marketing', table)} ORDER BY 1").fetchall()


def merge(database: str, table: str, batch: StagedBatch, **options: Any):  # type: ignore[no-untyped-def]
    with connect(database) as connection:
        return merge_staged(connection, "marketing", table, batch, **options)


def test_first_sync_inserts_typed_rows(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    pages = [[contact(1)], [contact(2, sourceURL="https://x.test/?a=1")]]
    result = merge(database, "contacts", stage(CONTACTS, pages, tmp_path, **staging))

    assert (result.inserted, result.updated, result.unchanged, result.row_count) == (2, 0, 0, 2)
    with connect(database) as connection:
        types = dict(connection.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'contacts'").fetchall())
        first = connection.execute(
            "SELECT id, email, registered_at, locale, source_url, needs_confirmation, fields, tags, _extra FROM marketing.marketing.contacts WHERE id = 1"
        ).fetchone()
    assert types["id"] == "BIGINT" and types["registered_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["needs_confirmation"] == "BOOLEAN" and types["_extra"] == "JSON"
    assert types["fields"] == 'STRUCT(field_name VARCHAR, slug VARCHAR, "value" VARCHAR)[]'
    assert types["tags"] == 'STRUCT(id BIGINT, "name" VARCHAR)[]'
    assert first[0:2] == (1, "c1@example.com")
    assert first[2] == datetime(2024, 3, 1, 8, 0, tzinfo=timezone.utc)
    assert first[3:6] == ("jp", None, True)
    assert first[6] == [{"field_name": "City", "slug": "city", "value": "Zürich"}, {"field_name": "Phone", "slug": "phone_number", "value": None}]
    assert first[7] == [{"id": 7, "name": "Café ☕"}]
    assert first[8] is None


def test_merge_inserts_new_updates_changed_and_leaves_the_rest(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    first_sync = datetime(2026, 1, 1, tzinfo=timezone.utc)
    merge(database, "contacts", stage(CONTACTS, [[contact(1)], [contact(2), contact(3)]], tmp_path, first_sync, **staging))
    second_sync = datetime(2026, 1, 2, tzinfo=timezone.utc)

    result = merge(
        database,
        "contacts",
        stage(
            CONTACTS,
            [[contact(1)], [contact(2, tags=[], unsubscribed=True)], [contact(4)]],
            tmp_path,
            second_sync,
            complete=False,
            **staging,
        ),
    )

    assert (result.inserted, result.updated, result.unchanged, result.deleted, result.row_count) == (1, 1, 1, 0, 4)
    with connect(database) as connection:
        state = connection.execute("SELECT id, unsubscribed, tags, _synced_at FROM marketing.marketing.contacts ORDER BY id").fetchall()
    assert state == [
        (1, False, [{"id": 7, "name": "Café ☕"}], first_sync),  # unchanged: not rewritten
        (2, True, [], second_sync),
        (3, False, [{"id": 7, "name": "Café ☕"}], first_sync),  # not fetched by this partial sync: untouched
        (4, False, [{"id": 7, "name": "Café ☕"}], second_sync),
    ]


def test_the_same_sync_twice_changes_nothing(database: str, tmp_path: Path) -> None:
    pages = [[contact(1), contact(2)], [contact(3, fields=[], tags=[])]]
    merge(database, "contacts", stage(CONTACTS, pages, tmp_path))
    before = rows(database, "contacts")

    result = merge(database, "contacts", stage(CONTACTS, pages, tmp_path))

    assert (result.inserted, result.updated, result.unchanged) == (0, 0, 3)
    assert rows(database, "contacts") == before


def test_duplicate_keys_in_one_sync_keep_the_last_record_seen(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    # Typed in chunks, the first record is in a Parquet file and the last in JSON.
    pages = [[contact(1, email="first@x.test"), contact(2)], [contact(1, email="last@x.test")]]

    result = merge(database, "contacts", stage(CONTACTS, pages, tmp_path, **staging))

    assert (result.inserted, result.row_count) == (2, 2)
    assert [(r[0], r[1]) for r in rows(database, "contacts")] == [(1, "last@x.test"), (2, "c2@example.com")]


def test_a_value_that_cannot_be_typed_fails_naming_column_and_value_and_leaves_the_table(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2)]], tmp_path))
    before = rows(database, "contacts")
    pages = [[contact(1, email="changed@x.test"), contact(3)], [contact(4, registeredAt="yesterday")]]
    broken = stage(CONTACTS, pages, tmp_path, **staging)

    with pytest.raises(StagingError) as caught:
        merge(database, "contacts", broken)

    assert "record 1 of page 2" in str(caught.value)
    assert "'registeredAt' (column registered_at TIMESTAMPTZ) cannot hold \"yesterday\"" in str(caught.value)
    assert rows(database, "contacts") == before


def test_a_failure_inside_the_merge_rolls_back_everything(database: str, tmp_path: Path) -> None:
    merge(database, "tags", stage(TAGS, [[{"id": 1, "name": "a", "createdAt": "2024-01-01T00:00:00+00:00"}]], tmp_path))
    before = rows(database, "tags")
    batch = stage(TAGS, [[{"id": 1, "name": "renamed", "createdAt": None}, {"id": 2, "name": "b"}]], tmp_path)
    batch.paths[0].unlink()  # the staged file vanishes between fetch and merge

    with pytest.raises(WarehouseWriteError, match=r"marketing.duckdb: the merge into marketing.tags failed and nothing of it was written: IO Error: No files found"):
        merge(database, "tags", batch)
    assert rows(database, "tags") == before


def _merge_on_a_full_disk(database: str, batch: StagedBatch, headroom: int, outcome: Any) -> None:
    # The file may grow by `headroom` bytes and no more: every write past it fails as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(database) + headroom, resource.RLIM_INFINITY))
    try:
        # Contacts 1 and 2, every live row, are gone from this read: confirmed, so it is the
        # disk that refuses the write.
        merge(database, "contacts", batch, confirm_mass_deletion=True)
        outcome.put("merged")
    except Exception as error:  # noqa: BLE001 - what the user would read
        outcome.put(f"{type(error).__name__}: {error}")


@pytest.mark.slow  # a second or more: several real syncs
def test_a_merge_the_disk_refuses_names_the_file_and_the_cause_first_and_changes_nothing(
    database: str, tmp_path: Path
) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2)]], tmp_path))
    before = rows(database, "contacts")
    batch = stage(CONTACTS, [[contact(i, email=f"{'x' * 500}{i}@example.com") for i in range(3, 20003)]], tmp_path)
    spawn = multiprocessing.get_context("spawn")
    outcome = spawn.Queue()
    writer = spawn.Process(target=_merge_on_a_full_disk, args=(database, batch, 100_000, outcome))
    writer.start()
    message = outcome.get(timeout=120)
    writer.join(60)

    assert message.startswith(
        f"WarehouseWriteError: {database}: the merge into marketing.contacts failed and nothing of it was written:"
    ), message
    assert "Could not write file" in message and "File too large" in message
    assert "cannot rollback" not in message
    assert rows(database, "contacts") == before


def _stage_on_a_full_disk(directory: str, outcome: Any) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
    try:
        stage(CONTACTS, [[contact(i) for i in range(n * 100, n * 100 + 100)] for n in range(1, 20)], Path(directory))
        outcome.put("staged")
    except Exception as error:  # noqa: BLE001 - what the user would read
        outcome.put(f"{type(error).__name__}: {error}")


def test_staging_on_a_full_disk_names_the_file_and_the_cause(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    outcome = spawn.Queue()
    stager = spawn.Process(target=_stage_on_a_full_disk, args=(str(tmp_path), outcome))
    stager.start()
    message = outcome.get(timeout=120)
    stager.join(60)

    assert message.startswith("StagingError: contacts: could not stage page "), message
    assert re.search(rf" to {re.escape(str(tmp_path))}/\d+-[0-9a-f]+/mkt_contacts_00001_\w+\.ndjson: File too large \(errno 27\);", message)
    assert "nothing was written to the database." in message
    assert staged_files(tmp_path) == []  # the partial chunk is gone


def test_unknown_fields_are_kept_in_extra(database: str, tmp_path: Path) -> None:
    batch = stage(TAGS, [[{"id": 1, "name": "a", "createdAt": None, "color": "red", "meta": {"x": [1]}}, {"id": 2, "name": "b"}]], tmp_path)
    assert batch.unknown_fields == ("color", "meta")

    merge(database, "tags", batch)

    extras = [json.loads(r[-3]) if r[-3] else None for r in rows(database, "tags")]
    assert extras == [{"color": "red", "meta": {"x": [1]}}, None]


def test_contact_fields_merge_on_slug(database: str, tmp_path: Path) -> None:
    merge(database, "contact_fields", stage(FIELDS, [[{"slug": "city", "fieldName": "City"}]], tmp_path))

    result = merge(database, "contact_fields", stage(FIELDS, [[{"slug": "city", "fieldName": "Town"}, {"slug": "zip", "fieldName": "ZIP"}]], tmp_path))

    assert (result.inserted, result.updated) == (1, 1)
    assert [r[:2] for r in rows(database, "contact_fields")] == [("city", "Town"), ("zip", "ZIP")]


def test_course_modules_with_null_ids_land_as_typed_lists(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    course = {"id": 5, "locale": "fr", "domainName": None, "path": "/c", "active": True, "name": "Cours", "modules": [{"id": None, "name": "Intro"}, {"id": 9, "name": None}]}
    merge(database, "course_resources", stage(COURSES, [[course], [{**course, "id": 6, "modules": []}]], tmp_path, **staging))

    with connect(database) as connection:
        modules = connection.execute("SELECT id, modules FROM marketing.marketing.course_resources ORDER BY id").fetchall()
    assert modules == [(5, [{"id": None, "name": "Intro"}, {"id": 9, "name": None}]), (6, [])]


def test_sql_in_values_lands_as_data(database: str, tmp_path: Path) -> None:
    name = "x'); DROP TABLE contacts;--"
    merge(database, "contacts", stage(CONTACTS, [[contact(1)]], tmp_path))

    merge(database, "tags", stage(TAGS, [[{"id": 1, "name": name, "createdAt": None}]], tmp_path))

    assert rows(database, "tags")[0][1] == name
    assert len(rows(database, "contacts")) == 1


def test_a_table_missing_a_new_catalog_column_gains_it(database: str, tmp_path: Path) -> None:
    with connect(database) as connection:
        connection.execute("CREATE SCHEMA marketing.marketing")
        # As an older catalog made it: the bookkeeping columns of every version, no created_at
        # nor _deleted_at (a table without _extra and _synced_at is not the project's: refused).
        connection.execute(
            "CREATE TABLE marketing.marketing.tags (id BIGINT PRIMARY KEY, name VARCHAR, _extra JSON, _synced_at TIMESTAMPTZ)"
        )
        connection.execute("INSERT INTO marketing.marketing.tags VALUES (1, 'old', NULL, NULL)")

    # Tag 1, the only live row, is gone upstream: confirmed.
    merge(database, "tags", stage(TAGS, [[{"id": 2, "name": "new", "createdAt": "2024-01-01T00:00:00Z"}]], tmp_path), confirm_mass_deletion=True)

    assert [r[:2] for r in rows(database, "tags")] == [(1, "old"), (2, "new")]


def _hold_the_database(database: str, opened: Any, release: Any) -> None:
    with connect(database) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS held (a INTEGER)")
        opened.set()
        release.wait(60)


def _write_to_the_database(database: str, attempting: Any) -> None:
    attempting.set()
    with connect(database) as connection:
        connection.execute("CREATE TABLE written AS SELECT 42 AS answer")


@pytest.mark.slow  # a second or more: several real syncs
def test_a_second_writer_process_waits_for_the_first_instead_of_failing(database: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    opened, release, attempting = spawn.Event(), spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold_the_database, args=(database, opened, release))
    holder.start()
    assert opened.wait(60)
    writer = spawn.Process(target=_write_to_the_database, args=(database, attempting))
    writer.start()
    assert attempting.wait(60)
    # Without the lock DuckDB refuses the second opener at once and the writer dies;
    # with it, the writer is still queued however long the first one holds the file.
    writer.join(2)
    assert writer.is_alive(), f"the writer did not wait (exit code {writer.exitcode})"
    release.set()

    holder.join(60)
    writer.join(60)

    assert (holder.exitcode, writer.exitcode) == (0, 0)
    with connect(database) as connection:
        assert connection.execute("SELECT answer FROM written").fetchall() == [(42,)]


def _open_like_a_notebook(database: str, opened: Any, release: Any) -> None:
    with duckdb.connect(database, read_only=True):
        opened.set()
        release.wait(60)


@pytest.fixture()
def notebook(database: str) -> Iterator[int]:
    """A DuckDB session opened by hand on the file, outside this project's lock; its PID."""
    with connect(database) as connection:
        connection.execute("CREATE TABLE t AS SELECT 1 AS a")
    spawn = multiprocessing.get_context("spawn")
    opened, release = spawn.Event(), spawn.Event()
    outsider = spawn.Process(target=_open_like_a_notebook, args=(database, opened, release))
    outsider.start()
    assert opened.wait(60)
    try:
        yield outsider.pid  # type: ignore[misc]
    finally:
        release.set()
        outsider.join(60)


@pytest.mark.slow  # an outside process holds the file for a second
def test_a_file_held_by_an_outside_process_is_waited_for_saying_who_then_reported(
    database: str, notebook: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "WAIT_LOG_SECONDS", 0.2)
    said: list[str] = []
    started = time.monotonic()

    with pytest.raises(WarehouseBusyError) as caught:
        with connect(database, wait_seconds=1.0, log=said.append):
            pass

    waited = time.monotonic() - started
    assert 1.0 <= waited < 3.0
    holder = f"PID {notebook} ("
    assert f"stayed locked for 1 s, longer than the 1 s a sync waits (MKT_DUCKDB_WAIT_SECONDS), by {holder}" in str(caught.value)
    assert "a DuckDB session outside this project: close DuckDB sessions open on it and run again" in str(caught.value)
    # Logged every 0.2 s here (every 10 s by default) while it waited, each time naming the holder.
    assert len(said) >= 2 and all(f"(at most 1 s, MKT_DUCKDB_WAIT_SECONDS): held by {holder}" in line for line in said)
    assert all(re.match(rf"waiting [01] s for {re.escape(database)} ", line) for line in said)


@pytest.mark.slow  # processes side by side, each waiting its turn for the file
def test_waits_for_a_held_file_run_side_by_side_and_do_not_stack(database: str, notebook: int) -> None:
    # Three steps of a run met an analyst's session: each waited its two minutes in turn.
    failures: list[tuple[float, str]] = []
    started = time.monotonic()

    def open_it() -> None:
        try:
            with connect(database, wait_seconds=1.0, log=lambda line: None):
                pass
        except WarehouseBusyError as error:
            failures.append((time.monotonic() - started, str(error)))

    openers = [threading.Thread(target=open_it) for _ in range(3)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(30)

    assert len(failures) == 3
    # None failed before the bound, and all of them within about one bound, not three.
    assert all(1.0 <= at < 2.5 for at, _ in failures), failures
    # The two queued behind our own lock say so, and whom the first one is waiting for.
    queued = [message for _, message in failures if "itself waiting for" in message]
    assert len(queued) == 2 and all(f"PID {notebook} (" in message for message in queued)


def test_a_held_file_that_is_released_within_the_bound_is_opened(database: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    opened, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold_the_database, args=(database, opened, release))
    holder.start()
    assert opened.wait(60)
    said: list[str] = []
    waiting = threading.Event()

    def log(line: str) -> None:
        said.append(line)
        waiting.set()

    def release_once_waited_for() -> None:
        assert waiting.wait(30)
        release.set()

    releaser = threading.Thread(target=release_once_waited_for)
    releaser.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_module, "WAIT_LOG_SECONDS", 0.1)
        with connect(database, wait_seconds=30, log=log) as connection:
            assert connection.execute("SELECT count(*) FROM held").fetchone() == (0,)
    releaser.join(30)
    holder.join(60)
    assert said and f"held by PID {holder.pid} (a sync of this project)" in said[0]


def deleted_marks(database: str) -> dict[int, datetime | None]:
    with connect(database) as connection:
        table = fully_qualified(connection, "marketing", "contacts")
        return dict(connection.execute(f"SELECT id, _deleted_at FROM {table} ORDER BY id").fetchall())


def test_a_complete_sync_marks_rows_gone_upstream_and_unmarks_rows_that_come_back(database: str, tmp_path: Path) -> None:
    first, second, third = (datetime(2026, 1, day, tzinfo=timezone.utc) for day in (1, 2, 3))
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2), contact(3)]], tmp_path, first))

    gone = merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(3)]], tmp_path, second))

    assert (gone.deleted, gone.row_count, gone.total_rows, gone.unchanged) == (1, 2, 3, 2)
    assert deleted_marks(database) == {1: None, 2: second, 3: None}

    back = merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2), contact(3)]], tmp_path, third))

    assert (back.updated, back.deleted, back.row_count) == (1, 0, 3)
    assert deleted_marks(database) == {1: None, 2: None, 3: None}


def test_a_row_already_marked_keeps_its_first_mark(database: str, tmp_path: Path) -> None:
    first, second, third = (datetime(2026, 1, day, tzinfo=timezone.utc) for day in (1, 2, 3))
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2)]], tmp_path, first))
    merge(database, "contacts", stage(CONTACTS, [[contact(1)]], tmp_path, second))

    again = merge(database, "contacts", stage(CONTACTS, [[contact(1)]], tmp_path, third))

    assert again.deleted == 0
    assert deleted_marks(database) == {1: None, 2: second}


def test_a_partial_sync_marks_nothing(database: str, tmp_path: Path) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2)]], tmp_path))

    result = merge(database, "contacts", stage(CONTACTS, [[contact(3)]], tmp_path, complete=False))

    assert (result.inserted, result.deleted, result.row_count) == (1, 0, 3)
    assert deleted_marks(database) == {1: None, 2: None, 3: None}


def test_hard_delete_mode_removes_rows_gone_upstream(database: str, tmp_path: Path) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2), contact(3)]], tmp_path))

    with connect(database) as connection:
        result = merge_staged(connection, "marketing", "contacts", stage(CONTACTS, [[contact(2)]], tmp_path), deletions="delete")

    assert (result.deleted, result.row_count, result.total_rows) == (2, 1, 1)
    assert list(deleted_marks(database)) == [2]


@pytest.mark.parametrize(
    ("pages", "unique"),
    [
        ([[contact(1), contact(2)], [contact(5)]], True),
        ([[contact(9), contact(5)], [contact(2)]], True),  # descending order
        ([[contact(1), contact(2)], [contact(2)]], False),  # a key again
        ([[contact(1), contact(3)], [contact(2)]], False),  # out of order: it may repeat
    ],
)
def test_the_stager_knows_when_keys_cannot_repeat(tmp_path: Path, pages: list[list[dict[str, Any]]], unique: bool) -> None:
    assert stage(CONTACTS, pages, tmp_path).keys_unique is unique


@pytest.mark.parametrize(
    ("pages", "unique"),
    [
        ([("asc", [1, 2]), ("desc", [9, 8]), ("asc", [3, 4]), ("desc", [7, 5])], True),
        ([("asc", [1, 2]), ("desc", [9, 8]), ("asc", [3, 4]), ("desc", [8])], False),  # one end repeats a key
        ([("asc", [1, 2]), ("desc", [9, 8]), ("asc", [3, 2])], False),  # one end out of order
    ],
)
def test_the_stager_follows_the_key_order_of_each_end_of_a_two_ended_walk(
    tmp_path: Path, pages: list[tuple[str, list[int]]], unique: bool
) -> None:
    with PageStager(CONTACTS, directory=str(tmp_path)) as stager:
        for number, (order, ids) in enumerate(pages, start=1):
            items = [contact(i) for i in ids]
            body = json.dumps({"items": items, "hasMore": True}).encode()
            stager.add(Page(CONTACTS.name, number, "/api/contacts", {"order": order}, items, True, body))
        batch = stager.finish()
    batch.discard()

    assert batch.keys_unique is unique


def test_keys_that_are_not_ordered_are_still_deduplicated(database: str, tmp_path: Path, staging: dict[str, Any]) -> None:
    pages = [[contact(3, email="old@x.test"), contact(1)], [contact(2), contact(3, email="new@x.test")]]

    result = merge(database, "contacts", stage(CONTACTS, pages, tmp_path, **staging))

    assert result.inserted == 3
    assert [(r[0], r[1]) for r in rows(database, "contacts")] == [(1, "c1@example.com"), (2, "c2@example.com"), (3, "new@x.test")]


def test_the_stager_hands_over_each_full_chunk_as_it_closes_but_never_the_last(tmp_path: Path) -> None:
    handed: list[Path] = []
    stager = PageStager(TAGS, directory=str(tmp_path), chunk_pages=2, on_chunk=lambda path, longest: handed.append(path))
    with stager:
        for number in range(1, 6):
            items = [{"id": number, "name": f"t{number}", "createdAt": None}]
            body = json.dumps({"items": items, "hasMore": number < 5}).encode()
            stager.add(Page(TAGS.name, number, "/api/tags", {}, items, number < 5, body))
            # A chunk is handed over once it is closed, before the next page is written to it.
            assert len(handed) == (number - 1) // 2
        batch = stager.finish()

    assert [len(path.read_text().splitlines()) for path in batch.paths] == [2, 2, 1]
    assert handed == list(batch.paths[:2])


def test_chunks_typed_during_the_fetch_are_merged_from_parquet(database: str, tmp_path: Path) -> None:
    pages = [[contact(1)], [contact(2)], [contact(3)]]
    batch = stage(CONTACTS, pages, tmp_path, chunk_pages=1, typed=True)
    assert [json_path for json_path, _ in batch.typed] == list(batch.paths[:2])
    for json_path, _ in batch.typed:
        json_path.write_text("")  # only the Parquet copy can still tell the merge these rows

    assert merge(database, "contacts", batch).inserted == 3
    assert [r[0] for r in rows(database, "contacts")] == [1, 2, 3]


def test_a_chunk_that_fails_to_type_is_left_to_the_merge_which_names_the_value(database: str, tmp_path: Path) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1)]], tmp_path))
    before = rows(database, "contacts")
    pages = [[contact(2)], [contact(3, registeredAt="yesterday")], [contact(4)]]
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as queue, ChunkTyper(CONTACTS, queue) as typer:
        stager = PageStager(CONTACTS, directory=str(tmp_path), chunk_pages=1, on_chunk=typer.submit)
        with stager:
            for number, items in enumerate(pages, start=1):
                body = json.dumps({"items": items, "hasMore": number < 3}).encode()
                stager.add(Page(CONTACTS.name, number, "/api/contacts", {}, items, number < 3, body))
            batch = replace(stager.finish(), typed=typer.finish())

    assert [json_path for json_path, _ in batch.typed] == [batch.paths[0]]
    assert len(typer.failures) == 1 and batch.paths[1].name in typer.failures[0]
    with pytest.raises(StagingError, match=r"record 1 of page 2: field 'registeredAt' .* cannot hold \"yesterday\""):
        merge(database, "contacts", batch)
    assert rows(database, "contacts") == before


def test_unknown_fields_are_kept_in_extra_when_chunks_were_typed(database: str, tmp_path: Path) -> None:
    pages = [[{"id": 1, "name": "a", "createdAt": None}], [{"id": 2, "name": "b", "color": "red"}], [{"id": 3, "name": "c"}]]
    batch = stage(TAGS, pages, tmp_path, chunk_pages=1, typed=True)
    assert batch.unknown_fields == ("color",) and len(batch.typed) == 2

    merge(database, "tags", batch)

    assert [json.loads(r[-3]) if r[-3] else None for r in rows(database, "tags")] == [None, {"color": "red"}, None]


class FetchFailed(Exception):
    pass


def test_a_failed_fetch_leaves_no_typed_chunk_behind(tmp_path: Path) -> None:
    pages = [[{"id": 1, "name": "a"}], [{"id": 2, "name": "b"}], [{"id": 3, "name": "c"}]]
    with pytest.raises(FetchFailed), TypingQueue(DEFAULT_MEMORY_LIMIT) as queue, ChunkTyper(TAGS, queue) as typer:
        with PageStager(TAGS, directory=str(tmp_path), chunk_pages=1, on_chunk=typer.submit) as stager:
            for number, items in enumerate(pages, start=1):
                stager.add(Page(TAGS.name, number, "/api/tags", {}, items, True, json.dumps({"items": items, "hasMore": True}).encode()))
            raise FetchFailed("the API went away after three pages")

    assert staged_files(tmp_path) == []


def test_discarding_a_batch_removes_its_json_and_parquet_chunks(tmp_path: Path) -> None:
    batch = stage(TAGS, [[{"id": 1, "name": "a"}], [{"id": 2, "name": "b"}]], tmp_path, chunk_pages=1, typed=True)
    assert len(staged_files(tmp_path)) == 3

    batch.discard()

    assert staged_files(tmp_path) == []


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_staged_json_and_parquet_chunks_are_the_users_alone(tmp_path: Path, usual_umask: None) -> None:
    # Chunks hold contacts' e-mails; under the usual umask DuckDB would make the Parquet 0644.
    staging = tmp_path / "staging"
    batch = stage(CONTACTS, [[contact(1)], [contact(2)], [contact(3)]], staging, chunk_pages=1, typed=True)
    parquets = [parquet for _, parquet in batch.typed]
    assert len(parquets) == 2 and all(parquet.exists() for parquet in parquets)

    assert {path: mode(path) for path in (*batch.paths, *parquets)} == dict.fromkeys((*batch.paths, *parquets), 0o600)
    (area,) = {path.parent for path in (*batch.paths, *parquets)}
    assert area.parent == staging
    assert (mode(staging), mode(area)) == (0o700, 0o700)
    batch.discard()


def test_the_default_staging_directory_is_the_users_own_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with PageStager(TAGS) as stager:
        batch = stager.finish()

    (chunk,) = batch.paths
    staging = tmp_path / f"mkt_assets-{os.getuid()}" / "staging"
    assert chunk.parent.parent == staging
    assert [mode(path) for path in (staging.parent, staging, chunk.parent, chunk)] == [0o700, 0o700, 0o700, 0o600]
    batch.discard()


def test_a_staging_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o755)
    staging.chmod(0o755)

    with pytest.raises(PrivateDirectoryError, match=r"staging for private files: its mode is 0755"):
        with PageStager(TAGS, directory=str(staging)):
            pass
    assert list(staging.iterdir()) == []


def test_streaming_statements_run_under_the_small_limit_which_is_then_restored(database: str) -> None:
    def limit(connection: duckdb.DuckDBPyConnection) -> str:
        return connection.execute("SELECT current_setting('memory_limit')").fetchone()[0]  # type: ignore[index]

    with WarehouseFile(database, memory_limit="256MB").open() as connection:
        before = limit(connection)
        assert streamed(connection, lambda: limit(connection)) == "15.2 MiB"  # 16MB, as DuckDB prints it
        assert limit(connection) == before == "244.1 MiB"
        with pytest.raises(ZeroDivisionError):
            streamed(connection, lambda: 1 / 0)
        assert limit(connection) == before


def test_a_streaming_statement_that_runs_out_of_memory_runs_again_under_the_full_limit(database: str) -> None:
    seen: list[str] = []

    def work() -> str:
        seen.append(connection.execute("SELECT current_setting('memory_limit')").fetchone()[0])  # type: ignore[index]
        if len(seen) == 1:
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to pin block")
        return "done"

    with WarehouseFile(database, memory_limit="256MB").open() as connection:
        assert streamed(connection, work) == "done"
    assert seen == ["15.2 MiB", "244.1 MiB"]


def test_a_ten_megabyte_value_lands_in_the_table_its_normalized_tables_and_its_checks(database: str, tmp_path: Path) -> None:
    from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES


    big = "x" * (10 << 20)
    people = [contact(i) for i in range(1, 300)]
    people[150]["fields"] = [{"fieldName": "Biography", "slug": "city", "value": big}]
    merge(database, "contact_fields", stage(FIELDS, [[{"slug": "city", "fieldName": "City"}]], tmp_path))
    merge(database, "tags", stage(TAGS, [[{"id": 7, "name": "Café ☕"}]], tmp_path))
    result = merge(database, "contacts", stage(CONTACTS, [people[:100], people[100:200], people[200:]], tmp_path))
    assert result.inserted == 299
    file = WarehouseFile(database)  # the default limits: 128MB, 16MB for streaming work

    by_name = {table.name: table for table in NORMALIZED_TABLES}
    values = build_table_in_file(file, "marketing", by_name["contact_field_values"])
    tags = build_table_in_file(file, "marketing", by_name["contact_tags"])
    facts = synced_table_facts_in_file(file, "marketing", CONTACTS)
    references = all_reference_facts_in_file(file, "marketing", CONTACTS)
    tag_facts, slug_facts = references["contact_tags_exist"], references["contact_field_slugs_exist"]

    assert (values.row_count, values.expected_rows) == (299 * 2 - 1, 299 * 2 - 1)
    assert (tags.row_count, facts.live_rows) == (299, 299)
    assert (tag_facts.dangling, slug_facts.dangling) == (0, 298)  # phone_number is not a field of the account
    with connect(database) as connection:
        table = fully_qualified(connection, "marketing", "contact_field_values")
        (length,) = connection.execute(f"SELECT length(value) FROM {table} WHERE contact_id = 151").fetchone()  # type: ignore[misc]
    assert length == len(big)


def test_a_page_as_large_as_the_client_accepts_merges_under_the_default_memory_limit(database: str, tmp_path: Path) -> None:
    from mkt_assets.plumbing import lean_process
    from mkt_assets.source.client import DEFAULT_MAX_PAGE_BYTES

    people = [contact(i) for i in range(1, 101)]
    people[50]["fields"] = [{"fieldName": "Bio", "slug": "bio", "value": "x" * (DEFAULT_MAX_PAGE_BYTES - (64 << 10))}]
    batch = stage(CONTACTS, [people], tmp_path)

    result, _ = lean_process.call(merge_staged_file, WarehouseFile(database), "marketing", "contacts", batch)

    assert result.inserted == 100


def test_a_file_that_is_not_a_database_fails_at_once_even_if_its_path_says_lock(tmp_path: Path) -> None:
    broken = tmp_path / "blocks" / "unlocked.duckdb"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a DuckDB file" * 1000)
    started = time.monotonic()

    with pytest.raises(duckdb.Error) as caught:
        with connect(str(broken), wait_seconds=30):
            pass

    assert time.monotonic() - started < 10
    assert not isinstance(caught.value, WarehouseBusyError)


def test_fields_list_members_carry_that_the_catalog_does_not_know_are_kept_with_their_list_in_extra(
    database: str, tmp_path: Path
) -> None:
    tagged = contact(1, tags=[{"id": 7, "name": "Café ☕", "color": "red"}])
    batch = stage(CONTACTS, [[tagged, contact(2)]], tmp_path)
    assert batch.unknown_fields == ("tags[].color",)

    merge(database, "contacts", batch)

    with connect(database) as connection:
        table = fully_qualified(connection, "marketing", "contacts")
        extras = connection.execute(f"SELECT id, CAST(_extra AS VARCHAR), tags FROM {table} ORDER BY id").fetchall()
    assert json.loads(extras[0][1]) == {"tags": [{"id": 7, "name": "Café ☕", "color": "red"}]}
    assert extras[0][2] == [{"id": 7, "name": "Café ☕"}]
    assert extras[1][1] is None


def _page_with_a_field_twice(spec: ResourceSpec, tmp_path: Path, extra: str) -> StagedBatch:
    """A page whose second record sends `id` twice: Python keeps the last copy, DuckDB the first."""
    body = (
        '{"items": [{"id": 1, "email": "one@example.com"%s},'
        ' {"id": 2.5, "id": 2, "email": "jane.doe@example.com"%s}], "hasMore": false}' % (extra, extra)
    ).encode()
    items = json.loads(body)["items"]
    with PageStager(spec, directory=str(tmp_path)) as stager:
        stager.add(Page(spec.name, 1, "/api/contacts", {}, items, False, body, unknown_fields(spec, items)))
        return stager.finish()


@pytest.mark.parametrize("extra", ["", ', "score": 1'], ids=["typed path", "raw path (an unknown field)"])
def test_a_record_sending_a_field_twice_fails_without_quoting_it(database: str, tmp_path: Path, extra: str) -> None:
    merge(database, "contacts", stage(CONTACTS, [[contact(1)]], tmp_path))
    before = rows(database, "contacts")
    batch = _page_with_a_field_twice(CONTACTS, tmp_path, extra)

    with pytest.raises(StagingError) as caught:
        merge(database, "contacts", batch)

    assert "sends the field 'id' twice; DuckDB and the checks would read different values" in str(caught.value)
    assert "jane.doe" not in str(caught.value)
    assert rows(database, "contacts") == before


def test_a_chunk_that_fails_to_type_is_logged_without_the_records_it_quotes(tmp_path: Path) -> None:
    batch = _page_with_a_field_twice(CONTACTS, tmp_path, "")
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as queue, ChunkTyper(CONTACTS, queue) as typer:
        typer.submit(batch.paths[0], batch.longest_line)
        assert typer.finish() == ()

    (failure,) = typer.failures
    assert "duplicate key" in failure and "jane.doe" not in failure and "one@example.com" not in failure


@pytest.mark.parametrize(
    ("gone", "live", "refused"),
    [
        (0, 5000, False),
        (500, 5000, False),  # 10%: the share itself may go
        (501, 5000, True),
        (5000, 5000, True),  # the outage: an empty answer
        (1, 5, False),  # a user deleting 1 of 5 tags (20%): within the handful
        (5, 40, False),
        (6, 40, True),  # 15%, and more than the handful
        (3, 3, True),  # every row, however few
        (1, 1, True),
    ],
)
def test_a_mass_deletion_is_more_than_the_share_and_the_handful_or_every_live_row(gone: int, live: int, refused: bool) -> None:
    assert is_mass_deletion(gone, live, 0.1) is refused


def test_a_table_made_in_a_transaction_that_rolls_back_is_not_believed_to_exist(tmp_path: Path) -> None:
    # Whether a table exists is remembered once a transaction begins; a rollback undoes the
    # CREATE, and the memory with it.
    with connect(str(tmp_path / "w.duckdb")) as connection:
        connection.execute("CREATE SCHEMA marketing")
        with pytest.raises(RuntimeError), transaction(connection, "a write that fails"):
            connection.execute("CREATE TABLE marketing.made (id BIGINT)")
            made_table(connection, "marketing", "made")
            assert table_exists(connection, "marketing", "made")
            raise RuntimeError("the write fails after the table was made")
        assert not table_exists(connection, "marketing", "made")
        with transaction(connection, "a write that succeeds"):
            assert not table_exists(connection, "marketing", "made")
            connection.execute("CREATE TABLE marketing.made (id BIGINT)")
            made_table(connection, "marketing", "made")
            assert table_exists(connection, "marketing", "made")
        assert table_exists(connection, "marketing", "made")
    with connect(str(tmp_path / "w.duckdb")) as connection:
        assert table_exists(connection, "marketing", "made")
        assert not table_exists(connection, "marketing", "never_made")


def test_what_the_transaction_knows_of_the_catalog_follows_the_columns_and_tables_it_changes(tmp_path: Path) -> None:
    """The catalog is read once as a transaction begins: a column the project adds, a table it
    replaces or makes, and a rollback that undoes a CREATE are never answered from that read."""
    tags = RESOURCES_BY_NAME["tags"]
    with connect(str(tmp_path / "catalog.duckdb")) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing.tags (id BIGINT PRIMARY KEY)")
        connection.execute("CREATE TABLE marketing.built AS SELECT 1 AS a")
        with transaction(connection, "the test's"):
            assert table_columns(connection, "marketing", "tags") == {"id"}
            ensure_table(connection, "marketing", "tags", tags)  # adds the catalog's other columns
            assert table_columns(connection, "marketing", "tags") == {c.name for c in (*tags.columns, *BOOKKEEPING_COLUMNS)}
            assert table_columns(connection, "marketing", "built") == {"a"}
            forget_columns(connection, "marketing", "built")
            connection.execute("CREATE OR REPLACE TABLE marketing.built AS SELECT 1 AS b")
            assert table_columns(connection, "marketing", "built") == {"b"}
            connection.execute("CREATE OR REPLACE TABLE marketing.built AS SELECT 1 AS c")
            made_table(connection, "marketing", "built")
            assert table_columns(connection, "marketing", "built") == {"c"}
            assert not table_exists(connection, "marketing", "made")
            connection.execute("CREATE TABLE marketing.made (x INTEGER)")
            made_table(connection, "marketing", "made")
            assert table_exists(connection, "marketing", "made") and table_columns(connection, "marketing", "made") == {"x"}
            connection.execute("CREATE TABLE marketing.said (y INTEGER)")
            made_table(connection, "marketing", "said", ["y"])
            assert table_columns(connection, "marketing", "said") == {"y"}
            ensure_table(connection, "marketing", "new_tags", tags)  # made whole: no column to add
            in_catalog = connection.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'new_tags'").fetchall()
            assert table_columns(connection, "marketing", "new_tags") == {name for (name,) in in_catalog}
        with pytest.raises(RuntimeError), transaction(connection, "the test's"):
            connection.execute("CREATE TABLE marketing.undone (x INTEGER)")
            made_table(connection, "marketing", "undone")
            assert table_exists(connection, "marketing", "undone")
            raise RuntimeError("rolled back")
        assert not table_exists(connection, "marketing", "undone")
        assert table_columns(connection, "marketing", "undone") == set()


def test_a_built_tables_facts_count_its_rows_the_rows_expected_and_each_key_left_null(database: str, tmp_path: Path) -> None:
    from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES, build_facts

    tags = next(table for table in NORMALIZED_TABLES if table.name == "contact_tags")
    merge(database, "tags", stage(TAGS, [[{"id": 7, "name": "vip"}]], tmp_path))
    merge(database, "contacts", stage(CONTACTS, [[contact(1), contact(2)]], tmp_path))
    built = build_table_in_file(WarehouseFile(database), "marketing", tags)
    assert (built.row_count, built.expected_rows, built.null_keys) == (2, 2, {name: 0 for name in tags.not_null})
    with connect(database) as connection:
        target = fully_qualified(connection, "marketing", "contact_tags")
        # A row the checks must see: one no live contact's tags account for, its keys null.
        connection.execute(f"INSERT INTO {target} (contact_id) VALUES (NULL)")
        facts = build_facts(connection, "marketing", tags)
    assert (facts.row_count, facts.expected_rows) == (3, 2)
    assert facts.null_keys == {name: 1 for name in tags.not_null}
