"""The command line's printed hints must work when pasted into a shell."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import duckdb

from mkt_assets.cli import query_command


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
