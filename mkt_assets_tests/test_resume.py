"""Resuming a read a failed, terminated or killed run left: the next run continues each
resource from its checkpoint, and lands exactly what a clean sync lands. Against the
simulator on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run.sync import FetchFailed, FetchOptions, fetch_all, plan_sync
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.source.transport import Stop
from mkt_assets.staging import resume
from mkt_assets.staging.resume import ResumeOptions, read_identity
from mkt_assets.warehouse.chunk_typing import TypingQueue
from mkt_assets.warehouse.connection import connect, database_path
from mkt_assets.warehouse.defaults import DEFAULT_MEMORY_LIMIT
from mkt_assets_tests.conftest import materialization, materialize_marketing

API_KEY = "resume-secret-3f9a61"
CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
ALL = [spec.name for spec in RESOURCES]
# 60 pages of 10 contacts: a walk long enough to stop in its middle.
CONTACT_COUNT = 600
PAGE_SIZE = 10
# Requests a failed run may cost beyond one clean sync: the pages after its last checkpoint
# (a chunk of 2 pages per end), the answers under way, and the failed request's tries.
SLACK = 10


@pytest.fixture()
def server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData(seed=23, contacts=CONTACT_COUNT), api_key=API_KEY) as running:
        yield running


def api(server: SandboxServer, staging: Path, **settings: Any) -> MarketingApiResource:
    values = {"base_url": server.base_url, "api_key": API_KEY, "backoff_factor": 0.01, "max_retries": 1,
              "page_size": PAGE_SIZE, "staging_dir": str(staging), "staging_chunk_pages": 2,
              "pace_requests": False, **settings}  # fmt: skip
    return MarketingApiResource(**values)


def resources(database: Path, marketing_api: MarketingApiResource, deletions: str = "mark") -> dict[str, Any]:
    return {
        "marketing_api": marketing_api,
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=str(database)), deletions=deletions),
        "warehouse": WarehouseResource(database=str(database)),
    }


def sync(
    database: Path,
    marketing_api: MarketingApiResource,
    *,
    settings: Settings | None = None,
    names: list[str] = ALL,
    incremental: bool = False,
) -> dg.ExecuteInProcessResult:
    run_config = {"ops": {"sync_marketing": {"config": {"incremental": True}}}} if incremental else None
    return materialize_marketing(names, resources(database, marketing_api), settings=settings, raise_on_error=False, run_config=run_config)


# The columns that say when a sync ran, which differ between any two syncs.
_WHEN = {"_synced_at", "_deleted_at", "_valid_from", "_valid_to", "valid_from", "valid_to", "synced_at"}


def tables(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the file but the bookkeeping (`_mkt_*`: when reads landed, random change
    tokens), sorted; of the columns saying when a sync ran, whether each is set."""
    found = {}
    with connect(str(database)) as connection:
        names = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'marketing' AND NOT starts_with(table_name, '_mkt_')"
        ).fetchall()]  # fmt: skip
        for name in names:
            columns = [row[0] for row in connection.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'marketing' AND table_name = ?"
                " ORDER BY ordinal_position", [name]
            ).fetchall()]  # fmt: skip
            # When a sync ran differs between any two: only whether it is set is compared.
            chosen = ", ".join(f'"{column}" IS NULL' if column in _WHEN else f'"{column}"' for column in columns)
            found[name] = connection.execute(f'SELECT {chosen} FROM marketing."{name}" ORDER BY ALL').fetchall()
    return found


def deleted(database: Path) -> set[int]:
    with connect(str(database)) as connection:
        return {row[0] for row in connection.execute("SELECT id FROM marketing.contacts WHERE _deleted_at IS NOT NULL").fetchall()}


def clean_sync(server: SandboxServer, tmp_path: Path, **settings: Any) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    """The tables a clean sync into a fresh file lands, and the requests it took."""
    server.reset_log()
    clean = tmp_path / "clean.duckdb"
    assert sync(clean, api(server, tmp_path / "clean-staging", **settings)).success
    return tables(clean), len(server.requests)


