"""A run as a whole: one asset alone, a failing resource beside succeeding ones, and run-level
atomicity: every table of one sync, or every table as it was, whatever fails or is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.core.catalog import RESOURCES
from mkt_assets.core.errors import MassDeletionError, StagingError
from mkt_assets.core.page import Page
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.plumbing import lean_process
from mkt_assets.run.sync import RunWrite, in_worker
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer
from mkt_assets.staging.pages import PageStager
from mkt_assets.warehouse.commit import commit_run, gathered_facts
from mkt_assets.warehouse.connection import WarehouseFile, connect
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.conftest import materialization, materialize_marketing
from mkt_assets_tests.test_warehouse import contact, stage, staged_files

API_KEY = "run-secret-41d7"
SYNCED = [spec.name for spec in RESOURCES]
EVERYTHING = SYNCED + [table.name for table in NORMALIZED_TABLES]


class Account:
    """A simulator and a DuckDB file holding a first full sync of it."""

    def __init__(self, tmp_path: Path, contacts: int = 800) -> None:
        self.data = SandboxData(seed=31, contacts=contacts)
        self.server = SandboxServer(self.data, api_key=API_KEY).start()
        self.tmp_path = tmp_path
        self.database = str(tmp_path / "run.duckdb")

    def resources(self, deletions: str = "mark", **api_settings: Any) -> dict[str, Any]:
        return {
            "marketing_api": MarketingApiResource(
                base_url=self.server.base_url, api_key=API_KEY, backoff_factor=0, quota_state_dir=str(self.tmp_path / "quota"),
                **api_settings,
            ),  # fmt: skip
            "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=self.database), deletions=deletions),
            "warehouse": WarehouseResource(database=self.database),
        }

    def sync(self, names: list[str] = EVERYTHING, *faults: Fault) -> Any:
        self.server.clear_faults()
        for fault in faults:
            self.server.add_fault(fault)
        self.server.reset_log()
        return materialize_marketing(names, self.resources(), raise_on_error=False)

    def tables(self, stamps: bool = True) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows, bookkeeping included, in key order; without ``stamps``, when
        rows were written is left out (two runs of the same sync write different times)."""
        with connect(self.database) as connection:
            tables = {}
            for name in EVERYTHING:
                table = fully_qualified(connection, "marketing", name)
                columns = "*" if stamps or name not in SYNCED else "* EXCLUDE (_synced_at, _deleted_at), _deleted_at IS NULL"
                tables[name] = connection.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()
            return tables

    def change_contacts(self) -> None:
        """What only a full sync sees: new contacts, retagged ones, a deleted one."""
        self.data.add_contacts(150)
        ids = list(self.data.contact_ids)
        for contact_id in ids[:40]:
            self.data.set_contact_tags(contact_id, self.data.tag_ids[:2])
        self.data.delete_contact(ids[50])


@pytest.fixture()
def account(tmp_path: Path) -> Iterator[Account]:
    running = Account(tmp_path)
    try:
        assert running.sync().success
        yield running
    finally:
        running.server.stop()


@pytest.mark.slow  # a second or more: several real syncs
def test_materializing_one_asset_alone_reads_only_its_resource_and_rebuilds_what_reads_it(account: Account) -> None:
    account.change_contacts()

    result = account.sync(["contacts"])

    assert result.success
    assert {request.path for request in account.server.requests} == {"/api/contacts"}
    assert materialization(result, "contacts")["rows_inserted"] == 150
    # The normalized tables reading contacts were rebuilt in the same transaction, and say so;
    # course_modules, which does not read contacts, was not touched.
    rebuilt = {event.asset_key.path[-1]: event for event in result.get_asset_materialization_events()}
    assert set(rebuilt) == {"contacts"} | {table.name for table in NORMALIZED_TABLES if "contacts" in table.reads}
    assert {"contact_tags", "contact_field_values", "contact_profiles"} <= set(rebuilt)
    assert "Rebuilt in the same transaction as contacts, tags" in (rebuilt["contact_tags"].materialization.description or "")
    assert_normalized_tables_match_their_contacts(account)


