"""mkt-assets: run the API simulator, a demo sync, the UI on simulator data, or the webhook receiver."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from mkt_assets.core.catalog import DEFAULT_BASE_URL
from mkt_assets.core.deliveries import EVENTS, WEBHOOK_SECRET_ENV, webhook_secret
from mkt_assets.core.errors import API_KEY_ENV, ApiError, ConfigurationError
from mkt_assets.orchestration.settings import DEFAULT_KEY_PREFIX, DUCKDB_PATH_ENV, Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.sandbox.server import ADMIN_PREFIX
from mkt_assets.sandbox.server import main as sandbox_main
from mkt_assets.source.account import (
    BASE_URL_ENV,
    check_api_key,
    check_base_url,
    is_loopback,
    shared_rate_limiter,
)
from mkt_assets.source.client import MarketingApiClient, Webhook
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.normalized_tables import normalized_tables
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets.webhooks.inbox import Inbox, default_inbox_path
from mkt_assets.webhooks.receiver import DEFAULT_HOST, DEFAULT_PORT, WEBHOOK_PATH, Receiver

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
    with simulator(contacts, seed, database) as (_, environment):
        yield environment


@contextmanager
def simulator(contacts: int, seed: int, database: str) -> Iterator[tuple[SandboxServer, dict[str, str]]]:
    """The simulator, started with a throwaway key, and the environment that points a sync at it."""
    api_key = secrets.token_urlsafe(24)
    with SandboxServer(SandboxData(seed=seed, contacts=contacts), api_key=api_key) as server:
        yield server, {
            **os.environ,
            BASE_URL_ENV: server.base_url,
            API_KEY_ENV: api_key,
            DUCKDB_PATH_ENV: os.path.abspath(database),
        }


def example_change(server: SandboxServer) -> dict[str, object]:
    """A change the simulator takes (its admin format): a tag added to its newest contact."""
    contacts, tags = server.data.contact_ids, server.data.tag_ids
    return {"event": "CONTACT_TAG_ADDED", "contact": contacts[-1] if contacts else 0, "tag": tags[-1] if tags else 0}


@contextmanager
def simulated_webhooks(server: SandboxServer, environment: dict[str, str]) -> Iterator[Receiver]:
    """The receiver on a free loopback port with a throwaway secret (set in ``environment``, so
    the changes sensor runs), keeping deliveries beside the warehouse, and registered as a webhook
    in ``server``, the simulator: a change made there lands within the minute."""
    secret_text = secrets.token_hex(32)
    environment[WEBHOOK_SECRET_ENV] = secret_text
    secret = webhook_secret(environment)
    with Inbox(default_inbox_path(environment[DUCKDB_PATH_ENV])) as inbox, Receiver(inbox, secret, "127.0.0.1", 0) as receiver:
        server.webhooks.register(receiver.url, secret_text, name="mkt-assets dev")
        yield receiver


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
    with simulator(contacts, seed, database) as (server, environment), simulated_webhooks(server, environment) as receiver:
        environment["DAGSTER_HOME"] = str(dagster_home(home))
        print(f"API simulator serving {environment[BASE_URL_ENV]}; tables go to {database}; Dagster keeps its runs in {home}")
        print(
            f"Webhook receiver at {receiver.url}, registered in the simulator: a change made there, e.g."
            f" curl -X POST {server.url}{ADMIN_PREFIX}/changes -H 'Content-Type: application/json'"
            f" -d '{json.dumps([example_change(server)])}', lands within a minute (sensor marketing_changes)."
        )
        dev = subprocess.Popen(command, env=environment, cwd=cwd)
        try:
            return dev.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches the dev server too; let it stop its webserver and daemon before
            # the simulator goes away. A signal sent to this process alone is passed on.
            dev.send_signal(signal.SIGINT)
            return dev.wait()


DEFAULT_WEBHOOK_NAME = "mkt-assets"
# How much of a text the API sent (a webhook's name or URL) a listing shows.
_SHOWN_CHARACTERS = 100


def inbox_path(given: str | None) -> Path:
    """The inbox given, else the one beside the warehouse's DuckDB file (MKT_DUCKDB_PATH, else
    the default), where the Dagster definitions of that warehouse look for it."""
    if given:
        return Path(os.path.abspath(given))
    return default_inbox_path(os.environ.get(DUCKDB_PATH_ENV) or Settings().duckdb_path)


def run_webhooks_serve(host: str, port: int, inbox: str | None) -> int:
    """Serve until Ctrl-C or SIGTERM, then finish the requests in hand and close the inbox."""
    secret = webhook_secret(os.environ)
    # What the receiver decides about each request (seq, event type, status), on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    with Inbox(inbox_path(inbox)) as kept:
        receiver = Receiver(kept, secret, host, port)
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            receiver.start()
            print(
                f"Webhook receiver serving {receiver.url}; deliveries are kept in {kept.path}. The platform"
                " delivers only over HTTPS: put it behind an HTTPS proxy or tunnel, then register that URL"
                " (mkt-assets webhooks register --url https://...)",
                flush=True,
            )
            try:
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
        finally:
            receiver.stop()
            signal.signal(signal.SIGTERM, previous)
    return 0


def check_webhook_url(url: str) -> str:
    """The platform delivers over HTTPS only; plain http is let through for a loopback host
    (a receiver on this machine, the simulator's deliveries)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http"):
        raise ConfigurationError(f"--url must be an absolute http(s) URL such as https://hooks.example.com{WEBHOOK_PATH}")
    if "@" in parts.netloc:
        # Not quoted: a user name and password in it would be printed.
        raise ConfigurationError(
            "--url must not carry a user name or password: the signature is what keeps forged deliveries out"
        )
    if parts.fragment:
        raise ConfigurationError("--url must not carry a fragment (#...)")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigurationError(
            f"--url must use https: the platform delivers only over HTTPS (plain http is accepted for a loopback"
            f" host only), got http://{host}; put the receiver behind an HTTPS proxy or tunnel and register that"
        )
    return url


def api_client() -> MarketingApiClient:
    """A client for the API named by the environment (MKT_API_BASE_URL, MKT_API_KEY), as a sync's
    with the resource's defaults, built without it: these commands load no Dagster."""
    try:
        base_url = check_base_url(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    key, _ = check_api_key(os.environ.get(API_KEY_ENV, ""), API_KEY_ENV)
    return MarketingApiClient(base_url, key, key_setting=API_KEY_ENV, rate_limiter=shared_rate_limiter(base_url, key))


def run_webhooks_register(url: str, name: str) -> int:
    url = check_webhook_url(url)
    secret = webhook_secret(os.environ)
    with api_client() as client:
        listed = client.list_webhooks()
        found = [webhook for webhook in listed.webhooks if webhook.url == url]
        if found:
            for webhook in found:
                print(f"Webhook {shown(webhook.id)} already delivers to {shown(url)}: nothing created.")
                for problem in webhook_problems(webhook):
                    print(f"  but it {problem}")
            print(
                f"  A webhook keeps the secret it was made with: if that is not {WEBHOOK_SECRET_ENV}, the receiver"
                " refuses its deliveries (401); delete it on the platform and register again."
            )
            return 0
        if not listed.complete:
            print(
                "The API listed only some of the account's webhooks (hasMore) and gives no way to ask for the rest:"
                " not creating one that may exist already. Check the account's webhooks on the platform.",
                file=sys.stderr,
            )
            return 1
        created = client.create_webhook(name, url, secret.reveal(), EVENTS)
    print(
        f"Created webhook {shown(created.id)} delivering {', '.join(EVENTS)} to {shown(url)}, signed with {WEBHOOK_SECRET_ENV}."
    )
    return 0


def webhook_problems(webhook: Webhook) -> list[str]:
    """What keeps ``webhook`` from delivering every event; empty when nothing does."""
    problems = []
    if not webhook.active:
        problems.append("is not active")
    missing = [event for event in EVENTS if event not in webhook.events]
    if missing:
        problems.append(f"does not deliver {', '.join(missing)}")
    for subscription in webhook.subscriptions:
        if subscription.disabled_reason or subscription.disabled_at:
            problems.append(
                f"was switched off for {shown(subscription.event)} ({shown(subscription.disabled_reason or 'no reason given')})"
            )
    return problems


def run_webhooks_list() -> int:
    with api_client() as client:
        listed = client.list_webhooks()
    if not listed.webhooks:
        print("No webhooks.")
    for webhook in listed.webhooks:
        print(f"{shown(webhook.id)}  {shown(webhook.name)}  {shown(webhook.url)}  {'active' if webhook.active else 'inactive'}")
        print(f"  events: {', '.join(shown(event) for event in webhook.events) or 'none'}")
        for subscription in webhook.subscriptions:
            if subscription.disabled_reason or subscription.disabled_at:
                when = f" since {shown(subscription.disabled_at)}" if subscription.disabled_at else ""
                print(
                    f"  disabled: {shown(subscription.event)}: {shown(subscription.disabled_reason or 'no reason given')}{when}"
                )
    if not listed.complete:
        print("The API said more webhooks follow (hasMore), and gives no way to ask for them.")
    return 0


def shown(text: str) -> str:
    """A text the API sent, fit for a terminal: no control characters (which could rewrite the
    screen), cut short."""
    printable = "".join(character if character.isprintable() else "?" for character in text)
    return printable if len(printable) <= _SHOWN_CHARACTERS else printable[: _SHOWN_CHARACTERS - 3] + "..."


def add_webhooks_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhooks = commands.add_parser("webhooks", help="receive the platform's webhooks, and register them")
    actions = webhooks.add_subparsers(dest="action", required=True)
    serve = actions.add_parser(
        "serve", help=f"answer POST {WEBHOOK_PATH}: deliveries signed with {WEBHOOK_SECRET_ENV} are kept in the inbox"
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0 picks a free one)")
    serve.add_argument(
        "--inbox",
        default=None,
        help=f"the inbox file (default: beside the DuckDB file of {DUCKDB_PATH_ENV}, <name>.webhooks.sqlite)",
    )
    register = actions.add_parser(
        "register", help=f"find the account's webhook for --url, else create it with every event and {WEBHOOK_SECRET_ENV}"
    )
    register.add_argument("--url", required=True, help=f"the HTTPS address the receiver is reached at, ending {WEBHOOK_PATH}")
    register.add_argument("--name", default=DEFAULT_WEBHOOK_NAME, help="the new webhook's name")
    actions.add_parser("list", help="the account's webhooks, their events and what the platform disabled")


def run_webhooks(arguments: argparse.Namespace) -> int:
    command = f"mkt-assets webhooks {arguments.action}"
    try:
        if arguments.action == "serve":
            return run_webhooks_serve(arguments.host, arguments.port, arguments.inbox)
        if arguments.action == "register":
            return run_webhooks_register(arguments.url, arguments.name)
        return run_webhooks_list()
    except ConfigurationError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    except ApiError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the port taken, say
        print(f"{command}: {error.strerror or error}", file=sys.stderr)
        return 1


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
    add_webhooks_commands(commands)
    arguments, rest = parser.parse_known_args(argv)
    if arguments.command == "sandbox":
        return sandbox_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if arguments.command == "webhooks":
        return run_webhooks(arguments)
    if arguments.command == "demo":
        return run_demo(arguments.contacts, arguments.seed, arguments.database, arguments.dagster_home)
    return run_dev(arguments.contacts, arguments.seed, arguments.database, arguments.port, arguments.dagster_home)


if __name__ == "__main__":
    sys.exit(main())
