"""Faults and bad input, driven through the simulator: each case lands exactly what the API
holds or fails clearly, leaving the table as it was, and never shows the key."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.core.errors import ApiValidationError
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run import sync
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests._failing_facts import commit_then_fail_the_facts
from mkt_assets_tests.conftest import materialization, materialize_marketing

API_KEY = "fault-secret-5d1e0b7a"
CONTACTS = RESOURCES_BY_NAME["contacts"]
ACCOUNT_SIZE = 450  # five pages of contacts


@dataclass
class Outcome:
    result: dg.ExecuteInProcessResult
    instance: dg.DagsterInstance

    @property
    def error(self) -> str:
        """The step's error as a user reads it in the UI: every message down the cause chain."""
        (failure,) = self.result.get_step_failure_events()
        error = failure.event_specific_data.error  # type: ignore[union-attr]
        messages = []
        while error is not None:
            messages.append(error.message)
            error = error.cause
        return "\n".join(messages)

    def metadata(self, name: str = "contacts") -> dict[str, Any]:
        return materialization(self.result, name)

    def everything_recorded(self) -> str:
        return "\n".join(str(entry) for entry in self.instance.all_logs(self.result.run_id))


class Harness:
    """A simulator and a DuckDB file that already holds a first, clean sync."""

    def __init__(self, tmp_path: Path, first_sync: Path | None = None) -> None:
        self.account = SandboxData(seed=11, contacts=ACCOUNT_SIZE)
        self.server = SandboxServer(self.account, api_key=API_KEY).start()
        self.database = str(tmp_path / "faults.duckdb")
        self.quota_dir = str(tmp_path / "quota")
        self.deletions = "mark"
        if first_sync is None:
            assert self.sync(CONTACTS).result.success
        else:
            # The account is deterministic, so a first sync's file made once stands for each
            # test's own first sync (copy2 keeps its private mode).
            shutil.copy2(first_sync, self.database)
        self.server.reset_log()

    def resources(self, **api_settings: Any) -> dict[str, Any]:
        # One ascending walk, so a fault's `after` names a page; the two-ended walk (the
        # default) has its own cases below.
        settings = {"base_url": self.server.base_url, "api_key": API_KEY, "backoff_factor": 0.01,
                    "quota_state_dir": self.quota_dir, "order": "asc", **api_settings}  # fmt: skip
        return {
            "marketing_api": MarketingApiResource(**settings),
            "duckdb_io_manager": MarketingDuckDBIOManager(
                warehouse=WarehouseResource(database=self.database), deletions=self.deletions
            ),
            "warehouse": WarehouseResource(database=self.database),
        }

    def sync(self, spec: ResourceSpec, *faults: Fault, **api_settings: Any) -> Outcome:
        self.server.clear_faults()
        for fault in faults:
            self.server.add_fault(fault)
        instance = dg.DagsterInstance.ephemeral()
        result = materialize_marketing(
            [spec.name], self.resources(**api_settings), instance=instance, raise_on_error=False
        )
        return Outcome(result, instance)

    def table(self, spec: ResourceSpec = CONTACTS) -> list[tuple[Any, ...]]:
        with connect(self.database) as connection:
            name = fully_qualified(connection, "marketing", spec.name)
            return connection.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()

    def contact_requests(self) -> list[Any]:
        return [r for r in self.server.requests if r.path == "/api/contacts"]


@pytest.fixture(scope="module")
def first_sync(tmp_path_factory: pytest.TempPathFactory) -> Path:
    made = Harness(tmp_path_factory.mktemp("first_sync"))
    made.server.stop()
    return Path(made.database)


@pytest.fixture()
def harness(tmp_path: Path, first_sync: Path) -> Iterator[Harness]:
    running = Harness(tmp_path, first_sync)
    try:
        yield running
    finally:
        running.server.stop()


