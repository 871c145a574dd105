"""The command line: its printed hints work when pasted into a shell, the demo and the UI share
a Dagster home that persists, and the simulator says which key it accepts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from mkt_assets.cli import INSTANCE_SETTINGS, dagster_cli, dagster_home, query_command
from mkt_assets.sandbox.server import _accepted_key


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
