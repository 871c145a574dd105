"""History: every version of every synced row, kept by the merge, exactly."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.history import history_table
from mkt_assets.warehouse.merge import MergeResult
from mkt_assets.warehouse.reads import READS_TABLE
from mkt_assets.warehouse.sql_names import fully_qualified, table_exists
from mkt_assets.warehouse.table_facts import history_facts
from mkt_assets_tests.test_warehouse import CONTACTS, STAGINGS, contact, stage
from mkt_assets_tests.warehouse_calls import merge_staged

TABLES_DOC = Path(__file__).resolve().parents[1] / "docs" / "tables.md"
# The syncs of the story below, a day apart, in November 2026 (docs/tables.md's queries ask about it).
DAY = [datetime(2026, 11, day, 3, 0, tzinfo=timezone.utc) for day in range(1, 9)]
API_KEY = "history-secret-5b1e"


@pytest.fixture()
def database(tmp_path: Path) -> str:
    return str(tmp_path / "history.duckdb")


def sync(database: str, tmp_path: Path, day: int, records: list[dict[str, Any]], **options: Any) -> MergeResult:
    complete = options.pop("complete", True)
    batch = stage(CONTACTS, [records], tmp_path, when=DAY[day], complete=complete, **options.pop("staging", {}))
    with connect(database) as connection:
        return merge_staged(connection, "marketing", "contacts", batch, **options)


def versions(database: str, *columns: str) -> list[tuple[Any, ...]]:
    """(id, the columns asked, _valid_from, _valid_to) of every version, in key and time order."""
    with connect(database) as connection:
        table = fully_qualified(connection, "marketing", "contacts_history")
        picked = ", ".join(["id", *columns, "_valid_from", "_valid_to"])
        return connection.execute(f"SELECT {picked} FROM {table} ORDER BY id, _valid_from").fetchall()


def faults(database: str) -> tuple[int, int, int, list[object]]:
    with connect(database) as connection:
        facts = history_facts(connection, "marketing", CONTACTS)
    return facts.live_without_one_open, facts.open_not_live, facts.overlapping, facts.keys


def forget_reads(database: str) -> None:
    """The file as a version of the project that did not record its reads left it."""
    with connect(database) as connection:
        connection.execute(f"DROP TABLE {fully_qualified(connection, 'marketing', READS_TABLE)}")


def tagged(contact_id: int, *tag_ids: int, **changes: Any) -> dict[str, Any]:
    return contact(contact_id, tags=[{"id": tag_id, "name": f"tag {tag_id}"} for tag_id in tag_ids], **changes)


def city(name: str) -> list[dict[str, Any]]:
    return [{"fieldName": "City", "slug": "city", "value": name}]


def tell_the_story(database: str, tmp_path: Path, staging: dict[str, Any] | None = None) -> list[tuple[int, int]]:
    """Six syncs with changes in between; each merge's (versions opened, versions closed)."""
    staging = staging or {}
    steps = [
        [tagged(42, 7), tagged(43, 7), tagged(44, 7, fields=city("Zürich"))],
        # a tag added, an unsubscribe, a field's value changed
        [tagged(42, 7, 8), tagged(43, 7, unsubscribed=True), tagged(44, 7, fields=city("Bern"))],
        # a tag removed; 44 deleted upstream
        [tagged(42, 8), tagged(43, 7, unsubscribed=True)],
        # 44 back
        [tagged(42, 8), tagged(43, 7, unsubscribed=True), tagged(44, 7, fields=city("Bern"))],
        # nothing changed
        [tagged(42, 8), tagged(43, 7, unsubscribed=True), tagged(44, 7, fields=city("Bern"))],
    ]
    done = []
    for day, records in enumerate(steps):
        result = sync(database, tmp_path, day, records, staging=staging)
        done.append((result.versions_opened, result.versions_closed))
    # An incremental read: a new contact, and nothing said of the others.
    result = sync(database, tmp_path, 5, [tagged(45, 9)], complete=False, staging=staging)
    done.append((result.versions_opened, result.versions_closed))
    return done


