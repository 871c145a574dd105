"""End to end on loopback: the real assets, Dagster and DuckDB against the bundled simulator."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, Column, ResourceSpec
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.settings import Settings
from mkt_assets.plumbing.private_files import AREA_LOCK_NAME, open_private_file, private_directory
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.conftest import materialization, materialize_marketing

API_KEY = "integration-secret-3f9a1c"
REPO = Path(__file__).resolve().parents[1]
SYNCED = [spec.name for spec in RESOURCES]
# What both jobs select: the synced resources and the normalized tables.
EVERYTHING = SYNCED + [table.name for table in NORMALIZED_TABLES]


@pytest.fixture(scope="module")
def account() -> SandboxData:
    return SandboxData(seed=7, contacts=1234)


@pytest.fixture()
def server(account: SandboxData) -> Iterator[SandboxServer]:
    with SandboxServer(account, api_key=API_KEY) as running:
        yield running


def resources(server: SandboxServer, database: str, **api_settings: Any) -> dict[str, Any]:
    return {
        "marketing_api": MarketingApiResource(
            base_url=server.base_url, api_key=API_KEY, backoff_factor=0, **api_settings
        ),
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database)),
        "warehouse": WarehouseResource(database=database),
    }


def expected_value(column: Column, value: Any) -> Any:
    if value is None:
        return None
    if column.member:  # an embedded object of which the table keeps one field
        return value.get(column.member)
    if column.fields:
        return [{member.name: item.get(member.api_name) for member in column.fields} for item in value]
    if column.duckdb_type == "TIMESTAMPTZ":
        return datetime.fromisoformat(value)
    return value


def expected_rows(spec: ResourceSpec, account: SandboxData) -> list[tuple[Any, ...]]:
    records = sorted(account.records(spec.name), key=lambda record: record[spec.primary_key])
    return [tuple(expected_value(column, record.get(column.api_name)) for column in spec.columns) for record in records]


def table_rows(database: str, spec: ResourceSpec, with_bookkeeping: bool = False) -> list[tuple[Any, ...]]:
    names = [column.name for column in spec.columns] + (["_extra", "_synced_at"] if with_bookkeeping else [])
    with connect(database, read_only=True) as connection:
        table = fully_qualified(connection, "marketing", spec.name)
        columns = ", ".join(f'"{name}"' for name in names)
        return connection.execute(f'SELECT {columns} FROM {table} ORDER BY "{spec.primary_key_column.name}"').fetchall()


@pytest.mark.slow  # a second or more: several real syncs
def test_every_record_of_every_resource_lands_field_for_field(
    server: SandboxServer, account: SandboxData, tmp_path: Path
) -> None:
    database = str(tmp_path / "sync.duckdb")

    result = materialize_marketing(EVERYTHING, resources(server, database))

    assert result.success
    checks = result.get_asset_check_evaluations()
    # Four per synced table (its history's included), one per reference, two per normalized table.
    references = sum(len(spec.references()) for spec in RESOURCES)
    assert len(checks) == 4 * len(RESOURCES) + references + 2 * len(NORMALIZED_TABLES)
    assert {(check.asset_key.path[-1], check.check_name) for check in checks} >= {
        ("enrollments", "contact_ids_exist"),
        ("memberships", "community_ids_exist"),
        ("contact_profiles", "one_row_per_live_contact"),
    }
    assert all(check.passed for check in checks)
    for spec in RESOURCES:
        assert table_rows(database, spec) == expected_rows(spec, account), spec.name
    assert account.count("contacts") == 1234
    contact_requests = [r for r in server.requests if r.path == "/api/contacts"]
    # Walked from both ends: ceil(1234 / 100) = 13 pages, and at most 3 requests more where
    # the ends meet (see MarketingApiClient._walk_from_both_ends).
    assert {r.query["order"] for r in contact_requests} == {"asc", "desc"}
    assert 13 <= len(contact_requests) <= 16
    assert all(r.headers.get("X-API-Key") == API_KEY for r in server.requests)
    assert [r.query for r in server.requests if r.path == "/api/contact_fields"] == [{}]


@pytest.mark.slow  # a second or more: several real syncs
def test_chunks_typed_during_the_fetch_land_the_same_rows_and_leave_no_file(
    server: SandboxServer, account: SandboxData, tmp_path: Path
) -> None:
    database = str(tmp_path / "sync.duckdb")
    staging = tmp_path / "staging"
    result = materialize_marketing(
        ["contacts"], resources(server, database, staging_dir=str(staging), staging_chunk_pages=4)
    )

    assert result.success
    metadata = materialization(result, "contacts")
    # 13 pages (14 if the two ends split the page where they met) in chunks of 4: all but
    # the last typed during the fetch, the last read as JSON.
    assert metadata["pages"] in (13, 14)
    assert (metadata["staging_chunks"], metadata["chunks_typed_during_fetch"]) == (4, 3)
    assert table_rows(database, RESOURCES_BY_NAME["contacts"]) == expected_rows(RESOURCES_BY_NAME["contacts"], account)
    # Nothing staged is left; only this process's area remains, with its lock, until it exits.
    assert [path for path in staging.rglob("*") if path.is_file() and path.name != AREA_LOCK_NAME] == []


@pytest.mark.slow  # a second or more: several real syncs
def test_a_second_sync_changes_nothing(server: SandboxServer, tmp_path: Path) -> None:
    database = str(tmp_path / "sync.duckdb")
    materialize_marketing(EVERYTHING, resources(server, database))
    before = {spec.name: table_rows(database, spec, with_bookkeeping=True) for spec in RESOURCES}

    second = materialize_marketing(EVERYTHING, resources(server, database))

    after = {spec.name: table_rows(database, spec, with_bookkeeping=True) for spec in RESOURCES}
    assert after == before
    for event in second.get_asset_materialization_events():
        if event.asset_key.path[-1] not in SYNCED:
            continue
        metadata = event.materialization.metadata
        assert metadata["rows_inserted"].value == 0 and metadata["rows_updated"].value == 0
        assert metadata["rows_unchanged"].value == metadata["dagster/row_count"].value


@pytest.mark.slow
def test_dagster_job_execute_runs_every_asset_in_one_step_in_its_own_process(
    server: SandboxServer, account: SandboxData, tmp_path: Path
) -> None:
    """The command a user runs: `dagster job execute -m mkt_assets.definitions -j marketing_sync`."""
    database = tmp_path / "job.duckdb"
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    environment = {
        **os.environ,
        "MKT_API_BASE_URL": server.base_url,
        "MKT_API_KEY": API_KEY,
        "MKT_DUCKDB_PATH": str(database),
        "DAGSTER_HOME": str(dagster_home),
    }
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"]

    outputs = []
    for _ in range(2):
        run = subprocess.run(command, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        outputs.append(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    log = "\n".join(outputs)
    # One step, in the job's own process: no step process pays Dagster's start-up again.
    assert log.count('STEP_START - Started execution of step "sync_marketing"') == 2
    assert "Launching subprocess" not in log and "Executing steps in process" in log
    assert "RUN_SUCCESS" in log and "lock" not in log.lower()
    for spec in RESOURCES:
        assert table_rows(str(database), spec) == expected_rows(spec, account), spec.name
    # The key is only ever a header: not in the output, the event log, nor the database.
    assert API_KEY not in log
    for path in [database, *dagster_home.rglob("*")]:
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_a_run_without_a_key_fails_at_once_in_one_line_naming_the_variable(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MKT_API_KEY", raising=False)
    monkeypatch.setenv("MKT_API_BASE_URL", server.base_url)
    monkeypatch.setenv("MKT_DUCKDB_PATH", str(tmp_path / "x.duckdb"))
    job = build_definitions().resolve_job_def("marketing_sync")

    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)

    (failure,) = result.get_step_failure_events()
    error = failure.event_specific_data.error  # type: ignore[union-attr]
    assert error.message.strip().splitlines() == [
        "dagster._core.definitions.events.Failure: No API key: set MKT_API_KEY to a key made in the account's profile settings."
    ]
    assert server.requests == [] and not (tmp_path / "x.duckdb").exists()


@pytest.mark.slow
def test_dg_launch_without_a_key_fails_naming_the_variable_not_in_dagsters_env_var_traceback(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "MKT_API_KEY"}
    environment.update({"MKT_DUCKDB_PATH": str(tmp_path / "x.duckdb"), "DAGSTER_HOME": str(tmp_path)})
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    run = subprocess.run(
        [str(Path(sys.executable).with_name("dg")), "launch", "--job", "marketing_sync"],
        env=environment,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Failure: No API key: set MKT_API_KEY to a key made in the account's profile settings." in output
    assert "PostProcessingError" not in output and "Warning" not in output
    assert not (tmp_path / "x.duckdb").exists()


def test_a_long_fetch_reports_its_progress_in_the_run_log(server: SandboxServer, tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()

    result = materialize_marketing(
        ["contacts"],
        resources(server, str(tmp_path / "p.duckdb")),
        settings=Settings(progress_interval_seconds=1e-9),
        instance=instance,
    )

    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    progress = [m for m in messages if "so far" in m]
    assert progress[0].startswith("contacts: 100 records in 1 pages so far (")
    assert "records/s" in progress[0]
    pages = materialization(result, "contacts")["pages"]
    assert progress[-1].startswith(f"contacts: 1234 records in {pages} pages so far")


@pytest.mark.slow  # a second or more: several real syncs
def test_materializations_explain_themselves(server: SandboxServer, tmp_path: Path) -> None:
    database = str(tmp_path / "m.duckdb")
    instance = dg.DagsterInstance.ephemeral()
    first = materialize_marketing(EVERYTHING, resources(server, database), instance=instance)

    second = materialize_marketing(EVERYTHING, resources(server, database), instance=instance)

    by_asset = {e.asset_key.path[-1]: e.materialization.metadata for e in second.get_asset_materialization_events()}
    contacts = by_asset["contacts"]
    assert contacts["dagster/row_count"].value == 1234
    assert contacts["dagster/table_name"].value == "marketing.contacts"
    assert [c.name for c in contacts["dagster/column_schema"].value.columns][:3] == ["id", "email", "registered_at"]
    assert contacts["requests"].value >= contacts["pages"].value >= 13 and contacts["retries"].value == 0
    assert 13 <= contacts["requests"].value <= 16 and contacts["records_fetched"].value == 1234
    assert contacts["throttled_429"].value == 0 and contacts["unknown_fields"].value == "none"
    assert contacts["paced_seconds"].value == 0  # the simulator's quota here is never spent
    assert contacts["fetch_seconds"].value > 0 and contacts["merge_seconds"].value > 0
    # No row of a table of people in Dagster's storage; the others' first rows are there.
    assert contacts["preview"].value.startswith("none: its rows are contacts' personal data")
    assert by_asset["tags"]["preview"].value.startswith("| id | name |")
    # Each asset's check compares with that asset's own previous materialization.
    for run, expected in ((first, {}), (second, {name: metadata["dagster/row_count"].value for name, metadata in by_asset.items()})):
        row_checks = {e.asset_key.path[-1]: e for e in run.get_asset_check_evaluations() if e.check_name == "row_count_not_dropping"}
        assert row_checks and set(row_checks) <= set(by_asset)
        for name, evaluation in row_checks.items():
            assert evaluation.metadata["previous_row_count"].value == expected.get(name, "none (first materialization)")
    assert row_checks["contacts"].metadata["previous_row_count"].value == 1234


@pytest.mark.slow
def test_overlapping_runs_of_the_job_both_succeed_on_one_database(server: SandboxServer, account: SandboxData, tmp_path: Path) -> None:
    """A scheduled run and a manual run at once: two writers of one DuckDB file."""
    database = tmp_path / "shared.duckdb"
    runs = []
    for name in ("scheduled", "manual"):
        home = tmp_path / name
        home.mkdir()
        environment = {**os.environ, "MKT_API_BASE_URL": server.base_url, "MKT_API_KEY": API_KEY,
                       "MKT_DUCKDB_PATH": str(database), "DAGSTER_HOME": str(home)}  # fmt: skip
        runs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"],
                env=environment, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        )
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert all("STEP_FAILURE" not in output for output in outputs)
    for spec in RESOURCES:
        assert table_rows(str(database), spec) == expected_rows(spec, account), spec.name


@pytest.mark.slow  # a second or more: several real syncs
def test_a_run_config_setting_one_option_keeps_every_other_setting_key_and_base_url_included(
    server: SandboxServer, account: SandboxData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launchpad (or a job's config) that set staging_dir reset base_url to production
    # and api_key to empty: the environment's values were lost.
    database = tmp_path / "configured.duckdb"
    monkeypatch.setenv("MKT_API_BASE_URL", server.base_url)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    monkeypatch.setenv("MKT_DUCKDB_PATH", str(database))
    job = build_definitions().resolve_job_def("marketing_sync")
    staging = tmp_path / "my-staging"

    result = job.execute_in_process(
        run_config={"resources": {"marketing_api": {"config": {"staging_dir": str(staging)}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )

    assert result.success
    assert staging.is_dir()
    assert {r.path for r in server.requests} >= {f"/api{spec.path}" for spec in RESOURCES}
    assert all(r.headers.get("X-API-Key") == API_KEY for r in server.requests)
    for spec in RESOURCES:
        assert len(table_rows(str(database), spec)) == account.count(spec.name)


@pytest.mark.slow  # a second or more: several real syncs
def test_a_read_timeout_set_in_run_config_bounds_a_dripping_answer(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MKT_API_BASE_URL", server.base_url)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    monkeypatch.setenv("MKT_DUCKDB_PATH", str(tmp_path / "dripped.duckdb"))
    server.add_fault(Fault("drip_body", path="/api/contacts", delay=0.05, times=-1))
    job = build_definitions().resolve_job_def("marketing_sync")
    started = time.monotonic()

    result = job.execute_in_process(
        run_config={"resources": {"marketing_api": {"config": {"read_timeout": 1.0, "max_retries": 0}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )

    assert time.monotonic() - started < 60
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == "sync_marketing"
    message = str(failure.event_specific_data.error)  # type: ignore[union-attr]
    assert "contacts: GET /api/contacts?limit=100&order=asc: timed out: no complete answer (headers and body)" in message
    assert "within read_timeout (1 s)" in message


def test_a_sync_reports_what_it_swept_and_what_the_rate_limiter_made_of_the_headers(
    account: SandboxData, tmp_path: Path
) -> None:
    staging = private_directory(tmp_path / "staging")
    dead = staging / "999999-0123456789abcdef"  # the area of a run killed mid-fetch
    dead.mkdir(mode=0o700)
    os.close(open_private_file(dead / AREA_LOCK_NAME, os.O_RDWR | os.O_CREAT))
    (dead / "mkt_contacts_00001_abcdefgh.ndjson").write_text("{}")
    instance = dg.DagsterInstance.ephemeral()

    # A window of an hour: never spent here, but its Refill is beyond the 120 s horizon.
    with SandboxServer(account, api_key=API_KEY, rate_limit=(10_000, 3600)) as server:
        settings = {"staging_dir": str(staging), "quota_state_dir": str(tmp_path / "quota")}
        result = materialize_marketing(["tags"], resources(server, str(tmp_path / "s.duckdb"), **settings), instance=instance)

    assert result.success
    assert not dead.exists()
    warnings = {entry.user_message for entry in instance.all_logs(result.run_id) if entry.level == logging.WARNING}
    infos = {entry.user_message for entry in instance.all_logs(result.run_id) if entry.level == logging.INFO}
    assert f"tags: removed 1 staging directories and files left by runs that died: {dead}" in infos
    assert any(
        re.fullmatch(r"X-RateLimit-Refill: \d+ is [\d.]+ min ahead, more than the 120 s horizon: treated as unknown", m)
        for m in warnings
    ), warnings


@pytest.mark.slow
def test_two_instances_overlapping_on_one_database_end_as_the_sync_that_began_last_read(tmp_path: Path) -> None:
    """A dev and a prod instance sync one account into one file. Dev begins first and reads a
    contact's tags while they are B; they go back to A; prod reads A (unchanged, so it writes
    nothing to that row) and lands; dev lands last. The table and its history stay as prod read."""
    account = SandboxData(seed=5, contacts=60)  # one page of contacts: one request reads them
    database = str(tmp_path / "shared.duckdb")
    instances = {}
    for name in ("dev", "prod"):
        home = tmp_path / name
        home.mkdir()
        (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
        instances[name] = dg.DagsterInstance.from_config(str(home))
    contact_id = account.contact_ids[0]
    tags_a, tags_b = [account.tag_ids[0]], [account.tag_ids[1]]
    with SandboxServer(account, api_key=API_KEY) as server:
        account.set_contact_tags(contact_id, tags_a)
        assert materialize_marketing(EVERYTHING, resources(server, database), instance=instances["prod"]).success
        account.set_contact_tags(contact_id, tags_b)
        server.add_fault(Fault("hold", path="/api/contacts"))  # dev's read of contacts, made now
        dev: dict[str, dg.ExecuteInProcessResult] = {}
        began_first = threading.Thread(
            target=lambda: dev.update(run=materialize_marketing(EVERYTHING, resources(server, database), instance=instances["dev"]))
        )
        began_first.start()
        try:
            assert server.wait_until_held(timeout=120)
            account.set_contact_tags(contact_id, tags_a)
            prod = materialize_marketing(EVERYTHING, resources(server, database), instance=instances["prod"])
        finally:
            server.release_held()
            began_first.join(timeout=300)

    assert prod.success and dev["run"].success
    assert {spec.name: table_rows(database, spec) for spec in RESOURCES} == {spec.name: expected_rows(spec, account) for spec in RESOURCES}
    with connect(database, read_only=True) as connection:
        history = connection.execute(
            "SELECT [tag.id FOR tag IN tags] FROM marketing.contacts_history WHERE id = ? ORDER BY _valid_from", [contact_id]
        ).fetchall()
    assert history == [(tags_a,)]
    for spec in RESOURCES:
        assert materialization(dev["run"], spec.name)["superseded_by_newer_read"] is True
        assert materialization(prod, spec.name)["superseded_by_newer_read"] is False
    warnings = [entry.user_message for entry in instances["dev"].all_logs(dev["run"].run_id) if entry.level == logging.WARNING]
    assert any(message.startswith("marketing.contacts: not written: a complete read of it that began at") for message in warnings)


def test_the_warehouse_is_configured_once_and_run_config_for_it_moves_the_write_and_the_checks_together(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    monkeypatch.setenv("MKT_API_BASE_URL", server.base_url)
    monkeypatch.setenv("MKT_DUCKDB_PATH", str(tmp_path / "from_the_environment.duckdb"))
    monkeypatch.setenv("MKT_RESOURCES", "tags")
    job = build_definitions().resolve_job_def("marketing_sync")
    # The IO manager declares no file of its own: the launchpad shows one place to set it.
    io_manager_fields = set(job.resource_defs["duckdb_io_manager"].config_schema.config_type.fields)  # type: ignore[union-attr]
    assert io_manager_fields == {"deletions"}
    elsewhere = tmp_path / "from_the_launchpad.duckdb"

    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"resources": {"warehouse": {"config": {"database": str(elsewhere)}}}},
    )

    assert result.success
    assert not (tmp_path / "from_the_environment.duckdb").exists()
    with connect(str(elsewhere)) as connection:
        assert connection.execute("SELECT count(*) FROM marketing.tags").fetchone() == (server.data.count("tags"),)
    # The checks read the same file: the row count check saw the tags the write landed.
    checks = result.get_asset_check_evaluations()
    tags_checks = [c for c in checks if c.asset_key == dg.AssetKey(["marketing", "tags"])]
    assert tags_checks and all(c.passed for c in tags_checks)
    (counted,) = [c for c in tags_checks if c.check_name == "row_count_not_dropping"]
    assert counted.metadata["row_count"].value == server.data.count("tags")
