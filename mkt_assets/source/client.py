"""HTTP client for the marketing API: authentication, retries, cursor pagination.

Knows HTTP and the API's page format, nothing of Dagster or DuckDB. Pages are yielded
as they arrive so a caller can stream them to disk; nothing here collects records.

A list is walked from both ends at once by default (``order="both"``): one cursor ascends
from the oldest record while another descends from the newest, and they stop where they
meet. Cursor pagination allows one request in flight per cursor, so two cursors halve the
wall time of a large list; each record is kept from exactly one end.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import requests

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV
from mkt_assets.core.errors import (
    ApiAccessError,
    ApiAuthError,
    ApiConnectionError,
    ApiError,
    ApiResponseError,
    ApiStatusError,
    ApiValidationError,
    ConfigurationError,
    PaginationError,
)
from mkt_assets.core.page import Page
from mkt_assets.core.records import RecordChecker, RecordProblem, has_lone_surrogate, lone_surrogate_problem, record_checker
from mkt_assets.core.setting_names import ENVIRONMENT, SettingNames
from mkt_assets.source.ratelimit import SharedRateLimiter
from mkt_assets.source.transport import (
    MAX_REDIRECTS,
    RETRY_STATUSES,
    AnswerTooLarge,
    ApiAdapter,
    CappedRetry,
    Deadlines,
    Log,
    ManualRedirectSession,
    RequestStats,
    Stop,
    WaitTooLong,
    off_origin,
    read_body,
    redirect_target,
)

MAX_PAGE_SIZE = 100
MIN_PAGE_SIZE = 10
# Records read by key at once (``read_records``): each request is paced by the rate limiter all
# the same; a few in flight hide the round trip without holding many connections.
RECORD_CONCURRENCY = 4
MAX_RECORD_CONCURRENCY = 16
# Walk orders: one cursor ascending, one descending, or both at once meeting in the middle.
ORDERS = ("asc", "desc", "both")
# A page of 100 contacts is a few tens of kB; this leaves room for fat records, not for a bomb.
# DuckDB's JSON reader buffers about twice the longest staged line, so a page this large still
# merges under the default memory limit (MKT_DUCKDB_MEMORY_LIMIT).
DEFAULT_MAX_PAGE_BYTES = 16 << 20
DEFAULT_MAX_WAIT_SECONDS = 120.0
# The longest piece of an error body's detail an error quotes: enough for the API's sentences.
MAX_DETAIL_CHARS = 160
# Servers refuse request headers past about 8 KiB; an API key is a short token, so anything
# longer is a file or a page pasted by mistake, refused before it is sent.
MAX_KEY_CHARACTERS = 1024
# This many characters of the key in a row, in any case and whatever separates them, in a text
# the server sent help guess it: such a text is not quoted, or those characters are masked.
KEY_PIECE_CHARACTERS = 4
MIN_MASKED_KEY_CHARACTERS = 8


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be sent as the X-API-Key header, or None; never quotes the key.

    Only printable ASCII without spaces is sent: requests refuses a value with surrounding
    whitespace or a line break (quoting it whole in its error), http.client cannot encode one
    outside Latin-1, and a character past ASCII or a space in a key is a pasting accident
    (a typographic quote, a non-breaking or zero-width space), never part of a key.
    """
    if not key:
        return "is empty"
    if len(key) > MAX_KEY_CHARACTERS:
        return f"is {len(key):,} characters long, longer than any API key (at most {MAX_KEY_CHARACTERS:,})"
    for position, character in enumerate(key, start=1):
        if not "!" <= character <= "~":
            return f"has {_character_kind(character)} at character {position} of {len(key)}, which no API key holds"
    return None


def _folded(text: str) -> tuple[str, list[int]]:
    """``text``'s ASCII letters and digits, lower-cased, and where each stands in ``text``: what
    is left of a key echoed in another case or cut up by dots, dashes or spaces."""
    kept = [(character.lower(), at) for at, character in enumerate(text) if character.isascii() and character.isalnum()]
    return "".join(character for character, _ in kept), [at for _, at in kept]


def key_pieces(text: str, key: str) -> list[tuple[int, int]]:
    """Where ``text`` holds a piece of ``key``: spans (start, end) of ``KEY_PIECE_CHARACTERS`` or
    more of its letters and digits in a row, in any case, whatever separates them.

    A text quoting ordinary words may be caught too (a key holding "live"): it is then not
    quoted, which costs a detail, never a secret. A key of fewer letters and digits than that
    (a simulator's "k") has no piece to look for: no real key is that short, and its letters
    are in every word."""
    folded_key, _ = _folded(key)
    if len(folded_key) < KEY_PIECE_CHARACTERS:
        return []
    pieces = {folded_key[at : at + KEY_PIECE_CHARACTERS] for at in range(len(folded_key) - KEY_PIECE_CHARACTERS + 1)}
    folded, positions = _folded(text)
    spans: list[tuple[int, int]] = []
    for at in range(len(folded) - KEY_PIECE_CHARACTERS + 1):
        if folded[at : at + KEY_PIECE_CHARACTERS] in pieces:
            start, end = positions[at], positions[at + KEY_PIECE_CHARACTERS - 1] + 1
            if spans and start < spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
    return spans


def without_key(text: str, key: str, mask: str) -> str:
    """``text`` with each piece of ``key`` (see ``key_pieces``) replaced by ``mask``."""
    for start, end in reversed(key_pieces(text, key)):
        text = text[:start] + mask + text[end:]
    return text


