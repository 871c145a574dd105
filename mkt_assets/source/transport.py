"""HTTP plumbing under the client: retries, pacing, a deadline per answer, bounded bodies.

Knows requests and urllib3, nothing of the API's pages or of Dagster. The client sends each
request inside ``Deadlines.bound`` and reads its body with ``read_body``, so every wait and
size a server could stretch is bounded:

- urllib3's ``Retry`` retries 429/500/502/503/504, honouring ``Retry-After`` on all of them,
  but never waits longer than ``max_wait`` at once: a server asking for more fails the
  request at once (``WaitTooLong``) instead of holding the run for hours;
- urllib3's read timeout bounds each socket read, which a server dripping a byte a second
  never trips; a watchdog shuts the connection's socket once an answer (headers and body)
  has taken longer than the read timeout since its request was sent;
- a body that inflates past ``max_bytes`` (a gzip bomb, an endless page) is cut off.

A run's ``Stop`` ends all of that at once: once set (the run was interrupted, or another of
its fetches failed), no request is sent (checked as urllib3 sends each attempt, retries
included), the answers on the wire are cut through the same watchdog, and a retry's backoff
or a rate-limit wait ends at once.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from mkt_assets.source.ratelimit import SharedRateLimiter

RETRY_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})
# Waits at least this long are logged: a user watching a run should see why it stands still.
LOGGED_WAIT_SECONDS = 5.0
# Bodies are read in pieces of this size; urllib3 inflates compressed ones a piece at a time.
_READ_CHUNK_BYTES = 1 << 16

Log = Callable[[str], None]


def _ignore(message: str) -> None:
    return None


@dataclass
class RequestStats:
    """What the retry layer met, shared by every request of one client (and its threads)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    statuses: dict[int, int] = field(default_factory=dict)
    paced_seconds: float = 0.0  # waited for the rate-limit window to refill
    retry_wait_seconds: float = 0.0  # waited between retries (Retry-After or backoff)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def count_retry(self, status: int | None) -> None:
        with self._lock:
            self.retries += 1
            if status is not None:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 429:
                    self.throttled += 1

    def count_pacing(self, seconds: float) -> None:
        with self._lock:
            self.paced_seconds += seconds

    def count_retry_wait(self, seconds: float) -> None:
        with self._lock:
            self.retry_wait_seconds += seconds


class Stopped(Exception):
    """The run was stopped: this request was not sent, or was cut on the wire."""