def assert_failed_cleanly(harness: Harness, outcome: Outcome, before: list[tuple[Any, ...]]) -> None:
    assert not outcome.result.success
    assert harness.table() == before, "a failed sync must leave the table exactly as it was"
    assert API_KEY not in outcome.error
    assert API_KEY not in outcome.everything_recorded()
    assert API_KEY.encode() not in Path(harness.database).read_bytes()


# 1. Up to 3 consecutive retryable answers on any page: complete data, retries reported.


@pytest.mark.slow  # a second or more: several real syncs
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_three_retryable_answers_in_a_row_are_retried_to_a_complete_sync(harness: Harness, status: int) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=status, times=3, after=2))

    assert outcome.result.success
    assert harness.table() == before  # every record, as the first sync landed them
    metadata = outcome.metadata()
    assert metadata["retries"] == 3
    assert metadata["throttled_429"] == (3 if status == 429 else 0)
    assert metadata["records_fetched"] == ACCOUNT_SIZE


@pytest.mark.slow  # a second or more: several real syncs
def test_retry_after_is_waited_before_each_retry(harness: Harness) -> None:
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=503, times=2, after=1, retry_after=1))

    assert outcome.result.success
    second_page = [r for r in harness.contact_requests() if r.query.get("startingAfter")][:3]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(second_page)]
    assert [r.status for r in second_page] == [503, 503, 200]
    assert all(gap >= 0.95 for gap in gaps), gaps  # backoff alone would be 0.01 s


# 2. Persistent faults: a clear error naming resource, request and cause; table untouched.


def test_a_persistent_5xx_fails_naming_the_request_and_leaves_the_table(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=502, times=-1, after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc&startingAfter=" in outcome.error
    assert "HTTP 502 after retries" in outcome.error
    assert len(harness.contact_requests()) == 1 + 4


@pytest.mark.parametrize("status", [429, 503])
def test_retryable_answers_during_a_two_ended_walk_are_retried_to_a_complete_sync(harness: Harness, status: int) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=status, times=3, after=2), order="both")

    assert outcome.result.success
    assert harness.table() == before
    metadata = outcome.metadata()
    assert (metadata["retries"], metadata["records_fetched"]) == (3, ACCOUNT_SIZE)
    assert {r.query["order"] for r in harness.contact_requests()} == {"asc", "desc"}


def test_a_persistent_5xx_during_a_two_ended_walk_fails_and_leaves_the_table(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=502, times=-1, after=1), order="both")

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=" in outcome.error
    assert "HTTP 502 after retries" in outcome.error


def test_a_refused_connection_fails_clearly(harness: Harness) -> None:
    before = harness.table()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    outcome = harness.sync(CONTACTS, base_url=f"http://127.0.0.1:{closed_port}/api")

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc: no complete answer:" in outcome.error
    assert "Connection refused" in outcome.error


def test_a_connection_reset_mid_body_fails_clearly(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("reset", path="/api/contacts", after=3, times=-1))

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc&startingAfter=" in outcome.error
    assert "no complete answer" in outcome.error


@pytest.mark.slow  # a second or more: several real syncs
def test_a_read_timeout_fails_clearly(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("delay", path="/api/contacts", delay=1.0, times=-1), read_timeout=0.2)

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc:" in outcome.error
    assert "timed out" in outcome.error or "Read timed out" in outcome.error


# 3. A rejected key: no retries, the setting named. A resource the account cannot read: the
# key is not blamed, MKT_RESOURCES is named, and leaving the resource out lets the rest sync.


