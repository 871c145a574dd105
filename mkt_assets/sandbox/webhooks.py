"""The sandbox account's webhooks, the changes that fire their events, and the signed deliveries.

- **The resource** (``/api/webhooks``, served by ``server.py``): ``Webhooks.create`` / ``update``
  validate as the spec's ``Webhook.CreateWebhookInput`` / ``UpdateWebhookInput`` say (a body that
  is not a JSON object or has a value of the wrong JSON type: ``BadInput``, a 400; values the API
  refuses: ``Invalid``, a 422 with API Platform's violations). ``update`` ignores ``url``, as the
  update input has none, and any other unknown key. The secret is kept, never shown.
- **Changes** (``add_tag`` ...): each updates the ``SandboxData`` first, so the API then serves the
  new state, then queues one delivery per active webhook subscribed to its event:

  ============================ ====================== =============================================
  change                       event                  data change
  ============================ ====================== =============================================
  ``add_tag(contact, tag)``    CONTACT_TAG_ADDED      the contact gets the tag (already had it:
                                                      nothing changes, nothing is sent)
  ``remove_tag(contact, tag)`` CONTACT_TAG_REMOVED    the tag leaves the contact (idem)
  ``create_contacts(n)``       CONTACT_CREATED        ``n`` new contacts (``add_contacts``), one
                                                      event each
  ``opt_in(contact)``          CONTACT_OPT_IN         ``needsConfirmation`` and ``unsubscribed``
                                                      become false; sent even when both were
                                                      (a form filled in again)
  ``new_sale(contact)``        SALE_NEW               none the API lists: only the delivery tells
  ``cancel_sale(sale)``        SALE_CANCELED          idem (already canceled: nothing is sent)
  ============================ ====================== =============================================

- **Deliveries** (what public integrations report, not the spec: see API.md): a JSON POST to the
  webhook's URL with ``X-Webhook-Signature`` (hex HMAC-SHA256 of the raw body keyed with that
  webhook's secret), ``X-Webhook-Event`` and ``Content-Type: application/json``. The body has one
  of two shapes (``DeliverySettings.shape``; by default they alternate change by change, so a
  receiver meets both):

  - ``data``: ``{"type": EVENT, "createdAt": ISO, "data": {"contact": {...}, "tag": {"id",
    "name"}, "order": {...}}}``
  - ``flat``: ``{"event": EVENT, "createdAt": ISO, "contact": {...}, "tag": {...}, "sale": {...}}``

  ``contact`` is the whole contact as the list serves it after the change (``{"id"}`` alone for a
  sale of a contact deleted since); ``tag`` comes with tag events, the sale with sale events.
  One background thread sends them in order over keep-alive connections (``http.client``),
  ``timeout`` seconds per attempt, retrying connection errors, 429 and 5xx ``attempts`` times in
  all with a doubling ``backoff``; it never holds up the API. ``deliveries`` logs each once done
  (the last ``LOG_LIMIT``); ``wait_for_deliveries`` waits until none is left to send.
- **Delivery faults** (``DeliveryFault``, counted like the API's ``Fault``: deterministic):
  ``bad_signature`` (signed with another key), ``duplicate`` (sent twice, same bytes), ``out_of_order``
  (held, then sent right after the next delivery queued; a wait for deliveries releases it too, so
  none is held forever) and ``lost`` (never sent; logged with 0 attempts).

Standard library only, and independent of the rest of ``mkt_assets``, like the whole sandbox.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import random
import ssl
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

from .data import SandboxData
from .faultbook import FaultBook

Json = Any

EVENTS: tuple[str, ...] = (
    "CONTACT_CREATED", "CONTACT_TAG_ADDED", "CONTACT_TAG_REMOVED", "CONTACT_OPT_IN", "SALE_NEW", "SALE_CANCELED",
)  # fmt: skip
SIGNATURE_HEADER = "X-Webhook-Signature"
EVENT_HEADER = "X-Webhook-Event"
SHAPES: tuple[str, ...] = ("data", "flat", "alternate")
DELIVERY_FAULT_KINDS: frozenset[str] = frozenset({"bad_signature", "duplicate", "out_of_order", "lost"})

MAX_NAME = 255  # the spec's
# The sandbox's own bounds, where the spec gives none.
MAX_SECRET = 255
MAX_URL = 2048
MAX_CHANGES = 10_000  # changes in one admin request
MAX_CREATED = 10_000  # contacts one CONTACT_CREATED change creates
MAX_PENDING = 100_000  # deliveries queued or held at once; beyond, dropped (and logged as such)
LOG_LIMIT = 20_000  # deliveries the log keeps, the oldest leaving first
MAX_ANSWER = 64 * 1024  # bytes of a receiver's answer read; a longer one closes its connection
MAX_WAIT = 60.0  # seconds an admin wait for deliveries may last
FIRST_SALE_ID = 5001

# Symfony validator codes, as API Platform puts them in `violations[].code`.
NOT_BLANK_CODE = "c1051bb4-d103-4f74-8988-acbcafc7fdc3"
TOO_LONG_CODE = "d94b19cc-114f-4f44-9cc4-4138e80a87b9"
URL_CODE = "57c2f299-1154-4870-89bb-ef3b1f5ad229"
CHOICE_CODE = "8e179f1b-97aa-4560-a02f-2a8b42e49df7"
UNIQUE_CODE = "7911c98d-b845-4da0-94b7-a8dac36bc55a"

_BLANK = "This value should not be blank."
# What each change of the admin format takes, beyond "event" (required, then optional).
_CHANGE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "CONTACT_CREATED": ((), ("count",)),
    "CONTACT_TAG_ADDED": (("contact", "tag"), ()),
    "CONTACT_TAG_REMOVED": (("contact", "tag"), ()),
    "CONTACT_OPT_IN": (("contact",), ()),
    "SALE_NEW": (("contact",), ()),
    "SALE_CANCELED": (("sale",), ()),
}
_PRICES: tuple[float, ...] = (9.0, 19.0, 47.0, 97.0, 197.0, 497.0)
# A reused keep-alive connection the receiver closed while idle fails with one of these.
_STALE: tuple[type[Exception], ...] = (
    http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
)  # fmt: skip


# ===================================================================== errors


class BadInput(ValueError):
    """A body the API refuses before validating its values (400): not JSON, not an object, or a
    value of the wrong JSON type."""


class Invalid(ValueError):
    """Values the API refuses (422); ``violations`` are ``(propertyPath, message, code)``."""

    def __init__(self, violations: list[tuple[str, str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message, _ in violations))
        self.violations = violations


class UnknownWebhook(LookupError):
    """No webhook has that id (404)."""


# ===================================================================== public value types


@dataclass(frozen=True)
class DeliveryFault:
    """One injected delivery misbehaviour (``DELIVERY_FAULT_KINDS``, see the module docstring).

    ``event`` restricts it to one event (None: any); it lets ``after`` matching deliveries pass,
    then affects the next ``times`` of them (-1: forever). A change sent to two webhooks makes two
    deliveries; the copy a ``duplicate`` sends is not counted.
    """

    kind: str
    event: str | None = None
    times: int = 1
    after: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DELIVERY_FAULT_KINDS:
            raise ValueError(f"unknown delivery fault kind {self.kind!r}; expected one of {sorted(DELIVERY_FAULT_KINDS)}")
        if self.event is not None and self.event not in EVENTS:
            raise ValueError(f"unknown event {self.event!r}; expected one of {list(EVENTS)} or null")
        _check_int("times", self.times, -1)
        _check_int("after", self.after, 0)

    @classmethod
    def from_json(cls, obj: Json) -> DeliveryFault:
        return cls(**_known_fields(cls, obj, "a delivery fault"))


@dataclass(frozen=True)
class DeliverySettings:
    """How deliveries are sent: body ``shape`` (``SHAPES``), ``timeout`` seconds per attempt
    (connect, then each read), ``attempts`` in all, ``backoff`` seconds before the second (doubled
    before each later one)."""

    shape: str = "alternate"
    timeout: float = 5.0
    attempts: int = 4
    backoff: float = 0.25

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        _check_int("attempts", self.attempts, 1)
        for name in ("timeout", "backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 60:
                raise ValueError(f"{name} must be a number of seconds from 0 to 60, got {value!r}")
        if self.timeout == 0:
            raise ValueError("timeout must be above 0 seconds")

    @classmethod
    def from_json(cls, obj: Json, base: DeliverySettings | None = None) -> DeliverySettings:
        """``base`` with the fields ``obj`` sets (the admin endpoint's format)."""
        return replace(base or cls(), **_known_fields(cls, obj, "delivery settings"))


@dataclass(frozen=True)
class DeliveryRecord:
    """One delivery once done: sent and answered (``status``), given up (``error``), or lost."""

    seq: int  # in the order queued; a duplicate's two copies share theirs
    webhook_id: str
    event: str
    url: str
    body: bytes = field(repr=False)
    signature: str
    fault: str | None  # the delivery fault that acted on it
    attempts: int  # POSTs made (0: never sent)
    status: int | None  # the receiver's last answer (None: none came)
    error: str | None  # why the last attempt got no answer
    at: float  # time.time() it was done

    def to_json(self) -> Json:
        return {**asdict(self), "body": self.body.decode("utf-8")}


class ChangeResult(NamedTuple):
    """What one change did: whether the account's data changed, and how many deliveries it
    queued (one per subscribed active webhook, before delivery faults)."""

    event: str
    contact_id: int
    changed: bool
    deliveries: int
    tag_id: int | None = None
    sale_id: int | None = None


class AdminAnswer(NamedTuple):
    status: int
    body: Json
    allow: str | None = None  # the Allow header of a 405


def sign(secret: str, body: bytes) -> str:
    """The ``X-Webhook-Signature`` of ``body``: hex HMAC-SHA256 keyed with the webhook's secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def delivery_body(
    event: str, shape: str, created_at: str, contact: Json, tag: Json | None = None, sale: Json | None = None
) -> bytes:
    """A delivery's raw body in ``shape`` (``data`` or ``flat``, see the module docstring)."""
    if shape == "data":
        data: dict[str, Json] = {"contact": contact}
        if tag is not None:
            data["tag"] = tag
        if sale is not None:
            data["order"] = sale
        obj: dict[str, Json] = {"type": event, "createdAt": created_at, "data": data}
    elif shape == "flat":
        obj = {"event": event, "createdAt": created_at, "contact": contact}
        if tag is not None:
            obj["tag"] = tag
        if sale is not None:
            obj["sale"] = sale
    else:
        raise ValueError(f"a body is 'data' or 'flat', not {shape!r}")
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _known_fields(cls: type, obj: Json, what: str) -> dict[str, Json]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(obj).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"unknown fields {unknown} in {what}; expected some of {sorted(known)}")
    return obj


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ===================================================================== the resource


