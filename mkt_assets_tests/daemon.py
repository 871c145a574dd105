"""The real run queue, for the tests that go through it: ``dagster-daemon run`` on a workspace,
in a Dagster home of its own holding the project's dagster.yaml; runs submitted with ``dagster
job launch`` as the UI's Materialize or a schedule would (stored Queued, launched by the
daemon); and what the instance stores of them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import dagster as dg
import pytest

from mkt_assets.sandbox import SandboxServer
from mkt_assets_tests.test_ui import DAILY_CRON, stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEADLINE_SECONDS = 240.0
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def wait_for(what: str, condition: Callable[[], bool], log: Path, seconds: float = DEADLINE_SECONDS) -> None:
    """Poll ``condition`` until it holds, failing with the end of ``log`` past the deadline."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"{what}: not within {seconds:.0f}s; the daemon's log ends:\n{tail}")
        time.sleep(0.5)  # polling another process's state, with a deadline


def project_settings(simulator: SandboxServer, api_key: str, database: Path) -> dict[str, str]:
    """The ``MKT_*`` variables of this project's own account syncing ``simulator`` into
    ``database``; its schedules never fire during a test (their runs would join the queue)."""
    return {
        "MKT_API_BASE_URL": simulator.base_url,
        "MKT_API_KEY": api_key,
        "MKT_DUCKDB_PATH": str(database),
        "MKT_SYNC_CRON": DAILY_CRON,
        "MKT_INCREMENTAL_CRON": DAILY_CRON,
    }


class Daemon:
    """``dagster-daemon run`` on ``workspace`` (default: the project's own), in a Dagster home
    under ``root`` with the project's dagster.yaml; ``environment`` is the code's settings (the
    ``MKT_*`` variables, a component's key variables), which the daemon, its code server and
    every run worker see. This process's DAGSTER_HOME is that home, so ``instance`` is the
    daemon's instance."""

    def __init__(
        self,
        root: Path,
        monkeypatch: pytest.MonkeyPatch,
        environment: Mapping[str, str],
        workspace: Path = REPO / "workspace.yaml",
    ) -> None:
        self.home = root / "dagster_home"
        self.home.mkdir()
        shutil.copy(REPO / "dagster.yaml", self.home / "dagster.yaml")
        self.workspace = workspace
        self.log = root / "daemon.log"
        self.environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
        self.environment.update(DAGSTER_HOME=str(self.home), PYTHONUNBUFFERED="1", **environment)
        monkeypatch.setenv("DAGSTER_HOME", str(self.home))
        self.instance = dg.DagsterInstance.get()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)],
                cwd=self.home, env=self.environment, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def __exit__(self, *_: object) -> None:
        assert self.process is not None
        stop_process_group(self.process)

    def launch(self, job: str, run_id: str, config: Mapping[str, object] | None = None) -> None:
        """Submit a run of ``job``: stored Queued, for the daemon to launch."""
        subprocess.run(
            [str(BIN / "dagster"), "job", "launch", "-w", str(self.workspace), "-j", job, "--run-id", run_id,
             *(["--config-json", json.dumps(config)] if config else [])],
            cwd=self.home, env=self.environment, check=True, capture_output=True, timeout=DEADLINE_SECONDS,
        )  # fmt: skip

    def run(self, run_id: str) -> dg.DagsterRun:
        found = self.instance.get_run_by_id(run_id)
        assert found is not None, f"no run {run_id} in the instance"
        return found

    def status(self, run_id: str) -> dg.DagsterRunStatus | None:
        found = self.instance.get_run_by_id(run_id)
        return found.status if found else None

    def ended(self, run_id: str) -> bool:
        return self.status(run_id) in FINISHED

    def wait_for(self, what: str, condition: Callable[[], bool], seconds: float = DEADLINE_SECONDS) -> None:
        wait_for(what, condition, self.log, seconds)


# ------------------------------------------------------------------- what the instance stores


def event_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What the run's log says: engine events (the worker's start, its crash) carry theirs in
    the event, not in ``user_message``."""
    return [e.user_message or (e.dagster_event.message if e.dagster_event else "") or "" for e in instance.all_logs(run_id)]


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the engine event the code server writes as it starts it."""
    for message in event_messages(instance, run_id):
        found = re.search(r"Started process for run \(pid: (\d+)\)", message)
        if found:
            return int(found.group(1))
    return None


def event_types(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEventType]:
    """The run's Dagster events, in order: RUN_ENQUEUED as it is submitted, RUN_STARTING as the
    daemon takes it off the queue to launch it, RUN_START, ..."""
    return [entry.dagster_event.event_type for entry in instance.all_logs(run_id) if entry.dagster_event]


def held_back_by_its_pool(instance: dg.DagsterInstance, queued: str, holder: str, later: str, pool: str) -> None:
    """Assert, from the instance alone, that the daemon held ``queued`` back for ``pool``:
    it stays Queued, never taken off the queue, while ``holder`` of the same pool is in progress, though
    the daemon has launched ``later``, submitted after it (each pass of the daemon's queue takes
    every queued run, so the pass that launched ``later`` weighed ``queued`` too)."""
    runs = {run_id: instance.get_run_by_id(run_id) for run_id in (queued, holder, later)}
    assert all(runs.values()), runs
    record = {run_id: instance.get_run_record_by_id(run_id) for run_id in (queued, later)}
    assert record[queued].create_timestamp < record[later].create_timestamp  # type: ignore[union-attr]
    assert runs[holder].status == dg.DagsterRunStatus.STARTED  # type: ignore[union-attr]
    assert runs[later].status != dg.DagsterRunStatus.QUEUED  # type: ignore[union-attr]
    assert dg.DagsterEventType.RUN_STARTING in event_types(instance, later)
    assert runs[queued].status == dg.DagsterRunStatus.QUEUED  # type: ignore[union-attr]
    held = event_types(instance, queued)
    assert dg.DagsterEventType.RUN_ENQUEUED in held and dg.DagsterEventType.RUN_STARTING not in held, held
    # The two are in one pool, and the instance lets one run of a pool in progress at a time.
    for run_id in (queued, holder):
        concurrency = runs[run_id].run_op_concurrency  # type: ignore[union-attr]
        assert concurrency is not None and concurrency.all_pools == {pool}, (run_id, concurrency)
    pools = instance.get_concurrency_config().pool_config
    assert (pools.pool_granularity.value if pools.pool_granularity else None, pools.default_pool_limit) == ("run", 1)
