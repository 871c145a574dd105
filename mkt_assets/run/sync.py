"""A sync from plan to write, knowing nothing of Dagster.

plan (which resources, from which cursor, and which normalized tables) → fetch and stage every
resource at once → one write that lands every table together (``commit.commit_run``, through
``RunWrite``). The Dagster layer (``assets``) hands these stages their inputs and reports what
they return.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.core.errors import ApiAccessError, SyncError, describe_request, is_retriable
from mkt_assets.core.setting_names import ENVIRONMENT, SettingNames
from mkt_assets.plumbing import lean_process
from mkt_assets.source.client import MarketingApiClient
from mkt_assets.source.transport import RequestStats, Stop, Stopped
from mkt_assets.staging.pages import PageStager, StagedBatch, staging_directory
from mkt_assets.staging.resume import ResumableRead, ResumeOptions, open_read, resource_identity, window_text
from mkt_assets.staging.resume import release as release_read
from mkt_assets.staging.resume import remove as remove_read
from mkt_assets.staging.resume import sweep as sweep_reads
from mkt_assets.warehouse.chunk_typing import ChunkTyper, TypingQueue
from mkt_assets.warehouse.commit import CommitRequest, Facts, Refresh, RunCommit, commit, gathered_facts
from mkt_assets.warehouse.connection import WarehouseFile
from mkt_assets.warehouse.defaults import DEFAULT_MAX_DROP
from mkt_assets.warehouse.normalized_tables import NormalizedTable

Log = Callable[[str], None]
# Runs the run's one transaction where its DuckDB work belongs, passing ``log`` what the
# transaction reports: ``in_worker`` (the step's lean DuckDB worker) in a run.
CommitRunner = Callable[[CommitRequest, Log | None], RunCommit]


@dataclass(frozen=True)
class InWorker:
    """The run's one transaction in ``worker``, a lean process that imports DuckDB, not Dagster.
    It returns once committed; the checks' facts are gathered there meanwhile, on the same
    connection, and ``gathered_facts`` waits for them."""

    worker: lean_process.Worker

    def __call__(self, request: CommitRequest, log: Log | None) -> RunCommit:
        return self.worker.call(commit, replace(request, facts_after=True), log=log)

    def gathered_facts(self) -> Facts:
        return self.worker.call(gathered_facts)


def in_worker(worker: lean_process.Worker) -> InWorker:
    return InWorker(worker)


# How long an interrupted run waits for its fetches to unwind (and remove their staged pages).
# The stop cuts their requests and sends no other, so they end within milliseconds; one
# still connecting ends within connect_timeout, unwaited for.
STOP_WAIT_SECONDS = 2.0
# How long a resource that answered 403/404 holds the stop for the others' first answers: a
# run whose every resource answers 404 (a wrong base URL) then says so once, not once each,
# and one whose account cannot read several names them all. Short: one answer each, which
# takes milliseconds, so the others are still cut almost at once.
FIRST_ANSWERS_WAIT_SECONDS = 1.0
# How often a resumable read saves its checkpoint (and at each chunk's end): a kill loses at
# most this much of the fetch. Each costs two fsyncs, a few milliseconds against a second.
CHECKPOINT_SECONDS = 1.0


@dataclass(frozen=True)
class SyncPlan:
    """What one run reads and writes."""

    resources: tuple[ResourceSpec, ...]
    # Resources read incrementally: only the records after this key (ids only grow).
    after: Mapping[str, int]
    # Normalized tables rebuilt in the run's transaction: those asked for, and every one that
    # reads a resource the run writes, so none ever lags the tables it is built from.
    tables: tuple[NormalizedTable, ...]

    def read(self, spec: ResourceSpec) -> str:
        after = self.after.get(spec.name)
        return "full" if after is None else f"incremental, after {spec.primary_key} {after}"


def plan_sync(
    resources: Sequence[ResourceSpec],
    tables: Sequence[NormalizedTable],
    all_tables: Sequence[NormalizedTable],
    newest: Mapping[str, int | None],
) -> SyncPlan:
    """``newest``: for an incremental run, the newest stored key of each resource that can be
    read incrementally (None when nothing is stored: that one is read in full)."""
    written = {spec.name for spec in resources}
    rebuilt = tuple(table for table in all_tables if table in tables or written & set(table.reads))
    after = {name: key for name, key in newest.items() if key is not None and name in written}
    return SyncPlan(tuple(resources), after, rebuilt)


@dataclass(frozen=True)
class Fetched:
    """One resource, read to its end and staged."""

    spec: ResourceSpec
    batch: StagedBatch
    stats: RequestStats
    seconds: float
    read: str
    typing_failures: tuple[str, ...]
    swept: tuple[Path, ...]
    # Pages an earlier, failed run had read and this one continued from (0: none), and that run.
    pages_resumed: int = 0
    resumed_from_run: str | None = None


@dataclass(frozen=True)
class FetchOptions:
    staging_dir: str | None
    chunk_pages: int
    progress_seconds: float
    # The resources the deployment syncs (MKT_RESOURCES; empty: the run's own): a resource the
    # account cannot read is said with the value that leaves it out.
    chosen: tuple[str, ...] = ()
    # Keep a failed read's pages for the next run to continue (None: discard them, as before).
    resume: ResumeOptions | None = None
    checkpoint_seconds: float = CHECKPOINT_SECONDS
    # How a failure's message names the settings it mentions.
    settings: SettingNames = ENVIRONMENT


class FetchFailed(SyncError):
    """One resource or more could not be read; the run writes nothing."""

    def __init__(
        self,
        failures: Mapping[str, BaseException],
        fetched: Sequence[str],
        stopped: Sequence[str],
        chosen: Sequence[str] = (),
        kept: str = "",
    ) -> None:
        self.failures = dict(failures)
        # A retry reads every resource again: it can only succeed if each failure may pass.
        self.retriable = all(is_retriable(error) for error in self.failures.values())
        said = _wrong_base_url(failures, [*failures, *fetched, *stopped])
        # Then the resources' own errors, each advising to leave one out, would mislead.
        self.wrong_base_url = bool(said)
        lines = said or [str(error) for error in failures.values()]
        cannot_read = [name for name, error in failures.items() if isinstance(error, ApiAccessError)]
        rest = [name for name in (chosen or [*failures, *fetched, *stopped]) if name not in cannot_read]
        if cannot_read and rest and len(lines) == len(failures):
            settings = next(error.settings for error in failures.values() if isinstance(error, ApiAccessError))
            lines.append(f"To sync the others without {_listed(cannot_read)}: {settings.resources_set_to(rest)}")
        others = []
        if fetched:
            others.append(f"{_listed(fetched)} {'was' if len(fetched) == 1 else 'were'} read in full")
        if stopped:
            others.append(f"{_listed(stopped)} {'was' if len(stopped) == 1 else 'were'} stopped")
        lines.append(
            "Nothing was written: a run writes all its tables or none"
            + (f" ({'; '.join(others)})." if others else ".")
            + kept
        )
        super().__init__("\n".join(lines))


def _wrong_base_url(failures: Mapping[str, BaseException], read: Sequence[str]) -> list[str]:
    """What a run says whose every resource (two or more) answered 404: one wrong base URL,
    not as many resources to leave out; nothing when it is not so."""
    errors = [error for error in failures.values() if isinstance(error, ApiAccessError) and error.status == 404]
    if len(read) < 2 or len(errors) != len(read):
        return []
    first = errors[0]
    return [
        f"Every resource this run reads answered HTTP 404 ({', '.join(f'{error.resource}: {describe_request(error.path, error.query)}' for error in errors)}):"
        f" the base URL is probably wrong, not the key nor the account. {first.settings.base_url} is {first.base_url};"
        f" correct it ({first.settings.left_out}, the API's own address is used) and run again."
    ]


def _kept(options: FetchOptions) -> str:
    if options.resume is None or options.resume.window <= timedelta(0):
        return ""
    return (
        " The pages read are kept: a run of the same resources within"
        f" {window_text(options.resume.window, options.settings.resume_window)} continues from where this one stopped."
    )


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def fetch_all(
    plan: SyncPlan,
    open_client: Callable[[Stop], MarketingApiClient],
    options: FetchOptions,
    typing: TypingQueue,
    log: Log,
) -> dict[str, Fetched]:
    """Read every resource of ``plan`` at once, each in a thread of its own, staging its pages.

    ``open_client(stop)``: a client that sends nothing once the run's ``stop`` is set.
    The first failure stops the others at once (their requests are cut); then every staged
    batch is discarded and ``FetchFailed`` names each failure and what became of the others.
    An interrupt (Terminate, SIGTERM, Ctrl-C: any ``BaseException`` while this waits) stops
    every fetch the same way, and propagates once their staged pages are removed."""
    if options.resume is not None:
        for path, why in sweep_reads(
            staging_directory(options.staging_dir), options.resume.window, setting=options.settings.resume_window
        ):
            log(f"removed the pages a failed run had left in {path}: {why}")
    stop = Stop()
    answers = FirstAnswers([spec.name for spec in plan.resources])
    fetched: dict[str, Fetched] = {}
    failures: dict[str, BaseException] = {}
    stopped: list[str] = []
    futures = {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(plan.resources)), thread_name_prefix="fetch")
    try:
        for spec in plan.resources:
            futures[spec.name] = pool.submit(_fetch, spec, plan, open_client, options, typing, stop, log, answers)
        for name, future in futures.items():
            error = future.exception()
            if error is None:
                fetched[name] = future.result()
            elif isinstance(error, Stopped):
                stopped.append(name)
            else:
                failures[name] = error
                stop.set(f"{name} failed")
    except BaseException as interrupt:
        _stop_fetching(interrupt, [spec.name for spec in plan.resources], stop, pool, futures, typing, log, _kept(options))
        raise
    pool.shutdown()
    if failures:
        for done in fetched.values():
            done.batch.keep()
        failed = FetchFailed(failures, list(fetched), stopped, options.chosen, _kept(options))
        raise failed from (None if failed.wrong_base_url else next(iter(failures.values())))
    return fetched


def _stop_fetching(
    interrupt: BaseException,
    names: Sequence[str],
    stop: Stop,
    pool: ThreadPoolExecutor,
    futures: Mapping[str, Future[Fetched]],
    typing: TypingQueue,
    log: Log,
    kept: str = "",
) -> None:
    """Stop every fetch now, without waiting for the walks to end: the stop cuts their
    requests and lets no other out; each fetch removes its staged pages as it unwinds."""
    stop.set("the run was interrupted")
    typing.abort()
    pool.shutdown(wait=False, cancel_futures=True)
    wait(futures.values(), timeout=STOP_WAIT_SECONDS)
    for future in futures.values():
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().batch.keep()
    unfinished = [name for name, future in futures.items() if not future.done()]
    message = (
        f"Interrupted ({type(interrupt).__name__}) while reading {_listed(names)}:"
        " every fetch was stopped; no request was sent after the interrupt and those under way were cut"
        + (
            ""
            if kept
            else "; the staged pages were removed"
            + (f" (those of {_listed(unfinished)} go once it ends)" if unfinished else "")
        )
        + ". Nothing was written: every table is as it was. Run the sync again to bring them up to date."
        + kept
    )
    interrupt.add_note(message)
    try:
        log(message)
    except Exception:  # noqa: BLE001, S110 - the interrupt is what the run must end with
        pass


def _fetch(
    spec: ResourceSpec,
    plan: SyncPlan,
    open_client: Callable[[Stop], MarketingApiClient],
    options: FetchOptions,
    typing: TypingQueue,
    stop: Stop,
    log: Log,
    answers: FirstAnswers,
) -> Fetched:
    try:
        return _fetch_one(spec, plan, open_client, options, typing, stop, log, answers)
    except Stopped:
        raise
    except ApiAccessError:
        answers.came(spec.name)
        answers.wait(FIRST_ANSWERS_WAIT_SECONDS)
        stop.set(f"{spec.name} failed")
        raise
    except BaseException:
        stop.set(f"{spec.name} failed")  # the others stop at once: this run will write nothing
        raise
    finally:
        answers.came(spec.name)


class FirstAnswers:
    """Which of the run's fetches have had a first answer (a page, an error, or their end)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._waiting = set(names)
        self._changed = threading.Condition()

    def came(self, name: str) -> None:
        with self._changed:
            self._waiting.discard(name)
            self._changed.notify_all()

    def wait(self, seconds: float) -> None:
        """Until every fetch has had its first answer, at most ``seconds``."""
        with self._changed:
            self._changed.wait_for(lambda: not self._waiting, timeout=seconds)


