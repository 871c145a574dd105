"""A local HTTP fake of the systeme.io public API (see /work/shared/API.md), with fault injection.

It serves the five synced resources of a ``SandboxData`` account and its two relation
collections (community memberships and course enrollments, with their id filters) with the real
API's authentication, cursor pagination, validation errors and rate-limit headers, and can be
told to misbehave (``Fault``) in the ways a client must survive: error statuses, broken bodies,
wrong shapes, records of the wrong type or order, references to records that do not exist,
cursors that do not advance, pages that lie about their length, answers too big or too deep to
swallow whole (gzip bombs included), lying headers, resets, slow and dripping answers, and
redirects. Faults can be set over HTTP too (``/__sandbox/faults``), so a client in another
process can be tested the same way.

It also serves the account's webhooks (``/api/webhooks``, CRUD) and, when the account changes
through it (``add_tag``, ``remove_tag``, ``create_contacts``, ``opt_in``, ``new_sale``,
``cancel_sale``, or ``POST /__sandbox/changes`` from another process), sends signed deliveries to
the webhooks subscribed, with delivery faults of their own (``DeliveryFault``): see
``webhooks.py``.

Standard library only, and independent of the rest of ``mkt_assets`` on purpose: tests of the
real client run against it, so it must not share the client's assumptions.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import http
import json
import math
import os
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from .data import FILTERS, SandboxData
from .faultbook import FaultBook
from .webhooks import (
    AdminAnswer,
    BadInput,
    ChangeResult,
    DeliveryFault,
    DeliveryRecord,
    Invalid,
    UnknownWebhook,
    Webhooks,
    parse_object,
)

Json = Any
Clock = Callable[[], float]

API_PREFIX = "/api"
# What the simulator accepts when it is given no key: not a secret, so its banner prints it.
DEFAULT_SANDBOX_KEY = "sandbox-key"
ADMIN_PREFIX = "/__sandbox"
RESOURCE_PATHS: dict[str, str] = {
    "/api/community/communities": "communities",
    "/api/contacts": "contacts",
    "/api/tags": "tags",
    "/api/contact_fields": "contact_fields",
    "/api/school/courses": "course_resources",
    "/api/community/memberships": "memberships",
    "/api/school/enrollments": "enrollments",
}
# One contact by id: GET /api/contacts/{id}, the object the list holds.
CONTACT_PREFIX = "/api/contacts/"
# How the spec types each relation filter: memberships' are integers; enrollments' are strings,
# of which the sandbox accepts digit strings only (an id; anything else is a 422).
FILTER_TYPES: dict[str, dict[str, str]] = {
    "memberships": {"community": "integer", "contact": "integer"},
    "enrollments": {"course": "string", "contact": "string"},
}
assert {name: tuple(types) for name, types in FILTER_TYPES.items()} == FILTERS, "filters out of step with data.py"
WEBHOOKS_PATH = "/api/webhooks"
# Request bodies (a webhook, a list of changes) above this are refused unread, with a 413.
MAX_REQUEST_BODY = 1024 * 1024
DEFAULT_LIMIT = 10  # what API Platform uses when `limit` is absent
MIN_LIMIT, MAX_LIMIT = 10, 100
# How often serve_forever checks for shutdown: stop() waits up to this long.
POLL_INTERVAL = 0.05
# Without a configured rate limit the headers still advertise a (never reached) quota.
UNLIMITED = (1_000_000, 60.0)

AUTH_ERROR: Json = {"detail": "Full authentication is required to access this resource."}
NOT_FOUND: Json = {"title": "An error occurred", "detail": "Not Found"}
TOO_MANY: Json = {"title": "Too Many Requests"}
HTML_PAGE = (
    "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>systeme.io</title></head>"
    "<body><h1>We'll be right back</h1><p>The site is under maintenance.</p></body></html>"
)

# What a 0 `size` means, per kind that takes one (oversized: a multiple of the requested limit).
OVERSIZED_FACTOR = 10
DEFAULT_SIZES: dict[str, int] = {"big_value": 10 * 1024 * 1024, "deep_json": 10_000, "gzip_bomb": 1 << 30}
# What a gzip_bomb inflates to starts like a page, so only a size cap can tell it apart.
GZIP_BOMB_PREFIX = b'{"items": ['

# Symfony validator codes, as API Platform puts them in `violations[].code`.
RANGE_CODE = "04b91c99-a946-4221-afc5-e65ebac401eb"
CHOICE_CODE = "8e179f1b-97aa-4560-a02f-2a8b42e49df7"
TYPE_CODE = "ba785a8c-82cb-4283-967c-3cf342181b40"
DATETIME_CODE = "1a9da513-2640-4f84-9b6a-4d99dcddc628"

FAULT_KINDS: frozenset[str] = frozenset(
    {
        "status", "truncated", "html", "no_items", "items_not_list", "no_has_more", "missing_id",
        "bad_type", "repeat_cursor", "empty_has_more", "empty", "extra_field", "reset", "delay", "redirect",
        "float_id", "swapped", "big_value", "deep_json", "short_has_more", "repeat_last", "oversized",
        "drip", "drip_body", "gzip_bomb", "headers", "dangling", "hold",
    }
)  # fmt: skip


# ===================================================================== public value types


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    ``path`` restricts it to one API path (None: any); it lets ``after`` matching requests pass
    untouched, then affects the next ``times`` of them (-1: forever). Faults act on requests that
    passed authentication and the rate limit. Kinds:

    - ``status``: answer ``status`` with a JSON error body (+ ``Retry-After`` if ``retry_after``).
    - ``truncated``: 200 whose JSON body is cut in half (Content-Length matches the cut body).
    - ``html``: 200 ``text/html`` maintenance page.
    - ``no_items`` / ``items_not_list`` / ``no_has_more``: 200 JSON of the wrong shape.
    - ``missing_id`` / ``bad_type``: the middle record of the page lacks ``id`` / has ``"abc"``.
    - ``repeat_cursor``: the page ending at ``startingAfter``, so the next cursor equals it.
    - ``empty_has_more``: ``{"items": [], "hasMore": true}``.
    - ``empty``: ``{"items": [], "hasMore": false}``, a well-formed end of the list: an outage
      answering that the account holds nothing.
    - ``extra_field``: every record gets ``"score": 42``.
    - ``reset``: headers and half the body, then a TCP reset.
    - ``delay``: sleep ``delay`` seconds, then answer normally.
    - ``hold``: the answer is made at once, as the account is then, and held until
      ``release_held()`` (or the server stops); ``wait_until_held()`` returns once one is held.
      A test orders two clients with it: one has read, the account changes, the other reads.
    - ``redirect``: 302 to ``location`` + the same path and query.
    - ``float_id``: the middle record's id becomes the previous record's id + 0.5, a JSON number
      such as ``2.5`` (a one-record page: its own id + 0.5; contact_fields, without ids: ``0.5``).
    - ``swapped``: the records at ``len // 2 - 1`` and ``len // 2`` trade places, so ids are out
      of the requested order (pages of fewer than two records are left alone).
    - ``repeat_last``: the page starts with the record whose id is ``startingAfter`` (the last one
      of the previous page), then the page minus its last record: same length, same ``hasMore``.
      Left alone (the fault still counts as fired) without ``startingAfter``, on an empty page,
      or when no live record has that id.
    - ``oversized``: ``size`` records instead of ``limit`` (0: 10 x ``limit``): the page, then
      copies of its records, cycled, with fresh ids one apart continuing the requested order
      (in desc they may reach 0 and below; contact_fields get fresh slugs instead). Fewer than
      ``limit`` if ``size`` is smaller; an empty page stays empty.
    - ``big_value``: the middle record carries a string of ``size`` ASCII ``x`` (0: 10 MiB):
      contacts in their first field's ``value`` (a field is added if they have none),
      contact_fields in ``fieldName``, memberships in ``community.name``, enrollments in
      ``course.name``, the other resources in ``name``.
    - ``deep_json``: the middle record gets ``"deep": [[...]]``, lists ``size`` levels deep
      (0: 10,000); still valid JSON text.
    - ``short_has_more``: the page without its last record, and ``"hasMore": true`` (on any
      resource, contact_fields included).
    - ``drip``: the whole answer, status line included, one byte every ``delay`` seconds (> 0),
      the first at once; it stops when the client goes away or the server stops.
    - ``drip_body``: the status line and headers (with the true Content-Length) at once, then the
      body as ``drip`` sends it.
    - ``gzip_bomb``: 200 ``application/json`` with ``Content-Encoding: gzip``, whose body
      inflates to ``size`` bytes (0: 1 GiB): ``{"items": [`` then spaces. Compressed once per
      size and cached; Content-Length is the compressed length.
    - ``headers``: answer normally, with ``headers`` (required, and only for this kind) set on the
      answer over its own (rate-limit headers included), whatever the case of their names.
    - ``dangling``: the middle record refers to a record the account does not hold, everything
      else valid. Memberships: its ``contact`` becomes ``{"id": next_contact_id}``; enrollments:
      its ``contact`` becomes ``phantom_contact()`` minus fields and tags. That id is above every
      id ever used (never a deleted one): a contact that registered after the contacts were read,
      as ``add_contacts`` would create it. Contacts: the middle contact gets one more tag,
      ``{"id": unused_tag_id, "name": "new-tag-<id>"}``, a tag id no tag has. The other resources
      refer to nothing, so their pages are left alone (the fault still counts as fired); so is
      an empty page.

    Sizes, when 0, resolve as ``effective_size`` says (``DEFAULT_SIZES``, ``OVERSIZED_FACTOR``).
    """

    kind: str
    path: str | None = None
    times: int = 1
    after: int = 0
    status: int = 503
    retry_after: float | None = None
    delay: float = 0.0
    location: str | None = None
    size: int = 0
    # Not hashed: a dict cannot be, and a Fault must stay usable as a set member or dict key.
    headers: dict[str, str] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if self.times < -1:
            raise ValueError(f"times must be -1 (forever) or >= 0, got {self.times}")
        if self.after < 0:
            raise ValueError(f"after must be >= 0, got {self.after}")
        if self.kind == "redirect" and not self.location:
            raise ValueError("a 'redirect' fault needs a location, e.g. 'http://127.0.0.1:9'")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size must be an int >= 0 (0: the kind's default), got {self.size!r}")
        if self.kind in ("drip", "drip_body") and not self.delay > 0:
            raise ValueError(f"a {self.kind!r} fault needs delay > 0 (seconds between bytes), got {self.delay!r}")
        self._check_headers()

    def _check_headers(self) -> None:
        if self.kind != "headers":
            if self.headers is not None:
                raise ValueError(f"headers only go with kind 'headers', not {self.kind!r}")
            return
        if not isinstance(self.headers, dict) or not self.headers:
            raise ValueError("a 'headers' fault needs headers, e.g. {\"X-RateLimit-Remaining\": \"0\"}")
        for name, value in self.headers.items():
            _check_header(name, value)
        # A copy: the caller's dict must not change a fault that is already installed.
        object.__setattr__(self, "headers", dict(self.headers))

    def effective_size(self, limit: int = DEFAULT_LIMIT) -> int:
        """``size``, or what 0 stands for with this kind (``oversized``: 10 x ``limit``)."""
        if self.size:
            return self.size
        if self.kind == "oversized":
            return OVERSIZED_FACTOR * limit
        return DEFAULT_SIZES.get(self.kind, 0)

    @classmethod
    def from_json(cls, obj: Json) -> Fault:
        """Build from a JSON object with the same field names (the admin endpoint's format)."""
        if not isinstance(obj, dict):
            raise ValueError(f"a fault must be a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"unknown fault fields {unknown}; expected some of {sorted(known)}")
        return cls(**obj)


def _check_header(name: object, value: object) -> None:
    """Reject what would break the answer's framing instead of just lying in it."""
    if not isinstance(name, str) or not isinstance(value, str):
        raise ValueError(f"header names and values must be strings, got {name!r}: {value!r}")
    if not name or any(ch in name for ch in ":\r\n \t") or not name.isascii():
        raise ValueError(f"not a header name: {name!r}")
    if "\r" in value or "\n" in value or not value.isascii():
        raise ValueError(f"header {name!r}: the value must be one line of ASCII, got {value!r}")


class CaseInsensitiveHeaders(dict[str, str]):
    """Request headers keyed in lower case; lookups accept any case (HTTP headers are)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((key.lower(), value) for key, value in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass(frozen=True)
class RequestRecord:
    """One /api request as served (``path`` without the query string)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    status: int
    # Wall-clock time (time.time()) the answer was decided: lets tests measure pacing.
    at: float = 0.0


class Arrival(NamedTuple):
    """One /api request as it arrived, before any latency, fault or answer."""

    at: float  # time.time()
    path: str


# ===================================================================== rate limit


@dataclass(frozen=True)
class _Quota:
    allowed: bool
    limit: int
    remaining: int
    refill_in: float  # seconds until the current window ends

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Refill": str(math.ceil(self.refill_in)),
        }

    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.refill_in)))