@pytest.mark.parametrize("staging", list(STAGINGS))
def test_every_change_opens_a_version_that_closes_the_one_before_at_the_same_instant(
    database: str, tmp_path: Path, staging: str
) -> None:
    opened_closed = tell_the_story(database, tmp_path, STAGINGS[staging])

    assert opened_closed == [(3, 0), (3, 3), (1, 2), (1, 0), (0, 0), (1, 0)]
    tag_ids = "[t.id FOR t IN tags]"
    assert versions(database, tag_ids, "unsubscribed", "fields[1].value") == [
        (42, [7], False, "Zürich", DAY[0], DAY[1]),
        (42, [7, 8], False, "Zürich", DAY[1], DAY[2]),
        (42, [8], False, "Zürich", DAY[2], None),
        (43, [7], False, "Zürich", DAY[0], DAY[1]),
        (43, [7], True, "Zürich", DAY[1], None),
        (44, [7], False, "Zürich", DAY[0], DAY[1]),
        (44, [7], False, "Bern", DAY[1], DAY[2]),
        # gone on the third day, back on the fourth: a gap, not an overlap
        (44, [7], False, "Bern", DAY[3], None),
        (45, [9], False, "Zürich", DAY[5], None),
    ]
    assert faults(database) == (0, 0, 0, [])
    # The open versions are the live rows, column for column (the catalog's and _extra).
    with connect(database) as connection:
        names = ", ".join(f'"{c.name}"' for c in CONTACTS.columns) + ", _extra"
        live = connection.execute(
            f"SELECT {names} FROM {fully_qualified(connection, 'marketing', 'contacts')} WHERE _deleted_at IS NULL ORDER BY id"
        ).fetchall()
        current = connection.execute(
            f"SELECT {names} FROM {fully_qualified(connection, 'marketing', 'contacts_history')}"
            " WHERE _valid_to IS NULL ORDER BY id"
        ).fetchall()
    assert current == live and len(live) == 4


def test_a_field_the_catalog_does_not_know_is_part_of_the_version(database: str, tmp_path: Path) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7, score=1)])
    result = sync(database, tmp_path, 1, [tagged(42, 7, score=2)])

    assert (result.versions_opened, result.versions_closed) == (1, 1)
    assert [(row[1], row[2], row[3]) for row in versions(database, "_extra ->> 'score'")] == [
        ("1", DAY[0], DAY[1]),
        ("2", DAY[1], None),
    ]


def test_removing_rows_gone_upstream_closes_their_versions_and_keeps_them(database: str, tmp_path: Path) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions="delete")
    result = sync(database, tmp_path, 1, [tagged(42, 7)], deletions="delete")

    assert (result.deleted, result.versions_opened, result.versions_closed) == (1, 0, 1)
    assert versions(database) == [(42, DAY[0], None), (43, DAY[0], DAY[1])]
    assert faults(database) == (0, 0, 0, [])
    # Back after being removed: a new row to the table, a new version to the history.
    result = sync(database, tmp_path, 2, [tagged(42, 7), tagged(43, 7)], deletions="delete")
    assert (result.inserted, result.versions_opened, result.versions_closed) == (1, 1, 0)
    assert versions(database)[1:] == [(43, DAY[0], DAY[1]), (43, DAY[2], None)]