def test_a_rejected_key_fails_at_once_naming_mkt_api_key(harness: Harness) -> None:
    before = harness.table()
    harness.server.clear_faults()
    outcome = harness.sync(CONTACTS, api_key="wrong-key-123")

    assert_failed_cleanly(harness, outcome, before)
    assert (
        'HTTP 401: the API key was rejected (the API said "Full authentication is required to access this resource.");'
        " set MKT_API_KEY to a valid key"
    ) in outcome.error
    assert len(harness.contact_requests()) == 1


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (403, 'the account cannot read contacts (the API said "Forbidden"); the key is not at fault, so keep it.'),
        # A server may route before it authenticates: a 404 does not clear the key.
        (404, 'the account cannot read contacts, or the API serves nothing at this address (the API said "Not Found").'),
    ],
)
def test_a_resource_the_account_cannot_read_fails_at_once_naming_mkt_resources_not_the_key(
    harness: Harness, status: int, said: str
) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=status, times=-1))

    assert_failed_cleanly(harness, outcome, before)
    assert (
        f"contacts: GET /api/contacts?limit=100&order=asc: HTTP {status}: {said}"
        " Leave contacts out by listing the resources to sync in MKT_RESOURCES"
    ) in outcome.error
    assert "MKT_API_KEY" not in outcome.error and "rejected" not in outcome.error
    assert len(harness.contact_requests()) == 1


def test_a_wrong_base_url_is_said_once_naming_mkt_api_base_url_not_once_a_resource_to_leave_out(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = harness.server.base_url + "/v0"  # every path under it answers 404
    monkeypatch.setenv("MKT_API_BASE_URL", wrong)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    harness.server.clear_faults()
    defs = build_definitions(Settings(duckdb_path=harness.database))

    outcome = Outcome(
        defs.resolve_job_def("marketing_sync").execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False),
        dg.DagsterInstance.ephemeral(),
    )

    assert not outcome.result.success
    (said,) = [line for line in outcome.error.splitlines() if "Every resource this run reads answered HTTP 404" in line]
    for spec in RESOURCES:
        assert f"{spec.name}: GET /api/v0{spec.path}" in said
    assert said.endswith(
        f"the base URL is probably wrong, not the key nor the account. MKT_API_BASE_URL is {wrong};"
        " correct it (unset, the API's own address is used) and run again."
    )
    assert "cannot read" not in outcome.error and "Leave" not in outcome.error and "To sync the others" not in outcome.error
    assert API_KEY not in outcome.error


WITHOUT_COMMUNITIES = tuple(spec.name for spec in RESOURCES if spec.name not in ("communities", "memberships"))


@pytest.mark.slow  # a second or more: several real syncs
def test_an_account_without_communities_syncs_everything_else_once_mkt_resources_leaves_them_out(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MKT_API_BASE_URL", harness.server.base_url)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    harness.server.clear_faults()
    for path in ("/api/community/communities", "/api/community/memberships"):
        harness.server.add_fault(Fault("status", path=path, status=403, times=-1))
    instance = dg.DagsterInstance.ephemeral()

    def run(job: str, **settings: Any) -> Outcome:
        defs = build_definitions(Settings(duckdb_path=harness.database, **settings))
        return Outcome(defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False), instance)

    # Every resource, as by default: the run fails saying what to do, and blames no key.
    failed = run("marketing_sync")
    assert not failed.result.success
    # Whichever of the two forbidden lists answers first stops the other: either may be named.
    assert re.search(r'HTTP 403: the account cannot read (memberships|communities) \(the API said "Forbidden"\)', failed.error)
    assert "MKT_RESOURCES" in failed.error and "MKT_API_KEY" not in failed.error
    assert 'HTTP 403: the account cannot read communities (the API said "Forbidden")' in failed.error
    # Both named, and the value to set: the resources chosen now, those two taken out.
    assert f"To sync the others without communities and memberships: MKT_RESOURCES={','.join(WITHOUT_COMMUNITIES)}" in failed.error

    harness.server.reset_log()
    for job in ("marketing_sync", "marketing_incremental"):
        outcome = run(job, resources=WITHOUT_COMMUNITIES)
        assert outcome.result.success, job
        checks = outcome.result.get_asset_check_evaluations()
        assert checks and [(c.asset_key.path[-1], c.check_name) for c in checks if not c.passed] == [], job
        assert "contact_profiles" in {e.asset_key.path[-1] for e in outcome.result.get_asset_materialization_events()}
    assert not [r for r in harness.server.requests if r.path.startswith("/api/community/")]
    with connect(harness.database) as connection:
        profiles = fully_qualified(connection, "marketing", "contact_profiles")
        (contacts, empty, enrolled) = connection.execute(
            f"SELECT count(*), count(*) FILTER (WHERE community_ids = []), count(*) FILTER (WHERE len(course_ids) > 0)"
            f" FROM {profiles}"
        ).fetchone()  # type: ignore[misc]
    assert contacts == ACCOUNT_SIZE and empty == ACCOUNT_SIZE  # one row per contact, no memberships
    assert enrolled > 0  # enrollments, which the plan includes, still fill their list