@dataclass
class _Webhook:
    id: str
    name: str
    url: str
    secret: str = field(repr=False)
    active: bool
    subscriptions: dict[str, str]  # event -> subscription id, in the order given

    def public(self) -> Json:
        """``Webhook-full_webhook``: everything but the secret."""
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "active": self.active,
            "subscriptions": [
                {"id": subscription_id, "event": event, "disabledAt": None, "disabledReason": None}
                for event, subscription_id in self.subscriptions.items()
            ],
        }


class _Target(NamedTuple):
    webhook_id: str
    url: str
    secret: str


_TYPES: dict[str, tuple[type, str]] = {
    "name": (str, "string"),
    "secret": (str, "string"),
    "url": (str, "string"),
    "subscriptions": (list, "array"),
    "active": (bool, "bool"),
}


def parse_object(body: bytes) -> dict[str, Json]:
    """A request body as a JSON object, or ``BadInput``."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInput("Syntax error") from None
    if not isinstance(payload, dict):
        raise BadInput(f'The input data must be an object, "{_json_type(payload)}" given.')
    return payload


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "string", list: "array", dict: "array"}.get(type(value), "unknown")


def _check_types(payload: dict[str, Json], keys: Sequence[str], nullable: Sequence[str]) -> None:
    for key in keys:
        if key not in payload or (payload[key] is None and key in nullable):
            continue
        kind, kind_name = _TYPES[key]
        if not isinstance(payload[key], kind):
            given = _json_type(payload[key])
            raise BadInput(f'The type of the "{key}" attribute must be "{kind_name}", "{given}" given.')


def _text_violations(name: str, value: str | None, maximum: int, required: bool) -> list[tuple[str, str, str]]:
    if value is None:
        return [(name, _BLANK, NOT_BLANK_CODE)] if required else []
    if value == "":
        return [(name, _BLANK, NOT_BLANK_CODE)]
    if len(value) > maximum:
        return [(name, f"This value is too long. It should have {maximum} characters or less.", TOO_LONG_CODE)]
    return []


def _url_violations(value: str | None) -> list[tuple[str, str, str]]:
    problems = _text_violations("url", value, MAX_URL, required=True)
    if problems or value is None:
        return problems
    return [] if _is_http_url(value) else [("url", "This value is not a valid URL.", URL_CODE)]


def _is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host, in printable ASCII (the sender's request line)."""
    if not text.isascii() or any(not 0x20 < ord(ch) < 0x7F for ch in text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _subscription_violations(value: list[Json] | None, required: bool) -> list[tuple[str, str, str]]:
    if value is None:
        return [("subscriptions", _BLANK, NOT_BLANK_CODE)] if required else []
    if not value:
        return [("subscriptions", _BLANK, NOT_BLANK_CODE)]
    problems = []
    if any(not isinstance(event, str) or event not in EVENTS for event in value):
        problems.append(("subscriptions", "One or more of the given values is invalid.", CHOICE_CODE))
    hashable = [json.dumps(event, sort_keys=True) for event in value]
    if len(set(hashable)) != len(hashable):
        problems.append(("subscriptions", "This collection should contain only unique elements.", UNIQUE_CODE))
    return problems


# ===================================================================== deliveries


@dataclass(frozen=True)
class _Job:
    seq: int
    webhook_id: str
    event: str
    url: str
    body: bytes
    signature: str
    fault: str | None


class _Sender:
    """One thread sending queued deliveries in order, each retried as ``settings()`` says."""

    def __init__(self, settings: Callable[[], DeliverySettings]) -> None:
        self._settings = settings
        self.faults: FaultBook[DeliveryFault] = FaultBook()
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._held: list[_Job] = []  # out_of_order jobs waiting for the next one
        self._pending = 0  # queued + held + being sent
        self._seq = 0
        self._log: deque[DeliveryRecord] = deque(maxlen=LOG_LIMIT)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        self._connections_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None  # made on the first https URL: loading CAs takes a while

    # ----------------------------------------------------------------- lifecycle

    def start(self, name: str) -> None:
        with self._cond:
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending (what is left is dropped) and close every connection; bounded."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        self._close_connections()  # wakes a send blocked on a slow receiver
        if self._thread is not None:
            self._thread.join(timeout=self._settings().timeout + 5)

    # ----------------------------------------------------------------- queue and log

    def submit(self, targets: Sequence[_Target], event: str, body: bytes) -> None:
        with self._cond:
            for target in targets:
                self._seq += 1
                fault = self.faults.take(lambda fault: fault.event in (None, event))
                kind = fault.kind if fault is not None else None
                # Another key, so the signature has the right form and never verifies.
                secret = "not-" + target.secret if kind == "bad_signature" else target.secret
                job = _Job(self._seq, target.webhook_id, event, target.url, body, sign(secret, body), kind)
                copies = 2 if kind == "duplicate" else 1
                if kind == "lost":
                    self._log.append(_record(job, 0, None, None))
                elif self._pending + copies > MAX_PENDING:
                    self._log.append(_record(job, 0, None, f"dropped: {MAX_PENDING} deliveries already pending"))
                elif kind == "out_of_order":
                    self._pending += 1
                    self._held.append(job)
                else:
                    self._pending += copies
                    self._queue.extend([job] * copies)
                    self._release_held()
            self._cond.notify_all()

    def _release_held(self) -> None:
        """Queue the held jobs (the caller holds ``_cond``)."""
        self._queue.extend(self._held)
        self._held.clear()

    def wait_drained(self, timeout: float) -> bool:
        """Release held deliveries, then wait until every delivery is done (False: timed out, or
        the sender stopped with deliveries left)."""
        with self._cond:
            self._release_held()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._pending == 0 or self._stopping.is_set(), timeout)
            return self._pending == 0

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    @property
    def log(self) -> list[DeliveryRecord]:
        with self._cond:
            return list(self._log)

    def reset_log(self) -> None:
        with self._cond:
            self._log.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping.is_set():
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                job = self._queue.popleft()
            try:
                record = self._deliver(job)
            except Exception as bug:  # noqa: BLE001 - a sandbox bug must not stop every later delivery
                traceback.print_exc()
                record = _record(job, 0, None, f"sandbox error: {type(bug).__name__}: {bug}")
            with self._cond:
                self._log.append(record)
                self._pending -= 1
                self._cond.notify_all()

    # ----------------------------------------------------------------- HTTP

    def _deliver(self, job: _Job) -> DeliveryRecord:
        settings = self._settings()
        parts = urlsplit(job.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: job.signature,
            EVENT_HEADER: job.event,
            "User-Agent": "systeme-sandbox-webhooks",
        }
        attempts, status, error = 0, None, None  # type: tuple[int, int | None, str | None]
        while attempts < settings.attempts:
            if attempts and self._stopping.wait(settings.backoff * 2 ** (attempts - 1)):
                error = "the sandbox stopped"
                break
            attempts += 1
            try:
                status, error = self._post(parts, target, job.body, headers, settings.timeout), None
            except (OSError, http.client.HTTPException) as failure:
                status, error = None, f"{type(failure).__name__}: {failure}"
                continue
            if status is not None and status < 500 and status != 429:
                break
        return _record(job, attempts, status, error)

    def _post(self, parts: SplitResult, target: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        key = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        connection, reused = self._connection(key, timeout)
        try:
            return self._exchange(key, connection, target, body, headers)
        except _STALE:
            self._drop(key)
            if not reused:
                raise
        except BaseException:
            self._drop(key)
            raise
        # The receiver closed the idle connection: once more on a new one, not a new attempt.
        connection, _ = self._connection(key, timeout)
        try:
            return self._exchange(key, connection, target, body, headers)
        except BaseException:
            self._drop(key)
            raise

    def _exchange(
        self,
        key: tuple[str, str, int],
        connection: http.client.HTTPConnection,
        target: str,
        body: bytes,
        headers: dict[str, str],
    ) -> int:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        whole = response.length is not None and response.length <= MAX_ANSWER
        if whole:
            response.read()
        else:
            response.read(MAX_ANSWER)
        if not whole or response.will_close:
            self._drop(key)  # the rest of a long answer would be read as the next one
        return response.status

    def _connection(self, key: tuple[str, str, int], timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._connections_lock:
            if self._stopping.is_set():
                raise ConnectionAbortedError("the sandbox stopped")
            connection = self._connections.get(key)
            if connection is None:
                scheme, host, port = key
                if scheme == "https":
                    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
                else:
                    connection = http.client.HTTPConnection(host, port, timeout=timeout)
                self._connections[key] = connection
            connection.timeout = timeout
            sock = connection.sock
            if sock is not None:
                sock.settimeout(timeout)
        return connection, sock is not None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _drop(self, key: tuple[str, str, int]) -> None:
        with self._connections_lock:
            connection = self._connections.pop(key, None)
        if connection is not None:
            connection.close()

    def _close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections.values())
        for connection in connections:
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(2)  # SHUT_RDWR: a read blocked in the sender thread returns
                except OSError:
                    pass


def _record(job: _Job, attempts: int, status: int | None, error: str | None) -> DeliveryRecord:
    return DeliveryRecord(
        job.seq, job.webhook_id, job.event, job.url, job.body, job.signature, job.fault, attempts, status, error,
        time.time(),
    )  # fmt: skip


# ===================================================================== the account's webhooks


class Webhooks:
    """The webhooks of one ``SandboxData`` account, its changes, and their deliveries."""

    def __init__(self, data: SandboxData) -> None:
        self.data = data
        self._lock = threading.Lock()
        self._webhooks: dict[str, _Webhook] = {}
        self._ids = 0  # webhooks and subscriptions created: their ids derive from it
        self._sales: dict[int, Json] = {}
        self._fired = 0  # changes that sent deliveries: 'alternate' picks the shape by it
        self._settings = DeliverySettings()
        self._sender = _Sender(lambda: self._settings)

    def start(self, name: str = "sandbox-webhooks") -> None:
        self._sender.start(name)

    def stop(self) -> None:
        self._sender.stop()

    # ----------------------------------------------------------------- the resource

    def listing(self) -> list[Json]:
        with self._lock:
            return [webhook.public() for webhook in self._webhooks.values()]

    def get(self, webhook_id: str) -> Json:
        with self._lock:
            return self._find(webhook_id).public()

    def create(self, payload: dict[str, Json]) -> Json:
        """A new webhook from a ``CreateWebhookInput`` (BadInput, Invalid)."""
        _check_types(payload, ("name", "secret", "url", "subscriptions", "active"), nullable=("active",))
        problems = [
            *_text_violations("name", payload.get("name"), MAX_NAME, required=True),
            *_text_violations("secret", payload.get("secret"), MAX_SECRET, required=True),
            *_url_violations(payload.get("url")),
            *_subscription_violations(payload.get("subscriptions"), required=True),
        ]
        if problems:
            raise Invalid(problems)
        with self._lock:
            webhook = _Webhook(
                self._new_id("webhook"),
                payload["name"],
                payload["url"],
                payload["secret"],
                payload.get("active") is not False,
                {event: self._new_id("subscription") for event in payload["subscriptions"]},
            )
            self._webhooks[webhook.id] = webhook
            return webhook.public()

    def update(self, webhook_id: str, payload: dict[str, Json]) -> Json:
        """Apply an ``UpdateWebhookInput`` merge patch: a null name or secret keeps the current
        one; events kept in ``subscriptions`` keep their subscription ids (UnknownWebhook,
        BadInput, Invalid)."""
        with self._lock:
            self._find(webhook_id)  # an unknown id is a 404 whatever the body
        _check_types(payload, ("name", "secret", "subscriptions", "active"), nullable=("name", "secret", "active"))
        problems = [
            *_text_violations("name", payload.get("name"), MAX_NAME, required=False),
            *_text_violations("secret", payload.get("secret"), MAX_SECRET, required=False),
            *_subscription_violations(payload.get("subscriptions"), required=False),
        ]
        if problems:
            raise Invalid(problems)
        with self._lock:
            webhook = self._find(webhook_id)
            webhook.name = payload.get("name") or webhook.name
            webhook.secret = payload.get("secret") or webhook.secret
            if payload.get("active") is not None:
                webhook.active = payload["active"]
            if payload.get("subscriptions") is not None:
                kept = webhook.subscriptions
                webhook.subscriptions = {
                    event: kept.get(event) or self._new_id("subscription") for event in payload["subscriptions"]
                }
            return webhook.public()

    def delete(self, webhook_id: str) -> None:
        with self._lock:
            self._find(webhook_id)
            del self._webhooks[webhook_id]

    def register(
        self, url: str, secret: str, events: Sequence[str] = EVENTS, *, name: str = "sandbox", active: bool = True
    ) -> Json:
        """``create`` in-process: the webhook as the API shows it."""
        return self.create({"name": name, "url": url, "secret": secret, "subscriptions": list(events), "active": active})

    def _find(self, webhook_id: str) -> _Webhook:
        webhook = self._webhooks.get(webhook_id)
        if webhook is None:
            raise UnknownWebhook(f"no webhook with id {webhook_id!r}")
        return webhook

    def _new_id(self, kind: str) -> str:
        # Same seed, same calls: same ids; shaped like the UUIDs of the real API.
        self._ids += 1
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox:{self.data.seed}:{kind}:{self._ids}"))

    # ----------------------------------------------------------------- changes

    def add_tag(self, contact_id: int, tag_id: int) -> ChangeResult:
        changed = self.data.add_contact_tag(contact_id, tag_id)
        return self._fire("CONTACT_TAG_ADDED", contact_id, changed, send=changed, tag_id=tag_id)

    def remove_tag(self, contact_id: int, tag_id: int) -> ChangeResult:
        changed = self.data.remove_contact_tag(contact_id, tag_id)
        return self._fire("CONTACT_TAG_REMOVED", contact_id, changed, send=changed, tag_id=tag_id)

    def create_contacts(self, count: int = 1) -> list[ChangeResult]:
        return [self._fire("CONTACT_CREATED", new_id, True) for new_id in self.data.add_contacts(count)]

    def opt_in(self, contact_id: int) -> ChangeResult:
        changed = self.data.opt_in(contact_id)
        return self._fire("CONTACT_OPT_IN", contact_id, changed)

    def new_sale(self, contact_id: int) -> ChangeResult:
        self.data.contact(contact_id)  # KeyError for a contact that does not exist
        with self._lock:
            sale_id = FIRST_SALE_ID + len(self._sales)
            rng = random.Random(f"{self.data.seed}:sale:{sale_id}")
            self._sales[sale_id] = {
                "id": sale_id,
                "contactId": contact_id,
                "createdAt": _now_iso(),
                "amount": rng.choice(_PRICES),
                "currency": rng.choice(("EUR", "USD")),
                "status": "completed",
                "canceledAt": None,
            }
        return self._fire("SALE_NEW", contact_id, False, sale_id=sale_id)

    def cancel_sale(self, sale_id: int) -> ChangeResult:
        with self._lock:
            sale = self._sales.get(sale_id)
            if sale is None:
                raise KeyError(f"no sale with id {sale_id}")
            canceled_now = sale["status"] != "canceled"
            if canceled_now:
                sale.update(status="canceled", canceledAt=_now_iso())
        return self._fire("SALE_CANCELED", sale["contactId"], False, send=canceled_now, sale_id=sale_id)

    def apply(self, changes: Json) -> list[ChangeResult]:
        """Apply changes in the admin format (a list of ``{"event": ..., ...}``), in order.

        The whole list is checked first (ValueError: nothing applied); a change naming a contact,
        tag or sale that does not exist raises ``ChangeFailed`` (a KeyError), the changes before
        it staying applied.
        """
        parsed = _parse_changes(changes)
        results: list[ChangeResult] = []
        for index, change in enumerate(parsed):
            try:
                results += self._apply_one(change)
            except KeyError as error:
                raise ChangeFailed(index, change, str(error.args[0] if error.args else error), results) from None
        return results

    def _apply_one(self, change: dict[str, int | str]) -> list[ChangeResult]:
        event = change["event"]
        contact, tag, sale = (int(change.get(key, 0)) for key in ("contact", "tag", "sale"))
        if event == "CONTACT_CREATED":
            return self.create_contacts(int(change.get("count", 1)))
        if event == "CONTACT_TAG_ADDED":
            return [self.add_tag(contact, tag)]
        if event == "CONTACT_TAG_REMOVED":
            return [self.remove_tag(contact, tag)]
        if event == "CONTACT_OPT_IN":
            return [self.opt_in(contact)]
        if event == "SALE_NEW":
            return [self.new_sale(contact)]
        return [self.cancel_sale(sale)]

    def _fire(
        self, event: str, contact_id: int, changed: bool, *, send: bool = True, tag_id: int | None = None,
        sale_id: int | None = None,
    ) -> ChangeResult:  # fmt: skip
        """Queue the deliveries of one change (none when ``send`` is false)."""
        with self._lock:
            targets = [
                _Target(webhook.id, webhook.url, webhook.secret)
                for webhook in self._webhooks.values()
                if webhook.active and event in webhook.subscriptions
            ]
            sale = None if sale_id is None else {k: v for k, v in self._sales[sale_id].items() if k != "contactId"}
            shape = self._settings.shape
            if send and targets:
                if shape == "alternate":
                    shape = ("data", "flat")[self._fired % 2]
                self._fired += 1
        if not (send and targets):
            return ChangeResult(event, contact_id, changed, 0, tag_id, sale_id)
        tag = None if tag_id is None else self._tag(tag_id)
        body = delivery_body(event, shape, _now_iso(), self._contact(contact_id), tag, sale)
        self._sender.submit(targets, event, body)
        return ChangeResult(event, contact_id, changed, len(targets), tag_id, sale_id)

    def _contact(self, contact_id: int) -> Json:
        try:
            return self.data.contact(contact_id)
        except KeyError:  # a sale's contact deleted since: the id is all that is left of it
            return {"id": contact_id}

    def _tag(self, tag_id: int) -> Json:
        (tag,) = [{"id": tag["id"], "name": tag["name"]} for tag in self.data.records("tags") if tag["id"] == tag_id]
        return tag

    # ----------------------------------------------------------------- deliveries

    @property
    def settings(self) -> DeliverySettings:
        return self._settings

    @settings.setter
    def settings(self, settings: DeliverySettings) -> None:
        self._settings = settings

    @property
    def deliveries(self) -> list[DeliveryRecord]:
        """The deliveries done (sent, given up, lost), in the order they were done."""
        return self._sender.log

    def reset_deliveries(self) -> None:
        self._sender.reset_log()

    def wait_for_deliveries(self, timeout: float) -> bool:
        """Whether every queued delivery was done within ``timeout`` seconds (held ones are
        released first)."""
        return self._sender.wait_drained(timeout)

    @property
    def pending(self) -> int:
        return self._sender.pending

    def add_fault(self, fault: DeliveryFault) -> None:
        self._sender.faults.add(fault)

    def clear_faults(self) -> None:
        self._sender.faults.replace([])

    @property
    def faults(self) -> list[DeliveryFault]:
        return self._sender.faults.snapshot()

    # ----------------------------------------------------------------- admin endpoints

    def admin(self, method: str, path: str, body: bytes) -> AdminAnswer | None:
        """The admin endpoints under ``/__sandbox`` (``path`` is what follows it); None: not one.

        ``/changes`` (POST a list of changes), ``/deliveries`` (GET, DELETE = clear the log),
        ``/deliveries/wait`` (POST ``{"timeout": s}``), ``/delivery-faults`` (GET, POST = replace,
        DELETE = clear), ``/delivery-settings`` (GET, POST = set the fields given).
        """
        routes: dict[str, tuple[str, Callable[[str, bytes], AdminAnswer]]] = {
            "/changes": ("POST", self._admin_changes),
            "/deliveries": ("GET, DELETE", self._admin_deliveries),
            "/deliveries/wait": ("POST", self._admin_wait),
            "/delivery-faults": ("GET, POST, DELETE", self._admin_faults),
            "/delivery-settings": ("GET, POST", self._admin_settings),
        }
        if path not in routes:
            return None
        allowed, handler = routes[path]
        if method not in allowed.split(", "):
            return AdminAnswer(405, {"title": "An error occurred", "detail": "Method Not Allowed"}, allowed)
        try:
            payload = json.loads(body or b"null")
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _bad("Bad request", "the body is not JSON")
        return handler(method, payload)

    def _admin_changes(self, method: str, payload: Json) -> AdminAnswer:
        try:
            results = self.apply(payload)
        except ChangeFailed as failed:
            applied = [result._asdict() for result in failed.applied]
            return AdminAnswer(422, {"title": "Change failed", "detail": str(failed), "results": applied})
        except ValueError as error:
            return _bad("Bad change list", str(error))
        return AdminAnswer(200, {"results": [result._asdict() for result in results]})

    def _admin_deliveries(self, method: str, payload: Json) -> AdminAnswer:
        if method == "DELETE":
            self.reset_deliveries()
        return AdminAnswer(200, {"deliveries": [record.to_json() for record in self.deliveries], "pending": self.pending})

    def _admin_wait(self, method: str, payload: Json) -> AdminAnswer:
        timeout = (payload or {}).get("timeout", 10) if isinstance(payload, dict | None) else None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_WAIT:
            return _bad("Bad wait", f'expected {{"timeout": seconds from 0 to {MAX_WAIT:g}}}, got {payload!r}')
        drained = self.wait_for_deliveries(timeout)
        return AdminAnswer(200, {"drained": drained, "pending": self.pending})

    def _admin_faults(self, method: str, payload: Json) -> AdminAnswer:
        if method == "POST":
            try:
                if not isinstance(payload, list):
                    raise ValueError("expected a JSON list of delivery fault objects")
                faults = [DeliveryFault.from_json(obj) for obj in payload]
            except (ValueError, TypeError) as error:
                return _bad("Bad delivery fault list", str(error))
            self._sender.faults.replace(faults)
        elif method == "DELETE":
            self.clear_faults()
        return AdminAnswer(200, {"faults": [asdict(fault) for fault in self.faults]})

    def _admin_settings(self, method: str, payload: Json) -> AdminAnswer:
        if method == "POST":
            try:
                self.settings = DeliverySettings.from_json(payload, self.settings)
            except (ValueError, TypeError) as error:
                return _bad("Bad delivery settings", str(error))
        return AdminAnswer(200, asdict(self.settings))


class ChangeFailed(KeyError):
    """A change named a contact, tag or sale the account does not hold; ``applied`` are the
    results of the changes before it, which stay applied."""

    def __init__(self, index: int, change: dict[str, int | str], reason: str, applied: list[ChangeResult]) -> None:
        super().__init__(index, change, reason)
        self.applied = applied
        self.message = f"change {index} ({change['event']}): {reason}; the {index} before it were applied"

    def __str__(self) -> str:
        return self.message


def _bad(title: str, detail: str) -> AdminAnswer:
    return AdminAnswer(400, {"title": title, "detail": detail})


def _parse_changes(changes: Json) -> list[dict[str, int | str]]:
    """Check a list of changes in the admin format; ValueError names the first bad one."""
    if not isinstance(changes, list):
        raise ValueError(f"expected a JSON list of changes, got {type(changes).__name__}")
    if len(changes) > MAX_CHANGES:
        raise ValueError(f"at most {MAX_CHANGES} changes at once, got {len(changes)}")
    return [_parse_change(index, change) for index, change in enumerate(changes)]


def _parse_change(index: int, change: Json) -> dict[str, int | str]:
    where = f"change {index}"
    if not isinstance(change, dict) or change.get("event") not in _CHANGE_KEYS:
        raise ValueError(f'{where}: expected {{"event": one of {list(EVENTS)}, ...}}, got {change!r}')
    required, optional = _CHANGE_KEYS[change["event"]]
    unknown = sorted(set(change) - {"event", *required, *optional})
    missing = [key for key in required if key not in change]
    if unknown or missing:
        raise ValueError(f"{where} ({change['event']}) takes {list(required + optional)}: missing {missing}, unknown {unknown}")
    for key in (*required, *optional):
        value = change.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} ({change['event']}): {key} must be an id, an int >= 1, got {value!r}")
    if change.get("count", 1) > MAX_CREATED:
        raise ValueError(f"{where} (CONTACT_CREATED): at most {MAX_CREATED} contacts at once, got {change['count']}")
    return dict(change)
