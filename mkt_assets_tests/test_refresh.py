"""The refresh of named contacts: each read by its id (404 = deleted upstream), merged with its
history, and the tables built from contacts updated for those contacts alone, in one
transaction; what it lands is what a full sync would, and every other row stays as it was."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.core.errors import ApiResponseError, ConfigurationError, StagingError
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run.refresh import fetch_refresh, plan_refresh, refresh_keys
from mkt_assets.run.sync import FetchFailed
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.source.ratelimit import SharedRateLimiter
from mkt_assets.staging.pages import StagedBatch
from mkt_assets.warehouse import commit as commit_module
from mkt_assets.warehouse.commit import Refresh, RunCommit, commit_refresh, commit_run
from mkt_assets.warehouse.connection import WarehouseFile, connect
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.conftest import materialize_marketing
from mkt_assets_tests.test_warehouse import stage, staged_files

CONTACTS = RESOURCES_BY_NAME["contacts"]
FOLLOWING = [table for table in NORMALIZED_TABLES if "contacts" in table.reads]
API_KEY = "refresh-secret-3e7d"
SYNCED = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
# The tables a refresh of contacts may touch, each with the column naming the contact of a row.
CONTACT_TABLES = {"contacts": "id", "contacts_history": "id", "contact_tags": "contact_id",
                  "contact_field_values": "contact_id", "contact_profiles": "contact_id"}  # fmt: skip
# When rows were written: what a refresh and a full sync of the same contacts write differently.
STAMPS = ("_synced_at", "_deleted_at", "_valid_from", "_valid_to")


# ------------------------------------------------------------------ the keys


def test_the_keys_are_deduplicated_and_sorted() -> None:
    assert refresh_keys([5, 3, 5, 9, 3], "ids") == (3, 5, 9)
    assert refresh_keys([], "ids") == ()


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ([1, 0], "ids: entry 2 is 0, not a positive integer id"),
        ([-4], "ids: entry 1 is -4, not a positive integer id"),
        ([1, True], "ids: entry 2 is True, not a positive integer id"),
        ([2.0], "ids: entry 1 is 2.0, not a positive integer id"),
        ([1, 2, "3"], "ids: entry 3 is a str, not a positive integer id"),
    ],
)
def test_a_key_that_is_not_a_positive_integer_is_refused_naming_it(given: list[Any], said: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{said}$"):
        refresh_keys(given, "ids")


def test_more_distinct_keys_than_a_refresh_reads_are_refused() -> None:
    assert len(refresh_keys([*range(1, 11), 10], "ids", limit=10)) == 10
    with pytest.raises(ConfigurationError, match=r"^ids: 11 distinct ids, more than the 10 one refresh reads"):
        refresh_keys(range(1, 12), "ids", limit=10)


# ------------------------------------------------------------------ the transaction


class Warehouse:
    """An account's records staged by hand and landed with the run's own transactions."""

    def __init__(self, tmp_path: Path, data: SandboxData, name: str = "refresh.duckdb") -> None:
        self.tmp_path, self.data = tmp_path, data
        self.database = str(tmp_path / name)
        self.file = WarehouseFile(self.database)
        self.day = 0

    def when(self) -> datetime:
        self.day += 1
        return SYNCED + timedelta(days=self.day)

    def full_sync(self, specs: Sequence[ResourceSpec] = RESOURCES) -> RunCommit:
        """A complete read of ``specs`` landed as a sync lands it, with every table built from them."""
        when = self.when()
        batches = [stage(spec, [list(self.data.records(spec.name))], self.tmp_path, when) for spec in specs]
        tables = [table for table in NORMALIZED_TABLES if {spec.name for spec in specs} & set(table.reads)]
        return commit_run(self.file, "marketing", batches, tables, deletions="mark")

    def staged(self, keys: Sequence[int]) -> tuple[StagedBatch, Refresh]:
        live = set(self.data.contact_ids)
        found = [self.data.contact(key) for key in keys if key in live]
        batch = stage(CONTACTS, [[record] for record in found] or [[]], self.tmp_path, self.when(), complete=False)
        return batch, Refresh(tuple(keys), tuple(key for key in keys if key not in live))

    def refresh(self, keys: Sequence[int], deletions: str = "mark") -> RunCommit:
        batch, refresh = self.staged(keys)
        return commit_refresh(self.file, "marketing", batch, refresh, FOLLOWING, deletions=deletions)

    def copy(self, name: str) -> Warehouse:
        twin = Warehouse(self.tmp_path, self.data, name)
        shutil.copyfile(self.database, twin.database)
        twin.day = self.day
        return twin

    def rows(self, table: str, *, stamps: bool = True, keys: Sequence[int] | None = None, others: bool = False) -> list[Any]:
        """``table``'s rows in order (``stamps``: with when they were written, else only whether);
        only those of ``keys`` (or, ``others``, of every other contact)."""
        with connect(self.database) as connection:
            name = fully_qualified(connection, "marketing", table)
            columns = [row[0] for row in connection.execute(f"DESCRIBE {name}").fetchall()]
            picked = ", ".join(
                f'"{column}"' if stamps or column not in STAMPS else f'"{column}" IS NULL AS "{column}"' for column in columns
            )
            where = ""
            if keys is not None:
                where = f" WHERE {'NOT ' if others else ''}list_contains(?, {CONTACT_TABLES[table]})"
            query = f"SELECT {picked} FROM {name}{where} ORDER BY ALL"
            return connection.execute(query, [list(keys)] if keys is not None else []).fetchall()

    def comment(self, table: str) -> str:
        with connect(self.database) as connection:
            (comment,) = connection.execute(
                "SELECT comment FROM duckdb_tables() WHERE schema_name = 'marketing' AND table_name = ?", [table]
            ).fetchone()  # type: ignore[misc]
            return str(comment)

    def everything(self) -> dict[str, Any]:
        """Every table of the schema whole (bookkeeping included), and its comment."""
        with connect(self.database) as connection:
            tables = connection.execute(
                "SELECT table_name, comment FROM duckdb_tables() WHERE schema_name = 'marketing' ORDER BY 1"
            ).fetchall()
            return {
                name: (
                    comment,
                    connection.execute(f"SELECT * FROM {fully_qualified(connection, 'marketing', name)} ORDER BY ALL").fetchall(),
                )
                for name, comment in tables
            }


def changes(data: SandboxData) -> list[int]:
    """A few contacts changed, deleted and added upstream; the ids to refresh (an unchanged one
    and one no contact ever had among them)."""
    ids = list(data.contact_ids)
    tags = data.tag_ids
    retagged = [ids[2], ids[40]]
    data.set_contact_tags(retagged[0], tags[:4])
    data.set_contact_tags(retagged[1], [])
    deleted = [ids[7], ids[41]]
    for contact_id in deleted:
        data.delete_contact(contact_id)
    added = data.add_contacts(2)
    return [*retagged, *deleted, *added, ids[50], data.next_contact_id + 1000]


@pytest.fixture()
def synced(tmp_path: Path) -> Warehouse:
    warehouse = Warehouse(tmp_path, SandboxData(seed=11, contacts=120))
    warehouse.full_sync()
    return warehouse


@pytest.mark.slow  # a full sync and a refresh, each a real run
def test_a_refresh_lands_what_a_full_sync_would_for_its_contacts_and_leaves_every_other_row_as_it_was(synced: Warehouse) -> None:
    keys = changes(synced.data)
    others = {table: synced.rows(table, keys=keys, others=True) for table in CONTACT_TABLES}
    before = {table.name: synced.rows(table.name, keys=keys) for table in FOLLOWING}
    twin = synced.copy("full.duckdb")

    refreshed = synced.refresh(keys)
    # A full sync of contacts, as "Materialize" on the contacts asset does: the refresh reads no
    # enrollment nor membership either (a new contact's are read by the next run of those).
    twin.full_sync([CONTACTS])

    for table in CONTACT_TABLES:
        assert synced.rows(table, stamps=False) == twin.rows(table, stamps=False), table
        # Untouched, down to when each row was written.
        assert synced.rows(table, keys=keys, others=True) == others[table], table
    merge = refreshed.written["contacts"].merge
    assert merge is not None
    assert (merge.inserted, merge.updated, merge.unchanged, merge.deleted) == (2, 2, 1, 2)
    assert (merge.versions_opened, merge.versions_closed) == (4, 4)
    assert merge.row_count == len(synced.data.contact_ids)
    for table in FOLLOWING:
        build = refreshed.written[table.name].build
        assert build is not None and build.updated_in_place and not build.rebuilt, table.name
        assert build.row_count == build.expected_rows, table.name
        # What the refreshed contacts had, and what they have now: nothing of any other.
        assert build.rows_added == len(synced.rows(table.name, keys=keys)), table.name
        assert build.rows_removed == len(before[table.name]), table.name
    # The tables record the contacts they were built from, as a rebuild does: the next sync with
    # nothing new keeps them.
    assert all(synced.comment(table.name) == twin.comment(table.name).replace(*_tokens(twin, synced)) for table in FOLLOWING)


def test_a_refresh_rewrites_no_row_of_another_contact(synced: Warehouse) -> None:
    keys = changes(synced.data)
    # A mark on every other contact's rows that only a rebuild of the table would take away.
    with connect(synced.database) as connection:
        for table, column in (
            ("contact_tags", "tag_name"),
            ("contact_field_values", "field_name"),
            ("contact_profiles", "email"),
        ):
            name = fully_qualified(connection, "marketing", table)
            connection.execute(f"UPDATE {name} SET {column} = 'untouched' WHERE NOT list_contains(?, contact_id)", [keys])
    marked = {table.name: synced.rows(table.name, keys=keys, others=True) for table in FOLLOWING}

    synced.refresh(keys)

    for table in FOLLOWING:
        assert synced.rows(table.name, keys=keys, others=True) == marked[table.name], table.name
        assert all(row[-1] != "untouched" for row in synced.rows(table.name, keys=keys)) or table.name == "contact_profiles"


def _tokens(twin: Warehouse, refreshed: Warehouse) -> tuple[str, str]:
    """The contacts' change token in each file, which the tables' comments record."""
    found = []
    for warehouse in (twin, refreshed):
        with connect(warehouse.database) as connection:
            (token,) = connection.execute(
                f"SELECT token FROM {fully_qualified(connection, 'marketing', '_mkt_changes')} WHERE table_name = 'contacts'"
            ).fetchone()  # type: ignore[misc]
            found.append(f"contacts@{token}")
    return found[0], found[1]


def test_a_refresh_that_changes_nothing_keeps_the_tables_and_writes_no_version(synced: Warehouse) -> None:
    before = synced.everything()
    ids = list(synced.data.contact_ids)

    refreshed = synced.refresh([ids[0], ids[9]])

    merge = refreshed.written["contacts"].merge
    assert merge is not None
    assert (merge.inserted, merge.updated, merge.unchanged, merge.deleted, merge.versions_opened) == (0, 0, 2, 0, 0)
    assert all(not refreshed.written[table.name].build.rebuilt for table in FOLLOWING)  # type: ignore[union-attr]
    assert not any(refreshed.written[table.name].build.updated_in_place for table in FOLLOWING)  # type: ignore[union-attr]
    after = synced.everything()
    reads = after.pop("_mkt_reads")[1]
    # Only the read is recorded, so that an older sync landing later leaves what it saw.
    refreshes = [(name, complete, after_key) for name, _, complete, after_key, _ in reads if not complete]
    assert refreshes == [("contacts", False, None)]
    assert after == {name: tables for name, tables in before.items() if name != "_mkt_reads"}


def test_a_table_not_current_before_the_refresh_is_rebuilt_whole(synced: Warehouse) -> None:
    keys = changes(synced.data)
    with connect(synced.database) as connection:
        connection.execute(
            f"COMMENT ON TABLE {fully_qualified(connection, 'marketing', 'contact_tags')} IS 'built by an older version'"
        )
    twin = synced.copy("full.duckdb")

    refreshed = synced.refresh(keys)
    twin.full_sync([CONTACTS])

    tags, fields = refreshed.written["contact_tags"].build, refreshed.written["contact_field_values"].build
    assert tags is not None and tags.rebuilt and not tags.updated_in_place
    assert fields is not None and fields.updated_in_place
    assert synced.rows("contact_tags", stamps=False) == twin.rows("contact_tags", stamps=False)


def test_in_delete_mode_a_contact_gone_upstream_is_removed_with_its_rows(synced: Warehouse) -> None:
    gone = synced.data.contact_ids[3]
    synced.data.delete_contact(gone)

    refreshed = synced.refresh([gone], deletions="delete")

    assert refreshed.written["contacts"].merge.deleted == 1  # type: ignore[union-attr]
    assert synced.rows("contacts", keys=[gone]) == []
    assert synced.rows("contact_profiles", keys=[gone]) == []
    (version,) = synced.rows("contacts_history", stamps=False, keys=[gone])
    assert version[-1] is False  # its version closed: _valid_to set


def test_an_older_refresh_landing_after_a_newer_one_leaves_what_the_newer_one_read(synced: Warehouse) -> None:
    data, tags = synced.data, synced.data.tag_ids
    retagged, deleted = data.contact_ids[4], data.contact_ids[5]
    data.set_contact_tags(retagged, tags[:1])
    older = synced.staged([retagged, deleted])
    data.set_contact_tags(retagged, tags[1:3])
    data.delete_contact(deleted)
    newer = synced.staged([retagged, deleted])

    for batch, refresh in (newer, older):
        landed = commit_refresh(synced.file, "marketing", batch, refresh, FOLLOWING, deletions="mark")

    merge = landed.written["contacts"].merge
    assert merge is not None and (merge.updated, merge.deleted, merge.newer_kept) == (0, 0, 2)
    (stored,) = synced.rows("contacts", stamps=False, keys=[retagged])
    assert [tag["id"] for tag in stored[9]] == tags[1:3]
    assert [row[1] for row in synced.rows("contact_tags", keys=[retagged])] == tags[1:3]
    assert synced.rows("contacts", stamps=False, keys=[deleted])[0][-1] is False  # still marked deleted


@pytest.mark.parametrize("failing", ["contact_profiles", "contact_tags"])
def test_a_refresh_failing_anywhere_in_its_transaction_leaves_every_table_as_it_was(
    synced: Warehouse, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    keys = changes(synced.data)
    before = synced.everything()
    update = commit_module.update_in_place

    def fail_on_one(connection: Any, schema: str, table: Any, keys: str) -> Any:
        if table.name == failing:
            raise RuntimeError(f"the disk filled up while updating {table.name}")
        return update(connection, schema, table, keys)

    monkeypatch.setattr(commit_module, "update_in_place", fail_on_one)

    with pytest.raises(RuntimeError, match="the disk filled up"):
        synced.refresh(keys)

    assert synced.everything() == before


def test_a_refreshed_value_duckdb_cannot_type_fails_naming_record_and_field_and_leaves_every_table(synced: Warehouse) -> None:
    before = synced.everything()
    first, second = synced.data.contact_ids[:2]
    # Past the client's checks (a hand-staged page): what is left is DuckDB's own refusal.
    pages = [[synced.data.contact(first)], [{**synced.data.contact(second), "registeredAt": "yesterday"}]]
    batch = stage(CONTACTS, pages, synced.tmp_path, synced.when(), complete=False)

    with pytest.raises(StagingError) as caught:
        commit_refresh(synced.file, "marketing", batch, Refresh((first, second)), FOLLOWING, deletions="mark")

    assert str(caught.value) == (
        "contacts: record 1 of page 2: field 'registeredAt' (column registered_at TIMESTAMPTZ) cannot hold \"yesterday\""
    )
    assert synced.everything() == before


# ------------------------------------------------------------------ the read


@pytest.fixture()
def account() -> Iterator[tuple[SandboxData, SandboxServer]]:
    data = SandboxData(seed=12, contacts=200)
    with SandboxServer(data, api_key=API_KEY) as server:
        yield data, server


def test_each_contact_is_read_by_one_request_and_staged_as_sent(
    account: tuple[SandboxData, SandboxServer], tmp_path: Path
) -> None:
    data, server = account
    ids = list(data.contact_ids)
    data.delete_contact(ids[5])
    keys = refresh_keys([ids[1], ids[5], ids[9], ids[1]], "ids")
    logged: list[str] = []

    read = fetch_refresh(
        plan_refresh(CONTACTS, keys, NORMALIZED_TABLES),
        lambda stop: MarketingApiClient(server.base_url, API_KEY, stop=stop),
        str(tmp_path),
        60.0,
        logged.append,
    )

    assert sorted(request.path for request in server.requests) == sorted(f"/api/contacts/{key}" for key in keys)
    assert (read.keys, read.gone, read.batch.records, read.batch.complete) == (keys, (ids[5],), 2, False)
    assert read.read == "by id: 3 asked, 2 found, 1 gone upstream (HTTP 404)"
    assert [plan.name for plan in plan_refresh(CONTACTS, keys, NORMALIZED_TABLES).tables] == [table.name for table in FOLLOWING]
    staged = b"".join(path.read_bytes() for path in read.batch.paths)
    assert all(f'"email":"{data.contact(key)["email"]}"'.encode() in staged for key in (ids[1], ids[9]))
    read.batch.discard()


def test_a_failed_read_names_its_request_and_leaves_nothing_staged(
    account: tuple[SandboxData, SandboxServer], tmp_path: Path
) -> None:
    data, server = account
    ids = list(data.contact_ids)
    server.add_fault(Fault("bad_type", path=f"/api/contacts/{ids[3]}", times=-1))

    with pytest.raises(FetchFailed) as raised:
        fetch_refresh(
            plan_refresh(CONTACTS, ids[:6], NORMALIZED_TABLES),
            lambda stop: MarketingApiClient(server.base_url, API_KEY, stop=stop),
            str(tmp_path),
            60.0,
            lambda message: None,
        )

    assert str(raised.value).startswith(
        f"contacts: GET /api/contacts/{ids[3]}: the record: field 'id' (column id BIGINT) cannot hold"
    )
    assert str(raised.value).endswith("Nothing was written: a run writes all its tables or none.")
    assert isinstance(raised.value.__cause__, ApiResponseError)
    assert staged_files(tmp_path) == []


class FakeClock:
    """The simulator's and the rate limiter's time, moved by the limiter's own waits, as real
    time would move: a wait lasts seconds, so the requests already out (which take milliseconds)
    are answered first, and threads waiting at once wait side by side (a wait ends ``seconds``
    after the time its thread last read, however far another's wait moved the clock)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.waits: list[float] = []
        self.out = 0  # requests reserved and not yet answered
        self.changed = threading.Condition()
        self._read = threading.local()

    def __call__(self) -> float:
        with self.changed:
            self._read.at = self.now
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.out == 0, timeout=10), "a request was never answered"
            self.waits.append(seconds)
            self.now = max(self.now, getattr(self._read, "at", self.now) + seconds)


