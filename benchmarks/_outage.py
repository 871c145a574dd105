"""The outage and kill scenarios of issue 23: what a failed run costs once the next resumes it.

- outage: a clean sync, then a sync during which the API answers 503 to every request for
  ``outage_seconds`` starting ``outage_at`` seconds in (set and cleared through the
  simulator's ``/__sandbox/faults``); it fails once its retries run out, and is run again
  (as Dagster's retry would) until one succeeds. Printed: requests and wall time of the failed
  runs plus the one that finished, against the clean sync, and whether the tables are equal.
- kill: ``kills`` syncs killed with SIGKILL (the whole process group) at a random moment of
  their fetch, then one that finishes; the same comparison.

Each sync is ``dagster job execute -j marketing_sync`` with a fresh DAGSTER_HOME, into the
scenario's own DuckDB file; the simulator paces at ``rate`` requests a second (its rate limit,
which the job's pacer follows).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb
import requests

JOB = [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"]


def _admin(base_url: str, method: str, what: str, body: Any = None) -> Any:
    root = base_url.rsplit("/api", 1)[0]
    answer = requests.request(method, f"{root}/__sandbox/{what}", json=body, timeout=60)
    answer.raise_for_status()
    return answer.json()


def requests_seen(base_url: str) -> int:
    """The API requests the simulator answered since the last call (its log is then cleared)."""
    count = len([r for r in _admin(base_url, "GET", "requests")["requests"] if r["path"].startswith("/api/")])
    _admin(base_url, "DELETE", "requests")
    return count


def _sync(run_dir: Path, env: Mapping[str, str], database: Path, base_url: str, kill_at_request: int | None = None) -> dict[str, Any]:
    """One sync; with ``kill_at_request``, killed (SIGKILL, its whole process group) once the
    simulator has answered that many of its requests: a moment inside its fetch."""
    run_dir.mkdir(parents=True)
    home = run_dir / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    child_env = {**env, "MKT_API_BASE_URL": base_url, "MKT_DUCKDB_PATH": str(database), "DAGSTER_HOME": str(home)}
    started = time.monotonic()
    with open(run_dir / "output.log", "wb") as log:
        process = subprocess.Popen(JOB, env=child_env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed_at = None
        while kill_at_request is not None and process.poll() is None:
            if _answered(base_url) >= kill_at_request:
                os.killpg(process.pid, signal.SIGKILL)
                killed_at = time.monotonic() - started
                break
            time.sleep(0.2)
        returncode = process.wait()
    result = {"seconds": time.monotonic() - started, "ok": returncode == 0, "requests": requests_seen(base_url),
              "resumed": _resumed(run_dir / "output.log")}  # fmt: skip
    if kill_at_request is not None:
        result["killed_at"] = killed_at
    return result


def _answered(base_url: str) -> int:
    return len([r for r in _admin(base_url, "GET", "requests")["requests"] if r["path"].startswith("/api/")])


def _resumed(log: Path) -> int:
    """Pages the run resumed, summed over its resources, from the lines its log says it in."""
    found = re.findall(r"resuming the read run \S+ left \((\d+) pages", log.read_text(errors="replace"))
    return sum(int(pages) for pages in set(found))


def _tables(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every synced table; of the columns saying when a sync ran, only whether each is set."""
    when = {"_synced_at", "_deleted_at", "_valid_from", "_valid_to"}
    found = {}
    with duckdb.connect(str(database), read_only=True) as connection:
        names = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'marketing' AND NOT starts_with(table_name, '_mkt_')"
        ).fetchall()]  # fmt: skip
        for name in names:
            columns = [row[0] for row in connection.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'marketing' AND table_name = ?"
                " ORDER BY ordinal_position", [name]).fetchall()]  # fmt: skip
            chosen = ", ".join(f'"{column}" IS NULL' if column in when else f'"{column}"' for column in columns)
            found[name] = connection.execute(f'SELECT {chosen} FROM marketing."{name}" ORDER BY ALL').fetchall()
    return found


