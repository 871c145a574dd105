"""Issue 26's targets, as a user runs the project: a change made upstream lands in the warehouse
within a minute through the webhook receiver, the changes sensor and the refresh job.

One scenario (``run_webhooks``), against a rate-limited simulator:

1. a first full sync (``dagster job execute -j marketing_sync``) into the scenario's DuckDB file;
2. the receiver (``mkt-assets webhooks serve`` with ``MKT_WEBHOOK_SECRET``, its inbox beside that
   file) registered in the simulator by ``mkt-assets webhooks register`` with its loopback URL;
   ``dagster-daemon run`` on the project's workspace in a Dagster home holding the project's
   dagster.yaml, the secret set, so the ``marketing_changes`` sensor runs by default;
3. one warm-up change, waited for and left out (the daemon's first ticks, its code server's start);
4. **latency**: ``changes`` changes one at a time, ``spacing`` seconds apart (tag added, tag
   removed, contact created, opt-in, in turn, each on a contact of its own), through the
   simulator's ``POST /__sandbox/changes``. Each change's time runs from its request until a
   read-only poll of the DuckDB file (every ``poll`` seconds) finds the contact as the change
   left it in ``contacts``, ``contact_tags``, ``contact_profiles`` and the open version of
   ``contacts_history``. Where that time went comes from the Dagster instance: the delivery, the
   sensor's tick (the run's creation), the queue, the run worker's start, the run until its
   contacts materialization, and the poll;
5. **burst**: ``burst`` changes in ``burst_batches`` requests one second apart; the time until
   every one landed, and every 429 answered: by the simulator to the API's clients (its request
   log) and by the receiver to the simulator's deliveries (the deliveries' answers and the
   receiver's log);
6. **Dagster's floor**: the daemon stopped, another one (same dagster.yaml) on a workspace holding
   ``_dagster_floor_defs.py`` shaped like the refresh runs were (their steps, assets and checks,
   nothing fetched or written) with a sensor at the changes sensor's interval reading a file: the
   file is bumped ``floor_changes`` times, ``spacing`` seconds apart, and each time from the bump
   to its run's end is what Dagster alone costs a change that goes through a sensor and a run.

API requests are counted from the simulator's request log (``/__sandbox/requests``) over each
phase: ``GET /api/contacts/{id}`` per changed contact, and every API request per changed contact.
The pure parts (expected states from deliveries, matching rows, percentiles, request counts, the
runs a change went through) are tested in ``test_harness.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _outage
import requests
from _measure import process_cpu_seconds, system_busy_seconds

REPO = _outage.REPO
BIN = _outage.BIN
HERE = Path(__file__).resolve().parent
FLOOR_DEFS = HERE / "_dagster_floor_defs.py"

SECRET_ENV = "MKT_WEBHOOK_SECRET"
SCHEMA = "marketing"
REFRESH_JOB = "marketing_refresh"
CONTACTS_KEY = (SCHEMA, "contacts")
TABLES = ("contacts", "contact_tags", "contact_profiles", "contacts_history")
# The changes, in turn: each on a contact of its own (a created contact is new anyway).
KINDS = ("CONTACT_TAG_ADDED", "CONTACT_TAG_REMOVED", "CONTACT_CREATED", "CONTACT_OPT_IN")
CONTACT_BY_ID = re.compile(r"^/api/contacts/\d+$")
RECEIVER_429 = re.compile(r"\(429\)")

# Issue 26's targets.
LATENCY_P95_MAX_SECONDS = 60.0
REQUESTS_PER_CONTACT_MAX = 1.0
BURST_MAX_SECONDS = 180.0

# Bounds of every wait.
START_SECONDS = 120.0  # the receiver's URL, the daemon's first run
LANDING_SECONDS = 600.0  # after the last change of a phase, for it to land
DELIVERY_WAIT_SECONDS = 60.0  # the simulator's own bound for one wait for deliveries
IDLE_SECONDS = 300.0  # for the refresh runs under way to end before the next phase


# ===================================================================== pure parts (tested)


@dataclass(frozen=True)
class Expected:
    """A contact as a change left it: what the four tables must show once the change landed."""

    contact_id: int
    event: str
    tag_ids: frozenset[int]
    unsubscribed: bool
    needs_confirmation: bool


def expected_from_delivery(body: str | bytes) -> Expected:
    """The contact a delivery carries (the whole contact as the API serves it after the change),
    in either of the simulator's shapes: ``{"type", "data": {"contact"}}`` or ``{"event",
    "contact"}``. ValueError when the body does not hold one."""
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError(f"a delivery body is a JSON object, got {type(obj).__name__}")
    event = obj.get("type") or obj.get("event")
    contact = obj.get("contact") if "contact" in obj else (obj.get("data") or {}).get("contact")
    if not isinstance(event, str) or not isinstance(contact, dict):
        raise ValueError(f"a delivery without an event or a contact: keys {sorted(obj)}")
    contact_id, tags = contact.get("id"), contact.get("tags")
    if type(contact_id) is not int or contact_id < 1 or not isinstance(tags, list):
        raise ValueError(f"a {event} delivery whose contact has no positive integer id or no tag list")
    tag_ids = [tag.get("id") if isinstance(tag, dict) else None for tag in tags]
    if any(type(tag_id) is not int for tag_id in tag_ids):
        raise ValueError(f"a {event} delivery for contact {contact_id} with a tag that has no integer id")
    flags = contact.get("unsubscribed"), contact.get("needsConfirmation")
    if not all(isinstance(flag, bool) for flag in flags):
        raise ValueError(f"a {event} delivery for contact {contact_id} without its unsubscribed and needsConfirmation flags")
    return Expected(contact_id, event, frozenset(tag_ids), bool(flags[0]), bool(flags[1]))


# What each table shows of a contact: (tag ids, unsubscribed, needs_confirmation), as far as it has them.
Row = tuple[Any, ...]


def landed_in(expected: Mapping[int, Expected], rows: Mapping[str, Mapping[int, Row]]) -> dict[str, set[int]]:
    """Per table, the contacts whose row shows what ``expected`` says. ``rows[table][id]``:
    contacts and contacts_history (its open version) ``(tag ids, unsubscribed, needs_confirmation)``,
    contact_profiles ``(tag ids, unsubscribed)``, contact_tags ``(tag ids,)``; a contact with no
    row in contact_tags has no tag there."""
    found: dict[str, set[int]] = {table: set() for table in TABLES}
    for contact_id, wanted in expected.items():
        full = (wanted.tag_ids, wanted.unsubscribed, wanted.needs_confirmation)
        tags = rows.get("contact_tags", {}).get(contact_id)
        if (frozenset(tags[0]) if tags else frozenset()) == wanted.tag_ids:
            found["contact_tags"].add(contact_id)
        profile = rows.get("contact_profiles", {}).get(contact_id)
        if profile is not None and (frozenset(profile[0]), profile[1]) == full[:2]:
            found["contact_profiles"].add(contact_id)
        for table in ("contacts", "contacts_history"):
            row = rows.get(table, {}).get(contact_id)
            if row is not None and (frozenset(row[0]), row[1], row[2]) == full:
                found[table].add(contact_id)
    return found


def unchanged(expected: Expected, before: Row | None) -> bool:
    """Whether a change left its contact as the first sync stored it ``(tag ids, unsubscribed,
    needs_confirmation)``: then no table can show it landing, and it is not measured."""
    return before is not None and (frozenset(before[0]), before[1], before[2]) == (
        expected.tag_ids, expected.unsubscribed, expected.needs_confirmation,
    )  # fmt: skip


def choose_changes(
    contacts: Sequence[tuple[int, Sequence[int], bool]], tag_ids: Sequence[int], count: int, rng: random.Random,
    used: set[int],
) -> list[dict[str, Any]]:  # fmt: skip
    """``count`` changes in the admin format, cycling through ``KINDS``, each on a contact not in
    ``used`` (which it joins): a tag the contact lacks added, one it has removed, a contact
    created, an unsubscribed contact opted in. ``contacts``: ``(id, tag ids, unsubscribed)``."""
    order = list(contacts)
    rng.shuffle(order)
    position = dict.fromkeys(KINDS, 0)
    eligible = {
        "CONTACT_TAG_ADDED": lambda tags, unsubscribed: len(set(tags)) < len(tag_ids),
        "CONTACT_TAG_REMOVED": lambda tags, unsubscribed: bool(tags),
        "CONTACT_OPT_IN": lambda tags, unsubscribed: unsubscribed,
    }
    changes = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        if kind == "CONTACT_CREATED":
            changes.append({"event": kind})
            continue
        while position[kind] < len(order):
            contact_id, tags, unsubscribed = order[position[kind]]
            position[kind] += 1
            if contact_id not in used and eligible[kind](tags, unsubscribed):
                break
        else:
            raise ValueError(f"not enough contacts for {count} changes: none left for {kind} (change {index})")
        used.add(contact_id)
        change: dict[str, Any] = {"event": kind, "contact": contact_id}
        if kind == "CONTACT_TAG_ADDED":
            change["tag"] = rng.choice(sorted(set(tag_ids) - set(tags)))
        elif kind == "CONTACT_TAG_REMOVED":
            change["tag"] = rng.choice(sorted(set(tags)))
        changes.append(change)
    return changes


def percentile(values: Iterable[float], share: float) -> float:
    """The nearest-rank percentile: a value measured, the smallest with at least ``share`` of
    the values at or below it (p95 of 20 values is the 19th)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def api_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the simulator's request log says of a phase: API requests in all, ``GET
    /api/contacts/{id}`` among them (and how many distinct contacts they read), 429s answered,
    and the requests by path (ids folded)."""
    total = by_id = too_many = 0
    read: set[str] = set()
    paths: Counter[str] = Counter()
    for record in records:
        path = record["path"]
        if not path.startswith("/api/"):
            continue
        total += 1
        too_many += record.get("status") == 429
        if record.get("method") == "GET" and CONTACT_BY_ID.match(path):
            by_id += 1
            read.add(path)
            paths["GET /api/contacts/{id}"] += 1
        else:
            paths[f"{record.get('method')} {path}"] += 1
    return {"api": total, "by_id": by_id, "contacts_read": len(read), "429": too_many, "paths": dict(paths)}


def receiver_429s(log_text: str) -> int:
    """Deliveries the receiver refused over its rate limit, from its log (one line each)."""
    return sum(1 for line in log_text.splitlines() if "rate limit" in line and RECEIVER_429.search(line))


def contact_ids_of(run_config: Mapping[str, Any]) -> set[int]:
    """The contacts a refresh run was launched for: ``contact_ids`` in its op's config."""
    found: set[int] = set()
    for op in (run_config.get("ops") or {}).values():
        config = (op or {}).get("config") or {}
        found.update(value for value in config.get("contact_ids") or () if type(value) is int)
    return found