def resumable_files(staging: Path) -> list[Path]:
    return [path for path in (staging / resume.RESUMABLE_DIRECTORY).rglob("*") if path.is_file() and path.name != ".lock"]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60.0
    while not condition():
        assert time.monotonic() < deadline, f"the simulator never saw {what}"
        time.sleep(0.005)


# ------------------------------------------------------------------------------ the client


@pytest.mark.parametrize("order", ["both", "asc", "desc"])
def test_a_walk_resumed_from_a_pages_position_reads_every_record_after_it_exactly_once(
    server: SandboxServer, order: str
) -> None:
    with MarketingApiClient(server.base_url, API_KEY, page_size=PAGE_SIZE, order=order) as client:
        whole = [item["id"] for page in client.iter_pages(CONTACTS) for item in page.items]
        for stop_after in (1, 2, 7, 31):
            walk = client.iter_pages(CONTACTS)
            first = [next(walk) for _ in range(stop_after)]
            walk.close()
            position = json.loads(json.dumps(first[-1].position))  # as a checkpoint keeps it
            rest = list(client.iter_pages(CONTACTS, resume=position))
            ids = [item["id"] for page in first + rest for item in page.items]
            assert sorted(ids) == sorted(whole) and len(ids) == len(set(ids)), f"stopped after {stop_after} pages"
            numbers = [page.number for page in first + rest]
            assert len(numbers) == len(set(numbers)), "resumed pages must be numbered after the first ones"
            assert min(page.number for page in rest) > max(page.number for page in first)
    assert len(whole) == CONTACT_COUNT


# --------------------------------------------------------------------- resume after a failure


@pytest.mark.slow
def test_a_run_failed_by_an_outage_is_resumed_by_the_next_and_lands_what_a_clean_sync_lands(
    server: SandboxServer, tmp_path: Path
) -> None:
    expected, clean_requests = clean_sync(server, tmp_path)
    database, staging = tmp_path / "resumed.duckdb", tmp_path / "staging"
    server.reset_log()
    # From the 21st request of contacts on, the API answers 503 to every one: the run fails.
    server.add_fault(Fault("status", path="/api/contacts", status=503, after=20, times=-1))
    failed = sync(database, api(server, staging))
    assert not failed.success
    assert resumable_files(staging), "the pages read must be kept for the next run"
    assert not database.exists() or tables(database).get("contacts", []) == []

    server.clear_faults()
    resumed = sync(database, api(server, staging))

    assert resumed.success
    assert len(server.requests) <= clean_requests + SLACK
    assert tables(database) == expected
    metadata = materialization(resumed, "contacts")
    assert metadata["pages_resumed"] >= 18
    assert metadata["resumed_from_run"] == failed.run_id
    # Read in full by the failed run: written by the next without a request.
    assert materialization(resumed, "tags")["requests"] == 0
    assert materialization(resumed, "tags")["resumed_from_run"] == failed.run_id
    assert resumable_files(staging) == [], "a committed read's pages go"


def test_the_failed_runs_error_says_the_pages_are_kept_for_the_next_run(server: SandboxServer, tmp_path: Path) -> None:
    server.add_fault(Fault("status", path="/api/contacts", status=503, after=4, times=-1))
    staging = tmp_path / "staging"
    plan = plan_sync([CONTACTS], [], [], {})
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing, pytest.raises(FetchFailed) as failed:
        fetch_all(plan, lambda stop: client(server, stop), options(staging, "run-1"), typing, lambda line: None)
    assert "The pages read are kept: a run of the same resources within 6 hours (MKT_RESUME_HOURS)" in str(failed.value)


# ------------------------------------------------------------------ after SIGTERM and kill -9