# 4. 422: the API's violations shown.


def test_a_422_shows_the_api_violations(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=422, after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert "HTTP 422, the API rejected the request: startingAfter: This value is not valid." in outcome.error


def test_the_simulators_own_validation_reaches_the_user(harness: Harness) -> None:
    with MarketingApiClient(harness.server.base_url, API_KEY) as client, pytest.raises(ApiValidationError) as caught:
        list(client.iter_pages(CONTACTS, {"limit": 5}))
    assert "pagination.limit: This value should be between 10 and 100." in str(caught.value)


# 5.-7. Malformed pages, records without a key, cursors that do not advance: nothing written.


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "contacts: GET /api/contacts?limit=100&order=asc&startingAfter="),
        ("truncated", ": page 3: the JSON body does not parse ("),
        ("html", ": page 3: expected JSON, got text/html"),
        ("no_items", ": page 3: the body has no 'items'"),
        ("items_not_list", ": page 3: 'items' is dict, not a list"),
        ("no_has_more", ": page 3: 'hasMore' is missing or not a boolean"),
        ("missing_id", ": record 51 of page 3 has no 'id' (its fields: bounced, email, fields, locale,"),
        ("repeat_cursor", ": page 3: the cursor did not advance"),
        ("empty_has_more", ": page 3: hasMore is true but the page is empty"),
    ],
)
def test_a_bad_page_fails_naming_resource_and_page_and_writes_nothing(harness: Harness, kind: str, message: str) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault(kind, path="/api/contacts", after=2))

    assert_failed_cleanly(harness, outcome, before)
    assert message in outcome.error


# 8. A new upstream field is kept; a field that cannot be typed is named with its value.


@pytest.mark.slow  # a second or more: several real syncs
def test_a_new_upstream_field_is_kept_in_extra_and_reported(harness: Harness) -> None:
    outcome = harness.sync(CONTACTS, Fault("extra_field", path="/api/contacts", times=-1))

    assert outcome.result.success
    assert outcome.metadata()["unknown_fields"] == "score"
    with connect(harness.database) as connection:
        extras = connection.execute("SELECT DISTINCT CAST(_extra AS VARCHAR) FROM marketing.contacts").fetchall()
    assert extras == [('{"score":42}',)]
    assert "kept in _extra: score" in outcome.everything_recorded()


