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
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from mkt_assets.catalog import ResourceSpec
from mkt_assets.errors import (
    ApiAuthError,
    ApiConnectionError,
    ApiError,
    ApiResponseError,
    ApiStatusError,
    ApiValidationError,
    PaginationError,
)
from mkt_assets.ratelimit import SharedRateLimiter

RETRY_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})
MAX_PAGE_SIZE = 100
MIN_PAGE_SIZE = 10
# Walk orders: one cursor ascending, one descending, or both at once meeting in the middle.
ORDERS = ("asc", "desc", "both")


@dataclass
class RequestStats:
    """What the retry layer met, shared by every request of one client (and its threads)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    statuses: dict[int, int] = field(default_factory=dict)
    paced_seconds: float = 0.0  # waited for the rate-limit window to refill
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


class _CountingRetry(Retry):
    """urllib3's Retry, honouring Retry-After on every retried status and counting retries.

    urllib3 only honours Retry-After on 413/429/503; a 502 or 504 that says when to come
    back should be believed too.
    """

    RETRY_AFTER_STATUS_CODES = RETRY_STATUSES

    def __init__(self, *args: Any, stats: RequestStats | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats if stats is not None else RequestStats()

    def new(self, **kw: Any) -> _CountingRetry:
        kw.setdefault("stats", self.stats)
        return super().new(**kw)

    def increment(self, *args: Any, **kwargs: Any) -> _CountingRetry:
        self.stats.count_retry(getattr(kwargs.get("response"), "status", None))
        return super().increment(*args, **kwargs)


class _PacedAdapter(HTTPAdapter):
    """Holds each request until the shared quota allows it, and reports each answer's quota."""

    def __init__(self, limiter: SharedRateLimiter, stats: RequestStats, **kwargs: Any) -> None:
        self._limiter = limiter
        self._stats = stats
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self._stats.count_pacing(self._limiter.acquire())
        response = super().send(request, *args, **kwargs)
        self._limiter.observe(response.headers)
        return response


class OffOriginRedirect(requests.exceptions.InvalidURL):
    """A redirect to another origin: following it would send the key there."""


class _OriginBoundSession(requests.Session):
    """A session that refuses to follow a redirect off the API's origin.

    requests drops ``Authorization`` on such redirects but forwards custom headers
    like ``X-API-Key``; refusing is the only safe answer for a key in a custom header.
    """

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        target, source = _origin(prepared_request.url or ""), _origin(response.request.url or "")
        if target != source:
            raise OffOriginRedirect(
                f"the API redirected to another origin ({target}, not {source});"
                " refusing to follow it with the API key"
            )
        super().rebuild_auth(prepared_request, response)


