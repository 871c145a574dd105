"""`dagster dev` as a user runs it: what its webserver shows, and a sync launched through it.

One `dagster dev` (webserver and daemon) is started on a free loopback port against the
project's `workspace.yaml`, with a throwaway DAGSTER_HOME holding a copy of the project's
`dagster.yaml`, and pointed at the bundled API simulator. Everything is read through the
webserver's GraphQL API, the same API the UI reads. Every process started here is stopped,
and checked to be gone, when the module ends.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from mkt_assets.core.catalog import BOOKKEEPING_COLUMNS, RESOURCES, RESOURCES_BY_NAME, holds_personal_data
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES

REPO = Path(__file__).resolve().parents[1]
LOCATION = "mkt_assets"
REPOSITORY = "__repository__"
REPOSITORY_SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
JOB = "marketing_sync"
SCHEDULE = "marketing_sync_daily"
# What the webserver must show follows from the catalog and the normalized tables' declarations.
ASSET_NAMES = tuple(spec.name for spec in RESOURCES)
ASSET_PATHS = {("marketing", name) for name in ASSET_NAMES}
# The tables built in DuckDB from the synced ones, and what each reads.
NORMALIZED_READS = {("marketing", table.name): {("marketing", read) for read in table.reads} for table in NORMALIZED_TABLES}
NORMALIZED_CHECKS = {("marketing", table.name): {table.row_check, "keys_present"} for table in NORMALIZED_TABLES}
ALL_PATHS = ASSET_PATHS | set(NORMALIZED_READS)
WEBHOOK_EVENTS_PATH = ("marketing", "webhook_events")
SYNC_CHECKS = {"primary_key_unique", "required_fields_present", "row_count_not_dropping", "history_is_consistent"}
# Each synced asset's reference checks, and the asset each one also reads.
REFERENCE_CHECKS = {
    ("marketing", spec.name): {
        (member or column).check_name: ("marketing", (member or column).references.resource)  # type: ignore[union-attr]
        for column, member in spec.references()
    }
    for spec in RESOURCES
}
# The lineage: each synced asset depends on those it references.
REFERENCED = {path: set(checks.values()) for path, checks in REFERENCE_CHECKS.items()}
PAGE_SIZE = 100  # the resource's default page_size
# Not a multiple of the page size, so the number of pages is unambiguous.
CONTACTS = 550

STARTUP_SECONDS = 120.0
# The daily sync's hour in this test: twelve hours from now, so no schedule fires during it.
DAILY_HOUR = (datetime.now(timezone.utc).hour + 12) % 24
DAILY_CRON = f"0 {DAILY_HOUR} * * *"
RUN_SECONDS = 300.0
STOP_SECONDS = 30.0
POLL_SECONDS = 0.5

# Process groups and SIGINT are POSIX: the test drives `dagster dev` the way a terminal does.
pytestmark = [
    pytest.mark.slow,  # starts dagster dev: webserver, daemon and code server
    pytest.mark.skipif(sys.platform == "win32", reason="stops dagster dev with os.killpg(SIGINT)"),
]

METADATA_ENTRY = """
fragment MetadataEntryFields on MetadataEntry {
  __typename
  label
  description
  ... on TextMetadataEntry { text }
  ... on IntMetadataEntry { intValue intRepr }
  ... on FloatMetadataEntry { floatValue floatRepr }
  ... on BoolMetadataEntry { boolValue }
  ... on JsonMetadataEntry { jsonString }
  ... on MarkdownMetadataEntry { mdStr }
  ... on PathMetadataEntry { path }
  ... on UrlMetadataEntry { url }
  ... on TimestampMetadataEntry { timestamp }
  ... on TableSchemaMetadataEntry {
    schema { columns { name type description constraints { nullable unique } } }
  }
}
"""

ERROR_FIELDS = """
  __typename
  ... on Error { message }
  ... on PythonError { message stack causes { message stack } }
  ... on RunConfigValidationInvalid { errors { message reason } }
  ... on InvalidSubsetError { message }
