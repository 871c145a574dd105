"""HTTP client for the marketing API: authentication, retries, cursor pagination.

Knows HTTP and the API's page format, nothing of Dagster or DuckDB. Pages are yielded
as they arrive so a caller can stream them to disk; nothing here collects records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class RequestStats:
    """What the retry layer met, shared by every request of one client."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    statuses: dict[int, int] = field(default_factory=dict)
    paced_seconds: float = 0.0  # waited for the rate-limit window to refill


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
        response = kwargs.get("response")
        status = getattr(response, "status", None)
        self.stats.retries += 1
        if status is not None:
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            if status == 429:
                self.stats.throttled += 1
        return super().increment(*args, **kwargs)


class _PacedAdapter(HTTPAdapter):
    """Holds each request until the shared quota allows it, and reports each answer's quota."""

    def __init__(self, limiter: SharedRateLimiter, stats: RequestStats, **kwargs: Any) -> None:
        self._limiter = limiter
        self._stats = stats
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self._stats.paced_seconds += self._limiter.acquire()
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
        order: str = "asc",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_retries: int = 3,
        backoff_factor: float = 2.0,
        key_setting: str = "api_key",
        rate_limiter: SharedRateLimiter | None = None,
    ) -> None:
        if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, got {page_size}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.order = order
        self.timeout = (connect_timeout, read_timeout)
        self.key_setting = key_setting
        self.stats = RequestStats()
        self._rate_limiter = rate_limiter
        retry = _CountingRetry(
            total=max_retries,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            backoff_factor=backoff_factor,
            respect_retry_after_header=True,
            # Hand the last answer back instead of raising, so the error can say what it was.
            raise_on_status=False,
            stats=self.stats,
        )
        self._session = _OriginBoundSession()
        adapter = (
            _PacedAdapter(rate_limiter, self.stats, max_retries=retry)
            if rate_limiter is not None
            else HTTPAdapter(max_retries=retry)
        )
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers.update(
            {"X-API-Key": api_key, "Accept": "application/json", "User-Agent": "mkt-assets"}
        )

    def __repr__(self) -> str:
        return f"MarketingApiClient(base_url={self.base_url!r}, page_size={self.page_size})"

    def __enter__(self) -> MarketingApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()
        if self._rate_limiter is not None:
            self._rate_limiter.close()

    def url_path(self, spec: ResourceSpec) -> str:
        return urlsplit(self.base_url + spec.path).path

    def first_query(self, spec: ResourceSpec) -> dict[str, object]:
        if not spec.paginated:
            return {}
        return {"limit": self.page_size, "order": self.order}

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
        """Every page of ``spec``, in order, as each arrives.

        The next page is requested as soon as this one is parsed (its cursor is known then),
        so the caller stages a page while the API prepares the next one. One request is in
        flight at a time, as without the overlap; the rate limiter paces it the same way.
        """
        current: dict[str, object] = {**self.first_query(spec), **(query or {})}
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

    def get_page(self, spec: ResourceSpec, query: Mapping[str, object], number: int = 1) -> Page:
        path = self.url_path(spec)
        response = self._get(spec, path, query)
        items, has_more = _read_page(spec.name, path, query, number, response)
        return Page(spec.name, number, path, dict(query), items, has_more, response.content)

    def _get(self, spec: ResourceSpec, path: str, query: Mapping[str, object]) -> requests.Response:
        self.stats.requests += 1
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