@pytest.mark.slow
def test_a_terminated_run_stops_at_once_and_the_next_resumes_it(server: SandboxServer, tmp_path: Path) -> None:
    expected, _ = clean_sync(server, tmp_path, order="asc")
    staging = tmp_path / "staging"
    server.reset_log()
    # The 30th contacts request is held for a minute: the run is mid-fetch when terminated.
    server.add_fault(Fault("delay", path="/api/contacts", after=29, times=1, delay=60.0))
    plan = plan_sync([CONTACTS], [], [], {})
    database = tmp_path / "resumed.duckdb"
    # The identity the step gives the read, so that the step's run below may resume it.
    step_read = read_identity(base_url=server.base_url, api_key=API_KEY, order="asc", database=database_path(str(database)),
                              schema="marketing", deletions=Settings().deletions)  # fmt: skip
    logged: list[str] = []
    signalled: list[float] = []

    def terminate() -> None:
        wait_for(lambda: len([r for r in server.requests if r.path == "/api/contacts"]) >= 29, "the held request")
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    def interrupt(signum: int, frame: object) -> None:
        raise dg.DagsterExecutionInterruptedError()

    previous = signal.signal(signal.SIGTERM, interrupt)
    trigger = threading.Thread(target=terminate)
    try:
        with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing:
            trigger.start()
            with pytest.raises(dg.DagsterExecutionInterruptedError) as interrupted:
                fetch_all(plan, lambda stop: client(server, stop, order="asc"), options(staging, "run-1", step_read), typing, logged.append)
            stopped_in = time.monotonic() - signalled[0]
            trigger.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped_in < 3.0, "a termination must stay prompt"
    note = " ".join(getattr(interrupted.value, "__notes__", []))
    assert "The pages read are kept" in note and "the staged pages were removed" not in note
    assert resumable_files(staging)

    server.clear_faults()
    resumed = sync(database, api(server, staging, order="asc"), names=["contacts"])
    assert resumed.success
    assert materialization(resumed, "contacts")["pages_resumed"] >= 26
    contacts_requests = len([r for r in server.requests if r.path == "/api/contacts"])
    assert contacts_requests <= CONTACT_COUNT // PAGE_SIZE + 1 + SLACK
    clean_only_contacts = {name: rows for name, rows in expected.items() if name in tables(database)}
    assert tables(database)["contacts"] == clean_only_contacts["contacts"]


_KILLED_RUN = textwrap.dedent(
    """
    import sys
    from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
    from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
    from mkt_assets_tests.conftest import materialize_marketing

    base_url, key, staging, database = sys.argv[1:5]
    api = MarketingApiResource(base_url=base_url, api_key=key, page_size=10, staging_dir=staging,
                               staging_chunk_pages=2, pace_requests=False)
    materialize_marketing(["contacts", "tags"], {
        "marketing_api": api,
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database)),
        "warehouse": WarehouseResource(database=database),
    })
    """
)


@pytest.mark.slow
def test_a_run_killed_mid_fetch_is_resumed_by_the_next(tmp_path: Path) -> None:
    # Each answer takes 20 ms: the kill lands mid-walk, checkpoints already written.
    with SandboxServer(SandboxData(seed=23, contacts=CONTACT_COUNT), api_key=API_KEY, latency=0.02) as server:
        expected, _ = clean_sync(server, tmp_path)
        expected = {name: rows for name, rows in expected.items() if not name.startswith(("contact_fields", "communit", "course"))}
        staging, database = tmp_path / "staging", tmp_path / "resumed.duckdb"
        server.reset_log()
        run = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, server.base_url, API_KEY, str(staging), str(database)],
            cwd=Path(__file__).parents[1],
        )
        try:
            wait_for(lambda: len([r for r in server.requests if r.path == "/api/contacts"]) >= 30, "30 requests of contacts")
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait(30)
        killed_requests = len(server.requests)
        server.reset_log()

        resumed = sync(database, api(server, staging), names=["contacts", "tags"])

        assert resumed.success
        assert materialization(resumed, "contacts")["pages_resumed"] >= 20
        contact_pages = CONTACT_COUNT // PAGE_SIZE
        assert killed_requests + len(server.requests) <= contact_pages + 1 + 3 + SLACK
        landed = tables(database)
        assert landed["contacts"] == expected["contacts"]
        assert landed["tags"] == expected["tags"]
        assert resumable_files(staging) == []