@pytest.mark.parametrize("deletions", ["mark", "delete"])
def test_a_sync_that_began_earlier_but_lands_later_leaves_what_the_newer_one_wrote(
    database: str, tmp_path: Path, deletions: str
) -> None:
    """Overlapping runs: A began reading (day 1) before B (day 2), but B committed first. A's
    read is older than what B wrote, so A leaves B's rows as they are, and changes the rest.
    (B's read being complete, A is not applied at all, see test_reads; here B wrote the file
    before reads were recorded, and what B wrote is still kept.)"""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7), tagged(46, 7)], deletions=deletions)
    # B: 42 changed, 44 gone upstream, 45 new.
    sync(database, tmp_path, 2, [tagged(42, 8), tagged(43, 7), tagged(45, 7), tagged(46, 7)], deletions=deletions)
    forget_reads(database)

    # A read 42 and 44 before B did, missed 45 (created after A's read), and saw 43 and 46 change.
    late = sync(
        database, tmp_path, 1, [tagged(42, 7, 9), tagged(43, 7, unsubscribed=True), tagged(44, 7), tagged(46, 9)],
        deletions=deletions,
    )  # fmt: skip

    # 42 and 45 as B wrote them, and 44 gone (marked, or removed and known to the history).
    assert (late.inserted, late.updated, late.unchanged, late.deleted, late.newer_kept) == (0, 2, 0, 0, 3)
    with connect(database) as connection:
        rows = connection.execute(
            "SELECT id, [tag.id FOR tag IN tags], unsubscribed, _deleted_at FROM marketing.contacts ORDER BY id"
        ).fetchall()
    gone_44 = [(44, [7], False, DAY[2])] if deletions == "mark" else []
    assert rows == [(42, [8], False, None), (43, [7], True, None), *gone_44, (45, [7], False, None), (46, [9], False, None)]
    # The history too: B's versions stay open, A's changes open theirs, and no version ends
    # before it begins.
    assert versions(database, "unsubscribed") == [
        (42, False, DAY[0], DAY[2]),
        (42, False, DAY[2], None),
        (43, False, DAY[0], DAY[1]),
        (43, True, DAY[1], None),
        (44, False, DAY[0], DAY[2]),
        (45, False, DAY[2], None),
        (46, False, DAY[0], DAY[1]),
        (46, False, DAY[1], None),
    ]
    assert faults(database) == (0, 0, 0, [])