class CountedLimiter(SharedRateLimiter):
    """The shared rate limiter, telling the clock which requests are out."""

    def __init__(self, path: Path, clock: FakeClock) -> None:
        super().__init__(path, clock=clock, sleep=clock.sleep, log=lambda message: None)
        self.clock = clock
        self.reserved = 0

    def reserve(self, sleep: Any = None) -> Any:
        reservation = super().reserve(sleep)
        with self.clock.changed:
            self.clock.out += 1
            self.reserved += 1
        return reservation

    def observe(self, headers: Any, received_at: float | None = None, reservation: Any = None) -> None:
        super().observe(headers, received_at, reservation)
        if reservation is not None:
            self._answered()

    def abandon(self, reservation: Any) -> None:
        super().abandon(reservation)
        self._answered()

    def _answered(self) -> None:
        with self.clock.changed:
            self.clock.out -= 1
            self.clock.changed.notify_all()


def test_contacts_read_at_once_keep_within_the_rate_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    data = SandboxData(seed=13, contacts=60)
    keys = list(data.contact_ids)[:25]
    with SandboxServer(data, api_key=API_KEY, rate_limit=(6, 10.0), clock=clock) as server:
        limiter = CountedLimiter(tmp_path / "quota.json", clock)
        with MarketingApiClient(server.base_url, API_KEY, rate_limiter=limiter) as client:
            read = list(client.read_records(CONTACTS, keys, concurrency=4))

        assert sorted(one.key for one in read) == keys and not any(one.gone for one in read)
        assert [record.status for record in server.requests] == [200] * len(keys)
        assert limiter.reserved == len(keys) and client.stats.throttled == 0
        # 25 requests at 6 a window: four waits for the next window at least.
        assert sum(1 for wait in clock.waits if wait > 1) >= 4


