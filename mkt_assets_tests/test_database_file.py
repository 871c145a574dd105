"""The DuckDB file is checked before the first request: a file the write could not use fails
the run in seconds, in one line naming the file and the cause, with nothing fetched, nothing
changed and nothing created; a table the project did not create is refused, never altered."""

from __future__ import annotations

import gzip
import os
import select
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME
from mkt_assets.core.errors import ForeignTableError
from mkt_assets.orchestration.names import Names
from mkt_assets.plumbing import lean_process
from mkt_assets.warehouse.commit import check_before_fetch, commit_run, run_tables
from mkt_assets.warehouse.connection import WarehouseFile, connect, transaction
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES
from mkt_assets.warehouse.ownership import foreign_tables
from mkt_assets_tests.conftest import MARKETING_ASSETS, marketing_key, materialize_marketing
from mkt_assets_tests.test_faults import CONTACTS, Harness, Outcome, first_sync, harness  # noqa: F401 - fixtures
from mkt_assets_tests.test_warehouse import contact, stage
from mkt_assets_tests.warehouse_calls import merge_staged_file

# A file the code before this check made (commit 149adb8: every resource of a 30-contact
# account, their histories and the normalized tables), gzipped: its blocks are mostly zeros.
TAGS = RESOURCES_BY_NAME["tags"]
MADE_BEFORE = Path(__file__).parent / "files" / "made_by_149adb8.duckdb.gz"


@contextmanager
def unwritable(*paths: Path) -> Iterator[None]:
    """Make ``paths`` refuse writes even to root: immutable (``chattr +i``), which root's
    permission bypass does not pass, as a read-only mount would not; chmod for other users."""
    as_root = os.getuid() == 0
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        if as_root:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        for path in paths:
            if as_root:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            path.chmod(modes[path])


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory``, with a file's bytes: what a refused run must leave."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def refused_before_fetch(harness: Harness, outcome: Outcome, database: Path) -> str:
    """The run failed in one line naming the file, before a single request; that line."""
    assert not outcome.result.success
    (line,) = outcome.error.strip().splitlines()
    prefix = "dagster._core.definitions.events.Failure: "
    assert line.startswith(f"{prefix}{database}: "), line
    assert line.endswith("Nothing was fetched."), line
    assert harness.server.requests == []
    return line.removeprefix(prefix)


def fresh_harness(tmp_path: Path, first_sync: Path, database: Path) -> Harness:
    harness = Harness(tmp_path, first_sync)
    os.unlink(harness.database)
    harness.database = str(database)
    return harness


# What the OS and DuckDB say of the file.


def test_a_directory_at_the_path_is_refused_before_the_fetch(harness: Harness, tmp_path: Path) -> None:
    database = tmp_path / "a_directory.duckdb"
    database.mkdir()
    harness.database = str(database)
    before = snapshot(tmp_path)

    error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert "it is a directory, not a DuckDB file; set MKT_DUCKDB_PATH (a component instance: its database) to a file" in error
    assert snapshot(tmp_path) == before


def test_a_file_that_is_not_duckdb_is_refused_before_the_fetch(harness: Harness, tmp_path: Path) -> None:
    database = tmp_path / "noise.duckdb"
    database.write_bytes(os.urandom(20_000))
    harness.database = str(database)
    before = snapshot(tmp_path)

    error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert "it is not a DuckDB database (it does not begin with DuckDB's header)" in error
    assert snapshot(tmp_path) == before


def test_a_truncated_duckdb_file_is_refused_before_the_fetch(harness: Harness, tmp_path: Path) -> None:
    # Cut in its last block: DuckDB opens such a file, and would fail only when the merge
    # read the missing block.
    database = Path(harness.database)
    with open(database, "r+b") as file:
        file.truncate(database.stat().st_size - 1000)
    before = snapshot(tmp_path)

    error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert "it is truncated: it holds" in error and "restore it from a backup" in error
    assert snapshot(tmp_path) == before


def test_a_file_whose_checkpoint_cut_its_free_blocks_off_the_end_is_not_taken_for_truncated(tmp_path: Path) -> None:
    # Dropping the last table frees the blocks at the end: the checkpoint cuts them off the
    # file, and DuckDB, opening it again, still counts them in total_blocks.
    database = tmp_path / "healthy.duckdb"
    with duckdb.connect(str(database)) as connection:
        for table in ("kept", "dropped"):
            connection.execute(f"CREATE TABLE {table} AS SELECT range AS i, CAST(range AS VARCHAR) AS v FROM range(300000)")
            connection.execute("CHECKPOINT")
        connection.execute("DROP TABLE dropped")
        connection.execute("CHECKPOINT")
    with duckdb.connect(str(database), read_only=True) as connection:
        (free,) = connection.execute("SELECT free_blocks FROM pragma_database_size()").fetchone()  # type: ignore[misc]
    assert free > 0

    check_before_fetch(WarehouseFile(str(database)), "marketing", [])  # does not raise


