"""Overlapping syncs landing in either order: the tables and their history end as the sync that
began last read the source, whatever order full and incremental reads commit in."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.merge import MergeResult
from mkt_assets.warehouse.reads import READS_TABLE
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.test_history import DAY, faults, tagged
from mkt_assets_tests.test_warehouse import CONTACTS, stage
from mkt_assets_tests.warehouse_calls import merge_staged

DELETIONS = ["mark", "delete"]


def sync(
    database: str, tmp_path: Path, day: int, records: list[dict[str, Any]], *, after: int | None = None, deletions: str
) -> MergeResult:
    """Land a read that began on ``day``: complete, or incremental (every key above ``after``)."""
    batch = stage(CONTACTS, [records], tmp_path, when=DAY[day], complete=after is None)
    with connect(database) as connection:
        return merge_staged(connection, "marketing", "contacts", replace(batch, after=after), deletions=deletions)


def table(database: str) -> list[tuple[int, list[int], datetime | None]]:
    """(id, tag ids, _deleted_at) of every stored contact."""
    with connect(database) as connection:
        contacts = fully_qualified(connection, "marketing", "contacts")
        return connection.execute(
            f"SELECT id, [tag.id FOR tag IN tags], _deleted_at FROM {contacts} ORDER BY id"
        ).fetchall()


def versions(database: str) -> list[tuple[int, list[int], datetime, datetime | None]]:
    with connect(database) as connection:
        history = fully_qualified(connection, "marketing", "contacts_history")
        return connection.execute(
            f"SELECT id, [tag.id FOR tag IN tags], _valid_from, _valid_to FROM {history} ORDER BY id, _valid_from"
        ).fetchall()


@pytest.mark.parametrize("deletions", DELETIONS)
def test_an_older_full_read_landing_after_a_newer_one_is_not_applied(database: str, tmp_path: Path, deletions: str) -> None:
    """The report's case: 42's tag went 7, 8, 7 while both read. The newer sync read it
    unchanged (7), so wrote nothing to it; the older one, landing last, wrote 8 over it."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions=deletions)
    newer = sync(database, tmp_path, 2, [tagged(42, 7), tagged(43, 9), tagged(45, 7)], deletions=deletions)
    before = (table(database), versions(database))

    older = sync(database, tmp_path, 1, [tagged(42, 8), tagged(43, 7), tagged(44, 7), tagged(46, 7)], deletions=deletions)

    assert newer.superseded_by is None
    assert older.superseded_by == DAY[2]
    assert (older.inserted, older.updated, older.deleted, older.versions_opened, older.versions_closed) == (0, 0, 0, 0, 0)
    assert (table(database), versions(database)) == before
    gone_44 = [(44, [7], DAY[2])] if deletions == "mark" else []
    assert table(database) == [(42, [7], None), (43, [9], None), *gone_44, (45, [7], None)]
    assert [v for v in versions(database) if v[0] == 42] == [(42, [7], DAY[0], None)]
    assert faults(database) == (0, 0, 0, [])


@pytest.mark.parametrize("deletions", DELETIONS)
def test_full_reads_landing_in_the_order_they_began_end_as_the_newer_read(database: str, tmp_path: Path, deletions: str) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions=deletions)
    sync(database, tmp_path, 1, [tagged(42, 8), tagged(43, 7)], deletions=deletions)

    newer = sync(database, tmp_path, 2, [tagged(42, 7), tagged(43, 7)], deletions=deletions)

    assert newer.superseded_by is None and newer.updated == 1
    assert table(database) == [(42, [7], None), (43, [7], None)]
    # 8 was what the source held when the first sync read it: a true version, closed by the next.
    assert versions(database)[:3] == [(42, [7], DAY[0], DAY[1]), (42, [8], DAY[1], DAY[2]), (42, [7], DAY[2], None)]
    assert faults(database) == (0, 0, 0, [])


@pytest.mark.parametrize("deletions", DELETIONS)
def test_an_older_full_read_landing_after_a_newer_incremental_one_keeps_what_that_one_read(
    database: str, tmp_path: Path, deletions: str
) -> None:
    """The newer read took every contact above 43: 44 changed, 45 deleted before it read, 46
    new. The older full read is still the newest read of 42 and 43, so that part lands."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions=deletions)
    sync(database, tmp_path, 2, [tagged(44, 9), tagged(46, 7)], after=43, deletions=deletions)

    older = sync(database, tmp_path, 1, [tagged(42, 8), tagged(44, 7), tagged(45, 7)], deletions=deletions)

    assert older.superseded_by is None
    assert (older.updated, older.inserted, older.deleted, older.newer_kept) == (1, 0, 1, 3)
    gone_43 = [(43, [7], DAY[1])] if deletions == "mark" else []
    assert table(database) == [(42, [8], None), *gone_43, (44, [9], None), (46, [7], None)]
    assert versions(database) == [
        (42, [7], DAY[0], DAY[1]),
        (42, [8], DAY[1], None),
        (43, [7], DAY[0], DAY[1]),
        (44, [9], DAY[2], None),
        (46, [7], DAY[2], None),
    ]
    assert faults(database) == (0, 0, 0, [])


@pytest.mark.parametrize("deletions", DELETIONS)
def test_a_row_a_newer_incremental_read_found_unchanged_is_not_overwritten_by_an_older_read(
    database: str, tmp_path: Path, deletions: str
) -> None:
    """Three syncs: the one that began first (day 0) stored 44 with tag 7 after the incremental
    one (day 2) had planned from 43; that one then read 44 unchanged and wrote nothing to it.
    The full read of day 1, which saw tag 8 in between, lands last: 44 stays 7."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions=deletions)
    incremental = sync(database, tmp_path, 2, [tagged(44, 7)], after=43, deletions=deletions)
    assert (incremental.inserted, incremental.updated, incremental.unchanged) == (0, 0, 1)

    older = sync(database, tmp_path, 1, [tagged(42, 7), tagged(43, 7), tagged(44, 8)], deletions=deletions)

    assert (older.updated, older.newer_kept) == (0, 1)
    assert table(database) == [(42, [7], None), (43, [7], None), (44, [7], None)]
    assert [v for v in versions(database) if v[0] == 44] == [(44, [7], DAY[0], None)]