def _character_kind(character: str) -> str:
    # The code point helps find the character; it is not part of the key, which is ASCII.
    point = f"U+{ord(character):04X}"
    if character in "\r\n\x85\u2028\u2029":
        return f"a line break ({point})"
    if character == "\t":
        return f"a tab ({point})"
    # Before spaces: Python counts U+001C-U+001F as whitespace.
    if ord(character) < 0x20 or 0x7F <= ord(character) < 0xA0:
        return f"a control character ({point})"
    if character.isspace():
        return f"a space ({point})"
    return f"a character outside ASCII ({point})"


_Answer = TypeVar("_Answer")


@dataclass(frozen=True)
class OneRecord:
    """One record read by its key: as the API sent it, or gone (it answered 404)."""

    key: int
    record: dict[str, Any] | None
    body: bytes  # the JSON object as sent (b"" when gone), so a stager keeps it unencoded
    # Fields of the record the catalog does not know (``tags[].color`` for a list member's).
    unknown_fields: frozenset[str] = frozenset()

    @property
    def gone(self) -> bool:
        return self.record is None


class MarketingApiClient:
    """One authenticated keep-alive session to the API."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        page_size: int = MAX_PAGE_SIZE,
        order: str = "both",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_retries: int = 3,
        backoff_factor: float = 2.0,
        max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
        max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
        key_setting: str = "api_key",
        settings: SettingNames = ENVIRONMENT,
        rate_limiter: SharedRateLimiter | None = None,
        log: Log | None = None,
        stop: Stop | None = None,
    ) -> None:
        """``stop``: the run's stop. Once it is set nothing more is sent, the answers on the
        wire are cut, and a walk ends at once raising ``Stopped``."""
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, got {page_size}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        problem = key_problem(api_key)
        if problem is not None:
            # Before any request: sent, it would fail every one with the key quoted in the error.
            raise ConfigurationError(
                f"{key_setting} {problem}: set it to the key exactly as made in the account's profile settings"
            )
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.order = order
        # urllib3's read timeout bounds each socket read; the deadlines bound the whole answer.
        self.timeout = (connect_timeout, read_timeout)
        self.read_timeout = read_timeout
        self.max_page_bytes = max_page_bytes
        self.key_setting = key_setting
        # How an error about an answer names the resources and base URL settings.
        self.settings = settings
        self.stats = RequestStats()
        self._rate_limiter = rate_limiter
        self._stop = stop
        self._deadlines = Deadlines(stop)
        self._retry = CappedRetry(
            total=max_retries,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            backoff_factor=backoff_factor,
            respect_retry_after_header=True,
            # Hand the last answer back instead of raising, so the error can say what it was.
            raise_on_status=False,
            stats=self.stats,
            max_wait=max_wait_seconds,
            log=log or (lambda message: None),
            # A stop ends a backoff or a Retry-After wait (up to max_wait_seconds) at once.
            sleeper=stop.sleep if stop is not None else time.sleep,
        )
        self._headers = {"X-API-Key": api_key, "Accept": "application/json", "User-Agent": "mkt-assets"}
        # What stands for a piece of the key in an error quoting a server that echoed it.
        self._key_mask = f"[{key_setting}]"
        self._checkers: dict[str, RecordChecker] = {}
        # One keep-alive session per fetching thread: requests does not promise a Session
        # is safe to share between threads, and each end of a walk has its own connection.
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    @property
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._new_session()
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _new_session(self) -> requests.Session:
        session = ManualRedirectSession()
        # The environment's proxies and CA bundle, read once: requests reads the environment
        # again on every request otherwise (a fifth of the client's time per page). trust_env
        # off also keeps ~/.netrc from adding credentials.
        session.proxies = requests.utils.get_environ_proxies(self.base_url)
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        session.trust_env = False
        adapter = ApiAdapter(self._deadlines, self._rate_limiter, self.stats, max_retries=self._retry)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers.update(self._headers)
        return session

    def __repr__(self) -> str:
        return f"MarketingApiClient(base_url={self.base_url!r}, page_size={self.page_size})"

    def __enter__(self) -> MarketingApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._deadlines.close()
        if self._rate_limiter is not None:
            self._rate_limiter.close()

    def url_path(self, spec: ResourceSpec) -> str:
        return urlsplit(self.base_url + spec.path).path

    def first_query(self, spec: ResourceSpec) -> dict[str, object]:
        if not spec.paginated:
            return {}
        return {"limit": self.page_size, "order": "asc" if self.order == "both" else self.order}

    def next_query(self, spec: ResourceSpec, query: Mapping[str, object], page: Page) -> dict[str, object] | None:
        """The query of the page after ``page``, or None when it was the last."""
        if not spec.paginated or not page.has_more:
            return None
        if not page.items:
            raise PaginationError(
                spec.name,
                page.path,
                page.query,
                f"page {page.number}: hasMore is true but the page is empty; stopping instead of looping",
            )
        # An integer: every record's cursor field was checked when the page was read.
        cursor = page.items[-1][spec.cursor_field]
        previous = query.get("startingAfter")
        order = query.get("order", self.order)
        if previous is not None:
            advanced = cursor > previous if order == "asc" else cursor < previous
            if not advanced:
                raise PaginationError(
                    spec.name,
                    page.path,
                    page.query,
                    f"page {page.number}: the cursor did not advance ({spec.cursor_field} {cursor} after {previous} in"
                    f" {order} order); stopping instead of looping",
                )
        return {**query, "startingAfter": cursor}

    def iter_pages(
        self, spec: ResourceSpec, query: Mapping[str, object] | None = None, *, resume: Mapping[str, Any] | None = None
    ) -> Iterator[Page]:
        """Every page of ``spec`` as each arrives; with ``order="both"``, from both ends at once.

        A two-ended walk (a full read) yields the pages of both ends interleaved, numbered in
        the order they were requested, each holding only the records the other end has not kept.
        ``resume``: a page's ``position`` (or ``WALK_DONE``): the walk goes on after that page,
        each end from its saved cursor, the pages numbered on from it.
        """
        if resume is not None:
            walk = resume.get("walk")
            if walk == "both":
                return self._walk_from_both_ends(spec, {}, resume)
            if walk == "one" and isinstance(resume.get("next"), dict):
                return self._walk(spec, dict(resume["next"]), int(resume["number"]))
            return iter(())  # the walk had ended: every page is staged
        start: dict[str, object] = {**self.first_query(spec), **(query or {})}
        # A read that starts after a cursor (an incremental one) is short: one ascending walk
        # then keeps to ceil(k / page size) + 1 requests for k new records.
        if spec.paginated and self.order == "both" and start.get("order") == "asc" and "startingAfter" not in start:
            return self._walk_from_both_ends(spec, start)
        return self._walk(spec, start)

    def _walk(self, spec: ResourceSpec, current: dict[str, object], number: int = 1) -> Iterator[Page]:
        """One cursor, page after page.

        The next page is requested as soon as this one is parsed (its cursor is known then),
        so the caller stages a page while the API prepares the next one. One request is in
        flight at a time, as without the overlap; the rate limiter paces it the same way.
        """
        with self._page_fetcher(spec, 1) as fetcher:
            pending: Future[Page] | None = fetcher.submit(self.get_page, spec, current, number)
            try:
                while pending is not None:
                    self._wait_any([pending])
                    page = pending.result()
                    following = self.next_query(spec, current, page)
                    pending = None
                    if following is not None:
                        pending = fetcher.submit(self.get_page, spec, following, page.number + 1)
                        current = following
                    yield replace(page, position={"walk": "one", "next": following, "number": page.number + 1})
            finally:
                # The caller stopped early: drop a request not yet sent (leaving the block
                # waits for one already on the wire, so the session is never used after close,
                # unless the run stopped: see _page_fetcher).
                if pending is not None:
                    pending.cancel()

    def _walk_from_both_ends(
        self, spec: ResourceSpec, ascending: dict[str, object], resume: Mapping[str, Any] | None = None
    ) -> Iterator[Page]:
        """An ascending and a descending cursor at once, until they meet.

        The descending end starts once the first ascending page says more follow (a list of
        one page costs one request, as before). Once the ends meet, the ascending end jumps
        past the records the descending one kept and reads on to the end of the list, so
        records created during the walk are read, as by a single ascending walk. That costs
        at most three requests more than a single walk: an answer of each end that arrives
        after the other end has read its records (dropped), and the ascending end's look
        past where the descending one started.
        """
        pending: dict[Future[Page], dict[str, object]] = {}
        if resume is None:
            frontiers = WalkFrontiers()
            first_ascending: dict[str, object] | None = ascending
            descending: dict[str, object] | None = {**ascending, "order": "desc"}
            descending_started = False
            numbers = itertools.count(1)
        else:
            # Each end goes on from the request it had not yet handed over a page of.
            frontiers = WalkFrontiers(**resume["frontiers"])
            first_ascending = resume["ascending"]
            descending = resume["descending"]
            descending_started = bool(resume["descending_started"])
            numbers = itertools.count(int(resume["number"]))
        following_number = [next(numbers)]

        def position() -> dict[str, Any]:
            # The ends' requests not yet handed over (one may be answered already: it is
            # asked again), so a walk resumed from here reads every page after this one.
            waiting = {query["order"]: query for query in pending.values()}
            return {
                "walk": "both",
                "ascending": waiting.get("asc"),
                "descending": waiting.get("desc") if descending_started else descending,
                "descending_started": descending_started,
                "frontiers": asdict(frontiers),
                "number": following_number[0],
            }

        with self._page_fetcher(spec, 2) as fetcher:

            def request(query: dict[str, object]) -> None:
                pending[fetcher.submit(self.get_page, spec, query, following_number[0])] = query
                following_number[0] = next(numbers)

            if first_ascending is not None:
                request(first_ascending)
            if descending_started and descending is not None and not frontiers.met and first_ascending is not None:
                request(descending)
            try:
                while any(query["order"] == "asc" for query in pending.values()):
                    done = self._wait_any(pending)
                    for future in sorted(done, key=lambda answered: pending[answered]["order"] != "asc"):
                        query = pending.pop(future)
                        if query["order"] == "desc" and frontiers.met:
                            continue  # the ascending end has read these records already
                        page = future.result()
                        following = self.next_query(spec, query, page)
                        if query["order"] == "asc":
                            kept = frontiers.keep_ascending(page.items, spec.cursor_field)
                            if following is None:
                                frontiers.met = True  # read to the end of the list
                            else:
                                request(frontiers.ascending_query(following))
                                if not descending_started and descending is not None:
                                    request(descending)
                                    descending_started = True
                        else:
                            kept = frontiers.keep_descending(page.items, spec.cursor_field, page.has_more)
                            if following is not None and not frontiers.met:
                                request(following)
                        if len(kept) < len(page.items):
                            page = _with_items(page, kept)
                        if kept or page.number == 1:
                            yield replace(page, position=position())
            finally:
                # Done, or the caller stopped early: drop requests not yet sent (leaving the block
                # waits for those on the wire, so no session is used after close, unless the run
                # stopped: see _page_fetcher).
                for future in pending:
                    future.cancel()

    @contextmanager
    def _page_fetcher(self, spec: ResourceSpec, workers: int) -> Iterator[ThreadPoolExecutor]:
        """The threads that fetch a walk's next pages while the caller handles the last one."""
        fetcher = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{spec.name}-pages")
        try:
            yield fetcher
        finally:
            # A stopped run waits for no request: the stop cut those on the wire and lets no
            # other out, so what is left of them ends on its own and is thrown away.
            stopped = self._stop is not None and self._stop.is_set()
            fetcher.shutdown(wait=not stopped, cancel_futures=True)

    def _wait_any(self, pending: Collection[Future[_Answer]]) -> set[Future[_Answer]]:
        """The requests of ``pending`` answered (or failed) once one is; ``Stopped`` as soon as
        the run stops, whether or not they have."""
        if self._stop is None:
            return wait(pending, return_when=FIRST_COMPLETED).done
        waited: list[Future[Any]] = [*pending, self._stop.future]
        done = wait(waited, return_when=FIRST_COMPLETED).done
        self._stop.check()
        return cast("set[Future[_Answer]]", done)  # the stop's future is not done: not in it

    def get_page(self, spec: ResourceSpec, query: Mapping[str, object], number: int = 1) -> Page:
        try:
            return self._get_page(spec, query, number)
        except ApiError as error:
            # Errors quote what the server sent (an error page's start, a 422's messages), each
            # quote masked where it is made; this catches the whole key anywhere else.
            _mask(error, self._headers["X-API-Key"], self._key_mask)
            raise

    def _get_page(self, spec: ResourceSpec, query: Mapping[str, object], number: int) -> Page:
        path = self.url_path(spec)
        body, content_type = self._get(spec, path, query, number)
        items, has_more = _read_page(spec, path, query, number, body, content_type, self._headers["X-API-Key"], self._key_mask)
        checker = self._checkers.get(spec.name)
        if checker is None:
            checker = self._checkers[spec.name] = record_checker(spec)
        try:
            unknown = checker(items, number)
            if has_lone_surrogate(body):
                raise lone_surrogate_problem(spec, items, number)
        except RecordProblem as problem:
            raise ApiResponseError(spec.name, path, query, str(problem)) from None
        if spec.paginated:
            _check_order(spec, path, query, number, items)
        return Page(spec.name, number, path, dict(query), items, has_more, body, frozenset(unknown))

    def get_record(self, spec: ResourceSpec, key: int) -> OneRecord:
        """``spec``'s record ``key`` by itself (``GET <path>/<key>``), checked exactly as a listed
        record is (see ``records``) and holding the key asked for; a 404 answer means it is gone
        (``OneRecord.gone``). Any other failure raises the error a page's would."""
        if type(key) is not int or key < 1:
            raise ValueError(f"{spec.name}: a key to read is a positive integer, got {key!r}")
        try:
            return self._get_record(spec, key)
        except ApiError as error:
            _mask(error, self._headers["X-API-Key"], self._key_mask)
            raise

    def _get_record(self, spec: ResourceSpec, key: int) -> OneRecord:
        endpoint = f"{spec.path}/{key}"
        path = urlsplit(self.base_url + endpoint).path
        try:
            body, content_type = self._get(spec, path, {}, 0, endpoint)
        except ApiAccessError as error:
            if error.status == 404:
                return OneRecord(key, None, b"")
            raise
        record = _read_record(spec, path, body, content_type, self._headers["X-API-Key"], self._key_mask)
        checker = self._checkers.get(spec.name)
        if checker is None:
            checker = self._checkers[spec.name] = record_checker(spec)
        try:
            unknown = checker([record], 0)
            if has_lone_surrogate(body):
                raise lone_surrogate_problem(spec, [record], 0)
        except RecordProblem as problem:
            raise ApiResponseError(spec.name, path, {}, str(problem)) from None
        answered = record[spec.primary_key]  # an integer: the checker has seen to it
        if answered != key:
            raise ApiResponseError(
                spec.name, path, {}, f"asked for {spec.primary_key} {key}, the API answered the record of {spec.primary_key} {answered}"
            )
        return OneRecord(key, record, body, frozenset(unknown))

    def read_records(self, spec: ResourceSpec, keys: Sequence[int], concurrency: int = RECORD_CONCURRENCY) -> Iterator[OneRecord]:
        """Each of ``keys`` read by a request of its own (``get_record``), ``concurrency`` at most
        in flight, each paced by the rate limiter as any request is; yielded as they come.

        The first failure stops the read: the requests not yet sent are dropped and the error is
        raised. A wrong base URL answers 404 to everything, which would mark every key gone: so
        when every answer was a 404, the list's newest record is read by its key too (two
        requests more, only then), and unless that one is found, ``ApiAccessError`` or
        ``ApiResponseError`` says the API does not serve the records by key at this address."""
        if not 1 <= concurrency <= MAX_RECORD_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_RECORD_CONCURRENCY}, got {concurrency}")
        waiting = iter(keys)
        answered = gone = 0
        with self._page_fetcher(spec, concurrency) as fetcher:
            pending = {fetcher.submit(self.get_record, spec, key) for key in itertools.islice(waiting, concurrency)}
            try:
                while pending:
                    for future in self._wait_any(pending):
                        pending.discard(future)
                        one = future.result()
                        answered, gone = answered + 1, gone + one.gone
                        following = next(waiting, None)
                        if following is not None:
                            pending.add(fetcher.submit(self.get_record, spec, following))
                        yield one
            finally:
                for future in pending:
                    future.cancel()
        if answered and gone == answered:
            self._check_records_served(spec, answered)

    def _check_records_served(self, spec: ResourceSpec, answered: int) -> None:
        """Every record read by key was gone: fine if the list's newest record is found by its
        key (or the list is empty); otherwise the API does not serve them at this address."""
        query: dict[str, object] = {"limit": MIN_PAGE_SIZE, "order": "desc"} if spec.paginated else {}
        said = f"every one of the {answered} {spec.name} read by {spec.primary_key} answered HTTP 404"
        try:
            listed = self.get_page(spec, query)
        except ApiAccessError as error:
            raise ApiAccessError(
                spec.name, error.path, error.query, error.status, f"{said}, and so does the list: {error.problem}",
                base_url=error.base_url, settings=error.settings,
            ) from None  # fmt: skip
        if not listed.items:
            return
        newest = listed.items[0][spec.primary_key]
        if self.get_record(spec, newest).gone:
            path = urlsplit(f"{self.base_url}{spec.path}/{newest}").path
            raise ApiResponseError(
                spec.name,
                path,
                {},
                f"HTTP 404: {said}, and so does {spec.primary_key} {newest}, which the list holds: the API does not serve"
                f" {spec.name} by {spec.primary_key} at this address, so none is taken as gone. Check the base URL"
                f" ({self.settings.base_url}: {shown_url(self.base_url)})",
            )

    def _get(
        self, spec: ResourceSpec, path: str, query: Mapping[str, object], number: int, endpoint: str | None = None
    ) -> tuple[bytes, str]:
        """The body of a successful answer and its content type, read whole within the
        deadline and size bounds. ``endpoint``: the path after the base URL (default: the
        resource's list; page ``number`` then names the answer in errors)."""
        what = f"page {number}" if endpoint is None else "the answer"
        response, body = self._send("GET", spec.name, path, self.base_url + (endpoint or spec.path), query, what)
        _raise_for_status(spec.name, path, query, response, body, self._headers["X-API-Key"], self._settings)
        return body, response.headers.get("Content-Type", "")

    def list_webhooks(self) -> WebhookList:
        """The account's webhooks (``GET /api/webhooks``, which takes no parameters)."""
        path = urlsplit(self.base_url + WEBHOOKS_PATH).path
        answer = self._webhooks_call("GET", path)
        return _read_webhook_list(path, answer)

    def create_webhook(self, name: str, url: str, secret: str, events: Sequence[str]) -> Webhook:
        """Create a webhook delivering ``events`` to ``url``, signed with ``secret``; the webhook
        the API answers. Sent once, never retried on an answer (a retry could make two); the
        secret is in no error, whatever the server echoes."""
        path = urlsplit(self.base_url + WEBHOOKS_PATH).path
        payload = {"name": name, "url": url, "secret": secret, "subscriptions": list(events), "active": True}
        try:
            answer = self._webhooks_call("POST", path, payload, secret=secret)
        except ApiError as error:
            _mask(error, secret, f"[{WEBHOOK_SECRET_ENV}]")
            raise
        return _read_webhook(path, "POST", answer, "the created webhook")

    def _webhooks_call(self, method: str, path: str, payload: Mapping[str, object] | None = None, secret: str = "") -> Any:
        """The JSON of a successful answer to ``method`` on the webhooks endpoint."""
        key = self._headers["X-API-Key"]
        try:
            response, body = self._send(method, "webhooks", path, self.base_url + WEBHOOKS_PATH, {}, "the answer", payload)
            _raise_for_webhooks_status(method, path, response.status_code, body, key, secret, self._settings)
        except ApiError as error:
            _mask(error, key, self._key_mask)
            raise
        try:
            return json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError):
            raise ApiResponseError(
                "webhooks", path, {}, f"HTTP {response.status_code}, but the body is not JSON ({len(body)} bytes)", method=method
            ) from None

    def _send(
        self,
        method: str,
        resource: str,
        path: str,
        url: str,
        query: Mapping[str, object],
        what: str,
        payload: Mapping[str, object] | None = None,
    ) -> tuple[requests.Response, bytes]:
        """One request and its whole answer (whatever its status), within the deadline and
        size bounds. Only a GET follows a redirect (within the API's origin): a request with
        a body is not sent on, since its body may carry a secret."""
        self._check_stop()
        self.stats.count_request()
        with self._deadlines.bound(self.read_timeout) as bound:
            try:
                params = cast("Mapping[str, str | int] | None", query)
                for _ in range(MAX_REDIRECTS + 1):
                    with self._session.request(
                        method, url, params=params, json=payload, timeout=self.timeout, stream=True, allow_redirects=False
                    ) as response:
                        target = redirect_target(response)
                        if target is None:
                            body = read_body(response, self.max_page_bytes)
                            bound.finish()
                            break
                    if method != "GET":
                        raise ApiResponseError(
                            resource,
                            path,
                            query,
                            f"HTTP {response.status_code}: a redirect to {shown_url(target)}; a {method} is not sent on,"
                            f" its body may hold a secret: check the base URL ({self.settings.base_url})",
                            method=method,
                        )
                    refusal = off_origin(target, response.url)
                    if refusal is not None:
                        raise ApiError(resource, path, query, refusal, method=method)
                    url, params = target, None  # the Location carries the query it wants
                else:
                    raise ApiResponseError(
                        resource, path, query, f"more than {MAX_REDIRECTS} redirects; refusing to follow more", method=method
                    )
            except WaitTooLong as error:
                raise ApiStatusError(resource, path, query, error.status, str(error), method=method) from None
            except AnswerTooLarge as error:
                raise ApiResponseError(resource, path, query, f"{what}: {error}", method=method) from None
            except requests.exceptions.RequestException as error:
                self._check_stop()  # cut because the run stopped: not the server's doing
                if bound.expired:
                    raise self._timed_out(resource, path, query, method) from None
                if isinstance(error, requests.exceptions.RetryError):
                    problem = f"retries exhausted: {_cause(error)}"
                elif isinstance(error, requests.exceptions.Timeout):
                    problem = f"timed out: {_cause(error)}"
                else:
                    problem = f"no complete answer: {_cause(error)}"
                raise ApiConnectionError(resource, path, query, problem, method=method) from None
            if bound.expired:
                self._check_stop()
                # The watchdog cut an answer whose end the server never marked: it is cut short.
                raise self._timed_out(resource, path, query, method)
        return response, body

    @property
    def _settings(self) -> _Settings:
        return _Settings(self.key_setting, self.settings, self.base_url)

    def _check_stop(self) -> None:
        if self._stop is not None:
            self._stop.check()

    def _timed_out(self, resource: str, path: str, query: Mapping[str, object], method: str) -> ApiConnectionError:
        return ApiConnectionError(
            resource,
            path,
            query,
            f"timed out: no complete answer (headers and body) within read_timeout"
            f" ({self.read_timeout:g} s) of sending the request",
            method=method,
        )


