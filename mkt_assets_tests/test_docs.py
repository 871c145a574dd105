"""What the README and docs/ tell a user to type works as written: the links lead somewhere,
every SQL query of docs/tables.md runs over a real sync and answers what it says, and the
commands of docs/webhooks.md do what it says.
(The history queries are checked against a story of their own in test_history.)"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests
import responses
import yaml

from mkt_assets.cli import main as cli_main
from mkt_assets.core.deliveries import EVENTS, WEBHOOK_SECRET_ENV, sign, webhook_secret
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.warehouse.connection import connect
from mkt_assets.warehouse.sql_names import fully_qualified
from mkt_assets.webhooks.inbox import Inbox
from mkt_assets_tests.test_postgres import production_layout

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "docs-secret-91c2"
README_SIZE_LIMIT = 12 * 1024


def sql_statements(text: str) -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)
    return [statement.strip() for block in blocks for statement in block.split(";") if statement.strip()]


def test_the_readme_stays_a_first_screen_and_every_relative_link_leads_to_a_file() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_SIZE_LIMIT
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which does not exist"


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> str:
    database = str(tmp_path_factory.mktemp("docs") / "docs.duckdb")
    with SandboxServer(SandboxData(seed=4, contacts=400), api_key=API_KEY) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MKT_API_BASE_URL", server.base_url)
        patch.setenv("MKT_API_KEY", API_KEY)
        result = build_definitions(Settings(duckdb_path=database)).resolve_job_def("marketing_sync").execute_in_process(
            instance=dg.DagsterInstance.ephemeral()
        )
    assert result.success
    return database


def run_documented(database: str, statement: str) -> list[tuple[Any, ...]]:
    with connect(database) as connection:
        # DuckDB names a file's catalog after it; the documented two-part names need it to differ.
        catalog = fully_qualified(connection, "marketing").split(".")[0]
        return connection.execute(statement.replace("marketing.", f"{catalog}.marketing.")).fetchall()


@pytest.mark.slow  # a second or more: several real syncs
def test_every_query_of_the_tables_doc_runs_over_a_sync(synced: str) -> None:
    text = (ROOT / "docs" / "tables.md").read_text()
    statements = sql_statements(text[: text.index("## History queries")])
    assert len(statements) == 6

    answers = [run_documented(synced, statement) for statement in statements]

    by_courses, per_tag = answers[1], answers[2]
    with connect(synced) as connection:
        profiles = fully_qualified(connection, "marketing", "contact_profiles")
        links = fully_qualified(connection, "marketing", "contact_tags")
        (contacts,) = connection.execute(f"SELECT count(*) FROM {profiles}").fetchone()  # type: ignore[misc]
        (tagged_links,) = connection.execute(f"SELECT count(*) FROM {links}").fetchone()  # type: ignore[misc]
    assert sum(row[1] for row in by_courses) == contacts > 0
    assert sum(row[1] for row in per_tag) == tagged_links > 0


def test_the_production_dagster_yaml_is_the_projects_own_with_postgres_storage_and_no_secret() -> None:
    # The Postgres tier (test_postgres) runs the doc's layout as written; this keeps it, in the
    # fast tier, the project's own instance settings, the password out of the file.
    layout = production_layout()
    documented = yaml.safe_load(layout.dagster_yaml)
    project = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert documented["concurrency"]["pools"] == project["concurrency"]["pools"]
    # Besides the project's settings: the storage, a limit of runs and run monitoring (checked below).
    assert {name: value for name, value in documented.items() if name not in ("storage", "concurrency", "run_monitoring")} == {
        name: value for name, value in project.items() if name != "concurrency"
    }
    connection = documented["storage"]["postgres"]["postgres_db"]
    assert {name: value for name, value in connection.items() if name != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "port": {"env": "DAGSTER_PG_PORT"},
        "db_name": {"env": "DAGSTER_PG_DB"},
        "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
    }
    # The code location the doc serves is the project's, under the name its workspace gives it.
    served = layout.commands["dagster"]
    assert served[1:3] == ["api", "grpc"] and served[served.index("--module-name") + 1] == "mkt_assets.definitions"
    (grpc_server,) = [entry["grpc_server"] for entry in layout.workspace["load_from"]]
    assert grpc_server["location_name"] == "mkt_assets"
    assert grpc_server["port"] == int(served[served.index("--port") + 1])


@pytest.mark.slow  # Dagster instances made from the production YAML: 2 s
def test_the_production_run_monitoring_and_compute_logs_are_settings_dagster_takes(tmp_path: Path) -> None:
    layout = production_layout()
    # The whole production dagster.yaml and the compute logs' block, on SQLite: PostgreSQL's
    # storage needs a server, which the Postgres tier starts (and runs the rest of it with).
    settings = {**{name: value for name, value in yaml.safe_load(layout.dagster_yaml).items() if name != "storage"}, **layout.compute_logs}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    instance = dg.DagsterInstance.from_config(str(tmp_path))

    assert instance.run_monitoring_enabled and "MONITORING" in instance.get_required_daemon_types()
    assert (
        instance.run_monitoring_start_timeout_seconds,
        instance.run_monitoring_cancel_timeout_seconds,
        instance.run_monitoring_max_runtime_seconds,
        instance.run_monitoring_max_resume_run_attempts,
        instance.run_monitoring_poll_interval_seconds,  # Dagster's default, which the doc states
    ) == (180, 180, 12 * 3600, 0, 120)
    manager = instance.compute_log_manager
    assert type(manager).__name__ == "LocalComputeLogManager"
    assert manager.inst_data is not None and manager.inst_data.config_dict == {"base_dir": "/var/lib/mkt-assets/compute_logs"}
    instance.dispose()

    # As the doc says, Dagster's default run launcher cannot start a new worker for a run, and an
    # instance asked to refuses to load (every service would fail to start).
    settings["run_monitoring"]["max_resume_run_attempts"] = 1
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(Exception, match="does not support resuming runs"):
        dg.DagsterInstance.from_config(str(tmp_path))


def test_every_dagster_yaml_block_of_the_readme_and_the_operating_doc_shows_the_projects_own_settings() -> None:
    project = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    for doc in (ROOT / "README.md", ROOT / "docs" / "operating.md"):
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S):
            shown = yaml.safe_load(block)
            if not isinstance(shown, dict):
                continue
            # What a block shows of the project's settings is what the project has (the
            # production layout adds a run limit of its own, checked above).
            for section in set(shown) & {"concurrency", "run_retries"}:
                assert {key: shown[section].get(key) for key in project[section]} == project[section], (doc.name, section)


# ---------------------------------------------------------------- docs/webhooks.md

WEBHOOK_SECRET = "docs-webhook-secret-41d9a7"


def webhooks_doc_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "webhooks.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def installed(program: str) -> str:
    """``.venv/bin/<program>`` as the docs write it: the program beside this interpreter."""
    assert program.startswith(".venv/bin/")
    return str(Path(sys.executable).with_name(program.removeprefix(".venv/bin/")))


def test_the_webhooks_doc_shows_the_commands_its_tests_run() -> None:
    assert [words[:3] for words in webhooks_doc_commands()] == [
        [".venv/bin/python", "-c", "import secrets; print(secrets.token_hex(32))"],
        [".venv/bin/mkt-assets", "webhooks", "serve"],
        [".venv/bin/mkt-assets", "webhooks", "register"],
        [".venv/bin/mkt-assets", "webhooks", "list"],
    ]


def test_the_webhooks_doc_makes_a_secret_the_receiver_accepts() -> None:
    words = webhooks_doc_commands()[0]
    made = subprocess.run([installed(words[0]), *words[1:]], capture_output=True, text=True, check=True, timeout=60).stdout
    assert webhook_secret({WEBHOOK_SECRET_ENV: made}).reveal() == made.strip()


@responses.activate
def test_the_webhooks_docs_register_and_list_run_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    base = "https://api.example.test/api"
    monkeypatch.setenv("MKT_API_BASE_URL", base)
    monkeypatch.setenv("MKT_API_KEY", API_KEY)
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
    _, _, register, listing = webhooks_doc_commands()
    url = register[register.index("--url") + 1]
    created = {"id": "wh_1", "name": "mkt-assets", "url": url, "active": True, "subscriptions": [{"event": e} for e in EVENTS]}
    responses.get(f"{base}/webhooks", json={"items": [], "hasMore": False})
    responses.post(f"{base}/webhooks", status=201, json=created)
    responses.get(f"{base}/webhooks", json={"items": [created], "hasMore": False})

    assert cli_main(register[1:]) == 0
    assert cli_main(listing[1:]) == 0
    assert json.loads(responses.calls[1].request.body or b"")["url"] == url


@pytest.mark.slow  # starts the receiver as the doc does, a process importing the CLI
def test_the_webhooks_docs_receiver_keeps_a_signed_delivery_in_the_inbox_beside_the_warehouse(tmp_path: Path) -> None:
    serve = webhooks_doc_commands()[1]
    environment = {**os.environ, WEBHOOK_SECRET_ENV: WEBHOOK_SECRET, "MKT_DUCKDB_PATH": str(tmp_path / "acme.duckdb")}
    # A free port instead of the doc's 8787, which another receiver may hold (argparse: the last wins).
    process = subprocess.Popen(
        [installed(serve[0]), *serve[1:], "--port", "0"], env=environment, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert select.select([process.stdout], [], [], 60)[0], "the receiver did not start within 60 s"
        banner = process.stdout.readline()
        url = re.search(r"serving (http://127\.0\.0\.1:\d+/systeme/webhook);", banner)
        assert url, banner
        body = b'{"type": "CONTACT_OPT_IN", "contact": {"id": 7}}'
        answer = requests.post(url.group(1), data=body, headers={"X-Webhook-Signature": sign(body, WEBHOOK_SECRET)}, timeout=10)
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    with Inbox(tmp_path / "acme.webhooks.sqlite") as inbox:
        assert [(kept.event_type, kept.contact_id) for kept in inbox.since(0)] == [("CONTACT_OPT_IN", 7)]
