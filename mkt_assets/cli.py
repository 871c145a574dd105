"""``mkt-assets``: run the API simulator, a demo sync, or the UI on simulator data."""

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

from mkt_assets import warehouse
from mkt_assets.assets import ASSET_PREFIX
from mkt_assets.catalog import RESOURCES
from mkt_assets.normalized_tables import NORMALIZED_TABLES
from mkt_assets.settings import DUCKDB_PATH_ENV
from mkt_assets.resource import API_KEY_ENV, BASE_URL_ENV
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.sandbox.server import main as sandbox_main

DEMO_DATABASE = "data/demo.duckdb"


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


def _dagster_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dagster", *arguments]


def run_demo(contacts: int, seed: int, database: str) -> int:
    log_path = Path(database).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"Starting the API simulator ({contacts} contacts) and running marketing_sync ...")
    started = time.monotonic()
    with simulator_environment(contacts, seed, database) as environment, open(log_path, "w") as log:
        result = subprocess.run(
            _dagster_command("job", "execute", "-m", "mkt_assets", "-j", "marketing_sync"),
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        print(f"marketing_sync failed after {seconds:.1f}s; the run's log is in {log_path}:")
        print("".join(log_path.read_text().splitlines(keepends=True)[-30:]))
        return result.returncode
    print(f"marketing_sync succeeded in {seconds:.1f}s (run log: {log_path})")
    with warehouse.connect(os.path.abspath(database), read_only=True) as connection:
        for name in [spec.name for spec in RESOURCES] + [table.name for table in NORMALIZED_TABLES]:
            table = warehouse.fully_qualified(connection, ASSET_PREFIX, name)
            (rows,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
            print(f"  {ASSET_PREFIX}.{name:<21} {rows:>9} rows")
    print(f"DuckDB file: {os.path.abspath(database)}")
    print(f"Query it:    {shlex.join(query_command(database))}")
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


def run_dev(contacts: int, seed: int, database: str, port: int) -> int:
    with simulator_environment(contacts, seed, database) as environment:
        print(f"API simulator serving {environment[BASE_URL_ENV]}; tables go to {database}")
        dev = subprocess.Popen(_dagster_command("dev", "-m", "mkt_assets", "--port", str(port)), env=environment)
        try:
            return dev.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches dagster dev too; let it stop its webserver and daemon before
            # the simulator goes away. A signal sent to this process alone is passed on.
            dev.send_signal(signal.SIGINT)
            return dev.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mkt-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sandbox", help="serve the API simulator (see mkt-assets sandbox --help)", add_help=False)
    for name, help_text in (
        ("demo", "sync the simulator into a local DuckDB file with the real job, and show the tables"),
        ("dev", "open the Dagster UI (dagster dev) on simulator data"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--contacts", type=int, default=5000, help="contacts in the simulator")
        command.add_argument("--seed", type=int, default=0, help="seed of the simulated account")
        command.add_argument("--database", default=DEMO_DATABASE, help="DuckDB file to write")
        if name == "dev":
            command.add_argument("--port", type=int, default=3000, help="port of the UI")
    arguments, rest = parser.parse_known_args(argv)
    if arguments.command == "sandbox":
        return sandbox_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if arguments.command == "demo":
        return run_demo(arguments.contacts, arguments.seed, arguments.database)
    return run_dev(arguments.contacts, arguments.seed, arguments.database, arguments.port)


if __name__ == "__main__":
    sys.exit(main())
