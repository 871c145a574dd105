"""Dagster retries a failed sync by itself, later, and only when running it again can mend what
failed: the jobs' run-retry tags, the project's instance settings, which error is which, and the
instance's own decision (the ``dagster/will_retry`` tag the daemon acts on) for real runs of the
real job against the simulator."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from mkt_assets.core.errors import (
    ApiAccessError,
    ApiAuthError,
    ApiConnectionError,
    ApiError,
    ApiResponseError,
    ApiStatusError,
    ApiValidationError,
    ConfigurationError,
    ForeignTableError,
    InboxBusyError,
    InboxError,
    InboxUnavailableError,
    MassDeletion,
    MassDeletionError,
    PaginationError,
    PrivateDirectoryError,
    PrivateFileError,
    StagingError,
    SyncError,
    WarehouseBusyError,
    WarehouseFileError,
    WarehouseWriteError,
    is_retriable,
)
from mkt_assets.core.setting_names import SettingNames
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.run_retries import (
    MAX_RETRIES_TAG,
    MAX_RETRY_DELAY_SECONDS,
    NOT_RETRIED_TAG,
    can_mend,
    retry_delay,
    retry_wait_reason,
)
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run.sync import FetchFailed
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.warehouse.commit import MissingTableError
from mkt_assets_tests.daemon import Daemon, event_messages, project_settings, run_worker_pid

REPO = Path(__file__).resolve().parents[1]
API_KEY = "retry-secret-71b4c2"
WILL_RETRY_TAG = "dagster/will_retry"  # set by the instance as a run's failure is stored
CONTACTS_PATH = "/api/contacts"


def project_instance_settings() -> dict[str, object]:
    return yaml.safe_load((REPO / "dagster.yaml").read_text())


def test_both_jobs_carry_the_run_retry_tags_of_the_settings(tmp_path: Path) -> None:
    defs = build_definitions(Settings(duckdb_path=str(tmp_path / "w.duckdb"), run_retries=5))
    for name in ("marketing_sync", "marketing_incremental"):
        job = defs.resolve_job_def(name)
        # Both: a schedule takes a run's tags from run_tags, `dagster job launch` from tags.
        for tags in (job.tags, job.run_tags):
            assert tags[MAX_RETRIES_TAG] == "5"
            # The whole (one-step) sync again, which resumes: "from failure" has nothing to run
            # when the step succeeded and the run died after it.
            assert tags["dagster/retry_strategy"] == "ALL_STEPS"
    assert build_definitions(Settings(duckdb_path=str(tmp_path / "w.duckdb"))).resolve_job_def(
        "marketing_sync"
    ).run_tags[MAX_RETRIES_TAG] == "3"


def test_the_retry_settings_come_from_the_environment_and_refuse_what_makes_no_sense() -> None:
    settings = Settings.from_environment({"MKT_RUN_RETRIES": "0", "MKT_RUN_RETRY_DELAY_SECONDS": "30"})
    assert (settings.run_retries, settings.run_retry_delay_seconds) == (0, 30.0)
    with pytest.raises(ConfigurationError, match=re.escape("MKT_RUN_RETRIES must be a whole number, got '2.5'")):
        Settings.from_environment({"MKT_RUN_RETRIES": "2.5"})
    with pytest.raises(ConfigurationError, match=r"MKT_RUN_RETRIES must be 0 \(never retried\) or more, got -1"):
        Settings.from_environment({"MKT_RUN_RETRIES": "-1"})
    with pytest.raises(ConfigurationError, match="MKT_RUN_RETRY_DELAY_SECONDS must be zero or more"):
        Settings.from_environment({"MKT_RUN_RETRY_DELAY_SECONDS": "-5"})


def test_each_retry_waits_twice_as_long_as_the_one_before_up_to_half_an_hour() -> None:
    settings = Settings(run_retry_delay_seconds=120)
    assert [retry_delay(settings, number) for number in (1, 2, 3)] == [120, 240, 480]
    # A 10-minute outage that fails a run is over before the third retry of three starts.
    assert sum(retry_delay(settings, number) for number in (1, 2, 3)) > 600
    assert retry_delay(settings, 10) == MAX_RETRY_DELAY_SECONDS


def test_a_retry_says_why_it_waits_naming_the_setting_only_where_its_reader_sets_it() -> None:
    own = retry_wait_reason(Settings(run_retry_delay_seconds=120), 240)
    assert own.startswith("240 s after it failed (MKT_RUN_RETRY_DELAY_SECONDS = 120, doubled for each retry")
    instance = retry_wait_reason(Settings(run_retry_delay_seconds=120, setting_names=SettingNames("acme")), 240)
    assert instance.startswith("240 s after it failed (120, doubled for each retry") and "MKT_" not in instance


def test_the_projects_instance_settings_turn_run_retries_on_for_the_jobs_alone(tmp_path: Path) -> None:
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.run_retries_enabled
    # The bound is the jobs' own tag: a run without it (another job's) is not retried.
    assert instance.run_retries_max_retries == 0
    assert instance.run_retries_retry_on_asset_or_op_failure
    # The daemon that retries runs is among those dg dev / dagster-daemon start for this instance.
    assert "EVENT_LOG_CONSUMER" in instance.get_required_daemon_types()


def api_error(cls: type[ApiError], *args: object) -> ApiError:
    return cls("contacts", CONTACTS_PATH, {"limit": 100}, *args)  # type: ignore[arg-type]


def status_error(status: int) -> ApiStatusError:
    return ApiStatusError("contacts", CONTACTS_PATH, None, status, f"HTTP {status}")


OUTAGE = status_error(503)
REJECTED = api_error(ApiAuthError, "HTTP 401: the API key was rejected")
# Every error the project raises, and whether a retry may mend it.
CLASSIFIED: list[tuple[SyncError, bool]] = [
    (ConfigurationError("MKT_DELETIONS must be 'mark' or 'delete'"), False),
    (PrivateDirectoryError("not yours"), False),
    (PrivateFileError("not yours"), False),
    (WarehouseFileError("not a DuckDB database"), False),
    (ForeignTableError("not created by mkt_assets"), False),
    (InboxError("the webhook inbox: not a webhook inbox"), False),
    (api_error(ApiError, "redirected to another origin"), False),
    (REJECTED, False),
    (ApiAccessError("memberships", "/api/community/memberships", None, 403, "HTTP 403"), False),
    (ApiValidationError("contacts", CONTACTS_PATH, None, [], "bad startingAfter"), False),
    (api_error(ApiResponseError, "page 3: the body has no 'items'"), False),
    (api_error(PaginationError, "the cursor did not advance"), False),
    (StagingError("record 51 cannot hold 'yesterday'"), False),
    (MassDeletionError((MassDeletion("marketing.contacts", 0, 50, 50, "mark"),), 0.1, 5), False),
    (MissingTableError("contact_tags reads contacts, never synced"), False),
    (FetchFailed({"contacts": OUTAGE, "tags": REJECTED}, [], []), False),
    (OUTAGE, True),
    (status_error(429), True),
    (status_error(500), True),
    (api_error(ApiConnectionError, "no complete answer: ConnectionResetError"), True),
    (WarehouseBusyError("stayed locked"), True),
    (WarehouseWriteError("No space left on device"), True),
    (InboxUnavailableError("the webhook inbox: database or disk is full"), True),
    (InboxBusyError("the webhook inbox: held for more than 10 s"), True),
    (FetchFailed({"contacts": OUTAGE, "tags": api_error(ApiConnectionError, "timed out")}, ["communities"], []), True),
]


def every_subclass(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *every_subclass(direct)}}


def test_every_error_the_project_raises_is_either_retriable_or_not() -> None:
    assert {type(error) for error, _ in CLASSIFIED} == every_subclass(SyncError)
    assert [(type(error).__name__, is_retriable(error)) for error, _ in CLASSIFIED] == [
        (type(error).__name__, retriable) for error, retriable in CLASSIFIED
    ]
    assert status_error(400).retriable is False  # any other status fails a retry alike


def test_a_failure_the_step_says_must_not_be_retried_is_not_and_anything_unforeseen_is() -> None:
    assert not can_mend(dg.Failure(description="No API key: set MKT_API_KEY", allow_retries=False))
    assert can_mend(dg.Failure(description="something else"))
    assert can_mend(KeyError("a bug may be a crash that passes"))
    assert can_mend(dg.DagsterExecutionInterruptedError())  # SIGTERM: the run ends Failure
    assert can_mend(None)


# ------------------------------------------------- the instance's decision, for runs of the real job


@pytest.fixture()
def simulator() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData(seed=4, contacts=250), api_key=API_KEY) as server:
        yield server


@pytest.fixture()
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(overrides={"run_retries": project_instance_settings()["run_retries"]}) as made:
        yield made


def run_the_job(
    server: SandboxServer, instance: dg.DagsterInstance, database: Path, tags: dict[str, str] | None = None
) -> dg.DagsterRun:
    """A run of marketing_sync (contacts alone), as the daemon would see it once it ended."""
    settings = Settings(duckdb_path=str(database), resources=("contacts",))
    job = build_definitions(settings).resolve_job_def("marketing_sync")
    api = {"base_url": server.base_url, "api_key": API_KEY, "backoff_factor": 0, "order": "asc"}
    result = job.execute_in_process(
        run_config={"resources": {"marketing_api": {"config": api}}},
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )
    run = instance.get_run_by_id(result.run_id)
    assert run is not None
    return run


def test_a_sync_failed_by_an_outage_is_left_for_the_daemon_to_retry(
    simulator: SandboxServer, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    simulator.add_fault(Fault("status", path=CONTACTS_PATH, status=503, times=-1))
    run = run_the_job(simulator, instance, tmp_path / "w.duckdb")
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert (run.tags[WILL_RETRY_TAG], run.tags[MAX_RETRIES_TAG]) == ("true", "3")
    assert NOT_RETRIED_TAG not in run.tags


def test_a_sync_failed_by_a_rejected_key_is_not_retried_and_says_so(
    simulator: SandboxServer, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    simulator.add_fault(Fault("status", path=CONTACTS_PATH, status=401, times=-1))
    run = run_the_job(simulator, instance, tmp_path / "w.duckdb")
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert (run.tags[WILL_RETRY_TAG], run.tags[MAX_RETRIES_TAG], run.tags[NOT_RETRIED_TAG]) == ("false", "0", run.run_id)
    said = [entry.user_message for entry in instance.all_logs(run.run_id) if "Not retried automatically" in entry.user_message]
    assert said == [
        "Not retried automatically: running the sync again would fail the same way (contacts: ApiAuthError)."
        " Do what the error says, then launch the sync again."
    ]


@pytest.mark.slow  # a second or more: several real syncs
def test_a_mass_deletion_refused_is_not_retried(simulator: SandboxServer, instance: dg.DagsterInstance, tmp_path: Path) -> None:
    database = tmp_path / "w.duckdb"
    assert run_the_job(simulator, instance, database).status == dg.DagsterRunStatus.SUCCESS
    # An outage answering an empty list: the refusal is the IO manager's, after the step's body.
    simulator.add_fault(Fault("empty", path=CONTACTS_PATH, times=-1))
    run = run_the_job(simulator, instance, database)
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert (run.tags[WILL_RETRY_TAG], run.tags[MAX_RETRIES_TAG]) == ("false", "0")


def test_a_run_re_executed_from_one_not_retried_is_retried_again_on_an_outage(
    simulator: SandboxServer, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    simulator.add_fault(Fault("status", path=CONTACTS_PATH, status=503, times=-1))
    # The UI's Re-execute copies the failed run's tags, its 0 retries among them.
    inherited = {MAX_RETRIES_TAG: "0", NOT_RETRIED_TAG: "the-run-a-401-failed"}
    run = run_the_job(simulator, instance, tmp_path / "w.duckdb", tags=inherited)
    assert (run.tags[WILL_RETRY_TAG], run.tags[MAX_RETRIES_TAG]) == ("true", "3")


# ----------------------------------------------------------------------- with the real daemon

# Longer than a retry takes to start (so the step does wait), short enough for a short test.
TEST_RETRY_DELAY_SECONDS = 8.0


def retrying_daemon(
    simulator: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: str
) -> tuple[Daemon, Path]:
    """The daemon on the project's workspace, syncing contacts alone from ``simulator`` into
    the DuckDB file it also returns, and retrying failed runs after a short delay."""
    database = tmp_path / "retried.duckdb"
    environment = {
        **project_settings(simulator, API_KEY, database),
        "MKT_RESOURCES": "contacts",
        "MKT_RUN_RETRY_DELAY_SECONDS": str(TEST_RETRY_DELAY_SECONDS),
        # The retry daemon looks for failed runs every second instead of every five.
        "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
        **settings,
    }
    return Daemon(tmp_path, monkeypatch, environment), database


def api_config(config: dict[str, object]) -> dict[str, object]:
    return {"resources": {"marketing_api": {"config": config}}}


@pytest.mark.slow
def test_the_daemon_retries_a_sync_failed_by_an_outage_after_a_wait_and_not_one_failed_by_a_rejected_key(
    simulator: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, _ = retrying_daemon(simulator, tmp_path, monkeypatch)
    instance, run, ended = daemon.instance, daemon.run, daemon.ended
    # One ascending walk with no backoff: a fault's count is the requests of one run.
    config: dict[str, object] = {"backoff_factor": 0, "order": "asc"}

    def launch(run_id: str) -> None:
        daemon.launch("marketing_sync", run_id, api_config(config))

    def wait_for(what: str, condition: Callable[[], bool]) -> None:
        daemon.wait_for(what, condition)

    rejected, outage = "7d2e0c41-0000-4000-8000-000000000001", "7d2e0c41-0000-4000-8000-000000000002"
    with daemon:
        simulator.add_fault(Fault("status", path=CONTACTS_PATH, status=401, times=-1))
        launch(rejected)
        wait_for("the run with the rejected key failed", lambda: ended(rejected))
        assert run(rejected).status == dg.DagsterRunStatus.FAILURE

        # An outage longer than one run's own retries (a request and 3 retries), over by the retry.
        simulator.clear_faults()
        simulator.add_fault(Fault("status", path=CONTACTS_PATH, status=503, times=4))
        launch(outage)
        wait_for("the run in the outage failed", lambda: ended(outage))
        assert run(outage).status == dg.DagsterRunStatus.FAILURE
        wait_for("the daemon retried it", lambda: "dagster/auto_retry_run_id" in run(outage).tags)
        retry = run(outage).tags["dagster/auto_retry_run_id"]
        wait_for("the retry ended", lambda: ended(retry))

    assert run(retry).status == dg.DagsterRunStatus.SUCCESS
    assert (run(retry).parent_run_id, run(retry).tags["dagster/retry_number"]) == (outage, "1")
    # The retry waited the delay after the failure before its first request.
    failed_at = instance.get_run_record_by_id(outage).end_time  # type: ignore[union-attr]
    assert failed_at is not None
    first_request = min(a.at for a in simulator.arrivals if a.path == CONTACTS_PATH and a.at > failed_at)
    assert first_request >= failed_at + TEST_RETRY_DELAY_SECONDS
    waited = [e.user_message for e in instance.all_logs(retry) if e.user_message.startswith("Automatic retry 1 of run")]
    assert len(waited) == 1 and f"run {outage}: waiting" in waited[0]
    # The daemon weighed the rejected run's failure before the later one: it was not retried.
    assert run(rejected).tags[WILL_RETRY_TAG] == "false"
    assert "dagster/auto_retry_run_id" not in run(rejected).tags
    assert [r.run_id for r in instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": rejected}))] == []


@pytest.mark.slow
def test_a_sync_whose_worker_is_killed_is_failed_by_dagster_and_retried_by_the_daemon_from_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kill -9 (the OOM killer, a crash) leaves no failure of the run's own to store: the code
    # server that started the worker finds it gone and fails the run, and the daemon retries
    # that like any other failure; the retry resumes what the killed run had staged.
    contacts_pages = 30
    with SandboxServer(SandboxData(seed=5, contacts=contacts_pages * 100), api_key=API_KEY, latency=0.1) as simulator:
        daemon, database = retrying_daemon(simulator, tmp_path, monkeypatch, MKT_RUN_RETRY_DELAY_SECONDS="1")
        killed = "7d2e0c41-0000-4000-8000-000000000003"

        def contact_pages() -> int:
            return sum(1 for a in simulator.arrivals if a.path == CONTACTS_PATH)

        with daemon:
            daemon.launch("marketing_sync", killed, api_config({"order": "asc"}))
            daemon.wait_for("the run read a third of the contacts", lambda: contact_pages() >= contacts_pages // 3)
            pid = run_worker_pid(daemon.instance, killed)
            assert pid is not None
            os.kill(pid, 9)
            daemon.wait_for("the killed run was failed", lambda: daemon.ended(killed))
            daemon.wait_for("the daemon retried it", lambda: "dagster/auto_retry_run_id" in daemon.run(killed).tags)
            retry = daemon.run(killed).tags["dagster/auto_retry_run_id"]
            daemon.wait_for("the retry ended", lambda: daemon.ended(retry))

        assert daemon.run(killed).status == dg.DagsterRunStatus.FAILURE
        crash = [message for message in event_messages(daemon.instance, killed) if "terminated by signal 9 (SIGKILL)" in message]
        assert crash, "the run's failure says its process died"
        assert daemon.run(retry).status == dg.DagsterRunStatus.SUCCESS
        materialized = daemon.instance.get_latest_materialization_event(dg.AssetKey(["marketing", "contacts"]))
        assert materialized is not None and materialized.run_id == retry
        metadata = materialized.asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["resumed_from_run"].value == killed
        # The retry read only what the killed run's last checkpoint had not saved.
        resumed = metadata["pages_resumed"].value
        assert isinstance(resumed, int) and resumed >= 1
        retry_started = daemon.instance.get_run_record_by_id(retry).start_time  # type: ignore[union-attr]
        assert retry_started is not None
        read_by_the_retry = sum(1 for a in simulator.arrivals if a.path == CONTACTS_PATH and a.at >= retry_started)
        assert read_by_the_retry <= contacts_pages - resumed + 1
        with duckdb.connect(str(database), read_only=True) as connection:
            landed = connection.execute("SELECT count(*), count(DISTINCT id) FROM marketing.contacts").fetchone()
        assert landed == (contacts_pages * 100, contacts_pages * 100)