def test_the_look_before_the_fetch_reads_where_an_incremental_read_starts_unless_a_writer_holds_the_file(
    tmp_path: Path,
) -> None:
    database = tmp_path / "account.duckdb"
    file = WarehouseFile(str(database))
    growing = [spec for spec in RESOURCES if spec.name in ("contacts", "memberships")]

    # No file yet: nothing stored, and the look makes none.
    assert check_before_fetch(file, "marketing", [], newest_of=growing) == {"contacts": None, "memberships": None}
    assert not database.exists()
    with connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing.contacts AS SELECT * FROM (VALUES (3), (9), (4)) AS t(id)")
    assert check_before_fetch(file, "marketing", [], newest_of=growing) == {"contacts": 9, "memberships": None}

    # Another process writing to it: the look cannot read it, and says so (the worker waits its turn).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); sys.stdin.read()", str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        assert ready and holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert check_before_fetch(file, "marketing", [], newest_of=growing) is None
    finally:
        holder.communicate("", timeout=60)


def test_a_sqlite_file_is_refused_without_any_extension_being_fetched(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "other.db"
    with sqlite3.connect(database) as sqlite:
        sqlite.execute("CREATE TABLE contacts (id INTEGER, note TEXT)")
    harness.database = str(database)
    # DuckDB installs extensions under ~/.duckdb: a home of the test's own shows what it tried.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)

    error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert "it is a SQLite database, not a DuckDB one; set MKT_DUCKDB_PATH (a component instance: its database) to a DuckDB file" in error
    assert snapshot(tmp_path) == before  # no ~/.duckdb/extensions either


def test_no_connection_the_project_opens_fetches_or_loads_an_extension(tmp_path: Path) -> None:
    database = tmp_path / "other.db"
    with sqlite3.connect(database) as sqlite:
        sqlite.execute("CREATE TABLE t (x INTEGER)")

    with pytest.raises(duckdb.Error, match="sqlite"):
        with connect(str(database)):
            pass
    with connect(str(tmp_path / "w.duckdb")) as connection:
        settings = connection.execute(
            "SELECT current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
        ).fetchone()
        assert settings == (False, False)
        # JSON and Parquet, which the merge reads, are built into the wheel.
        connection.execute(f"COPY (SELECT 1 AS a, '{{}}'::JSON AS j) TO '{tmp_path / 'p.parquet'}' (FORMAT parquet)")
        assert connection.execute(f"SELECT json_extract(j, '$') FROM '{tmp_path / 'p.parquet'}'").fetchall() == [("{}",)]


def test_a_read_only_file_is_refused_before_the_fetch(harness: Harness, tmp_path: Path) -> None:
    database = Path(harness.database)
    before = snapshot(tmp_path)

    with unwritable(database):
        error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert "it cannot be opened for writing (" in error
    assert snapshot(tmp_path) == before


def test_a_read_only_directory_is_refused_before_the_fetch(harness: Harness, tmp_path: Path, first_sync: Path) -> None:
    directory = tmp_path / "kept"
    directory.mkdir()
    database = directory / "faults.duckdb"
    shutil.copy2(first_sync, database)
    harness.database = str(database)
    before = snapshot(tmp_path)

    with unwritable(directory):
        error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert f"its directory {directory} cannot be written (" in error
    assert "faults.duckdb.wal and faults.duckdb.lock in it" in error
    assert snapshot(tmp_path) == before


def test_a_lock_file_that_cannot_be_written_is_refused_before_the_fetch(harness: Harness, tmp_path: Path) -> None:
    database = Path(harness.database)
    lock = Path(f"{database}.lock")
    lock.write_bytes(b"")
    before = snapshot(tmp_path)

    with unwritable(lock):
        error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert f"its lock file {lock} cannot be opened for writing (" in error
    assert snapshot(tmp_path) == before


# A new file: checked that it can be made, not made until the write.


def test_a_run_failing_on_the_api_leaves_no_new_file_or_directory(tmp_path: Path, first_sync: Path) -> None:
    database = tmp_path / "new" / "deeper" / "mkt.duckdb"
    harness = fresh_harness(tmp_path, first_sync, database)
    try:
        harness.server.stop()  # every request refused
        for incremental in (False, True):
            outcome = harness.sync(CONTACTS) if not incremental else _incremental(harness)
            assert not outcome.result.success
            assert "contacts: GET /api/contacts" in outcome.error
            assert not (tmp_path / "new").exists()
    finally:
        harness.server.stop()


def _incremental(harness: Harness) -> Outcome:
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [MARKETING_ASSETS],
        selection=[marketing_key("contacts")],
        resources=harness.resources(),
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"sync_marketing": {"config": {"incremental": True}}}},
    )
    return Outcome(result, instance)


