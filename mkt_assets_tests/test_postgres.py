"""The Postgres tier (``-m postgres``): the production layout of docs/operating.md, for real.

A PostgreSQL server started here from the machine's ``initdb`` and ``pg_ctl`` holds the Dagster
instance's records; the doc's ``dagster.yaml`` and ``workspace.yaml`` and its three commands (the
code location behind ``dagster api grpc``, ``dagster-webserver``, ``dagster-daemon run``) run on
loopback; runs are launched as the UI's launchpad does and go through the daemon's run queue to
the code server, which syncs the simulator into DuckDB.

The tier's tests are marked ``postgres`` and ``slow``: left out of a plain ``pytest``
(pyproject's addopts) and of the fast tier, run by ``pytest -m postgres`` (as CI does). Asked for
without the server's programs or the ``postgres`` extra, the tier fails saying what to install:
it never skips. (The two unmarked tests at the end check that, in the fast tier.)
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
import yaml

from mkt_assets.core.catalog import RESOURCES
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.assets import warehouse_pool
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets_tests.daemon import held_back_by_its_pool, run_worker_pid
from mkt_assets_tests.test_component import add_instance, fresh_dg_project
from mkt_assets_tests.test_resume import tables
from mkt_assets_tests.test_ui import (
    DAILY_CRON,
    LAUNCH_MUTATION,
    LOCATION,
    REPOSITORY,
    GraphQL,
    free_loopback_port,
    stop_process_group,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
API_KEY = "postgres-secret-5e8a1d"
PG_USER = "mkt_test"
PG_DATABASE = "dagster"
DEADLINE_SECONDS = 240.0
STARTUP_SECONDS = 120.0
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
# Where the distributions put the server's programs when they are not on PATH (Debian, Ubuntu).
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


# ------------------------------------------------------------------ what the tier needs, or says


def postgres_programs() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: on PATH, else the newest distribution's."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)])
    for directory in reversed(found):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    pytest.fail(
        "The Postgres tier starts a PostgreSQL server and needs its programs initdb and pg_ctl, found neither on PATH"
        f" nor in {PG_BIN_GLOB}. Install PostgreSQL's server package (Debian/Ubuntu: apt-get install postgresql;"
        " Fedora/RHEL: dnf install postgresql-server; macOS: brew install postgresql) or put its bin directory on PATH,"
        " then run -m postgres again.",
        pytrace=False,
    )


def require_dagster_postgres() -> None:
    if importlib.util.find_spec("dagster_postgres") is None:
        pytest.fail(
            "The Postgres tier needs dagster-postgres, which the project's postgres extra brings:"
            " .venv/bin/pip install -e '.[postgres]', then run -m postgres again.",
            pytrace=False,
        )


# ------------------------------------------------------------------------ a PostgreSQL server


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL server: its data directory and unix socket in a temporary directory,
    TCP on 127.0.0.1 with a password (what Dagster uses, so the password really is read from the
    environment), the unix socket trusted (what the test uses to look inside)."""

    programs: Path
    directory: Path
    port: int
    password: str
    owner: pwd.struct_passwd | None  # who runs the server when the tests run as root

    def _run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        # initdb and postgres refuse to run as root: the server runs as an unprivileged user then.
        as_owner: dict[str, Any] = (
            {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []} if self.owner else {}
        )
        return subprocess.run(
            [str(self.programs / arguments[0]), *arguments[1:]],
            cwd=self.directory, env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"},
            capture_output=True, text=True, timeout=STARTUP_SECONDS, check=False, **as_owner,
        )  # fmt: skip

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def log_tail(self) -> str:
        log = self.directory / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no server log)"

    def init(self) -> None:
        password_file = self.directory / "password"
        password_file.write_text(self.password + "\n")
        if self.owner:
            os.chown(password_file, self.owner.pw_uid, self.owner.pw_gid)
        made = self._run(
            "initdb", "-D", str(self.data), "-U", PG_USER, f"--pwfile={password_file}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        if made.returncode != 0:
            pytest.fail(f"initdb failed ({made.returncode}):\n{made.stdout}\n{made.stderr}", pytrace=False)

    def start(self) -> None:
        # The port is free when chosen and taken by the server a moment later: another process
        # may take it meanwhile, so a failed start tries another one.
        for _ in range(3):
            self.port = free_loopback_port()
            options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.directory} -c fsync=off"
            started = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options)
            if started.returncode == 0:
                return
        pytest.fail(f"pg_ctl start failed ({started.returncode}): {started.stderr}\n{self.log_tail()}", pytrace=False)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            stopped = self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data))
            if stopped.returncode != 0:
                self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "immediate", "-D", str(self.data))

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2  # the postgres extra's driver, checked for before the server starts

        connection = psycopg2.connect(host=str(self.directory), port=self.port, user=PG_USER, dbname=database)
        connection.autocommit = True
        return connection

    def query(self, sql: str, parameters: tuple[Any, ...] = (), database: str = PG_DATABASE) -> list[tuple[Any, ...]]:
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def create_database(self, name: str) -> None:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}" OWNER {PG_USER}')
        finally:
            connection.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    require_dagster_postgres()
    programs = postgres_programs()
    owner = None
    if os.getuid() == 0:
        try:
            owner = pwd.getpwnam("nobody")
        except KeyError:
            pytest.fail("As root, the tier runs PostgreSQL as the user nobody, and there is none: run the tests as another user", pytrace=False)
    # Not under pytest's tmp_path: the server's user must reach it (pytest's is the caller's
    # alone) and a unix socket's path must stay under about 100 characters.
    directory = Path(tempfile.mkdtemp(prefix="mkt-pg-"))
    server = PostgresServer(programs, directory, 0, secrets.token_urlsafe(16), owner)
    try:
        if owner:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        server.init()
        server.start()
        server.create_database(PG_DATABASE)
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- the doc's production layout