@pytest.mark.slow  # a second or more: several real syncs
@pytest.mark.parametrize("failing", ["tags", "contacts"])
def test_a_failing_resource_fails_the_run_naming_it_and_every_table_stays_as_it_was(account: Account, failing: str) -> None:
    before = account.tables()
    account.change_contacts()

    result = account.sync(EVERYTHING, Fault("status", path=f"/api{_path(failing)}", status=502, times=-1, after=1 if failing == "contacts" else 0))

    assert not result.success
    assert result.get_asset_materialization_events() == []
    assert account.tables() == before
    (failure,) = result.get_step_failure_events()
    message = str(failure.event_specific_data.error)  # type: ignore[union-attr]
    assert f"{failing}: GET /api{_path(failing)}" in message and "HTTP 502 after retries" in message
    assert "Nothing was written: a run writes all its tables or none (" in message
    others = [name for name in SYNCED if name != failing]
    assert all(name in message for name in others), message  # each other resource's fate is said


def _path(name: str) -> str:
    return next(spec.path for spec in RESOURCES if spec.name == name)


def test_a_write_that_fails_on_one_table_writes_none(tmp_path: Path) -> None:
    database = str(tmp_path / "atomic.duckdb")
    tags, communities = (spec for spec in RESOURCES if spec.name in ("tags", "communities"))
    first = [
        _staged(tags, tmp_path, b'{"items": [{"id": 1, "name": "a"}], "hasMore": false}'),
        _staged(communities, tmp_path, b'{"items": [{"id": 5, "name": "Lounge"}], "hasMore": false}'),
    ]
    commit_run(WarehouseFile(database), "marketing", first, [], deletions="mark")
    with connect(database) as connection:
        before = connection.execute("SELECT id, name FROM marketing.tags UNION ALL SELECT id, name FROM marketing.communities").fetchall()
    second = [
        _staged(tags, tmp_path, b'{"items": [{"id": 1, "name": "renamed"}, {"id": 2, "name": "new"}], "hasMore": false}'),
        # Sends its id twice: DuckDB refuses it, after the tags merge ran in the same transaction.
        _staged(communities, tmp_path, b'{"items": [{"id": 6, "id": 7, "name": "Twice"}], "hasMore": false}'),
    ]

    with pytest.raises(StagingError, match="sends the field 'id' twice"):
        commit_run(WarehouseFile(database), "marketing", second, [], deletions="mark")

    with connect(database) as connection:
        after = connection.execute("SELECT id, name FROM marketing.tags UNION ALL SELECT id, name FROM marketing.communities").fetchall()
    assert after == before


def _staged(spec: Any, directory: Path, body: bytes) -> Any:
    import json

    items = json.loads(body)["items"]
    with PageStager(spec, directory=str(directory)) as stager:
        stager.add(Page(spec.name, 1, f"/api{spec.path}", {}, items, False, body))
        return stager.finish()


def assert_normalized_tables_match_their_contacts(account: Account) -> None:
    """contact_tags and contact_field_values hold exactly what the live contacts carry."""
    with connect(account.database) as connection:
        contacts = fully_qualified(connection, "marketing", "contacts")
        for table, column, member in (("contact_tags", "tags", "id"), ("contact_field_values", "fields", "slug")):
            name = fully_qualified(connection, "marketing", table)
            key = "tag_id" if table == "contact_tags" else "slug"
            expected = connection.execute(
                f"SELECT id, unnest({column}).{member} FROM {contacts} WHERE _deleted_at IS NULL ORDER BY ALL"
            ).fetchall()
            actual = connection.execute(f"SELECT contact_id, {key} FROM {name} ORDER BY ALL").fetchall()
            assert actual == expected, table


