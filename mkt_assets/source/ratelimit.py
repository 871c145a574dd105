"""Pace requests by the API's rate-limit headers, across every process on the machine.

The quota belongs to the account, and a sync reads its resources in threads while a
scheduled run can overlap a manual one (each in its own process), so the client's view of
the quota lives in a small state file that every process reads and updates under an OS lock. Requests are
reserved against the remaining quota before they are sent; when it is spent, the
reserving process waits for the window to refill instead of collecting 429s.

The state file lives in a private directory (see ``private_files``) and is checked when
read: a value no answer could mean (a refill hours or millennia ahead, a negative count) is
treated as unknown, so no state left by a bogus header, an older version or anyone else can
stall or break a later run. No wait is ever longer than the horizon, and a long one is logged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

from mkt_assets.plumbing.private_files import default_private_directory, open_private_file, private_directory

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
# Reservation counts start again from zero before they leave the integers JSON keeps exact.
_MAX_ISSUED = 2**53
# How long a spent quota is assumed to last when no answer said when it refills.
_UNKNOWN_WINDOW_SECONDS = 1.0
# While nothing is known of the quota, one request goes first and the others wait for its
# answer, which tells the count: this long at most (a first request can fail with no answer),
# looking again this often.
_PROBE_SECONDS = 2.0
_PROBE_POLL_SECONDS = 0.005
# A refill further ahead than this is no window any API keeps: treated as unknown.
DEFAULT_HORIZON_SECONDS = 120.0
# Waits this long or longer are logged: a run that waits should say why.
_LOGGED_WAIT_SECONDS = 5.0
# Distinct implausible values logged per limiter: a server sending a new one on every answer
# (a Unix time in milliseconds) must not flood the run's log.
_MAX_REPORTED_VALUES = 5

_logger = logging.getLogger(__name__)


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
        if not math.isfinite(number):
            return None  # "nan", "inf" and "1e400" parse as floats, and no sleep takes them
        if number >= _UNIX_TIME_THRESHOLD:
            return number + (1.0 if number.is_integer() else 0.0)
        return now + max(number, 0.0)
    try:
        moment = parsedate_to_datetime(text)  # an HTTP date
    except (TypeError, ValueError, OverflowError):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        # Dates carry whole seconds: the refill is within the second after the one named.
        return moment.timestamp() + (1.0 if moment.microsecond == 0 else 0.0)
    except (OverflowError, ValueError):
        return None


@dataclass
class QuotaState:
    limit: int | None = None
    remaining: int | None = None
    refill_at: float | None = None
    # Requests reserved so far by every process, and those answered (or given up): the
    # difference is in flight, and an answer's count may or may not include them.
    issued: int = 0
    answered: int = 0
    # False once an answer came without the rate-limit headers: nothing to learn by probing.
    paced: bool = True
    # While nothing is known: until when the first request out holds the others back.
    probe_until: float | None = None
    # When our estimate of the window ran out and the quota was taken as refilled: answers to
    # requests reserved before then describe the window that ended.
    window_began: float | None = None


@dataclass(frozen=True)
class Reservation:
    """A request allowed out, and how long it waited for that."""

    waited: float
    reserved_at: float
    # Its place among every process's reservations (``QuotaState.issued`` once it was made).
    sequence: int


def state_path_for(origin: str, account: str, directory: str | None = None) -> Path:
    """One state file per account (its key) at an API origin, in ``directory`` or
    ``<temp>/mkt_assets-<uid>/quota``, made or checked private here. The quota is the account's:
    two accounts on one host must not pace each other. The name holds a digest, not the key."""
    digest = hashlib.sha256(f"{origin}\0{account}".encode()).hexdigest()[:16]
    parent = private_directory(directory) if directory else default_private_directory("quota")
    return parent / f"mkt_assets_quota_{digest}.json"


def _is_count(value: object) -> bool:
    return value is None or (type(value) is int and value >= 0)  # bool is an int, and no count


def _is_moment(value: object) -> bool:
    return value is None or (type(value) in (int, float) and math.isfinite(value))  # type: ignore[arg-type]


def _read_state(text: str) -> QuotaState:
    """The state a file holds, or a fresh one if it is torn, foreign or ill-typed."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return QuotaState()
    fields = {"limit", "remaining", "refill_at", "issued", "answered", "paced", "probe_until", "window_began"}
    if not isinstance(data, dict) or not data.keys() <= fields:
        return QuotaState()
    limit, remaining, refill_at = data.get("limit"), data.get("remaining"), data.get("refill_at")
    issued, answered, paced, probe_until = data.get("issued", 0), data.get("answered", 0), data.get("paced", True), data.get("probe_until")
    window_began = data.get("window_began")
    if not all(_is_count(count) for count in (limit, remaining, issued, answered)):
        return QuotaState()
    if not (_is_moment(refill_at) and _is_moment(probe_until) and _is_moment(window_began) and type(paced) is bool):
        return QuotaState()
    refill = None if refill_at is None else float(refill_at)
    if issued < answered or issued >= _MAX_ISSUED:
        # Counts no run of ours could leave, or near the end of what JSON keeps exact.
        return QuotaState(limit, remaining, refill, paced=paced)
    return QuotaState(
        limit, remaining, refill, issued, answered, paced,
        None if probe_until is None else float(probe_until),
        None if window_began is None else float(window_began),
    )  # fmt: skip