# ------------------------------------------------------------- what may never be resumed


def client(server: SandboxServer, stop: Stop, order: str = "both") -> MarketingApiClient:
    return MarketingApiClient(server.base_url, API_KEY, page_size=PAGE_SIZE, order=order, backoff_factor=0, max_retries=0, stop=stop)


def identity(**changed: str) -> str:
    values = {"base_url": "http://127.0.0.1:1/api", "api_key": API_KEY, "order": "both",
              "database": "/data/m.duckdb", "schema": "marketing", "deletions": "mark", **changed}  # fmt: skip
    return read_identity(**values)


def options(staging: Path, run_id: str, read: str | None = None, window: timedelta = timedelta(hours=6)) -> FetchOptions:
    return FetchOptions(
        staging_dir=str(staging), chunk_pages=2, progress_seconds=3600.0,
        resume=ResumeOptions(read or identity(), window, run_id),
    )  # fmt: skip


def fail_contacts_midway(server: SandboxServer, staging: Path, read: str | None = None) -> None:
    server.add_fault(Fault("status", path="/api/contacts", status=503, after=20, times=-1))
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing, pytest.raises(FetchFailed):
        fetch_all(plan_sync([CONTACTS], [], [], {}), lambda stop: client(server, stop), options(staging, "run-1", read), typing, lambda line: None)
    server.clear_faults()
    server.reset_log()


def fetch_contacts(server: SandboxServer, staging: Path, read: str | None = None, spec: Any = CONTACTS, window: timedelta = timedelta(hours=6)) -> tuple[Any, list[str]]:
    logged: list[str] = []
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing:
        fetched = fetch_all(plan_sync([spec], [], [], {}), lambda stop: client(server, stop), options(staging, "run-2", read, window), typing, logged.append)
    return fetched[spec.name], logged


@pytest.mark.slow  # two real reads of a few thousand contacts, the first failed midway
def test_a_read_of_the_same_deployment_is_resumed(server: SandboxServer, tmp_path: Path) -> None:
    fail_contacts_midway(server, tmp_path)
    done, logged = fetch_contacts(server, tmp_path)
    assert done.pages_resumed >= 18 and done.resumed_from_run == "run-1"
    assert done.batch.records == CONTACT_COUNT
    assert any(line.startswith("contacts: resuming the read run run-1 left") for line in logged)
    assert len(server.requests) <= CONTACT_COUNT // PAGE_SIZE - 18 + SLACK
    done.batch.discard()


@pytest.mark.parametrize(
    "changed",
    [
        {"api_key": "another-account-key-77"},
        {"base_url": "http://localhost:1/api"},
        {"deletions": "delete"},
        {"database": "/data/other.duckdb"},
        {"order": "asc"},
    ],
    ids=["account", "base URL", "deletions mode", "database", "order"],
)
@pytest.mark.slow  # a second or more: several real syncs
def test_a_read_is_never_resumed_by_another_deployment(server: SandboxServer, tmp_path: Path, changed: dict[str, str]) -> None:
    fail_contacts_midway(server, tmp_path)
    done, _ = fetch_contacts(server, tmp_path, identity(**changed))
    assert done.pages_resumed == 0 and done.resumed_from_run is None
    assert done.batch.records == CONTACT_COUNT
    assert len(server.requests) >= CONTACT_COUNT // PAGE_SIZE // 2, "read from the first page"
    done.batch.discard()


