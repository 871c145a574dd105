"""Pace requests by the API's rate-limit headers, across every process on the machine.

The quota belongs to the account, and a sync runs five assets in five processes (and a
scheduled run can overlap a manual one), so the client's view of the quota lives in a
small state file that every process reads and updates under an OS lock. Requests are
reserved against the remaining quota before they are sent; when it is spent, the
reserving process waits for the window to refill instead of collecting 429s.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

# Headers the API sends on every response.
LIMIT_HEADER = "X-RateLimit-Limit"
REMAINING_HEADER = "X-RateLimit-Remaining"
REFILL_HEADER = "X-RateLimit-Refill"

# A number this large is a Unix time, not a count of seconds (which would be 30+ years).
_UNIX_TIME_THRESHOLD = 1_000_000_000
# Wait this long past the estimated refill, so a request never lands a hair before it.
_REFILL_MARGIN_SECONDS = 0.02
# The state is padded to this size so every write overwrites the whole of it.
_STATE_BYTES = 256
# How long a spent quota is assumed to last when no answer said when it refills.
_UNKNOWN_WINDOW_SECONDS = 1.0


def parse_refill(value: str, now: float) -> float | None:
    """When the quota refills, as a Unix time, from the header in any form seen in the wild.

    Returns an upper bound: a refill given in whole seconds may come up to a second
    earlier, and the limiter tightens the estimate across responses.
    """
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if number >= _UNIX_TIME_THRESHOLD:
            return number + (1.0 if number.is_integer() else 0.0)
        return now + max(number, 0.0)
    try:
        moment = parsedate_to_datetime(text)  # an HTTP date
    except (TypeError, ValueError):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    # Dates carry whole seconds: the refill is within the second after the one named.
    return moment.timestamp() + (1.0 if moment.microsecond == 0 else 0.0)


@dataclass
class QuotaState:
    limit: int | None = None
    remaining: int | None = None
    refill_at: float | None = None


def state_path_for(origin: str, directory: str | None = None) -> Path:
    """One state file per API origin: every key of the account shares the quota."""
    digest = hashlib.sha256(origin.encode()).hexdigest()[:16]
    return Path(directory or tempfile.gettempdir()) / f"mkt_assets_quota_{digest}.json"


class SharedRateLimiter:
    """Reserve a request against the quota all local processes share, waiting when it is spent."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self._clock = clock
        self._sleep = sleep
        self._descriptor: int | None = None
        # flock excludes other processes only: threads of this one share the descriptor.
        self._thread_lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a request may be sent; return the seconds spent waiting."""
        waited = 0.0
        while True:
            with self._state() as state:
                now = self._clock()
                if state.refill_at is not None and now >= state.refill_at:
                    # The window has refilled; the next answer will say when it ends.
                    state.remaining, state.refill_at = state.limit, None
                if state.remaining is None or state.remaining > 0:
                    if state.remaining is not None:
                        state.remaining -= 1
                    return waited
                if state.refill_at is None:
                    # Spent, and no answer has said when this window ends (they all failed):
                    # guess a second, rather than wait for an answer that may never come.
                    state.refill_at = now + _UNKNOWN_WINDOW_SECONDS
                pause = state.refill_at - now + _REFILL_MARGIN_SECONDS
            self._sleep(pause)
            waited += pause

    def observe(self, headers: Mapping[str, str], received_at: float | None = None) -> None:
        """Fold an answer's rate-limit headers into the shared view of the quota."""
        remaining_text = headers.get(REMAINING_HEADER)
        refill_text = headers.get(REFILL_HEADER)
        if remaining_text is None or refill_text is None:
            return
        now = self._clock() if received_at is None else received_at
        try:
            remaining = int(remaining_text)
        except ValueError:
            return
        refill_at = parse_refill(refill_text, now)
        if refill_at is None:
            return
        limit_text = headers.get(LIMIT_HEADER, "")
        with self._state() as state:
            if limit_text.isdigit():
                state.limit = int(limit_text)
            if refill_at <= now:
                return  # it describes a window that has already ended
            if state.refill_at is None:
                # The first answer from a fresh window: reservations made since it began
                # are already taken off `remaining`, so the lower count is the truer one.
                state.remaining = remaining if state.remaining is None else min(state.remaining, remaining)
                state.refill_at = refill_at
            elif refill_at >= state.refill_at + 1.0:
                # The server moved to a new window before our estimate of the old one ran out.
                state.remaining, state.refill_at = remaining, refill_at
            else:
                # Same window: the lowest count and the earliest refill seen are the truest.
                state.remaining = remaining if state.remaining is None else min(state.remaining, remaining)
                state.refill_at = min(state.refill_at, refill_at)

    @contextmanager
    def _state(self) -> Iterator[QuotaState]:
        # Called twice a request: read and write in place, with no truncate (a metadata
        # write on most file systems, and the costliest step when the file shrinks).
        with self._thread_lock:
            if self._descriptor is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            with self._locked_file(self._descriptor) as state:
                yield state

    @staticmethod
    @contextmanager
    def _locked_file(descriptor: int) -> Iterator[QuotaState]:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            text = os.pread(descriptor, _STATE_BYTES, 0).decode("utf-8", "replace").strip()
            try:
                state = QuotaState(**json.loads(text)) if text else QuotaState()
            except (ValueError, TypeError):
                state = QuotaState()  # a torn or foreign file: start afresh
            yield state
            updated = json.dumps(asdict(state))
            if updated != text:
                os.pwrite(descriptor, updated.ljust(_STATE_BYTES).encode(), 0)
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