# ------------------------------------------------------------------ the job


class Deployment:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, contacts: int = 300) -> None:
        self.data = SandboxData(seed=14, contacts=contacts)
        self.server = SandboxServer(self.data, api_key=API_KEY).start()
        self.tmp_path = tmp_path
        self.database = str(tmp_path / "deployment.duckdb")
        monkeypatch.setenv("MKT_API_BASE_URL", self.server.base_url)
        monkeypatch.setenv("MKT_API_KEY", API_KEY)
        self.defs = build_definitions(Settings(duckdb_path=self.database))
        self.instance = dg.DagsterInstance.ephemeral()
        self.names = Names()

    def run(self, job: str, run_config: dict[str, Any] | None = None, *, success: bool = True) -> dg.ExecuteInProcessResult:
        self.server.reset_log()
        result = self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, run_config=run_config, raise_on_error=False
        )
        assert result.success is success
        return result

    def refresh(self, ids: Sequence[object], *, success: bool = True) -> dg.ExecuteInProcessResult:
        return self.run(self.names.refresh_job, self.names.refresh_run_config(ids), success=success)  # type: ignore[arg-type]

    def warehouse(self) -> Warehouse:
        return Warehouse(self.tmp_path, self.data, "deployment.duckdb")


@pytest.fixture()
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    running = Deployment(tmp_path, monkeypatch)
    try:
        yield running
    finally:
        running.server.stop()


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    return {
        event.asset_key.path[-1]: {key: value.value for key, value in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


def failure(result: dg.ExecuteInProcessResult) -> str:
    """What the failed step says: a ``Failure``'s description, else every message down the cause chain."""
    (failed,) = result.get_step_failure_events()
    data = failed.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    messages, error = [], data.error
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def sync_contacts(database: str, base_url: str) -> dg.ExecuteInProcessResult:
    """What "Materialize" on the contacts asset and the tables built from it does: a full read of contacts alone."""
    warehouse = WarehouseResource(database=database)
    resources = {
        "marketing_api": MarketingApiResource(base_url=base_url, api_key=API_KEY),
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=warehouse),
        "warehouse": warehouse,
    }
    return materialize_marketing(["contacts", *(table.name for table in FOLLOWING)], resources)


@pytest.mark.slow  # a second or more: real syncs and refreshes through Dagster
def test_the_refresh_job_lands_the_contacts_its_run_config_names_as_a_full_sync_would(deployment: Deployment) -> None:
    deployment.run("marketing_sync")
    keys = changes(deployment.data)
    warehouse = deployment.warehouse()
    others = {table: warehouse.rows(table, keys=keys, others=True) for table in CONTACT_TABLES}
    twin = warehouse.copy("full.duckdb")

    result = deployment.refresh(keys)

    assert sorted(request.path for request in deployment.server.requests) == sorted(f"/api/contacts/{key}" for key in keys)
    metadata = materializations(result)
    # ... and webhook_events, which every refresh brings up to the inbox (none here: nothing to land).
    assert set(metadata) == {"contacts", "contact_tags", "contact_field_values", "contact_profiles", "webhook_events"}
    assert (metadata["webhook_events"]["landed"], metadata["webhook_events"]["dagster/row_count"]) == (0, 0)
    contacts = metadata["contacts"]
    assert contacts["read"] == "by id: 8 asked, 5 found, 3 gone upstream (HTTP 404)"
    read = ("records_fetched", "ids_asked", "gone_upstream_404", "requests")
    assert [contacts[name] for name in read] == [5, 8, 3, 8]
    written = ("rows_inserted", "rows_updated", "rows_unchanged", "rows_deleted_upstream")
    assert [contacts[name] for name in written] == [2, 2, 1, 2]
    assert contacts["dagster/row_count"] == len(deployment.data.contact_ids) and contacts["complete_read"] is False
    assert all(metadata[table.name]["updated_in_place"] is True for table in FOLLOWING)
    checks = {(check.asset_key.path[-1], check.check_name): check.passed for check in result.get_asset_check_evaluations()}
    # The row count and the built tables' own checks; none that reads the whole contacts table.
    assert checks == {
        ("contacts", "row_count_not_dropping"): True,
        **{(table.name, name): True for table in FOLLOWING for name in (table.row_check, "keys_present")},
        ("webhook_events", "every_delivery_names_a_contact"): True,
    }
    assert sync_contacts(twin.database, deployment.server.base_url).success
    for table in CONTACT_TABLES:
        assert warehouse.rows(table, stamps=False) == twin.rows(table, stamps=False), table
        assert warehouse.rows(table, keys=keys, others=True) == others[table], table
    # The daily sync after it finds nothing to change and every check passes, the row count's too.
    after = deployment.run("marketing_sync")
    assert all(check.passed for check in after.get_asset_check_evaluations())
    assert materializations(after)["contacts"]["rows_updated"] == 0


@pytest.mark.slow  # a second or more: real syncs and refreshes through Dagster
def test_a_refresh_that_fails_reading_a_contact_writes_nothing_and_says_which(deployment: Deployment) -> None:
    deployment.run("marketing_sync")
    keys = changes(deployment.data)
    before = deployment.warehouse().everything()
    deployment.server.add_fault(Fault("status", path=f"/api/contacts/{keys[0]}", status=400, times=-1))

    result = deployment.refresh(keys, success=False)

    assert f"contacts: GET /api/contacts/{keys[0]}: HTTP 400" in failure(result)
    assert "Nothing was written" in failure(result)
    # Only webhook_events, a step of its own that lands the inbox (empty here) whatever the refresh did.
    assert [event.asset_key.path[-1] for event in result.get_asset_materialization_events()] == ["webhook_events"]
    after = deployment.warehouse().everything()
    assert after.pop("webhook_events")[1] == []
    assert after == before


@pytest.mark.slow  # a second or more: runs through Dagster
def test_the_refresh_job_refuses_a_run_config_it_cannot_honour_before_any_request(deployment: Deployment) -> None:
    deployment.run("marketing_sync")

    bare = deployment.run(deployment.names.refresh_job, success=False)
    assert failure(bare).startswith("sync_marketing's config contact_ids is empty: name the contacts to refresh, as ")
    assert '{"ops": {"sync_marketing": {"config": {"contact_ids": [1, 2]}}}}' in failure(bare)
    assert "entry 2 is 0, not a positive integer id" in failure(deployment.refresh([5, 0], success=False))
    too_many = deployment.refresh(list(range(1, 10_002)), success=False)
    assert "10,001 distinct ids, more than the 10,000 one refresh reads" in failure(too_many)
    with_tags = deployment.run("marketing_sync", {"ops": {"sync_marketing": {"config": {"contact_ids": [5]}}}}, success=False)
    assert failure(with_tags).startswith("A run given contact_ids refreshes those contacts alone, and it also selects ")
    assert deployment.server.requests == []


@pytest.mark.slow  # a second or more: real syncs and refreshes through Dagster
def test_materializing_contacts_alone_with_contact_ids_refreshes_them_and_says_what_it_updated(deployment: Deployment) -> None:
    deployment.run("marketing_sync")
    keys = changes(deployment.data)
    warehouse = WarehouseResource(database=deployment.database)
    resources = {
        "marketing_api": MarketingApiResource(base_url=deployment.server.base_url, api_key=API_KEY),
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=warehouse),
        "warehouse": warehouse,
    }

    result = materialize_marketing(
        ["contacts"], resources, instance=deployment.instance, run_config=Names().refresh_run_config(keys)
    )

    events = {event.asset_key.path[-1]: event.materialization for event in result.get_asset_materialization_events()}
    assert set(events) == {"contacts", *(table.name for table in FOLLOWING)}
    for table in FOLLOWING:
        said = f"Updated for the refreshed contacts alone in the same transaction as {', '.join(table.reads)}, so it never lags them."
        assert events[table.name].description == said
    # Every check of contacts was asked for: the facts are gathered as a sync gathers them.
    checks = {check.check_name: check.passed for check in result.get_asset_check_evaluations()}
    assert set(checks) == {"primary_key_unique", "required_fields_present", "row_count_not_dropping", "contact_tags_exist",
                           "contact_field_slugs_exist", "history_is_consistent"}  # fmt: skip
    assert all(checks.values())
    assert deployment.warehouse().rows("contacts", stamps=False, keys=keys)  # the new ones landed