def _origin(url: str) -> str:
    """``scheme://host:port`` with the default port spelled out, so equal origins compare equal."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


@dataclass(frozen=True)
class Page:
    """One page of one resource as the API sent it."""

    resource: str
    number: int  # 1-based
    path: str
    query: Mapping[str, object]
    items: list[dict[str, Any]]
    has_more: bool
    body: bytes  # the raw JSON, so a stager can hand it to DuckDB without re-encoding


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
        key_setting: str = "api_key",
        rate_limiter: SharedRateLimiter | None = None,
    ) -> None:
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, got {page_size}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.order = order
        self.timeout = (connect_timeout, read_timeout)
        self.key_setting = key_setting
        self.stats = RequestStats()
        self._rate_limiter = rate_limiter
        self._retry = _CountingRetry(
            total=max_retries,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            backoff_factor=backoff_factor,
            respect_retry_after_header=True,
            # Hand the last answer back instead of raising, so the error can say what it was.
            raise_on_status=False,
            stats=self.stats,
        )
        self._headers = {"X-API-Key": api_key, "Accept": "application/json", "User-Agent": "mkt-assets"}
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
        session = _OriginBoundSession()
        adapter = (
            _PacedAdapter(self._rate_limiter, self.stats, max_retries=self._retry)
            if self._rate_limiter is not None
            else HTTPAdapter(max_retries=self._retry)
        )
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
        cursor = page.items[-1].get(spec.cursor_field)
        if isinstance(cursor, bool) or not isinstance(cursor, int):
            raise PaginationError(
                spec.name,
                page.path,
                page.query,
                f"page {page.number}: the last record (position {len(page.items)}) has no integer"
                f" {spec.cursor_field!r}"
                f" to continue from (got {cursor!r})",
            )
        previous = query.get("startingAfter")
        order = query.get("order", self.order)
        if previous is not None:
            advanced = cursor > previous if order == "asc" else cursor < previous  # type: ignore[operator]
            if not advanced:
                raise PaginationError(
                    spec.name,
                    page.path,
                    page.query,
                    f"page {page.number}: the cursor did not advance ({spec.cursor_field} {cursor} after {previous} in"
                    f" {order} order); stopping instead of looping",
                )
        return {**query, "startingAfter": cursor}

    def iter_pages(self, spec: ResourceSpec, query: Mapping[str, object] | None = None) -> Iterator[Page]:
        """Every page of ``spec`` as each arrives; with ``order="both"``, from both ends at once.

        A two-ended walk (a full read) yields the pages of both ends interleaved, numbered in
        the order they were requested, each holding only the records the other end has not kept.
        """
        start: dict[str, object] = {**self.first_query(spec), **(query or {})}
        # A read that starts after a cursor (an incremental one) is short: one ascending walk
        # then keeps to ceil(k / page size) + 1 requests for k new records.
        if spec.paginated and self.order == "both" and start.get("order") == "asc" and "startingAfter" not in start:
            return self._walk_from_both_ends(spec, start)
        return self._walk(spec, start)

    def _walk(self, spec: ResourceSpec, current: dict[str, object]) -> Iterator[Page]:
        """One cursor, page after page.

        The next page is requested as soon as this one is parsed (its cursor is known then),
        so the caller stages a page while the API prepares the next one. One request is in
        flight at a time, as without the overlap; the rate limiter paces it the same way.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.name}-pages") as fetcher:
            pending: Future[Page] | None = fetcher.submit(self.get_page, spec, current, 1)
            try:
                while pending is not None:
                    page = pending.result()
                    following = self.next_query(spec, current, page)
                    pending = None
                    if following is not None:
                        pending = fetcher.submit(self.get_page, spec, following, page.number + 1)
                        current = following
                    yield page
            finally:
                # The caller stopped early: drop a request not yet sent (leaving the block
                # waits for one already on the wire, so the session is never used after close).
                if pending is not None:
                    pending.cancel()

    def _walk_from_both_ends(self, spec: ResourceSpec, ascending: dict[str, object]) -> Iterator[Page]:
        """An ascending and a descending cursor at once, until they meet.

        The descending end starts once the first ascending page says more follow (a list of
        one page costs one request, as before). Once the ends meet, the ascending end jumps
        past the records the descending one kept and reads on to the end of the list, so
        records created during the walk are read, as by a single ascending walk. That costs
        at most three requests more than a single walk: an answer of each end that arrives
        after the other end has read its records (dropped), and the ascending end's look
        past where the descending one started.
        """
        frontiers = WalkFrontiers()
        descending = {**ascending, "order": "desc"}
        numbers = itertools.count(1)
        pending: dict[Future[Page], dict[str, object]] = {}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{spec.name}-pages") as fetcher:

            def request(query: dict[str, object]) -> None:
                pending[fetcher.submit(self.get_page, spec, query, next(numbers))] = query

            request(ascending)
            descending_started = False
            try:
                while any(query["order"] == "asc" for query in pending.values()):
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
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
                                if not descending_started:
                                    request(descending)
                                    descending_started = True
                        else:
                            kept = frontiers.keep_descending(page.items, spec.cursor_field, page.has_more)
                            if following is not None and not frontiers.met:
                                request(following)
                        if len(kept) < len(page.items):
                            page = _with_items(page, kept)
                        if kept or page.number == 1:
                            yield page
            finally:
                # Done, or the caller stopped early: drop requests not yet sent (leaving the block
                # waits for those on the wire, so no session is used after close).
                for future in pending:
                    future.cancel()

    def get_page(self, spec: ResourceSpec, query: Mapping[str, object], number: int = 1) -> Page:
        path = self.url_path(spec)
        response = self._get(spec, path, query)
        items, has_more = _read_page(spec.name, path, query, number, response)
        return Page(spec.name, number, path, dict(query), items, has_more, response.content)

    def _get(self, spec: ResourceSpec, path: str, query: Mapping[str, object]) -> requests.Response:
        self.stats.count_request()
        try:
            response = self._session.get(self.base_url + spec.path, params=query, timeout=self.timeout)
        except OffOriginRedirect as error:
            raise ApiError(spec.name, path, query, str(error)) from None
        except requests.exceptions.RetryError as error:
            raise ApiConnectionError(spec.name, path, query, f"retries exhausted: {_cause(error)}") from None
        except requests.exceptions.Timeout as error:
            raise ApiConnectionError(spec.name, path, query, f"timed out: {_cause(error)}") from None
        except requests.exceptions.RequestException as error:
            raise ApiConnectionError(spec.name, path, query, f"no complete answer: {_cause(error)}") from None
        _raise_for_status(spec.name, path, query, response, self.key_setting)
        return response


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
    resource: str, path: str, query: Mapping[str, object], response: requests.Response, key_setting: str
) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise ApiAuthError(
            resource,
            path,
            query,
            f"HTTP {status}: the API key was rejected; set {key_setting} to a valid key"
            " (made in the account's profile settings)",
        )
    body = _json_or_none(response.content)
    if status == 422 and isinstance(body, dict):
        violations = body.get("violations")
        raise ApiValidationError(
            resource,
            path,
            query,
            [v for v in violations if isinstance(v, dict)] if isinstance(violations, list) else [],
            str(body.get("detail") or ""),
        )
    detail = body.get("detail") or body.get("title") if isinstance(body, dict) else None
    excerpt = str(detail) if detail else response.text[:200]
    retried = " after retries" if status in RETRY_STATUSES else ""
    raise ApiStatusError(resource, path, query, status, f"HTTP {status}{retried}: {excerpt}")


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _read_page(
    resource: str, path: str, query: Mapping[str, object], number: int, response: requests.Response
) -> tuple[list[dict[str, Any]], bool]:
    def fail(problem: str) -> ApiResponseError:
        return ApiResponseError(resource, path, query, f"page {number}: {problem}")

    content_type = response.headers.get("Content-Type", "")
    try:
        body = json.loads(response.content)
    except ValueError as error:
        excerpt = response.text[:80].replace("\n", " ")
        if "json" not in content_type.lower():
            raise fail(f"expected JSON, got {content_type or 'no content type'}: {excerpt!r}") from None
        raise fail(
            f"the JSON body does not parse ({error}; {len(response.content)} bytes, cut short?)"
        ) from None
    if not isinstance(body, dict):
        raise fail(f"expected a JSON object with 'items' and 'hasMore', got {type(body).__name__}")
    if "items" not in body:
        raise fail(f"the body has no 'items' (keys: {sorted(body)})")
    items = body["items"]
    if not isinstance(items, list):
        raise fail(f"'items' is {type(items).__name__}, not a list")
    has_more = body.get("hasMore")
    if not isinstance(has_more, bool):
        raise fail(f"'hasMore' is missing or not a boolean (got {has_more!r})")
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise fail(f"record {position} is {type(item).__name__}, not an object")
    return items, has_more