def run_outage(root: Path, env: Mapping[str, str], base_url: str, outage_at: float, outage_seconds: float, attempts: int = 8) -> dict[str, Any]:
    clean_db = root / "clean.duckdb"
    requests_seen(base_url)
    clean = _sync(root / "clean", env, clean_db, base_url)
    database = root / "outage.duckdb"
    timers = [
        threading.Timer(outage_at, _admin, (base_url, "POST", "faults", [{"kind": "status", "status": 503, "times": -1}])),
        threading.Timer(outage_at + outage_seconds, _admin, (base_url, "DELETE", "faults")),
    ]
    for timer in timers:
        timer.start()
    runs = []
    try:
        for attempt in range(attempts):
            runs.append(_sync(root / f"outage-{attempt}", env, database, base_url))
            if runs[-1]["ok"]:
                break
    finally:
        for timer in timers:
            timer.cancel()
        _admin(base_url, "DELETE", "faults")
    equal = runs[-1]["ok"] and clean["ok"] and _tables(database) == _tables(clean_db)
    return {"clean": clean, "runs": runs, "equal": equal}


def run_kills(root: Path, env: Mapping[str, str], base_url: str, kills: int, seed: int = 23) -> dict[str, Any]:
    clean_db = root / "clean-k.duckdb"
    requests_seen(base_url)
    clean = _sync(root / "clean-k", env, clean_db, base_url)
    chooser = random.Random(seed)
    database = root / "killed.duckdb"
    runs = []
    # A random moment of each run's fetch: after a random share of the requests a clean sync
    # would still need, given what the runs before have read (which it resumes).
    read = 0
    for attempt in range(kills):
        remaining = max(2, clean["requests"] - read)
        at = chooser.randint(1, remaining - 1)
        runs.append({**_sync(root / f"killed-{attempt}", env, database, base_url, kill_at_request=at), "kill_at_request": at})
        read += runs[-1]["requests"]
    runs.append(_sync(root / "after-kills", env, database, base_url))
    equal = runs[-1]["ok"] and clean["ok"] and _tables(database) == _tables(clean_db)
    return {"clean": clean, "runs": runs, "equal": equal}


def report(name: str, result: dict[str, Any]) -> list[str]:
    clean, runs = result["clean"], result["runs"]
    total_requests = sum(run["requests"] for run in runs)
    total_seconds = sum(run["seconds"] for run in runs)
    lines = [f"{name}: clean sync {clean['requests']} requests, {clean['seconds']:.1f} s"]
    for number, run in enumerate(runs, start=1):
        killed = run.get("killed_at") is not None
        what = "killed" if killed else "finished" if run["ok"] else "failed"
        at = f" at {run['killed_at']:.1f} s (its request {run['kill_at_request']})" if killed else ""
        lines.append(f"  run {number}: {what}{at}, {run['requests']} requests, {run['seconds']:.1f} s, {run['resumed']} pages resumed")
    lines.append(
        f"  all runs: {total_requests} requests ({total_requests / max(1, clean['requests']):.3f} x clean),"
        f" {total_seconds:.1f} s of runs; tables equal to the clean sync: {'yes' if result['equal'] else 'NO'}"
    )
    return lines


# ============================================================ with the daemon (issue 23's third target)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AUTO_RETRY_TAG = "dagster/auto_retry_run_id"  # set by the daemon on a run it retried: the retry's id
# The schedules must not launch runs of their own during the scenario: once a year, on a day
# the scenario does not run into.
NEVER_DURING_THE_SCENARIO = "0 0 1 1 *"


