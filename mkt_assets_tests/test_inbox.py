"""The webhook inbox: durable, deduplicated, ordered by seq, private, shared between threads and
processes, and never opened on a file that is not its own."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pytest

from mkt_assets.core.deliveries import parse
from mkt_assets.core.errors import ConfigurationError, InboxBusyError, InboxError
from mkt_assets.webhooks.inbox import MAX_READ, Inbox, default_inbox_path

ROOT = Path(__file__).resolve().parents[1]


def body(number: int, event: str = "CONTACT_TAG_ADDED") -> bytes:
    return json.dumps({"type": event, "contact": {"id": number, "email": f"c{number}@example.com"}}).encode()


def add(inbox: Inbox, raw: bytes) -> tuple[int, bool]:
    return inbox.add(raw, parse(raw))


def test_a_new_inbox_is_a_private_file_in_a_private_directory_in_wal_mode(tmp_path: Path, usual_umask: None) -> None:
    path = tmp_path / "made" / "here" / "inbox.sqlite"

    with Inbox(path) as inbox:
        add(inbox, body(1))

    assert stat.S_IMODE(os.stat(path.parent).st_mode) == stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700
    for made in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if made.exists():
            assert stat.S_IMODE(os.stat(made).st_mode) == 0o600, made
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_deliveries_are_kept_once_in_order_of_arrival_and_read_from_a_seq(tmp_path: Path) -> None:
    when = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        assert inbox.last_seq() == 0 and inbox.since(0) == []
        assert inbox.add(body(1), parse(body(1)), received_at=when) == (1, True)
        assert add(inbox, body(2, "CONTACT_OPT_IN")) == (2, True)
        assert add(inbox, body(1)) == (1, False)  # the platform sending it again
        assert add(inbox, b'{"type": "SALE_NEW"}') == (3, True)

        first, second, third = inbox.since(0)
        assert (first.seq, first.event_type, first.contact_id, first.signature_verified) == (1, "CONTACT_TAG_ADDED", 1, True)
        assert first.received_at == when and first.body == body(1).decode()
        assert (second.seq, second.event_type, second.contact_id) == (2, "CONTACT_OPT_IN", 2)
        assert (third.seq, third.event_type, third.contact_id) == (3, "SALE_NEW", None)
        assert second.received_at.tzinfo is not None and first.digest != second.digest
        assert [delivery.seq for delivery in inbox.since(1)] == [2, 3]
        assert [delivery.seq for delivery in inbox.since(0, limit=2)] == [1, 2]
        assert inbox.since(3) == []
        assert inbox.last_seq() == 3 and inbox.count() == 3


@pytest.mark.parametrize("limit", [0, -1, MAX_READ + 1])
def test_a_read_is_bounded(tmp_path: Path, limit: int) -> None:
    with Inbox(tmp_path / "inbox.sqlite") as inbox, pytest.raises(ValueError, match="limit"):
        inbox.since(0, limit)


def test_what_was_kept_is_there_when_the_inbox_is_opened_again_and_a_seq_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    with Inbox(path) as inbox:
        add(inbox, body(1))
        add(inbox, body(2))
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM deliveries WHERE seq = 2")

    with Inbox(path) as inbox:
        assert [delivery.contact_id for delivery in inbox.since(0)] == [1]
        assert add(inbox, body(1)) == (1, False)
        assert add(inbox, body(3)) == (3, True)  # not 2: a reader past 2 would never see it


def test_the_default_inbox_is_beside_the_warehouse_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_inbox_path("data/mkt_assets.duckdb") == tmp_path / "data" / "mkt_assets.webhooks.sqlite"
    assert default_inbox_path("/srv/acme.duckdb") == Path("/srv/acme.webhooks.sqlite")
    assert default_inbox_path("/srv/warehouse") == Path("/srv/warehouse.webhooks.sqlite")
    with pytest.raises(ConfigurationError, match="in-memory"):
        default_inbox_path(":memory:")


# ---------------------------------------------------------------- files that are refused


def test_a_symlink_at_the_inbox_path_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone's file")
    os.chmod(target, 0o600)
    (tmp_path / "inbox.sqlite").symlink_to(target)

    with pytest.raises(InboxError, match="symbolic link"):
        Inbox(tmp_path / "inbox.sqlite")
    assert target.read_text() == "someone's file"


def test_a_symlink_planted_as_the_write_ahead_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    Path(f"{tmp_path / 'inbox.sqlite'}-wal").symlink_to(target)

    with pytest.raises(InboxError, match="symbolic link"):
        Inbox(tmp_path / "inbox.sqlite")
    assert target.read_bytes() == b"precious"


def test_an_inbox_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    Inbox(path).close()
    os.chmod(path, 0o644)

    with pytest.raises(InboxError, match="0644: group or others may read"):
        Inbox(path)


def test_an_inbox_of_another_user_is_refused(tmp_path: Path, give_away: Callable[[Path], int]) -> None:
    path = tmp_path / "inbox.sqlite"
    Inbox(path).close()
    give_away(path)

    with pytest.raises(InboxError, match="owned by uid"):
        Inbox(path)


def test_a_directory_of_another_user_is_refused(tmp_path: Path, give_away: Callable[[Path], int]) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    give_away(theirs)

    with pytest.raises(InboxError, match="owned by uid"):
        Inbox(theirs / "inbox.sqlite")


def test_a_directory_others_may_write_in_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: anyone could plant the write-ahead log there

    with pytest.raises(InboxError, match="group or others may create files"):
        Inbox(shared / "inbox.sqlite")
    assert list(shared.iterdir()) == []


def test_a_directory_reached_through_a_symlink_is_taken_as_the_warehouses_is(tmp_path: Path) -> None:
    real = tmp_path / "volume"
    real.mkdir(mode=0o755)
    (tmp_path / "data").symlink_to(real)

    with Inbox(tmp_path / "data" / "inbox.sqlite") as inbox:
        add(inbox, body(1))
    assert (real / "inbox.sqlite").exists()


def test_the_warehouse_file_given_as_the_inbox_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("CREATE TABLE t AS SELECT 1 AS a")
    os.chmod(path, 0o600)
    before = path.read_bytes()

    with pytest.raises(InboxError, match="DuckDB database"):
        Inbox(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "said"), [("sqlite", "a SQLite database of something else"), ("text", "not a SQLite database")]
)
def test_a_file_that_is_not_an_inbox_is_refused_untouched(tmp_path: Path, content: str, said: str) -> None:
    path = tmp_path / "other.sqlite"
    if content == "sqlite":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
        connection.close()
    else:
        path.write_text("a diary, not an inbox\n" * 100)
    os.chmod(path, 0o600)
    before = path.read_bytes()

    with pytest.raises(InboxError, match=said):
        Inbox(path)
    assert path.read_bytes() == before


def test_an_inbox_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    Inbox(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    with pytest.raises(InboxError, match="version 99"):
        Inbox(path)


# ---------------------------------------------------------------- sharing


def test_threads_adding_at_once_each_keep_their_deliveries_once_under_consecutive_seqs(tmp_path: Path) -> None:
    threads, each = 8, 40
    results: list[tuple[int, int, bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    with Inbox(tmp_path / "inbox.sqlite") as inbox:

        def work(thread: int) -> None:
            start.wait(timeout=30)
            for number in range(each):
                # Every thread also sends the bodies of the thread before it: duplicates racing.
                for owner in (thread, (thread - 1) % threads):
                    seq, new = add(inbox, body(owner * 1000 + number + 1))
                    with lock:
                        results.append((owner * 1000 + number + 1, seq, new))

        workers = [threading.Thread(target=work, args=(thread,)) for thread in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)

        kept = inbox.since(0, MAX_READ)
    assert [delivery.seq for delivery in kept] == list(range(1, threads * each + 1))
    assert sorted(delivery.contact_id or 0 for delivery in kept) == sorted({number for number, _, _ in results})
    new_ones = [number for number, _, new in results if new]
    assert sorted(new_ones) == sorted({number for number, _, _ in results})  # each new exactly once
    by_number = {delivery.contact_id: delivery.seq for delivery in kept}
    assert all(by_number[number] == seq for number, seq, _ in results)  # a duplicate answers the first seq


def test_a_process_holding_the_inbox_makes_a_write_wait_only_as_long_as_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    inbox = Inbox(path, busy_seconds=0.3)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_INBOX, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        with pytest.raises(InboxBusyError, match=r"another process held it for more than 0.3 s"):
            add(inbox, body(1))
        assert time.monotonic() - started < 5
        # A reader is not kept waiting by the writer, and opens the inbox meanwhile.
        with Inbox(path, busy_seconds=0.3) as reader:
            assert reader.since(0) == [] and reader.last_seq() == 0
        holder.communicate("release\n", timeout=30)
        assert add(inbox, body(1)) == (1, True)
    finally:
        holder.kill()
        holder.wait()
        inbox.close()


HOLD_THE_INBOX = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("holding", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


def test_processes_adding_at_once_keep_every_delivery_under_consecutive_seqs(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    Inbox(path).close()
    processes, each = 3, 60
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", ADD_DELIVERIES, str(path), str(process), str(each)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process in range(processes)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err

    with Inbox(path) as inbox:
        kept = inbox.since(0, MAX_READ)
    assert [delivery.seq for delivery in kept] == list(range(1, processes * each + 1))
    assert len({delivery.contact_id for delivery in kept}) == processes * each


ADD_DELIVERIES = """
import json, sys
from mkt_assets.core.deliveries import parse
from mkt_assets.webhooks.inbox import Inbox
path, process, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Inbox(path) as inbox:
    for number in range(each):
        raw = json.dumps({"type": "CONTACT_CREATED", "contact": {"id": process * 1000 + number + 1}}).encode()
        inbox.add(raw, parse(raw))
"""