def _fetch_one(
    spec: ResourceSpec,
    plan: SyncPlan,
    open_client: Callable[[Stop], MarketingApiClient],
    options: FetchOptions,
    typing: TypingQueue,
    stop: Stop,
    log: Log,
    answers: FirstAnswers,
) -> Fetched:
    started = time.monotonic()
    after = plan.after.get(spec.name)
    # Ids only grow: in ascending order after the newest stored id come exactly the new records.
    query = {"order": "asc", "startingAfter": after} if after is not None else None
    progress = Progress(log, spec.name, options.progress_seconds)
    resumable = _open_resumable(spec, after, options, log)
    try:
        with open_client(stop) as client, ChunkTyper(spec, typing) as typer, PageStager(
            spec,
            directory=options.staging_dir,
            complete=after is None,
            after=after,
            chunk_pages=options.chunk_pages,
            on_chunk=typer.submit,
            resumable=resumable,
        ) as stager:
            adopted = resumable.adopted if resumable is not None else None
            pages = client.iter_pages(spec, query, resume=adopted["position"] if adopted else None)
            saved = time.monotonic()
            for number, page in enumerate(pages):
                if not number:
                    answers.came(spec.name)
                stop.check()
                stager.add(page)
                if resumable is not None and (stager.chunk_closed or time.monotonic() - saved >= options.checkpoint_seconds):
                    stager.checkpoint(page.position)
                    saved = time.monotonic()
                # This run's own pace: pages adopted from an earlier attempt took no time here.
                progress.tick(stager.records - stager.records_resumed, stager.pages - stager.pages_resumed)
            batch = replace(stager.finish(), typed=typer.finish())
            return Fetched(
                spec,
                batch,
                client.stats,
                time.monotonic() - started,
                plan.read(spec),
                tuple(typer.failures),
                tuple(stager.swept),
                stager.pages_resumed,
                str(adopted["run_id"]) if adopted else None,
            )
    except BaseException:
        if resumable is not None:
            if resumable.checkpointed:
                release_read(resumable.directory)  # what it checkpointed is the next run's to adopt
            else:
                remove_read(resumable.directory)  # stopped before its first checkpoint: nothing to resume
        raise


