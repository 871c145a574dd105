"""Within one Dagster instance, two syncs of one warehouse never run at once: the second waits
QUEUED (as the UI shows it) until the first has finished, through the project's dagster.yaml
(``concurrency.pools``) and the pool of the sync step, which is the warehouse file's.

The real thing, in processes (see ``daemon``): the daemon, whose run queue decides, runs
submitted as the UI's Materialize or a schedule would, and the simulator as the API.
"""

from __future__ import annotations

import re
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.assets import warehouse_pool
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets_tests.daemon import REPO, Daemon, held_back_by_its_pool, project_settings
from mkt_assets_tests.test_component import add_instance, fresh_dg_project, stored_ids
from mkt_assets_tests.test_ui import DAILY_CRON

API_KEY = "queue-secret-3c9e1f"


@pytest.mark.slow
def test_a_second_sync_of_the_same_warehouse_stays_queued_until_the_first_has_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "queued.duckdb"
    first, second = "0f1a7c3e-0000-4000-8000-000000000001", "0f1a7c3e-0000-4000-8000-000000000002"
    with SandboxServer(SandboxData(seed=3, contacts=60), api_key=API_KEY) as server:
        daemon = Daemon(tmp_path, monkeypatch, project_settings(server, API_KEY, database))
        status = daemon.status
        with daemon:
            # The file held here keeps the first run in progress (its write waits for the file)
            # for as long as the test needs.
            with connect(str(database)):
                daemon.launch("marketing_sync", first)
                daemon.wait_for("the first run started", lambda: status(first) == dg.DagsterRunStatus.STARTED)
                daemon.launch("marketing_sync", second)
                blocked = re.compile(rf"Run {second} is blocked by global concurrency limits: .*{warehouse_pool(str(database))}")
                daemon.wait_for("the daemon held the second run back", lambda: bool(blocked.search(daemon.log.read_text(errors="replace"))))

                assert status(second) == dg.DagsterRunStatus.QUEUED
                assert status(first) == dg.DagsterRunStatus.STARTED

            daemon.wait_for("both runs finished", lambda: daemon.ended(first) and daemon.ended(second))
    assert (status(first), status(second)) == (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.SUCCESS)
    records = {record.dagster_run.run_id: record for record in daemon.instance.get_run_records(dg.RunsFilter(run_ids=[first, second]))}
    assert records[first].end_time is not None and records[second].start_time is not None
    assert records[second].start_time >= records[first].end_time


@pytest.mark.slow
def test_two_component_instances_writing_one_file_queue_behind_each_other_and_one_with_a_file_of_its_own_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three accounts in a project of the user's own: acme and globex write one file (each its
    # own schema), initech a file of its own. The pool is the file's: globex waits for acme,
    # initech waits for nobody.
    shared, own = tmp_path / "shared.duckdb", tmp_path / "own.duckdb"
    files = {"acme": shared, "globex": shared, "initech": own}
    project = fresh_dg_project(tmp_path / "project", "accounts")
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {"load_from": [{"python_module": {"module_name": "accounts.definitions", "working_directory": str(project), "location_name": "accounts"}}]}
        )
    )
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(SandboxServer(SandboxData(seed=20 + index, contacts=40), api_key=f"{name}-key-{index}"))
            for index, name in enumerate(files)
        }
        for name, server in servers.items():
            add_instance(project, name, base_url=server.base_url, database=str(files[name]), sync_cron=DAILY_CRON, incremental_cron=DAILY_CRON)
        keys = {f"{name.upper()}_API_KEY": f"{name}-key-{index}" for index, name in enumerate(files)}
        daemon = Daemon(tmp_path, monkeypatch, keys, workspace)
        status = daemon.status
        with daemon:
            with connect(str(shared)):  # keeps acme's sync in progress: its write waits for the file
                daemon.launch("acme_sync", first)
                daemon.wait_for("acme's sync started", lambda: status(first) == dg.DagsterRunStatus.STARTED)
                daemon.launch("globex_sync", second)
                daemon.launch("initech_sync", third)
                daemon.wait_for("initech's sync, submitted last, was launched", lambda: status(third) != dg.DagsterRunStatus.QUEUED)

                held_back_by_its_pool(daemon.instance, second, first, third, warehouse_pool(str(shared)))
                assert daemon.run(third).run_op_concurrency.all_pools == {warehouse_pool(str(own))}  # type: ignore[union-attr]

            daemon.wait_for("every run finished", lambda: all(daemon.ended(run_id) for run_id in (first, second, third)))

    assert [status(run_id) for run_id in (first, second, third)] == [dg.DagsterRunStatus.SUCCESS] * 3
    records = {record.dagster_run.run_id: record for record in daemon.instance.get_run_records(dg.RunsFilter(run_ids=[first, second]))}
    assert records[first].end_time is not None and records[second].start_time is not None
    assert records[second].start_time >= records[first].end_time
    for name, server in servers.items():
        assert stored_ids(files[name], name, "contacts") == sorted(server.data.contact_ids)
        assert stored_ids(files[name], name, "tags") == sorted(server.data.tag_ids)


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