@dataclass
class Layout:
    """What docs/operating.md's "Production layout" shows: the instance's dagster.yaml (as
    written, comments and all), the workspace, and the commands that start the services."""

    dagster_yaml: str
    workspace: dict[str, Any]
    commands: dict[str, list[str]]  # by program: dagster (api grpc), dagster-webserver, dagster-daemon
    compute_logs: dict[str, Any]  # the private place of the runs' stdout and stderr, an addition to dagster.yaml


def production_layout() -> Layout:
    text = (REPO / "docs" / "operating.md").read_text()
    section = text[text.index("## Production layout") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    (dagster_yaml,) = [block for block in yaml_blocks if "storage" in yaml.safe_load(block)]
    (workspace,) = [yaml.safe_load(block) for block in yaml_blocks if "load_from" in yaml.safe_load(block)]
    (compute_logs,) = [yaml.safe_load(block) for block in yaml_blocks if "compute_logs" in yaml.safe_load(block)]
    commands: dict[str, list[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # NAME=value before a command
                words.pop(0)
            if words and not words[0].startswith(".venv/"):  # the extra's install, which CI runs
                commands[words[0]] = words
    assert sorted(commands) == ["dagster", "dagster-daemon", "dagster-webserver"], commands
    return Layout(dagster_yaml, workspace, commands, compute_logs)


def with_option(words: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """``words`` with the value of the option called any of ``names`` replaced."""
    (at,) = [index for index, word in enumerate(words) if word in names]
    return [*words[: at + 1], value, *words[at + 2 :]]


# The user's own project the tier serves beside this one's: two accounts, each a component
# instance with its own key, prefix, simulator and warehouse file.
ACCOUNTS_LOCATION = "accounts"
ACCOUNTS = {"acme": ("acme-pg-key-4b1d", 11), "globex": ("globex-pg-key-90ce", 12)}


@dataclass
class Account:
    name: str
    key: str
    simulator: SandboxServer
    database: Path


@dataclass
class Deployment:
    postgres: PostgresServer
    home: Path
    database: Path
    simulator: SandboxServer
    data: SandboxData
    code_servers: dict[str, subprocess.Popen[bytes]]  # by location
    accounts: dict[str, Account]
    graphql: GraphQL
    logs: dict[str, Path]
    instance: dg.DagsterInstance

    def log_tails(self) -> str:
        return log_tails(self.logs)

    def wait_for(self, what: str, condition: Callable[[], bool], seconds: float = DEADLINE_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {seconds:.0f}s\n{self.log_tails()}")
            time.sleep(0.5)  # polling other processes' state, with a deadline

    def launch(self, job: str, location: str = LOCATION) -> str:
        """Submit a run as the UI's launchpad does (the webserver stores it Queued); its id."""
        selector = {"repositoryLocationName": location, "repositoryName": REPOSITORY, "jobName": job}
        launched = self.graphql(LAUNCH_MUTATION, {"executionParams": {"selector": selector, "mode": "default"}})
        assert launched["launchRun"]["__typename"] == "LaunchRunSuccess", launched
        return str(launched["launchRun"]["run"]["runId"])

    def shown(self, run_id: str) -> tuple[str, list[str]]:
        """The run's status and pools as the UI shows them."""
        run = self.graphql(RUN_POOLS_QUERY, {"runId": run_id})["runOrError"]
        return str(run["status"]), sorted(run["allPools"] or [])

    def stored(self, run_id: str) -> tuple[str, str, float | None, float | None]:
        """The run's row in PostgreSQL: its job, status, start and end."""
        ((job, status, start, end),) = self.postgres.query(
            "SELECT pipeline_name, status, start_time, end_time FROM runs WHERE run_id = %s", (run_id,)
        )
        return job, status, start, end

    def wait_until_finished(self, *run_ids: str) -> None:
        self.wait_for(f"runs {', '.join(run_ids)} finished", lambda: all(self.stored(run_id)[1] in FINISHED for run_id in run_ids))


def log_tails(logs: dict[str, Path]) -> str:
    return "\n".join(
        f"--- {name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]) for name, path in logs.items() if path.exists()
    )


RUN_POOLS_QUERY = """
query RunPools($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status allPools } ... on PythonError { message } }
}
"""


def start(command: list[str], cwd: Path, environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:
        return subprocess.Popen(
            [str(BIN / command[0]), *command[1:]], cwd=cwd, env=environment,
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def accounts_project(root: Path, accounts: dict[str, Account]) -> Path:
    """A dg project of the user's own holding one component instance per account."""
    project = fresh_dg_project(root / "accounts_project", "accounts")
    for account in accounts.values():
        add_instance(
            project, account.name, base_url=account.simulator.base_url, database=str(account.database),
            # The schedules never fire during the test (their runs would join the queue).
            sync_cron=DAILY_CRON, incremental_cron=DAILY_CRON,
        )  # fmt: skip
    return project


@pytest.fixture(scope="module")
def deployment(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    layout = production_layout()
    root = tmp_path_factory.mktemp("deployment")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(layout.dagster_yaml)
    ports = {LOCATION: free_loopback_port(), ACCOUNTS_LOCATION: free_loopback_port()}
    web_port = free_loopback_port()
    # The doc's code location, and the user's own project served the same way beside it.
    (grpc_server,) = [entry["grpc_server"] for entry in layout.workspace["load_from"]]
    servers = [{**grpc_server, "host": "127.0.0.1", "port": ports[LOCATION]}]
    servers.append({**grpc_server, "host": "127.0.0.1", "port": ports[ACCOUNTS_LOCATION], "location_name": ACCOUNTS_LOCATION})
    (root / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"grpc_server": server} for server in servers]}))

    # Every service: the instance (DAGSTER_HOME and PostgreSQL's connection), nothing of the project.
    instance_environment = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_DB": PG_DATABASE,
        "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": postgres.password,
    }
    base = {key: value for key, value in os.environ.items() if not key.startswith(("MKT_", "DAGSTER_"))}
    services = {**base, **instance_environment, "PYTHONUNBUFFERED": "1"}
    data = SandboxData(seed=7, contacts=180)
    database = root / "warehouse.duckdb"
    logs = {name: root / f"{name}.log" for name in ("code server", "accounts code server", "webserver", "daemon")}
    processes: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        simulator = stack.enter_context(SandboxServer(data, api_key=API_KEY))
        accounts = {
            name: Account(
                name, key, stack.enter_context(SandboxServer(SandboxData(seed=seed, contacts=120), api_key=key)),
                root / f"{name}_warehouse.duckdb",
            )
            for name, (key, seed) in ACCOUNTS.items()
        }  # fmt: skip
        project_root = accounts_project(root, accounts)
        # The code locations alone hold the accounts' settings: keys, APIs, DuckDB files.
        settings = {
            LOCATION: {
                "MKT_API_BASE_URL": simulator.base_url,
                "MKT_API_KEY": API_KEY,
                "MKT_DUCKDB_PATH": str(database),
                # The schedules never fire during the test (their runs would join the queue).
                "MKT_SYNC_CRON": DAILY_CRON,
                "MKT_INCREMENTAL_CRON": DAILY_CRON,
            },
            ACCOUNTS_LOCATION: {f"{account.name.upper()}_API_KEY": account.key for account in accounts.values()},
        }
        served = layout.commands["dagster"]
        commands = {
            LOCATION: served,
            # The doc's command with the user's module, imported from the project's directory.
            ACCOUNTS_LOCATION: [*with_option(served, ("--module-name", "-m"), "accounts.definitions"), "--working-directory", str(project_root)],
        }
        for name, value in instance_environment.items():
            patch.setenv(name, value)
        # Dagster creates its tables in the database as the instance first connects: here, once,
        # rather than by two code servers starting at the same moment.
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            code_servers = {}
            for location, command in commands.items():
                on_loopback = with_option(with_option(command, ("--host", "-h"), "127.0.0.1"), ("--port", "-p"), str(ports[location]))
                log = logs["code server" if location == LOCATION else "accounts code server"]
                code_servers[location] = start(on_loopback, root, {**services, **settings[location]}, log)
                processes.append(code_servers[location])
            deadline = time.monotonic() + STARTUP_SECONDS
            for location, code_server in code_servers.items():
                while not listening(ports[location]):
                    if code_server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"the code server of {location} did not listen on {ports[location]}:\n{log_tails(logs)}")
                    time.sleep(0.5)  # polling another process's start, with a deadline
            webserver = with_option(with_option(layout.commands["dagster-webserver"], ("-h", "--host"), "127.0.0.1"), ("-p", "--port"), str(web_port))
            processes.append(start(webserver, root, services, logs["webserver"]))
            processes.append(start(layout.commands["dagster-daemon"], root, services, logs["daemon"]))

            made = Deployment(
                postgres, home, database, simulator, data, code_servers, accounts,
                GraphQL(f"http://127.0.0.1:{web_port}/graphql"), logs, instance,
            )  # fmt: skip

            def answers() -> bool:
                try:
                    return requests.get(f"http://127.0.0.1:{web_port}/server_info", timeout=5).status_code == 200
                except requests.ConnectionError:
                    return False

            made.wait_for("the webserver answered", answers, STARTUP_SECONDS)
            yield made
        finally:
            for process in reversed(processes):
                stop_process_group(process)
            instance.dispose()


# ------------------------------------------------------------------------------------- checks


def stored_keys(database: Path, schema: str = "marketing") -> dict[str, list[Any]]:
    """The live keys of every synced table of the warehouse."""
    found = {}
    with connect(str(database)) as connection:
        for spec in RESOURCES:
            key = spec.primary_key_column.name
            table = fully_qualified(connection, schema, spec.name)
            rows = connection.execute(f'SELECT "{key}" FROM {table} WHERE _deleted_at IS NULL ORDER BY 1').fetchall()
            found[spec.name] = [row[0] for row in rows]
    return found


def simulator_keys(data: SandboxData) -> dict[str, list[Any]]:
    return {spec.name: sorted(record[spec.primary_key] for record in data.records(spec.name)) for spec in RESOURCES}


def materialization_counts(postgres: PostgresServer, run_id: str) -> int:
    ((count,),) = postgres.query(
        "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'", (run_id,)
    )
    return int(count)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_full_and_an_incremental_sync_run_through_the_queue_and_their_records_are_in_postgres(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = deployment.launch("marketing_sync")
    deployment.wait_until_finished(full)
    assert deployment.stored(full)[:2] == ("marketing_sync", "SUCCESS")
    assert stored_keys(deployment.database) == simulator_keys(deployment.data)

    new = deployment.data.add_contacts(40)
    incremental = deployment.launch("marketing_incremental")
    deployment.wait_until_finished(incremental)

    assert deployment.stored(incremental)[:2] == ("marketing_incremental", "SUCCESS")
    assert stored_keys(deployment.database) == simulator_keys(deployment.data)
    contacts = deployment.instance.get_latest_materialization_event(dg.AssetKey(["marketing", "contacts"]))
    assert contacts is not None and contacts.run_id == incremental
    metadata = contacts.asset_materialization.metadata  # type: ignore[union-attr]
    assert str(metadata["read"].value).startswith("incremental, after id ")
    assert metadata["rows_inserted"].value == len(new)

    # The runs and their event logs are in PostgreSQL, and Dagster's SQLite files nowhere.
    assert materialization_counts(deployment.postgres, full) == materialization_counts(deployment.postgres, incremental) > 0
    assert deployment.postgres.query("SELECT count(*) FROM runs WHERE run_id IN (%s, %s)", (full, incremental)) == [(2,)]
    assert sorted(path.name for path in deployment.home.rglob("*.db")) == []
    # The doc's run monitoring is on: its daemon runs beside the others, its heartbeats stored there.
    assert {"QUEUED_RUN_COORDINATOR", "EVENT_LOG_CONSUMER", "MONITORING"} <= set(deployment.instance.get_daemon_heartbeats())

    # Every table equals what one sync of the same data lands outside any deployment.
    reference = tmp_path / "reference.duckdb"
    monkeypatch.setenv("MKT_API_BASE_URL", deployment.simulator.base_url)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    job = build_definitions(Settings(duckdb_path=str(reference))).resolve_job_def("marketing_sync")
    assert job.execute_in_process(instance=dg.DagsterInstance.ephemeral()).success
    assert tables(deployment.database) == tables(reference)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_accounts_sync_through_the_queue_and_a_second_sync_of_one_warehouse_waits_queued_for_the_first(
    deployment: Deployment,
) -> None:
    acme, globex = deployment.accounts["acme"], deployment.accounts["globex"]
    pool = warehouse_pool(str(acme.database))

    # The file held here keeps acme's first sync in progress (its write waits for the file)
    # for as long as the test needs; globex's file is its own.
    with connect(str(acme.database)):
        first = deployment.launch("acme_sync", ACCOUNTS_LOCATION)
        deployment.wait_for("acme's first sync started", lambda: deployment.stored(first)[1] == "STARTED")
        second = deployment.launch("acme_sync", ACCOUNTS_LOCATION)
        other = deployment.launch("globex_sync", ACCOUNTS_LOCATION)
        # Globex's sync, submitted after acme's second, is launched while that one waits.
        deployment.wait_for("globex's sync was launched", lambda: deployment.stored(other)[1] != "QUEUED")

        held_back_by_its_pool(deployment.instance, second, first, other, pool)
        assert (deployment.stored(first)[1], deployment.stored(second)[1]) == ("STARTED", "QUEUED")
        assert deployment.shown(second) == ("QUEUED", [pool])
        assert deployment.shown(first) == ("STARTED", [pool])
        # The run's worker is a child of the code server that serves it, on its host: the writer host.
        worker = run_worker_pid(deployment.instance, first)
        assert worker is not None
        parent = re.search(r"^PPid:\s+(\d+)$", Path(f"/proc/{worker}/status").read_text(), flags=re.MULTILINE)
        assert parent is not None and int(parent.group(1)) == deployment.code_servers[ACCOUNTS_LOCATION].pid

    deployment.wait_until_finished(first, second, other)
    (_, first_status, _, first_end), (_, second_status, second_start, _) = deployment.stored(first), deployment.stored(second)
    assert (first_status, second_status, deployment.stored(other)[1]) == ("SUCCESS", "SUCCESS", "SUCCESS")
    assert first_end is not None and second_start is not None and second_start >= first_end
    for account in (acme, globex):
        assert stored_keys(account.database, account.name) == simulator_keys(account.simulator.data)
    # Each account's assets are its own, their materializations stored in PostgreSQL.
    for name, run_id in (("acme", second), ("globex", other)):
        latest = deployment.instance.get_latest_materialization_event(dg.AssetKey([name, "contacts"]))
        assert latest is not None and latest.run_id == run_id
        assert materialization_counts(deployment.postgres, run_id) > 0


# ------------------------------------------------------- what a machine without them is told


def test_without_postgresql_s_programs_the_tier_fails_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "PG_BIN_GLOB", "/nonexistent-mkt-test/*/bin")
    with pytest.raises(pytest.fail.Exception, match=r"needs its programs initdb and pg_ctl.*apt-get install postgresql"):
        postgres_programs()


def test_without_dagster_postgres_the_tier_fails_saying_to_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "dagster_postgres" else real(name, *rest))
    with pytest.raises(pytest.fail.Exception, match=re.escape("pip install -e '.[postgres]'")):
        require_dagster_postgres()