@dataclass
class RunTimes:
    """One run as the instance stores it (times as Unix seconds; None: not reached)."""

    run_id: str
    status: str
    created: float
    starting: float | None  # taken off the queue by the daemon (RUN_STARTING)
    started: float | None  # the run worker began the run (RUN_START)
    contacts_at: float | None  # the contacts materialization (after the commit)
    ended: float | None
    contact_ids: set[int] = field(default_factory=set)
    run_key: str | None = None


def run_of(contact_id: int, runs: Sequence[RunTimes]) -> RunTimes | None:
    """The first run (by creation) launched for ``contact_id``."""
    return next((run for run in sorted(runs, key=lambda r: r.created) if contact_id in run.contact_ids), None)


def floor_run_of(trigger: int, runs: Sequence[RunTimes]) -> RunTimes | None:
    """The floor run that took trigger ``trigger``: the first (by creation) whose run key, the
    trigger count its sensor saw, is at least it (two bumps within a tick make one run)."""
    keyed = [run for run in runs if run.run_key is not None and run.run_key.isdigit()]
    return next((run for run in sorted(keyed, key=lambda r: r.created) if int(run.run_key or 0) >= trigger), None)


SEGMENTS = ("delivered", "sensor", "queue", "launch", "run", "seen")
SEGMENT_NAMES = {
    "delivered": "delivery kept by the receiver",
    "sensor": "sensor tick (run created)",
    "queue": "run queue",
    "launch": "run worker start",
    "run": "run until contacts materialized",
    "seen": "seen by the poll",
    "end": "run start to end",
}