class Stop:
    """A run's stop, shared by every fetch of the run and every client it opens.

    Once set, nothing more is sent: each attempt checks it just before it goes out, waits
    (``sleep``) end at once, and the clients' ``Deadlines`` cut the answers on the wire.
    Setting it again keeps the first reason and cuts again: a set cut short by an interrupt
    is completed by the next."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()
        self.reason = ""
        # Done once set: a thread waiting on futures (``concurrent.futures.wait``) waits on
        # this one too, so that it wakes at the stop rather than when an answer comes.
        self.future: Future[None] = Future()

    def set(self, reason: str) -> None:
        with self._lock:
            if not self._event.is_set():
                self.reason = reason
                self._event.set()
            hooks = list(self._hooks.values())
            if not self.future.done():
                self.future.set_result(None)
        for hook in hooks:
            hook()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Stopped(self.reason)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or raise ``Stopped`` as soon as the stop is set."""
        if self._event.wait(seconds):
            raise Stopped(self.reason)

    def on_set(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` when the stop is set (at once if it is); returns what unregisters it."""
        with self._lock:
            if not self._event.is_set():
                key = next(self._keys)
                self._hooks[key] = hook
                return lambda: self._forget(key)
        hook()
        return lambda: None

    def _forget(self, key: int) -> None:
        with self._lock:
            self._hooks.pop(key, None)


class WaitTooLong(Exception):
    """The server asked to wait longer before retrying than the sync accepts."""

    def __init__(self, status: int, asked: float, cap: float) -> None:
        self.status, self.asked, self.cap = status, asked, cap
        super().__init__(
            f"HTTP {status} asking to retry after {asked:,.0f} s (Retry-After), longer than the"
            f" {cap:g} s the sync waits at most (max_wait_seconds); failing now instead of waiting"
        )


class AnswerTooLarge(Exception):
    """A body grew past the size a page may have once decompressed."""


class CappedRetry(Retry):
    """urllib3's Retry with every wait capped, counted and, when long, logged.

    urllib3 honours Retry-After on 413/429/503 only; a 502 or 504 that says when to come
    back is believed too. Its own cap on Retry-After is six hours per retry; ours is
    ``max_wait``, and a longer demand fails rather than being shortened: retrying sooner
    than the server asked would only be refused again.
    """

    RETRY_AFTER_STATUS_CODES = RETRY_STATUSES

    def __init__(
        self,
        *args: Any,
        stats: RequestStats | None = None,
        max_wait: float = 120.0,
        log: Log = _ignore,
        sleeper: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        kwargs["backoff_max"] = max_wait
        # Compared with max_wait in sleep() below: a larger value must fail, not be clamped.
        kwargs["retry_after_max"] = sys.maxsize
        super().__init__(*args, **kwargs)
        self.stats = stats if stats is not None else RequestStats()
        self.max_wait = max_wait
        self.log = log
        self.sleeper = sleeper

    def new(self, **kw: Any) -> CappedRetry:
        kw.setdefault("stats", self.stats)
        kw.setdefault("max_wait", self.max_wait)
        kw.setdefault("log", self.log)
        kw.setdefault("sleeper", self.sleeper)
        return super().new(**kw)

    def increment(self, *args: Any, **kwargs: Any) -> CappedRetry:
        self.stats.count_retry(getattr(kwargs.get("response"), "status", None))
        return super().increment(*args, **kwargs)

    def sleep(self, response: Any = None) -> None:
        # Between two attempts nothing is on the wire: the previous answer's deadline is over.
        _pause_current_deadline()
        try:
            asked = self.get_retry_after(response) if response is not None and self.respect_retry_after_header else None
        except InvalidHeader:
            asked = None  # a Retry-After that is neither seconds nor a date: back off instead
        if asked is not None and asked > self.max_wait:
            raise WaitTooLong(int(response.status), asked, self.max_wait)
        seconds = asked if asked else self.get_backoff_time()
        if seconds <= 0:
            return
        if seconds >= LOGGED_WAIT_SECONDS:
            why = f"HTTP {response.status}" if response is not None else "a failed attempt"
            source = "as Retry-After asks" if asked else "backing off"
            self.log(f"waiting {seconds:.0f} s before retrying after {why} ({source})")
        self.stats.count_retry_wait(seconds)
        self.sleeper(seconds)


# ---------------------------------------------------------------------- deadlines


class _Bound:
    """One request's deadline: from each attempt's request to the last byte of its answer.

    Its fields change under ``lock``, which the watchdog holds from its check to the shutdown:
    once ``finish`` or ``pause`` returns, the watchdog cannot shut the connection, which the
    next request may already be reusing.
    """

    __slots__ = ("connection", "due", "expired", "generation", "lock", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.connection: HTTPConnection | None = None
        self.due: float | None = None
        self.generation = 0
        self.expired = False  # the last attempt was cut at its deadline

    def start(self, connection: HTTPConnection) -> tuple[float, int]:
        with self.lock:
            self.connection = connection
            self.generation += 1
            self.due = time.monotonic() + self.seconds
            self.expired = False
            return self.due, self.generation

    def pause(self) -> None:
        """Nothing is on the wire (between attempts, or the answer is read): stop the clock."""
        with self.lock:
            self.due = None
            self.generation += 1

    finish = pause

    def fire(self, generation: int) -> bool:
        """Cut the attempt ``generation`` if it is still running; False to look again soon."""
        with self.lock:
            if generation != self.generation or self.due is None:
                return True  # that attempt is over
            self.expired = True
            return _shut(self.connection)


_current = threading.local()


def _current_bound() -> _Bound | None:
    return getattr(_current, "bound", None)


def _pause_current_deadline() -> None:
    bound = _current_bound()
    if bound is not None:
        bound.pause()


class Deadlines:
    """Shuts the socket of any answer that is still arriving when its time is up.

    One watchdog thread per client, started on first use. An attempt's clock starts when
    urllib3 sends its request (a retry starts a fresh one) and stops once the caller has
    read the whole body; a wait between attempts is not counted (``CappedRetry`` bounds it).
    """

    def __init__(self, stop: Stop | None = None) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, int, _Bound]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The bounds of the requests under way, to cut at once when the run stops.
        self._live: set[_Bound] = set()
        self.stop = stop
        self._unhook = stop.on_set(self.cut_all) if stop is not None else None

    @contextmanager
    def bound(self, seconds: float) -> Iterator[_Bound]:
        """Within this block, each attempt on this thread must be answered within ``seconds``."""
        bound = _Bound(seconds)
        _current.bound = bound
        with self._condition:
            self._live.add(bound)
        try:
            yield bound
        finally:
            _current.bound = None
            bound.finish()
            with self._condition:
                self._live.discard(bound)

    def cut_all(self) -> None:
        """Cut every answer still arriving, now: the run has stopped and will use none of them.

        An attempt that starts after this finds the stop set (``_Watched.request``); one
        started before is armed, so it is cut here, or by the watchdog once it has a socket."""
        with self._condition:
            live = list(self._live)
        for bound in live:
            with bound.lock:
                due, generation = bound.due, bound.generation
            if due is not None and not bound.fire(generation):
                self._push(time.monotonic() + 0.05, generation, bound)

    def close(self) -> None:
        if self._unhook is not None:
            self._unhook()
        with self._condition:
            self._closed = True
            self._condition.notify()

    def _arm(self, bound: _Bound, connection: HTTPConnection) -> None:
        due, generation = bound.start(connection)
        self._push(due, generation, bound)
        # Armed first, checked after: a stop set in between cuts this attempt (``cut_all``).
        if self.stop is not None and self.stop.is_set():
            bound.pause()  # never sent: nothing to cut
            self.stop.check()

    def _push(self, due: float, generation: int, bound: _Bound) -> None:
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="answer-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (due, next(self._order), generation, bound))
            self._condition.notify()

    def _watch(self) -> None:
        while True:
            with self._condition:
                due: list[tuple[int, _Bound]] = []
                while not due:
                    if self._closed:
                        return
                    now = time.monotonic()
                    while self._heap and self._heap[0][0] <= now:
                        _, _, generation, bound = heapq.heappop(self._heap)
                        due.append((generation, bound))
                    if not due:
                        self._condition.wait(self._heap[0][0] - now if self._heap else None)
            # Outside the condition: a bound's lock is taken before the condition when armed.
            for generation, bound in due:
                if not bound.fire(generation):
                    # Still connecting (the connect timeout bounds that): look again soon.
                    self._push(time.monotonic() + 0.05, generation, bound)


def _shut(connection: HTTPConnection | None) -> bool:
    """Wake a read blocked on ``connection``'s socket; False if it has no socket yet."""
    sock = getattr(connection, "sock", None)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing is waiting on it
    return True


class _Watched:
    """Mixed into a pool's connection class: each request starts its attempt's deadline."""

    deadlines: Deadlines | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        bound = _current_bound()
        if self.deadlines is not None:
            if bound is not None:
                self.deadlines._arm(bound, self)  # type: ignore[arg-type]
            elif self.deadlines.stop is not None:
                self.deadlines.stop.check()
        super().request(*args, **kwargs)  # type: ignore[misc]


def _watch_pools(manager: Any, deadlines: Deadlines, made: dict[type, type]) -> None:
    """Make ``manager``'s pools (plain, TLS, SOCKS: whatever it uses) start deadlines."""
    watched = {}
    for scheme, pool in manager.pool_classes_by_scheme.items():
        if pool not in made:
            connection = type(f"Watched{pool.ConnectionCls.__name__}", (_Watched, pool.ConnectionCls), {"deadlines": deadlines})
            made[pool] = type(f"Watched{pool.__name__}", (pool,), {"ConnectionCls": connection})
        watched[scheme] = made[pool]
    manager.pool_classes_by_scheme = watched


class ApiAdapter(HTTPAdapter):
    """Holds each request until the shared quota allows it, reports each answer's quota, and
    hands every connection to the deadline watchdog."""

    def __init__(
        self, deadlines: Deadlines, limiter: SharedRateLimiter | None, stats: RequestStats, **kwargs: Any
    ) -> None:
        self._deadlines = deadlines
        self._stop = deadlines.stop
        self._watched: dict[type, type] = {}
        self._limiter = limiter
        self._stats = stats
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager, self._deadlines, self._watched)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        fresh = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if fresh:
            _watch_pools(manager, self._deadlines, self._watched)
        return manager

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        reservation = None
        if self._stop is not None:
            self._stop.check()  # a stopped run reserves none of the quota either
        if self._limiter is not None:
            reservation = self._limiter.reserve(sleep=self._stop.sleep if self._stop is not None else None)
            self._stats.count_pacing(reservation.waited)
        try:
            response = super().send(request, *args, **kwargs)
        except BaseException:
            if self._limiter is not None and reservation is not None:
                self._limiter.abandon(reservation)
            raise
        if self._limiter is not None:
            self._limiter.observe(response.headers, reservation=reservation)
        return response


def read_body(response: requests.Response, max_bytes: int) -> bytes:
    """The whole (decompressed) body of a streamed answer, refusing one larger than ``max_bytes``."""
    body = bytearray()
    for piece in response.iter_content(_READ_CHUNK_BYTES):
        body += piece
        if len(body) > max_bytes:
            response.close()
            raise AnswerTooLarge(
                f"the answer is larger than {max_bytes / (1 << 20):g} MiB"
                f"{' once decompressed' if response.headers.get('Content-Encoding') else ''}"
                " (max_page_mb); stopped reading it"
            )
    return bytes(body)


# ---------------------------------------------------------------------- redirects

# The API does not redirect; a few hops within its origin are followed, in case a proxy does.
MAX_REDIRECTS = 5


class ManualRedirectSession(requests.Session):
    """A session that never follows (nor prepares to follow) a redirect itself.

    Even with ``allow_redirects=False`` requests reads a redirect's body whole to prepare
    ``Response.next``; the client follows redirects itself (``redirect_target``)."""

    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return iter(())


def redirect_target(response: requests.Response) -> str | None:
    """Where a redirect points (absolute), or None when ``response`` is not a redirect.

    Redirects are followed by the client, not by requests: requests would read each hop's
    body whole (unbounded) and forward ``X-API-Key`` to another origin (it drops only
    ``Authorization``)."""
    if not response.is_redirect:
        return None
    return urljoin(response.url, response.headers["Location"])


def off_origin(target: str, source: str) -> str | None:
    """Why following ``source`` to ``target`` would be refused, or None when it is safe."""
    if origin(target) == origin(source):
        return None
    return (
        f"the API redirected to another origin ({origin(target)}, not {origin(source)});"
        " refusing to follow it with the API key"
    )


def origin(url: str) -> str:
    """``scheme://host:port`` with the default port spelled out, so equal origins compare equal."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"