def run_daemon_outage(
    root: Path, env: Mapping[str, str], base_url: str, clean: dict[str, Any], clean_db: Path,
    outage_at: float, outage_seconds: float, deadline_seconds: float,
) -> dict[str, Any]:
    """The project as a user runs it: a Dagster home with the project's dagster.yaml, the daemon
    (``dagster-daemon run`` on the project's workspace, as ``dg dev`` starts it), one
    ``marketing_sync`` launched through it, and an outage of ``outage_seconds`` from
    ``outage_at`` seconds after that run started. Nobody touches anything after that: the runs are
    followed through the daemon's ``dagster/auto_retry_run_id`` tags until one succeeds, one
    fails without a retry, or ``deadline_seconds`` pass."""
    import uuid

    import dagster as dg

    home = root / "daemon-home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    database = root / "daemon.duckdb"
    child_env = {
        **env, "DAGSTER_HOME": str(home), "MKT_API_BASE_URL": base_url, "MKT_DUCKDB_PATH": str(database),
        "MKT_SYNC_CRON": NEVER_DURING_THE_SCENARIO, "MKT_INCREMENTAL_CRON": NEVER_DURING_THE_SCENARIO,
    }  # fmt: skip
    instance = dg.DagsterInstance.from_config(str(home))
    requests_seen(base_url)
    with open(root / "daemon.log", "wb") as log:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
            cwd=home, env=child_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    first = str(uuid.uuid4())
    launched = time.time()
    timers = [
        threading.Timer(outage_at, _admin, (base_url, "POST", "faults", [{"kind": "status", "status": 503, "times": -1}])),
        threading.Timer(outage_at + outage_seconds, _admin, (base_url, "DELETE", "faults")),
    ]
    chain = [first]
    try:
        subprocess.run(
            [str(BIN / "dagster"), "job", "launch", "-w", str(REPO / "workspace.yaml"), "-j", "marketing_sync", "--run-id", first],
            cwd=home, env=child_env, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        # The outage is timed from the run's start, not its launch: the queue and the run
        # worker's start take seconds of their own.
        while time.time() - launched < deadline_seconds:
            record = instance.get_run_record_by_id(first)
            if record is not None and (record.start_time is not None or record.dagster_run.is_finished):
                break
            time.sleep(0.5)
        for timer in timers:
            timer.start()
        while time.time() - launched < deadline_seconds:
            run = instance.get_run_by_id(chain[-1])
            if run is not None and run.status == dg.DagsterRunStatus.SUCCESS:
                break
            if run is not None and run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
                if AUTO_RETRY_TAG in run.tags:
                    chain.append(run.tags[AUTO_RETRY_TAG])
                    continue
                if run.tags.get("dagster/will_retry") == "false" or run.status == dg.DagsterRunStatus.CANCELED:
                    break
            time.sleep(2)
    finally:
        for timer in timers:
            timer.cancel()
        _admin(base_url, "DELETE", "faults")
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    answered = _admin(base_url, "GET", "requests")["requests"]
    requests_seen(base_url)
    runs = []
    for run_id in chain:
        record = instance.get_run_record_by_id(run_id)
        if record is None:
            break
        started, ended = record.start_time or launched, record.end_time or time.time()
        runs.append({
            "run_id": run_id, "status": record.dagster_run.status.value, "seconds": ended - started,
            "started_after": started - launched, "ended_after": ended - launched,
            "ok": record.dagster_run.status == dg.DagsterRunStatus.SUCCESS,
            "requests": sum(1 for r in answered if r["path"].startswith("/api/") and started <= r["at"] <= ended),
            "resumed": _resumed_in(instance, run_id),
        })  # fmt: skip
    equal = bool(runs) and runs[-1]["ok"] and _tables(database) == _tables(clean_db)
    return {"clean": clean, "runs": runs, "equal": equal, "wall": time.time() - launched,
            "requests": sum(1 for r in answered if r["path"].startswith("/api/"))}  # fmt: skip


def _resumed_in(instance: Any, run_id: str) -> int:
    """Pages a run resumed, from the lines its event log says it in."""
    found = set()
    for entry in instance.all_logs(run_id):
        found.update(re.findall(r"resuming the read run \S+ left \((\d+) pages", entry.user_message or ""))
    return sum(int(pages) for pages in found)


def report_daemon(name: str, result: dict[str, Any]) -> list[str]:
    clean, runs = result["clean"], result["runs"]
    lines = [f"{name}: clean sync {clean['requests']} requests, {clean['seconds']:.1f} s"]
    for number, run in enumerate(runs, start=1):
        lines.append(
            f"  run {number} ({'launched' if number == 1 else f'retry {number - 1}, by the daemon'}): {run['status']},"
            f" {run['started_after']:.0f}-{run['ended_after']:.0f} s after the launch, {run['requests']} requests,"
            f" {run['resumed']} pages resumed"
        )
    lines.append(
        f"  in all: {result['requests']} requests ({result['requests'] / max(1, clean['requests']):.3f} x clean),"
        f" {result['wall']:.0f} s from the launch to the end; nobody touched it; tables equal to the clean sync:"
        f" {'yes' if result['equal'] else 'NO'}"
    )
    return lines
