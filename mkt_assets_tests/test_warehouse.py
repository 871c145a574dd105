"""Staging and the DuckDB merge: typed columns, merge semantics, atomic failure."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from mkt_assets.catalog import RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.client import Page
from mkt_assets import warehouse
from mkt_assets.chunk_typing import ChunkTyper
from mkt_assets.errors import PrivateDirectoryError, RecordError, StagingError, WarehouseBusyError
from mkt_assets.private_files import AREA_LOCK_NAME
from mkt_assets.staging import DEFAULT_CHUNK_PAGES, PageStager, StagedBatch
from mkt_assets.warehouse import connect, fully_qualified, merge_staged

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
    with ChunkTyper(spec, warehouse.DEFAULT_MEMORY_LIMIT) as typer:
        stager = PageStager(
            spec, directory=str(directory), complete=complete, chunk_pages=chunk_pages, on_chunk=typer.submit if typed else None
        )
        if when is not None:
            stager.synced_at = when
        with stager:
            for number, items in enumerate(pages, start=1):
                body = json.dumps({"items": items, "hasMore": number < len(pages)}, ensure_ascii=False, indent=1).encode()
                stager.add(Page(spec.name, number, f"/api{spec.path}", {}, items, number < len(pages), body))
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


def merge(database: str, table: str, batch: StagedBatch):  # type: ignore[no-untyped-def]
    with connect(database) as connection:
        return merge_staged(connection, "marketing", table, batch)


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

    with pytest.raises(duckdb.IOException):
        merge(database, "tags", batch)
    assert rows(database, "tags") == before


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


def test_a_record_without_its_key_fails_naming_its_position_and_stages_nothing(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"contacts: /api/contacts: record 2 of page 2 \(record 4 of the sync\) has no 'id'"):
        stage(CONTACTS, [[contact(1), contact(2)], [contact(3), {"email": "no-id@x.test"}]], tmp_path)
    assert staged_files(tmp_path) == []


def test_a_table_missing_a_new_catalog_column_gains_it(database: str, tmp_path: Path) -> None:
    with connect(database) as connection:
        connection.execute("CREATE SCHEMA marketing.marketing")
        connection.execute("CREATE TABLE marketing.marketing.tags (id BIGINT PRIMARY KEY, name VARCHAR)")
        connection.execute("INSERT INTO marketing.marketing.tags VALUES (1, 'old')")

    merge(database, "tags", stage(TAGS, [[{"id": 2, "name": "new", "createdAt": "2024-01-01T00:00:00Z"}]], tmp_path))

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


def test_a_file_held_by_an_outside_process_is_waited_for_then_reported(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(database) as connection:
        connection.execute("CREATE TABLE t AS SELECT 1 AS a")
    spawn = multiprocessing.get_context("spawn")
    opened, release = spawn.Event(), spawn.Event()
    outsider = spawn.Process(target=_open_like_a_notebook, args=(database, opened, release))
    outsider.start()
    assert opened.wait(60)
    monkeypatch.setattr(warehouse, "OUTSIDER_PATIENCE_SECONDS", 0.3)

    with pytest.raises(WarehouseBusyError, match="close DuckDB sessions open on it"):
        with connect(database):
            pass

    release.set()
    outsider.join(60)
    with connect(database) as connection:
        assert connection.execute("SELECT a FROM t").fetchall() == [(1,)]


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
    stager = PageStager(TAGS, directory=str(tmp_path), chunk_pages=2, on_chunk=handed.append)
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
    with ChunkTyper(CONTACTS, warehouse.DEFAULT_MEMORY_LIMIT) as typer:
        stager = PageStager(CONTACTS, directory=str(tmp_path), chunk_pages=1, on_chunk=typer.submit)
        with stager:
            for number, items in enumerate(pages, start=1):
                body = json.dumps({"items": items, "hasMore": number < 3}).encode()
                stager.add(Page(CONTACTS.name, number, "/api/contacts", {}, items, number < 3, body))
            batch = replace(stager.finish(), typed=typer.finish())

    assert [json_path for json_path, _ in batch.typed] == [batch.paths[0]]
    assert len(typer.failures) == 1 and batch.paths[1].name in typer.failures[0]
    with pytest.raises(StagingError, match="record 1 of page 2: field 'registeredAt' .* cannot hold \"yesterday\""):
        merge(database, "contacts", batch)
    assert rows(database, "contacts") == before


def test_unknown_fields_are_kept_in_extra_when_chunks_were_typed(database: str, tmp_path: Path) -> None:
    pages = [[{"id": 1, "name": "a", "createdAt": None}], [{"id": 2, "name": "b", "color": "red"}], [{"id": 3, "name": "c"}]]
    batch = stage(TAGS, pages, tmp_path, chunk_pages=1, typed=True)
    assert batch.unknown_fields == ("color",) and len(batch.typed) == 2

    merge(database, "tags", batch)

    assert [json.loads(r[-3]) if r[-3] else None for r in rows(database, "tags")] == [None, {"color": "red"}, None]


def test_a_failed_fetch_leaves_no_typed_chunk_behind(tmp_path: Path) -> None:
    with pytest.raises(RecordError):
        stage(TAGS, [[{"id": 1, "name": "a"}], [{"id": 2, "name": "b"}], [{"name": "no id"}]], tmp_path, chunk_pages=1, typed=True)

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

    with warehouse.WarehouseFile(database, memory_limit="256MB").open() as connection:
        before = limit(connection)
        with warehouse.streaming(connection):
            assert limit(connection) == "15.2 MiB"  # 16MB, as DuckDB prints it
        assert limit(connection) == before == "244.1 MiB"
        with pytest.raises(ZeroDivisionError), warehouse.streaming(connection):
            1 / 0
        assert limit(connection) == before