@pytest.mark.slow  # a second or more: several real syncs
def test_a_read_is_never_resumed_once_the_catalogs_spec_of_it_changed(server: SandboxServer, tmp_path: Path) -> None:
    fail_contacts_midway(server, tmp_path)
    changed = replace(CONTACTS, description=CONTACTS.description + " (a newer catalog)")
    done, _ = fetch_contacts(server, tmp_path, spec=changed)
    assert done.pages_resumed == 0
    assert done.batch.records == CONTACT_COUNT
    done.batch.discard()


@pytest.mark.slow  # a second or more: several real syncs
def test_a_read_past_its_window_is_read_afresh_and_its_pages_swept(server: SandboxServer, tmp_path: Path) -> None:
    fail_contacts_midway(server, tmp_path)
    (checkpoint,) = (tmp_path / resume.RESUMABLE_DIRECTORY).glob("*/checkpoint.json")
    saved = json.loads(checkpoint.read_text())
    saved["began"] = (datetime.now(timezone.utc) - timedelta(hours=7)).isoformat()
    checkpoint.write_text(json.dumps(saved))
    done, logged = fetch_contacts(server, tmp_path)
    assert done.pages_resumed == 0
    assert any("removed the pages a failed run had left in" in line and "more than 6 hours (MKT_RESUME_HOURS) ago" in line for line in logged)
    done.batch.discard()


def test_the_sweep_removes_expired_and_unreadable_reads_and_keeps_live_and_recent_ones(tmp_path: Path) -> None:
    def left(name: str, began: datetime | None) -> Path:
        read = resume.open_read(tmp_path, name, identity(schema=name), f"run-{name}", timedelta(hours=6), setting="MKT_RESUME_HOURS")
        assert read is not None
        if began is not None:
            read.began = began
            read.save({"chunks": [], "pages": 0, "records": 0, "position": {"walk": "done"}})
        resume.release(read.directory)
        return read.directory

    now = datetime.now(timezone.utc)
    expired, recent, broken = left("expired", now - timedelta(hours=7)), left("recent", now - timedelta(hours=5)), left("broken", None)
    live = resume.open_read(tmp_path, "live", identity(schema="live"), "run-live", timedelta(hours=6), setting="MKT_RESUME_HOURS")
    assert live is not None
    live.began = now - timedelta(hours=9)
    live.save({"chunks": [], "pages": 0, "records": 0, "position": {"walk": "done"}})

    swept = dict(resume.sweep(tmp_path, timedelta(hours=6), setting="MKT_RESUME_HOURS"))

    assert set(swept) == {expired, broken}
    assert "more than 6 hours (MKT_RESUME_HOURS) ago" in swept[expired] and swept[broken] == "it holds no checkpoint"
    assert recent.exists() and live.directory.exists()
    # A component instance has no such setting: its reader is not sent to a variable it never reads.
    off = dict(resume.sweep(tmp_path, timedelta(0), setting=None))
    assert set(off) == {recent}, "resuming off: every read no run holds goes"
    assert off[recent] == "resuming is off"
    expired_again = left("expired_again", now - timedelta(hours=7))
    assert dict(resume.sweep(tmp_path, timedelta(hours=6), setting=None))[expired_again].endswith("more than 6 hours ago")
    for read in (live.directory,):
        resume.remove(read)


def test_the_checkpoint_is_private_and_holds_neither_the_key_nor_its_hash(server: SandboxServer, tmp_path: Path) -> None:
    import hashlib
    import stat

    fail_contacts_midway(server, tmp_path, identity())
    (directory,) = (tmp_path / resume.RESUMABLE_DIRECTORY).iterdir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    text = (directory / resume.CHECKPOINT_NAME).read_text()
    assert API_KEY not in text and hashlib.sha256(API_KEY.encode()).hexdigest() not in text


# -------------------------------------------------------- deletions and rows changed between


