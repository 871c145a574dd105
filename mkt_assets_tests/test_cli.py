"""The command line: its printed hints work when pasted into a shell, the demo and the UI share
a Dagster home that persists, and the simulator says which key it accepts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
import responses

from mkt_assets import cli
from mkt_assets.cli import INSTANCE_SETTINGS, dagster_cli, dagster_home, inbox_path, main, query_command
from mkt_assets.orchestration.resource import MarketingApiResource
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.sandbox.server import _accepted_key
from mkt_assets.webhooks.inbox import Inbox, default_inbox_path


def test_the_demos_query_hint_runs_in_a_shell_and_shows_the_contacts(tmp_path: Path) -> None:
    # A quote and a space in the path: the hint must survive both the shell and Python.
    database = tmp_path / "it's a demo.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing.contacts AS SELECT 42 AS id, 'ada@example.com' AS email")

    hint = shlex.join(query_command(str(database)))
    result = subprocess.run(hint, shell=True, capture_output=True, text=True, check=False, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "ada@example.com" in result.stdout and "42" in result.stdout


def test_a_dagster_home_is_made_with_the_projects_instance_settings_and_then_left_alone(tmp_path: Path) -> None:
    home = dagster_home(str(tmp_path / "data" / "dagster_home"))
    assert (home / "dagster.yaml").read_text() == INSTANCE_SETTINGS
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")  # the user's own edit

    assert dagster_home(str(home)) == home
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"


def test_the_instance_settings_are_the_projects_dagster_yaml() -> None:
    repository_settings = (Path(__file__).resolve().parents[1] / "dagster.yaml").read_text()
    assert yaml_values(INSTANCE_SETTINGS) == yaml_values(repository_settings)


def yaml_values(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_in_the_projects_checkout_the_dev_server_and_the_demo_run_through_dg() -> None:
    command, cwd = dagster_cli(["dev"], ["dev", "-m", "mkt_assets.definitions"])

    assert Path(command[0]).name == "dg" and command[1:] == ["dev"]
    assert cwd is not None and (cwd / "pyproject.toml").exists()


@pytest.mark.parametrize(
    ("given", "environment", "accepted", "banner"),
    [
        (None, None, "sandbox-key", "'sandbox-key'"),
        (None, "a-real-key", "a-real-key", "from MKT_API_KEY"),  # never printed: it may be real
        ("mine", "a-real-key", "mine", "given by --api-key"),
    ],
)
def test_the_simulators_banner_says_which_key_it_accepts_without_printing_a_users_own(
    given: str | None, environment: str | None, accepted: str, banner: str
) -> None:
    assert _accepted_key(given, environment) == (accepted, banner)


@pytest.mark.slow
def test_the_demos_run_is_kept_where_the_ui_reads_it(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    demo = subprocess.run(
        [str(Path(sys.executable).with_name("mkt-assets")), "demo", "--contacts", "300",
         "--database", str(tmp_path / "demo.duckdb"), "--dagster-home", str(home)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert f"Dagster's home: {home}" in demo.stdout

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert (run.job_name, run.status) == ("marketing_sync", dg.DagsterRunStatus.SUCCESS)
        assert instance.get_latest_materialization_event(dg.AssetKey(["marketing", "contacts"])) is not None


# ---------------------------------------------------------------- mkt-assets webhooks

API = "https://api.example.test/api"
WEBHOOK_SECRET = "cli-webhook-secret-93be1d07"
HOOK_URL = "https://hooks.example.test/systeme/webhook"
EVENTS = ["CONTACT_CREATED", "CONTACT_TAG_ADDED", "CONTACT_TAG_REMOVED", "CONTACT_OPT_IN", "SALE_NEW", "SALE_CANCELED"]


@pytest.fixture()
def api_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKT_API_BASE_URL", API)
    monkeypatch.setenv("MKT_API_KEY", "cli-test-key-0123")
    monkeypatch.setenv("MKT_WEBHOOK_SECRET", WEBHOOK_SECRET)


def hook(identifier: str, url: str = HOOK_URL, events: list[str] = EVENTS, **fields: object) -> dict[str, object]:
    subscriptions = [{"id": f"s-{event}", "event": event, "disabledAt": None, "disabledReason": None} for event in events]
    return {"id": identifier, "name": "mkt-assets", "url": url, "active": True, "subscriptions": subscriptions, **fields}


def run_cli(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(arguments)
    out, err = capsys.readouterr()
    assert WEBHOOK_SECRET not in out + err
    return code, out, err


@responses.activate
def test_register_creates_the_webhook_with_every_event_and_the_secret_and_prints_its_id(
    api_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    responses.get(f"{API}/webhooks", json={"items": [hook("other", "https://elsewhere.example.test/x")], "hasMore": False})
    responses.post(f"{API}/webhooks", status=201, json=hook("wh_new"))

    code, out, _ = run_cli(["webhooks", "register", "--url", HOOK_URL], capsys)

    assert code == 0 and "Created webhook wh_new" in out
    sent = json.loads(responses.calls[1].request.body or b"")
    assert sent["url"] == HOOK_URL and sent["secret"] == WEBHOOK_SECRET and sent["subscriptions"] == EVENTS


@responses.activate
def test_register_finds_the_webhook_already_made_for_the_url_and_says_what_keeps_it_from_delivering(
    api_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = hook("wh_old", events=EVENTS[:5], active=False)
    existing["subscriptions"][0].update(disabledReason="BAD_SUCCESS_RATE")  # type: ignore[index]
    responses.get(f"{API}/webhooks", json={"items": [existing], "hasMore": False})

    code, out, _ = run_cli(["webhooks", "register", "--url", HOOK_URL], capsys)

    assert code == 0 and len(responses.calls) == 1  # nothing created
    assert "Webhook wh_old already delivers to" in out
    assert "is not active" in out and "does not deliver SALE_CANCELED" in out
    assert "switched off for CONTACT_CREATED (BAD_SUCCESS_RATE)" in out


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://hooks.example.test/systeme/webhook", "must use https"),
        ("ftp://hooks.example.test/x", "absolute http(s) URL"),
        ("hooks.example.test/systeme/webhook", "absolute http(s) URL"),
        ("https://user:hunter2@hooks.example.test/x", "user name or password"),
    ],
)
@responses.activate
def test_register_refuses_a_url_the_platform_cannot_deliver_to_before_any_request(
    api_environment: None, capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    code, _, err = run_cli(["webhooks", "register", "--url", url], capsys)

    assert code == 2 and said in err and len(responses.calls) == 0
    assert "hunter2" not in err


@responses.activate
def test_register_takes_plain_http_to_a_loopback_receiver(api_environment: None, capsys: pytest.CaptureFixture[str]) -> None:
    responses.get(f"{API}/webhooks", json={"items": [], "hasMore": False})
    responses.post(f"{API}/webhooks", status=201, json=hook("wh_local", "http://127.0.0.1:8787/systeme/webhook"))

    code, out, _ = run_cli(["webhooks", "register", "--url", "http://127.0.0.1:8787/systeme/webhook"], capsys)
    assert code == 0 and "Created webhook wh_local" in out


@responses.activate
def test_register_makes_no_webhook_when_the_list_it_searched_was_incomplete(
    api_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    responses.get(f"{API}/webhooks", json={"items": [], "hasMore": True})

    code, _, err = run_cli(["webhooks", "register", "--url", HOOK_URL], capsys)

    assert code == 1 and "listed only some" in err and len(responses.calls) == 1


@responses.activate
def test_register_without_a_usable_secret_says_so_without_a_request(
    api_environment: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MKT_WEBHOOK_SECRET", "tooshort")
    code, _, err = run_cli(["webhooks", "register", "--url", HOOK_URL], capsys)

    assert code == 2 and "MKT_WEBHOOK_SECRET is shorter than 16 characters" in err
    assert "tooshort" not in err and len(responses.calls) == 0


@responses.activate
def test_a_refused_registration_names_the_request_and_masks_the_secret_the_server_echoed(
    api_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    responses.get(f"{API}/webhooks", json={"items": [], "hasMore": False})
    responses.post(
        f"{API}/webhooks",
        status=422,
        json={"violations": [{"propertyPath": "secret", "message": f"{WEBHOOK_SECRET} is weak"}]},
    )

    code, _, err = run_cli(["webhooks", "register", "--url", HOOK_URL], capsys)

    assert code == 1 and "POST /api/webhooks: HTTP 422" in err and "[MKT_WEBHOOK_SECRET] is weak" in err


@responses.activate
def test_list_shows_each_webhook_its_events_and_what_was_disabled_without_control_characters(
    api_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    disabled = hook("wh_2", "https://old.example.test/x\x1b[2J", events=["SALE_NEW"], active=False)
    disabled["subscriptions"][0].update(disabledReason="USER_CANCELED", disabledAt="2026-11-30T10:00:00+00:00")  # type: ignore[index]
    responses.get(f"{API}/webhooks", json={"items": [hook("wh_1"), disabled], "hasMore": False})

    code, out, _ = run_cli(["webhooks", "list"], capsys)

    assert code == 0
    assert f"wh_1  mkt-assets  {HOOK_URL}  active" in out and f"events: {', '.join(EVENTS)}" in out
    assert "wh_2  mkt-assets  https://old.example.test/x?[2J  inactive" in out
    assert "disabled: SALE_NEW: USER_CANCELED since 2026-11-30T10:00:00+00:00" in out
    assert "\x1b" not in out


def test_serve_refuses_to_start_without_a_secret(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKT_WEBHOOK_SECRET", raising=False)
    assert main(["webhooks", "serve", "--port", "0"]) == 2
    assert "MKT_WEBHOOK_SECRET is not set" in capsys.readouterr().err


def test_serve_keeps_deliveries_beside_the_warehouse_file_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MKT_DUCKDB_PATH", raising=False)
    assert inbox_path(None) == tmp_path / "data" / "mkt_assets.webhooks.sqlite"
    monkeypatch.setenv("MKT_DUCKDB_PATH", str(tmp_path / "acme.duckdb"))
    assert inbox_path(None) == tmp_path / "acme.webhooks.sqlite"
    assert inbox_path("elsewhere/inbox.sqlite") == tmp_path / "elsewhere" / "inbox.sqlite"


def test_dev_serves_a_receiver_the_simulator_delivers_its_changes_to(tmp_path: Path) -> None:
    # What `mkt-assets dev` starts beside the simulator, and the change its banner suggests.
    database = tmp_path / "dev.duckdb"
    with cli.simulator(50, 0, str(database)) as (server, environment), cli.simulated_webhooks(server, environment) as receiver:
        change = cli.example_change(server)
        server.apply_changes([change])
        assert server.wait_for_deliveries(30)
        (delivered,) = server.deliveries
        assert (delivered.status, delivered.event) == (200, "CONTACT_TAG_ADDED")
        assert receiver.url.startswith("http://127.0.0.1:")
    # The secret the sensor needs is in the environment dg dev gets; the delivery is on disk.
    assert len(environment["MKT_WEBHOOK_SECRET"]) == 64
    with Inbox(default_inbox_path(str(database))) as inbox:
        (kept,) = inbox.since(0)
    assert (kept.event_type, kept.contact_id, kept.signature_verified) == ("CONTACT_TAG_ADDED", change["contact"], True)


# ---------------------------------------------------------------- what a command loads

# Runs each command of argv[1] (a JSON list) in turn, as `mkt-assets` would, then prints for
# each its exit code and whether Dagster had been imported by then.
RUN_COMMANDS = """
import json, sys
from mkt_assets.cli import main
report = []
for arguments in json.loads(sys.argv[1]):
    try:
        code = main(arguments)
    except SystemExit as exit:
        code = exit.code
    report.append([arguments, code, "dagster" in sys.modules])
