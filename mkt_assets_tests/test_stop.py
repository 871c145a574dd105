"""Stopping a run: on Terminate or SIGTERM (an interrupt in the step's thread) or when another
resource fails, the fetch ends at once. No request goes out after the stop, the one on the wire
is cut, a wait (Retry-After, backoff, the rate limit) ends, the staged pages and the typing
worker go, and the interrupt reaches Dagster. Against the simulator on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.plumbing import lean_process
from mkt_assets.run.sync import FetchFailed, FetchOptions, fetch_all, plan_sync
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.source.ratelimit import SharedRateLimiter
from mkt_assets.source.transport import Stop, Stopped
from mkt_assets.warehouse.chunk_typing import TypingQueue
from mkt_assets.warehouse.defaults import DEFAULT_MEMORY_LIMIT

API_KEY = "stop-secret-8c2e"
CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
FIELDS = RESOURCES_BY_NAME["contact_fields"]
# Longer than any test may take: an answer held this long must be cut, a wait this long ended.
HELD_SECONDS = 60.0
# What "at once" means here: well under the 5 s a Terminate may take, on a busy machine.
PROMPT_SECONDS = 3.0
WAIT_FOR_SERVER_SECONDS = 30.0


@pytest.fixture()
def server() -> Iterator[SandboxServer]:
    # 40 pages of contacts, each answered after 20 ms: a walk is still going when stopped.
    with SandboxServer(SandboxData(seed=5, contacts=4000), api_key=API_KEY, latency=0.02) as running:
        yield running


def client(server: SandboxServer, stop: Stop, **options: Any) -> MarketingApiClient:
    return MarketingApiClient(server.base_url, API_KEY, backoff_factor=0, stop=stop, **options)


def arrived(server: SandboxServer, spec: ResourceSpec) -> list[float]:
    return [arrival.at for arrival in server.arrivals if arrival.path == f"/api{spec.path}"]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll the simulator's log until ``condition`` holds."""
    deadline = time.monotonic() + WAIT_FOR_SERVER_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"the simulator never saw {what}"
        time.sleep(0.002)


