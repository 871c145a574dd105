"""Incremental syncs, upstream deletions and the normalized tables, against the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.test_relations import linked_ids

API_KEY = "incremental-secret-9c2f"
# The resources whose ids only grow, which the incremental job reads after their newest stored id.
GROWING = [spec.name for spec in RESOURCES if spec.incremental]


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

    def requests_of(self, resource: str) -> list[dict[str, str]]:
        """The query of each request the last run sent for ``resource``."""
        path = "/api" + RESOURCES_BY_NAME[resource].path
        return [request.query for request in self.server.requests if request.path == path]

    def newest(self, resource: str) -> int:
        ((newest,),) = self.query(f"SELECT max(id) FROM marketing.{resource}")
        return int(newest)

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


def test_the_resources_whose_ids_only_grow_are_declared_so_in_the_catalog() -> None:
    assert GROWING == ["contacts", "memberships", "enrollments"]


@pytest.mark.slow  # a second or more: several real syncs
def test_an_incremental_run_with_nothing_new_reads_one_page_of_each_resource_whose_ids_only_grow(account: Account) -> None:
    account.run("marketing_sync")
    stored = {name: account.query(f"SELECT * FROM marketing.{name} ORDER BY id") for name in GROWING}
    # Hundreds of each: a full read of either is several pages.
    assert all(len(rows) > 200 for rows in stored.values())

    quiet = account.run("marketing_incremental")

    for name in GROWING:
        newest = account.newest(name)
        assert account.requests_of(name) == [{"limit": "100", "order": "asc", "startingAfter": str(newest)}], name
        assert quiet[name]["read"] == f"incremental, after id {newest}"
        assert (quiet[name]["records_fetched"], quiet[name]["rows_inserted"], quiet[name]["rows_deleted_upstream"]) == (0, 0, 0)
        assert account.query(f"SELECT * FROM marketing.{name} ORDER BY id") == stored[name]
    assert quiet["contact_profiles"]["rebuilt"] is False


def expected_profiles(account: Account) -> list[tuple[int, list[int], list[int]]]:
    """(contact id, course ids, community ids) of every live contact, as the simulator holds them."""
    courses, communities = linked_ids(account.data)
    return [(cid, sorted(courses[cid]), sorted(communities[cid])) for cid in account.data.contact_ids]


def stored_profiles(account: Account) -> list[tuple[int, list[int], list[int]]]:
    rows = account.query("SELECT contact_id, course_ids, community_ids FROM marketing.contact_profiles ORDER BY contact_id")
    return [(row[0], row[1], row[2]) for row in rows]


def relations(account: Account) -> dict[str, list[tuple[int, int, int]]]:
    """The live memberships and enrollments as the simulator serves them: (id, contact, other end)."""
    return {
        "memberships": [(m["id"], m["contact"]["id"], m["community"]["id"]) for m in account.data.records("memberships")],
        "enrollments": [(e["id"], e["contact"]["id"], e["course"]["id"]) for e in account.data.records("enrollments")],
    }


def stored_relations(account: Account, live: bool = True) -> dict[str, list[tuple[int, int, int]]]:
    where = " WHERE _deleted_at IS NULL" if live else ""
    return {
        "memberships": account.query(f"SELECT id, contact_id, community_id FROM marketing.memberships{where} ORDER BY id"),
        "enrollments": account.query(f"SELECT id, contact_id, course_id FROM marketing.enrollments{where} ORDER BY id"),
    }


@pytest.mark.slow  # a second or more: several real syncs
def test_new_memberships_and_enrollments_land_incrementally_and_update_their_contacts_profiles(account: Account) -> None:
    account.run("marketing_sync")
    data = account.data
    before = relations(account)
    newest = {name: account.newest(name) for name in GROWING}
    # Existing contacts join a community and a course: records with new ids, of old contacts.
    member = next(cid for cid in data.contact_ids if all(contact != cid for _, contact, _ in before["memberships"]))
    joined = data.add_relation("memberships", member, data.community_ids[0])
    student = before["enrollments"][0][1]
    other_course = next(c for c in data.course_ids if (student, c) not in {(s, course) for _, s, course in before["enrollments"]})
    enrolled = data.add_relation("enrollments", student, other_course)
    added = {"memberships": joined, "enrollments": enrolled}
    new_contacts = data.add_contacts(40)  # they come with memberships and enrollments of their own

    grown = account.run("marketing_incremental")

    after = relations(account)
    for name in ("memberships", "enrollments"):
        new = [row for row in after[name] if row[0] > newest[name]]
        # The old contact's first (its id is above every earlier one), then the new contacts'.
        assert new[0][0] == added[name] and 1 < len(new) < 100
        assert account.requests_of(name) == [{"limit": "100", "order": "asc", "startingAfter": str(newest[name])}]
        assert grown[name]["read"] == f"incremental, after id {newest[name]}"
        assert (grown[name]["rows_inserted"], grown[name]["rows_updated"], grown[name]["rows_unchanged"]) == (len(new), 0, 0)
        # A new version for each new row, nothing else opened or closed.
        assert (grown[name]["versions_opened"], grown[name]["versions_closed"]) == (len(new), 0)
        assert account.query(f"SELECT count(*), count(_valid_to) FROM marketing.{name}_history") == [(len(after[name]), 0)]
    assert stored_relations(account) == after
    assert grown["contacts"]["rows_inserted"] == len(new_contacts)
    assert grown["contact_profiles"]["rebuilt"] is True
    assert stored_profiles(account) == expected_profiles(account)
    profiles = {row[0]: row for row in stored_profiles(account)}
    assert data.community_ids[0] in profiles[member][2] and other_course in profiles[student][1]


@pytest.mark.slow  # a second or more: several real syncs
def test_removed_memberships_and_enrollments_wait_for_the_full_sync(account: Account) -> None:
    account.run("marketing_sync")
    data = account.data
    before = relations(account)
    # A membership and an enrollment removed while their contacts stay, and a contact deleted
    # with all of its own.
    (left, leaver, _) = before["memberships"][3]
    (dropped, dropper, _) = before["enrollments"][3]
    data.remove_relation("memberships", left)
    data.remove_relation("enrollments", dropped)
    gone_contact = next(contact for _, contact, _ in before["memberships"][10:] if contact not in (leaver, dropper))
    data.delete_contact(gone_contact)
    gone = {
        "memberships": sorted([left, *(key for key, contact, _ in before["memberships"] if contact == gone_contact)]),
        "enrollments": sorted([dropped, *(key for key, contact, _ in before["enrollments"] if contact == gone_contact)]),
    }
    profiles = stored_profiles(account)

    incremental = account.run("marketing_incremental")

    for name in ("memberships", "enrollments"):
        assert (incremental[name]["rows_inserted"], incremental[name]["rows_deleted_upstream"]) == (0, 0)
    assert stored_relations(account) == before, "an incremental read says nothing of the records it did not fetch"
    assert stored_profiles(account) == profiles

    full = account.run("marketing_sync")

    assert stored_relations(account) == relations(account)
    for name in ("memberships", "enrollments"):
        assert full[name]["rows_deleted_upstream"] == len(gone[name])
        marked = account.query(f"SELECT id FROM marketing.{name} WHERE _deleted_at IS NOT NULL ORDER BY id")
        assert [row[0] for row in marked] == gone[name]
        closed = account.query(f"SELECT id FROM marketing.{name}_history WHERE _valid_to IS NOT NULL ORDER BY id")
        assert [row[0] for row in closed] == gone[name]
    assert stored_profiles(account) == expected_profiles(account)