print(json.dumps(report))
"""


def run_commands(commands: list[list[str]], environment: dict[str, str] | None = None) -> tuple[list[Any], str]:
    """Each command's [arguments, exit code, Dagster loaded], and what they printed."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)],
        cwd=root, env=environment, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, report = done.stdout.splitlines()
    return json.loads(report), "\n".join(printed)


def test_the_receiver_the_simulator_and_the_webhook_commands_start_without_loading_dagster() -> None:
    # Dagster takes over a second to import: the receiver, a long-running service, needs none of it.
    commands = [["webhooks", "serve", "--help"], ["webhooks", "register", "--help"], ["webhooks", "list", "--help"], ["sandbox", "--help"]]
    report, printed = run_commands(commands)

    assert report == [[arguments, 0, False] for arguments in commands]
    assert "usage: mkt-assets webhooks serve" in printed and "--inbox" in printed


def test_register_and_list_reach_the_api_without_loading_dagster(monkeypatch: pytest.MonkeyPatch) -> None:
    key, url = "cli-sim-key-5f0e2a", "http://127.0.0.1:8787/systeme/webhook"
    with SandboxServer(SandboxData(seed=3, contacts=5), api_key=key) as server:
        environment = {**os.environ, "MKT_API_BASE_URL": server.base_url, "MKT_API_KEY": key, "MKT_WEBHOOK_SECRET": WEBHOOK_SECRET}
        commands = [["webhooks", "register", "--url", url], ["webhooks", "list"]]
        report, printed = run_commands(commands, environment)
        (registered,) = server.webhooks.listing()

    assert report == [[arguments, 0, False] for arguments in commands]
    assert registered["url"] == url and f"Created webhook {registered['id']}" in printed
    assert f"{registered['id']}  mkt-assets  {url}  active" in printed
    assert WEBHOOK_SECRET not in printed


def test_the_webhook_commands_client_is_the_one_the_resource_makes_from_the_same_environment(
    api_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built without the resource (which would load Dagster), with the same settings.
    monkeypatch.setenv("MKT_API_KEY", " cli-test-key-0123\n")  # whitespace dropped by both

    def settings(client: Any) -> tuple[Any, ...]:
        retry, pacing = client._retry, client._rate_limiter
        plain = ("base_url", "page_size", "order", "timeout", "read_timeout", "max_page_bytes", "key_setting", "settings", "_headers")
        return (
            {name: getattr(client, name) for name in plain},
            (retry.total, retry.backoff_factor, retry.max_wait, retry.status_forcelist, retry.allowed_methods),
            (pacing.path, pacing.horizon),
        )

    with cli.api_client() as ours, MarketingApiResource(base_url=API).get_client() as resources:
        assert settings(ours) == settings(resources)
        assert ours._headers["X-API-Key"] == "cli-test-key-0123"