@pytest.mark.parametrize("older", [{"deletions": "mark"}, {"deletions": "delete", "history": False}])
def test_a_row_a_newer_sync_removed_stays_removed_whatever_the_older_run_keeps(
    database: str, tmp_path: Path, older: dict[str, Any]
) -> None:
    """The newer run removed 43 (``delete`` mode, its history closed the version); the older
    run lands in ``mark`` mode or keeping no history: the history still says 43 went later."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions="delete")
    sync(database, tmp_path, 2, [tagged(42, 7)], deletions="delete")
    forget_reads(database)  # as above: B wrote before reads were recorded

    late = sync(database, tmp_path, 1, [tagged(42, 7), tagged(43, 7)], **older)

    assert (late.inserted, late.newer_kept) == (0, 1)
    with connect(database) as connection:
        assert connection.execute("SELECT id FROM marketing.contacts").fetchall() == [(42,)]
    assert versions(database) == [(42, DAY[0], None), (43, DAY[0], DAY[2])]
    assert faults(database) == (0, 0, 0, [])


def test_a_history_started_beside_stored_rows_begins_with_them(database: str, tmp_path: Path) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], history=False)
    sync(database, tmp_path, 1, [tagged(42, 7, 8), tagged(43, 7)], history=False)
    with connect(database) as connection:
        assert not table_exists(connection, "marketing", "contacts_history")

    result = sync(database, tmp_path, 2, [tagged(42, 7, 8), tagged(43, 7, unsubscribed=True)])

    assert (result.versions_opened, result.versions_closed) == (1, 1)
    # Each stored row since it was last written; the deleted one closed when it was found gone.
    assert versions(database, "unsubscribed") == [
        (42, False, DAY[1], None),
        (43, False, DAY[0], DAY[2]),
        (43, True, DAY[2], None),
        (44, False, DAY[0], DAY[1]),
    ]
    assert faults(database) == (0, 0, 0, [])


def test_the_history_facts_name_each_kind_of_fault(database: str, tmp_path: Path) -> None:
    tell_the_story(database, tmp_path)
    with connect(database) as connection:
        history = fully_qualified(connection, "marketing", "contacts_history")
        # 42: a second open version; 43: its open version closed; 44's last two versions made
        # to overlap; 46: an open version of a row the table does not hold.
        connection.execute(f"INSERT INTO {history} SELECT * REPLACE (TIMESTAMPTZ '2026-11-20 00:00:00+00' AS _valid_from) FROM {history} WHERE id = 42 AND _valid_to IS NULL")
        connection.execute(f"UPDATE {history} SET _valid_to = _valid_from + INTERVAL 1 HOUR WHERE id = 43 AND _valid_to IS NULL")
        connection.execute(f"UPDATE {history} SET _valid_to = TIMESTAMPTZ '2026-11-30 00:00:00+00' WHERE id = 44 AND _valid_from = ?", [DAY[1]])
        connection.execute(f"INSERT INTO {history} SELECT * REPLACE (46 AS id) FROM {history} WHERE id = 45")

    live, open_not_live, overlapping, keys = faults(database)

    # 42 counts twice: two open versions, the first of them open (so overlapping) too.
    assert (live, open_not_live, overlapping) == (2, 1, 2)
    assert keys == [42, 43, 44, 46]


def test_the_documented_history_queries_answer_the_story(database: str, tmp_path: Path) -> None:
    tell_the_story(database, tmp_path)
    text = TABLES_DOC.read_text()
    block = text[text.index("## History queries") :]
    sql = block[block.index("```sql") + len("```sql") : block.index("```", block.index("```sql") + 6)]
    # "Last month" as seen from early December 2026, when the story's November is last month.
    statements = [s.strip().replace("now()", "TIMESTAMPTZ '2026-12-10 00:00:00+00'") for s in sql.split(";") if s.strip()]
    assert len(statements) == 3

    with connect(database) as connection:
        # DuckDB names a file's catalog after it; the documented two-part names need it to differ.
        catalog = fully_qualified(connection, "marketing").split(".")[0]
        results = [connection.execute(s.replace("marketing.", f"{catalog}.marketing.")).fetchall() for s in statements]

    unsubscribes, tags_on_a_date, tags_added_and_removed = results
    assert unsubscribes == [(datetime(2026, 11, 2, tzinfo=timezone.utc), 1)]  # 43, on Monday 2 November
    assert tags_on_a_date == [(["tag 8"],)]  # 42 on 15 November
    assert tags_added_and_removed == [(42, DAY[1], [8], []), (42, DAY[2], [], [7])]


def _run(database: str, tmp_path: Path, data: SandboxData, **settings: Any) -> dg.ExecuteInProcessResult:
    with SandboxServer(data, api_key=API_KEY) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MKT_API_BASE_URL", server.base_url)
        patch.setenv("MKT_API_KEY", API_KEY)
        defs = build_definitions(Settings(duckdb_path=database, **settings))
        result = defs.resolve_job_def("marketing_sync").execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return result


def _metadata(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == name]
    return {key: value.value for key, value in event.materialization.metadata.items()}


@pytest.mark.slow  # a second or more: several real syncs
def test_a_sync_reports_its_versions_and_checks_every_history(database: str, tmp_path: Path) -> None:
    data = SandboxData(seed=8, contacts=300)
    _run(database, tmp_path, data)
    retagged, deleted = list(data.contact_ids)[10], list(data.contact_ids)[20]
    data.set_contact_tags(retagged, data.tag_ids[:2])
    data.delete_contact(deleted)

    result = _run(database, tmp_path, data)

    contacts = _metadata(result, "contacts")
    assert (contacts["history_table"], contacts["versions_opened"], contacts["versions_closed"]) == (
        "marketing.contacts_history", 1, 2
    )
    checks = [e for e in result.get_asset_check_evaluations() if e.check_name == "history_is_consistent"]
    assert sorted(e.asset_key.path[-1] for e in checks) == sorted(spec.name for spec in RESOURCES)
    assert all(e.passed for e in checks)
    with connect(database) as connection:
        history = fully_qualified(connection, "marketing", history_table("contacts"))
        assert connection.execute(f"SELECT count(*) FROM {history} WHERE id = ? AND _valid_to IS NULL", [deleted]).fetchone() == (0,)
        assert connection.execute(f"SELECT count(*) FROM {history} WHERE id = ?", [retagged]).fetchone() == (2,)


@pytest.mark.slow  # a second or more: several real syncs
def test_with_history_off_there_is_no_history_and_no_check(database: str, tmp_path: Path) -> None:
    result = _run(database, tmp_path, SandboxData(seed=8, contacts=50), history=False)

    assert "versions_opened" not in _metadata(result, "contacts")
    assert [e for e in result.get_asset_check_evaluations() if e.check_name == "history_is_consistent"] == []
    with connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "contacts" in tables and not {name for name in tables if name.endswith("_history")}