@pytest.mark.parametrize("deletions", DELETIONS)
@pytest.mark.parametrize("newer_lands_first", [True, False])
def test_a_full_read_that_began_after_an_incremental_one_wins_in_either_order(
    database: str, tmp_path: Path, deletions: str, newer_lands_first: bool
) -> None:
    """The incremental read (day 1) saw 44 with tag 8 and 45, which were changed and deleted
    before the full read (day 2) saw the account."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions=deletions)
    reads = [
        lambda: sync(database, tmp_path, 2, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions=deletions),
        lambda: sync(database, tmp_path, 1, [tagged(44, 8), tagged(45, 7)], after=43, deletions=deletions),
    ]
    results = [read() for read in (reads if newer_lands_first else reversed(reads))]

    gone_45 = [] if newer_lands_first or deletions == "delete" else [(45, [7], DAY[2])]
    assert table(database) == [(42, [7], None), (43, [7], None), (44, [7], None), *gone_45]
    if newer_lands_first:
        assert results[1].superseded_by == DAY[2]
        assert versions(database) == [(42, [7], DAY[0], None), (43, [7], DAY[0], None), (44, [7], DAY[2], None)]
    else:
        assert results[1].superseded_by is None
        # What the incremental read saw was true on day 1; the full read closed it on day 2.
        assert [v for v in versions(database) if v[0] >= 44] == [
            (44, [8], DAY[1], DAY[2]),
            (44, [7], DAY[2], None),
            (45, [7], DAY[1], DAY[2]),
        ]
    assert faults(database) == (0, 0, 0, [])


@pytest.mark.parametrize("deletions", DELETIONS)
def test_an_older_incremental_read_landing_after_a_newer_one_adds_nothing_that_one_did_not_see(
    database: str, tmp_path: Path, deletions: str
) -> None:
    """Both read above 43. The older saw 44 with tag 8 and 45; by the newer read 44 had tag 9
    and 45 was deleted."""
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions=deletions)
    sync(database, tmp_path, 2, [tagged(44, 9), tagged(46, 7)], after=43, deletions=deletions)

    older = sync(database, tmp_path, 1, [tagged(44, 8), tagged(45, 7)], after=43, deletions=deletions)

    assert (older.inserted, older.updated, older.newer_kept) == (0, 0, 3)
    assert table(database) == [(42, [7], None), (43, [7], None), (44, [9], None), (46, [7], None)]
    assert [v for v in versions(database) if v[0] >= 44] == [(44, [9], DAY[2], None), (46, [7], DAY[2], None)]
    assert faults(database) == (0, 0, 0, [])


def test_the_bookkeeping_keeps_only_reads_that_can_still_decide(database: str, tmp_path: Path) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7)], deletions="mark")
    sync(database, tmp_path, 1, [tagged(43, 7)], after=42, deletions="mark")
    sync(database, tmp_path, 2, [tagged(42, 7), tagged(43, 7)], deletions="mark")
    sync(database, tmp_path, 3, [tagged(44, 7)], after=43, deletions="mark")

    with connect(database) as connection:
        reads = fully_qualified(connection, "marketing", READS_TABLE)
        kept = connection.execute(f"SELECT table_name, read_began, complete, after_key FROM {reads} ORDER BY read_began").fetchall()
        (comment,) = connection.execute(
            "SELECT comment FROM duckdb_tables() WHERE schema_name = 'marketing' AND table_name = ?", [READS_TABLE]
        ).fetchone()  # type: ignore[misc]
    assert kept == [("contacts", DAY[2], True, None), ("contacts", DAY[3], False, 43)]
    assert comment.startswith("mkt_assets bookkeeping")


def test_a_table_dropped_by_hand_is_written_again_by_an_older_read(database: str, tmp_path: Path) -> None:
    """Its recorded reads describe rows that are gone: they supersede nothing."""
    sync(database, tmp_path, 2, [tagged(42, 7)], deletions="mark")
    with connect(database) as connection:
        connection.execute(f"DROP TABLE {fully_qualified(connection, 'marketing', 'contacts')}")
        connection.execute(f"DROP TABLE {fully_qualified(connection, 'marketing', 'contacts_history')}")

    older = sync(database, tmp_path, 1, [tagged(42, 8)], deletions="mark")

    assert older.superseded_by is None
    assert table(database) == [(42, [8], None)]
    with connect(database) as connection:
        reads = fully_qualified(connection, "marketing", READS_TABLE)
        assert connection.execute(f"SELECT read_began FROM {reads}").fetchall() == [(DAY[1],)]


@pytest.fixture()
def database(tmp_path: Path) -> str:
    return str(tmp_path / "reads.duckdb")