@dataclass
class WalkFrontiers:
    """How far each end of a two-ended walk has read, so that no record is kept by both.

    ``low`` is the highest key kept from the ascending end, ``high``
    the lowest key the descending end has seen and ``top`` the highest, where it started.
    The ascending end drops keys in [high, top]; the descending end drops keys up to low.
    The ends have met once either drops a record, or the descending end reaches the bottom.
    Keys that are not integers are kept: the cursor check and the merge report them.
    """

    low: int | None = None
    high: int | None = None
    top: int | None = None
    met: bool = False

    def keep_ascending(self, items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        kept = []
        for item in items:
            value = _int_or_none(item.get(key))
            if value is not None and self.high is not None and self.top is not None and self.high <= value <= self.top:
                self.met = True
                continue
            if value is not None:
                self.low = value if self.low is None else max(self.low, value)
            kept.append(item)
        return kept

    def keep_descending(self, items: list[dict[str, Any]], key: str, has_more: bool) -> list[dict[str, Any]]:
        kept = []
        for item in items:
            value = _int_or_none(item.get(key))
            if value is not None:
                self.top = value if self.top is None else max(self.top, value)
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


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _with_items(page: Page, items: list[dict[str, Any]]) -> Page:
    """``page`` holding only ``items``, its body re-encoded to match (the stager keeps bodies)."""
    body = json.dumps({"items": items, "hasMore": page.has_more}, ensure_ascii=False).encode()
    return replace(page, items=items, body=body)