def _open_resumable(spec: ResourceSpec, after: int | None, options: FetchOptions, log: Log) -> ResumableRead | None:
    """This read's resumable directory, adopting what an earlier attempt left if it matches;
    None when resuming is off, or another live run holds the same read (this one then reads
    afresh, as before)."""
    resume = options.resume
    if resume is None or resume.window <= timedelta(0):
        return None
    identity = resource_identity(resume.identity, spec, after)
    read = open_read(
        staging_directory(options.staging_dir), spec.name, identity, resume.run_id, resume.window,
        setting=options.settings.resume_window,
    )
    if read is None:
        log(f"{spec.name}: another run is reading the same pages; this one reads afresh and cannot be resumed")
    elif read.refused is not None:
        log(f"{spec.name}: the pages a failed run left were not resumed: {read.refused}; reading from the first page")
    elif read.adopted is not None:
        checkpoint = read.adopted
        log(
            f"{spec.name}: resuming the read run {checkpoint['run_id']} left ({checkpoint['pages']} pages,"
            f" {checkpoint['records']} records staged; begun at {read.began:%Y-%m-%d %H:%M:%S} UTC by run"
            f" {checkpoint['first_run']}): "
            + ("it was read to its end, so no request is needed" if checkpoint["position"].get("walk") == "done" else "continuing where it stopped instead of from the first page")
        )
    return read