class _FixedWindow:
    """A fixed-window request counter shared by every key (the real quota is per account)."""

    def __init__(self, limit: int, window: float, enforce: bool, clock: Clock) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"rate limit must be (requests >= 1, seconds > 0), got ({limit}, {window})")
        self._limit, self._window, self._enforce, self._clock = limit, window, enforce, clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._used = 0

    def take(self) -> _Quota:
        """Count one request; ``allowed`` is False when the window's quota is spent."""
        with self._lock:
            now = self._roll(self._clock())
            allowed = not self._enforce or self._used < self._limit
            if allowed:
                self._used += 1
            return self._quota(now, allowed)

    def peek(self) -> _Quota:
        """The current state, for responses that do not count (401s, admin endpoints)."""
        with self._lock:
            return self._quota(self._roll(self._clock()), True)

    def _roll(self, now: float) -> float:
        elapsed = now - self._window_start
        if elapsed >= self._window:
            self._window_start += (elapsed // self._window) * self._window
            self._used = 0
        return now

    def _quota(self, now: float, allowed: bool) -> _Quota:
        remaining = max(0, self._limit - self._used)
        return _Quota(allowed, self._limit, remaining, self._window_start + self._window - now)


# ===================================================================== faults


def _apply_shape_fault(kind: str, items: list[Json], has_more: bool) -> Json:
    """The page body a shape fault turns (items, has_more) into."""
    middle = len(items) // 2  # not the last record: clients must check every record, not the cursor
    if kind == "no_items":
        return {"hasMore": has_more}
    if kind == "items_not_list":
        # What PHP's json_encode makes of an array with non-sequential keys: an object.
        return {"items": {str(index): item for index, item in enumerate(items)}, "hasMore": has_more}
    if kind == "no_has_more":
        return {"items": items}
    if kind == "missing_id" and items:
        items[middle].pop("id", None)
    elif kind == "bad_type" and items:
        items[middle]["id"] = "abc"
    elif kind == "empty_has_more":
        return {"items": [], "hasMore": True}
    elif kind == "empty":
        return {"items": [], "hasMore": False}
    elif kind == "extra_field":
        for item in items:
            item["score"] = 42
    return {"items": items, "hasMore": has_more}


# A contact with no custom field still needs one to carry a big_value: the account's first field,
# or this one for an account without any.
_FALLBACK_FIELD: Json = {"fieldName": "First name", "slug": "first_name"}
# The value deep_json puts in the body before its text replaces it: no record holds a NUL.
_DEEP_MARK = "\x00deep\x00"


def _apply_record_fault(
    fault: Fault, resource: str, items: list[Json], has_more: bool, field_entry: Json
) -> tuple[list[Json], bool]:
    """The (items, has_more) a fault that breaks single records turns the page into.

    ``field_entry`` is the contact field a contact without fields gets for ``big_value``.
    """
    middle = len(items) // 2
    if fault.kind == "short_has_more":
        return items[:-1], True
    if fault.kind == "float_id" and items:
        items[middle]["id"] = _float_id(items, middle)
    elif fault.kind == "swapped" and len(items) >= 2:
        items[middle - 1], items[middle] = items[middle], items[middle - 1]
    elif fault.kind == "big_value" and items:
        _put_big_value(resource, items[middle], "x" * fault.effective_size(), field_entry)
    return items, has_more


def _float_id(items: list[Json], middle: int) -> float:
    """Half past the previous record's id: a number no JSON int parser should accept."""
    for neighbour in (items[middle - 1] if middle else None, items[middle]):
        base = neighbour.get("id") if neighbour else None
        if isinstance(base, int) and not isinstance(base, bool):
            return base + 0.5
    return 0.5  # contact_fields have no ids at all


def _put_big_value(resource: str, record: Json, value: str, field_entry: Json) -> None:
    if resource == "contact_fields":
        record["fieldName"] = value
    elif resource == "memberships":
        record["community"]["name"] = value
    elif resource == "enrollments":
        record["course"]["name"] = value
    elif resource != "contacts":
        record["name"] = value
    elif record["fields"]:
        record["fields"][0]["value"] = value
    else:
        record["fields"].append({**field_entry, "value": value})


def _deep_json_body(items: list[Json], has_more: bool, depth: int) -> bytes:
    """The page whose middle record has ``"deep": [[...]]``, ``depth`` lists deep.

    Built as text: ``json.dumps`` recurses once per level and would hit the recursion limit.
    """
    if not items:
        return _json_bytes({"items": items, "hasMore": has_more})
    items[len(items) // 2]["deep"] = _DEEP_MARK
    body = _json_bytes({"items": items, "hasMore": has_more})
    return body.replace(_json_bytes(_DEEP_MARK), b"[" * depth + b"]" * depth, 1)


# ===================================================================== request parsing


class _Violation(NamedTuple):
    name: str  # the parameter, as the `detail` line names it
    property_path: str
    message: str
    code: str


class _Invalid(Exception):
    """Query parameters the API would reject with 422 (API Platform's violation list)."""

    def __init__(self, violations: list[_Violation]) -> None:
        super().__init__(violations)
        self.violations = violations

    def body(self) -> Json:
        return {
            "type": "https://tools.ietf.org/html/rfc2616#section-10",
            "title": "An error occurred",
            "detail": "\n".join(f"{v.name}: {v.message}" for v in self.violations),
            "violations": [
                {"propertyPath": v.property_path, "message": v.message, "code": v.code} for v in self.violations
            ],
        }


@dataclass(frozen=True)
class _PageQuery:
    limit: int = DEFAULT_LIMIT
    order: str = "desc"  # the API's default: newest first
    starting_after: int | None = None
    registered_after: datetime | None = None
    registered_before: datetime | None = None
    # The relation collections' id filters, as (name, id) pairs: a tuple keeps the query hashable.
    filters: tuple[tuple[str, int], ...] = ()


def _parse_page_query(resource: str, query: dict[str, str]) -> _PageQuery:
    """Validate the pagination (and, for contacts, registered*; for relations, id filters)
    parameters; raise _Invalid.

    Like API Platform, every bad parameter is reported, not just the first. An empty value
    counts as absent (the spec's allowEmptyValue).
    """
    violations: list[_Violation] = []
    limit = _parse_limit(query.get("limit", ""), violations)
    order = _parse_order(query.get("order", ""), violations)
    cursor = _parse_cursor(query.get("startingAfter", ""), violations)
    after = before = None
    if resource == "contacts":
        after = _parse_datetime("registeredAfter", query.get("registeredAfter", ""), violations)
        before = _parse_datetime("registeredBefore", query.get("registeredBefore", ""), violations)
    filters = _parse_filters(resource, query, violations)
    if violations:
        raise _Invalid(violations)
    return _PageQuery(limit, order, cursor, after, before, filters)


def _parse_filters(resource: str, query: dict[str, str], violations: list[_Violation]) -> tuple[tuple[str, int], ...]:
    """The id filters ``resource`` takes that the query sets (an empty value counts as absent)."""
    parsed: list[tuple[str, int]] = []
    for name, spec_type in FILTER_TYPES.get(resource, {}).items():
        raw = query.get(name, "")
        if not raw:
            continue
        if (spec_type == "integer" and _is_int(raw)) or (spec_type == "string" and raw.isascii() and raw.isdigit()):
            parsed.append((name, int(raw)))
        elif spec_type == "integer":
            violations.append(_Violation(name, name, "This value should be of type int.", TYPE_CODE))
        else:
            # Not an id. The spec does not say how the API words this; Symfony's generic message.
            violations.append(_Violation(name, name, "This value is not valid.", TYPE_CODE))
    return tuple(parsed)


def _is_int(text: str) -> bool:
    digits = text[1:] if text[:1] in "+-" else text
    return digits.isascii() and digits.isdigit()


def _parse_limit(raw: str, violations: list[_Violation]) -> int:
    if not raw:
        return DEFAULT_LIMIT
    if not _is_int(raw):
        violations.append(_Violation("limit", "pagination.limit", "This value should be of type int.", TYPE_CODE))
    elif not MIN_LIMIT <= int(raw) <= MAX_LIMIT:
        message = f"This value should be between {MIN_LIMIT} and {MAX_LIMIT}."
        violations.append(_Violation("limit", "pagination.limit", message, RANGE_CODE))
    else:
        return int(raw)
    return DEFAULT_LIMIT


def _parse_order(raw: str, violations: list[_Violation]) -> str:
    if not raw:
        return "desc"
    if raw not in ("asc", "desc"):
        message = "The value you selected is not a valid choice."
        violations.append(_Violation("order", "pagination.order", message, CHOICE_CODE))
        return "desc"
    return raw


def _parse_cursor(raw: str, violations: list[_Violation]) -> int | None:
    if not raw:
        return None
    if not _is_int(raw):
        message = "This value should be of type int."
        violations.append(_Violation("startingAfter", "pagination.startingAfter", message, TYPE_CODE))
        return None
    return int(raw)


def _parse_datetime(name: str, raw: str, violations: list[_Violation]) -> datetime | None:
    if not raw:
        return None
    try:
        # A raw "+" in an unencoded offset arrives as a space, as it would in PHP: rejected.
        return datetime.fromisoformat(raw)
    except ValueError:
        violations.append(_Violation(name, name, "This value is not a valid datetime.", DATETIME_CODE))
        return None


def _json_bytes(obj: Json) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error_body(status: int) -> Json:
    """A JSON error body shaped like the real API's for that status."""
    if status == 401:
        return AUTH_ERROR
    if status == 404:
        return NOT_FOUND
    if status == 429:
        return TOO_MANY
    if status == 422:
        # What an injected 422 looks like: API Platform's validation body.
        return {
            "type": "https://tools.ietf.org/html/rfc2616#section-10",
            "title": "An error occurred",
            "detail": "startingAfter: This value is not valid.",
            "violations": [
                {"propertyPath": "startingAfter", "message": "This value is not valid.", "code": TYPE_CODE}
            ],
        }
    return {"title": "An error occurred", "detail": _phrase(status)}


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# ===================================================================== responses


class _Drip(NamedTuple):
    delay: float  # seconds between two bytes
    with_head: bool  # False: the head goes at once, only the body drips


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    reset_after: int | None = None  # send this many body bytes, then reset the connection
    drip: _Drip | None = None

    @classmethod
    def json(cls, status: int, obj: Json, **headers: str) -> _Response:
        return cls(status, _json_bytes(obj), headers=dict(headers))


# ===================================================================== HTTP server


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that can close its keep-alive connections when stopped."""

    daemon_threads = True
    request_queue_size = 128  # many concurrent clients connect at once in the tests
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can hang on a box with
        # broken DNS; the sandbox only needs the bound address.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Small JSON answers must not wait for Nagle/delayed-ACK round trips.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler blocked on an idle keep-alive connection so it can exit."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler (e.g. a 'reset' fault)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one session
    server: _HTTPServer
    server_version = "sandbox"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is server.requests; stderr noise would drown test output

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        body = self._read_body()
        if body is None:
            self.close_connection = True  # the body was left unread: the connection is spent
            self._write(_Response.json(413, _error_body(413)))
            return
        split = urlsplit(self.path)
        path, raw_query = split.path, split.query
        query = dict(parse_qsl(raw_query, keep_blank_values=True))  # last value wins, as in PHP
        try:
            if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
                response = sandbox._admin(self.command, path, body)
                response.headers.update(sandbox._limiter.peek().headers())
            else:
                sandbox._arrived(Arrival(time.time(), path))
                response = self._answer_api(path, raw_query, query, body)
                self._record(path, query, response.status)
        except Exception:  # noqa: BLE001 - a sandbox bug must fail the request loudly, not hang the client
            traceback.print_exc()
            response = _Response.json(500, _error_body(500))
        self._write(response)

    def _answer_api(self, path: str, raw_query: str, query: dict[str, str], body: bytes) -> _Response:
        sandbox = self.server.sandbox
        sandbox._sleep(sandbox.latency)
        if not self._authorized():
            return self._with_quota(_Response.json(401, AUTH_ERROR), sandbox._limiter.peek())
        quota = sandbox._limiter.take()
        if not quota.allowed:
            return self._with_quota(_Response.json(429, TOO_MANY, **{"Retry-After": quota.retry_after()}), quota)
        fault = sandbox._faults.take(lambda fault: fault.path in (None, path))
        if fault is not None and fault.kind == "delay":
            sandbox._sleep(fault.delay)  # then answer normally: the client's read timeout is the test
            fault = None
        response = self._with_quota(self._route(path, raw_query, query, fault, body), quota)
        if fault is not None and fault.kind == "hold":
            sandbox._hold()
            fault = None
        return _with_transport_fault(response, fault)

    def _route(self, path: str, raw_query: str, query: dict[str, str], fault: Fault | None, body: bytes) -> _Response:
        if fault is not None and fault.kind in ("status", "html", "redirect", "gzip_bomb"):
            return _whole_response_fault(fault, path, raw_query)
        if path == WEBHOOKS_PATH or path.startswith(WEBHOOKS_PATH + "/"):
            # The faults that break pages leave webhooks alone: they have no page to break.
            return self._webhooks(path, body)
        if path.startswith(CONTACT_PREFIX):
            return self._one_contact(path[len(CONTACT_PREFIX) :], fault)
        resource = RESOURCE_PATHS.get(path)
        if resource is None:
            return _Response.json(404, NOT_FOUND)
        if self.command != "GET":
            return _Response.json(405, _error_body(405), Allow="GET")
        return self._page(resource, query, fault)

    def _webhooks(self, path: str, body: bytes) -> _Response:
        """``/api/webhooks`` (GET, POST) and ``/api/webhooks/{id}`` (GET, PATCH, DELETE)."""
        webhooks = self.server.sandbox.webhooks
        method = self.command
        try:
            if path == WEBHOOKS_PATH:
                if method == "GET":
                    return _Response.json(200, {"items": webhooks.listing(), "hasMore": False})
                if method == "POST":
                    return self._json_input("application/json") or _Response.json(201, webhooks.create(parse_object(body)))
                return _Response.json(405, _error_body(405), Allow="GET, POST")
            webhook_id = path[len(WEBHOOKS_PATH) + 1 :]
            if not webhook_id or "/" in webhook_id:
                return _Response.json(404, NOT_FOUND)
            if method == "GET":
                return _Response.json(200, webhooks.get(webhook_id))
            if method == "PATCH":
                webhooks.get(webhook_id)  # an unknown id is a 404, whatever the body
                refused = self._json_input("application/merge-patch+json")
                return refused or _Response.json(200, webhooks.update(webhook_id, parse_object(body)))
            if method == "DELETE":
                webhooks.delete(webhook_id)
                return _Response(204)
            return _Response.json(405, _error_body(405), Allow="GET, PATCH, DELETE")
        except UnknownWebhook:
            return _Response.json(404, NOT_FOUND)
        except BadInput as error:
            return _Response.json(400, {"title": "An error occurred", "detail": str(error)})
        except Invalid as invalid:
            violations = [_Violation(prop, prop, message, code) for prop, message, code in invalid.violations]
            return _Response.json(422, _Invalid(violations).body())

    def _json_input(self, expected: str) -> _Response | None:
        """A 415 unless the request's Content-Type is ``expected`` (parameters aside)."""
        given = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if given == expected:
            return None
        detail = f'The content-type "{given}" is not supported. Supported MIME types are "{expected}".'
        return _Response.json(415, {"title": "An error occurred", "detail": detail})

    def _page(self, resource: str, query: dict[str, str], fault: Fault | None) -> _Response:
        try:
            # contact_fields take no parameters at all, so nothing of theirs can be invalid.
            page_query = _PageQuery() if resource == "contact_fields" else _parse_page_query(resource, query)
        except _Invalid as invalid:
            return _Response.json(422, invalid.body())
        body = self._page_body(resource, page_query, fault)
        kind = fault.kind if fault else None
        if kind == "truncated":
            return _Response(200, body[: len(body) // 2])
        if kind == "reset":
            return _Response(200, body, reset_after=len(body) // 2)
        return _Response(200, body)

    def _one_contact(self, raw_id: str, fault: Fault | None) -> _Response:
        """``GET /api/contacts/{id}``: the contact as the list holds it, or 404 with the API's
        error body for an id no live contact has. An id that is not an integer is a 404 too, as
        API Platform answers a route it cannot match. Faults that break a page's records break
        this one the same way (a missing, ill-typed or float id, an extra field, a big or deep
        value, a tag no tag has, a cut or reset body); the others leave it alone, and still
        count as fired."""
        if self.command != "GET":
            return _Response.json(405, _error_body(405), Allow="GET")
        if not (raw_id.isascii() and raw_id.isdigit()):
            return _Response.json(404, NOT_FOUND)
        data = self.server.sandbox.data
        try:
            items = [data.contact(int(raw_id))]
        except KeyError:
            return _Response.json(404, NOT_FOUND)
        kind = fault.kind if fault is not None else ""
        if fault is not None and kind in ("float_id", "big_value"):
            items, _ = _apply_record_fault(fault, "contacts", items, False, next(data.records("contact_fields"), _FALLBACK_FIELD))
        elif kind in ("missing_id", "bad_type", "extra_field"):
            items = _apply_shape_fault(kind, items, False)["items"]
        elif kind == "dangling":
            _dangle(data, "contacts", items)
        (record,) = items
        body = _json_bytes(record)
        if fault is not None and kind == "deep_json":
            depth = fault.effective_size()
            record["deep"] = _DEEP_MARK
            body = _json_bytes(record).replace(_json_bytes(_DEEP_MARK), b"[" * depth + b"]" * depth, 1)
        elif kind == "truncated":
            return _Response(200, body[: len(body) // 2])
        elif kind == "reset":
            return _Response(200, body, reset_after=len(body) // 2)
        return _Response(200, body)

    def _page_body(self, resource: str, page_query: _PageQuery, fault: Fault | None) -> bytes:
        """The JSON body of one page, as ``fault`` (if any) breaks it."""
        data = self.server.sandbox.data
        kind = fault.kind if fault else ""
        items, has_more = _query_page(data, resource, page_query, repeat_cursor=kind == "repeat_cursor")
        if fault is None:
            return _json_bytes({"items": items, "hasMore": has_more})
        if kind == "deep_json":
            return _deep_json_body(items, has_more, fault.effective_size())
        if kind == "oversized":
            return _oversized_body(resource, page_query.order, items, has_more, fault.effective_size(page_query.limit))
        if kind == "repeat_last":
            items = _repeat_last(data, resource, page_query, items)
        if kind == "dangling":
            _dangle(data, resource, items)
        field_entry = next(data.records("contact_fields"), _FALLBACK_FIELD) if kind == "big_value" else {}
        items, has_more = _apply_record_fault(fault, resource, items, has_more, field_entry)
        return _json_bytes(_apply_shape_fault(kind, items, has_more))

    # ----------------------------------------------------------------- helpers

    def _authorized(self) -> bool:
        key = self.headers.get("X-API-Key")
        expected = self.server.sandbox.api_key
        return key is not None and hmac.compare_digest(key.encode("utf-8"), expected.encode("utf-8"))

    @staticmethod
    def _with_quota(response: _Response, quota: _Quota) -> _Response:
        response.headers.update(quota.headers())
        return response

    def _read_body(self) -> bytes | None:
        """The request body; None when it is above ``MAX_REQUEST_BODY`` (left unread)."""
        # Always drain the body, or its bytes would be parsed as the next keep-alive request.
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            if int(length) > MAX_REQUEST_BODY:
                return None
            return self.rfile.read(int(length))
        return b""

    def _record(self, path: str, query: dict[str, str], status: int) -> None:
        # Recorded before the answer is written, so a client that has its response can already
        # see the request in server.requests without waiting.
        headers = CaseInsensitiveHeaders(self.headers.items())
        self.server.sandbox._log(RequestRecord(self.command, path, query, headers, status, time.time()))

    def _write(self, response: _Response) -> None:
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Date": self.date_time_string(),
        }
        _override_headers(headers, response.headers)
        if self.close_connection:
            headers["Connection"] = "close"
        head = f"{self.protocol_version} {response.status} {_phrase(response.status)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        body = b"" if self.command == "HEAD" else response.body
        if response.reset_after is not None:
            body = body[: response.reset_after]
        try:
            if response.drip is not None:
                self._write_dripping(head.encode("latin-1"), body, response.drip)
                return
            # One write: head and body in the same segment.
            self.wfile.write(head.encode("latin-1") + body)
        except OSError:
            self.close_connection = True  # the client went away; nothing left to tell it
            return
        if response.reset_after is not None:
            self._reset()

    def _write_dripping(self, head: bytes, body: bytes, drip: _Drip) -> None:
        if not drip.with_head:
            self.wfile.write(head)
        slow = head + body if drip.with_head else body
        if not _drip(self.wfile.write, slow, drip.delay, self.server.sandbox._stopping):
            self.close_connection = True  # half an answer: the connection is of no further use

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), mid-body."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # rfile holds a reference to the socket: close it first or close() would not close.
            self.rfile.close()
            self.connection.close()
        except OSError:
            pass


def _query_page(
    data: SandboxData, resource: str, page_query: _PageQuery, *, limit: int | None = None, repeat_cursor: bool = False
) -> tuple[list[Json], bool]:
    """``data.page`` for a parsed query (``limit`` overrides the query's)."""
    return data.page(
        resource,
        limit=page_query.limit if limit is None else limit,
        order=page_query.order,
        starting_after=page_query.starting_after,
        registered_after=page_query.registered_after,
        registered_before=page_query.registered_before,
        filters=dict(page_query.filters),
        repeat_cursor=repeat_cursor,
    )


def _dangle(data: SandboxData, resource: str, items: list[Json]) -> None:
    """Make the middle record refer to something the account does not hold (see ``dangling``)."""
    if not items:
        return
    record = items[len(items) // 2]
    if resource == "memberships":
        record["contact"] = {"id": data.next_contact_id}
    elif resource == "enrollments":
        phantom = data.phantom_contact()
        record["contact"] = {key: value for key, value in phantom.items() if key not in ("fields", "tags")}
    elif resource == "contacts":
        # Above every tag id, so the tags stay in id order as the API serves them.
        tag_id = data.unused_tag_id
        record["tags"].append({"id": tag_id, "name": f"new-tag-{tag_id}"})


def _repeat_last(data: SandboxData, resource: str, page_query: _PageQuery, items: list[Json]) -> list[Json]:
    """The page shifted back by one: the cursor's own record first, the page's last one dropped.

    Unchanged on a first page, an empty page, or when no live record has the cursor's id.
    """
    cursor = page_query.starting_after
    if cursor is None or not items:
        return items
    # A window *ending* at the cursor, one record long: the cursor's record if it is live.
    previous, _ = _query_page(data, resource, page_query, limit=1, repeat_cursor=True)
    if not previous or previous[0].get("id") != cursor:
        return items
    return previous + items[:-1]


def _oversized_body(resource: str, order: str, items: list[Json], has_more: bool, size: int) -> bytes:
    """The page grown (or cut) to ``size`` records: copies of its records continue it.

    The copies get fresh ids one apart in the page's order (contact_fields, which have no ids,
    fresh slugs instead). Copies are spliced as text, so 100k records cost milliseconds, not the
    seconds building and serializing them would.
    """
    parts = [_json_bytes(item) for item in items[:size]]
    missing = size - len(parts)
    if missing > 0 and items:
        if resource == "contact_fields":
            parts += [_json_bytes(record) for record in _fresh_slug_copies(items, missing)]
        else:
            parts += _fresh_id_copies(items, missing, -1 if order == "desc" else 1)
    return b'{"items":[' + b",".join(parts) + b'],"hasMore":' + _json_bytes(has_more) + b"}"


def _fresh_id_copies(items: list[Json], count: int, step: int) -> list[bytes]:
    """``count`` copies of ``items`` (cycled), ids continuing from the last one by ``step``."""
    # Every record serializes with "id" first: the rest of its text is reused after a new id.
    tails = []
    for item in items:
        rest = _json_bytes({key: value for key, value in item.items() if key != "id"})
        tails.append(b"}" if rest == b"{}" else b"," + rest[1:])
    last = int(items[-1]["id"])
    return [b'{"id":%d%s' % (last + step * n, tails[(n - 1) % len(tails)]) for n in range(1, count + 1)]


def _fresh_slug_copies(fields: list[Json], count: int) -> Iterable[Json]:
    for n in range(1, count + 1):
        entry = fields[(n - 1) % len(fields)]
        yield {**entry, "fieldName": f"{entry['fieldName']} (extra {n})", "slug": f"{entry['slug']}_extra_{n}"}


def _with_transport_fault(response: _Response, fault: Fault | None) -> _Response:
    """Faults that keep the answer but change its headers or how it is sent."""
    if fault is not None and fault.kind == "headers":
        # After the rate-limit headers, so an injected quota wins over the real one.
        _override_headers(response.headers, fault.headers or {})
    elif fault is not None and fault.kind in ("drip", "drip_body"):
        response.drip = _Drip(fault.delay, with_head=fault.kind == "drip")
    return response


def _override_headers(headers: dict[str, str], overrides: dict[str, str]) -> None:
    """Set ``overrides`` on ``headers`` in place, replacing names in any case (HTTP ignores it)."""
    lowered = {name.lower() for name in overrides}
    for name in [name for name in headers if name.lower() in lowered]:
        del headers[name]
    headers.update(overrides)


def _drip(write: Callable[[bytes], object], data: bytes, delay: float, stopping: threading.Event) -> bool:
    """Write ``data`` one byte every ``delay`` seconds, the first at once.

    False when it could not finish: the client went away, or ``stopping`` was set (the server is
    stopping, and must not wait for a slow answer to end).
    """
    for index in range(len(data)):
        if index and stopping.wait(delay):
            return False
        try:
            write(data[index : index + 1])
        except OSError:
            return False
    return True


_gzip_lock = threading.Lock()


def _gzip_bomb(size: int) -> bytes:
    """gzip data inflating to ``size`` bytes: ``GZIP_BOMB_PREFIX``, then spaces."""
    with _gzip_lock:  # one compression per size, even when clients ask at the same time
        return _compressed_spaces(size)


@functools.lru_cache(maxsize=4)
def _compressed_spaces(size: int) -> bytes:
    # 1 GiB takes ~2 s to compress (to ~1 MB): done once per size, then served from the cache.
    compressor = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 31)  # 31: gzip framing
    prefix = GZIP_BOMB_PREFIX[:size]
    parts = [compressor.compress(prefix)]
    block = b" " * min(size - len(prefix), 1 << 20)  # reused, so memory stays one block
    remaining = size - len(prefix)
    while remaining >= len(block) > 0:
        parts.append(compressor.compress(block))
        remaining -= len(block)
    parts.append(compressor.compress(block[:remaining]))
    parts.append(compressor.flush())
    return b"".join(parts)


def _whole_response_fault(fault: Fault, path: str, raw_query: str) -> _Response:
    """The answer of a fault that replaces the response outright (status, html, redirect, gzip_bomb)."""
    if fault.kind == "gzip_bomb":
        return _Response(200, _gzip_bomb(fault.effective_size()), headers={"Content-Encoding": "gzip"})
    if fault.kind == "status":
        extra = {} if fault.retry_after is None else {"Retry-After": _retry_after_text(fault.retry_after)}
        return _Response.json(fault.status, _error_body(fault.status), **extra)
    if fault.kind == "html":
        return _Response(200, HTML_PAGE.encode("utf-8"), "text/html; charset=UTF-8")
    target = str(fault.location).rstrip("/") + path + (f"?{raw_query}" if raw_query else "")
    page = f'<!DOCTYPE html><html><body>Redirecting to <a href="{target}">{target}</a>.</body></html>'
    return _Response(302, page.encode("utf-8"), "text/html; charset=UTF-8", {"Location": target})


def _retry_after_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class SandboxServer:
    """The sandbox API on a local port. ``start()`` serves in a background thread."""

    def __init__(
        self,
        data: SandboxData,
        api_key: str = "k",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        rate_limit: tuple[int, float] | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        """``rate_limit`` is ``(requests, window_seconds)``; ``clock`` lets tests move time."""
        self.data = data
        self.api_key = api_key
        self.latency = latency
        limit, window = rate_limit if rate_limit is not None else UNLIMITED
        self._limiter = _FixedWindow(limit, window, rate_limit is not None, clock)
        self._faults: FaultBook[Fault] = FaultBook()
        self._log_lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._arrivals: list[Arrival] = []
        self._stopping = threading.Event()  # wakes latency and 'delay' sleeps on stop()
        self._held = threading.Event()  # an answer is held ('hold')
        self._released = threading.Event()  # held answers may leave (set on stop() too)
        self._state_lock = threading.Lock()
        self._loop_started = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.webhooks = Webhooks(data)
        # Bound now, so base_url (with the port chosen for port=0) is known before start().
        self._httpd = _HTTPServer((host, port), self)

    # ----------------------------------------------------------------- addresses

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The server root, e.g. for the ``/__sandbox/...`` admin endpoints."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}{API_PREFIX}"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> SandboxServer:
        with self._state_lock:
            if self._closed or self._loop_started:
                raise RuntimeError("a SandboxServer can be started once")
            self._loop_started = True
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(POLL_INTERVAL,), name=f"sandbox-api-{self.port}", daemon=True
            )
        self.webhooks.start(f"sandbox-webhooks-{self.port}")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` or Ctrl-C, then close."""
        with self._state_lock:
            if self._closed or self._loop_started:
                raise RuntimeError("a SandboxServer can be started once")
            self._loop_started = True
        self.webhooks.start(f"sandbox-webhooks-{self.port}")
        try:
            self._httpd.serve_forever(POLL_INTERVAL)
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, drop open connections, close the socket and join the thread."""
        with self._state_lock:
            if self._closed:
                return
            loop_started = self._loop_started
        if loop_started:
            self._httpd.shutdown()  # returns once serve_forever has left its loop
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._stopping.set()
        self._released.set()
        self.webhooks.stop()
        self._httpd.close_connections()
        self._httpd.server_close()  # joins the handler threads, which exit once woken

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- faults and log

    def add_fault(self, fault: Fault) -> None:
        if fault.kind == "hold" and not self._stopping.is_set():
            self._held.clear()  # a new hold: it waits for a release of its own
            self._released.clear()
        self._faults.add(fault)

    def clear_faults(self) -> None:
        self._faults.replace([])

    @property
    def faults(self) -> list[Fault]:
        return self._faults.snapshot()

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the log of /api requests served (admin requests are not logged)."""
        with self._log_lock:
            return list(self._requests)

    @property
    def arrivals(self) -> list[Arrival]:
        """Every /api request as it arrived, in order, answered or not yet (one held by a
        ``delay`` fault, say): what a test of a client that must stop sending counts."""
        with self._log_lock:
            return list(self._arrivals)

    def reset_log(self) -> None:
        with self._log_lock:
            self._requests.clear()
            self._arrivals.clear()

    def _log(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._requests.append(record)

    def wait_until_held(self, timeout: float) -> bool:
        """Whether a ``hold`` fault holds an answer (waiting up to ``timeout`` seconds for one)."""
        return self._held.wait(timeout)

    def release_held(self) -> None:
        """Let every held answer, and any later one, leave."""
        self._released.set()

    def _hold(self) -> None:
        self._held.set()
        self._released.wait()

    def _arrived(self, arrival: Arrival) -> None:
        with self._log_lock:
            self._arrivals.append(arrival)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    # ----------------------------------------------------------------- changes and deliveries

    def add_tag(self, contact_id: int, tag_id: int) -> ChangeResult:
        """Tag a contact and send CONTACT_TAG_ADDED (see ``webhooks.py`` for every change)."""
        return self.webhooks.add_tag(contact_id, tag_id)

    def remove_tag(self, contact_id: int, tag_id: int) -> ChangeResult:
        return self.webhooks.remove_tag(contact_id, tag_id)

    def create_contacts(self, count: int = 1) -> list[ChangeResult]:
        return self.webhooks.create_contacts(count)

    def opt_in(self, contact_id: int) -> ChangeResult:
        return self.webhooks.opt_in(contact_id)

    def new_sale(self, contact_id: int) -> ChangeResult:
        return self.webhooks.new_sale(contact_id)

    def cancel_sale(self, sale_id: int) -> ChangeResult:
        return self.webhooks.cancel_sale(sale_id)

    def apply_changes(self, changes: Sequence[Json]) -> list[ChangeResult]:
        """Changes in the format ``POST /__sandbox/changes`` takes, e.g.
        ``[{"event": "CONTACT_TAG_ADDED", "contact": 1042, "tag": 117}]``."""
        return self.webhooks.apply(list(changes))

    def add_delivery_fault(self, fault: DeliveryFault) -> None:
        self.webhooks.add_fault(fault)

    def clear_delivery_faults(self) -> None:
        self.webhooks.clear_faults()

    @property
    def deliveries(self) -> list[DeliveryRecord]:
        """A copy of the log of deliveries done (sent and answered, given up, or lost)."""
        return self.webhooks.deliveries

    def wait_for_deliveries(self, timeout: float) -> bool:
        """Whether every queued delivery was done within ``timeout`` seconds."""
        return self.webhooks.wait_for_deliveries(timeout)

    # ----------------------------------------------------------------- admin endpoints

    def _admin(self, method: str, path: str, body: bytes) -> _Response:
        """``/__sandbox/faults`` (GET, POST = replace, DELETE = clear), ``/__sandbox/requests``,
        and the webhooks' (``Webhooks.admin``)."""
        answer = self.webhooks.admin(method, path[len(ADMIN_PREFIX) :], body)
        if answer is not None:
            return _admin_response(answer)
        if path == f"{ADMIN_PREFIX}/faults":
            if method == "POST":
                return self._admin_set_faults(body)
            if method == "DELETE":
                self.clear_faults()
            elif method != "GET":
                return _Response.json(405, _error_body(405), Allow="GET, POST, DELETE")
            return _Response.json(200, {"faults": [asdict(fault) for fault in self.faults]})
        if path == f"{ADMIN_PREFIX}/requests":
            if method == "DELETE":
                self.reset_log()
            elif method != "GET":
                return _Response.json(405, _error_body(405), Allow="GET, DELETE")
            return _Response.json(200, {"requests": [_public_record(record) for record in self.requests]})
        return _Response.json(404, NOT_FOUND)

    def _admin_set_faults(self, body: bytes) -> _Response:
        try:
            payload = json.loads(body or b"[]")
            if not isinstance(payload, list):
                raise ValueError("expected a JSON list of fault objects")
            faults = [Fault.from_json(obj) for obj in payload]
        except (ValueError, TypeError) as error:
            return _Response.json(400, {"title": "Bad fault list", "detail": str(error)})
        self._faults.replace(faults)
        return _Response.json(200, {"faults": [asdict(fault) for fault in faults]})


def _admin_response(answer: AdminAnswer) -> _Response:
    response = _Response.json(answer.status, answer.body)
    if answer.allow is not None:
        response.headers["Allow"] = answer.allow
    return response


def _public_record(record: RequestRecord) -> Json:
    """A log entry for the unauthenticated admin endpoint: the API key is not echoed back."""
    headers = {name: ("***" if name == "x-api-key" else value) for name, value in record.headers.items()}
    return {**asdict(record), "headers": headers}


# ===================================================================== CLI


def _parse_rate_limit(text: str) -> tuple[int, float]:
    try:
        count, seconds = text.split("/", 1)
        parsed = int(count), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS such as 20/2, got {text!r}") from None
    if parsed[0] < 1 or parsed[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected N >= 1 and SECONDS > 0, got {text!r}")
    return parsed


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkt-assets sandbox", description="Serve a fake systeme.io API on a local port."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"the X-API-Key clients must send (default: $MKT_API_KEY, else {DEFAULT_SANDBOX_KEY!r})",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every API request")
    parser.add_argument("--rate-limit", type=_parse_rate_limit, default=None, metavar="N/SECONDS")
    return parser


def _accepted_key(given: str | None, environment: str | None) -> tuple[str, str]:
    """The key the simulator accepts, and how the banner names it: a key of the user's own
    (a real one, perhaps) is named by where it came from, never printed."""
    if given is not None:
        return given, "given by --api-key"
    if environment:
        return environment, "from MKT_API_KEY"
    return DEFAULT_SANDBOX_KEY, repr(DEFAULT_SANDBOX_KEY)


def main(argv: list[str] | None = None) -> int:
    args = _argument_parser().parse_args(argv)
    api_key, which_key = _accepted_key(args.api_key, os.environ.get("MKT_API_KEY"))
    data = SandboxData(seed=args.seed, contacts=args.contacts)
    server = SandboxServer(
        data, api_key=api_key, host=args.host, port=args.port, latency=args.latency, rate_limit=args.rate_limit
    )
    print(
        f"Sandbox API serving {server.base_url} (contacts={args.contacts}, seed={args.seed});"
        f" it accepts X-API-Key {which_key}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
