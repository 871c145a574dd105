"""The Dagster resource: settings validated on construction, the key kept secret."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mkt_assets.errors import ConfigurationError
from mkt_assets.resource import MarketingApiResource

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
