"""Benchmark the marketing sync against the bundled simulator and check the issues' targets:
the six of the first (T1-T6) and those of "a lean run, well ahead of dlt" (N1-N3), for which
dlt's rest_api source runs as an anchor beside the job, in a venv of its own.

    python benchmarks/run.py --sizes 100000 1000000 --repeat 3
    python benchmarks/run.py --quick            # a small smoke run: does the script work?

The simulator always runs in its own process (``mkt-assets sandbox``), and every measured
piece of work runs in a fresh child process, so each process's peak resident set is its own.
Seconds are medians over ``--repeat`` runs; peaks are maxima. Progress goes to stderr, the
machine description and one result table to stdout (``--json`` also writes every raw run).
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outage
import _webhooks
from _dlt_env import (
    DAGSTER_DLT_REQUIREMENTS,
    DEFAULT_DAGSTER_DLT_VENV,
    DEFAULT_VENV,
    DLT_REQUIREMENTS,
    VenvFailed,
    ensure_venv,
    installed_versions,
)
from _measure import (
    ChildFailed,
    Measured,
    ProcessRecord,
    Simulator,
    describe_machine,
    run_measured,
    simulator,
)

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 100

# The targets.
SIMULATOR_RATIO_MAX = 1.2  # 1: median page time at 1M / at 10k
THROUGHPUT_RATIO_MAX = 1.2  # 2: contacts asset / bare loop over the contact pages
END_TO_END_SLACK = 1.25  # 3: job <= fixed cost + 1.25 x bare loop (every resource)
PEAK_MB_MAX = 300.0  # 4: every process of a sync at the largest size
PEAK_GROWTH_MAX = 1.25  # 4: peak at the largest size / at the next smaller one
MERGE_SHARE_MAX = 0.15  # 5: merge / asset time when re-syncing unchanged contacts
HISTORY_FIRST_SYNC_MAX = 1.20  # H1: contacts asset into a fresh file, with history / without
HISTORY_RESYNC_MAX = 1.10  # H2: the unchanged re-sync, with history / without
LATENCY_RATIO_MAX = 1.15  # 6: job <= 1.15 x (contact pages x latency) + fixed cost

# The lean run's targets ("A lean run: ... well ahead of dlt").
FIXED_SYNC_MAX_SECONDS = 4.0  # N1a: marketing_sync against an empty account
FIXED_INCREMENTAL_MAX_SECONDS = 5.0  # N1b: marketing_incremental with nothing new, per size
FIXED_OVER_FLOOR_MAX_SECONDS = 0.5  # issue 24: N1a - Dagster's floor for its shape
INCREMENTAL_OVER_FLOOR_MAX_SECONDS = 1.5  # issue 26: N1b - the same floor (the same assets and checks)
BARE_SLACK_SECONDS = 3.0  # N2a: job <= bare loop (every resource) + 3 s, per size
DLT_WALL_RATIO_MAX = 0.65  # N2b: job wall / dlt-parquet wall, per size
DLT_CPU_RATIO_MAX = 1.0  # N2c: job CPU / dlt CPU (whole process trees), per size
# N3 is T4's check (PEAK_MB_MAX, PEAK_GROWTH_MAX) over the full and the incremental runs.

SYNC_JOB = "marketing_sync"
INCREMENTAL_JOB = "marketing_incremental"
# The contacts asset, found by key in the event log whatever step materialized it: the job's
# step layout changes (one step per asset today, one multi-asset step tomorrow).
CONTACTS_ASSET = ("marketing", "contacts")
CONTACTS_METADATA = ("fetch_seconds", "merge_seconds", "pages", "records_fetched", "dagster/row_count")
JOB_PROCESS = "job process (dagster job execute)"


def job_command(job: str) -> list[str]:
    return [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", job]


FLOOR_DEFS = Path(__file__).resolve().parent / "_dagster_floor_defs.py"


def floor_command() -> list[str]:
    return [sys.executable, "-m", "dagster", "job", "execute", "-f", str(FLOOR_DEFS), "-j", SYNC_JOB]


# The same floor loaded as the project's definitions are (``dg.load_from_defs_folder`` over a dg
# project's defs folder): what Dagster's components framework adds to each process that loads
# them (pyproject.toml read with tomlkit, the component tree, the JSON schema of every component
# type registered in the environment). This package's is one of them, as in any dg project of an
# environment that has it installed: its model alone, which imports neither DuckDB nor requests
# nor the project's definitions (before that was so, this floor imported the whole project).
FLOOR_PROJECT_FILES = {
    "pyproject.toml": (
        '[project]\nname = "floor_project"\nversion = "0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "floor_project"\ncode_location_target_module = "floor_project.definitions"\n'
    ),
    "floor_project/__init__.py": "",
    # Loaded once per process, as the project's are: `dagster job execute` calls defs() five times.
    "floor_project/definitions.py": (
        "import functools\nfrom pathlib import Path\n\nimport dagster as dg\n\n\n@dg.definitions\n@functools.cache\n"
        "def defs() -> dg.Definitions:\n    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
    ),
    "floor_project/defs/__init__.py": "",
    "floor_project/defs/floor/definitions.py": (
        f"import runpy\n\ndefs = runpy.run_path({str(FLOOR_DEFS)!r})[\"defs\"]\n"
    ),
}


def write_floor_project(bench: Bench) -> Path:
    root = bench.root / "floor_project"
    for name, text in FLOOR_PROJECT_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def floor_project_command() -> list[str]:
    return [sys.executable, "-m", "dagster", "job", "execute", "-m", "floor_project.definitions", "-j", SYNC_JOB]


# The shape of marketing_sync (its assets and checks), read from the project's definitions in a
# child, so that this process stays free of the project's imports.
_SHAPE_SCRIPT = """
import json, sys
from mkt_assets.definitions import defs
# The sync job's own shape: the graph also holds assets no sync selects (webhook_events).
layer = defs().resolve_job_def("marketing_sync").asset_layer
graph = layer.asset_graph
shape = {
    "assets": sorted(key.to_user_string() for key in layer.executable_asset_keys),
    "checks": sorted([key.asset_key.to_user_string(), key.name] for key in graph.asset_check_keys),
    # The lineage too: Dagster reads each upstream asset's latest materialization as it records one.
    "deps": {key.to_user_string(): sorted(parent.to_user_string() for parent in graph.get(key).parent_keys)
             for key in layer.executable_asset_keys},
}
json.dump(shape, open(sys.argv[1], "w"))
"""


def write_floor_shape(bench: Bench) -> Path:
    path = bench.root / "floor_shape.json"
    if not path.exists():
        subprocess.run([sys.executable, "-c", _SHAPE_SCRIPT, str(path)], env=bench.env, check=True, timeout=120)
    return path


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def label(contacts: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if contacts >= scale and contacts % scale == 0:
            return f"{contacts // scale}{unit}"
    return str(contacts)


def median(values: Iterable[float | None]) -> float:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else math.nan


def bench_json(measured: Measured) -> dict[str, Any]:
    """The ``BENCH_JSON {...}`` line a child script printed."""
    for line in reversed(measured.log().splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise ChildFailed(f"no BENCH_JSON line in {measured.log_path}")


# ===================================================================== the context of a run


@dataclass
class Bench:
    """Where runs write, the key the simulators accept, and the children's environment."""

    root: Path
    api_key: str
    env: dict[str, str]
    pace_requests: bool = True
    dlt_python: Path | None = None  # the dlt venv's interpreter, once it is ready
    dagster_dlt_python: Path | None = None  # dagster-dlt's venv's, likewise (optional part)
    counter: int = 0
    errors: list[str] = field(default_factory=list)  # runs that failed, with their log's tail

    def run_dir(self, name: str) -> Path:
        self.counter += 1
        path = self.root / "runs" / f"{self.counter:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def start_simulator(self, contacts: int, latency: float = 0.0) -> AbstractContextManager[Simulator]:
        progress(f"starting the simulator: {contacts} contacts, latency {latency * 1000:g} ms")
        return simulator(contacts, latency=latency, api_key=self.api_key, log_dir=self.root / "logs", env=self.env)


def compile_bytecode(*directories: Path) -> None:
    """Compile every module under ``directories`` to bytecode, as pip compiles an installed
    package's (Dagster's among them) at install. An editable install's modules are compiled
    at their first import instead, unless PYTHONDONTWRITEBYTECODE is set, as it may be where the
    benchmark runs: every process would then compile the project's modules again (a tenth to a
    quarter of a second a process, measured) and none of Dagster's, which no deployment pays."""
    for directory in directories:
        if not compileall.compile_dir(str(directory), quiet=1):
            raise RuntimeError(f"{directory}: a module does not compile")


def project_package() -> Path:
    spec = importlib.util.find_spec("mkt_assets")
    assert spec is not None and spec.submodule_search_locations, "mkt_assets is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def make_bench(root: Path, pace_requests: bool) -> Bench:
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    env = dict(os.environ)
    # Staging files and the rate limiter's quota files land in the work directory and go with it.
    env["TMPDIR"] = str(tmp)
    env.pop("MKT_API_KEY", None)
    return Bench(root=root, api_key=secrets.token_urlsafe(18), env=env, pace_requests=pace_requests)


# ===================================================================== target 1: the simulator


def _session(api_key: str) -> requests.Session:
    session = requests.Session()
    session.headers.update({"X-API-Key": api_key, "Accept": "application/json"})
    return session


def middle_cursors(session: requests.Session, base_url: str, count: int) -> list[int]:
    """``count`` cursors spread over the middle half of the id range (ids need not be live)."""
    url = f"{base_url}/contacts"
    first = session.get(url, params={"limit": 10, "order": "asc"}).json()["items"][0]["id"]
    last = session.get(url, params={"limit": 10, "order": "desc"}).json()["items"][0]["id"]
    span = last - first
    return [int(first + span * (0.25 + 0.5 * i / max(1, count - 1))) for i in range(count)]