def test_a_new_file_whose_directory_cannot_be_made_is_refused_and_nothing_is_made(tmp_path: Path, first_sync: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    database = parent / "new" / "mkt.duckdb"
    harness = fresh_harness(tmp_path, first_sync, database)
    try:
        with unwritable(parent):
            error = refused_before_fetch(harness, harness.sync(CONTACTS), database)
        assert f"it does not exist, and its directory {parent / 'new'} cannot be created in {parent} (" in error
        assert list(parent.iterdir()) == []
    finally:
        harness.server.stop()


def test_a_link_to_a_directory_that_does_not_exist_is_refused_and_nothing_is_made(tmp_path: Path, first_sync: Path) -> None:
    database = tmp_path / "db" / "linked.duckdb"
    database.parent.mkdir()
    database.symlink_to(tmp_path / "unmounted" / "mkt.duckdb")
    harness = fresh_harness(tmp_path, first_sync, database)
    try:
        error = refused_before_fetch(harness, harness.sync(CONTACTS), database)
        assert f"it is a symbolic link to {tmp_path / 'unmounted' / 'mkt.duckdb'}, whose directory does not exist" in error
        assert sorted(path.name for path in database.parent.iterdir()) == ["linked.duckdb"]
        assert not (tmp_path / "unmounted").exists()
    finally:
        harness.server.stop()


def test_a_new_file_is_made_by_the_write_in_a_private_directory(tmp_path: Path, first_sync: Path, usual_umask: None) -> None:
    database = tmp_path / "new" / "mkt.duckdb"
    harness = fresh_harness(tmp_path, first_sync, database)
    try:
        assert harness.sync(CONTACTS).result.success
        modes = [path.stat().st_mode & 0o777 for path in (database.parent, database)]
        assert modes == [0o700, 0o600]
    finally:
        harness.server.stop()


# Tables the project did not create.


def test_a_foreign_table_with_a_synced_tables_name_is_refused_and_never_altered(harness: Harness, tmp_path: Path) -> None:
    database = tmp_path / "shared.duckdb"
    harness.database = str(database)
    with duckdb.connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE shared.marketing.contacts (id BIGINT, note VARCHAR)")
        connection.execute("INSERT INTO shared.marketing.contacts VALUES (1, 'mine')")
        connection.execute("CREATE TABLE shared.marketing.notes (id BIGINT)")
    before = snapshot(tmp_path)

    error = refused_before_fetch(harness, harness.sync(CONTACTS), database)

    assert error == (
        f"{database}: marketing.contacts exists but was not created by mkt_assets (it lacks the columns _extra,"
        " _synced_at). mkt_assets never alters a table it did not create: rename it (ALTER TABLE or ALTER VIEW ... RENAME TO"
        " ...), or set MKT_DUCKDB_PATH (a component instance: its database) to another DuckDB file. Nothing was fetched."
    )
    assert snapshot(tmp_path) == before


def test_the_write_refuses_a_foreign_table_made_after_the_check(tmp_path: Path) -> None:
    # The check before the fetch and the write are seconds apart: the write looks again, in
    # its transaction, and alters nothing.
    database = tmp_path / "w.duckdb"
    with connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing.contacts_history (id BIGINT, note VARCHAR)")
    batch = stage(CONTACTS, [[contact(1)]], tmp_path)

    with pytest.raises(ForeignTableError, match=r"marketing\.contacts_history exists but was not created by mkt_assets"):
        lean_process.call(merge_staged_file, WarehouseFile(str(database)), "marketing", "contacts", batch)
    with connect(str(database)) as connection:
        tables = connection.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        columns = connection.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'contacts_history'").fetchall()
    assert (tables, columns) == ([("contacts_history",)], [("id",), ("note",)])


def test_the_write_refuses_a_foreign_table_with_a_built_tables_name_and_alters_nothing(tmp_path: Path) -> None:
    # Refused with the synced tables as the transaction begins (a rebuild would replace it).
    database = tmp_path / "built.duckdb"
    with connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing.contact_tags (mine VARCHAR)")
    tags = next(table for table in NORMALIZED_TABLES if table.name == "contact_tags")
    batches = [stage(CONTACTS, [[contact(1)]], tmp_path), stage(TAGS, [[{"id": 7, "name": "vip"}]], tmp_path)]

    with pytest.raises(ForeignTableError, match=r"marketing\.contact_tags exists but was not created by mkt_assets"):
        commit_run(WarehouseFile(str(database)), "marketing", batches, [tags], deletions="mark")
    with connect(str(database)) as connection:
        tables = connection.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        columns = connection.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'contact_tags'").fetchall()
    assert (tables, columns) == ([("contact_tags",)], [("mine",)])


def test_a_foreign_table_in_the_schema_spelled_in_another_case_is_refused_and_never_altered(tmp_path: Path) -> None:
    # DuckDB's names ignore case: an analyst's `CREATE SCHEMA Marketing` is the schema the
    # project writes as "marketing", and its tables are the project's names.
    database = tmp_path / "cased.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA Marketing")
        connection.execute("CREATE TABLE Marketing.contacts (note VARCHAR)")
    file = WarehouseFile(str(database))
    refusal = r"marketing\.contacts exists but was not created by mkt_assets \(it lacks the columns _extra, _synced_at, id\)"

    with pytest.raises(ForeignTableError, match=refusal):
        check_before_fetch(file, "marketing", run_tables([CONTACTS], []))
    with pytest.raises(ForeignTableError, match=refusal):
        commit_run(file, "marketing", [stage(CONTACTS, [[contact(1)]], tmp_path)], [], deletions="mark")
    with connect(str(database)) as connection:
        tables = connection.execute("SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL").fetchall()
        columns = connection.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'contacts'").fetchall()
    assert (tables, columns) == ([("Marketing", "contacts")], [("note",)])