@dataclass
class Progress:
    """Logs a long fetch's progress at a steady pace, so a user watching the run sees it move."""

    log: Log
    resource: str
    interval: float
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def tick(self, records: int, pages: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.started
        self.log(
            f"{self.resource}: {records} records in {pages} pages so far"
            f" ({records / elapsed:,.0f} records/s, {elapsed:.0f}s)"
        )


@dataclass
class RunWrite:
    """Everything one run writes, landed in one transaction the first time any of its tables
    is handed to the IO manager; the staged files are gone once it has been tried."""

    batches: tuple[StagedBatch, ...]
    tables: tuple[NormalizedTable, ...]
    runner: CommitRunner
    # See ``commit.CommitRequest``.
    asked: frozenset[str] = frozenset()
    history: bool = True
    within: frozenset[str] | None = None
    max_drop: float = DEFAULT_MAX_DROP
    confirm_mass_deletion: bool = False
    # How a refusal of this write (a mass deletion) names the settings it mentions.
    settings: SettingNames = ENVIRONMENT
    refresh: Refresh | None = None
    facts: bool = True
    result: RunCommit | None = None
    _facts: Facts | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def commit(self, file: WarehouseFile, schema: str, deletions: str, log: Log | None) -> RunCommit:
        with self._lock:
            if self.result is None:
                request = CommitRequest(
                    file,
                    schema,
                    self.batches,
                    self.tables,
                    deletions,
                    history=self.history,
                    asked=self.asked,
                    within=self.within,
                    max_drop=self.max_drop,
                    confirm_mass_deletion=self.confirm_mass_deletion,
                    refresh=self.refresh,
                    facts=self.facts,
                )
                try:
                    self.result = self.runner(request, log)
                finally:
                    for batch in self.batches:
                        batch.discard()
            return self.result

    def checks_facts(self) -> Facts:
        """What the checks read once the write committed: gathered with it, or after it by the
        worker (``InWorker``) while the tables were reported."""
        with self._lock:
            if self._facts is None:
                if self.result is None:
                    raise RuntimeError("the checks' facts are asked for before the run's write")
                if self.result.facts is not None:
                    self._facts = self.result.facts
                elif isinstance(self.runner, InWorker):
                    self._facts = self.runner.gathered_facts()
                else:
                    raise RuntimeError("the commit deferred the checks' facts, and its runner cannot gather them")
            return self._facts


@dataclass(frozen=True)
class TableWrite:
    """What an asset's output hands the IO manager: its table, within the run's write."""

    write: RunWrite
    table: str