def segments(changed: float, delivered: float | None, run: RunTimes | None, landed: float | None) -> dict[str, float]:
    """Where a change's time went, each segment from the previous mark (missing marks skipped)."""
    marks = [
        ("delivered", delivered),
        ("sensor", run.created if run else None),
        ("queue", run.starting if run else None),
        ("launch", run.started if run else None),
        ("run", run.contacts_at if run else None),
        ("seen", landed),
    ]
    found, previous = {}, changed
    for name, at in marks:
        if at is not None:
            found[name] = at - previous
            previous = at
    return found


# ===================================================================== the warehouse, polled


def read_rows(database: Path, ids: Sequence[int]) -> dict[str, dict[int, Row]]:
    """The four tables' rows of ``ids``, read in one read-only connection (which raises
    duckdb.IOException while a writer holds the file)."""
    import duckdb

    tags = "list_sort([t.id FOR t IN coalesce(tags, [])])"
    queries = {
        "contacts": f"SELECT id, {tags}, unsubscribed, needs_confirmation FROM {SCHEMA}.contacts"
        " WHERE _deleted_at IS NULL AND id IN (SELECT unnest($ids))",
        "contact_tags": f"SELECT contact_id, list_sort(list(tag_id)) FROM {SCHEMA}.contact_tags"
        " WHERE contact_id IN (SELECT unnest($ids)) GROUP BY contact_id",
        "contact_profiles": f"SELECT contact_id, list_sort(tag_ids), unsubscribed FROM {SCHEMA}.contact_profiles"
        " WHERE contact_id IN (SELECT unnest($ids))",
        "contacts_history": f"SELECT id, {tags}, unsubscribed, needs_confirmation FROM {SCHEMA}.contacts_history"
        " WHERE _valid_to IS NULL AND id IN (SELECT unnest($ids))",
    }
    found: dict[str, dict[int, Row]] = {}
    with duckdb.connect(str(database), read_only=True, config={"threads": 1}) as connection:
        for table, query in queries.items():
            found[table] = {row[0]: tuple(row[1:]) for row in connection.execute(query, {"ids": list(ids)}).fetchall()}
    return found


class Watch:
    """Changes waiting to land, polled from a thread: per change, when each table first showed
    it; landed when all four have."""

    def __init__(self, database: Path, interval: float) -> None:
        self.database, self.interval = database, interval
        self.lock = threading.Lock()
        self.expected: dict[int, Expected] = {}
        self.pending: set[int] = set()
        self.seen: dict[int, dict[str, float]] = {}
        self.landed: dict[int, float] = {}
        self.polls = self.busy = 0
        self.poll_seconds: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="warehouse-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def add(self, expected: Iterable[Expected]) -> None:
        with self.lock:
            for one in expected:
                self.expected[one.contact_id] = one
                self.pending.add(one.contact_id)
                self.seen.setdefault(one.contact_id, {})

    def wait(self, ids: Iterable[int], deadline: float) -> bool:
        """Until every one of ``ids`` landed (True) or ``deadline`` (time.time()) passed."""
        wanted = set(ids)
        while time.time() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the warehouse poll failed: {self.error}") from self.error
            with self.lock:
                if wanted <= set(self.landed):
                    return True
            time.sleep(0.2)  # polling the watcher's state, with a deadline
        return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
                self.error = error
                return

    def poll(self) -> None:
        import duckdb

        with self.lock:
            ids = sorted(self.pending)
            expected = {contact_id: self.expected[contact_id] for contact_id in ids}
        if not ids:
            return
        at = time.time()
        try:
            rows = read_rows(self.database, ids)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            self.busy += 1  # a writer holds the file: the next poll will see what it wrote
            return
        self.polls += 1
        self.poll_seconds.append(time.time() - at)
        with self.lock:
            for table, matched in landed_in(expected, rows).items():
                for contact_id in matched:
                    self.seen[contact_id].setdefault(table, at)
            for contact_id in ids:
                if len(self.seen[contact_id]) == len(TABLES):
                    self.landed[contact_id] = max(self.seen[contact_id].values())
                    self.pending.discard(contact_id)