def test_a_schema_made_by_hand_in_another_case_is_synced_as_the_schema(tmp_path: Path) -> None:
    database = tmp_path / "cased.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute("CREATE SCHEMA Marketing")
    file = WarehouseFile(str(database))
    tags = next(table for table in NORMALIZED_TABLES if table.name == "contact_tags")
    for _ in range(2):
        # The second sync finds every table the first made: the same rows, nothing rebuilt.
        check_before_fetch(file, "marketing", run_tables([CONTACTS, TAGS], [tags]))
        batches = [stage(CONTACTS, [[contact(1), contact(2)]], tmp_path), stage(TAGS, [[{"id": 7, "name": "Café ☕"}]], tmp_path)]
        done = commit_run(file, "marketing", batches, [tags], deletions="mark")
        assert done.facts is not None and done.facts.error is None and done.facts.synced["contacts"].live_rows == 2
    merged, built = done.written["contacts"].merge, done.written["contact_tags"].build
    assert merged is not None and (merged.inserted, merged.unchanged, merged.row_count) == (0, 2, 2)
    assert built is not None and (built.rebuilt, built.row_count) == (False, 2)
    with connect(str(database)) as connection:
        schemas = connection.execute("SELECT DISTINCT schema_name FROM duckdb_tables()").fetchall()
    assert schemas == [("Marketing",)]


def test_a_foreign_normalized_table_is_refused_but_an_unstamped_one_of_ours_is_accepted(tmp_path: Path) -> None:
    tags = next(table for table in NORMALIZED_TABLES if table.name == "contact_tags")
    with duckdb.connect(str(tmp_path / "n.duckdb")) as connection:
        connection.execute("CREATE SCHEMA marketing")
        ours = ", ".join(f"{name} {kind}" for name, kind in tags.columns)
        connection.execute(f"CREATE TABLE marketing.contact_tags ({ours})")  # built before the stamp
        connection.execute("COMMENT ON TABLE marketing.contact_tags IS 'a user''s note'")
        connection.execute("CREATE TABLE marketing.contact_profiles (contact_id BIGINT, mine VARCHAR)")
        connection.execute("CREATE VIEW marketing.Course_Modules AS SELECT 1 AS x")

        problems = foreign_tables(connection, "marketing", run_tables(RESOURCES, NORMALIZED_TABLES))

    assert problems == [
        "marketing.Course_Modules exists but was not created by mkt_assets (it is a view)",
        "marketing.contact_profiles exists but was not created by mkt_assets (it lacks the comment mkt_assets"
        " stamps on the tables it builds, [mkt_assets definition ...], and the columns it builds it with,"
        " community_ids, contact_id, course_ids, email, tag_ids, tag_names, unsubscribed)",
    ]