"""

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message stack } }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

ASSET_NODES_QUERY = """
query AssetNodes {
  assetNodes {
    assetKey { path }
    groupName
    kinds
    description
    jobNames
    isMaterializable
    dependencyKeys { path }
    dependedByKeys { path }
    owners { __typename ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    internalFreshnessPolicy {
      __typename
      ... on TimeWindowFreshnessPolicy { failWindowSeconds warnWindowSeconds }
    }
    metadataEntries { ...MetadataEntryFields }
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks { name blocking jobNames description additionalAssetKeys { path } }
      }
    }
  }
}
""" + METADATA_ENTRY

SCHEDULES_QUERY = """
query Schedules($selector: RepositorySelector!) {
  schedulesOrError(repositorySelector: $selector) {
    __typename
    ... on Schedules {
      results {
        name
        pipelineName
        cronSchedule
        executionTimezone
        defaultStatus
        scheduleState { status }
        futureTicks(limit: 2) { results { timestamp } }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

INSTANCE_QUERY = """
query Instance {
  instance {
    freshnessEvaluationEnabled
    runQueuingSupported
    daemonHealth { allDaemonStatuses { daemonType required healthy } }
  }
}
"""

LAUNCH_MUTATION = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    %s
  }
}
""" % ERROR_FIELDS

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId
      jobName
      status
      runConfigYaml
      tags { key value }
      stepStats { stepKey status }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message stack }
  }
}
"""

RUN_STATUS_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } }
}
"""

RUN_LOGS_QUERY = """
query RunLogs($runId: ID!, $afterCursor: String) {
  logsForRun(runId: $runId, afterCursor: $afterCursor, limit: 500) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on MessageEvent { message level stepKey eventType }
        ... on MaterializationEvent { assetKey { path } metadataEntries { ...MetadataEntryFields } }
        ... on AssetCheckEvaluationEvent {
          evaluation {
            checkName
            assetKey { path }
            success
            severity
            description
            metadataEntries { ...MetadataEntryFields }
          }
        }
        ... on ErrorEvent { error { message stack causes { message stack } } }
        ... on LogsCapturedEvent { fileKey stepKeys }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message stack }
  }
}
""" + METADATA_ENTRY

CAPTURED_LOGS_QUERY = """
query CapturedLogs($runId: ID!, $fileKey: String!) {
  runOrError(runId: $runId) { ... on Run { capturedLogs(fileKey: $fileKey) { stdout stderr } } }
}
"""

LATEST_MATERIALIZATIONS_QUERY = """
query Latest($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    assetMaterializations(limit: 1) { runId metadataEntries { ...MetadataEntryFields } }
    assetChecksOrError {
      ... on AssetChecks {
        checks { name executionForLatestMaterialization { runId status evaluation { success } } }
      }
    }
  }
}
""" + METADATA_ENTRY

FRESHNESS_QUERY = """
query Freshness {
  assetNodes {
    assetKey { path }
    freshnessStatusInfo { freshnessStatus freshnessStatusMetadata { lastMaterializedTimestamp } }
  }
}
"""

RESOURCES_QUERY = """
query Resources($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList { results { name configuredValues { key value type } } }
    ... on PythonError { message stack }
  }
}
"""


class GraphQLError(AssertionError):
    pass


@dataclass
class GraphQL:
    """Posts queries to the webserver and keeps every answer's text, to search them later."""

    url: str
    answers: list[str] = field(default_factory=list)

    def __call__(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(self.url, json={"query": query, "variables": variables or {}}, timeout=60)
        self.answers.append(response.text)
        if response.status_code != 200:
            raise GraphQLError(f"GraphQL answered HTTP {response.status_code}: {response.text[:4000]}")
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {json.dumps(body['errors'], indent=2)[:4000]}")
        return body["data"]


@dataclass
class DagsterDev:
    process: subprocess.Popen[bytes]
    base_url: str
    graphql: GraphQL
    api_key: str
    account: SandboxData
    home: Path
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def restore_sigint() -> None:
    """Run in the child before exec: a shell started without job control may have left SIGINT
    ignored, and an ignored SIGINT would keep `dagster dev` from stopping on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_group_members(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every live (non-zombie) process in the process group."""
    if not Path("/proc/self/stat").exists():  # not Linux: ask ps
        listing = subprocess.run(
            ["ps", "-A", "-o", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True
        ).stdout
        rows = [line.split(None, 3) + [""] for line in listing.splitlines() if line.strip()]
        return [
            (int(pid), state, args.strip())
            for pid, pgrp, state, args, *_ in rows
            if int(pgrp) == pgid and not state.startswith("Z")
        ]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended while being read
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append((int(entry.name), state, cmdline))
    return members


def stop_process_group(process: subprocess.Popen[bytes]) -> list[tuple[int, str, str]]:
    """Ctrl-C for the whole group, as a user stops `dagster dev`; SIGKILL whatever is still there
    after STOP_SECONDS. Returns what had to be killed."""
    pgid = process.pid  # start_new_session: the child leads its own group
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_SECONDS
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    while process_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the group's exit with a deadline
    survivors = process_group_members(pgid)
    if survivors or process.poll() is None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_SECONDS)
    return survivors


def wait_until_ready(dev: DagsterDev) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if dev.process.poll() is not None:
            pytest.fail(f"dagster dev exited with {dev.process.returncode} while starting:\n{dev.log_tail()}")
        try:
            if requests.get(f"{dev.base_url}/server_info", timeout=5).status_code == 200:
                break
        except requests.RequestException:  # not listening yet
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the webserver did not answer /server_info in {STARTUP_SECONDS:.0f}s:\n{dev.log_tail()}")
        time.sleep(POLL_SECONDS)
    while True:
        workspace = dev.graphql(WORKSPACE_QUERY)["workspaceOrError"]
        assert workspace["__typename"] == "Workspace", workspace
        entries = {entry["name"]: entry for entry in workspace["locationEntries"]}
        entry = entries.get(LOCATION)
        if entry and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"]
            assert loaded and loaded["__typename"] == "RepositoryLocation", f"{LOCATION} failed to load: {loaded}"
            return
        if time.monotonic() > deadline:
            pytest.fail(f"code location {LOCATION} not LOADED in {STARTUP_SECONDS:.0f}s: {entries}\n{dev.log_tail()}")
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    root = tmp_path_factory.mktemp("dagster_dev")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    log_path = root / "dagster_dev.log"
    api_key = f"ui-test-key-{secrets.token_hex(16)}"
    account = SandboxData(seed=0, contacts=CONTACTS)
    port = free_loopback_port()
    # Bound (so its URL is known) but not serving yet: dagster dev is forked before any
    # thread of the simulator exists, since preexec_fn runs between fork and exec.
    server = SandboxServer(account, api_key=api_key)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
    environment.update(
        # The schedules are RUNNING: at their default times (03:00, every :30) the daemon
        # would start a run of its own in the middle of the test's, whose materializations
        # then are no longer the latest. Twelve hours away, neither fires during the test.
        MKT_SYNC_CRON=DAILY_CRON,
        MKT_INCREMENTAL_CRON=DAILY_CRON,
        DAGSTER_HOME=str(home),
        MKT_API_BASE_URL=server.base_url,
        MKT_API_KEY=api_key,
        MKT_DUCKDB_PATH=str(root / "warehouse.duckdb"),
        PYTHONUNBUFFERED="1",
    )
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml")]
                + ["-h", "127.0.0.1", "-p", str(port)],
                cwd=home,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=restore_sigint,
            )
        base_url = f"http://127.0.0.1:{port}"
        dev = DagsterDev(process, base_url, GraphQL(f"{base_url}/graphql"), api_key, account, home, log_path)
        try:
            server.start()
            wait_until_ready(dev)
            yield dev
        finally:
            # dagster dev first, the simulator after: nothing of a run outlives its API.
            survivors = stop_process_group(process)
    finally:
        server.stop()
    # Checked after the simulator stopped too, so a failure here still cleans up everything.
    assert not survivors, f"processes of dagster dev still alive {STOP_SECONDS:.0f}s after Ctrl-C: {survivors}"
    assert process_group_members(process.pid) == [], "the process group of dagster dev outlived SIGKILL"