def stored_contacts(database: Path) -> tuple[list[tuple[int, list[int], bool]], list[int], dict[int, Row]]:
    """What the first sync stored: each live contact's (id, tag ids, unsubscribed), the live
    tags' ids, and each contact's (tag ids, unsubscribed, needs_confirmation)."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as connection:
        rows = connection.execute(
            f"SELECT id, list_sort([t.id FOR t IN coalesce(tags, [])]), unsubscribed, needs_confirmation"
            f" FROM {SCHEMA}.contacts WHERE _deleted_at IS NULL ORDER BY id"
        ).fetchall()
        tags = [row[0] for row in connection.execute(f"SELECT id FROM {SCHEMA}.tags WHERE _deleted_at IS NULL ORDER BY id").fetchall()]
    contacts = [(row[0], list(row[1]), bool(row[2])) for row in rows]
    return contacts, tags, {row[0]: (row[1], row[2], row[3]) for row in rows}


# ===================================================================== processes


def _admin(base_url: str, method: str, what: str, body: Any = None, timeout: float = 90) -> Any:
    root = base_url.rsplit("/api", 1)[0]
    answer = requests.request(method, f"{root}/__sandbox/{what}", json=body, timeout=timeout)
    answer.raise_for_status()
    return answer.json()


def _stop_group(process: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for_line(log: Path, pattern: re.Pattern[str], process: subprocess.Popen[bytes], what: str) -> re.Match[str]:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text(errors="replace"))
        if found:
            return found
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}); its log: {log}")
        time.sleep(0.1)  # another process's output, with a deadline
    raise RuntimeError(f"{what} printed nothing matching {pattern.pattern!r} in {START_SECONDS:.0f} s ({log})")


def start_receiver(root: Path, env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    log = root / "receiver.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mkt_assets.cli", "webhooks", "serve", "--port", "0"],
            env=dict(env), cwd=root, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = _wait_for_line(log, re.compile(r"serving (\S+);"), process, "the webhook receiver").group(1)
    return process, url, log


def register(root: Path, env: Mapping[str, str], url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mkt_assets.cli", "webhooks", "register", "--url", url],
        env=dict(env), cwd=root, capture_output=True, timeout=START_SECONDS, check=False,
    )  # fmt: skip
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode:
        raise RuntimeError(f"mkt-assets webhooks register failed ({done.returncode}): {output[-2000:]}")
    return output.strip()


def start_daemon(home: Path, workspace: Path, env: Mapping[str, str], log: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """``dagster-daemon run`` in a new Dagster home with the project's dagster.yaml, and the
    instance it uses. The instance's storage is made here first: made by the daemon, its code
    server and this process at once, SQLite's schema versions can be stamped twice, and the code
    location then fails to load ("alembic_version has more than one head")."""
    import dagster as dg

    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    instance = dg.DagsterInstance.from_config(str(home))
    with open(log, "wb") as output:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=home, env={**env, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return daemon, instance


def run_times(instance: Any, job_name: str) -> list[RunTimes]:
    """Every run of ``job_name`` in the instance, with the marks ``segments`` reads."""
    import dagster as dg

    found = []
    for record in instance.get_run_records(dg.RunsFilter(job_name=job_name)):
        run = record.dagster_run
        marks: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None:
                continue
            kind = event.event_type
            if kind == dg.DagsterEventType.RUN_STARTING:
                marks.setdefault("starting", entry.timestamp)
            elif kind == dg.DagsterEventType.RUN_START:
                marks.setdefault("started", entry.timestamp)
            elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
                materialized = entry.asset_materialization
                if materialized is not None and tuple(materialized.asset_key.path) == CONTACTS_KEY:
                    marks.setdefault("contacts_at", entry.timestamp)
        found.append(RunTimes(
            run_id=run.run_id, status=run.status.value, created=record.create_timestamp.timestamp(),
            starting=marks.get("starting"), started=marks.get("started") or record.start_time,
            contacts_at=marks.get("contacts_at"), ended=record.end_time if run.is_finished else None,
            contact_ids=contact_ids_of(run.run_config), run_key=run.tags.get("dagster/run_key"),
        ))  # fmt: skip
    return sorted(found, key=lambda run: run.created)


def run_shape(instance: Any, run_id: str) -> dict[str, Any]:
    """The steps of a run, each with the assets it materialized and the checks it evaluated:
    the shape ``_dagster_floor_defs.py`` rebuilds."""
    import dagster as dg

    steps: dict[str, dict[str, list[Any]]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        step = steps.setdefault(entry.step_key.replace(".", "_"), {"assets": [], "checks": []})
        if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION and entry.asset_materialization is not None:
            step["assets"].append(entry.asset_materialization.asset_key.to_user_string())
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            step["checks"].append([evaluation.asset_key.to_user_string(), evaluation.check_name])
    steps = {name: step for name, step in steps.items() if step["assets"]}
    return {
        "assets": sorted(asset for step in steps.values() for asset in step["assets"]),
        "checks": sorted(check for step in steps.values() for check in step["checks"]),
        "steps": steps,
    }


def _sensor_interval(env: Mapping[str, str]) -> int:
    """The changes sensor's interval, from the project (in a child: the harness stays light)."""
    done = subprocess.run(
        [sys.executable, "-c", "from mkt_assets.orchestration.webhooks import SENSOR_INTERVAL_SECONDS as s; print(s)"],
        env=dict(env), capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return int(done.stdout.decode().strip())


def _wait_runs_idle(instance: Any, job_name: str, deadline: float) -> bool:
    """Until no run of ``job_name`` is queued or under way (bounded)."""
    import dagster as dg

    busy = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    while time.time() < deadline:
        if not instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=busy)):
            return True
        time.sleep(1.0)  # the daemon's runs, with a deadline
    return False