def test_a_value_of_the_wrong_type_fails_naming_column_and_value(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("bad_type", path="/api/contacts", after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert "record 51 of page 2: field 'id' (column id BIGINT) cannot hold \"abc\"" in outcome.error


# 9. The step process killed during the DuckDB write: old state, then a clean next sync.

_KILLED_WRITER = textwrap.dedent(
    """
    import sys

    from mkt_assets.core.catalog import RESOURCES_BY_NAME
    from mkt_assets.orchestration.resource import MarketingApiResource
    from mkt_assets.staging.pages import PageStager
    from mkt_assets.warehouse.connection import connect
    from mkt_assets_tests.warehouse_calls import merge_staged

    class PausingConnection:
        # Runs every statement of the merge, and stops dead at its COMMIT.
        def __init__(self, connection):
            self._connection = connection

        def execute(self, sql, *args):
            if sql == "COMMIT":
                print("merged, not committed", flush=True)
                sys.stdin.read()  # held here until killed
            return self._connection.execute(sql, *args)

    base_url, key, database, quota = sys.argv[1:5]
    spec = RESOURCES_BY_NAME["contacts"]
    api = MarketingApiResource(base_url=base_url, api_key=key, quota_state_dir=quota)
    with api.get_client() as client, PageStager(spec) as stager:
        for page in client.iter_pages(spec):
            stager.add(page)
        batch = stager.finish()
    # A merge in its own transaction, paused before its COMMIT.
    with connect(database) as connection:
        merge_staged(PausingConnection(connection), "marketing", "contacts", batch)
    """
)


@pytest.mark.slow  # a second or more: several real syncs
def test_a_writer_killed_mid_transaction_leaves_the_old_state_and_the_next_sync_succeeds(harness: Harness) -> None:
    before = harness.table()
    harness.account.add_contacts(120)
    tagged = [contact_id for contact_id in harness.account.contact_ids if harness.account.contact(contact_id)["tags"]]
    for contact_id in tagged[:10]:
        harness.account.set_contact_tags(contact_id, [])
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, harness.server.base_url, API_KEY, harness.database, harness.quota_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "merged, not committed"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(60)

    assert harness.table() == before  # the database opens and holds the old state, whole
    outcome = harness.sync(CONTACTS)
    assert outcome.result.success
    metadata = outcome.metadata()
    assert (metadata["rows_inserted"], metadata["rows_updated"]) == (120, 10)
    assert len(harness.table()) == ACCOUNT_SIZE + 120


# Security.


def test_a_redirect_to_another_origin_is_refused_and_the_key_never_reaches_it(harness: Harness) -> None:
    with SandboxServer(SandboxData(seed=1, contacts=10), api_key="other") as elsewhere:
        before = harness.table()
        origin = elsewhere.base_url.removesuffix("/api")
        outcome = harness.sync(CONTACTS, Fault("redirect", path="/api/contacts", after=1, location=origin))

        assert_failed_cleanly(harness, outcome, before)
        assert "redirected to another origin" in outcome.error
        assert all(API_KEY not in str(request.headers) for request in elsewhere.requests)
        assert elsewhere.requests == []


def test_the_key_appears_in_no_log_metadata_or_database_after_a_sync(harness: Harness) -> None:
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=503, after=1))

    assert outcome.result.success
    assert API_KEY not in outcome.everything_recorded()
    assert API_KEY not in repr(harness.resources()["marketing_api"])
    assert API_KEY.encode() not in Path(harness.database).read_bytes()
    assert all(request.headers.get("X-API-Key") == API_KEY for request in harness.server.requests)


# Rate limits: paced by the headers, shared by the run's fetch threads.


@pytest.mark.slow
def test_a_rate_limited_parallel_sync_stays_under_the_quota_and_near_its_floor(tmp_path: Path) -> None:
    limit, window = 20, 2.0
    account = SandboxData(seed=5, contacts=6000)
    with SandboxServer(account, api_key=API_KEY, rate_limit=(limit, window)) as server:
        environment = {
            **os.environ,
            "MKT_API_BASE_URL": server.base_url,
            "MKT_API_KEY": API_KEY,
            "MKT_DUCKDB_PATH": str(tmp_path / "paced.duckdb"),
            "DAGSTER_HOME": str(tmp_path),
        }
        run = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"],
            env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        served = [r for r in server.requests if r.path.startswith("/api/")]

    assert run.returncode == 0, run.stdout[-3000:]
    assert "STEP_FAILURE" not in run.stdout + run.stderr
    assert [r for r in served if r.status == 429] == []
    assert {r.path for r in served} == {f"/api{spec.path}" for spec in RESOURCES}
    assert {"/api/contacts", "/api/community/memberships", "/api/school/enrollments"} <= {r.path for r in served}
    floor = len(served) / (limit / window)  # every request, at 10 per second
    span = max(r.at for r in served) - min(r.at for r in served)
    assert span <= 1.2 * floor, (span, floor)


# Checks that cannot run: failed checks, not a failed materialization.


