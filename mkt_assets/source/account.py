"""Which API and which key: the base URL checked (https, or plain http to a simulator on this
machine), the key read from its setting and checked, and the rate limiter the processes using
that key share. Nothing of Dagster: the Dagster resource builds its client from these, and so
do the CLI's webhook commands, which load no Dagster."""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Callable
from urllib.parse import urlsplit

from mkt_assets.core.catalog import DEFAULT_BASE_URL
from mkt_assets.core.errors import API_KEY_ENV, ConfigurationError
from mkt_assets.source.client import DEFAULT_MAX_WAIT_SECONDS, key_problem
from mkt_assets.source.ratelimit import SharedRateLimiter, state_path_for

# What a paste or a secret file leaves around a key: blanks, line breaks, a byte order mark.
# Not Python's whole idea of whitespace, which takes the control characters U+001C-U+001F in too:
# those are refused as the key's own, never silently dropped.
SURROUNDING_WHITESPACE = " \t\r\n\u2028\u2029\ufeff" + "".join(
    chr(point) for point in range(0x80, 0x3001) if unicodedata.category(chr(point)) == "Zs"
)
BASE_URL_ENV = "MKT_API_BASE_URL"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(url: str, setting: str = BASE_URL_ENV, key_setting: str = API_KEY_ENV) -> str:
    """The key may only travel encrypted, except to a simulator on this machine.

    Raises ``ValueError`` (pydantic reports it as the field's error) whose message never holds
    a user name or password the URL carries; it names ``setting``, where the URL was given, and
    ``key_setting``, where the key is."""
    if "@" in url:
        # Looked for anywhere: without a scheme ("user:pw@host/api") urlsplit finds no userinfo.
        raise ValueError(
            f"{setting}{' (base_url)' if setting == BASE_URL_ENV else ''} must not carry credentials (a user name or password before @):"
            f" the API takes its key from {key_setting}; give the URL alone, like {DEFAULT_BASE_URL}"
        )
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        # Not quoted: whatever was pasted there (a query with a token) could be a secret.
        raise ValueError(f"{setting} must be an absolute URL like {DEFAULT_BASE_URL}; the one given has no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{setting} must not carry a query or a fragment")
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host)):
        return url.rstrip("/")
    raise ValueError(
        f"{setting} must use https (plain http is allowed only for loopback hosts"
        f" such as the bundled simulator), got {parts.scheme}://{host}"
    )


def check_api_key(raw: str, setting: str, env: str = API_KEY_ENV) -> tuple[str, str | None]:
    """The key as it is sent and, when whitespace around it was removed, the line saying so.
    ``raw``: the key as configured, read from ``setting`` (as messages name it); ``env``: the
    environment variable a missing key is to be set in.

    Whitespace around a key is a pasting or secret-file accident (a final line break) and
    never part of it: HTTP itself drops it from a header's value, so the key the server would
    read is the stripped one. It is removed, with a warning; anything else that cannot be sent
    is refused with ``ConfigurationError``. Neither message holds any of the key."""
    if not raw:
        raise ConfigurationError(f"No API key: set {env} to a key made in the account's profile settings.")
    key = raw.strip(SURROUNDING_WHITESPACE)
    if not key:
        raise ConfigurationError(
            f"No API key: {setting} holds only whitespace; set it to a key made in the account's profile settings."
        )
    problem = key_problem(key)
    if problem is not None:
        raise ConfigurationError(
            f"{setting} {problem}: set it to the key exactly as made in the account's profile settings."
        )
    if key == raw:
        return key, None
    where = " and ".join(
        side for side, removed in (("before", raw[: raw.index(key)]), ("after", raw[raw.index(key) + len(key) :])) if removed
    )
    removed = raw.replace(key, "", 1)
    kinds = "a line break" if any(c in "\r\n\u2028\u2029" for c in removed) else "a tab" if removed == "\t" else "spaces"
    return key, (
        f"{setting} has whitespace {where} the key ({kinds}, as a secret file or a paste leaves);"
        " it is sent without it. Remove it from the setting to silence this warning."
    )


def shared_rate_limiter(
    base_url: str,
    key: str,
    directory: str | None = None,
    horizon: float = DEFAULT_MAX_WAIT_SECONDS,
    log: Callable[[str], None] | None = None,
) -> SharedRateLimiter:
    """The pacing every process using ``key`` on ``base_url``'s origin shares (its state in
    ``directory``, default: the private temporary one)."""
    parts = urlsplit(base_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return SharedRateLimiter(state_path_for(origin, key, directory), horizon=horizon, log=log)
