"""Relations declared in the catalog: memberships and enrollments land field for field, each
reference has its check, and contact_profiles holds what every live contact carries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, Column, Reference, ResourceSpec, referenced_first
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.conftest import materialize_marketing

API_KEY = "relations-secret-77aa"
EVERYTHING = [spec.name for spec in RESOURCES] + [table.name for table in NORMALIZED_TABLES]


class Account:
    def __init__(self, tmp_path: Path) -> None:
        self.data = SandboxData(seed=41, contacts=900)
        self.server = SandboxServer(self.data, api_key=API_KEY).start()
        self.database = str(tmp_path / "relations.duckdb")

    def sync(self, *faults: Fault) -> Any:
        self.server.clear_faults()
        for fault in faults:
            self.server.add_fault(fault)
        resources = {
            "marketing_api": MarketingApiResource(base_url=self.server.base_url, api_key=API_KEY, backoff_factor=0),
            "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=self.database)),
            "warehouse": WarehouseResource(database=self.database),
        }
        return materialize_marketing(EVERYTHING, resources, raise_on_error=False)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with connect(self.database) as connection:
            catalog = fully_qualified(connection, "marketing").split(".")[0]
            return connection.execute(sql.replace("marketing.", f"{catalog}.marketing.")).fetchall()


@pytest.fixture()
def account(tmp_path: Path) -> Iterator[Account]:
    running = Account(tmp_path)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.mark.slow  # a second or more: several real syncs
def test_memberships_and_enrollments_keep_the_ids_of_what_they_embed_not_copies_of_it(account: Account) -> None:
    result = account.sync()

    assert result.success
    memberships = account.query("SELECT id, community_id, contact_id, _extra FROM marketing.memberships ORDER BY id")
    assert memberships == [
        (record["id"], record["community"]["id"], record["contact"]["id"], None) for record in account.data.records("memberships")
    ]
    enrollments = account.query("SELECT id, contact_id, course_id, access_type, active, _extra FROM marketing.enrollments ORDER BY id")
    assert enrollments == [
        (r["id"], r["contact"]["id"], r["course"]["id"], r["accessType"], r["active"], None)
        for r in account.data.records("enrollments")
    ]
    assert memberships and enrollments


@pytest.mark.slow  # a second or more: several real syncs
def test_a_reference_to_a_missing_contact_warns_naming_it_while_the_run_succeeds(account: Account) -> None:
    result = account.sync(Fault("dangling", path="/api/community/memberships"))

    assert result.success
    checks = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    dangling = checks[("memberships", "contact_ids_exist")]
    live_contacts = set(account.data.contact_ids)
    (missing,) = [record["contact"]["id"] for record in _served_memberships(account) if record["contact"]["id"] not in live_contacts]
    assert not dangling.passed and dangling.severity.value == "WARN"
    assert dangling.metadata["missing_contact_ids"].value == [missing]
    assert dangling.metadata["dangling_references"].value == 1
    assert f"carry contact_ids missing from marketing.contacts: {missing}" in (dangling.description or "")
    # Every other reference resolves.
    assert all(e.passed for key, e in checks.items() if key != ("memberships", "contact_ids_exist"))


def _served_memberships(account: Account) -> list[dict[str, Any]]:
    rows = account.query("SELECT id, contact_id FROM marketing.memberships")
    return [{"id": row[0], "contact": {"id": row[1]}} for row in rows]


@pytest.mark.slow  # a second or more: several real syncs
def test_contact_profiles_hold_what_every_live_contact_carries_and_belongs_to(account: Account) -> None:
    some = list(account.data.contact_ids)
    account.data.delete_contact(some[3])  # its memberships and enrollments go with it
    account.data.set_contact_tags(some[4], [])

    result = account.sync()

    assert result.success
    courses, communities = linked_ids(account.data)
    tag_names = {tag["id"]: tag["name"] for tag in account.data.records("tags")}
    expected = [
        (
            contact["id"], contact["email"], contact["unsubscribed"],
            sorted({tag["id"] for tag in contact["tags"]}),
            sorted({tag_names.get(tag["id"], tag["name"]) for tag in contact["tags"]}),
            sorted(courses[contact["id"]]), sorted(communities[contact["id"]]),
        )
        for contact in account.data.records("contacts")
    ]  # fmt: skip
    profiles = account.query(
        "SELECT contact_id, email, unsubscribed, tag_ids, tag_names, course_ids, community_ids FROM marketing.contact_profiles ORDER BY contact_id"
    )
    assert profiles == expected
    assert any(row[5] for row in profiles) and any(row[6] for row in profiles) and any(not row[3] for row in profiles)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key.path[-1] == "contact_profiles"}
    assert checks["one_row_per_live_contact"].passed and checks["keys_present"].passed


def test_every_reference_of_the_catalog_has_a_check_and_every_list_with_a_table_a_normalized_table() -> None:
    references = {(spec.name, (member or column).check_name) for spec in RESOURCES for column, member in spec.references()}
    tables = {column.table.name for spec in RESOURCES for column in spec.columns if column.table is not None}

    assert len(references) == 6 and {("enrollments", "course_ids_exist"), ("memberships", "community_ids_exist")} <= references
    assert tables | {"contact_profiles"} == {table.name for table in NORMALIZED_TABLES}
    assert RESOURCES_BY_NAME["enrollments"].column("contact").name == "contact_id"


def _resource(name: str, *references: str) -> ResourceSpec:
    columns = (Column("id", "BIGINT", "Key."),) + tuple(
        Column(f"{other}Id", "BIGINT", "Names one.", references=Reference(other)) for other in references
    )
    return ResourceSpec(name=name, row_name=name, path=f"/{name}", primary_key="id", description=name, columns=columns)


def test_resources_come_after_those_they_reference_even_through_one_left_out() -> None:
    catalog = [_resource("a", "c"), _resource("b"), _resource("c", "d"), _resource("d")]

    assert [spec.name for spec in referenced_first(catalog, catalog)] == ["b", "d", "c", "a"]
    assert [spec.name for spec in referenced_first([catalog[0], catalog[3]], catalog)] == ["d", "a"]
    names = [spec.name for spec in referenced_first(RESOURCES)]
    assert names.index("tags") < names.index("contacts") and names.index("contacts") < names.index("enrollments")


def test_references_that_go_round_in_a_circle_are_refused_naming_them() -> None:
    catalog = [_resource("a", "b"), _resource("b", "a"), _resource("c")]

    with pytest.raises(ValueError, match="the references of a, b go round in a circle"):
        referenced_first(catalog, catalog)


def linked_ids(data: SandboxData) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """The course ids and the community ids of each contact, as the simulator links them."""
    courses: dict[int, set[int]] = defaultdict(set)
    for enrollment in data.records("enrollments"):
        courses[enrollment["contact"]["id"]].add(enrollment["course"]["id"])
    communities: dict[int, set[int]] = defaultdict(set)
    for membership in data.records("memberships"):
        communities[membership["contact"]["id"]].add(membership["community"]["id"])
    return courses, communities