_RUN = """
import sys
import dagster as dg
from mkt_assets.definitions import build_definitions
result = build_definitions().resolve_job_def("marketing_sync").execute_in_process(instance=dg.DagsterInstance.ephemeral())
print("RUN", result.success, flush=True)
"""


@pytest.mark.slow
def test_a_run_killed_at_any_moment_leaves_every_table_from_one_sync(tmp_path: Path) -> None:
    account = Account(tmp_path, contacts=6000)
    saved = tmp_path / "first-sync.duckdb"
    try:
        assert account.sync().success
        first_sync = account.tables(stamps=False)
        shutil.copyfile(account.database, saved)
        account.change_contacts()
        environment = {
            **os.environ,
            "MKT_API_BASE_URL": account.server.base_url,
            "MKT_API_KEY": API_KEY,
            "MKT_DUCKDB_PATH": account.database,
        }
        started = time.monotonic()
        finished = subprocess.run([sys.executable, "-c", _RUN], env=environment, capture_output=True, text=True, timeout=300)
        whole_run = time.monotonic() - started
        assert "RUN True" in finished.stdout, finished.stdout[-2000:] + finished.stderr[-2000:]
        second_sync = account.tables(stamps=False)
        assert second_sync != first_sync
        # Back to the first sync, then the same run again, killed at moments spread over its
        # whole length: each time every table is as the first sync left it, or as the second.
        for step in range(1, 13):
            shutil.copyfile(saved, account.database)
            Path(f"{account.database}.wal").unlink(missing_ok=True)
            runner = subprocess.Popen([sys.executable, "-c", _RUN], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            moment = whole_run * step / 12
            time.sleep(moment)  # when to kill: this test's input, not a synchronisation
            os.kill(runner.pid, signal.SIGKILL)
            runner.wait(60)
            state = account.tables(stamps=False)
            assert state in (first_sync, second_sync), f"killed at {moment:.1f}s of {whole_run:.1f}s: a mix of two syncs"
            assert_normalized_tables_match_their_contacts(account)
    finally:
        account.server.stop()


# A mass deletion: a complete read lacking more of a table's live rows than a sync marks gone
# unconfirmed (an outage answering an empty list) fails the write and leaves every table.

CONTACT_IDS = range(1, 21)
TAG_IDS = range(1, 11)


def _account(tmp_path: Path, *, contacts: Any = CONTACT_IDS, tags: Any = TAG_IDS, complete: bool = True) -> list[Any]:
    """Every resource staged as a complete read: ``contacts`` and ``tags`` by id, the rest empty."""
    items: dict[str, list[dict[str, Any]]] = {
        "contacts": [contact(i, tags=[{"id": 1 + i % 3, "name": f"tag {1 + i % 3}"}]) for i in contacts],
        "tags": [{"id": i, "name": f"tag {i}", "createdAt": None} for i in tags],
    }
    return [
        stage(spec, [items.get(spec.name, [])], tmp_path, complete=complete or spec.name != "contacts")
        for spec in RESOURCES
    ]


@pytest.mark.slow  # two real writes of every table, one in a DuckDB worker
def test_the_checks_facts_gathered_after_the_commit_are_those_of_the_committed_tables(tmp_path: Path) -> None:
    """The worker answers as soon as the transaction commits and gathers the checks' facts
    meanwhile: what the checks then read is what gathering them with the commit gives."""
    inline = WarehouseFile(str(tmp_path / "inline.duckdb"))
    expected = commit_run(inline, "marketing", _account(tmp_path), NORMALIZED_TABLES, deletions="mark").facts
    assert expected is not None and expected.error is None and expected.synced["contacts"].live_rows == 20

    deferred = WarehouseFile(str(tmp_path / "deferred.duckdb"))
    with lean_process.Worker("duckdb", preload=("mkt_assets.warehouse.commit",)) as worker:
        write = RunWrite(batches=tuple(_account(tmp_path)), tables=NORMALIZED_TABLES, runner=in_worker(worker))
        committed = write.commit(deferred, "marketing", "mark", log=None)
        assert committed.facts is None  # answered before the facts were gathered
        assert write.checks_facts() == expected
        assert write.checks_facts() == expected  # asked once of the worker, then kept
        # Gathered and the file released: this process may open it.
        assert len(_every_table(deferred.database)["contact_tags"]) == len(_every_table(inline.database)["contact_tags"]) == 20
        with pytest.raises(RuntimeError, match="no commit in this process is gathering"):
            worker.call(gathered_facts)


def _every_table(database: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the schema, history and normalized ones included, whole and in order."""
    with connect(database) as connection:
        names = [row[0] for row in connection.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'marketing' ORDER BY 1"
        ).fetchall()]  # fmt: skip
        return {
            name: connection.execute(f"SELECT * FROM {fully_qualified(connection, 'marketing', name)} ORDER BY ALL").fetchall()
            for name in names
        }


@pytest.mark.slow  # a second or more: several real syncs
@pytest.mark.parametrize("history", [True, False], ids=["history", "no history"])
@pytest.mark.parametrize("deletions", ["mark", "delete"])
def test_a_mass_deletion_is_refused_leaving_every_table_as_it_was_and_a_confirmed_run_applies_it(
    tmp_path: Path, deletions: str, history: bool
) -> None:
    file = WarehouseFile(str(tmp_path / "mass.duckdb"))
    options: dict[str, Any] = {"deletions": deletions, "history": history}
    commit_run(file, "marketing", _account(tmp_path), NORMALIZED_TABLES, **options)
    before = _every_table(file.database)
    assert len(before["contact_tags"]) == 20 and len(before["contact_profiles"]) == 20
    assert ("contacts_history" in before) is history

    # Contacts answered empty, and 8 of the 10 tags are missing (more than the handful of 5).
    with pytest.raises(MassDeletionError) as refused:
        commit_run(file, "marketing", _account(tmp_path, contacts=[], tags=[1, 2]), NORMALIZED_TABLES, **options)

    assert _every_table(file.database) == before
    fate = "remove them (MKT_DELETIONS=delete)" if deletions == "delete" else "mark them deleted"
    assert str(refused.value).splitlines()[:2] == [
        f"marketing.contacts: the API's complete list (0 records) lacks all 20 of the table's live rows; the sync would {fate}",
        f"marketing.tags: the API's complete list (2 records) lacks 8 of the table's 10 live rows (80.0%); the sync would {fate}",
    ]
    assert "at most 10% of a table's live rows (MKT_ROW_COUNT_MAX_DROP) or 5 rows" in str(refused.value)
    assert "Nothing was written: every table is as it was." in str(refused.value)

    commit_run(
        file, "marketing", _account(tmp_path, contacts=[], tags=[1, 2]), NORMALIZED_TABLES, confirm_mass_deletion=True, **options
    )

    after = _every_table(file.database)
    live_contacts = [row for row in after["contacts"] if row[-1] is None]
    assert (len(after["contacts"]), live_contacts) == ((0, []) if deletions == "delete" else (20, []))
    assert len(after["tags"]) == (2 if deletions == "delete" else 10)
    assert after["contact_tags"] == [] and after["contact_profiles"] == [] and after["contact_field_values"] == []
    if history:
        assert len(after["contacts_history"]) == 20
        assert all(row[-1] is not None for row in after["contacts_history"])  # every version closed


@pytest.mark.slow  # a second or more: several real syncs
def test_deletions_within_the_share_or_the_handful_and_incremental_reads_need_no_confirmation(tmp_path: Path) -> None:
    file = WarehouseFile(str(tmp_path / "within.duckdb"))
    commit_run(file, "marketing", _account(tmp_path), NORMALIZED_TABLES, deletions="mark")

    # 2 of 20 contacts (10%) and 5 of 10 tags (the handful) gone upstream.
    commit_run(file, "marketing", _account(tmp_path, contacts=range(3, 21), tags=range(1, 6)), NORMALIZED_TABLES, deletions="mark")
    # An incremental read of contacts says nothing of the rows it did not fetch.
    commit_run(file, "marketing", _account(tmp_path, contacts=[], tags=range(1, 6), complete=False), NORMALIZED_TABLES, deletions="mark")

    tables = _every_table(file.database)
    assert sum(row[-1] is None for row in tables["contacts"]) == 18
    assert sum(row[-1] is None for row in tables["tags"]) == 5
    assert len(tables["contact_profiles"]) == 18


@pytest.mark.slow
@pytest.mark.parametrize("deletions", ["mark", "delete"])
def test_an_empty_answer_fails_the_run_leaving_every_table_and_a_confirmed_run_applies_it(
    account: Account, deletions: str
) -> None:
    before = _every_table(account.database)
    staging = account.tmp_path / "staging"
    resources = account.resources(deletions, staging_dir=str(staging))
    outage = Fault("empty", path="/api/contacts", times=-1)  # 200 {"items": [], "hasMore": false}
    account.server.add_fault(outage)

    result = materialize_marketing(EVERYTHING, resources, raise_on_error=False)

    assert not result.success
    assert result.get_asset_materialization_events() == []
    assert _every_table(account.database) == before  # contacts, contact_tags, contact_profiles, the history
    assert staged_files(staging) == []
    (failure,) = result.get_step_failure_events()
    error = failure.event_specific_data.error  # type: ignore[union-attr]
    assert error is not None and error.cls_name == "Failure" and error.cause is None  # one message, no chain
    message = failure.event_specific_data.user_failure_data.description  # type: ignore[union-attr]
    fate = "remove them (MKT_DELETIONS=delete)" if deletions == "delete" else "mark them deleted"
    assert message.splitlines()[0] == (
        f"marketing.contacts: the API's complete list (0 records) lacks all 800 of the table's live rows; the sync would {fate}"
    )
    assert "(MKT_ROW_COUNT_MAX_DROP)" in message and "Nothing was written: every table is as it was." in message
    assert f"run config {json.dumps(Names().confirm_mass_deletion_config())}" in message
    assert "dg launch --job marketing_sync --config-json" in message

    result = materialize_marketing(EVERYTHING, resources, run_config=Names().confirm_mass_deletion_config())

    assert result.success
    assert materialization(result, "contacts")["rows_deleted_upstream"] == 800
    after = _every_table(account.database)
    assert [row for row in after["contacts"] if row[-1] is None] == []
    assert len(after["contacts"]) == (0 if deletions == "delete" else 800)
    assert after["contact_tags"] == after["contact_profiles"] == after["contact_field_values"] == []
    assert all(row[-1] is not None for row in after["contacts_history"])  # every version closed
    assert staged_files(staging) == []


# Paginated lists are walked from both ends: each end may have one request under way.
WALK_ENDS = sum(2 if spec.paginated else 1 for spec in RESOURCES)
# From SIGTERM to the run recorded as failed: the fetch stops and the step fails in well under.
STOP_SECONDS = 5.0
# From SIGTERM to the process's end: the above, then the interpreter's exit, which takes 2-3 s
# here after any `dagster job execute`, failed or not (it collects Dagster's objects).
EXIT_SECONDS = STOP_SECONDS + 10.0


def _lean_children(parent: int) -> list[int]:
    """The live lean workers (``lean_process``) of process ``parent``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive_child_of(int(entry.name), parent):
            found.append(int(entry.name))
    return found


def _alive_child_of(pid: int, parent: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone, or ended while being read
        return False
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state != "Z" and (parent is None or int(ppid) == parent) and lean_process.__name__.encode() in command


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Terminate"])
def test_a_run_terminated_mid_fetch_stops_at_once_sends_nothing_more_and_leaves_everything_as_it_was(
    tmp_path: Path, how: str
) -> None:
    """`dagster job execute` stopped mid-fetch: by SIGTERM (`timeout`, `kill`, Kubernetes), or as
    Terminate in the UI does it: the launcher marks the run CANCELING, then the code server's
    termination thread interrupts the run's process with SIGINT."""
    account = Account(tmp_path, contacts=6000)
    try:
        assert account.sync().success
        before = account.tables()
        account.change_contacts()  # a sync that ran to its end would change the tables
        account.server.latency = 0.1  # the API's pace, rather than loopback's: the fetch takes seconds
        account.server.reset_log()
        home = tmp_path / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        temporary = tmp_path / "tmp"  # the default staging (and quota) directory lives here
        temporary.mkdir()
        environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
        environment.update(
            MKT_API_BASE_URL=account.server.base_url,
            MKT_API_KEY=API_KEY,
            MKT_DUCKDB_PATH=account.database,
            DAGSTER_HOME=str(home),
            TMPDIR=str(temporary),
        )
        command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"]
        with open(tmp_path / "run.log", "wb") as output:
            runner = subprocess.Popen(command, env=environment, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while sum(arrival.path == "/api/contacts" for arrival in account.server.arrivals) < 10:
                assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
                time.sleep(0.01)  # polling the simulator's log for the run to be well into the fetch
            workers = _lean_children(runner.pid)
            if how == "Terminate":
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    (started,) = instance.get_runs()
                    instance.report_run_canceling(started)
            signalled = time.time()
            runner.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
            runner.wait(120)
            exited = time.time()
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        log = (tmp_path / "run.log").read_text()

        assert exited - signalled < EXIT_SECONDS, log[-3000:]
        arrivals = account.server.arrivals
        after_the_signal = [arrival for arrival in arrivals if arrival.at > signalled]
        assert len(after_the_signal) <= WALK_ENDS, f"{len(after_the_signal)} requests after the signal"
        assert [arrival for arrival in arrivals if arrival.at > exited] == []
        assert account.tables() == before
        staging = temporary / f"mkt_assets-{os.getuid()}" / "staging"
        # The pages read stay for the next run to resume (issue 23), each read with its
        # checkpoint; nothing else is left in the staging directory.
        kept = staging / "resumable"
        assert [path for path in staging.rglob("*") if path.is_file() and kept not in path.parents] == [], "staged files left"
        assert kept.is_dir() and all((read / "checkpoint.json").is_file() for read in kept.iterdir()), "a read without its checkpoint"
        assert workers, "the run had no lean worker to end"
        assert not any(_alive_child_of(pid, None) for pid in workers), "a lean worker outlived the run"
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (run,) = instance.get_runs()
            assert run.status == (dg.DagsterRunStatus.FAILURE if how == "SIGTERM" else dg.DagsterRunStatus.CANCELED)
            entries = instance.all_logs(run.run_id)
            messages = [str(entry.message) + str(entry.dagster_event) for entry in entries]
            ended = {entry.dagster_event_type: entry.timestamp for entry in entries if entry.dagster_event_type}
        run_ended = ended[dg.DagsterEventType.RUN_FAILURE if how == "SIGTERM" else dg.DagsterEventType.RUN_CANCELED]
        assert run_ended - signalled < STOP_SECONDS, log[-3000:]
        # Where the seconds go, for the record (pytest -s shows it).
        print(
            f"after {how}: step failed {ended[dg.DagsterEventType.STEP_FAILURE] - signalled:.2f} s, run"
            f" {run.status.value} {run_ended - signalled:.2f} s, process exited {exited - signalled:.2f} s;"
            f" {len(after_the_signal)} requests arrived after it"
        )
        said = "\n".join(messages)
        assert ("Execution was interrupted" if how == "SIGTERM" else 'Execution of run for "marketing_sync" canceled.') in said
        assert "Interrupted (DagsterExecutionInterruptedError) while reading" in said
        assert "Nothing was written: every table is as it was." in said
    finally:
        account.server.stop()
