"""A refresh of named records, knowing nothing of Dagster.

The API has no ``updatedAt``: a change to a contact is seen by reading it again. A refresh reads
the contacts it is given one by one (``GET /api/contacts/{id}``; a 404 means deleted upstream)
instead of the whole list, so it costs a request per contact: plan (which keys, which normalized
tables) → read and stage each record → one write (``commit.commit_refresh``, through the same
``RunWrite`` a sync lands with) that merges them with their history, marks the gone ones, and
brings the tables built from them up to date for those keys alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.core.errors import ConfigurationError
from mkt_assets.core.page import Page
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.source.transport import RequestStats, Stop
from mkt_assets.staging.pages import PageStager, StagedBatch
from mkt_assets.warehouse.commit import Refresh
from mkt_assets.warehouse.normalized_tables import NormalizedTable

from .sync import STOP_WAIT_SECONDS, FetchFailed, Log

# The most records one refresh reads: a request each, so 10,000 is minutes of the quota; more
# changes than that in one go are the daily full sync's to read.
MAX_REFRESH_KEYS = 10_000


def refresh_keys(given: Iterable[object], setting: str, limit: int = MAX_REFRESH_KEYS) -> tuple[int, ...]:
    """The keys to refresh, each once and ascending: exact positive integers (JSON's ``true``
    or ``2.0`` is none), at most ``limit`` of them; ``ConfigurationError`` naming ``setting``
    (where they were given) and the first wrong value otherwise."""
    keys: set[int] = set()
    for position, value in enumerate(given, start=1):
        if type(value) is not int or value < 1:
            shown = repr(value) if isinstance(value, (int, float, bool)) or value is None else f"a {type(value).__name__}"
            raise ConfigurationError(f"{setting}: entry {position} is {shown}, not a positive integer id")
        keys.add(value)
    if len(keys) > limit:
        raise ConfigurationError(
            f"{setting}: {len(keys):,} distinct ids, more than the {limit:,} one refresh reads (a request each);"
            " split them over several runs, or leave them to the daily full sync"
        )
    return tuple(sorted(keys))


@dataclass(frozen=True)
class RefreshPlan:
    """What one refresh reads and writes."""

    spec: ResourceSpec
    keys: tuple[int, ...]
    # Every normalized table that reads the resource: brought up to date in the same transaction.
    tables: tuple[NormalizedTable, ...]


def plan_refresh(spec: ResourceSpec, keys: Sequence[int], all_tables: Sequence[NormalizedTable]) -> RefreshPlan:
    return RefreshPlan(spec, tuple(keys), tuple(table for table in all_tables if spec.name in table.reads))


@dataclass(frozen=True)
class RefreshRead:
    """The records of a refresh, read by key and staged."""

    spec: ResourceSpec
    batch: StagedBatch  # the records found, as an incremental read's (complete=False)
    keys: tuple[int, ...]
    gone: tuple[int, ...]  # those the API answered 404 for
    stats: RequestStats
    seconds: float

    @property
    def read(self) -> str:
        return (
            f"by {self.spec.primary_key}: {len(self.keys)} asked, {self.batch.records} found,"
            f" {len(self.gone)} gone upstream (HTTP 404)"
        )

    @property
    def refresh(self) -> Refresh:
        return Refresh(self.keys, self.gone)


def fetch_refresh(
    plan: RefreshPlan,
    open_client: Callable[[Stop], MarketingApiClient],
    staging_dir: str | None,
    progress_seconds: float,
    log: Log,
) -> RefreshRead:
    """Read every key of ``plan`` (a request each, a few at once, paced by the rate limiter) and
    stage the records found as pages of one record each, raw as the API sent them.

    ``open_client(stop)``: a client that sends nothing once ``stop`` is set. A failed read
    raises ``FetchFailed``, naming the request, with nothing staged left behind; an interrupt
    (any ``BaseException`` while this waits) stops the requests at once and propagates."""
    stop = Stop()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh")
    future = pool.submit(_read, plan, open_client, stop, staging_dir, progress_seconds, log)
    try:
        done = future.result()
    except BaseException as error:
        stop.set("the refresh failed" if future.done() else "the refresh was interrupted")
        pool.shutdown(wait=False, cancel_futures=True)
        if future.done() and error is future.exception():
            if isinstance(error, Exception):
                raise FetchFailed({plan.spec.name: error}, [], []) from error
            raise
        wait([future], timeout=STOP_WAIT_SECONDS)
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().batch.discard()
        message = (
            f"Interrupted ({type(error).__name__}) while reading {len(plan.keys)} {plan.spec.name} by"
            f" {plan.spec.primary_key}: no request was sent after the interrupt and those under way were cut;"
            " nothing was written: every table is as it was."
        )
        error.add_note(message)
        try:
            log(message)
        except Exception:  # noqa: BLE001, S110 - the interrupt is what the run must end with
            pass
        raise
    pool.shutdown()
    return done


def _read(
    plan: RefreshPlan,
    open_client: Callable[[Stop], MarketingApiClient],
    stop: Stop,
    staging_dir: str | None,
    progress_seconds: float,
    log: Log,
) -> RefreshRead:
    spec = plan.spec
    started = last = time.monotonic()
    gone: list[int] = []
    # complete=False: what was not asked says nothing of what is gone.
    with open_client(stop) as client, PageStager(spec, directory=staging_dir, complete=False) as stager:
        for number, one in enumerate(client.read_records(spec, plan.keys), start=1):
            stop.check()
            if one.record is None:
                gone.append(one.key)
            else:
                # The record as sent, in a page of its own: the merge reads it as it reads a list's.
                body = b'{"items":[' + one.body + b'],"hasMore":false}'
                path = f"{client.url_path(spec)}/{one.key}"
                stager.add(Page(spec.name, number, path, {}, [one.record], False, body, one.unknown_fields))
            if time.monotonic() - last >= progress_seconds:
                last = time.monotonic()
                log(f"{spec.name}: {number:,} of {len(plan.keys):,} read by {spec.primary_key} so far ({len(gone):,} gone)")
        batch = stager.finish()
    return RefreshRead(spec, batch, plan.keys, tuple(sorted(gone)), client.stats, time.monotonic() - started)