@pytest.mark.slow
def test_deletions_are_marked_only_from_a_read_complete_across_attempts(server: SandboxServer, tmp_path: Path) -> None:
    database, staging = tmp_path / "m.duckdb", tmp_path / "staging"
    assert sync(database, api(server, staging, order="asc"), names=["contacts"]).success
    ids = [row[0] for row in tables(database)["contacts"]]
    server.reset_log()
    server.add_fault(Fault("status", path="/api/contacts", status=503, after=30, times=-1))
    assert not sync(database, api(server, staging, order="asc"), names=["contacts"]).success
    assert deleted(database) == set(), "a failed read marks nothing"

    # Deleted upstream after the failed attempt: one it had read, one it had not reached.
    read_before, unread = ids[5], ids[-5]
    server.data.delete_contact(read_before)
    server.data.delete_contact(unread)
    server.clear_faults()
    resumed = sync(database, api(server, staging, order="asc"), names=["contacts"])

    assert resumed.success and materialization(resumed, "contacts")["pages_resumed"] > 0
    # As one long sync that read the first before it was deleted: only the unread one is gone.
    assert deleted(database) == {unread}
    assert sync(database, api(server, staging, order="asc"), names=["contacts"]).success
    assert deleted(database) == {read_before, unread}, "the next complete read marks the other"


@pytest.mark.slow  # a second or more: several real syncs
def test_an_incremental_read_resumes_too_but_never_as_another_starting_key(server: SandboxServer, tmp_path: Path) -> None:
    with MarketingApiClient(server.base_url, API_KEY, page_size=PAGE_SIZE) as whole:
        ids = sorted(item["id"] for page in whole.iter_pages(CONTACTS) for item in page.items)
    after = ids[99]  # 500 newer contacts: 50 pages
    plan = plan_sync([CONTACTS], [], [], {"contacts": after})
    server.reset_log()
    server.add_fault(Fault("status", path="/api/contacts", status=503, after=20, times=-1))
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing, pytest.raises(FetchFailed):
        fetch_all(plan, lambda stop: client(server, stop), options(tmp_path, "run-1"), typing, lambda line: None)
    server.clear_faults()

    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing:
        other = fetch_all(plan_sync([CONTACTS], [], [], {"contacts": ids[98]}), lambda stop: client(server, stop),
                          options(tmp_path, "run-2"), typing, lambda line: None)["contacts"]  # fmt: skip
        server.reset_log()
        done = fetch_all(plan, lambda stop: client(server, stop), options(tmp_path, "run-3"), typing, lambda line: None)["contacts"]

    assert other.pages_resumed == 0, "another starting key is another read"
    assert done.pages_resumed >= 18 and done.resumed_from_run == "run-1"
    assert done.batch.records == CONTACT_COUNT - 100 and not done.batch.complete and done.batch.after == after
    assert len(server.requests) <= 50 - 18 + SLACK
    other.batch.discard()
    done.batch.discard()