def test_checks_that_cannot_run_fail_as_checks_while_the_merged_table_stands(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.account.add_contacts(5)
    monkeypatch.setattr(sync, "commit", commit_then_fail_the_facts)

    outcome = harness.sync(CONTACTS)

    assert outcome.result.get_step_failure_events() == []
    assert outcome.metadata()["rows_inserted"] == 5
    assert len(harness.table()) == ACCOUNT_SIZE + 5
    evaluations = {e.check_name: e for e in outcome.result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "primary_key_unique", "required_fields_present", "row_count_not_dropping", "contact_tags_exist",
        "contact_field_slugs_exist", "history_is_consistent",
    }  # fmt: skip
    assert all(not e.passed for e in evaluations.values())
    assert all(
        e.description == "the check could not run: Out of Memory Error: failed to pin block of size 256.0 KiB"
        for e in evaluations.values()
    )
    # A blocking check failing with ERROR would fail the step whose table has changed.
    assert all(e.severity == dg.AssetCheckSeverity.WARN for e in evaluations.values())


# A hostile server: every answer checked, every wait and size bounded, nothing lost.


def test_an_id_that_is_not_an_exact_integer_fails_the_read_and_overwrites_nothing(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("float_id", path="/api/contacts", after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc&startingAfter=" in outcome.error
    assert ": record 51 of page 2: field 'id' (column id BIGINT) cannot hold " in outcome.error
    assert ".5: not an integer" in outcome.error


@pytest.mark.slow  # two real syncs each
@pytest.mark.parametrize("deletions", ["mark", "delete"])
def test_an_unpaginated_list_saying_there_is_more_marks_nothing_deleted(harness: Harness, deletions: str) -> None:
    fields = RESOURCES_BY_NAME["contact_fields"]
    assert harness.sync(fields).result.success
    before = harness.table(fields)
    harness.deletions = deletions

    outcome = harness.sync(fields, Fault("short_has_more", path="/api/contact_fields"))

    assert not outcome.result.success
    assert harness.table(fields) == before  # the missing field is neither marked nor removed
    assert "contact_fields: GET /api/contact_fields: page 1: hasMore is true, but /api/contact_fields" in outcome.error


@pytest.mark.parametrize("order", ["asc", "both"])
def test_a_page_out_of_order_fails_naming_the_page_instead_of_losing_records(harness: Harness, order: str) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("swapped", path="/api/contacts", after=1), order=order)

    assert_failed_cleanly(harness, outcome, before)
    # Pages of a two-ended walk are numbered in the order they were asked for.
    assert re.search(r"contacts: GET /api/contacts\?limit=100&order=(asc|desc)(&startingAfter=\d+)?: page \d+: records out of", outcome.error)
    assert "stopping rather than risk losing records" in outcome.error


def test_the_same_record_on_two_pages_is_kept_once_counted_and_warned_about(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("repeat_last", path="/api/contacts", after=1, times=2))

    assert outcome.result.success
    assert harness.table() == before
    metadata = outcome.metadata()
    assert (metadata["duplicate_keys"], metadata["records_fetched"], metadata["rows_unchanged"]) == (2, ACCOUNT_SIZE + 2, ACCOUNT_SIZE)
    assert "marketing.contacts: 2 records came again under a key already read in this sync" in outcome.everything_recorded()


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        (20_000, ": page 2: 20000 records, more than the 100 asked for (limit=100); refusing the page"),
        # 100,000 contacts are 55 MB: the size cap stops the read before the page is parsed.
        (100_000, ": page 2: the answer is larger than 16 MiB (max_page_mb); stopped reading it"),
    ],
)
def test_a_page_longer_than_asked_fails_naming_its_length_before_anything_is_staged(
    harness: Harness, records: int, problem: str
) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("oversized", path="/api/contacts", size=records, after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert problem in outcome.error


def test_a_ten_megabyte_value_lands_whole(harness: Harness) -> None:
    outcome = harness.sync(CONTACTS, Fault("big_value", path="/api/contacts", after=2))

    assert outcome.result.success
    with connect(harness.database) as connection:
        table = fully_qualified(connection, "marketing", "contacts")
        (longest,) = connection.execute(f"SELECT max(length(f.value)) FROM (SELECT unnest(fields) AS f FROM {table})").fetchone()  # type: ignore[misc]
    assert longest == 10 << 20


def test_json_nested_ten_thousand_deep_fails_like_any_bad_body(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("deep_json", path="/api/contacts", after=1))

    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc&startingAfter=" in outcome.error
    assert ": page 2: the JSON body nests deeper than it can be parsed" in outcome.error
    assert "RecursionError" not in outcome.error


def test_a_record_without_its_key_puts_no_personal_value_in_the_log(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("missing_id", path="/api/contacts", after=2))

    assert_failed_cleanly(harness, outcome, before)
    recorded = outcome.everything_recorded()
    assert "(its fields: bounced, email, fields, locale, needsConfirmation, registeredAt" in outcome.error
    assert "@" not in outcome.error
    emails = [harness.account.contact(contact_id)["email"] for contact_id in harness.account.contact_ids[200:300]]
    assert not any(email in recorded for email in emails)


def test_a_retry_after_beyond_the_longest_wait_fails_at_once_saying_what_was_asked(harness: Harness) -> None:
    before = harness.table()
    started = time.monotonic()
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=429, retry_after=99999, after=1))

    assert time.monotonic() - started < 30
    assert_failed_cleanly(harness, outcome, before)
    assert (
        "HTTP 429 asking to retry after 99,999 s (Retry-After), longer than the 120 s the sync waits at most"
        " (max_wait_seconds); failing now instead of waiting"
    ) in outcome.error
    assert len(harness.contact_requests()) == 2