def test_the_reads_bookkeeping_is_the_projects_own_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    ours = WarehouseFile(str(tmp_path / "ours.duckdb"))
    commit_run(ours, "marketing", [stage(CONTACTS, [[contact(1)]], tmp_path)], [], deletions="mark")
    with connect(ours.database) as connection:
        assert foreign_tables(connection, "marketing", run_tables([CONTACTS], [])) == []

    with duckdb.connect(str(tmp_path / "b.duckdb")) as connection:
        connection.execute("CREATE SCHEMA marketing")
        connection.execute("CREATE TABLE marketing._mkt_reads (table_name VARCHAR, note VARCHAR)")

        assert foreign_tables(connection, "marketing", run_tables([CONTACTS], [])) == [
            "marketing._mkt_reads exists but was not created by mkt_assets (it lacks the columns after_key,"
            " committed_at, complete, read_began)"
        ]


# Files made before the check keep working.


@pytest.mark.slow  # a refused sync, then a confirmed one, of a real file
def test_a_file_made_before_the_check_is_accepted_and_synced(tmp_path: Path, first_sync: Path) -> None:
    database = tmp_path / "old.duckdb"
    with gzip.open(MADE_BEFORE) as made, open(database, "wb") as copy:
        shutil.copyfileobj(made, copy)
    harness = fresh_harness(tmp_path, first_sync, database)
    try:
        check_before_fetch(WarehouseFile(str(database)), "marketing", run_tables(RESOURCES, NORMALIZED_TABLES))
        # The file holds another account's 30 contacts: this account lacks them all, which only
        # a confirmed run applies.
        result = materialize_marketing(
            [CONTACTS.name], harness.resources(), instance=dg.DagsterInstance.ephemeral(), run_config=Names().confirm_mass_deletion_config()
        )
        assert result.success
        assert len(harness.table()) >= 450
    finally:
        harness.server.stop()


def test_a_write_that_fails_on_a_new_file_leaves_no_file(tmp_path: Path) -> None:
    database = tmp_path / "new.duckdb"

    with pytest.raises(ZeroDivisionError):
        with connect(str(database)) as connection:
            with transaction(connection, "a write"):
                connection.execute("CREATE SCHEMA marketing")
                connection.execute("SELECT 1 / 0").fetchall()
                raise ZeroDivisionError

    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.duckdb.lock"]


def test_a_new_file_that_holds_what_was_committed_is_kept_after_a_later_error(tmp_path: Path) -> None:
    database = tmp_path / "new.duckdb"

    with pytest.raises(ZeroDivisionError):
        with connect(str(database)) as connection:
            connection.execute("CREATE TABLE kept (x INTEGER)")
            raise ZeroDivisionError

    with connect(str(database)) as connection:
        assert connection.execute("SELECT table_name FROM duckdb_tables()").fetchall() == [("kept",)]


def test_a_read_only_mount_is_refused_with_what_to_do(tmp_path: Path, first_sync: Path) -> None:
    """The issue's own case, on a real read-only bind mount: made in a user and mount namespace
    of a child process (``unshare -rm``), which needs no privilege the test does not have."""
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    shutil.copy2(first_sync, mounted / "m.duckdb")
    before = snapshot(mounted)
    script = (
        "import sys\n"
        "from mkt_assets.core.catalog import RESOURCES\n"
        "from mkt_assets.warehouse.commit import check_before_fetch, run_tables\n"
        "from mkt_assets.core.errors import WarehouseFileError\n"
        "from mkt_assets.warehouse.connection import WarehouseFile\n"
        "for database in sys.argv[1:]:\n"
        "    try:\n"
        "        check_before_fetch(WarehouseFile(database), 'marketing', run_tables(RESOURCES, ()))\n"
        "    except WarehouseFileError as error:\n"
        "        print(error)\n"
    )
    existing, new = mounted / "m.duckdb", mounted / "new" / "x.duckdb"
    command = 'mount --bind -o ro "$1" "$1" && exec "$2" -c "$3" "$4" "$5"'
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, "sh", str(mounted), sys.executable, script, str(existing), str(new)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert run.stdout.splitlines() == [
        f"{existing}: it cannot be opened for writing (Read-only file system); mount it read-write, or set"
        " MKT_DUCKDB_PATH (a component instance: its database) to another file",
        f"{new}: it does not exist, and its directory {mounted / 'new'} cannot be created in {mounted}"
        " (Read-only file system); mount it read-write, or set MKT_DUCKDB_PATH (a component instance: its database) to another file",
    ]
    assert snapshot(mounted) == before