# ===================================================================== the scenario


@dataclass
class Options:
    changes: int = 20
    spacing: float = 7.0
    burst: int = 1000
    burst_batches: int = 10
    poll: float = 1.0
    floor_changes: int = 10
    seed: int = 26


def apply_changes(base_url: str, changes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return _admin(base_url, "POST", "changes", list(changes))["results"]


def drain_deliveries(base_url: str, deadline: float) -> list[dict[str, Any]]:
    """Once the simulator sent every delivery queued (bounded), its delivery log."""
    while time.time() < deadline:
        if _admin(base_url, "POST", "deliveries/wait", {"timeout": min(DELIVERY_WAIT_SECONDS, max(1.0, deadline - time.time()))})["drained"]:
            break
    return _admin(base_url, "GET", "deliveries")["deliveries"]


def expectations(results: Sequence[Mapping[str, Any]], deliveries: Sequence[Mapping[str, Any]]) -> dict[int, tuple[Expected, float]]:
    """Per changed contact, what its delivery says it became and when the delivery was done."""
    by_key: dict[tuple[str, int], tuple[Expected, float]] = {}
    for delivery in deliveries:
        if delivery.get("status") == 200:
            expected = expected_from_delivery(delivery["body"])
            by_key.setdefault((expected.event, expected.contact_id), (expected, delivery["at"]))
    found = {}
    for result in results:
        key = (result["event"], result["contact_id"])
        if key in by_key:
            found[result["contact_id"]] = by_key[key]
    return found


def run_webhooks(root: Path, env: Mapping[str, str], base_url: str, simulator_pid: int, options: Options) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    began, own_before, busy_before = time.time(), _own_cpu(), system_busy_seconds()
    simulator_before = process_cpu_seconds(simulator_pid)
    load_before = os.getloadavg()
    warehouse = root / "warehouse"
    warehouse.mkdir(mode=0o700)
    database = warehouse / "sync.duckdb"  # not marketing.duckdb: its catalog would shadow the schema
    secret = secrets.token_hex(32)
    child_env = {
        **env, "MKT_API_BASE_URL": base_url, "MKT_DUCKDB_PATH": str(database), SECRET_ENV: secret,
        "MKT_SYNC_CRON": _outage.NEVER_DURING_THE_SCENARIO, "MKT_INCREMENTAL_CRON": _outage.NEVER_DURING_THE_SCENARIO,
    }  # fmt: skip
    result: dict[str, Any] = {"options": options.__dict__}
    _outage.requests_seen(base_url)
    result["first_sync"] = first = _outage._sync(root / "first-sync", env, database, base_url)
    if not first["ok"]:
        raise RuntimeError(f"the first full sync failed: {root / 'first-sync' / 'output.log'}")
    contacts, tag_ids, before = stored_contacts(database)
    rng, used = random.Random(options.seed), set()
    warm_up = choose_changes(contacts, tag_ids, 1, rng, used)
    latency_changes = choose_changes(contacts, tag_ids, options.changes, rng, used)
    burst_changes = choose_changes(contacts, tag_ids, options.burst, rng, used)
    interval = _sensor_interval(child_env)

    receiver, url, receiver_log = start_receiver(root, child_env)
    home = root / "daemon-home"
    try:
        daemon, instance = start_daemon(home, REPO / "workspace.yaml", child_env, root / "daemon.log")
    except BaseException:
        _stop_group(receiver)
        raise
    try:
        result["registered"] = register(root, child_env, url)
        with Watch(database, options.poll) as watch:
            result["warm_up"] = _latency_phase(base_url, watch, warm_up, 0.0, before)
            if not result["warm_up"]["all_landed"]:
                raise RuntimeError(f"the warm-up change did not land within {LANDING_SECONDS:.0f} s (see {root / 'daemon.log'})")
            _wait_runs_idle(instance, REFRESH_JOB, time.time() + IDLE_SECONDS)
            result["latency"] = _latency_phase(base_url, watch, latency_changes, options.spacing, before, receiver_log)
            _wait_runs_idle(instance, REFRESH_JOB, time.time() + IDLE_SECONDS)
            result["burst"] = _burst_phase(base_url, watch, burst_changes, options.burst_batches, before, receiver_log)
            _wait_runs_idle(instance, REFRESH_JOB, time.time() + IDLE_SECONDS)
            result["watch"] = {"polls": watch.polls, "busy": watch.busy, "poll_seconds": watch.poll_seconds}
        runs = run_times(instance, REFRESH_JOB)
    finally:
        _stop_group(daemon)
        _stop_group(receiver)
    result["runs"] = [run.__dict__ | {"contact_ids": sorted(run.contact_ids)} for run in runs]
    for phase in ("warm_up", "latency", "burst"):
        _attach_runs(result[phase], runs)
    result["sensor_interval"] = interval
    done = [run for run in runs if run.status == "SUCCESS" and run.contact_ids]
    if done and options.floor_changes:
        shape = run_shape(instance, done[len(done) // 2].run_id)
        result["floor"] = run_floor(root, env, shape, interval, options)
    result["other_load"] = {
        "busy": system_busy_seconds() - busy_before, "own": _own_cpu() - own_before,
        "simulator": process_cpu_seconds(simulator_pid) - simulator_before, "wall": time.time() - began,
    }  # fmt: skip
    result["load"] = {"before": load_before, "after": os.getloadavg()}
    return result


def _latency_phase(
    base_url: str, watch: Watch, changes: Sequence[Mapping[str, Any]], spacing: float, before: Mapping[int, Row],
    receiver_log: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The changes one at a time, ``spacing`` seconds apart; each watched until it lands."""
    _admin(base_url, "DELETE", "requests")
    _admin(base_url, "DELETE", "deliveries")
    log_from = receiver_log.stat().st_size if receiver_log else 0
    started = time.time()
    items = []
    for number, change in enumerate(changes):
        _sleep_until(started + number * spacing)
        changed = time.time()
        results = apply_changes(base_url, [change])
        found = expectations(results, drain_deliveries(base_url, time.time() + 2 * DELIVERY_WAIT_SECONDS))
        items += [_item(result, changed, found, before, watch) for result in results]
    watched = [item["contact_id"] for item in items if "problem" not in item]
    all_landed = watch.wait(watched, time.time() + LANDING_SECONDS)
    return _phase_result(base_url, watch, items, started, all_landed, receiver_log, log_from)


def _item(
    result: Mapping[str, Any], changed: float, found: Mapping[int, Any], before: Mapping[int, Row], watch: Watch
) -> dict[str, Any]:
    """One change as the report shows it; watched for until it lands, unless no delivery said
    what it made of the contact or it left the contact as stored."""
    expected, delivered = found.get(result["contact_id"], (None, None))
    item = {"event": result["event"], "contact_id": result["contact_id"], "changed": changed, "delivered": delivered}
    if expected is None:
        item["problem"] = "no delivery answered 200"
    elif unchanged(expected, before.get(expected.contact_id)):
        item["problem"] = "the change left the contact as stored"
    else:
        watch.add([expected])
    return item


def _burst_phase(
    base_url: str, watch: Watch, changes: Sequence[Mapping[str, Any]], batches: int, before: Mapping[int, Row],
    receiver_log: Path,
) -> dict[str, Any]:  # fmt: skip
    """``changes`` in ``batches`` requests one second apart (within ``batches`` seconds)."""
    _admin(base_url, "DELETE", "requests")
    _admin(base_url, "DELETE", "deliveries")
    log_from = receiver_log.stat().st_size
    size = math.ceil(len(changes) / batches)
    started = time.time()
    applied: list[tuple[dict[str, Any], float]] = []
    for number in range(batches):
        _sleep_until(started + number)
        changed = time.time()
        applied += [(result, changed) for result in apply_changes(base_url, changes[number * size : (number + 1) * size])]
    sent = time.time() - started
    found = expectations([result for result, _ in applied], drain_deliveries(base_url, time.time() + LANDING_SECONDS))
    items = [_item(result, changed, found, before, watch) for result, changed in applied]
    watched = [item["contact_id"] for item in items if "problem" not in item]
    all_landed = watch.wait(watched, started + LANDING_SECONDS)
    phase = _phase_result(base_url, watch, items, started, all_landed, receiver_log, log_from)
    phase["sent_seconds"] = sent
    return phase


def _phase_result(
    base_url: str, watch: Watch, items: list[dict[str, Any]], started: float, all_landed: bool, receiver_log: Path | None,
    log_from: int,
) -> dict[str, Any]:  # fmt: skip
    with watch.lock:
        for item in items:
            item["landed"] = watch.landed.get(item["contact_id"])
            item["seen"] = dict(watch.seen.get(item["contact_id"], {}))
    deliveries = _admin(base_url, "GET", "deliveries")["deliveries"]
    statuses = Counter(str(delivery.get("status")) for delivery in deliveries)
    receiver_text = ""
    if receiver_log is not None:
        with open(receiver_log, "rb") as log:
            log.seek(log_from)
            receiver_text = log.read().decode(errors="replace")
    return {
        "started": started, "all_landed": all_landed, "items": items,
        "requests": api_counts(_admin(base_url, "GET", "requests")["requests"]),
        "delivery_statuses": dict(statuses), "delivery_attempts": sum(d.get("attempts", 0) for d in deliveries),
        "receiver_429": receiver_429s(receiver_text),
    }  # fmt: skip


def _attach_runs(phase: dict[str, Any], runs: Sequence[RunTimes]) -> None:
    for item in phase["items"]:
        run = run_of(item["contact_id"], runs)
        item["run"] = run.run_id if run else None
        item["segments"] = segments(item["changed"], item["delivered"], run, item["landed"])
        item["run_ended"] = run.ended if run else None


def run_floor(root: Path, env: Mapping[str, str], shape: dict[str, Any], interval: int, options: Options) -> dict[str, Any]:
    """Dagster alone, under the same daemon settings: a sensor at the changes sensor's interval
    reading a file, and a do-nothing run of the refresh's shape for each bump of it."""

    shape_file = root / "floor-shape.json"
    shape_file.write_text(json.dumps(shape))
    trigger = root / "floor-trigger"
    trigger.write_text("0")
    workspace = root / "floor-workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_file:\n"
        f"      relative_path: {json.dumps(str(FLOOR_DEFS))}\n      location_name: bench_floor\n"
        f"      working_directory: {json.dumps(str(HERE))}\n"
    )
    floor_env = {
        **env, "BENCH_FLOOR_SHAPE": str(shape_file), "BENCH_FLOOR_JOB": REFRESH_JOB, "BENCH_FLOOR_POOL": "bench_floor",
        "BENCH_FLOOR_TRIGGER": str(trigger), "BENCH_FLOOR_SENSOR_SECONDS": str(interval),
    }  # fmt: skip
    daemon, instance = start_daemon(root / "floor-home", workspace, floor_env, root / "floor-daemon.log")
    bumps: list[tuple[int, float]] = []
    try:
        # A warm-up bump, left out: the daemon's first ticks and its code server's start.
        trigger.write_text("1")
        deadline = time.time() + LANDING_SECONDS
        while time.time() < deadline and not any(run.ended for run in run_times(instance, REFRESH_JOB)):
            time.sleep(1.0)  # the daemon's first run, with a deadline
        _wait_runs_idle(instance, REFRESH_JOB, time.time() + IDLE_SECONDS)
        started = time.time()
        for number in range(options.floor_changes):
            _sleep_until(started + number * options.spacing)
            bumps.append((number + 2, time.time()))
            trigger.write_text(str(number + 2))
        deadline = time.time() + LANDING_SECONDS
        while time.time() < deadline:
            runs = run_times(instance, REFRESH_JOB)
            taken = [floor_run_of(count, runs) for count, _ in bumps]
            if all(run is not None and run.ended for run in taken):
                break
            time.sleep(1.0)  # the daemon's runs, with a deadline
        runs = run_times(instance, REFRESH_JOB)
    finally:
        _stop_group(daemon)
    items = []
    for count, at in bumps:
        run = floor_run_of(count, runs)
        items.append({
            "bump": count, "changed": at, "run": run.run_id if run else None, "ended": run.ended if run else None,
            "contacts_at": run.contacts_at if run else None,
            "segments": segments(at, None, run, None) | ({"end": run.ended - (run.started or at)} if run and run.ended else {}),
        })  # fmt: skip
    return {"items": items, "shape": {name: {k: len(v) for k, v in step.items()} for name, step in shape["steps"].items()},
            "runs": len([run for run in runs if run.ended])}  # fmt: skip


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)  # the schedule of the changes, not a synchronisation


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ===================================================================== the report


def _seconds(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f} s"


def latencies(phase: Mapping[str, Any]) -> list[float]:
    return [item["landed"] - item["changed"] for item in phase["items"] if item.get("landed")]


def report(name: str, result: Mapping[str, Any]) -> list[str]:
    first, options = result["first_sync"], result["options"]
    lines = [f"{name}: first full sync {first['requests']} requests, {first['seconds']:.1f} s"]
    warm = latencies(result["warm_up"])
    lines.append(f"  warm-up change (the daemon's first run, left out): {_seconds(warm[0] if warm else None)}")
    latency = result["latency"]
    values = latencies(latency)
    watched = [item for item in latency["items"] if "problem" not in item]
    p95 = percentile(values, 0.95) if len(values) == len(watched) else math.inf
    lines.append(
        f"  latency, {len(latency['items'])} changes one every {options['spacing']:g} s (daemon at its defaults, sensor every"
        f" {result['sensor_interval']} s): {len(values)}/{len(watched)} landed; p50 {_seconds(percentile(values, 0.5))},"
        f" p95 {_seconds(percentile(values, 0.95))}, max {_seconds(max(values, default=math.nan))}"
        f" (target p95 <= {LATENCY_P95_MAX_SECONDS:g} s): {'PASS' if p95 <= LATENCY_P95_MAX_SECONDS else 'FAIL'}"
    )
    by_kind = {kind: [item["landed"] - item["changed"] for item in watched if item["event"] == kind and item.get("landed")] for kind in KINDS}
    lines.append("    by kind (p50 / max): " + "; ".join(
        f"{kind.removeprefix('CONTACT_').lower()} {_seconds(percentile(v, 0.5))} / {_seconds(max(v, default=math.nan))}"
        for kind, v in by_kind.items()))  # fmt: skip
    lines.append("    where the time went (median / max): " + breakdown(watched))
    to_end = [item["run_ended"] - item["changed"] for item in watched if item.get("run_ended")]
    lines.append(f"    change to its run's end: p50 {_seconds(percentile(to_end, 0.5))}, p95 {_seconds(percentile(to_end, 0.95))}")
    lines.append("    " + runs_line(result["runs"], latency))
    lines += request_lines(latency, len(watched))
    problems = [item for item in latency["items"] + result["burst"]["items"] if "problem" in item]
    if problems:
        lines.append(f"    NOT MEASURED: {len(problems)} change(s): " + "; ".join(sorted({p['problem'] for p in problems})))
    burst = result["burst"]
    burst_watched = [item for item in burst["items"] if "problem" not in item]
    landed = [item["landed"] for item in burst_watched if item.get("landed")]
    all_in = (max(landed) - burst["started"]) if landed and len(landed) == len(burst_watched) else math.inf
    too_many = burst["requests"]["429"] + burst["receiver_429"] + int(burst["delivery_statuses"].get("429", 0))
    lines.append(
        f"  burst, {len(burst['items'])} changes sent in {burst['sent_seconds']:.1f} s: {len(landed)}/{len(burst_watched)} landed,"
        f" all within {_seconds(all_in)} (target <= {BURST_MAX_SECONDS:g} s): {'PASS' if all_in <= BURST_MAX_SECONDS else 'FAIL'};"
        f" 429s: {burst['requests']['429']} by the simulator, {burst['receiver_429']} by the receiver"
        f" (deliveries answered {format_statuses(burst['delivery_statuses'])}): {'PASS' if too_many == 0 else 'FAIL'}"
    )
    lines.append("    " + runs_line(result["runs"], burst, detail=True))
    lines.append("    where the time went (median / max): " + breakdown(burst_watched))
    lines += request_lines(burst, len(burst_watched))
    floor = result.get("floor")
    if floor:
        marks = [item["contacts_at"] - item["changed"] for item in floor["items"] if item.get("contacts_at")]
        ends = [item["ended"] - item["changed"] for item in floor["items"] if item.get("ended")]
        shape = ", ".join(f"{step} {counts['assets']} assets {counts['checks']} checks" for step, counts in floor["shape"].items())
        lines.append(
            f"  Dagster's floor ({shape}; nothing fetched or written; a sensor every {result['sensor_interval']} s reading a file;"
            f" same dagster.yaml; {len(floor['items'])} bumps one every {options['spacing']:g} s): bump to its contacts"
            f" materialization p50 {_seconds(percentile(marks, 0.5))}, p95 {_seconds(percentile(marks, 0.95))},"
            f" max {_seconds(max(marks, default=math.nan))}; to its run's end p50 {_seconds(percentile(ends, 0.5))},"
            f" p95 {_seconds(percentile(ends, 0.95))}"
        )
        lines.append("    where the time went (median / max): " + breakdown(floor["items"], ("sensor", "queue", "launch", "run", "end")))
    watch = result["watch"]
    other = result["other_load"]
    lines.append(
        f"  warehouse polls: {watch['polls']} (median {percentile(watch['poll_seconds'], 0.5) * 1000:.0f} ms), {watch['busy']} found"
        f" the file held by a writer; load averages {' '.join(f'{v:.2f}' for v in result['load']['before'])} before,"
        f" {' '.join(f'{v:.2f}' for v in result['load']['after'])} after; other processes"
        f" {max(0.0, other['busy'] - other['own'] - other.get('simulator', 0.0)) / max(1.0, other['wall']):.2f} cores on average"
    )
    return lines


def breakdown(items: Sequence[Mapping[str, Any]], names: Sequence[str] = SEGMENTS) -> str:
    shown = []
    for name in names:
        values = [item["segments"][name] for item in items if name in item.get("segments", {})]
        if values:
            label = SEGMENT_NAMES[name]
            shown.append(f"{label} {percentile(values, 0.5):.1f} / {max(values):.1f}")
    return ", ".join(shown) or "n/a"


def runs_line(runs: Sequence[Mapping[str, Any]], phase: Mapping[str, Any], detail: bool = False) -> str:
    ids = {item["run"] for item in phase["items"] if item.get("run")}
    mine = [run for run in runs if run["run_id"] in ids]
    if not mine:
        return "no refresh run found for these changes"
    sizes = [len(run["contact_ids"]) for run in mine]
    took = [run["ended"] - run["started"] for run in mine if run["ended"] and run["started"]]
    line = (
        f"{len(mine)} refresh run(s), {min(sizes)}-{max(sizes)} contacts each, start to end p50 {_seconds(percentile(took, 0.5))},"
        f" max {_seconds(max(took, default=math.nan))}"
    )
    if detail:
        at = phase["started"]
        line += "; " + "; ".join(
            f"{len(run['contact_ids'])} contacts: created +{run['created'] - at:.0f} s, started +{(run['started'] or at) - at:.0f} s,"
            f" contacts committed +{(run['contacts_at'] or at) - at:.0f} s, ended +{(run['ended'] or at) - at:.0f} s"
            for run in mine
        )
    return line


def request_lines(phase: Mapping[str, Any], changed: int) -> list[str]:
    counts = phase["requests"]
    per_contact = counts["api"] / max(1, changed)
    others = {path: n for path, n in counts["paths"].items() if path != "GET /api/contacts/{id}"}
    return [
        f"    API: {counts['by_id']} GET /api/contacts/{{id}} ({counts['contacts_read']} contacts) for {changed} changed contacts,"
        f" {counts['api']} API requests in all: {per_contact:.2f} per changed contact (target <= {REQUESTS_PER_CONTACT_MAX:g}):"
        f" {'PASS' if per_contact <= REQUESTS_PER_CONTACT_MAX else 'FAIL'}"
        + (f"; others: {', '.join(f'{path} x{n}' for path, n in sorted(others.items()))}" if others else "")
    ]


def format_statuses(statuses: Mapping[str, int]) -> str:
    return ", ".join(f"{status} x{count}" for status, count in sorted(statuses.items())) or "none"


def summary(name: str, results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Over every repeat: the latencies pooled, each repeat's p95 and burst time."""
    pooled = [value for result in results for value in latencies(result["latency"])]
    per_repeat = [percentile(latencies(result["latency"]), 0.95) for result in results]
    bursts = []
    for result in results:
        landed = [item["landed"] for item in result["burst"]["items"] if item.get("landed")]
        bursts.append(max(landed) - result["burst"]["started"] if landed else math.nan)
    return [
        f"{name}, {len(results)} repeat(s): latency over {len(pooled)} changes p50 {_seconds(percentile(pooled, 0.5))},"
        f" p95 {_seconds(percentile(pooled, 0.95))}, max {_seconds(max(pooled, default=math.nan))};"
        f" p95 per repeat {', '.join(_seconds(v) for v in per_repeat)}; burst all landed within"
        f" {', '.join(_seconds(v) for v in bursts)}"
    ]
