"""Incremental syncs, upstream deletions and the normalized tables, against the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified

API_KEY = "incremental-secret-9c2f"


class Account:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        self.data = SandboxData(seed=21, contacts=700)
        self.server = SandboxServer(self.data, api_key=API_KEY).start()
        self.database = str(tmp_path / "account.duckdb")
        monkeypatch.setenv("MKT_API_BASE_URL", self.server.base_url)
        monkeypatch.setenv("MKT_API_KEY", API_KEY)
        self.defs = build_definitions(Settings(duckdb_path=self.database, **settings))
        self.instance = dg.DagsterInstance.ephemeral()

    def run(self, job_name: str) -> dict[str, dict[str, Any]]:
        """Run a job; the materialization metadata of each asset, by asset name."""
        self.server.reset_log()
        result = self.defs.resolve_job_def(job_name).execute_in_process(instance=self.instance)
        assert result.success
        assert all(check.passed for check in result.get_asset_check_evaluations())
        return {
            event.asset_key.path[-1]: {k: v.value for k, v in event.materialization.metadata.items()}
            for event in result.get_asset_materialization_events()
        }

    def contact_requests(self) -> int:
        return sum(1 for request in self.server.requests if request.path == "/api/contacts")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with connect(self.database) as connection:
            catalog = fully_qualified(connection, "marketing").split(".")[0]
            return connection.execute(sql.replace("marketing.", f"{catalog}.marketing.")).fetchall()

    def live_contacts(self) -> list[dict[str, Any]]:
        return list(self.data.records("contacts"))


@pytest.fixture()
def account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Account]:
    running = Account(tmp_path, monkeypatch)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.mark.slow  # a second or more: several real syncs
def test_incremental_then_full_sync_lands_new_changed_and_deleted_contacts(account: Account) -> None:
    account.run("marketing_sync")
    data = account.data
    new_ids = data.add_contacts(150)
    tag_ids = data.tag_ids
    retagged = [cid for cid in data.contact_ids if data.contact(cid)["tags"] != [{"id": tag_ids[0], "name": ""}]][:20]
    for contact_id in retagged:
        data.set_contact_tags(contact_id, [tag_ids[0], tag_ids[-1]])
    deleted = list(data.contact_ids)[100:105]
    for contact_id in deleted:
        data.delete_contact(contact_id)

    incremental = account.run("marketing_incremental")

    contacts = incremental["contacts"]
    assert account.contact_requests() == 2  # ceil(150 / 100); at most ceil(k/100) + 1 = 3
    assert contacts["read"].startswith("incremental, after id ")
    assert (contacts["rows_inserted"], contacts["rows_updated"], contacts["rows_deleted_upstream"]) == (150, 0, 0)
    assert contacts["complete_read"] is False
    assert account.query("SELECT count(*) FROM marketing.contacts WHERE _deleted_at IS NULL") == [(850,)]
    stored_new = account.query(f"SELECT id FROM marketing.contacts WHERE id >= {min(new_ids)} ORDER BY id")
    assert [row[0] for row in stored_new] == new_ids

    full = account.run("marketing_sync")

    contacts = full["contacts"]
    assert contacts["read"] == "full"
    assert (contacts["rows_inserted"], contacts["rows_updated"], contacts["rows_deleted_upstream"]) == (0, 20, 5)
    assert contacts["dagster/row_count"] == 845 and contacts["total_rows"] == 850
    marked = account.query("SELECT id FROM marketing.contacts WHERE _deleted_at IS NOT NULL ORDER BY id")
    assert [row[0] for row in marked] == sorted(deleted)
    retag_rows = account.query(
        f"SELECT DISTINCT list_transform(tags, lambda t: t.id) FROM marketing.contacts"
        f" WHERE id IN ({', '.join(map(str, retagged))})"
    )
    assert retag_rows == [([tag_ids[0], tag_ids[-1]],)]
    assert_normalized_tables_match_the_nested_lists(account)


@pytest.mark.slow  # a second or more: several real syncs
def test_an_incremental_run_on_an_empty_table_reads_everything(account: Account) -> None:
    metadata = account.run("marketing_incremental")

    assert metadata["contacts"]["read"] == "full"
    assert metadata["contacts"]["rows_inserted"] == 700
    # A full read, walked from both ends: 7 pages, and at most 3 requests more where they meet.
    assert 7 <= account.contact_requests() <= 10


@pytest.mark.slow  # a second or more: several real syncs
def test_the_incremental_read_never_touches_rows_it_did_not_fetch(account: Account) -> None:
    account.run("marketing_sync")
    before = account.query("SELECT * FROM marketing.contacts ORDER BY id")
    account.data.set_contact_tags(account.data.contact_ids[0], [])
    account.data.delete_contact(account.data.contact_ids[1])

    metadata = account.run("marketing_incremental")

    assert (metadata["contacts"]["rows_inserted"], metadata["contacts"]["rows_updated"]) == (0, 0)
    assert account.contact_requests() == 1
    assert account.query("SELECT * FROM marketing.contacts ORDER BY id") == before


@pytest.mark.slow  # a second or more: several real syncs
def test_hard_delete_removes_rows_gone_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    account = Account(tmp_path, monkeypatch, deletions="delete")
    try:
        account.run("marketing_sync")
        gone = account.data.contact_ids[:3]
        for contact_id in gone:
            account.data.delete_contact(contact_id)

        metadata = account.run("marketing_sync")

        assert metadata["contacts"]["rows_deleted_upstream"] == 3
        assert account.query("SELECT count(*), count(_deleted_at) FROM marketing.contacts") == [(697, 0)]
        assert_normalized_tables_match_the_nested_lists(account)
    finally:
        account.server.stop()


def assert_normalized_tables_match_the_nested_lists(account: Account) -> None:
    contacts = account.live_contacts()
    tag_names = {tag["id"]: tag["name"] for tag in account.data.records("tags")}
    field_names = {field["slug"]: field["fieldName"] for field in account.data.records("contact_fields")}
    expected_tags = sorted(
        (contact["id"], tag["id"], tag_names.get(tag["id"], tag["name"])) for contact in contacts for tag in contact["tags"]
    )
    expected_fields = [
        (contact["id"], field["slug"], field_names.get(field["slug"], field["fieldName"]), field["value"])
        for contact in contacts
        for field in contact["fields"]
    ]
    expected_modules = [
        (course["id"], module["id"], position, module["name"])
        for course in account.data.records("course_resources")
        for position, module in enumerate(course["modules"], start=1)
    ]

    assert account.query("SELECT * FROM marketing.contact_tags ORDER BY ALL") == expected_tags
    assert sorted(account.query("SELECT * FROM marketing.contact_field_values"), key=repr) == sorted(expected_fields, key=repr)
    assert sorted(account.query("SELECT * FROM marketing.course_modules"), key=repr) == sorted(expected_modules, key=repr)


@pytest.mark.slow  # a second or more: several real syncs
def test_a_table_is_kept_while_nothing_it_reads_changes_and_rebuilt_when_something_does(account: Account) -> None:
    account.run("marketing_sync")
    built = account.query("SELECT * FROM marketing.contact_tags ORDER BY ALL")

    quiet = account.run("marketing_incremental")

    assert {name: quiet[name]["rebuilt"] for name in ("contact_tags", "contact_field_values", "course_modules", "contact_profiles")} == {
        "contact_tags": False,
        "contact_field_values": False,
        "course_modules": False,
        "contact_profiles": False,
    }
    assert account.query("SELECT * FROM marketing.contact_tags ORDER BY ALL") == built

    account.data.add_contacts(30)
    grown = account.run("marketing_incremental")

    assert grown["contacts"]["rows_inserted"] == 30
    assert grown["contact_tags"]["rebuilt"] is True and grown["contact_profiles"]["rebuilt"] is True
    assert grown["course_modules"]["rebuilt"] is False  # it reads course_resources alone
    assert account.query("SELECT count(*) FROM marketing.contact_profiles") == [(700 + 30,)]

    # A table built by another definition of it (an older version of the project) is rebuilt.
    account.query("COMMENT ON TABLE marketing.course_modules IS 'built before definitions were recorded'")
    assert account.run("marketing_incremental")["course_modules"]["rebuilt"] is True


@pytest.mark.slow  # a second or more: several real syncs
def test_tables_left_out_with_contacts_are_rebuilt_from_what_changed_meanwhile_when_contacts_come_back(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    account.run("marketing_sync")
    tag_id = account.data.tag_ids[0]
    (tagged,) = account.query(f"SELECT count(*) FROM marketing.contact_tags WHERE tag_id = {tag_id}")
    assert tagged[0] > 0
    account.data.rename_tag(tag_id, "renamed while contacts were left out")
    without_contacts = build_definitions(
        Settings(duckdb_path=account.database, resources=tuple(spec.name for spec in RESOURCES if spec.name != "contacts"))
    )
    result = without_contacts.resolve_job_def("marketing_sync").execute_in_process(instance=account.instance)
    assert result.success
    assert account.query(f"SELECT name FROM marketing.tags WHERE id = {tag_id}") == [("renamed while contacts were left out",)]

    back = account.run("marketing_sync")

    # Nothing contact_tags reads changed in this run, but tags did since it was built.
    assert back["contact_tags"]["rebuilt"] is True and back["contact_profiles"]["rebuilt"] is True
    assert account.query(f"SELECT DISTINCT tag_name FROM marketing.contact_tags WHERE tag_id = {tag_id}") == [
        ("renamed while contacts were left out",)
    ]
    assert account.query(
        "SELECT count(*) FROM marketing.contact_profiles WHERE list_contains(tag_names, 'renamed while contacts were left out')"
    ) == [tagged]
    # And once rebuilt, a run with nothing new keeps them again.
    assert account.run("marketing_sync")["contact_tags"]["rebuilt"] is False