def walk_in_thread(walk: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            walk()
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_a_stop_cuts_the_answer_on_the_wire_and_sends_no_other_request(server: SandboxServer) -> None:
    # The fourth page's answer is held for a minute: only a cut ends that request sooner.
    server.add_fault(Fault("delay", path="/api/contacts", after=3, times=1, delay=HELD_SECONDS))
    stop = Stop()
    with client(server, stop, order="asc") as api:
        thread, raised = walk_in_thread(lambda: list(api.iter_pages(CONTACTS)))
        wait_for(lambda: len(arrived(server, CONTACTS)) == 4, "the fourth request")

        stop.set("the test stopped the run")
        stopped_at = time.monotonic()
        thread.join(HELD_SECONDS)

        assert time.monotonic() - stopped_at < PROMPT_SECONDS
    assert [type(error) for error in raised] == [Stopped]
    assert "the test stopped the run" in str(raised[0])
    assert len(arrived(server, CONTACTS)) == 4, "a request was sent after the stop"


def test_a_stop_ends_a_retry_after_wait_at_once_and_sends_no_retry(server: SandboxServer) -> None:
    server.add_fault(Fault("status", path="/api/tags", status=503, retry_after=100, times=1))
    stop = Stop()
    with client(server, stop) as api:
        thread, raised = walk_in_thread(lambda: list(api.iter_pages(TAGS)))
        wait_for(lambda: len(server.requests) == 1, "the 503")

        stop.set("the test stopped the run")
        stopped_at = time.monotonic()
        thread.join(HELD_SECONDS)

        assert time.monotonic() - stopped_at < PROMPT_SECONDS
    assert [type(error) for error in raised] == [Stopped]
    assert len(arrived(server, TAGS)) == 1, "the retry was sent after the stop"


def test_a_stop_ends_a_rate_limit_wait_at_once_and_reserves_nothing(tmp_path: Path) -> None:
    # One request per 100 s: the first answer says none remain, so the second page waits.
    account = SandboxData(seed=5, contacts=300)
    with SandboxServer(account, api_key=API_KEY, rate_limit=(1, 100.0)) as limited:
        limiter = SharedRateLimiter(tmp_path / "quota.json", horizon=120.0, log=lambda message: None)
        stop = Stop()
        with client(limited, stop, order="asc", rate_limiter=limiter) as api:
            thread, raised = walk_in_thread(lambda: list(api.iter_pages(CONTACTS)))
            wait_for(lambda: len(limited.requests) == 1, "the first page")

            stop.set("the test stopped the run")
            stopped_at = time.monotonic()
            thread.join(HELD_SECONDS)

            assert time.monotonic() - stopped_at < PROMPT_SECONDS
        assert [type(error) for error in raised] == [Stopped]
        assert len(limited.arrivals) == 1, "a request was sent after the stop"


# ------------------------------------------------------------------ the run's fetch


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises in the main thread what Dagster's run worker raises in the step."""

    def interrupt(signum: int, frame: object) -> None:
        raise dg.DagsterExecutionInterruptedError()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lean_children() -> list[int]:
    """This process's live lean workers (``lean_process``), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended while being read
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == os.getpid() and state != "Z" and lean_process.__name__.encode() in command:
            found.append(int(entry.name))
    return found


def staged_files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file() and path.name != ".lock"]


def test_an_interrupt_stops_every_fetch_at_once_sends_nothing_more_and_leaves_no_staged_file(
    server: SandboxServer, tmp_path: Path
) -> None:
    # The ascending end's seventh answer is held: the descending end walks on meanwhile.
    server.add_fault(Fault("delay", path="/api/contacts", after=6, times=1, delay=HELD_SECONDS))
    staging = tmp_path / "staging"
    plan = plan_sync([TAGS, CONTACTS], [], [], {})
    # Two pages a chunk: chunks are being typed by the lean worker when the interrupt comes.
    options = FetchOptions(staging_dir=str(staging), chunk_pages=2, progress_seconds=3600.0)
    logged: list[str] = []
    signalled: list[float] = []

    def terminate_once_the_answer_is_held() -> None:
        wait_for(lambda: len(arrived(server, CONTACTS)) >= 7, "the held request")
        signalled.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)

    trigger = threading.Thread(target=terminate_once_the_answer_is_held)
    with sigterm_interrupts(), TypingQueue(DEFAULT_MEMORY_LIMIT) as typing:
        trigger.start()
        with pytest.raises(dg.DagsterExecutionInterruptedError) as interrupted:
            fetch_all(plan, lambda stop: client(server, stop), options, typing, logged.append)
        returned = time.time()
        trigger.join()

    assert returned - signalled[0] < PROMPT_SECONDS
    # Each end of the walk may have let out one request as the signal came, none after that.
    after_the_signal = [at for at in arrived(server, CONTACTS) + arrived(server, TAGS) if at > signalled[0]]
    assert len(after_the_signal) <= 2, f"{len(after_the_signal)} requests arrived after the signal"
    assert staged_files(staging) == []
    assert lean_children() == []
    said = [line for line in logged if line.startswith("Interrupted (DagsterExecutionInterruptedError) while reading tags and contacts:")]
    assert len(said) == 1 and "Nothing was written: every table is as it was." in said[0]
    assert said[0] in getattr(interrupted.value, "__notes__", [])
    server.stop()  # lets the held answer go: nobody is there to read it
    assert [at for at in arrived(server, CONTACTS) if at > returned] == []


def test_a_failing_resource_stops_the_others_at_once_without_waiting_for_their_answers(
    server: SandboxServer, tmp_path: Path
) -> None:
    # Every contacts answer would take a minute; contact_fields fails at once.
    server.add_fault(Fault("delay", path="/api/contacts", times=-1, delay=HELD_SECONDS))
    server.add_fault(Fault("status", path="/api/contact_fields", status=404))
    plan = plan_sync([FIELDS, CONTACTS], [], [], {})
    options = FetchOptions(staging_dir=str(tmp_path / "staging"), chunk_pages=2, progress_seconds=3600.0)
    started = time.monotonic()

    with TypingQueue(DEFAULT_MEMORY_LIMIT) as typing, pytest.raises(FetchFailed) as failed:
        fetch_all(plan, lambda stop: client(server, stop), options, typing, lambda message: None)

    assert time.monotonic() - started < PROMPT_SECONDS
    message = str(failed.value)
    assert "contact_fields: GET /api/contact_fields: HTTP 404" in message
    assert "contacts was stopped" in message
    assert "base URL is probably wrong" not in message  # contacts never answered 404
    assert len(arrived(server, CONTACTS)) <= 1
