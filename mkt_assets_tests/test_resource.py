"""The Dagster resource: settings validated on construction, the key kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mkt_assets.core.errors import ConfigurationError, PrivateDirectoryError
from mkt_assets.orchestration.resource import MarketingApiResource

KEY = "resource-secret-77aa"


@pytest.mark.parametrize(
    "url",
    [
        "https://api.systeme.io/api",
        "https://api.systeme.io/api/",
        "http://127.0.0.1:8765/api",
        "http://localhost:8765/api",
        "http://[::1]:8765/api",
        "http://127.3.2.1/api",
    ],
)
def test_https_and_loopback_base_urls_are_accepted(url: str) -> None:
    assert MarketingApiResource(base_url=url, api_key=KEY).base_url == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://api.systeme.io/api", "must use https"),
        ("http://10.0.0.5/api", "must use https"),
        ("ftp://api.systeme.io/api", "must use https"),
        ("api.systeme.io/api", "must be an absolute URL"),
        ("https://user:pw@api.systeme.io/api", "must not carry credentials"),
    ],
)
def test_other_base_urls_are_refused_at_configuration_time(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MarketingApiResource(base_url=url, api_key=KEY)


@pytest.mark.parametrize("page_size", [9, 101])
def test_page_size_outside_what_the_api_allows_is_refused(page_size: int) -> None:
    with pytest.raises(ValidationError, match="page_size"):
        MarketingApiResource(api_key=KEY, page_size=page_size)


def test_order_must_be_asc_desc_or_both() -> None:
    assert MarketingApiResource(api_key=KEY).order == "both"
    with pytest.raises(ValidationError, match="order must be one of asc, desc, both; got 'newest'"):
        MarketingApiResource(api_key=KEY, order="newest")


def test_the_key_is_not_in_the_resource_repr_or_str() -> None:
    resource = MarketingApiResource(api_key=KEY)
    assert KEY not in repr(resource) and KEY not in str(resource)
    with resource.get_client() as client:
        assert KEY not in repr(client)


def test_a_client_without_a_key_cannot_be_built_and_says_which_setting() -> None:
    with pytest.raises(ConfigurationError, match="No API key: set MKT_API_KEY"):
        MarketingApiResource().get_client()


def test_the_rate_limiter_waits_at_most_max_wait_seconds_and_logs_through_the_callers_log(tmp_path: Path) -> None:
    resource = MarketingApiResource(api_key=KEY, quota_state_dir=str(tmp_path / "quota"), max_wait_seconds=30)
    logged: list[str] = []
    limiter = resource._rate_limiter(logged.append)
    assert limiter is not None

    limiter.observe({"X-RateLimit-Remaining": "0", "X-RateLimit-Refill": "60"})

    assert limiter.horizon == 30
    assert logged == ["X-RateLimit-Refill: 60 is 60 s ahead, more than the 30 s horizon: treated as unknown"]


def test_max_wait_seconds_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="max_wait_seconds"):
        MarketingApiResource(api_key=KEY, max_wait_seconds=0)


def test_a_quota_state_dir_others_may_enter_is_refused_when_a_client_is_built(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    resource = MarketingApiResource(api_key=KEY, quota_state_dir=str(shared))

    with pytest.raises(PrivateDirectoryError, match=r"shared for private files: its mode is 0755"):
        resource.get_client()


PASSWORD = "pw-secret-93f1"


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{PASSWORD}@api.systeme.io/api",
        f"https://{PASSWORD}@api.systeme.io/api",
        f"user:{PASSWORD}@api.systeme.io/api",  # no scheme: urlsplit sees no userinfo
        f"api.systeme.io/api?token={PASSWORD}",
    ],
)
def test_a_refused_base_url_is_never_echoed_even_by_pydantic(url: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MarketingApiResource(base_url=url, api_key=KEY)

    assert PASSWORD not in str(caught.value)


def test_a_refused_api_key_value_is_not_echoed_by_pydantic() -> None:
    with pytest.raises(ValidationError) as caught:
        MarketingApiResource(api_key=[KEY])  # type: ignore[arg-type]

    assert KEY not in str(caught.value)


@pytest.mark.parametrize("separator", ["\x1c", "\x1f", "\x0b"])
def test_a_control_character_around_the_key_is_refused_not_stripped(monkeypatch: pytest.MonkeyPatch, separator: str) -> None:
    monkeypatch.setenv("MKT_API_KEY", KEY + separator)

    with pytest.raises(ConfigurationError) as caught:
        MarketingApiResource().checked_key()

    assert f"MKT_API_KEY has a control character (U+{ord(separator):04X})" in str(caught.value)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "where", "kind"),
    [
        (KEY + "\n", "after", "a line break"),
        (KEY + "\r\n", "after", "a line break"),
        ("  " + KEY + "\t", "before and after", "spaces"),
        ("\ufeff" + KEY + "\u00a0", "before and after", "spaces"),
        (KEY + "\t", "after", "a tab"),
    ],
)
def test_whitespace_around_the_environments_key_is_removed_with_a_warning_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str, where: str, kind: str
) -> None:
    monkeypatch.setenv("MKT_API_KEY", raw)
    resource = MarketingApiResource()

    key, warning = resource.checked_key()

    assert key == KEY and resource.key() == KEY
    assert warning == (
        f"MKT_API_KEY has whitespace {where} the key ({kind}, as a secret file or a paste leaves);"
        " it is sent without it. Remove it from the setting to silence this warning."
    )
    with resource.get_client() as client:
        assert client._headers["X-API-Key"] == KEY


def test_a_clean_key_gives_no_warning_and_a_configured_one_is_named_as_the_resources_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MKT_API_KEY", "another")
    assert MarketingApiResource(api_key=KEY).checked_key() == (KEY, None)
    with pytest.raises(ConfigurationError, match=r"^the marketing_api resource's api_key has a line break \(U\+000A\)"):
        MarketingApiResource(api_key=KEY[:4] + "\n" + KEY[4:]).checked_key()


def test_a_key_of_whitespace_alone_is_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKT_API_KEY", " \n")
    with pytest.raises(ConfigurationError, match=r"^No API key: MKT_API_KEY holds only whitespace"):
        MarketingApiResource().key()
