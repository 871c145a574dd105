"""The API key and a base URL's password, whatever shape they are given in, never reach what a
run leaves behind: the Dagster home (its SQLite files, the compute logs) and the run's output.

Each case is a real sync against the simulator with an instance on a temporary Dagster home;
then every file under it, and everything the run printed, is searched for the secret."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import API_KEY_ENV, MarketingApiResource, WarehouseResource
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets_tests.conftest import MARKETING_ASSETS, marketing_key

SECRET = "Zq7mKt0secret0Key9"
PASSWORD = "Pw0secret0in0url"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    running = SandboxServer(SandboxData(seed=5, contacts=30), api_key=SECRET).start()
    try:
        yield running
    finally:
        running.stop()


def sync(
    tmp_path: Path,
    api: MarketingApiResource,
    run_config: dict[str, Any] | None = None,
) -> tuple[dg.ExecuteInProcessResult, Path]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    database = str(tmp_path / "secrets.duckdb")
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            [MARKETING_ASSETS],
            selection=[marketing_key("tags"), marketing_key("contacts")],
            resources={
                "marketing_api": api,
                "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database)),
                "warehouse": WarehouseResource(database=database),
            },
            run_config=run_config,
            instance=instance,
            raise_on_error=False,
        )
    return result, home


def files_holding(home: Path, secret: str) -> list[str]:
    return [str(path) for path in home.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def rows_holding(database: Path, secret: str) -> list[tuple[str, str]]:
    """The (table, column) pairs of a SQLite file with a value holding ``secret``."""
    with closing(sqlite3.connect(database)) as connection:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [
            (table, column)
            for table in tables
            for (_, column, *_) in connection.execute(f'PRAGMA table_info("{table}")').fetchall()
            if connection.execute(
                f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS BLOB), CAST(? AS BLOB)) > 0', (secret,)
            ).fetchone()[0]
        ]


def step_error(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = result.get_step_failure_events()
    return failure.event_specific_data.error.message  # type: ignore[union-attr]


# (the key as set, whether MKT_API_KEY holds it rather than the resource's config)
WHITESPACE = {
    "a trailing line break": (SECRET + "\n", True),
    "a trailing CRLF": (SECRET + "\r\n", True),
    "a leading space": (" " + SECRET, True),
    "tabs and spaces around, in the config": ("\t " + SECRET + " \n", False),
}
# (the key as set, whether MKT_API_KEY holds it, what the step says of it)
UNSENDABLE = {
    "a line break inside": (SECRET[:6] + "\n" + SECRET[6:], True, "has a line break (U+000A) at character 7 of 19, which no API key holds"),
    "characters outside Latin-1": (SECRET + "ключ", True, "has a character outside ASCII (U+043A) at character 19 of 22, which no API key holds"),
    "characters outside Latin-1, in the config": (SECRET + "ключ", False, "has a character outside ASCII (U+043A) at character 19 of 22, which no API key holds"),
    "a non-breaking space inside": (SECRET[:6] + "\u00a0" + SECRET[6:], True, "has a space (U+00A0) at character 7 of 19, which no API key holds"),
    "a control character, in the config": (SECRET + "\x07", False, "has a control character (U+0007) at character 19 of 19, which no API key holds"),
    "a typographic quote": ("\u201c" + SECRET + "\u201d", True, "has a character outside ASCII (U+201C) at character 1 of 20, which no API key holds"),
    "a whole file": (SECRET * 100, True, "is 1,800 characters long, longer than any API key (at most 1,024)"),
}  # fmt: skip


def api_with(key: str, from_environment: bool, server: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> MarketingApiResource:
    """The resource as the definitions make it (an EnvVar) or as a user configures it."""
    if from_environment:
        monkeypatch.setenv(API_KEY_ENV, key)
        return MarketingApiResource(base_url=server.base_url, api_key=dg.EnvVar(API_KEY_ENV), pace_requests=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return MarketingApiResource(base_url=server.base_url, api_key=key, pace_requests=False)


def assert_nowhere(home: Path, output: str, *secrets: str) -> None:
    for secret in secrets:
        assert files_holding(home, secret) == [], f"{secret!r} was stored"
        assert secret not in output


@pytest.mark.parametrize(("key", "from_environment"), WHITESPACE.values(), ids=WHITESPACE.keys())
def test_whitespace_around_the_key_is_removed_with_one_warning_naming_the_setting(
    tmp_path: Path,
    server: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    key: str,
    from_environment: bool,
) -> None:
    api = api_with(key, from_environment, server, monkeypatch)

    result, home = sync(tmp_path, api)
    captured = capfd.readouterr()

    assert result.success
    setting = "MKT_API_KEY" if from_environment else "the marketing_api resource's api_key"
    warned = [line for line in (captured.out + captured.err).splitlines() if "whitespace" in line]
    assert len(warned) == 1 and setting in warned[0] and "it is sent without it" in warned[0], warned
    assert_nowhere(home, captured.out + captured.err, SECRET)


@pytest.mark.parametrize(("key", "from_environment", "said"), UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_a_key_that_cannot_be_sent_fails_the_run_before_any_request_in_one_line(
    tmp_path: Path,
    server: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    key: str,
    from_environment: bool,
    said: str,
) -> None:
    api = api_with(key, from_environment, server, monkeypatch)
    server.reset_log()

    result, home = sync(tmp_path, api)
    captured = capfd.readouterr()

    assert not result.success
    assert server.requests == []
    setting = "MKT_API_KEY" if from_environment else "the marketing_api resource's api_key"
    assert step_error(result).splitlines() == [
        f"dagster._core.definitions.events.Failure: {setting} {said}: set it to the key"
        " exactly as made in the account's profile settings."
    ]
    assert_nowhere(home, captured.out + captured.err, SECRET, SECRET[:6], SECRET[6:])


@pytest.mark.parametrize(
    "url",
    [f"http://user:{PASSWORD}@127.0.0.1:1/api", f"https://{PASSWORD}@api.systeme.io/api", f"user:{PASSWORD}@api.systeme.io/api"],
)
def test_a_base_url_with_a_password_in_run_config_is_refused_without_echoing_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], url: str
) -> None:
    api = MarketingApiResource.configure_at_launch(api_key=SECRET)

    result, home = sync(tmp_path, api, {"resources": {"marketing_api": {"config": {"base_url": url}}}})
    captured = capfd.readouterr()

    assert not result.success
    (failure,) = [event for event in result.all_events if event.event_type_value == "PIPELINE_FAILURE"]
    error = failure.event_specific_data.error  # type: ignore[union-attr]
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    assert "must not carry credentials" in "\n".join(messages)
    # Dagster keeps the run's config as it was given (the run's record in runs.db): there, and
    # only there, is the URL; no event, error or log line repeats it.
    assert files_holding(home, PASSWORD) == [str(home / "history" / "runs.db")]
    assert rows_holding(home / "history" / "runs.db", PASSWORD) == [("runs", "run_body")]
    assert PASSWORD not in "\n".join(messages)
    assert PASSWORD not in captured.out + captured.err


def test_no_contacts_personal_data_reaches_the_dagster_home(tmp_path: Path, server: SandboxServer) -> None:
    # Every table a sync writes, each with its materialization's metadata (a preview of the
    # tables that hold no one's data) and its checks': Dagster's storage is read by whoever
    # runs its UI, and its SQLite files are not the user's alone.
    home = tmp_path / "dagster_home"
    home.mkdir()
    database = str(tmp_path / "people.duckdb")
    api = MarketingApiResource(base_url=server.base_url, api_key=SECRET, pace_requests=False)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            [MARKETING_ASSETS],
            resources={
                "marketing_api": api,
                "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database)),
                "warehouse": WarehouseResource(database=database),
            },
            instance=instance,
        )
        previews = [
            event.materialization.metadata["preview"].value
            for event in result.get_asset_materialization_events()
            if "preview" in event.materialization.metadata
        ]
    emails = [contact["email"] for contact in server.data.records("contacts")]
    assert result.success and len(emails) == 30
    assert any(str(preview).startswith("| id | name |") for preview in previews)  # tags, communities: shown
    for email in emails:
        assert files_holding(home, email) == [], f"{email} was stored"