@pytest.mark.slow  # a second or more: several real syncs
def test_an_interrupted_incremental_run_is_resumed_by_the_next_and_lands_what_a_clean_sync_lands(
    server: SandboxServer, tmp_path: Path
) -> None:
    database, staging = tmp_path / "resumed.duckdb", tmp_path / "staging"
    assert sync(database, api(server, staging)).success
    with connect(str(database)) as connection:
        stored = {name: connection.execute(f"SELECT count(*) FROM marketing.{name}").fetchone() for name in ("memberships", "enrollments")}
    server.data.add_contacts(400)  # ~120 new memberships and ~160 new enrollments: pages of 10 each
    new_pages = -(-(server.data.count("memberships") - stored["memberships"][0]) // PAGE_SIZE)  # type: ignore[index]
    assert new_pages > 8
    server.reset_log()
    # From the 7th request of memberships on, the API answers 503 to every one: the run fails.
    server.add_fault(Fault("status", path="/api/community/memberships", status=503, after=6, times=-1))
    failed = sync(database, api(server, staging), incremental=True)
    assert not failed.success
    assert resumable_files(staging), "the pages read must be kept for the next run"
    with connect(str(database)) as connection:
        for name, count in stored.items():
            assert connection.execute(f"SELECT count(*) FROM marketing.{name}").fetchone() == count, "the failed run wrote nothing"

    server.clear_faults()
    server.reset_log()
    resumed = sync(database, api(server, staging), incremental=True)

    assert resumed.success
    memberships = materialization(resumed, "memberships")
    assert str(memberships["read"]).startswith("incremental, after id ")
    assert memberships["resumed_from_run"] == failed.run_id and int(memberships["pages_resumed"]) >= 4  # type: ignore[call-overload]
    # Only the pages after the failed run's checkpoint are asked again (and the failed request).
    asked = sum(1 for request in server.requests if request.path == "/api/community/memberships")
    assert asked <= new_pages - int(memberships["pages_resumed"]) + 1  # type: ignore[call-overload]
    expected, _ = clean_sync(server, tmp_path)
    assert tables(database) == expected
    assert resumable_files(staging) == [], "a committed read's pages go"


def test_mkt_resume_hours_sets_the_window_and_zero_turns_resuming_off(server: SandboxServer, tmp_path: Path) -> None:
    from mkt_assets.core.errors import ConfigurationError

    assert Settings.from_environment({}).resume_window == timedelta(hours=6)
    assert Settings.from_environment({"MKT_RESUME_HOURS": "1.5"}).resume_window == timedelta(hours=1.5)
    with pytest.raises(ConfigurationError, match="MKT_RESUME_HOURS must be zero"):
        Settings.from_environment({"MKT_RESUME_HOURS": "-1"})

    server.add_fault(Fault("status", path="/api/contacts", status=503, after=20, times=-1))
    off = options(tmp_path, "run-1", window=timedelta(0))
    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing, pytest.raises(FetchFailed) as failed:
        fetch_all(plan_sync([CONTACTS], [], [], {}), lambda stop: client(server, stop), off, typing, lambda line: None)
    assert "kept" not in str(failed.value)
    assert not (tmp_path / resume.RESUMABLE_DIRECTORY).exists() or resumable_files(tmp_path) == []
    assert [path for path in tmp_path.rglob("*.ndjson")] == [], "resuming off: a failed read's pages go, as before"


def test_an_adopted_read_is_cut_back_to_what_its_checkpoint_names(tmp_path: Path) -> None:
    read = resume.open_read(tmp_path, "contacts", identity(), "run-1", timedelta(hours=6), setting="MKT_RESUME_HOURS")
    assert read is not None
    chunk = read.directory / "mkt_contacts_00001_abcdefgh.ndjson"
    chunk.write_bytes(b'{"page":1,"body":{}}\n')
    chunk.chmod(0o600)
    read.save({"chunks": [{"name": chunk.name, "bytes": chunk.stat().st_size}], "pages": 1, "records": 0,
               "position": {"walk": "done"}})  # fmt: skip
    # What a kill leaves after the checkpoint: half a page, a chunk it never named, a Parquet.
    with open(chunk, "ab") as handle:
        handle.write(b'{"page":2,"bo')
    for name in ("mkt_contacts_00002_ijklmnop.ndjson", "mkt_contacts_00001_abcdefgh.parquet"):
        (read.directory / name).write_bytes(b"x")
    resume.release(read.directory)

    again = resume.open_read(tmp_path, "contacts", identity(), "run-2", timedelta(hours=6), setting="MKT_RESUME_HOURS")

    assert again is not None and again.adopted is not None and again.adopted["run_id"] == "run-1"
    assert chunk.read_bytes() == b'{"page":1,"body":{}}\n'
    assert sorted(path.name for path in again.directory.iterdir()) == [".lock", "checkpoint.json", chunk.name]
    assert resume.open_read(tmp_path, "contacts", identity(), "run-3", timedelta(hours=6), setting="MKT_RESUME_HOURS") is None, "held by run-2"
    resume.remove(again.directory)