@pytest.mark.slow  # waits the 6 s it is asked to; test_client pins the message without waiting
def test_a_long_retry_after_is_waited_and_logged(harness: Harness) -> None:
    outcome = harness.sync(CONTACTS, Fault("status", path="/api/contacts", status=503, retry_after=6, after=1))

    assert outcome.result.success
    assert "waiting 6 s before retrying after HTTP 503 (as Retry-After asks)" in outcome.everything_recorded()


@pytest.mark.slow  # a second or more: several real syncs
@pytest.mark.parametrize("kind", ["drip", "drip_body"])
def test_an_answer_dripping_a_byte_at_a_time_is_cut_at_the_read_timeout(harness: Harness, kind: str) -> None:
    before = harness.table()
    started = time.monotonic()
    outcome = harness.sync(CONTACTS, Fault(kind, path="/api/contacts", delay=0.05, times=-1, after=1), read_timeout=1.0, max_retries=1)

    took = time.monotonic() - started
    assert_failed_cleanly(harness, outcome, before)
    assert "contacts: GET /api/contacts?limit=100&order=asc&startingAfter=" in outcome.error
    assert "timed out: no complete answer (headers and body) within read_timeout (1 s) of sending the request" in outcome.error
    assert took < 20, took  # two attempts of a second each, plus Dagster; a drip would take hours


@pytest.mark.slow  # a second or more: several real syncs
def test_a_gzip_bomb_is_cut_off_at_the_page_cap(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("gzip_bomb", path="/api/contacts", size=256 << 20, after=1), max_page_mb=8)

    assert_failed_cleanly(harness, outcome, before)
    assert ": page 2: the answer is larger than 8 MiB once decompressed (max_page_mb); stopped reading it" in outcome.error


@pytest.mark.slow  # a second or more: several real syncs
def test_an_answer_cut_at_its_deadline_is_retried_and_a_prompt_retry_succeeds(harness: Harness) -> None:
    before = harness.table()
    outcome = harness.sync(CONTACTS, Fault("delay", path="/api/contacts", delay=3.0, after=1), read_timeout=1.0)

    assert outcome.result.success
    assert harness.table() == before
    assert outcome.metadata()["retries"] == 1