@dataclass
class SyncRun:
    run_id: str
    run: dict[str, Any]
    events: list[dict[str, Any]]


def fetch_run_events(graphql: GraphQL, run_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = graphql(RUN_LOGS_QUERY, {"runId": run_id, "afterCursor": cursor})["logsForRun"]
        assert page["__typename"] == "EventConnection", page
        events.extend(page["events"])
        cursor = page["cursor"]
        if not page["hasMore"]:
            return events


def describe_failure(events: list[dict[str, Any]]) -> str:
    lines = []
    for event in events:
        if event.get("error") or event.get("level") == "ERROR":
            lines.append(f"{event['__typename']} [{event.get('stepKey')}]: {event.get('message')}")
            error = event.get("error")
            if error:
                lines.append(error["message"] + "".join(error["stack"]))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sync_run(dagster_dev: DagsterDev) -> SyncRun:
    """`marketing_sync` launched as the launchpad does, waited for until it ends."""
    graphql = dagster_dev.graphql
    launched = graphql(
        LAUNCH_MUTATION,
        {
            "executionParams": {
                "selector": {**REPOSITORY_SELECTOR, "jobName": JOB},
                "mode": "default",
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", f"launchRun failed: {json.dumps(launched, indent=2)}"
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_SECONDS
    while True:
        status = graphql(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
        assert status["__typename"] == "Run", status
        if status["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} still {status['status']} after {RUN_SECONDS:.0f}s:\n{dagster_dev.log_tail()}")
        time.sleep(POLL_SECONDS)
    run = graphql(RUN_QUERY, {"runId": run_id})["runOrError"]
    return SyncRun(run_id, run, fetch_run_events(graphql, run_id))


def expected_records(account: SandboxData, name: str) -> int:
    return sum(1 for _ in account.records(name))


def expected_pages(name: str, records: int) -> int:
    return max(1, math.ceil(records / PAGE_SIZE)) if RESOURCES_BY_NAME[name].paginated else 1


def by_label(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["label"]: entry for entry in entries}


def paths(keys: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    return {tuple(key["path"]) for key in keys}


# ---------------------------------------------------------------------------- definitions


def test_the_webserver_shows_every_synced_asset_in_group_marketing_with_kinds_owner_and_freshness_policy(
    dagster_dev: DagsterDev,
) -> None:
    every_node = {tuple(node["assetKey"]["path"]): node for node in dagster_dev.graphql(ASSET_NODES_QUERY)["assetNodes"]}
    # webhook_events beside them, in a group of its own that no sync selects.
    assert set(every_node) == ALL_PATHS | {WEBHOOK_EVENTS_PATH}
    assert every_node[WEBHOOK_EVENTS_PATH]["groupName"] == "marketing_webhooks"
    nodes = {path: node for path, node in every_node.items() if path in ASSET_PATHS}

    for path, node in nodes.items():
        assert node["groupName"] == "marketing", path
        assert set(node["kinds"]) == {"python", "duckdb"}, path
        assert node["isMaterializable"], path
        assert JOB in node["jobNames"], path
        assert node["description"], path
        assert node["owners"] == [{"__typename": "TeamAssetOwner", "team": "data-engineering"}], path
        assert node["internalFreshnessPolicy"] == {
            "__typename": "TimeWindowFreshnessPolicy",
            "warnWindowSeconds": 25 * 3600,
            "failWindowSeconds": 28 * 3600,
        }, path
        definition_metadata = by_label(node["metadataEntries"])
        assert definition_metadata["dagster/table_name"]["text"] == f"marketing.{path[1]}"
        columns = [column["name"] for column in definition_metadata["dagster/column_schema"]["schema"]["columns"]]
        spec = RESOURCES_BY_NAME[path[1]]
        assert columns == [column.name for column in (*spec.columns, *BOOKKEEPING_COLUMNS)], path


def test_the_lineage_follows_the_references_and_each_reference_has_its_check(dagster_dev: DagsterDev) -> None:
    every_node = {tuple(node["assetKey"]["path"]): node for node in dagster_dev.graphql(ASSET_NODES_QUERY)["assetNodes"]}
    nodes = {path: node for path, node in every_node.items() if path in ASSET_PATHS}

    # Lineage: a synced asset depends on those it references (an enrollment names a contact
    # and a course); the normalized tables fan in from the synced tables they are built from.
    assert REFERENCED[("marketing", "enrollments")] == {("marketing", "contacts"), ("marketing", "course_resources")}
    for path, node in nodes.items():
        readers = {table for table, reads in NORMALIZED_READS.items() if path in reads}
        referencing = {other for other, referenced in REFERENCED.items() if path in referenced}
        assert paths(node["dependencyKeys"]) == REFERENCED[path], path
        assert paths(node["dependedByKeys"]) == readers | referencing, path
    for path, reads in NORMALIZED_READS.items():
        node = every_node[path]
        assert node["groupName"] == "marketing_normalized", path
        assert paths(node["dependencyKeys"]) == reads, path
        assert {c["name"] for c in node["assetChecksOrError"]["checks"]} == NORMALIZED_CHECKS[path], path
        assert JOB in node["jobNames"], path
    # ...and one reference check per reference, reading the table it refers to (a warning).
    for path, node in nodes.items():
        checks_or_error = node["assetChecksOrError"]
        assert checks_or_error["__typename"] == "AssetChecks", checks_or_error
        checks = {check["name"]: check for check in checks_or_error["checks"]}
        assert set(checks) == SYNC_CHECKS | set(REFERENCE_CHECKS[path]), path
        for name in SYNC_CHECKS:
            assert checks[name]["blocking"] is (name == "primary_key_unique"), (path, name)
            assert checks[name]["additionalAssetKeys"] == [], (path, name)
            assert JOB in checks[name]["jobNames"], (path, name)
        for name, referenced in REFERENCE_CHECKS[path].items():
            assert checks[name]["blocking"] is False, name
            assert paths(checks[name]["additionalAssetKeys"]) == {referenced}, name
            assert JOB in checks[name]["jobNames"], name


def test_the_daily_sync_schedule_runs_at_its_configured_hour_utc_and_the_daemon_is_healthy(dagster_dev: DagsterDev) -> None:
    graphql = dagster_dev.graphql
    schedules = graphql(SCHEDULES_QUERY, {"selector": REPOSITORY_SELECTOR})["schedulesOrError"]

    assert schedules["__typename"] == "Schedules", schedules
    by_name = {result["name"]: result for result in schedules["results"]}
    assert set(by_name) == {SCHEDULE, "marketing_incremental_hourly"}
    assert by_name["marketing_incremental_hourly"]["scheduleState"]["status"] == "RUNNING"
    schedule = by_name[SCHEDULE]
    assert schedule["pipelineName"] == JOB
    assert (schedule["cronSchedule"], schedule["executionTimezone"]) == (DAILY_CRON, "UTC")
    assert schedule["defaultStatus"] == "RUNNING"
    assert schedule["scheduleState"]["status"] == "RUNNING"
    ticks = [datetime.fromtimestamp(tick["timestamp"], timezone.utc) for tick in schedule["futureTicks"]["results"]]
    assert len(ticks) == 2
    assert all((tick.hour, tick.minute, tick.second) == (DAILY_HOUR, 0, 0) for tick in ticks), ticks
    assert (ticks[1] - ticks[0]).days == 1

    # A RUNNING schedule only fires if the daemon that `dagster dev` started is alive; it reports
    # its heartbeats a little after start, so wait for them (bounded).
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        instance = graphql(INSTANCE_QUERY)["instance"]
        statuses = {status["daemonType"]: status for status in instance["daemonHealth"]["allDaemonStatuses"]}
        wanted = ("SCHEDULER", "QUEUED_RUN_COORDINATOR")
        if all(statuses.get(daemon, {}).get("healthy") for daemon in wanted):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"daemons not healthy after {STARTUP_SECONDS:.0f}s: {statuses}\n{dagster_dev.log_tail()}")
        time.sleep(POLL_SECONDS)
    assert instance["runQueuingSupported"] is True
    assert instance["freshnessEvaluationEnabled"] is True


# ---------------------------------------------------------------------------- a launched sync


def test_marketing_sync_launched_through_the_webserver_is_queued_then_run_by_the_daemon_and_succeeds(sync_run: SyncRun) -> None:
    run = sync_run.run
    failure = describe_failure(sync_run.events)

    assert run["__typename"] == "Run", run
    assert run["status"] == "SUCCESS", f"run {sync_run.run_id} ended {run['status']}:\n{failure}"
    assert run["jobName"] == JOB
    steps = {step["stepKey"]: step["status"] for step in run["stepStats"]}
    # Every resource and normalized table in one step, landed in one transaction.
    assert steps == {"sync_marketing": "SUCCESS"}, steps
    # The webserver only queued the run; the daemon's run coordinator took it off the queue and
    # launched it (RUN_STARTING is reported by whoever launches the run).
    order = ["RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent", "RunSuccessEvent"]
    kinds = [event["__typename"] for event in sync_run.events]
    assert set(order) <= set(kinds), sorted(set(kinds))
    assert [kinds.index(kind) for kind in order] == sorted(kinds.index(kind) for kind in order), kinds


def test_each_materialization_shown_records_the_fetch_and_the_merge(dagster_dev: DagsterDev, sync_run: SyncRun) -> None:
    assert sync_run.run["status"] == "SUCCESS", describe_failure(sync_run.events)
    keys = [{"path": list(path)} for path in sorted(ASSET_PATHS)]
    nodes = dagster_dev.graphql(LATEST_MATERIALIZATIONS_QUERY, {"keys": keys})["assetNodes"]
    in_run = {
        tuple(event["assetKey"]["path"]): by_label(event["metadataEntries"])
        for event in sync_run.events
        if event["__typename"] == "MaterializationEvent"
    }

    assert set(in_run) == ALL_PATHS
    in_run = {path: metadata for path, metadata in in_run.items() if path in ASSET_PATHS}
    assert {tuple(node["assetKey"]["path"]) for node in nodes} == ASSET_PATHS
    for node in nodes:
        path = tuple(node["assetKey"]["path"])
        name = path[1]
        (latest,) = node["assetMaterializations"]
        assert latest["runId"] == sync_run.run_id, path
        metadata = by_label(latest["metadataEntries"])
        assert metadata == in_run[path], path
        records = expected_records(dagster_dev.account, name)
        pages = expected_pages(name, records)
        assert records > 0, name

        assert metadata["dagster/table_name"]["text"] == f"marketing.{name}"
        assert metadata["dagster/row_count"]["intValue"] == records, name
        schema = metadata["dagster/column_schema"]["schema"]["columns"]
        spec = RESOURCES_BY_NAME[name]
        assert [(c["name"], c["type"]) for c in schema] == [
            (column.name, column.sql_type) for column in (*spec.columns, *BOOKKEEPING_COLUMNS)
        ], name
        assert [c["name"] for c in schema if c["constraints"]["unique"]] == [spec.primary_key_column.name], name
        expected_integers = {
            "rows_inserted": records,  # a first sync into an empty table
            "rows_updated": 0,
            "rows_unchanged": 0,
            "records_fetched": records,
            "retries": 0,  # the simulator neither throttles nor fails here
            "throttled_429": 0,
        }
        assert {label: metadata[label]["intValue"] for label in expected_integers} == expected_integers, name
        fetched_pages, requests = metadata["pages"]["intValue"], metadata["requests"]["intValue"]
        if spec.paginated:
            # A full read walks from both ends: the page where they meet may be split in two,
            # and each end may spend a request learning that the other has passed it.
            assert fetched_pages in (pages, pages + 1), (name, fetched_pages, pages)
            assert fetched_pages <= requests <= pages + 3, (name, requests, pages)
        else:
            assert fetched_pages == requests == 1, (name, fetched_pages, requests)
        for label in ("fetch_seconds", "merge_seconds"):
            assert metadata[label]["__typename"] == "FloatMetadataEntry", (name, label)
            assert 0 <= metadata[label]["floatValue"] < RUN_SECONDS, (name, label)
        assert metadata["unknown_fields"]["text"] == "none", name
        if holds_personal_data(spec):
            assert metadata["preview"]["text"].startswith("none: its rows are contacts' personal data"), name
            continue
        assert metadata["preview"]["__typename"] == "MarkdownMetadataEntry", name
        header, rule, *rows = metadata["preview"]["mdStr"].strip().splitlines()
        assert header == "| " + " | ".join(c["name"] for c in schema) + " |", (name, header)
        assert set(rule) <= set("|-: "), (name, rule)
        assert len(rows) == min(5, records), (name, metadata["preview"]["mdStr"][:500])


def test_every_check_evaluated_in_the_run_passed_and_shows_as_latest(
    dagster_dev: DagsterDev, sync_run: SyncRun
) -> None:
    assert sync_run.run["status"] == "SUCCESS", describe_failure(sync_run.events)
    evaluations = [
        event["evaluation"] for event in sync_run.events if event["__typename"] == "AssetCheckEvaluationEvent"
    ]
    evaluated = {(tuple(e["assetKey"]["path"]), e["checkName"]) for e in evaluations}
    expected = (
        {(path, check) for path in ASSET_PATHS for check in SYNC_CHECKS}
        | {(path, check) for path, checks in REFERENCE_CHECKS.items() for check in checks}
        | {(path, check) for path, checks in NORMALIZED_CHECKS.items() for check in checks}
    )

    assert len(evaluations) == len(expected)
    assert evaluated == expected
    failed = [e for e in evaluations if not e["success"]]
    assert failed == [], json.dumps(failed, indent=2)[:4000]
    # What the asset pages show as each check's latest result.
    keys = [{"path": list(path)} for path in sorted(ALL_PATHS)]
    for node in dagster_dev.graphql(LATEST_MATERIALIZATIONS_QUERY, {"keys": keys})["assetNodes"]:
        for check in node["assetChecksOrError"]["checks"]:
            execution = check["executionForLatestMaterialization"]
            assert execution is not None, (node["assetKey"], check["name"])
            assert (execution["runId"], execution["status"], execution["evaluation"]["success"]) == (
                sync_run.run_id,
                "SUCCEEDED",
                True,
            ), (node["assetKey"], check["name"])


def test_after_the_sync_the_daemon_shows_every_asset_fresh(dagster_dev: DagsterDev, sync_run: SyncRun) -> None:
    assert sync_run.run["status"] == "SUCCESS", describe_failure(sync_run.events)
    # The daemon's freshness evaluator (enabled in dagster.yaml) turns each policy into a status
    # shortly after the materialization: wait for it (bounded).
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        nodes = dagster_dev.graphql(FRESHNESS_QUERY)["assetNodes"]
        every = {tuple(node["assetKey"]["path"]): node["freshnessStatusInfo"] for node in nodes}
        # webhook_events has no freshness policy: deliveries come when something changes.
        assert every.get(WEBHOOK_EVENTS_PATH, "absent") is None
        statuses = {path: info for path, info in every.items() if path != WEBHOOK_EVENTS_PATH}
        if set(statuses) == ALL_PATHS and all(
            info and info["freshnessStatus"] == "HEALTHY" for info in statuses.values()
        ):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"freshness not HEALTHY after {STARTUP_SECONDS:.0f}s: {statuses}\n{dagster_dev.log_tail()}")
        time.sleep(POLL_SECONDS)
    materialized = [info["freshnessStatusMetadata"]["lastMaterializedTimestamp"] for info in statuses.values()]
    assert all(time.time() - 3600 < stamp <= time.time() for stamp in materialized), materialized


def test_the_api_key_appears_nowhere_the_webserver_shows_the_run(dagster_dev: DagsterDev, sync_run: SyncRun) -> None:
    graphql = dagster_dev.graphql
    key = dagster_dev.api_key
    assert sync_run.run["status"] == "SUCCESS", describe_failure(sync_run.events)  # so the key was in use
    shown: dict[str, str] = {
        "run config and tags": json.dumps(graphql(RUN_QUERY, {"runId": sync_run.run_id})),
        "run logs": json.dumps(fetch_run_events(graphql, sync_run.run_id)),
    }
    file_keys = {event["fileKey"] for event in sync_run.events if event["__typename"] == "LogsCapturedEvent"}
    assert file_keys, "the run captured no stdout/stderr"
    captured = []
    for file_key in sorted(file_keys):
        logs = graphql(CAPTURED_LOGS_QUERY, {"runId": sync_run.run_id, "fileKey": file_key})
        logs = logs["runOrError"]["capturedLogs"]
        captured.append((logs["stdout"] or "") + (logs["stderr"] or ""))
        shown[f"captured stdout/stderr of {file_key}"] = json.dumps(logs)
    # What was searched is the steps' real output, e.g. the contacts step's progress line.
    assert any(f"contacts: {CONTACTS} records in" in text for text in captured), captured
    resources = graphql(RESOURCES_QUERY, {"selector": REPOSITORY_SELECTOR})["allTopLevelResourceDetailsOrError"]
    shown["resources"] = json.dumps(resources)

    leaks = [where for where, text in shown.items() if key in text]
    assert leaks == [], f"the API key is shown in: {leaks}"
    # The resource page names the variable instead of its value.
    assert resources["__typename"] == "ResourceDetailsList", resources
    api = {resource["name"]: resource for resource in resources["results"]}["marketing_api"]
    configured = {value["key"]: (value["type"], value["value"]) for value in api["configuredValues"]}
    assert configured["api_key"] == ("ENV_VAR", "MKT_API_KEY")
    # Nor in any answer fetched by any test of this module so far.
    leaked_answers = [answer[:300] for answer in graphql.answers if key in answer]
    assert leaked_answers == [], leaked_answers


def test_the_api_key_is_neither_stored_under_dagster_home_nor_printed_by_dagster_dev(
    dagster_dev: DagsterDev, sync_run: SyncRun
) -> None:
    key = dagster_dev.api_key.encode()
    assert sync_run.run["status"] == "SUCCESS", describe_failure(sync_run.events)
    stored = {path: path.read_bytes() for path in dagster_dev.home.rglob("*") if path.is_file()}

    # The run's event log (SQLite) and its captured stdout/stderr are stored as plain text, so a
    # byte search sees them (definition snapshots are compressed, and are covered by GraphQL).
    progress = f"contacts: {CONTACTS} records in".encode()
    assert any(path.suffix == ".db" and progress in data for path, data in stored.items()), sorted(stored)
    assert any(path.suffix == ".err" and progress in data for path, data in stored.items()), sorted(stored)
    assert [str(path) for path, data in stored.items() if key in data] == []
    assert key not in dagster_dev.log_path.read_bytes()
