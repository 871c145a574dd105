"""Within one Dagster instance, two syncs of one warehouse never run at once: the second waits
QUEUED (as the UI shows it) until the first has finished, through the project's dagster.yaml
(``concurrency.pools``) and the pool of the sync step.

The real thing, in processes: a Dagster home holding the project's dagster.yaml, the daemon
(``dagster-daemon run``, whose run queue decides), two runs submitted with ``dagster job
launch`` as the UI's Materialize or a schedule would, and the simulator as the API.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.assets import warehouse_pool
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets_tests.test_ui import DAILY_CRON, REPO, stop_process_group

API_KEY = "queue-secret-3c9e1f"
BIN = Path(sys.executable).parent
DEADLINE_SECONDS = 240.0


def wait_for(what: str, condition: Callable[[], bool], log: Path, seconds: float = DEADLINE_SECONDS) -> None:
    """Poll ``condition`` until it holds, failing with the daemon's log past the deadline."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"{what}: not within {seconds:.0f}s; the daemon's log ends:\n{tail}")
        time.sleep(0.5)  # polling another process's state, with a deadline


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """A Dagster home with the project's instance settings, its daemon, and the simulator."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    database = tmp_path / "queued.duckdb"
    log = tmp_path / "daemon.log"
    with SandboxServer(SandboxData(seed=3, contacts=60), api_key=API_KEY) as server:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
        environment.update(
            DAGSTER_HOME=str(home),
            MKT_API_BASE_URL=server.base_url,
            MKT_API_KEY=API_KEY,
            MKT_DUCKDB_PATH=str(database),
            # The schedules never fire during the test (their runs would join the queue).
            MKT_SYNC_CRON=DAILY_CRON,
            MKT_INCREMENTAL_CRON=DAILY_CRON,
            PYTHONUNBUFFERED="1",
        )
        for name, value in environment.items():
            if name == "DAGSTER_HOME" or name.startswith("MKT_"):
                monkeypatch.setenv(name, value)
        with open(log, "wb") as output:
            daemon = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                cwd=home, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            yield database, environment, log
        finally:
            stop_process_group(daemon)  # type: ignore[arg-type]


def launch(environment: dict[str, str], run_id: str) -> None:
    """Submit a run of the full sync to the instance, as the UI's Materialize does: it is queued."""
    subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "marketing_sync", "--run-id", run_id],
        cwd=environment["DAGSTER_HOME"], env=environment, check=True, capture_output=True, timeout=DEADLINE_SECONDS,
    )  # fmt: skip


@pytest.mark.slow
def test_a_second_sync_of_the_same_warehouse_stays_queued_until_the_first_has_finished(
    home: tuple[Path, dict[str, str], Path],
) -> None:
    database, environment, log = home
    instance = dg.DagsterInstance.get()
    first, second = "0f1a7c3e-0000-4000-8000-000000000001", "0f1a7c3e-0000-4000-8000-000000000002"

    def status(run_id: str) -> dg.DagsterRunStatus | None:
        run = instance.get_run_by_id(run_id)
        return run.status if run else None

    # The file held here keeps the first run in progress (its write waits for the file) for as
    # long as the test needs.
    with connect(str(database)):
        launch(environment, first)
        wait_for("the first run started", lambda: status(first) == dg.DagsterRunStatus.STARTED, log)
        launch(environment, second)
        blocked = re.compile(rf"Run {second} is blocked by global concurrency limits: .*{warehouse_pool(str(database))}")
        wait_for("the daemon held the second run back", lambda: bool(blocked.search(log.read_text(errors="replace"))), log)

        assert status(second) == dg.DagsterRunStatus.QUEUED
        assert status(first) == dg.DagsterRunStatus.STARTED

    finished = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    wait_for("both runs finished", lambda: status(first) in finished and status(second) in finished, log)
    assert (status(first), status(second)) == (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.SUCCESS)
    records = {record.dagster_run.run_id: record for record in instance.get_run_records(dg.RunsFilter(run_ids=[first, second]))}
    assert records[first].end_time is not None and records[second].start_time is not None
    assert records[second].start_time >= records[first].end_time


def test_the_sync_step_is_in_the_pool_of_its_warehouse_file(tmp_path: Path) -> None:
    database = str(tmp_path / "my warehouse.duckdb")
    job = build_definitions(Settings(duckdb_path=database)).resolve_job_def("marketing_sync")

    (pool,) = {node.definition.pool for node in job.graph.node_dict.values()}
    assert pool == warehouse_pool(database)
    assert re.fullmatch(r"mkt_warehouse_my_warehouse\.duckdb_[0-9a-f]{8}", pool)
    assert warehouse_pool(str(tmp_path / "other" / "my warehouse.duckdb")) != pool


def test_the_projects_instance_settings_allow_one_run_of_a_pool_at_a_time(tmp_path: Path) -> None:
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    pools = dg.DagsterInstance.from_config(str(tmp_path)).get_concurrency_config().pool_config
    assert (pools.pool_granularity.value if pools.pool_granularity else None, pools.default_pool_limit) == ("run", 1)
