"""Work the lean_process tests hand a worker: importable in its child by this module's name
(a test module is imported by pytest under a name of its own)."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path


def leave_a_thread_waiting(lock: str, marker: str) -> None:
    """Return at once, leaving a thread (not a daemon) that waits for the lock on ``lock`` and
    then writes ``marker``: as a commit leaves the checks' facts gathering."""

    def work() -> None:
        with open(lock) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            Path(marker).write_text("done")

    threading.Thread(target=work).start()