def timed_page(session: requests.Session, base_url: str, cursor: int) -> float:
    started = time.perf_counter()
    response = session.get(
        f"{base_url}/contacts", params={"limit": PAGE_SIZE, "order": "asc", "startingAfter": cursor}
    )
    body = response.content
    seconds = time.perf_counter() - started
    if response.status_code != 200 or len(json.loads(body)["items"]) != PAGE_SIZE:
        raise ChildFailed(f"the simulator answered {response.status_code} or a short page at cursor {cursor}")
    return seconds


def probe_simulators(sims: Sequence[Simulator], api_key: str, requests_each: int, block: int = 25) -> dict[str, Any]:
    """Median client-side time of one page of 100 contacts, from each simulator.

    The simulators take turns in blocks, so a burst of load from elsewhere on the machine
    falls on both sizes rather than on one."""
    sessions = {sim.contacts: _session(api_key) for sim in sims}
    cursors = {sim.contacts: middle_cursors(sessions[sim.contacts], sim.base_url, requests_each) for sim in sims}
    for sim in sims:  # warm up: connection, the simulator's first-request costs
        for cursor in cursors[sim.contacts][:20]:
            timed_page(sessions[sim.contacts], sim.base_url, cursor)
    times: dict[int, list[float]] = {sim.contacts: [] for sim in sims}
    for start in range(0, requests_each, block):
        for sim in sims:
            for cursor in cursors[sim.contacts][start : start + block]:
                times[sim.contacts].append(timed_page(sessions[sim.contacts], sim.base_url, cursor))
    for session in sessions.values():
        session.close()
    return {str(contacts): {"median_ms": median(values) * 1000, "seconds": values} for contacts, values in times.items()}


def run_simulator_probe(bench: Bench, sizes: Sequence[int], requests_each: int) -> dict[str, Any]:
    small, large = sizes
    with bench.start_simulator(small) as sim_small, bench.start_simulator(large) as sim_large:
        progress(f"target 1: {requests_each} page requests from the middle of the id range, {label(small)} vs {label(large)}")
        result = probe_simulators([sim_small, sim_large], bench.api_key, requests_each)
    return {"sizes": [small, large], "requests_each": requests_each, "results": result}


# ===================================================================== measured runs


def run_bare_loop(bench: Bench, sim: Simulator, timeout: float) -> dict[str, Any]:
    run_dir = bench.run_dir(f"bare-{label(sim.contacts)}")
    measured = run_measured(
        [sys.executable, str(HERE / "_bare_loop.py"), sim.base_url],
        env={**bench.env, "MKT_API_KEY": bench.api_key},
        cwd=run_dir,
        log_path=run_dir / "output.log",
        timeout=timeout,
        simulator_pid=sim.pid,
    )
    return {**bench_json(measured), **process_summary(measured, {measured.pid: "bare loop"})}


def run_asset(
    bench: Bench, sim: Simulator, database: Path, timeout: float, name: str, history: bool = True
) -> dict[str, Any]:
    run_dir = bench.run_dir(f"{name}-{label(sim.contacts)}")
    command = [sys.executable, str(HERE / "_asset_runner.py"), "--base-url", sim.base_url, "--database", str(database)]
    if not bench.pace_requests:
        command.append("--no-pace")
    if not history:
        command.append("--no-history")
    measured = run_measured(
        command,
        env={**bench.env, "MKT_API_KEY": bench.api_key},
        cwd=run_dir,
        log_path=run_dir / "output.log",
        timeout=timeout,
        simulator_pid=sim.pid,
    )
    report = bench_json(measured)
    report["process_seconds"] = measured.seconds
    return {**report, **process_summary(measured, {measured.pid: "asset runner"})}


# Dagster stores run events under their old names (PIPELINE_SUCCESS for RUN_SUCCESS).
RUN_SUCCESS = ("RUN_SUCCESS", "PIPELINE_SUCCESS")
STEP_EVENTS = (*RUN_SUCCESS, "STEP_START", "STEP_SUCCESS")


def read_run_events(dagster_home: Path) -> list[dict[str, Any]]:
    """The run's event log, from the SQLite files of its (fresh) DAGSTER_HOME.

    The job's console output is not enough: step processes print concurrently to one
    stream and lines go missing, while the event log has every event with its time and pid."""
    events = []
    for database in sorted((dagster_home / "history" / "runs").glob("*-*.db")):  # <run id>.db
        with closing(sqlite3.connect(database)) as connection:
            rows = connection.execute(
                "SELECT event FROM event_logs WHERE dagster_event_type IN"
                f" ({', '.join('?' * len(STEP_EVENTS))}, 'ASSET_MATERIALIZATION') ORDER BY id",
                STEP_EVENTS,
            ).fetchall()
        events.extend(json.loads(row[0]) for row in rows)
    return events


def count_run_events(dagster_home: Path) -> dict[str, int]:
    """How many events the run wrote (Dagster's per-run cost grows with them), and of them its
    materializations and check evaluations."""
    counts = {"events": 0, "materializations": 0, "check_evaluations": 0}
    for database in sorted((dagster_home / "history" / "runs").glob("*-*.db")):
        with closing(sqlite3.connect(database)) as connection:
            for kind, count in connection.execute("SELECT dagster_event_type, count(*) FROM event_logs GROUP BY 1"):
                counts["events"] += count
                if kind == "ASSET_MATERIALIZATION":
                    counts["materializations"] += count
                elif kind == "ASSET_CHECK_EVALUATION":
                    counts["check_evaluations"] += count
    return counts


def materialization_metadata(event: dict[str, Any]) -> dict[str, Any]:
    materialization = event["dagster_event"]["event_specific_data"]["materialization"]
    metadata = {}
    for entry in materialization.get("metadata_entries", []):
        data = entry.get("entry_data", {})
        metadata[entry["label"]] = data.get("value", data.get("text"))
    return metadata


def materialized_asset(event: dict[str, Any]) -> tuple[str, ...]:
    materialization = event["dagster_event"]["event_specific_data"]["materialization"]
    return tuple((materialization.get("asset_key") or {}).get("path") or ())


def summarize_job_events(events: list[dict[str, Any]], started_at: float, ended_at: float) -> dict[str, Any]:
    """Which pid ran which steps, each step's duration, the contacts asset's own timings, and
    the job's timeline: start-up until the first step, the step that materialized contacts,
    what came after it. Step keys are whatever the job has: nothing here names one."""
    kinds = [event["dagster_event"]["event_type_value"] for event in events]
    if not set(RUN_SUCCESS) & set(kinds):
        raise ChildFailed("the job's event log has no RUN_SUCCESS")
    # A pid may run several steps: with the in-process executor, the job process runs all.
    step_pids: dict[int, list[str]] = {}
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    step_seconds: dict[str, float] = {}
    summary: dict[str, Any] = {}
    for event, kind in zip(events, kinds, strict=True):
        step: str = event.get("step_key") or ""  # run-level events have none
        if kind == "STEP_START":
            step_pids.setdefault(int(event["dagster_event"]["pid"]), []).append(step)
            starts[step] = event["timestamp"]
        elif kind == "STEP_SUCCESS" and step in starts:
            step_seconds[step] = event["timestamp"] - starts[step]
            ends[step] = event["timestamp"]
        elif kind == "ASSET_MATERIALIZATION" and materialized_asset(event) == CONTACTS_ASSET:
            summary["contacts_step"] = step
            summary["contacts_materialized_seconds"] = event["timestamp"] - started_at
            metadata = materialization_metadata(event)
            for key in CONTACTS_METADATA:
                summary[key.split("/")[-1]] = metadata.get(key)
    if starts:
        summary["startup_seconds"] = min(starts.values()) - started_at
    contacts_step = summary.get("contacts_step")
    if contacts_step in ends:
        summary["contacts_step_seconds"] = step_seconds[contacts_step]
        summary["after_contacts_seconds"] = ended_at - ends[contacts_step]
    return {"step_pids": step_pids, "step_seconds": step_seconds, **summary}


# The child process a step starts for its DuckDB work (mkt_assets/plumbing/lean_process.py).
LEAN_PROCESS_MODULE = "mkt_assets.plumbing.lean_process"


def step_names(steps: Sequence[str]) -> str:
    return steps[0] if len(steps) == 1 else f"{len(steps)} steps ({', '.join(steps[:3])}{', ...' if len(steps) > 3 else ''})"


def job_process_kind(process: ProcessRecord, root_pid: int, step_pids: dict[int, list[str]]) -> str:
    """The kind T4 and N3 compare across sizes: the job process (which runs every step under
    the in-process executor), each step process (the multiprocess executor), each lean DuckDB
    worker named by its parent, and the helpers."""
    if process.pid == root_pid:
        return JOB_PROCESS
    if process.pid in step_pids:
        return f"step: {step_names(step_pids[process.pid])}"
    if LEAN_PROCESS_MODULE in process.cmdline:
        if process.ppid == root_pid:
            return "DuckDB worker of the job process"
        return f"DuckDB worker of step: {step_names(step_pids.get(process.ppid, ['unknown']))}"
    if "multiprocessing" in process.cmdline and (process.ppid == root_pid or process.ppid in step_pids):
        # A fork that has not exec'd its helper yet (tail, the watcher) still shows its
        # parent's command line and shares its parent's pages: never above the parent.
        return "transient fork, before exec (<= its parent)"
    return helper_kind(process.cmdline)


def helper_kind(cmdline: str) -> str:
    """The small helpers Dagster and multiprocessing start beside the steps."""
    if LEAN_PROCESS_MODULE in cmdline:
        return "DuckDB worker (merge in a lean child process)"
    if "resource_tracker" in cmdline:
        return "multiprocessing resource tracker"
    if "multiprocessing" in cmdline:
        return "multiprocessing worker, step unknown"
    if cmdline.startswith("tail "):
        return "compute-log tail (one per step)"
    if "watch_orphans" in cmdline:
        return "compute-log orphan watcher (one per step)"
    if cmdline.startswith("file "):
        return "`file` (platform.architecture, short-lived)"
    return "other: " + cmdline[:60]


