"""mkt-assets: run the API simulator, a demo sync, or the UI on simulator data."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mkt_assets.orchestration.resource import API_KEY_ENV, BASE_URL_ENV
from mkt_assets.orchestration.settings import DEFAULT_KEY_PREFIX, DUCKDB_PATH_ENV, Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.sandbox.server import main as sandbox_main
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.normalized_tables import normalized_tables
from mkt_assets.warehouse.sql_names import fully_qualified

DEMO_DATABASE = "data/demo.duckdb"
# Where the demo and the UI keep Dagster's instance (runs, materializations, check results),
# so what one did, the other shows, and a restart forgets nothing.
DAGSTER_HOME = "data/dagster_home"
# The instance settings the project's dagster.yaml holds, for a home made here.
INSTANCE_SETTINGS = """\
telemetry:
  enabled: false
# The daemon turns each asset's freshness policy into a status in the UI.
freshness:
  enabled: true
# Syncs of one warehouse never run at once: a second one waits QUEUED.
concurrency:
  pools:
    granularity: run
    default_limit: 1
# The daemon retries a failed sync (the jobs say how often: MKT_RUN_RETRIES), unless a retry
# cannot mend its failure; runs of other jobs are not retried.
run_retries:
  enabled: true
  max_retries: 0
  retry_on_asset_or_op_failure: true
"""


@contextmanager
def simulator_environment(contacts: int, seed: int, database: str) -> Iterator[dict[str, str]]:
    """Start the simulator with a throwaway key; yield the environment that points a sync at it."""
    api_key = secrets.token_urlsafe(24)
    with SandboxServer(SandboxData(seed=seed, contacts=contacts), api_key=api_key) as server:
        yield {
            **os.environ,
            BASE_URL_ENV: server.base_url,
            API_KEY_ENV: api_key,
            DUCKDB_PATH_ENV: os.path.abspath(database),
        }


def dagster_home(path: str) -> Path:
    """``path`` as a Dagster home that persists: made with the project's instance settings
    the first time, left as it is (yours to edit) after that."""
    home = Path(path).resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text(INSTANCE_SETTINGS)
    return home


def project_root() -> Path | None:
    """The checkout this package runs from (where ``pyproject.toml`` declares it for dg), if any."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.exists() and "[tool.dg]" in pyproject.read_text() else None


def dagster_cli(dg: list[str], dagster: list[str]) -> tuple[list[str], Path | None]:
    """The command to run and where: dg in the project's checkout (Dagster 1.13's own CLI
    commands print a warning that they are superseded by dg), else Dagster's own CLI."""
    root = project_root()
    executable = Path(sys.executable).with_name("dg")
    if root is not None and executable.exists():
        return [str(executable), *dg], root
    return [sys.executable, "-m", "dagster", *dagster], None


def run_demo(contacts: int, seed: int, database: str, home: str) -> int:
    log_path = Path(database).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Starting the API simulator ({contacts} contacts) and running marketing_sync ...")
    started = time.monotonic()
    command, cwd = dagster_cli(
        ["launch", "--job", "marketing_sync"],
        ["job", "execute", "-m", "mkt_assets.definitions", "-j", "marketing_sync"],
    )
    with simulator_environment(contacts, seed, database) as environment, open(log_path, "w") as log:
        environment["DAGSTER_HOME"] = str(dagster_home(home))
        result = subprocess.run(command, env=environment, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        print(f"marketing_sync failed after {seconds:.1f}s; the run's log is in {log_path}:")
        print("".join(log_path.read_text().splitlines(keepends=True)[-30:]))
        return result.returncode
    print(f"marketing_sync succeeded in {seconds:.1f}s (run log: {log_path})")
    # The tables of the resources the sync chose (MKT_RESOURCES), as it read the environment.
    chosen = Settings.from_environment().resource_specs
    with connect(os.path.abspath(database), read_only=True) as connection:
        for name in [spec.name for spec in chosen] + [table.name for table in normalized_tables(chosen)]:
            table = fully_qualified(connection, DEFAULT_KEY_PREFIX, name)
            (rows,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
            print(f"  {DEFAULT_KEY_PREFIX}.{name:<21} {rows:>9} rows")
    print(f"DuckDB file: {os.path.abspath(database)}")
    print(f"Query it:    {shlex.join(query_command(database))}")
    print(f"See the run: mkt-assets dev opens the UI, which keeps it (Dagster's home: {home})")
    return 0


def query_command(database: str) -> list[str]:
    """A command that prints the first synced contacts, run by this interpreter: the one
    that has duckdb installed (a bare `python` may not even exist)."""
    interpreter = sys.executable
    if Path(interpreter).is_relative_to(Path.cwd()):
        interpreter = os.path.relpath(interpreter)  # `.venv/bin/python`, as the README writes it
    # Double quotes inside, so the shell's single quotes around the code stay readable.
    code = (
        f"import duckdb; duckdb.connect({json.dumps(database)}, read_only=True)"
        '.sql("FROM marketing.contacts LIMIT 5").show()'
    )
    return [interpreter, "-c", code]


def run_dev(contacts: int, seed: int, database: str, port: int, home: str) -> int:
    command, cwd = dagster_cli(["dev", "--port", str(port)], ["dev", "-m", "mkt_assets.definitions", "--port", str(port)])
    with simulator_environment(contacts, seed, database) as environment:
        environment["DAGSTER_HOME"] = str(dagster_home(home))
        print(f"API simulator serving {environment[BASE_URL_ENV]}; tables go to {database}; Dagster keeps its runs in {home}")
        dev = subprocess.Popen(command, env=environment, cwd=cwd)
        try:
            return dev.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches the dev server too; let it stop its webserver and daemon before
            # the simulator goes away. A signal sent to this process alone is passed on.
            dev.send_signal(signal.SIGINT)
            return dev.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkt-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sandbox", help="serve the API simulator (see mkt-assets sandbox --help)", add_help=False)
    for name, help_text in (
        ("demo", "sync the simulator into a local DuckDB file with the real job, and show the tables"),
        ("dev", "open the Dagster UI (dg dev) on simulator data"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--contacts", type=int, default=5000, help="contacts in the simulator")
        command.add_argument("--seed", type=int, default=0, help="seed of the simulated account")
        command.add_argument("--database", default=DEMO_DATABASE, help="DuckDB file to write")
        command.add_argument(
            "--dagster-home", default=DAGSTER_HOME, help="where Dagster keeps runs and materializations (kept across runs)"
        )
        if name == "dev":
            command.add_argument("--port", type=int, default=3000, help="port of the UI")
    arguments, rest = parser.parse_known_args(argv)
    if arguments.command == "sandbox":
        return sandbox_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if arguments.command == "demo":
        return run_demo(arguments.contacts, arguments.seed, arguments.database, arguments.dagster_home)
    return run_dev(arguments.contacts, arguments.seed, arguments.database, arguments.port, arguments.dagster_home)


if __name__ == "__main__":
    sys.exit(main())
