"""A webhook delivery as the platform sends it: the ONE place that knows its format.

What a delivery holds beyond the API's spec is reported by integrations, not specified: a JSON
POST signed with the webhook's secret (``X-Webhook-Signature``: the hex HMAC-SHA256 of the raw
body), the event named in the body (``type`` or ``event``) or in an ``X-Webhook-Event`` header,
the contact as an object at the top level (``contact``) or under ``data``. So a delivery is a
hint: it is verified and kept, the contact id is taken from it, and the contact itself is read
from the API. Should the platform say otherwise, the header names, the signature scheme and
where the event and the contact id are looked for each change in one line below.

A contact id is an exact positive integer: a JSON integer, or a text of ASCII digits written
as the integer is (``"123"``, not ``"0123"``, ``"+1"``, ``" 1"`` or ``"1.0"``), within DuckDB's
BIGINT. Texts are taken because webhook bodies often carry ids as strings, and taking one costs
nothing when wrong: the contact read by that id is the truth (a 404 says it is gone). Anything
else (a float, a boolean, a negative number, a name) is no id: the delivery is kept with none.

Pure: no I/O. The secret comes in as a value (read from the environment by the caller).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn

from mkt_assets.core.errors import ConfigurationError

# ---------------------------------------------------------------- the format, one line each

SIGNATURE_HEADER = "X-Webhook-Signature"
EVENT_HEADER = "X-Webhook-Event"
SIGNATURE_DIGEST = hashlib.sha256  # HMAC-<digest> of the raw body, keyed with the secret, in hex
EVENT_FIELDS = ("type", "event")  # looked for in the body in this order, then EVENT_HEADER
CONTACT_ID_PATHS = (("contact", "id"), ("data", "contact", "id"))  # the first one present wins

# The events a webhook can subscribe to (the API's spec): registration subscribes to them all.
EVENTS = (
    "CONTACT_CREATED",
    "CONTACT_TAG_ADDED",
    "CONTACT_TAG_REMOVED",
    "CONTACT_OPT_IN",
    "SALE_NEW",
    "SALE_CANCELED",
)

WEBHOOK_SECRET_ENV = "MKT_WEBHOOK_SECRET"
MIN_SECRET_CHARACTERS = 16
# A secret is a short token: anything longer is a file or a page pasted by mistake.
MAX_SECRET_CHARACTERS = 1024
# An event name is a short word; a longer or odder one is kept in the body, not as the type.
_EVENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CONTACT_ID_TEXT = re.compile(r"[1-9][0-9]{0,18}")
_MAX_CONTACT_ID = (1 << 63) - 1
_HEX_DIGEST_CHARACTERS = SIGNATURE_DIGEST().digest_size * 2
_HEX = re.compile(rf"[0-9a-fA-F]{{{_HEX_DIGEST_CHARACTERS}}}")
# What a secret file or a paste leaves around a secret; removed, never part of it.
_SURROUNDING_WHITESPACE = " \t\r\n"


class WebhookSecret:
    """The webhook's shared secret. Its repr and str never show it; it cannot be pickled (so
    it reaches no run config, event log or file by accident); ``reveal()`` hands the text to
    the one request that registers it."""

    __slots__ = ("_key",)

    def __init__(self, text: str) -> None:
        problem = secret_problem(text)
        if problem is not None:
            raise ConfigurationError(f"the webhook secret {problem}")
        self._key = text.encode("ascii")

    def reveal(self) -> str:
        return self._key.decode("ascii")

    def sign(self, body: bytes) -> str:
        return sign(body, self)

    def __repr__(self) -> str:
        return "WebhookSecret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a WebhookSecret is never pickled: it would be written where it does not belong")


def secret_problem(text: str) -> str | None:
    """Why ``text`` cannot be a webhook secret, or None; never quotes it, nor says its length."""
    if not text:
        return "is empty"
    if len(text) > MAX_SECRET_CHARACTERS:
        return f"is longer than any secret (at most {MAX_SECRET_CHARACTERS} characters): a file pasted by mistake?"
    for position, character in enumerate(text, start=1):
        if not "!" <= character <= "~":
            # The HMAC key is the secret's bytes: outside printable ASCII, the platform and this
            # receiver could encode it differently and no signature would ever match.
            return f"has a space, a control character or a character outside ASCII at character {position}"
    if len(text) < MIN_SECRET_CHARACTERS:
        return f"is shorter than {MIN_SECRET_CHARACTERS} characters, too short to keep forged deliveries out"
    return None


def webhook_secret(environment: Mapping[str, str], name: str = WEBHOOK_SECRET_ENV) -> WebhookSecret:
    """The secret from ``environment[name]`` (whitespace around it removed, as a secret file's
    final line break); ``ConfigurationError`` naming the variable, never its value, if it is
    missing or cannot be a secret."""
    advice = f"set {name} to a random token, e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
    raw = environment.get(name)
    if raw is None:
        raise ConfigurationError(f"{name} is not set: {advice}")
    text = raw.strip(_SURROUNDING_WHITESPACE)
    if not text:
        raise ConfigurationError(f"{name} is {'empty' if not raw else 'only whitespace'}: {advice}")
    problem = secret_problem(text)
    if problem is not None:
        raise ConfigurationError(f"{name} {problem}: {advice}")
    return WebhookSecret(text)


# ---------------------------------------------------------------- signatures


def sign(body: bytes, secret: WebhookSecret | str) -> str:
    """The signature the platform sends for ``body``: lowercase hex HMAC of the raw bytes."""
    key = secret._key if isinstance(secret, WebhookSecret) else secret.encode()
    return hmac.new(key, body, SIGNATURE_DIGEST).hexdigest()


def verify(body: bytes, secret: WebhookSecret, signature: str | None) -> bool:
    """Whether ``signature`` (the header's value, hex in either case, blanks around it allowed)
    is ``body``'s. Compared in constant time, so a forger learns nothing from the timing."""
    if signature is None:
        return False
    given = signature.strip(_SURROUNDING_WHITESPACE)
    if not _HEX.fullmatch(given):
        return False
    return hmac.compare_digest(given.lower(), sign(body, secret))


# ---------------------------------------------------------------- the body


class DeliveryFormatError(ValueError):
    """A body that is not a JSON object: answered 400, kept nowhere. The message never quotes it."""


@dataclass(frozen=True)
class DeliveryFacts:
    """What the receiver takes from a delivery: the event and the contact, each None if absent."""

    event_type: str | None
    contact_id: int | None


@dataclass(frozen=True)
class Delivery:
    """One accepted delivery as the inbox keeps it. ``body`` is the raw JSON text as received:
    it holds a contact's data, so it is left out of the repr (and so out of any log)."""

    seq: int  # the inbox's order of arrival: increasing, never reused
    received_at: datetime  # UTC
    event_type: str | None
    contact_id: int | None
    signature_verified: bool
    digest: str  # hex SHA-256 of the raw body: the same body twice is one delivery
    body: str = field(repr=False)


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def parse(body: bytes, headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> DeliveryFacts:
    """The event type and contact id of a delivery; ``DeliveryFormatError`` if ``body`` is not a
    JSON object (UTF-8, standard JSON: no NaN or Infinity). A JSON object never raises: what is
    missing or malformed in it is None."""
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except UnicodeDecodeError:
        raise DeliveryFormatError("the body is not UTF-8 text") from None
    except RecursionError:
        raise DeliveryFormatError("the body nests deeper than it can be parsed") from None
    except ValueError:
        raise DeliveryFormatError("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise DeliveryFormatError(f"the body is {_kind(payload)}, not a JSON object")
    return DeliveryFacts(event_type(payload, headers), contact_id(payload))


def event_type(payload: Mapping[str, Any], headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> str | None:
    for name in EVENT_FIELDS:
        value = payload.get(name)
        if isinstance(value, str) and _EVENT_NAME.fullmatch(value):
            return value
    value = header(headers, EVENT_HEADER)
    if value is not None:
        value = value.strip(_SURROUNDING_WHITESPACE)
        if _EVENT_NAME.fullmatch(value):
            return value
    return None


def contact_id(payload: Mapping[str, Any]) -> int | None:
    for path in CONTACT_ID_PATHS:
        found, value = _at(payload, path)
        if found:
            return exact_contact_id(value)
    return None


def exact_contact_id(value: object) -> int | None:
    """``value`` as a contact id if it is exactly one (see the module's docstring), else None."""
    if type(value) is int:
        number = value
    elif isinstance(value, str) and _CONTACT_ID_TEXT.fullmatch(value):
        number = int(value)
    else:
        return None
    return number if 0 < number <= _MAX_CONTACT_ID else None


def header(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name``, in any case (HTTP header names are case-insensitive)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    wanted = name.lower()
    for key, value in pairs:
        if key.lower() == wanted:
            return value
    return None


def _at(payload: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, object]:
    value: object = payload
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return False, None
        value = value[name]
    return True, value


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def _kind(value: object) -> str:
    names = {list: "a JSON list", str: "a JSON text", bool: "a JSON boolean", int: "a JSON number", float: "a JSON number"}
    return "JSON null" if value is None else names.get(type(value), "a JSON value")