def process_summary(measured: Measured, kinds: dict[int, str], default: Callable[[ProcessRecord], str] | None = None) -> dict[str, Any]:
    peaks: dict[str, float] = {}
    processes = []
    for process in measured.processes:
        if not process.cmdline and not process.peak_kb:
            continue  # gone before its first full read: a fork that exec'd and exited at once
        kind = kinds.get(process.pid) or (default or (lambda p: helper_kind(p.cmdline)))(process)
        peaks[kind] = max(peaks.get(kind, 0.0), process.peak_mb)
        processes.append({"pid": process.pid, "kind": kind, "peak_mb": process.peak_mb, "cpu_seconds": process.cpu_seconds})
    return {
        "wall_seconds": measured.seconds,
        "peak_mb_by_kind": peaks,
        "processes": processes,
        "cpu_seconds": measured.cpu_seconds,
        "sampled_cpu_seconds": measured.sampled_cpu_seconds,
        "simulator_cpu_seconds": measured.simulator_cpu_seconds,
        "other_cpu_seconds": measured.other_cpu_seconds,
    }


def run_job(
    bench: Bench,
    sim: Simulator,
    timeout: float,
    name: str = "job",
    job: str = SYNC_JOB,
    database: Path | None = None,
    command: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``dagster job execute`` of ``job`` (or ``command``) with a fresh DAGSTER_HOME. Into a
    fresh DuckDB file that is removed afterwards, unless ``database`` names one: the caller's,
    kept."""
    run_dir = bench.run_dir(f"{name}-{label(sim.contacts)}")
    home = run_dir / "dagster_home"
    home.mkdir()
    # A fresh instance per run (its fixed cost is then the same in every run), no telemetry.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    target = database or run_dir / "sync.duckdb"
    env = {
        **bench.env,
        "MKT_API_BASE_URL": sim.base_url,
        "MKT_API_KEY": bench.api_key,
        "MKT_DUCKDB_PATH": str(target),
        "DAGSTER_HOME": str(home),
        **(extra_env or {}),
    }
    try:
        measured = run_measured(
            command or job_command(job), env=env, cwd=run_dir, log_path=run_dir / "output.log", timeout=timeout, simulator_pid=sim.pid
        )
    finally:
        if database is None:
            remove_database(target)
    parsed = summarize_job_events(read_run_events(home), measured.started_at, measured.started_at + measured.seconds)
    parsed.update(count_run_events(home))
    root = measured.pid
    summary = process_summary(
        measured, {}, default=lambda process: job_process_kind(process, root, parsed["step_pids"])
    )
    return {"seconds": measured.seconds, "job": job, **parsed, **summary,
            "step_pids": {str(k): v for k, v in parsed["step_pids"].items()}}  # fmt: skip


def remove_database(database: Path) -> None:
    for path in (database, Path(f"{database}.lock"), Path(f"{database}.wal")):
        path.unlink(missing_ok=True)


# ===================================================================== the dlt anchor

# (name, path) of the paginated resources but contacts, read in full to know what the account holds.
LISTED_RESOURCES = (
    ("communities", "/community/communities"),
    ("tags", "/tags"),
    ("course_resources", "/school/courses"),
    ("memberships", "/community/memberships"),
    ("enrollments", "/school/enrollments"),
)


def account_sizes(sim: Simulator, api_key: str) -> dict[str, int]:
    """Records per resource the simulator serves: contacts as it was started with (reading
    them all would cost a bare loop), the others read here: a page or two each, memberships
    and enrollments (about 0.3 and 0.4 per contact) 7000 pages at a million contacts."""
    sizes = {"contacts": sim.contacts}
    with closing(_session(api_key)) as session:
        for name, path in LISTED_RESOURCES:
            params: dict[str, Any] = {"limit": PAGE_SIZE, "order": "asc"}
            sizes[name] = 0
            while True:
                body = session.get(sim.base_url + path, params=params, timeout=(10, 60)).json()
                sizes[name] += len(body["items"])
                if not body["hasMore"]:
                    break
                params["startingAfter"] = body["items"][-1]["id"]
        sizes["contact_fields"] = len(session.get(sim.base_url + "/contact_fields", timeout=(10, 60)).json()["items"])
    return sizes


def dlt_env(bench: Bench, run_dir: Path) -> dict[str, str]:
    """The harness's environment without what would make the dlt venv's python reach into
    the project's (PYTHONPATH, the project venv), dlt's home in the run's directory."""
    env = {name: value for name, value in bench.env.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {
        **env,
        "MKT_API_KEY": bench.api_key,
        "DLT_DATA_DIR": str(run_dir / "dlt_data"),  # nothing from ~/.dlt, nothing left there
        "RUNTIME__DLTHUB_TELEMETRY": "false",  # no call out of the machine
    }


def run_dlt(bench: Bench, sim: Simulator, timeout: float, expected: dict[str, int]) -> dict[str, Any]:
    """dlt's rest_api source into a fresh DuckDB file, measured like the job; then (unmeasured)
    the rows that landed, which must match the account or the run fails."""
    assert bench.dlt_python is not None
    run_dir = bench.run_dir(f"dlt-{label(sim.contacts)}")
    database = run_dir / "dlt.duckdb"
    command = [str(bench.dlt_python), str(HERE / "_dlt_runner.py"), "run", "--base-url", sim.base_url,
               "--database", str(database), "--pipelines-dir", str(run_dir / "pipelines")]  # fmt: skip
    return run_dlt_kind(bench, sim, timeout, expected, run_dir, command, dlt_env(bench, run_dir), "dlt process")


DAGSTER_DLT_JOB = "dlt_sync"


def run_dagster_dlt(bench: Bench, sim: Simulator, timeout: float, expected: dict[str, int]) -> dict[str, Any]:
    """dagster-dlt's @dlt_assets over the same configuration (_dagster_dlt_defs.py), as
    ``dagster job execute`` with a fresh DAGSTER_HOME like the job: context, not a target."""
    assert bench.dagster_dlt_python is not None
    run_dir = bench.run_dir(f"dagster-dlt-{label(sim.contacts)}")
    home = run_dir / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    database = run_dir / "dlt.duckdb"
    env = {
        **dlt_env(bench, run_dir),
        "DAGSTER_HOME": str(home),
        "MKT_API_BASE_URL": sim.base_url,
        "BENCH_DLT_DATABASE": str(database),
        "BENCH_DLT_PIPELINES_DIR": str(run_dir / "pipelines"),
    }
    command = [str(bench.dagster_dlt_python), "-m", "dagster", "job", "execute",
               "-f", str(HERE / "_dagster_dlt_defs.py"), "-j", DAGSTER_DLT_JOB]  # fmt: skip
    return run_dlt_kind(bench, sim, timeout, expected, run_dir, command, env, JOB_PROCESS, home)


def run_dlt_kind(
    bench: Bench,
    sim: Simulator,
    timeout: float,
    expected: dict[str, int],
    run_dir: Path,
    command: list[str],
    env: dict[str, str],
    root_kind: str,
    dagster_home: Path | None = None,
) -> dict[str, Any]:
    """Measure one dlt load (plain or inside Dagster) into ``run_dir/dlt.duckdb``, count what
    landed, clean up, and fail the run unless every record of the account is there."""
    database = run_dir / "dlt.duckdb"
    try:
        measured = run_measured(command, env=env, cwd=run_dir, log_path=run_dir / "output.log", timeout=timeout,
                                simulator_pid=sim.pid)  # fmt: skip
        report = bench_json(measured) if dagster_home is None else {}
        landed = count_dlt_rows(bench, database, run_dir, env)
    finally:
        remove_database(database)
        # dlt keeps every loaded package's Parquet files: at 1M, gigabytes.
        shutil.rmtree(run_dir / "pipelines", ignore_errors=True)
    check_dlt_rows(landed, expected, run_dir)
    if dagster_home is None:
        summary = process_summary(measured, {measured.pid: root_kind})
    else:
        events = summarize_job_events(read_run_events(dagster_home), measured.started_at, measured.started_at + measured.seconds)
        summary = process_summary(measured, {}, default=lambda p: job_process_kind(p, measured.pid, events["step_pids"]))
        report = {"step_seconds": events["step_seconds"], "startup_seconds": events.get("startup_seconds")}
    # The whole process's wall, like the job's: the runner's own figure excludes its imports.
    return {**report, "seconds": measured.seconds, "rows": landed, **summary}


def count_dlt_rows(bench: Bench, database: Path, run_dir: Path, env: dict[str, str]) -> dict[str, int]:
    # Either venv has dlt's DuckDB; the plain one starts quicker.
    python = bench.dlt_python or bench.dagster_dlt_python
    assert python is not None
    log_path = run_dir / "count.log"
    with open(log_path, "wb") as log:
        command = [str(python), str(HERE / "_dlt_runner.py"), "count", "--database", str(database)]
        if subprocess.run(command, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode:
            raise ChildFailed(f"counting dlt's rows failed (log: {log_path})")
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])["rows"]
    raise ChildFailed(f"no BENCH_JSON line in {log_path}")


def check_dlt_rows(landed: dict[str, int], expected: dict[str, int], run_dir: Path) -> None:
    """dlt stops early without complaint when its paginator is misconfigured (origin spec):
    a dlt run counts only if every record of the account landed."""
    wrong = {name: (landed.get(name, 0), count) for name, count in expected.items() if landed.get(name, 0) != count}
    if wrong:
        details = ", ".join(f"{name}: {got} rows, the account has {count}" for name, (got, count) in wrong.items())
        raise ChildFailed(f"dlt did not land every record ({details}; log: {run_dir / 'output.log'})")


# ===================================================================== the plan


@dataclass
class Plan:
    sizes: list[int]
    repeat: int
    latency: float
    latency_sizes: list[int]
    latency_repeat: int
    latency_bare_repeat: int
    probe_sizes: list[int]
    probe_requests: int
    parts: set[str]


def timeout_for(contacts: int, per_page: float, floor: float = 300.0) -> float:
    return floor + math.ceil(contacts / PAGE_SIZE) * per_page


def attempt(bench: Bench, what: str, runs: list[dict[str, Any]], run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; a failure is recorded and reported, and the benchmark goes on
    (the project is edited while it runs: one broken moment must not cost an hour of runs)."""
    try:
        result = run()
    except ChildFailed as error:
        bench.errors.append(f"{what}: {error}")
        progress(f"{what} FAILED: {str(error)[-1500:]}")
        return None
    runs.append(result)
    return result


def measure_size(bench: Bench, contacts: int, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {
        kind: []
        for kind in (
            "bare", "asset", "resync", "asset-no-history", "resync-no-history", "job", "incremental", "incremental-floor",
            "dlt", "dagster-dlt",
        )  # fmt: skip
    }
    with bench.start_simulator(contacts) as sim:
        wanted = ("dlt" in plan.parts and bench.dlt_python) or ("dagster-dlt" in plan.parts and bench.dagster_dlt_python)
        expected = account_sizes(sim, bench.api_key) if wanted else None
        for repeat in range(1, plan.repeat + 1):
            where = f"{label(contacts)} {repeat}/{plan.repeat}"
            # Interleaved rather than all bare loops then all assets: a slow spell of the
            # shared machine then hits every kind of run, not one. The project's job and dlt
            # take turns the same way (job, dlt, job, dlt...), their ratios being targets.
            if "bare" in plan.parts:
                run = attempt(bench, f"{where} bare loop", runs["bare"], lambda: run_bare_loop(bench, sim, timeout_for(contacts, 0.2)))
                if run:
                    progress(f"{where}: bare loop {run['seconds']:.1f}s (contacts {run['resources']['contacts']['seconds']:.1f}s)")
            if "asset" in plan.parts:
                # With history and without take turns in both orders: H1, H2 are their ratios.
                order = [True, False] if repeat % 2 else [False, True]
                for history in order if "history" in plan.parts else [True]:
                    measure_asset_pair(bench, sim, where, runs, history)
            if "job" in plan.parts:
                measure_job_pair(bench, sim, where, runs)
            if expected is not None:
                measure_dlt_runs(bench, sim, plan, where, expected, runs)
    return runs


def measure_dlt_runs(
    bench: Bench, sim: Simulator, plan: Plan, where: str, expected: dict[str, int], runs: dict[str, list[dict[str, Any]]]
) -> None:
    """dlt (N2b, N2c), then dagster-dlt if asked for (context), each checked against ``expected``."""
    timeout = timeout_for(sim.contacts, 0.5)
    for kind, ready, runner in (
        ("dlt", bench.dlt_python, run_dlt),
        ("dagster-dlt", bench.dagster_dlt_python, run_dagster_dlt),
    ):
        if kind not in plan.parts or ready is None:
            continue
        run = attempt(bench, f"{where} {kind}", runs[kind], lambda runner=runner: runner(bench, sim, timeout, expected))
        if run:
            progress(f"{where}: {kind} {run['seconds']:.1f}s, CPU {run['cpu_seconds']:.1f}s,"
                     f" peak {max(run['peak_mb_by_kind'].values()):.0f} MB")  # fmt: skip


def measure_job_pair(bench: Bench, sim: Simulator, where: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """marketing_sync into a fresh file, then the hourly marketing_incremental on that file
    (fresh DAGSTER_HOME, nothing added to the simulator): its fixed cost at this size (N1b)."""
    database = bench.run_dir(f"job-db-{label(sim.contacts)}") / "sync.duckdb"
    try:
        run = attempt(bench, f"{where} job", runs["job"],
                      lambda: run_job(bench, sim, timeout_for(sim.contacts, 0.5), database=database))  # fmt: skip
        if run is None:
            return
        progress(f"{where}: marketing_sync {run['seconds']:.1f}s, CPU {run['cpu_seconds']:.1f}s,"
                 f" peak {max(run['peak_mb_by_kind'].values()):.0f} MB")  # fmt: skip
        timeout = timeout_for(sim.contacts, 0.2)
        run = attempt(bench, f"{where} incremental", runs["incremental"],
                      lambda: run_job(bench, sim, timeout, "incremental", INCREMENTAL_JOB, database))  # fmt: skip
        if run is None:
            return
        progress(f"{where}: marketing_incremental {run['seconds']:.1f}s ({run.get('records_fetched')} new contacts)")
        # Dagster's floor for its shape right after it: the machine's speed drifts by a third
        # within minutes, so the target is judged on the difference of each such pair.
        floor_env = {"BENCH_FLOOR_SHAPE": str(write_floor_shape(bench)), "BENCH_FLOOR_CHECKS": "1"}
        run = attempt(bench, f"{where} incremental's floor", runs["incremental-floor"],
                      lambda: run_job(bench, sim, 300.0, "floor", command=floor_command(), extra_env=floor_env))  # fmt: skip
        if run:
            progress(f"{where}: Dagster floor {run['seconds']:.1f}s")
    finally:
        remove_database(database)


def measure_asset_pair(
    bench: Bench, sim: Simulator, where: str, runs: dict[str, list[dict[str, Any]]], history: bool = True
) -> None:
    """The contacts asset into a fresh file (target 2), then the same data again into the
    table it filled (target 5: a re-sync where every row is unchanged); without history, the
    same pair under the names ``asset-no-history`` and ``resync-no-history``."""
    suffix = "" if history else NO_HISTORY
    database = bench.run_dir(f"asset{suffix}-db-{label(sim.contacts)}") / "asset.duckdb"
    timeout = timeout_for(sim.contacts, 0.5)
    for name in (f"asset{suffix}", f"resync{suffix}"):
        run = attempt(bench, f"{where} {name}", runs[name],
                      lambda name=name: run_asset(bench, sim, database, timeout, name, history))  # fmt: skip
        if run is None:
            break
        progress(f"{where}: {name} fetch {run['fetch_seconds']:.1f}s + merge {run['merge_seconds']:.1f}s,"
                 f" whole {run['seconds']:.1f}s")  # fmt: skip
    remove_database(database)


NO_HISTORY = "-no-history"


def measure_fixed_cost(bench: Bench, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """The job against an empty account (T3's and T6's fixed cost, N1a), and dlt beside it
    for context when dlt is measured."""
    runs: dict[str, list[dict[str, Any]]] = {
        "job": [], "floor": [], "floor-no-checks": [], "floor-defs-folder": [], "dlt": [], "dagster-dlt": [],
    }  # fmt: skip
    shape = write_floor_shape(bench)
    project = write_floor_project(bench)
    compile_bytecode(project)
    path = os.pathsep.join(filter(None, [str(project), bench.env.get("PYTHONPATH")]))
    # name: (checks, command, environment of its own)
    floors = {
        "floor": ("1", floor_command(), {}),
        "floor-no-checks": ("0", floor_command(), {}),
        "floor-defs-folder": ("1", floor_project_command(), {"PYTHONPATH": path}),
    }
    with bench.start_simulator(0) as sim:
        wanted = ("dlt" in plan.parts and bench.dlt_python) or ("dagster-dlt" in plan.parts and bench.dagster_dlt_python)
        expected = account_sizes(sim, bench.api_key) if wanted else None
        for repeat in range(1, plan.repeat + 1):
            where = f"empty account {repeat}/{plan.repeat}"
            run = attempt(bench, where, runs["job"], lambda: run_job(bench, sim, 300.0, "fixed"))
            if run:
                progress(f"{where}: marketing_sync {run['seconds']:.1f}s")
            for name, (checks, command, own_env) in floors.items():
                floor_env = {"BENCH_FLOOR_SHAPE": str(shape), "BENCH_FLOOR_CHECKS": checks, **own_env}
                run = attempt(
                    bench, f"{where}, {name}", runs[name],
                    lambda floor_env=floor_env, name=name, command=command: run_job(
                        bench, sim, 300.0, name, command=command, extra_env=floor_env
                    ),
                )  # fmt: skip
                if run:
                    progress(f"{where}: Dagster {name} {run['seconds']:.1f}s ({run['events']} events)")
            if expected is not None:
                measure_dlt_runs(bench, sim, plan, where, expected, runs)
    return runs


def measure_latency(bench: Bench, contacts: int, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """The job with latency added to every request (target 6), and the bare loop under the
    same latency: the floor of any walk that requests one page at a time. That floor is
    context, not a target, and at 1M it costs ~10 min a run: it runs `latency_bare_repeat` times."""
    runs: dict[str, list[dict[str, Any]]] = {"job": [], "bare": []}
    timeout = timeout_for(contacts, 3 * (plan.latency + 0.1))
    with bench.start_simulator(contacts, plan.latency) as sim:
        for repeat in range(1, plan.latency_repeat + 1):
            where = f"latency {plan.latency * 1000:g} ms, {label(contacts)} {repeat}/{plan.latency_repeat}"
            if repeat <= plan.latency_bare_repeat:
                run = attempt(bench, f"{where} bare loop", runs["bare"], lambda: run_bare_loop(bench, sim, timeout))
                if run:
                    progress(f"{where}: bare loop {run['seconds']:.1f}s (contacts {run['resources']['contacts']['seconds']:.1f}s)")
            run = attempt(bench, where, runs["job"], lambda: run_job(bench, sim, timeout, "latency"))
            if run:
                progress(f"{where}: marketing_sync {run['seconds']:.1f}s")
    return runs


# ===================================================================== the table


@dataclass
class Row:
    measure: str
    contacts: str
    value: str
    target: str = ""
    verdict: str = ""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(self, measure: str, contacts: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append(Row(measure, contacts, value, target, verdict))

    def check(self, measure: str, contacts: str, ratio: float, limit: float, detail: str, percent: bool = False) -> None:
        shown = f"{ratio:.1%}" if percent else f"{ratio:.2f}"
        target = f"<= {limit:.0%}" if percent else f"<= {limit:.2f}"
        verdict = "n/a" if math.isnan(ratio) else ("PASS" if ratio <= limit else "FAIL")
        self.add(measure, contacts, f"{shown} ({detail})", target, verdict)

    def check_seconds(self, measure: str, contacts: str, value: float, limit: float, detail: str = "") -> None:
        """A target in seconds rather than a ratio (the lean run's N1 and N2a)."""
        verdict = "n/a" if math.isnan(value) else ("PASS" if value <= limit else "FAIL")
        self.add(measure, contacts, f"{seconds(value)}" + (f" ({detail})" if detail else ""), f"<= {limit:g} s", verdict)

    def render(self) -> str:
        header = Row("measure", "contacts", "value (median s unless stated)", "target", "result")
        rows = [header, *self.rows]
        widths = [max(len(getattr(row, name)) for row in rows) for name in ("measure", "contacts", "value", "target", "verdict")]

        def line(row: Row) -> str:
            cells = (row.measure, row.contacts, row.value, row.target, row.verdict)
            return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        return "\n".join([line(header), rule, *(line(row) for row in self.rows)])


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def spread(values: Sequence[float | None]) -> str:
    """The median, and the range when there are several runs."""
    present = [value for value in values if value is not None and not math.isnan(value)]
    if not present:
        return "n/a"
    if len(present) == 1:
        return seconds(present[0])
    return f"{seconds(statistics.median(present))} [{min(present):.1f}-{max(present):.1f}, n={len(present)}]"


def peaks_by_kind(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for run in runs:
        for kind, peak in run["peak_mb_by_kind"].items():
            peaks[kind] = max(peaks.get(kind, 0.0), peak)
    return peaks


def add_peak_rows(table: Table, size: str, peaks: dict[str, float], focus_step: str | None = None) -> None:
    """The job's peak RSS by process kind: the job process, the step that materialized
    contacts and its DuckDB workers (``focus_step``, when it ran in a process of its own), the
    largest other step and worker (named), and Dagster's helpers."""
    grouped: dict[str, dict[str, float]] = {"step: ": {}, "DuckDB worker of step: ": {}}
    for prefix, members in grouped.items():
        members.update(
            (kind, peak) for kind, peak in peaks.items() if kind.startswith(prefix) and kind != f"{prefix}{focus_step}"
        )
    rows = {kind: peak for kind, peak in peaks.items() if not any(kind in members for members in grouped.values())}
    for kind, peak in sorted(rows.items(), key=lambda item: -item[1]):
        table.add(f"  peak RSS: {kind}", size, f"{peak:.0f} MB")
    for prefix, members in grouped.items():
        if members:
            kind, peak = max(members.items(), key=lambda item: item[1])
            what = "steps" if prefix == "step: " else "DuckDB workers of steps"
            other = "other " if focus_step and f"{prefix}{focus_step}" in peaks else ""
            table.add(f"  peak RSS: largest of the {len(members)} {other}{what}", size, f"{peak:.0f} MB ({kind[len(prefix):]})")


def contacts_step(runs: Sequence[dict[str, Any]]) -> str | None:
    """The step that materialized marketing/contacts in these runs (the same in all)."""
    return next((run["contacts_step"] for run in runs if run.get("contacts_step")), None)


def cpu_line(runs: Sequence[dict[str, Any]]) -> str:
    client = median(run["cpu_seconds"] for run in runs)
    sim = median(run["simulator_cpu_seconds"] for run in runs)
    other = median(run["other_cpu_seconds"] / run["wall_seconds"] for run in runs)
    return f"client {client:.1f} s, simulator {sim:.1f} s; other load {other:.2f} cores"


def build_table(results: dict[str, Any], plan: Plan) -> Table:
    table = Table()
    add_simulator_rows(table, results.get("simulator_probe"))
    fixed_runs = results.get("fixed_cost") or []
    fixed = median(run["seconds"] for run in fixed_runs)
    if fixed_runs:
        table.check_seconds(
            "N1a marketing_sync, empty account (= fixed cost of T3, T6)", "0", fixed, FIXED_SYNC_MAX_SECONDS,
            spread_detail([run["seconds"] for run in fixed_runs]),
        )  # fmt: skip
        table.add("  job CPU (all its processes)", "0", cpu_line(fixed_runs))
        add_peak_rows(table, "0", peaks_by_kind(fixed_runs), contacts_step(fixed_runs))
    add_floor_rows(
        table, fixed_runs, results.get("dagster_floor") or [], results.get("dagster_floor_no_checks") or [],
        results.get("dagster_floor_defs_folder") or [],
    )  # fmt: skip
    add_dlt_rows(table, "0", results.get("fixed_cost_dlt") or [])
    add_dagster_dlt_rows(table, "0", results.get("fixed_cost_dagster_dlt") or [], fixed_runs)
    for contacts in plan.sizes:
        add_size_rows(table, contacts, results["sizes"].get(str(contacts), {}), fixed)
    add_memory_rows(table, "T4", "every process of the sync", memory_peaks(results, plan, {"job": ""}))
    add_memory_rows(
        table, "N3", "every process of the full and the incremental job",
        memory_peaks(results, plan, {"job": "", "incremental": INCREMENTAL_PREFIX}),
    )  # fmt: skip
    for contacts in plan.latency_sizes:
        latency_runs = (results.get("latency") or {}).get(str(contacts), {})
        add_latency_rows(table, contacts, latency_runs.get("job"), latency_runs.get("bare"), plan, fixed)
    return table


def add_floor_rows(
    table: Table,
    fixed_runs: list[dict[str, Any]],
    floor: list[dict[str, Any]],
    no_checks: list[dict[str, Any]],
    defs_folder: list[dict[str, Any]] | None = None,
) -> None:
    """What Dagster alone costs a run of the job's shape, and so what of N1a is the project's."""
    if not floor:
        return
    first = floor[0]
    shape = f"{first['materializations']} assets, {first['check_evaluations']} checks, {first['events']} events"
    floor_seconds = median(run["seconds"] for run in floor)
    table.add(
        "Dagster floor: the job's shape, nothing fetched or written", "0",
        f"{seconds(floor_seconds)} {spread_detail([run['seconds'] for run in floor])} ({shape})",
    )  # fmt: skip
    if no_checks:
        bare = median(run["seconds"] for run in no_checks)
        table.add(
            "  the same without its checks", "0",
            f"{seconds(bare)} {spread_detail([run['seconds'] for run in no_checks])}"
            f" ({no_checks[0]['events']} events): the checks' events cost {seconds(floor_seconds - bare)}",
        )  # fmt: skip
    folder_seconds = median(run["seconds"] for run in defs_folder) if defs_folder else math.nan
    if defs_folder:
        table.add(
            "  the same loaded through a defs folder (dg.load_from_defs_folder)", "0",
            f"{seconds(folder_seconds)} {spread_detail([run['seconds'] for run in defs_folder])}:"
            f" Dagster's components add {seconds(folder_seconds - floor_seconds)}",
        )  # fmt: skip
    if fixed_runs:
        job = fixed_runs[0]
        add_paired_difference(
            table, "  N1a - floor: the project's own fixed cost", "0", fixed_runs, floor, FIXED_OVER_FLOOR_MAX_SECONDS,
            f"; the job: {job['materializations']} assets, {job['check_evaluations']} checks, {job['events']} events",
        )  # fmt: skip
        if defs_folder:
            pairs = [run["seconds"] - folder["seconds"] for run, folder in zip(fixed_runs, defs_folder, strict=False)]
            table.add(
                "  N1a - the defs-folder floor: the project's own code", "0",
                f"{seconds(median(pairs))} (median of {len(pairs)} pairs {spread_detail(pairs)})",
            )  # fmt: skip


def add_paired_difference(
    table: Table,
    measure: str,
    size: str,
    runs: list[dict[str, Any]],
    floors: list[dict[str, Any]],
    limit: float,
    detail: str = "",
) -> None:
    """A target on a run's time above Dagster's floor, judged on the median of the differences of
    the pairs measured one after the other (each repeat runs both): the shared machine's speed
    drifts by a third within minutes, which a difference of two medians would carry."""
    pairs = [run["seconds"] - floor["seconds"] for run, floor in zip(runs, floors, strict=False)]
    if not pairs:
        return
    table.check_seconds(
        measure, size, median(pairs), limit,
        f"median of {len(pairs)} pairs {spread_detail(pairs)}; medians {seconds(median(run['seconds'] for run in runs))}"
        f" - {seconds(median(floor['seconds'] for floor in floors))}{detail}",
    )  # fmt: skip


def spread_detail(values: Sequence[float | None]) -> str:
    """The range and count of several runs, for a row whose value is already the median."""
    present = [value for value in values if value is not None and not math.isnan(value)]
    return f"[{min(present):.1f}-{max(present):.1f}, n={len(present)}]" if len(present) > 1 else ""


def add_simulator_rows(table: Table, probe: dict[str, Any] | None) -> None:
    if not probe:
        return
    small, large = probe["sizes"]
    small_ms = probe["results"][str(small)]["median_ms"]
    large_ms = probe["results"][str(large)]["median_ms"]
    n = probe["requests_each"]
    table.add("simulator: median page of 100 contacts", label(small), f"{small_ms:.2f} ms (n={n})")
    table.add("simulator: median page of 100 contacts", label(large), f"{large_ms:.2f} ms (n={n})")
    table.check(
        f"T1 simulator median {label(large)} / {label(small)}",
        f"{label(large)}/{label(small)}",
        large_ms / small_ms,
        SIMULATOR_RATIO_MAX,
        f"{large_ms:.2f} / {small_ms:.2f} ms",
    )


def add_size_rows(table: Table, contacts: int, runs: dict[str, list[dict[str, Any]]], fixed: float) -> None:
    size = label(contacts)
    bare, asset, resync, job, incremental, dlt, dagster_dlt = (
        runs.get(kind) or [] for kind in ("bare", "asset", "resync", "job", "incremental", "dlt", "dagster-dlt")
    )
    bare_contacts = median(run["resources"]["contacts"]["seconds"] for run in bare)
    bare_all = median(run["seconds"] for run in bare)
    if bare:
        pages = bare[0]["resources"]["contacts"]["pages"]
        table.add("bare loop: contact pages", size, f"{pages} pages, {spread([r['resources']['contacts']['seconds'] for r in bare])}")
        table.add("bare loop: every resource", size, spread([run["seconds"] for run in bare]))
        table.add("  bare loop CPU", size, cpu_line(bare))
        table.add("  bare loop peak RSS", size, f"{max(peaks_by_kind(bare).values()):.0f} MB")
    if asset:
        add_asset_rows(table, size, asset, bare_contacts)
    if resync:
        add_resync_rows(table, size, resync)
    add_history_rows(table, size, runs)
    if job:
        add_job_rows(table, size, job, fixed, bare_all)
    if incremental:
        add_incremental_rows(table, size, incremental, runs.get("incremental-floor") or [])
    add_dlt_rows(table, size, dlt)
    if job and dlt:
        job_seconds, dlt_seconds = median(r["seconds"] for r in job), median(r["seconds"] for r in dlt)
        job_cpu, dlt_cpu = median(r["cpu_seconds"] for r in job), median(r["cpu_seconds"] for r in dlt)
        table.check("N2b job wall / dlt-parquet wall", size, job_seconds / dlt_seconds, DLT_WALL_RATIO_MAX,
                    f"{job_seconds:.1f} / {dlt_seconds:.1f} s")  # fmt: skip
        table.check("N2c job CPU / dlt-parquet CPU", size, job_cpu / dlt_cpu, DLT_CPU_RATIO_MAX,
                    f"{job_cpu:.1f} / {dlt_cpu:.1f} CPU s")  # fmt: skip
    add_dagster_dlt_rows(table, size, dagster_dlt, job)


def add_asset_rows(table: Table, size: str, asset: list[dict[str, Any]], bare_contacts: float) -> None:
    # _asset_runner.py promises fetch_seconds, merge_seconds, seconds and peak_kb; the rest may go.
    work = [run["fetch_seconds"] + run["merge_seconds"] for run in asset]
    pages = asset[0].get("pages")
    table.add("contacts asset: fetch+stage+merge", size, (f"{pages} pages, " if pages else "") + spread(work))
    table.add("  fetch+stage / merge", size, f"{spread([r['fetch_seconds'] for r in asset])} / {spread([r['merge_seconds'] for r in asset])}")
    table.add("  whole step (with checks) / materialize()", size,
              f"{spread([r.get('step_seconds') for r in asset])} / {spread([r['seconds'] for r in asset])}")  # fmt: skip
    table.add("  asset runner CPU", size, cpu_line(asset))
    table.add("  asset runner peak RSS", size, f"{max(peaks_by_kind(asset).values()):.0f} MB")
    table.check(
        "T2 contacts asset / bare loop (contacts)",
        size,
        median(work) / bare_contacts,
        THROUGHPUT_RATIO_MAX,
        f"{median(work):.1f} / {bare_contacts:.1f} s",
    )


def add_resync_rows(table: Table, size: str, resync: list[dict[str, Any]]) -> None:
    work = [run["fetch_seconds"] + run["merge_seconds"] for run in resync]
    shares = [run["merge_seconds"] / (run["fetch_seconds"] + run["merge_seconds"]) for run in resync]
    unchanged = resync[0].get("rows_unchanged")
    table.add("re-sync unchanged: fetch+stage / merge", size,
              f"{spread([r['fetch_seconds'] for r in resync])} / {spread([r['merge_seconds'] for r in resync])}"
              + (f" ({unchanged} rows unchanged)" if unchanged is not None else ""))  # fmt: skip
    table.check(
        "T5 re-sync: merge share of fetch+merge",
        size,
        median(shares),
        MERGE_SHARE_MAX,
        f"{median(r['merge_seconds'] for r in resync):.1f} of {median(work):.1f} s",
        percent=True,
    )


def add_history_rows(table: Table, size: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """H1, H2: what keeping the history adds to the contacts asset, whole (materialize(), the
    checks included), measured against the same asset without it in the same invocation."""
    for kind, what, limit in (
        ("asset", "H1 first sync: with history / without", HISTORY_FIRST_SYNC_MAX),
        ("resync", "H2 re-sync unchanged: with history / without", HISTORY_RESYNC_MAX),
    ):
        on, off = runs.get(kind) or [], runs.get(f"{kind}{NO_HISTORY}") or []
        if not on or not off:
            continue
        table.add(f"  {kind}: whole / merge, with history", size,
                  f"{spread([r['seconds'] for r in on])} / {spread([r['merge_seconds'] for r in on])}")  # fmt: skip
        table.add(f"  {kind}: whole / merge, without", size,
                  f"{spread([r['seconds'] for r in off])} / {spread([r['merge_seconds'] for r in off])}")  # fmt: skip
        with_history, without = median(r["seconds"] for r in on), median(r["seconds"] for r in off)
        table.check(what, size, with_history / without, limit, f"{with_history:.1f} / {without:.1f} s")


def timeline_row(table: Table, size: str, runs: Sequence[dict[str, Any]], what: str = "") -> None:
    """Start-up, the step that materialized contacts (whatever its key), what came after it."""
    step = contacts_step(runs) or "?"
    table.add(f"  {what}timeline: start-up / step {step} / after it", size,
              f"{spread([r.get('startup_seconds', math.nan) for r in runs])} /"
              f" {spread([r.get('contacts_step_seconds', math.nan) for r in runs])} /"
              f" {spread([r.get('after_contacts_seconds', math.nan) for r in runs])}")  # fmt: skip


def slowest_steps(runs: Sequence[dict[str, Any]], count: int = 3) -> str:
    """The longest steps by median duration, named by key: the job's layout is not assumed."""
    keys = {key for run in runs for key in run.get("step_seconds", {})}
    medians = {key: median(run.get("step_seconds", {}).get(key) for run in runs) for key in keys}
    ranked = sorted(medians.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{key} {value:.1f}" for key, value in ranked[:count])
    return f"{len(keys)} step(s); " + (shown or "none")


def add_job_rows(table: Table, size: str, job: list[dict[str, Any]], fixed: float, bare_all: float) -> None:
    job_seconds = median(run["seconds"] for run in job)
    table.add("marketing_sync (dagster job execute)", size, spread([run["seconds"] for run in job]))
    table.add("  contacts asset in the job: fetch+stage / merge", size,
              f"{spread([r.get('fetch_seconds', math.nan) for r in job])} /"
              f" {spread([r.get('merge_seconds', math.nan) for r in job])}")  # fmt: skip
    table.add("  job CPU (all its processes)", size, cpu_line(job))
    timeline_row(table, size, job)
    table.add("  slowest steps (median s)", size, slowest_steps(job))
    add_peak_rows(table, size, peaks_by_kind(job), contacts_step(job))
    # A job quicker than the empty account's gives a negative ratio: no verdict, not a PASS.
    t3 = (job_seconds - fixed) / bare_all if job_seconds >= fixed else math.nan
    table.check(
        "T3 (job - fixed cost) / bare loop (every resource)",
        size,
        t3,
        END_TO_END_SLACK,
        f"({job_seconds:.1f} - {fixed:.1f}) / {bare_all:.1f} s" + below_fixed_note(job_seconds, fixed),
    )
    # Everything beyond fetching every resource's pages, Dagster included.
    table.check_seconds(
        "N2a job - bare loop (every resource)", size, job_seconds - bare_all, BARE_SLACK_SECONDS,
        f"{job_seconds:.1f} - {bare_all:.1f} s" if not math.isnan(bare_all) else "needs the bare loop: --parts bare",
    )  # fmt: skip


def add_incremental_rows(table: Table, size: str, incremental: list[dict[str, Any]], floors: list[dict[str, Any]] | None = None) -> None:
    times = [run["seconds"] for run in incremental]
    table.check_seconds(
        "N1b marketing_incremental, nothing new (after the full job)", size, median(times),
        FIXED_INCREMENTAL_MAX_SECONDS, spread_detail(times),
    )  # fmt: skip
    if floors:
        # The incremental selects marketing_sync's assets and checks: the floor has its shape.
        add_paired_difference(
            table, "  N1b - Dagster's floor (the floor run right after each)", size, incremental, floors,
            INCREMENTAL_OVER_FLOOR_MAX_SECONDS,
        )  # fmt: skip
    fetched = median(run.get("records_fetched") for run in incremental)
    pages = median(run.get("pages") for run in incremental)
    table.add("  incremental: new contacts fetched / pages", size, f"{fetched:.0f} / {pages:.0f}")
    table.add("  incremental CPU (all its processes)", size, cpu_line(incremental))
    timeline_row(table, size, incremental, "incremental ")
    table.add("  incremental peak RSS", size, max_peak(incremental))


def add_dlt_rows(table: Table, size: str, dlt: list[dict[str, Any]]) -> None:
    if not dlt:
        return
    table.add("dlt rest_api -> DuckDB (parquet), its own venv", size, spread([run["seconds"] for run in dlt]))
    table.add("  dlt CPU (all its processes)", size, cpu_line(dlt))
    steps = [run.get("steps", {}) for run in dlt]
    table.add("  dlt pipeline.run(): extract / normalize / load", size,
              f"{spread([run.get('pipeline_seconds') for run in dlt])}: "
              + " / ".join(spread([step.get(name) for step in steps]) for name in ("extract", "normalize", "load")))  # fmt: skip
    table.add("  dlt peak RSS", size, max_peak(dlt))
    rows = dlt[0]["rows"]
    table.add("  dlt rows landed (= the account, checked)", size,
              ", ".join(f"{name} {count}" for name, count in sorted(rows.items())) or "no tables (empty account)")  # fmt: skip


def add_dagster_dlt_rows(table: Table, size: str, runs: list[dict[str, Any]], job: list[dict[str, Any]]) -> None:
    """dagster-dlt's @dlt_assets: context beside the job, no target."""
    if not runs:
        return
    table.add("dagster-dlt @dlt_assets (in-process executor), its own venv", size, spread([run["seconds"] for run in runs]))
    table.add("  dagster-dlt CPU (all its processes)", size, cpu_line(runs))
    table.add("  dagster-dlt peak RSS", size, max_peak(runs))
    table.add("  dagster-dlt rows landed", size, "= the account, checked (as dlt's)")
    if job:
        job_seconds, other = median(r["seconds"] for r in job), median(r["seconds"] for r in runs)
        job_cpu, other_cpu = median(r["cpu_seconds"] for r in job), median(r["cpu_seconds"] for r in runs)
        table.add("  job / dagster-dlt: wall, CPU", size,
                  f"{job_seconds / other:.2f} ({job_seconds:.1f} / {other:.1f} s), {job_cpu / other_cpu:.2f}"
                  f" ({job_cpu:.1f} / {other_cpu:.1f} CPU s)")  # fmt: skip


def max_peak(runs: Sequence[dict[str, Any]]) -> str:
    kind, peak = max(peaks_by_kind(runs).items(), key=lambda item: item[1])
    return f"{peak:.0f} MB ({kind})"


def below_fixed_note(job_seconds: float, fixed: float) -> str:
    # A job quicker than the empty account's: the work is smaller than the fixed cost's own spread.
    return "; below the fixed cost: too small a size to judge" if job_seconds < fixed else ""


INCREMENTAL_PREFIX = "incremental: "
# The kinds whose growth T4 and N3 judge; Dagster's helpers (tail, watchers) are a few MB
# whatever the size.
GROWTH_KINDS = ("step: ", "job process", "DuckDB worker")


def memory_peaks(results: dict[str, Any], plan: Plan, run_kinds: dict[str, str]) -> dict[int, dict[str, float]]:
    """Peak RSS per process kind at each size where the full job ran, over the runs named in
    ``run_kinds`` (run kind -> prefix of its process kinds, so a kind is compared with itself)."""
    peaks_at: dict[int, dict[str, float]] = {}
    for size in plan.sizes:
        runs = results["sizes"].get(str(size), {})
        if not runs.get("job"):
            continue
        peaks: dict[str, float] = {}
        for run_kind, prefix in run_kinds.items():
            for kind, peak in peaks_by_kind(runs.get(run_kind) or []).items():
                peaks[prefix + kind] = max(peaks.get(prefix + kind, 0.0), peak)
        peaks_at[size] = peaks
    return peaks_at


def add_memory_rows(table: Table, name: str, what: str, peaks_at: dict[int, dict[str, float]]) -> None:
    """T4 (and N3, its check over more runs): at the largest size, every process under 300 MB
    and grown at most 1.25x from the next smaller size, process kind by process kind."""
    if not peaks_at:
        return
    largest = max(peaks_at)
    peaks = peaks_at[largest]
    worst_kind, worst = max(peaks.items(), key=lambda item: item[1])
    table.add(
        f"{name} peak RSS, {what}",
        label(largest),
        f"{worst:.0f} MB ({worst_kind})",
        f"<= {PEAK_MB_MAX:.0f} MB",
        "PASS" if worst <= PEAK_MB_MAX else "FAIL",
    )
    smaller = [size for size in peaks_at if size < largest]
    if not smaller:
        table.add(f"{name} peak RSS growth", label(largest), "n/a (needs two sizes)", f"<= {PEAK_GROWTH_MAX:.2f}", "n/a")
        return
    previous = peaks_at[max(smaller)]
    growth = {
        kind: peaks[kind] / previous[kind]
        for kind in peaks
        if previous.get(kind) and kind.removeprefix(INCREMENTAL_PREFIX).startswith(GROWTH_KINDS)
    }
    kind, ratio = max(growth.items(), key=lambda item: item[1]) if growth else ("none comparable", math.nan)
    table.check(
        f"{name} peak RSS growth {label(largest)} / {label(max(smaller))}",
        f"{label(largest)}/{label(max(smaller))}",
        ratio,
        PEAK_GROWTH_MAX,
        f"worst: {kind}, {peaks.get(kind, math.nan):.0f} / {previous.get(kind, math.nan):.0f} MB",
    )


def add_latency_rows(
    table: Table,
    contacts: int,
    runs: list[dict[str, Any]] | None,
    bare: list[dict[str, Any]] | None,
    plan: Plan,
    fixed: float,
) -> None:
    if not runs:
        return
    size = label(contacts)
    job_seconds = median(run["seconds"] for run in runs)
    pages = runs[0].get("pages") or math.ceil(contacts / PAGE_SIZE)
    floor = pages * plan.latency
    if bare:
        bare_contacts = [run["resources"]["contacts"]["seconds"] for run in bare]
        table.add(f"bare loop, {plan.latency * 1000:g} ms per request: contact pages", size, spread(bare_contacts))
        # No walk that requests one page at a time can do better: the target's 1.15 against this.
        table.add(
            "  sequential floor: bare loop / (contact pages x latency)",
            size,
            f"{median(bare_contacts) / floor:.2f} ({median(bare_contacts):.1f} / {floor:.1f} s)",
        )
    table.add(f"marketing_sync, {plan.latency * 1000:g} ms per request", size, spread([run["seconds"] for run in runs]))
    timeline_row(table, size, runs)
    table.add("  contacts fetch+stage per page", size,
              f"{median(r.get('fetch_seconds') for r in runs) / pages * 1000:.1f} ms"
              f" ({plan.latency * 1000:g} ms of it the simulator's added latency)")  # fmt: skip
    table.check(
        "T6 (job - fixed cost) / (contact pages x latency)",
        size,
        (job_seconds - fixed) / floor,
        LATENCY_RATIO_MAX,
        f"({job_seconds:.1f} - {fixed:.1f}) / ({pages} x {plan.latency * 1000:g} ms = {floor:.1f} s)"
        + below_fixed_note(job_seconds, fixed),
    )


# ===================================================================== main


def parse_arguments(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="contacts per account")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median of them)")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 1k and 10k, one repeat")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to each request (target 6)")
    parser.add_argument("--latency-sizes", type=int, nargs="+", default=None, help="contacts for target 6 (default: --sizes)")
    parser.add_argument("--latency-repeat", type=int, default=None, help="runs for target 6 (default: --repeat)")
    parser.add_argument(
        "--latency-bare-repeat", type=int, default=1, help="runs of the bare loop under latency, per size (default: 1)"
    )
    parser.add_argument("--probe-sizes", type=int, nargs=2, default=[10_000, 1_000_000], help="target 1's two sizes")
    parser.add_argument("--probe-requests", type=int, default=200, help="page requests per size for target 1")
    parts = ("probe", "bare", "asset", "history", "job", "fixed", "latency", "dlt", "dagster-dlt", "outage", "kill", "daemon",
             "webhooks")  # fmt: skip
    # dagster-dlt is context, not a target, and costs a venv with Dagster of its own: asked for.
    asked_for = ("dagster-dlt", "outage", "kill", "daemon", "webhooks")
    default_parts = [part for part in parts if part not in asked_for]
    parser.add_argument("--parts", nargs="+", choices=parts, default=default_parts,
                        help=f"what to measure (default: all but {', '.join(asked_for)})")  # fmt: skip
    parser.add_argument("--rate", type=int, default=10, help="requests a second the simulator allows in outage/kill (its rate limit)")
    parser.add_argument("--outage-at", type=float, default=60.0, help="seconds into the sync the outage starts")
    parser.add_argument("--outage-seconds", type=float, default=60.0, help="how long every request answers 503")
    parser.add_argument("--daemon-outage-seconds", type=float, default=600.0,
                        help="how long every request answers 503 in the daemon scenario (from --outage-at)")  # fmt: skip
    parser.add_argument("--kills", type=int, default=5, help="syncs killed with SIGKILL before one finishes (kill)")
    parser.add_argument("--webhook-changes", type=int, default=20, help="changes made one at a time (webhooks)")
    parser.add_argument("--webhook-spacing", type=float, default=7.0, help="seconds between two of them, and between floor bumps")
    parser.add_argument("--webhook-burst", type=int, default=1000, help="changes of the burst (webhooks)")
    parser.add_argument("--webhook-burst-seconds", type=int, default=10, help="the burst is sent in this many requests, one a second")
    parser.add_argument("--webhook-floor-changes", type=int, default=10, help="bumps of Dagster's floor sensor (0: no floor)")
    parser.add_argument("--webhook-poll", type=float, default=1.0, help="seconds between two reads of the DuckDB file")
    parser.add_argument(
        "--dlt-venv", type=Path, default=DEFAULT_VENV,
        help=f"the dlt anchor's venv, created with {' '.join(DLT_REQUIREMENTS)} if missing (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dagster-dlt-venv", type=Path, default=DEFAULT_DAGSTER_DLT_VENV,
        help=f"dagster-dlt's venv, created with {' '.join(DAGSTER_DLT_REQUIREMENTS)} if missing (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--no-pace", action="store_true", help="the asset runs with pace_requests=False (the job cannot)")
    parser.add_argument("--json", type=Path, help="also write every raw run here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every run)")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.sizes, arguments.repeat = [1_000, 10_000], 1
    sizes = sorted(set(arguments.sizes))
    # At 50 ms a request the job is ~40 s a run at 100k and ~5 min at 1M (2026-12-01).
    latency_sizes = sorted(set(arguments.latency_sizes or sizes))
    plan = Plan(
        sizes=sizes,
        repeat=arguments.repeat,
        latency=arguments.latency,
        latency_sizes=latency_sizes,
        latency_repeat=arguments.latency_repeat or arguments.repeat,
        latency_bare_repeat=arguments.latency_bare_repeat,
        probe_sizes=sorted(arguments.probe_sizes),
        probe_requests=arguments.probe_requests,
        parts=set(arguments.parts),
    )
    return plan, arguments


def measure_resume(bench: Bench, plan: Plan, arguments: argparse.Namespace) -> list[str]:
    """Issue 23's scenarios, at each size: a sync failed by an outage then resumed, and syncs
    killed at random moments then one that finishes, each against one clean sync."""
    lines = []
    for contacts in plan.sizes:
        with simulator(contacts, latency=0.0, api_key=bench.api_key, log_dir=bench.root / "simulators", env=bench.env,
                       extra=("--rate-limit", f"{arguments.rate}/1")) as sim:  # fmt: skip
            env = {**bench.env, "MKT_API_KEY": bench.api_key}
            if "outage" in plan.parts:
                progress(f"outage at {label(contacts)}: {arguments.outage_seconds:g} s of 503 from {arguments.outage_at:g} s in")
                result = _outage.run_outage(bench.run_dir(f"outage-{label(contacts)}"), env, sim.base_url,
                                            arguments.outage_at, arguments.outage_seconds)  # fmt: skip
                lines += _outage.report(f"outage, {label(contacts)} contacts, {arguments.rate} requests/s", result)
                print("\n".join(lines), flush=True)
            if "kill" in plan.parts:
                progress(f"kill -9 at {label(contacts)}: {arguments.kills} times")
                result = _outage.run_kills(bench.run_dir(f"kills-{label(contacts)}"), env, sim.base_url, arguments.kills)
                lines += _outage.report(f"kill -9 x{arguments.kills}, {label(contacts)} contacts, {arguments.rate} requests/s", result)
                print("\n".join(lines[-(len(result["runs"]) + 2):]), flush=True)
            if "daemon" in plan.parts:
                outage = arguments.daemon_outage_seconds
                progress(f"daemon at {label(contacts)}: {outage:g} s of 503 from {arguments.outage_at:g} s after the run started")
                run_dir = bench.run_dir(f"daemon-{label(contacts)}")
                _outage.requests_seen(sim.base_url)
                clean = _outage._sync(run_dir / "clean", env, run_dir / "clean.duckdb", sim.base_url)
                # Room for the three retries' waits (2 + 4 + 8 minutes by default) and two syncs.
                deadline = arguments.outage_at + outage + 1800 + 2 * clean["seconds"]
                result = _outage.run_daemon_outage(run_dir, env, sim.base_url, clean, run_dir / "clean.duckdb",
                                                   arguments.outage_at, outage, deadline)  # fmt: skip
                lines += _outage.report_daemon(
                    f"daemon, {outage:g} s outage, {label(contacts)} contacts, {arguments.rate} requests/s", result
                )
                print("\n".join(lines[-(len(result["runs"]) + 2):]), flush=True)
    return lines


def measure_webhooks(bench: Bench, plan: Plan, arguments: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Issue 26's targets at each size, ``--repeat`` times, each repeat against a fresh simulator
    (a change is made once): printed as each ends, then pooled."""
    options = _webhooks.Options(
        changes=arguments.webhook_changes, spacing=arguments.webhook_spacing, burst=arguments.webhook_burst,
        burst_batches=arguments.webhook_burst_seconds, poll=arguments.webhook_poll, floor_changes=arguments.webhook_floor_changes,
    )  # fmt: skip
    found: dict[str, list[dict[str, Any]]] = {}
    for contacts in plan.sizes:
        name = f"webhooks, {label(contacts)} contacts, {arguments.rate} requests/s"
        for repeat in range(1, plan.repeat + 1):
            progress(f"{name}, repeat {repeat}/{plan.repeat}: {options.changes} changes one every {options.spacing:g} s,"
                     f" then {options.burst} in {options.burst_batches} s")  # fmt: skip
            with simulator(contacts, latency=0.0, api_key=bench.api_key, log_dir=bench.root / "simulators", env=bench.env,
                           extra=("--rate-limit", f"{arguments.rate}/1")) as sim:  # fmt: skip
                env = {**bench.env, "MKT_API_KEY": bench.api_key}
                try:
                    result = _webhooks.run_webhooks(bench.run_dir(f"webhooks-{label(contacts)}-{repeat}"), env, sim.base_url,
                                                    sim.pid, options)  # fmt: skip
                except Exception as error:  # noqa: BLE001 - one failed repeat is reported, the others still run
                    bench.errors.append(f"{name}, repeat {repeat}: {type(error).__name__}: {error}")
                    progress(f"{name}, repeat {repeat} FAILED: {error}")
                    continue
            found.setdefault(str(contacts), []).append(result)
            print("\n".join(_webhooks.report(f"{name}, repeat {repeat}/{plan.repeat}", result)), flush=True)
        if found.get(str(contacts)):
            print("\n".join(_webhooks.summary(name, found[str(contacts)])), flush=True)
    return found


def measure(bench: Bench, plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"plan": asdict(plan) | {"parts": sorted(plan.parts)}, "sizes": {}}
    if "probe" in plan.parts:
        results["simulator_probe"] = run_simulator_probe(bench, plan.probe_sizes, plan.probe_requests)
    if "fixed" in plan.parts:
        fixed = measure_fixed_cost(bench, plan)
        results["fixed_cost"], results["fixed_cost_dlt"] = fixed["job"], fixed["dlt"]
        results["dagster_floor"], results["dagster_floor_no_checks"] = fixed["floor"], fixed["floor-no-checks"]
        results["dagster_floor_defs_folder"] = fixed["floor-defs-folder"]
        results["fixed_cost_dagster_dlt"] = fixed["dagster-dlt"]
    for contacts in plan.sizes:
        if plan.parts & {"bare", "asset", "job", "dlt", "dagster-dlt"}:
            results["sizes"][str(contacts)] = measure_size(bench, contacts, plan)
    if "latency" in plan.parts and plan.latency > 0:
        results["latency"] = {str(contacts): measure_latency(bench, contacts, plan) for contacts in plan.latency_sizes}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    plan, arguments = parse_arguments(argv)
    machine = describe_machine()
    print("\n".join(machine.lines()), flush=True)
    root = Path(tempfile.mkdtemp(prefix="mkt_bench_"))
    progress(f"work directory {root}")
    started = time.monotonic()
    bench = make_bench(root, pace_requests=not arguments.no_pace)
    compile_bytecode(project_package(), HERE)
    try:
        if "dlt" in plan.parts:
            bench.dlt_python = prepare_venv(bench, "dlt", arguments.dlt_venv, DLT_REQUIREMENTS, ("dlt", "pyarrow", "duckdb"))
        if "dagster-dlt" in plan.parts:
            bench.dagster_dlt_python = prepare_venv(
                bench, "dagster-dlt", arguments.dagster_dlt_venv, DAGSTER_DLT_REQUIREMENTS, ("dagster-dlt", "dagster", "dlt")
            )
        if plan.parts & {"outage", "kill", "daemon"}:
            measure_resume(bench, plan, arguments)  # prints each scenario as it ends
        webhooks = measure_webhooks(bench, plan, arguments) if "webhooks" in plan.parts else None
        results = measure(bench, plan)
        if webhooks is not None:
            results["webhooks"] = webhooks
        results["machine"] = asdict(machine)
        results["elapsed_seconds"] = time.monotonic() - started
        results["errors"] = bench.errors
        if arguments.json:
            arguments.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"Sizes {', '.join(label(size) for size in plan.sizes)}; {plan.repeat} run(s) each;"
              f" simulator in its own process; {results['elapsed_seconds'] / 60:.1f} min in all.")  # fmt: skip
        print()
        print(build_table(results, plan).render())
        print_noise(results)
        print_errors(bench.errors, root)
    finally:
        # The logs of failed runs are the only way to see why: keep them.
        if arguments.keep or bench.errors:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if bench.errors else 0


def prepare_venv(bench: Bench, what: str, venv: Path, requirements: Sequence[str], shown: Sequence[str]) -> Path | None:
    """A venv made once and reused; without it those runs are skipped, and said so."""
    try:
        python = ensure_venv(venv, requirements, log=progress)
        versions = installed_versions(python, shown)
    except (VenvFailed, OSError) as error:
        bench.errors.append(f"the {what} venv: {error}")
        progress(f"no {what} runs: {error}")
        return None
    print(f"{what + ':':<8} {', '.join(f'{name} {version}' for name, version in versions.items())}"
          f" (its own venv, {venv})", flush=True)  # fmt: skip
    return python


def all_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [*(results.get("fixed_cost") or []), *(results.get("fixed_cost_dlt") or []),
            *(results.get("fixed_cost_dagster_dlt") or [])]  # fmt: skip
    for by_kind in [*results["sizes"].values(), *(results.get("latency") or {}).values()]:
        for kind_runs in by_kind.values():
            runs.extend(kind_runs)
    return runs


def print_noise(results: dict[str, Any]) -> None:
    """The machine is shared: say how much CPU other processes took while runs were measured."""
    loads = [run["other_cpu_seconds"] / run["wall_seconds"] for run in all_runs(results) if run.get("wall_seconds")]
    if not loads:
        return
    typical, worst = statistics.median(loads), max(loads)
    print(f"\nOther processes on the machine used {typical:.2f} cores (median; worst {worst:.2f}) of"
          f" {os.cpu_count()} while runs were measured.")  # fmt: skip
    if typical > 0.2:
        print("The timings and time ratios above are pessimistic and noisy: rerun on a quiet machine to judge"
              " T2, T3, T6, N1, N2.")  # fmt: skip


def print_errors(errors: Sequence[str], root: Path) -> None:
    if not errors:
        return
    print(f"\n{len(errors)} run(s) FAILED and are left out of the medians (logs under {root}/runs):")
    for error in errors:
        lines = error.splitlines()
        # The first exception line in the log's tail says why (not Dagster's "Run ... failed").
        cause = next((line.strip() for line in lines[1:] if re.search(r"(Error|Exception)\b[^:]*:", line)
                      and "resulted in failure" not in line), "")  # fmt: skip
        print("  - " + lines[0][:300] + (f"\n    {cause[:300]}" if cause else ""))


if __name__ == "__main__":
    sys.exit(main())