def describe_duration(seconds: float) -> str:
    """``120 s``, ``4.5 min``, ``27.8 h``, ``12.0 days``, ``55,860 years``."""
    if seconds <= 600:
        return f"{seconds:.0f} s" if float(seconds).is_integer() else f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365.25 * 86400):,.0f} years"


class SharedRateLimiter:
    """Reserve a request against the quota all local processes share, waiting when it is spent."""

    def __init__(
        self,
        path: Path,
        *,
        horizon: float = DEFAULT_HORIZON_SECONDS,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a positive number of seconds, got {horizon!r}")
        self.path = path
        self.horizon = horizon
        self._log = log if log is not None else _logger.warning
        self._clock = clock
        self._sleep = sleep
        self._descriptor: int | None = None
        # flock excludes other processes only: threads of this one share the descriptor.
        self._thread_lock = threading.Lock()
        self._reported: set[str] = set()
        self._reported_lock = threading.Lock()

    def reserve(self, sleep: Callable[[float], None] | None = None) -> Reservation:
        """Block until a request may be sent; then ``observe`` its answer, or ``abandon`` it.

        ``sleep``: waits for the quota with this instead (a run's stop, which ends the wait
        at once by raising: nothing is reserved then)."""
        waited = 0.0
        while True:
            with self._state() as state:
                now = self._clock()
                if state.refill_at is not None and now >= state.refill_at:
                    # The window has refilled; the next answer will say when it ends.
                    state.remaining, state.refill_at, state.window_began = state.limit, None, now
                probing = state.remaining is None and state.paced
                if probing and state.issued > state.answered and now < (state.probe_until or 0.0):
                    # The first request is out; its answer will say how many may follow.
                    pause = _PROBE_POLL_SECONDS
                    why = ""
                elif state.remaining is None or state.remaining > 0:
                    if state.remaining is not None:
                        state.remaining -= 1
                    elif probing:
                        state.probe_until = now + _PROBE_SECONDS
                    state.issued += 1
                    return Reservation(waited, now, state.issued)
                else:
                    if state.refill_at is None:
                        # Spent, and no answer has said when this window ends (they all failed):
                        # guess a second, rather than wait for an answer that may never come.
                        state.refill_at = now + _UNKNOWN_WINDOW_SECONDS
                        why = "no answer said when; a second is assumed"
                    else:
                        why = f"it refills then, by the answers' {REFILL_HEADER}"
                    # The state is checked against the horizon when read; this bounds a clock
                    # that stepped back since.
                    pause = min(state.refill_at - now + _REFILL_MARGIN_SECONDS, self.horizon)
                limit = "?" if state.limit is None else state.limit
            if pause >= _LOGGED_WAIT_SECONDS:
                self._log(
                    f"rate limit: waiting {pause:.1f} s for the quota to refill before the next request:"
                    f" 0 of {limit} requests remain in this window ({why})"
                )
            (sleep or self._sleep)(pause)
            waited += pause

    def observe(
        self, headers: Mapping[str, str], received_at: float | None = None, reservation: Reservation | None = None
    ) -> None:
        """Fold an answer's rate-limit headers into the shared view of the quota.

        ``reservation``: that of the request answered, which is then no longer in flight. An
        answer's count was taken when its request arrived, before or after the others in
        flight: where the count replaces our own (a new window began before we thought it
        would) those are taken off it. While nothing is known, one request goes first (see
        ``reserve``), so the first count comes with nothing else in flight."""
        now = self._clock() if received_at is None else received_at
        quota = self._quota(headers, now)
        with self._state() as state:
            if reservation is not None:
                state.answered = min(state.answered + 1, state.issued)
                if state.window_began is not None and reservation.reserved_at < state.window_began:
                    # Sent before we took the window as refilled: its count and refill are
                    # the ended window's (its refill, still ahead, would end the new one early).
                    return
            # Nothing to pace by (no headers, or none that mean anything): requests no longer
            # wait for a first answer to tell more than this one did.
            state.paced = quota is not None
            if quota is None:
                return
            remaining, refill_at, limit = quota
            if limit is not None:
                state.limit = limit
            if refill_at <= now:
                return  # it describes a window that has already ended
            in_flight = state.issued - state.answered
            unseen = max(remaining - in_flight, 0)
            # The answer's count was taken before the requests reserved after its own arrived:
            # those still unanswered are taken off it, as they are off ours.
            after_it = 0 if reservation is None else max(state.issued - reservation.sequence, 0)
            counted = max(remaining - min(after_it, in_flight), 0)
            sent = now if reservation is None else reservation.reserved_at
            if state.refill_at is None:
                # The first answer from a fresh window: reservations made since it began
                # are already taken off `remaining`, so the lower count is the truer one.
                state.remaining = unseen if state.remaining is None else min(state.remaining, counted)
                state.refill_at = refill_at
            elif refill_at - (now - sent) >= state.refill_at + 1.0:
                # The server moved to a new window before our estimate of the old one ran out:
                # even counted from when its request left (the answer was decided after that)
                # and a whole second early (refills come rounded up), the answer's window
                # ends after ours. An older answer overtaken by a newer one is not this. The
                # answers to requests already out are then the old window's, or counted here.
                state.remaining, state.refill_at, state.window_began = unseen, refill_at, now
            else:
                # Same window: the lowest count and the earliest refill seen are the truest.
                state.remaining = counted if state.remaining is None else min(state.remaining, counted)
                state.refill_at = min(state.refill_at, refill_at)

    def _quota(self, headers: Mapping[str, str], now: float) -> tuple[int, float, int | None] | None:
        """(remaining, refill time, limit) from an answer's headers, or None if they say nothing."""
        remaining_text = headers.get(REMAINING_HEADER)
        refill_text = headers.get(REFILL_HEADER)
        if remaining_text is None or refill_text is None:
            return None
        try:
            remaining = max(int(remaining_text), 0)
        except ValueError:
            return None
        refill_at = parse_refill(refill_text, now)
        if refill_at is None:
            return None
        if refill_at - now > self.horizon:
            self._report(
                f"{REFILL_HEADER}: {refill_text.strip()} is {describe_duration(refill_at - now)} ahead, more"
                f" than the {describe_duration(self.horizon)} horizon: treated as unknown",
                key=refill_text.strip(),
            )
            return None
        limit_text = headers.get(LIMIT_HEADER, "").strip()
        limit = int(limit_text) if limit_text.isascii() and limit_text.isdigit() else None  # int() takes "²" too
        return remaining, refill_at, limit

    def abandon(self, reservation: Reservation) -> None:
        """The request failed with no answer: it is no longer in flight."""
        with self._state() as state:
            state.answered = min(state.answered + 1, state.issued)

    def _report(self, message: str, key: str) -> None:
        with self._reported_lock:
            if key in self._reported or len(self._reported) == _MAX_REPORTED_VALUES:
                return
            self._reported.add(key)
            if len(self._reported) == _MAX_REPORTED_VALUES:
                message = f"{message} (further implausible values are not logged)"
        self._log(message)

    @contextmanager
    def _state(self) -> Iterator[QuotaState]:
        # Called twice a request: read and write in place, with no truncate (a metadata
        # write on most file systems, and the costliest step when the file shrinks).
        dropped: float | None = None
        with self._thread_lock:
            if self._descriptor is None:
                private_directory(self.path.parent)
                self._descriptor = open_private_file(self.path, os.O_RDWR | os.O_CREAT)
            descriptor = self._descriptor
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                text = os.pread(descriptor, _STATE_BYTES, 0).decode("utf-8", "replace").strip()
                state = _read_state(text)
                ahead = None if state.refill_at is None else state.refill_at - self._clock()
                if ahead is not None and ahead > self.horizon:
                    # No answer within the horizon stored it: the window it counts is unknown.
                    state.remaining, state.refill_at, dropped = None, None, ahead
                yield state
                updated = json.dumps(asdict(state))
                if updated != text:
                    os.pwrite(descriptor, updated.ljust(_STATE_BYTES).encode(), 0)
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
        if dropped is not None:  # logged outside the locks: a log call may be slow
            self._report(
                f"rate-limit state {self.path}: a refill {describe_duration(dropped)} ahead is beyond the"
                f" {describe_duration(self.horizon)} horizon: treated as unknown",
                key=f"stored {dropped:.0f}",
            )

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
