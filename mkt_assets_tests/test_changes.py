"""The token each synced table gets anew whenever a merge changes its rows (``changes``): what
tells a normalized table that something it reads changed since it was built."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from mkt_assets.warehouse.changes import UNRECORDED, change_tokens
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.test_history import tagged
from mkt_assets_tests.test_reads import sync


@pytest.fixture()
def database(tmp_path: Path) -> str:
    return str(tmp_path / "changes.duckdb")


def token(database: str) -> str:
    with connect(database) as connection:
        return change_tokens(connection, "marketing", ["contacts"])["contacts"]


def stats(database: str) -> tuple[int, datetime, datetime | None]:
    """count(*), max(_synced_at), max(_deleted_at): a fingerprint that misses some changes."""
    with connect(database) as connection:
        contacts = fully_qualified(connection, "marketing", "contacts")
        return connection.execute(f"SELECT count(*), max(_synced_at), max(_deleted_at) FROM {contacts}").fetchone()  # type: ignore[return-value]


def test_a_table_never_merged_has_no_token_and_its_first_merge_gives_it_one(database: str, tmp_path: Path) -> None:
    assert token(database) == UNRECORDED
    sync(database, tmp_path, 0, [], deletions="mark")  # created empty: a change all the same
    assert token(database) != UNRECORDED


@pytest.mark.parametrize("deletions", ["mark", "delete"])
def test_every_merge_that_changes_rows_draws_a_new_token_and_one_that_changes_none_keeps_it(
    database: str, tmp_path: Path, deletions: str
) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions=deletions)
    first = token(database)

    quiet = sync(database, tmp_path, 1, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions=deletions)
    assert not quiet.changed and token(database) == first

    gone = sync(database, tmp_path, 2, [tagged(42, 7), tagged(44, 7)], deletions=deletions)
    assert gone.deleted == 1 and token(database) not in (first, UNRECORDED)


def test_an_older_incremental_read_landing_last_changes_the_token_though_count_and_newest_stamps_stay(
    database: str, tmp_path: Path
) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7), tagged(44, 7)], deletions="mark")
    sync(database, tmp_path, 2, [tagged(44, 9)], after=43, deletions="mark")  # began last, landed first
    before, fingerprint = token(database), stats(database)

    older = sync(database, tmp_path, 1, [tagged(42, 8), tagged(43, 7), tagged(44, 7)], after=41, deletions="mark")

    assert older.updated == 1  # 42 changed, written with the older read's _synced_at
    assert stats(database) == fingerprint
    assert token(database) != before


def test_an_older_complete_read_removing_as_many_rows_as_it_adds_changes_the_token(database: str, tmp_path: Path) -> None:
    sync(database, tmp_path, 0, [tagged(42, 7), tagged(43, 7)], deletions="delete")
    sync(database, tmp_path, 2, [tagged(44, 9)], after=43, deletions="delete")  # began last, landed first
    before, fingerprint = token(database), stats(database)

    older = sync(database, tmp_path, 1, [tagged(41, 7), tagged(42, 7), tagged(44, 9)], deletions="delete")

    assert (older.inserted, older.deleted) == (1, 1)  # 41 in, 43 out
    assert stats(database) == fingerprint
    assert token(database) != before