def _mask(error: ApiError, secret: str, mask: str) -> None:
    """Replace ``secret`` wherever ``error`` says it, in place (keeping its type and traceback).
    A key shorter than any real one (a simulator's "k") is left alone: masked, it garbles words."""
    if len(secret) < MIN_MASKED_KEY_CHARACTERS:
        return
    if secret in error.problem or any(secret in str(argument) for argument in error.args):
        error.problem = error.problem.replace(secret, mask)
        error.args = tuple(str(argument).replace(secret, mask) for argument in error.args)
        if isinstance(error, ApiValidationError):
            error.violations = [
                {name: str(value).replace(secret, mask) if isinstance(value, str) else value for name, value in violation.items()}
                for violation in error.violations
            ]


@dataclass(frozen=True)
class _Settings:
    """The settings an error about an answer names, and the base URL it went to."""

    key: str
    names: SettingNames
    base_url: str


def _cause(error: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, which is what a user can act on."""
    reason: BaseException = error
    while True:
        inner = getattr(reason, "reason", None) or (reason.args[0] if reason.args else None)
        if not isinstance(inner, BaseException) or inner is reason:
            break
        reason = inner
    return f"{type(reason).__name__}: {reason}"


def _raise_for_status(
    resource: str,
    path: str,
    query: Mapping[str, object],
    response: requests.Response,
    body: bytes,
    key: str,
    settings: _Settings,
) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403, 404):
        # Judged on the body as sent: a detail holding a piece of the key is not quoted at all.
        detail = problem_detail(body, key)
        # As a JSON string: a detail holding a quote cannot be mistaken for the end of it.
        said = f" (the API said {json.dumps(detail, ensure_ascii=False)})" if detail else ""
        leave_out = (
            f"Leave {resource} out by listing the resources to sync in {settings.names.resources}"
            f" ({settings.names.resources_form})"
        )
        if status == 401:
            raise ApiAuthError(
                resource,
                path,
                query,
                f"HTTP 401: the API key was rejected{said}; set {settings.key} to a valid key"
                " (made in the account's profile settings)",
            )
        if status == 403:
            # The key got past authentication: the account (its plan, say) cannot read this one
            # list, which blaming the key would have the user rotate a working key over.
            problem = f"HTTP 403: the account cannot read {resource}{said}; the key is not at fault, so keep it. {leave_out}"
        else:
            # A server may route before it authenticates: a 404 clears neither the key nor the URL.
            problem = (
                f"HTTP 404: the account cannot read {resource}, or the API serves nothing at this address{said}."
                f" {leave_out}, or, if every resource answers 404, check the base URL ({settings.names.base_url})"
            )
        raise ApiAccessError(
            resource, path, query, status, problem, base_url=shown_url(settings.base_url), settings=settings.names,
        )  # fmt: skip
    mask = f"[{settings.key}]"
    parsed = _json_or_none(body)
    if status == 422 and isinstance(parsed, dict):
        violations = parsed.get("violations")
        raise ApiValidationError(
            resource,
            path,
            query,
            [_masked_violation(v, key, mask) for v in violations if isinstance(v, dict)] if isinstance(violations, list) else [],
            without_key(str(parsed.get("detail") or ""), key, mask),
        )
    detail = parsed.get("detail") or parsed.get("title") if isinstance(parsed, dict) else None
    excerpt = _excerpt(str(detail) if detail else body[:_EXCERPT_SOURCE].decode("utf-8", "replace"), 200, key, mask)
    retried = " after retries" if status in RETRY_STATUSES else ""
    raise ApiStatusError(resource, path, query, status, f"HTTP {status}{retried}: {excerpt}")


# How much of a text is masked before its excerpt is cut: a key cut where the excerpt ends is
# masked too, so not even its start is quoted.
_EXCERPT_SOURCE = 1000


def _excerpt(text: str, length: int, key: str, mask: str) -> str:
    return without_key(text[:_EXCERPT_SOURCE], key, mask)[:length]


def _masked_violation(violation: dict[str, object], key: str, mask: str) -> dict[str, object]:
    return {name: without_key(value, key, mask) if isinstance(value, str) else value for name, value in violation.items()}


def shown_url(url: str) -> str:
    """``url`` fit for an error: no user name or password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def problem_detail(body: bytes, key: str = "") -> str | None:
    """The ``detail`` (else ``title``) of a JSON problem body, as one short line fit to quote
    in an error: None for a body that is not one, or whose text could hold the key."""
    parsed = _json_or_none(body)
    if not isinstance(parsed, dict):
        return None
    text = parsed.get("detail") or parsed.get("title")
    if not isinstance(text, str):
        return None
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    # A server echoing what it was sent could quote the key, whole or in part.
    if key_pieces(line, key):
        return None
    if len(line) > MAX_DETAIL_CHARS:
        line = line[: MAX_DETAIL_CHARS - 3].rstrip() + "..."
    return line or None


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def _read_page(
    spec: ResourceSpec,
    path: str,
    query: Mapping[str, object],
    number: int,
    content: bytes,
    content_type: str,
    key: str = "",
    mask: str = "",
) -> tuple[list[dict[str, Any]], bool]:
    def fail(problem: str) -> ApiResponseError:
        return ApiResponseError(spec.name, path, query, f"page {number}: {problem}")

    def quoted(server_said: str) -> str:
        return without_key(server_said, key, mask)

    body = _parse_json(content, content_type, fail, key, mask)
    if not isinstance(body, dict):
        raise fail(f"expected a JSON object with 'items' and 'hasMore', got {type(body).__name__}")
    if "items" not in body:
        raise fail(f"the body has no 'items' (keys: {quoted(str(sorted(body)))})")
    items = body["items"]
    if not isinstance(items, list):
        raise fail(f"'items' is {type(items).__name__}, not a list")
    has_more = body.get("hasMore")
    if not isinstance(has_more, bool):
        raise fail(f"'hasMore' is missing or not a boolean (got {quoted(repr(has_more))})")
    limit = query.get("limit")
    if isinstance(limit, int) and len(items) > limit:
        raise fail(f"{len(items)} records, more than the {limit} asked for (limit={limit}); refusing the page")
    if has_more and not spec.paginated:
        raise fail(
            f"hasMore is true, but {path} takes no parameters to ask for the rest: the read is"
            " incomplete, so nothing is written and nothing is marked deleted"
        )
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise fail(f"record {position} is {type(item).__name__}, not an object")
    return items, has_more


def _read_record(spec: ResourceSpec, path: str, content: bytes, content_type: str, key: str = "", mask: str = "") -> dict[str, Any]:
    """The one JSON object a record's answer holds (what ``get_record`` then checks)."""

    def fail(problem: str) -> ApiResponseError:
        return ApiResponseError(spec.name, path, {}, problem)

    body = _parse_json(content, content_type, fail, key, mask)
    if not isinstance(body, dict):
        raise fail(f"expected the record as a JSON object, got {type(body).__name__}")
    return body


def _parse_json(content: bytes, content_type: str, fail: Callable[[str], ApiResponseError], key: str, mask: str) -> Any:
    """An answer's JSON body; ``fail(problem)`` raised for one nested too deep, not JSON (its
    start quoted, the key masked) or cut short."""
    try:
        return json.loads(content, parse_constant=_not_json)
    except RecursionError:
        raise fail(f"the JSON body nests deeper than it can be parsed ({len(content)} bytes)") from None
    except ValueError as error:
        excerpt = _excerpt(content[:_EXCERPT_SOURCE].decode("utf-8", "replace").replace("\n", " "), 80, key, mask)
        if "json" not in content_type.lower():
            raise fail(f"expected JSON, got {without_key(content_type, key, mask) or 'no content type'}: {excerpt!r}") from None
        raise fail(f"the JSON body does not parse ({error}; {len(content)} bytes, cut short?)") from None


def _not_json(constant: str) -> None:
    # Python reads NaN and Infinity, which JSON (and DuckDB's JSON columns) do not allow.
    raise ValueError(f"{constant} is not a JSON value")


def _check_order(spec: ResourceSpec, path: str, query: Mapping[str, object], number: int, items: list[dict[str, Any]]) -> None:
    """Each record's cursor strictly past the previous one's in the order asked for.

    The walk takes the last record's cursor for the next request and, from both ends, trusts
    the order to know what the other end has read: a page out of order could lose records.
    """
    order = query.get("order", "desc")
    field = spec.cursor_field
    previous: int | None = None
    for position, item in enumerate(items, start=1):
        value = item.get(field)
        if type(value) is not int:
            raise ApiResponseError(
                spec.name, path, query, f"page {number}: record {position} has no integer {field!r} to page by (got {value!r})"
            )
        if previous is not None and not (value > previous if order == "asc" else value < previous):
            raise ApiResponseError(
                spec.name,
                path,
                query,
                f"page {number}: records out of {order} order: record {position} has {field} {value}"
                f" after {previous}; stopping rather than risk losing records",
            )
        previous = value


@dataclass
class WalkFrontiers:
    """How far each end of a two-ended walk has read, so that no record is kept by both.

    ``low`` is the highest key kept from the ascending end, ``high`` the lowest key the
    descending end has seen and ``top`` where it started (the newest record then).
    The ascending end drops keys in [high, top]; the descending end drops keys up to low.
    The ends have met once either drops a record, or the descending end reaches the bottom.
    Every page's keys are integers in the order asked for (the client checks that), but a
    page may repeat records before its cursor: those are kept (the later copy wins in the
    merge) and move no frontier, so an answer out of place cannot hide unread records.
    """

    low: int | None = None
    high: int | None = None
    top: int | None = None
    met: bool = False

    def keep_ascending(self, items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        kept = []
        for item in items:
            value: int = item[key]
            if self.high is not None and self.top is not None and self.high <= value <= self.top:
                self.met = True
                continue
            self.low = value if self.low is None else max(self.low, value)
            kept.append(item)
        return kept

    def keep_descending(self, items: list[dict[str, Any]], key: str, has_more: bool) -> list[dict[str, Any]]:
        kept = []
        for item in items:
            value: int = item[key]
            if self.top is None:
                self.top = value
            if value <= self.top:
                self.high = value if self.high is None else min(self.high, value)
            if self.low is not None and value <= self.low:
                self.met = True
                continue
            kept.append(item)
        if not has_more:
            self.met = True  # the descending end read down to the oldest record
        return kept

    def ascending_query(self, following: dict[str, object]) -> dict[str, object]:
        """After the ends met, skip what the descending end kept: continue past its top."""
        cursor = following.get("startingAfter")
        if self.met and self.top is not None and isinstance(cursor, int) and cursor < self.top:
            return {**following, "startingAfter": self.top}
        return following


def _with_items(page: Page, items: list[dict[str, Any]]) -> Page:
    """``page`` holding only ``items``, its body re-encoded to match (the stager keeps bodies)."""
    body = json.dumps({"items": items, "hasMore": page.has_more}, ensure_ascii=False).encode()
    return replace(page, items=items, body=body)


# ---------------------------------------------------------------------- webhooks

WEBHOOKS_PATH = "/webhooks"
# The webhooks' own texts (names, URLs) are shown to a user: this long at most in an error.
_SHOWN_CHARACTERS = 80


@dataclass(frozen=True)
class WebhookSubscription:
    """One event a webhook delivers, and whether (and why) the platform switched it off."""

    event: str
    disabled_at: str | None = None
    disabled_reason: str | None = None


@dataclass(frozen=True)
class Webhook:
    """A webhook as the API lists it (its secret is never sent back)."""

    id: str
    name: str
    url: str
    active: bool
    subscriptions: tuple[WebhookSubscription, ...]

    @property
    def events(self) -> tuple[str, ...]:
        return tuple(subscription.event for subscription in self.subscriptions)


@dataclass(frozen=True)
class WebhookList:
    """The webhooks of the account. ``complete`` is False when the API said more follow
    (``hasMore``), which it gives no way to ask for: a webhook may be missing."""

    webhooks: tuple[Webhook, ...]
    complete: bool


def _raise_for_webhooks_status(
    method: str, path: str, status: int, body: bytes, key: str, secret: str, settings: _Settings
) -> None:
    if 200 <= status < 300:
        return
    # Quoted only when it holds no piece of the key nor of the secret (a server echoing the request).
    detail = problem_detail(body, key)
    if detail is not None and secret and key_pieces(detail, secret):
        detail = None
    said = f" (the API said {json.dumps(detail, ensure_ascii=False)})" if detail else ""
    if status == 401:
        raise ApiAuthError(
            "webhooks", path, {}, f"HTTP 401: the API key was rejected{said}; set {settings.key} to a valid key", method=method
        )
    if status == 403:
        problem = f"HTTP 403: the account may not manage webhooks{said}; the key is not at fault"
    elif status == 404:
        problem = f"HTTP 404: the API serves no webhooks at this address{said}; check the base URL ({settings.names.base_url}: {shown_url(settings.base_url)})"
    elif status == 422 or status == 400:
        parsed = _json_or_none(body)
        violations = parsed.get("violations") if isinstance(parsed, dict) else None
        if isinstance(violations, list):
            masked = [_masked_violation(_masked_violation(v, key, f"[{settings.key}]"), secret, f"[{WEBHOOK_SECRET_ENV}]")
                      for v in violations if isinstance(v, dict)]  # fmt: skip
            raise ApiValidationError("webhooks", path, {}, masked, detail or "", method=method)
        problem = f"HTTP {status}: the API refused the request{said or ' without saying why'}"
    else:
        retried = " after retries" if status in RETRY_STATUSES and method == "GET" else ""
        problem = f"HTTP {status}{retried}{said}"
    raise ApiStatusError("webhooks", path, {}, status, problem, method=method)


def _read_webhook_list(path: str, answer: Any) -> WebhookList:
    def fail(problem: str) -> ApiResponseError:
        return ApiResponseError("webhooks", path, {}, problem)

    if not isinstance(answer, dict):
        raise fail(f"expected a JSON object with 'items', got {type(answer).__name__}")
    items = answer.get("items")
    if not isinstance(items, list):
        raise fail("the body has no list of 'items'")
    has_more = answer.get("hasMore", False)
    if not isinstance(has_more, bool):
        raise fail(f"'hasMore' is not a boolean (got {type(has_more).__name__})")
    webhooks = tuple(_read_webhook(path, "GET", item, f"webhook {position}") for position, item in enumerate(items, start=1))
    return WebhookList(webhooks, complete=not has_more)


def _read_webhook(path: str, method: str, item: Any, what: str) -> Webhook:
    """A webhook from the API, every field exactly of its type (an id as a string, or an
    integer written as one), else an error naming the field, quoting no text of the server's."""

    def fail(problem: str) -> ApiResponseError:
        return ApiResponseError("webhooks", path, {}, f"{what}: {problem}", method=method)

    if not isinstance(item, dict):
        raise fail(f"is {type(item).__name__}, not an object")
    identifier = item.get("id")
    if type(identifier) is int:
        identifier = str(identifier)
    if not isinstance(identifier, str) or not identifier:
        raise fail("has no id")
    texts = {}
    for field_name in ("name", "url"):
        value = item.get(field_name, "")
        if not isinstance(value, str):
            raise fail(f"its {field_name!r} is {type(value).__name__}, not a text")
        texts[field_name] = value
    active = item.get("active", True)
    if not isinstance(active, bool):
        raise fail(f"its 'active' is {type(active).__name__}, not a boolean")
    raw_subscriptions = item.get("subscriptions", [])
    if not isinstance(raw_subscriptions, list):
        raise fail("its 'subscriptions' is not a list")
    subscriptions = []
    for position, raw in enumerate(raw_subscriptions, start=1):
        # The spec lists subscriptions as objects; the request that creates them, as event names.
        if isinstance(raw, str):
            subscriptions.append(WebhookSubscription(raw))
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("event"), str):
            raise fail(f"subscription {position} has no event name")
        optional = {name: raw.get(name) for name in ("disabledAt", "disabledReason")}
        for name, value in optional.items():
            if value is not None and not isinstance(value, str):
                raise fail(f"subscription {position}'s {name!r} is {type(value).__name__}, not a text")
        subscriptions.append(WebhookSubscription(raw["event"], optional["disabledAt"], optional["disabledReason"]))
    return Webhook(identifier, texts["name"], texts["url"], active, tuple(subscriptions))
