"""The HTTP client against faked HTTP (responses): pagination, retries, errors, the key."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import re
import string
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from responses import matchers
from urllib3 import HTTPResponse

from mkt_assets.core.catalog import RESOURCES_BY_NAME
from mkt_assets.core.errors import (
    ApiAccessError,
    ApiAuthError,
    ApiError,
    ApiResponseError,
    ApiStatusError,
    ApiValidationError,
    ConfigurationError,
    PaginationError,
)
from mkt_assets.source.client import MarketingApiClient, key_pieces
from mkt_assets.source.transport import WaitTooLong

BASE = "https://api.example.test/api"
KEY = "test-key-0123456789"
CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
FIELDS = RESOURCES_BY_NAME["contact_fields"]


def make_client(**options: Any) -> MarketingApiClient:
    options.setdefault("backoff_factor", 0)
    # A single ascending walk unless a test says otherwise; the two-ended walk (the default
    # order, "both") has its own tests at the end of this file.
    options.setdefault("order", "asc")
    return MarketingApiClient(BASE, KEY, key_setting="MKT_API_KEY", **options)


def page(ids: list[int], has_more: bool) -> dict[str, Any]:
    return {"items": [{"id": i, "name": f"tag {i}"} for i in ids], "hasMore": has_more}


def queries(calls: responses.CallList) -> list[dict[str, str]]:
    return [{k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()} for call in calls]


@responses.activate
def test_pages_follow_the_last_id_ascending_until_has_more_is_false() -> None:
    url = f"{BASE}/tags"
    responses.get(url, json=page([1, 2, 3], True), match=[matchers.query_param_matcher({"limit": "100", "order": "asc"})])
    responses.get(url, json=page([5, 8], True), match=[matchers.query_param_matcher({"limit": "100", "order": "asc", "startingAfter": "3"})])
    responses.get(url, json=page([13], False), match=[matchers.query_param_matcher({"limit": "100", "order": "asc", "startingAfter": "8"})])

    with make_client() as client:
        pages = list(client.iter_pages(TAGS))

    assert [[item["id"] for item in p.items] for p in pages] == [[1, 2, 3], [5, 8], [13]]
    assert [p.number for p in pages] == [1, 2, 3]
    assert len(responses.calls) == 3


@responses.activate
def test_pages_follow_the_last_id_descending() -> None:
    url = f"{BASE}/tags"
    responses.get(url, json=page([30, 20], True), match=[matchers.query_param_matcher({"limit": "50", "order": "desc"})])
    responses.get(url, json=page([10], False), match=[matchers.query_param_matcher({"limit": "50", "order": "desc", "startingAfter": "20"})])

    with make_client(order="desc", page_size=50) as client:
        ids = [item["id"] for p in client.iter_pages(TAGS) for item in p.items]

    assert ids == [30, 20, 10]


@responses.activate
def test_no_request_is_made_after_has_more_is_false() -> None:
    url = f"{BASE}/tags"
    responses.get(url, json=page([1], False))
    responses.get(url, json=page([2], False))

    with make_client() as client:
        assert len(list(client.iter_pages(TAGS))) == 1
    assert len(responses.calls) == 1


@responses.activate
def test_pages_are_yielded_before_the_next_one_is_requested() -> None:
    url = f"{BASE}/tags"
    responses.get(url, json=page([1], True))
    responses.get(url, json=page([2], False))

    with make_client() as client:
        pages = client.iter_pages(TAGS)
        next(pages)
        assert len(responses.calls) == 1
        next(pages)
        assert len(responses.calls) == 2


@responses.activate
def test_contact_fields_are_one_request_without_parameters() -> None:
    body = {"items": [{"slug": "first_name", "fieldName": "First name"}, {"slug": "city", "fieldName": "City"}], "hasMore": False}
    responses.get(f"{BASE}/contact_fields", json=body)

    with make_client() as client:
        pages = list(client.iter_pages(FIELDS))

    assert len(responses.calls) == 1
    assert urlsplit(responses.calls[0].request.url).query == ""
    assert [item["slug"] for item in pages[0].items] == ["first_name", "city"]


@responses.activate
def test_every_request_carries_the_key_and_asks_for_json() -> None:
    url = f"{BASE}/tags"
    headers = matchers.header_matcher({"X-API-Key": KEY, "Accept": "application/json"})
    responses.get(url, json=page([1], True), match=[headers])
    responses.get(url, json=page([2], False), match=[headers])

    with make_client() as client:
        list(client.iter_pages(TAGS))
    assert all(call.request.headers["X-API-Key"] == KEY for call in responses.calls)


@responses.activate
def test_retryable_answers_are_retried_then_succeed_and_are_counted() -> None:
    url = f"{BASE}/tags"
    responses.get(url, status=429, headers={"Retry-After": "0"}, json={"title": "Too Many Requests"})
    responses.get(url, status=502, json={"detail": "bad gateway"})
    responses.get(url, status=503, headers={"Retry-After": "0"}, json={"detail": "unavailable"})
    responses.get(url, json=page([1], False))

    with make_client() as client:
        pages = list(client.iter_pages(TAGS))
        stats = client.stats

    assert pages[0].items == [{"id": 1, "name": "tag 1"}]
    assert len(responses.calls) == 4
    assert (stats.retries, stats.throttled, stats.statuses) == (3, 1, {429: 1, 502: 1, 503: 1})


def test_retry_after_is_honoured_on_every_retried_status() -> None:
    retry = make_client()._session.get_adapter(BASE).max_retries
    for status in (429, 500, 502, 503, 504):
        assert retry.is_retry("GET", status, has_retry_after=True)
        assert status in retry.RETRY_AFTER_STATUS_CODES
    assert (retry.total, retry.backoff_factor) == (3, 0)
    assert not retry.is_retry("GET", 401) and not retry.is_retry("GET", 422)


@responses.activate
def test_retries_exhausted_raise_with_the_last_status() -> None:
    url = f"{BASE}/tags"
    responses.get(url, status=503, json={"detail": "down for maintenance"})

    with make_client() as client, pytest.raises(ApiStatusError) as caught:
        list(client.iter_pages(TAGS))

    assert caught.value.status == 503
    assert len(responses.calls) == 4  # the request and 3 retries
    message = str(caught.value)
    assert "tags: GET /api/tags?limit=100&order=asc" in message
    assert "down for maintenance" in message


@responses.activate
def test_a_rejected_key_fails_at_once_naming_the_setting_and_quoting_the_detail() -> None:
    responses.get(f"{BASE}/contacts", status=401, json={"detail": "Full authentication is required to access this resource."})

    with make_client() as client, pytest.raises(ApiAuthError) as caught:
        list(client.iter_pages(CONTACTS))

    assert len(responses.calls) == 1
    assert str(caught.value) == (
        "contacts: GET /api/contacts?limit=100&order=asc: HTTP 401: the API key was rejected"
        ' (the API said "Full authentication is required to access this resource.");'
        " set MKT_API_KEY to a valid key (made in the account's profile settings)"
    )
    assert KEY not in str(caught.value)


MEMBERSHIPS = RESOURCES_BY_NAME["memberships"]


@responses.activate
@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (403, {"title": "An error occurred", "detail": "Your plan does not include communities"},
         'the account cannot read memberships (the API said "Your plan does not include communities");'
         " the key is not at fault, so keep it. Leave memberships out by listing the resources to sync in"
         " MKT_RESOURCES (comma-separated; unset syncs all)"),
        # A server may route before it authenticates: a 404 does not clear the key.
        (404, {"title": "An error occurred", "detail": "Not Found"},
         'the account cannot read memberships, or the API serves nothing at this address (the API said "Not Found").'
         " Leave memberships out by listing the resources to sync in MKT_RESOURCES (comma-separated; unset syncs"
         " all), or, if every resource answers 404, check the base URL (MKT_API_BASE_URL)"),
    ],
)  # fmt: skip
def test_a_resource_the_account_cannot_read_is_not_blamed_on_the_key_and_names_mkt_resources(
    status: int, body: dict[str, str], problem: str
) -> None:
    responses.get(f"{BASE}/community/memberships", status=status, json=body)

    with make_client() as client, pytest.raises(ApiAccessError) as caught:
        list(client.iter_pages(MEMBERSHIPS))

    assert len(responses.calls) == 1  # not retried: asking again cannot help
    assert not isinstance(caught.value, ApiAuthError)
    assert caught.value.status == status
    assert str(caught.value) == f"memberships: GET /api/community/memberships?limit=100&order=asc: HTTP {status}: {problem}"
    assert caught.value.base_url == BASE
    assert "MKT_API_KEY" not in str(caught.value)


@responses.activate
@pytest.mark.parametrize(
    ("body", "quoted"),
    [
        # One line, bounded: a long multi-line detail is cut, its line breaks and controls gone.
        ({"detail": "Your plan\ndoes not\x1b[31m include " + "x" * 400}, '"Your plan does not [31m include ' + "x" * 125 + '..."'),
        ({"title": "Forbidden"}, '"Forbidden"'),
        # Its own quotes escaped: the quote cannot be mistaken for ending before they do.
        ({"detail": 'Plan "Startup" lacks it"); do this'}, '"Plan \\"Startup\\" lacks it\\"); do this"'),
    ],
)
def test_the_quoted_detail_is_one_bounded_line(body: dict[str, str], quoted: str) -> None:
    responses.get(f"{BASE}/community/memberships", status=403, json=body)

    with make_client() as client, pytest.raises(ApiAccessError) as caught:
        list(client.iter_pages(MEMBERSHIPS))

    assert f"(the API said {quoted})" in str(caught.value)
    assert "\n" not in str(caught.value)


@responses.activate
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, json.dumps({"detail": f"Invalid API key {KEY}"})),
        (401, json.dumps({"detail": f"Invalid API key {KEY[:9]}..."})),  # a piece of the key
        (403, "<html><body>Forbidden by the proxy</body></html>"),  # not a problem detail
        (404, json.dumps({"detail": ["not", "text"]})),
    ],
)
def test_a_detail_that_could_hold_the_key_or_is_not_text_is_not_quoted(status: int, body: str) -> None:
    responses.get(f"{BASE}/contacts", status=status, body=body)

    with make_client() as client, pytest.raises(ApiError) as caught:
        list(client.iter_pages(CONTACTS))

    message = str(caught.value)
    assert f"HTTP {status}: " in message and "the API said" not in message
    assert KEY[:9] not in message and "proxy" not in message


@responses.activate
def test_422_shows_the_api_violations() -> None:
    body = {
        "title": "An error occurred",
        "detail": "limit: This value should be between 10 and 100.",
        "violations": [{"propertyPath": "pagination.limit", "message": "This value should be between 10 and 100.", "code": "x"}],
    }
    responses.get(f"{BASE}/contacts", status=422, json=body)

    with make_client() as client, pytest.raises(ApiValidationError) as caught:
        list(client.iter_pages(CONTACTS))

    assert caught.value.violations == body["violations"]
    assert "pagination.limit: This value should be between 10 and 100." in str(caught.value)
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b'{"items": [{"id": 1}', "application/json", "the JSON body does not parse"),
        (b"<html><body>Maintenance</body></html>", "text/html", "expected JSON, got text/html"),
        (b'{"hasMore": false}', "application/json", "no 'items'"),
        (b'{"items": {"id": 1}, "hasMore": false}', "application/json", "not a list"),
        (b'{"items": [{"id": 1}]}', "application/json", "'hasMore' is missing"),
        (b'{"items": [1, 2], "hasMore": false}', "application/json", "record 1 is int"),
    ],
)
def test_a_malformed_page_is_a_clear_error(body: bytes, content_type: str, problem: str) -> None:
    responses.get(f"{BASE}/tags", body=body, content_type=content_type)

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(TAGS))

    assert problem in str(caught.value)
    assert str(caught.value).startswith("tags: GET /api/tags?limit=100&order=asc: page 1:")


@responses.activate
@pytest.mark.parametrize(
    ("second_page", "problem"),
    [
        (page([3], True), "did not advance"),  # the same last id again
        (page([2], True), "did not advance"),  # ids going the wrong way
        ({"items": [], "hasMore": True}, "page is empty"),
    ],
)
def test_a_cursor_that_does_not_advance_stops_the_client(second_page: dict[str, Any], problem: str) -> None:
    url = f"{BASE}/tags"
    responses.get(url, json=page([1, 3], True))
    responses.get(url, json=second_page)
    responses.get(url, json=page([99], False))

    with make_client() as client, pytest.raises(PaginationError, match=problem):
        list(client.iter_pages(TAGS))
    assert len(responses.calls) == 2


@responses.activate
def test_a_record_without_its_key_is_named_by_position_and_fields_never_by_its_values() -> None:
    secret_email = "private.person@example.com"
    items = [{"id": 1, "email": "a@example.com"}, {"email": secret_email, "locale": "fr", "fields": []}]
    responses.get(f"{BASE}/contacts", json={"items": items, "hasMore": True})

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    message = str(caught.value)
    assert message == (
        "contacts: GET /api/contacts?limit=100&order=asc: record 2 of page 1 has no 'id'"
        " (its fields: email, fields, locale)"
    )
    assert secret_email not in message


def contacts_page(ids: list[Any], has_more: bool = True, **fields: Any) -> dict[str, Any]:
    return {"items": [{"id": i, "email": f"c{i}@example.com", **fields} for i in ids], "hasMore": has_more}


@responses.activate
@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": 2.5}, "record 2 of page 1: field 'id' (column id BIGINT) cannot hold 2.5: not an integer"),
        ({"id": 2.0}, "record 2 of page 1: field 'id' (column id BIGINT) cannot hold 2.0: not an integer"),
        ({"id": True}, "record 2 of page 1: field 'id' (column id BIGINT) cannot hold true: not an integer"),
        ({"id": "2"}, "record 2 of page 1: field 'id' (column id BIGINT) cannot hold \"2\": not an integer"),
        ({"id": 1 << 63}, "cannot hold 9223372036854775808: outside the 64-bit integer range"),
        ({"id": 2, "tags": [{"id": 7, "name": "a"}, {"id": 3.5, "name": "b"}]},
         "record 2 of page 1: field 'tags[1].id' (column tags, member id BIGINT) cannot hold 3.5: not an integer"),
        ({"id": 2, "tags": {"id": 7}}, "field 'tags' (column tags) cannot hold an object: not a list"),
        ({"id": 2, "unsubscribed": 1}, "field 'unsubscribed' (column unsubscribed BOOLEAN) cannot hold 1: not a boolean"),
        ({"id": 2, "unsubscribed": "t"}, "cannot hold \"t\": not a boolean"),
        # A text may be personal: its value is never quoted, only what it is.
        ({"id": 2, "locale": 42}, "field 'locale' (column locale VARCHAR) cannot hold a number: not a text"),
        ({"id": 2, "fields": [{"slug": "phone", "value": 33612345678}]},
         "field 'fields[0].value' (column fields, member value VARCHAR) cannot hold a number: not a text"),
        ({"id": 2, "registeredAt": 1700000000}, "field 'registeredAt' (column registered_at TIMESTAMPTZ) cannot hold 1700000000"),
        # DuckDB's two ways of reading a timestamp disagree on zone names; a bare time would
        # be read in the session's zone.
        ({"id": 2, "registeredAt": "2024-06-01 10:00:00 Europe/Paris"}, "not an ISO 8601 date-time with an offset"),
        ({"id": 2, "registeredAt": "2024-06-01T10:00:00"}, "cannot hold \"2024-06-01T10:00:00\": not an ISO 8601 date-time with an offset"),
        ({"id": 2, "registeredAt": "infinity"}, "not an ISO 8601 date-time with an offset"),
    ],
)  # fmt: skip
def test_a_value_that_would_not_land_exactly_fails_the_read_naming_record_field_and_value(
    record: dict[str, Any], problem: str
) -> None:
    # DuckDB would store 2.5 as 2 (overwriting contact 2), true as 1, "t" as true, 42 as '42'.
    items = [{"id": 1, "email": "a@example.com"}, {"email": "b@example.com", **record}, {"id": 3, "email": "c@example.com"}]
    responses.get(f"{BASE}/contacts", json={"items": items, "hasMore": False})

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    assert str(caught.value).startswith("contacts: GET /api/contacts?limit=100&order=asc: record 2 of page 1: field ")
    assert problem in str(caught.value)
    assert "b@example.com" not in str(caught.value)
    assert "33612345678" not in str(caught.value)


@responses.activate
def test_nan_and_infinity_are_not_json() -> None:
    responses.get(f"{BASE}/tags", body=b'{"items": [{"id": 1, "name": "a", "score": NaN}], "hasMore": false}', content_type="application/json")

    with make_client() as client, pytest.raises(ApiResponseError, match=r"page 1: the JSON body does not parse \(NaN is not a JSON value"):
        list(client.iter_pages(TAGS))


@responses.activate
def test_fields_the_catalog_does_not_know_are_named_on_the_page_list_members_included() -> None:
    items = [{"id": 1, "email": "a@example.com", "score": 3, "tags": [{"id": 7, "name": "a", "color": "red"}]},
             {"id": 2, "email": "b@example.com", "fields": [{"slug": "city", "value": "Paris", "fieldName": "City", "kind": "text"}]}]  # fmt: skip
    responses.get(f"{BASE}/contacts", json={"items": items, "hasMore": False})

    with make_client() as client:
        (only,) = list(client.iter_pages(CONTACTS))

    assert only.unknown_fields == {"score", "tags[].color", "fields[].kind"}


@responses.activate
def test_values_of_the_right_types_and_nulls_pass() -> None:
    record = {"id": 1, "email": "a@example.com", "registeredAt": "2024-01-01T00:00:00+00:00", "locale": None,
              "unsubscribed": False, "fields": [None, {"slug": "city", "value": None}], "tags": [], "score": 2.5}  # fmt: skip
    responses.get(f"{BASE}/contacts", json={"items": [record], "hasMore": False})

    with make_client() as client:
        assert [p.items for p in client.iter_pages(CONTACTS)] == [[record]]


@responses.activate
@pytest.mark.parametrize(("order", "ids"), [("asc", [1, 2, 4, 3, 5]), ("desc", [9, 8, 6, 7, 5]), ("asc", [1, 2, 2, 3])])
def test_a_page_out_of_the_requested_order_fails_naming_the_page(order: str, ids: list[int]) -> None:
    responses.get(f"{BASE}/contacts", json=contacts_page(ids))

    with make_client(order=order) as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    assert f"contacts: GET /api/contacts?limit=100&order={order}: page 1: records out of {order} order: record" in str(caught.value)


@responses.activate
def test_a_page_longer_than_the_limit_is_refused_naming_its_length() -> None:
    responses.get(f"{BASE}/contacts", json=contacts_page(list(range(1, 1002)), has_more=True))

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    assert str(caught.value) == (
        "contacts: GET /api/contacts?limit=100&order=asc: page 1: 1001 records, more than the 100 asked for"
        " (limit=100); refusing the page"
    )


@responses.activate
def test_an_unpaginated_list_that_says_there_is_more_is_an_incomplete_read() -> None:
    responses.get(f"{BASE}/contact_fields", json={"items": [{"slug": "city", "fieldName": "City"}], "hasMore": True})

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(FIELDS))

    assert str(caught.value) == (
        "contact_fields: GET /api/contact_fields: page 1: hasMore is true, but /api/contact_fields takes no"
        " parameters to ask for the rest: the read is incomplete, so nothing is written and nothing is marked deleted"
    )
    assert len(responses.calls) == 1


@responses.activate
def test_json_nested_too_deep_to_parse_fails_like_any_bad_body() -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    responses.get(f"{BASE}/tags", body=b'{"items": [{"id": 1, "deep": ' + deep + b'}], "hasMore": false}', content_type="application/json")

    with make_client() as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(TAGS))

    assert str(caught.value).startswith("tags: GET /api/tags?limit=100&order=asc: page 1: the JSON body nests deeper")


@responses.activate
def test_a_body_inflating_past_the_page_cap_is_cut_off() -> None:
    bomb = gzip.compress(b'{"items": [' + b" " * (3 << 20))
    responses.get(f"{BASE}/tags", body=bomb, headers={"Content-Encoding": "gzip"}, content_type="application/json")

    with make_client(max_page_bytes=1 << 20) as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(TAGS))

    assert str(caught.value) == (
        "tags: GET /api/tags?limit=100&order=asc: page 1: the answer is larger than 1 MiB once decompressed"
        " (max_page_mb); stopped reading it"
    )


@responses.activate
def test_a_compressed_page_under_the_cap_is_read() -> None:
    body = gzip.compress(json.dumps(page([1, 2], False)).encode())
    responses.get(f"{BASE}/tags", body=body, headers={"Content-Encoding": "gzip"}, content_type="application/json")

    with make_client(max_page_bytes=1 << 20) as client:
        assert [item["id"] for p in client.iter_pages(TAGS) for item in p.items] == [1, 2]


@responses.activate
def test_a_redirect_to_another_origin_is_refused_without_sending_the_key() -> None:
    responses.get(f"{BASE}/tags", status=302, headers={"Location": "https://elsewhere.example.test/api/tags"})
    elsewhere = responses.get("https://elsewhere.example.test/api/tags", json=page([1], False))

    with make_client() as client, pytest.raises(ApiError, match="another origin"):
        list(client.iter_pages(TAGS))
    assert elsewhere.call_count == 0


@responses.activate
def test_a_redirect_within_the_origin_is_followed() -> None:
    responses.get(f"{BASE}/tags", status=301, headers={"Location": f"{BASE}/v2/tags"})
    responses.get(f"{BASE}/v2/tags", json=page([1], False), match=[matchers.header_matcher({"X-API-Key": KEY})])

    with make_client() as client:
        assert [p.items for p in client.iter_pages(TAGS)] == [[{"id": 1, "name": "tag 1"}]]


def test_the_client_repr_hides_the_key() -> None:
    assert KEY not in repr(make_client())


def test_the_raw_body_is_kept_for_staging() -> None:
    body = json.dumps(page([1], False)).encode()
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/tags", body=body, content_type="application/json")
        with make_client() as client:
            (only,) = list(client.iter_pages(TAGS))
    assert only.body == body


@responses.activate
def test_the_next_page_is_requested_while_the_caller_still_holds_the_current_one() -> None:
    url = f"{BASE}/tags"
    second_requested = threading.Event()

    def second_page(request: Any) -> tuple[int, dict[str, str], str]:
        second_requested.set()
        return 200, {"Content-Type": "application/json"}, json.dumps(page([5], False))

    responses.get(url, json=page([1, 2, 3], True), match=[matchers.query_param_matcher({"limit": "100", "order": "asc"})])
    responses.add_callback(
        responses.GET, url, callback=second_page,
        match=[matchers.query_param_matcher({"limit": "100", "order": "asc", "startingAfter": "3"})],
    )  # fmt: skip

    with make_client() as client:
        pages = client.iter_pages(TAGS)
        first = next(pages)
        # Not asked for yet, but already on its way: the overlap of staging and network wait.
        assert second_requested.wait(timeout=10)
        assert [item["id"] for item in first.items] == [1, 2, 3]
        assert [item["id"] for item in next(pages).items] == [5]
        assert list(pages) == []
    assert len(responses.calls) == 2


@responses.activate
def test_a_caller_that_stops_early_leaves_at_most_one_page_requested_ahead() -> None:
    url = f"{BASE}/tags"
    for start in range(5):
        query = {"limit": "100", "order": "asc"} | ({"startingAfter": str(start)} if start else {})
        responses.get(url, json=page([start + 1], True), match=[matchers.query_param_matcher(query)])

    with make_client() as client:
        pages = client.iter_pages(TAGS)
        next(pages)
        pages.close()  # waits for the request already sent, sends no other

    assert len(responses.calls) <= 2
    assert [q.get("startingAfter") for q in queries(responses.calls)] == [None, "1"][: len(responses.calls)]


# The two-ended walk (order="both"): an ascending and a descending cursor at once.


class FakeList:
    """A list endpoint with the API's cursor semantics, served to ``responses``.

    ``on_request`` runs before each answer, with the number of the request (1-based), so a
    test can change the list mid-walk or hold an answer back.
    """

    def __init__(self, ids: list[int], on_request: Any = None) -> None:
        self.ids = sorted(ids)
        self.on_request = on_request
        self.served: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        query = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        with self._lock:
            self.served.append(query)
            number = len(self.served)
        if self.on_request is not None:
            self.on_request(number, query)
        limit, after = int(query["limit"]), query.get("startingAfter")
        if query["order"] == "asc":
            rest = [i for i in self.ids if after is None or i > int(after)]
        else:
            rest = [i for i in reversed(self.ids) if after is None or i < int(after)]
        return 200, {"Content-Type": "application/json"}, json.dumps(page(rest[:limit], len(rest) > limit))


def walk_both_ends(fake: FakeList, page_size: int = 10) -> list[Any]:
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/tags", callback=fake)
        with make_client(order="both", page_size=page_size) as client:
            return list(client.iter_pages(TAGS))


@pytest.mark.parametrize("count", [0, 1, 10, 11, 20, 95, 100, 101, 257])
def test_both_ends_read_every_record_exactly_once(count: int) -> None:
    ids = [3 * i + 1 for i in range(count)]  # gaps between ids, as after deletions
    fake = FakeList(ids)

    pages = walk_both_ends(fake)

    read = [item["id"] for p in pages for item in p.items]
    assert sorted(read) == ids and len(read) == len(set(read))
    # Each page's body is what the stager keeps: it must hold exactly the page's records.
    assert all(json.loads(p.body)["items"] == p.items for p in pages)
    single_walk_requests = max(1, -(-count // 10))
    assert len(fake.served) <= single_walk_requests + 3
    orders = {q["order"] for q in fake.served}
    assert orders == ({"asc", "desc"} if count > 10 else {"asc"})


def test_a_list_of_one_page_costs_one_request_from_both_ends() -> None:
    fake = FakeList([1, 2, 3])

    pages = walk_both_ends(fake)

    assert [[item["id"] for item in p.items] for p in pages] == [[1, 2, 3]]
    assert fake.served == [{"limit": "10", "order": "asc"}]


def test_both_ends_have_a_request_in_flight_at_once() -> None:
    descending_asked = threading.Event()

    def hold_second_ascending_page(number: int, query: dict[str, str]) -> None:
        if query["order"] == "desc":
            descending_asked.set()
        elif query.get("startingAfter") == "10":
            # Answered only once the descending end has asked too: both are on the wire.
            assert descending_asked.wait(timeout=10)

    fake = FakeList(list(range(1, 101)), on_request=hold_second_ascending_page)

    pages = walk_both_ends(fake)

    assert sorted(item["id"] for p in pages for item in p.items) == list(range(1, 101))
    assert descending_asked.is_set()


def test_records_created_during_the_walk_are_read_as_by_an_ascending_walk() -> None:
    def add_records(number: int, query: dict[str, str]) -> None:
        if number == 4:  # after the descending end has started from the newest record
            fake.ids.extend([1000, 1001, 1002])

    fake = FakeList(list(range(1, 201)), on_request=add_records)

    pages = walk_both_ends(fake)

    read = [item["id"] for p in pages for item in p.items]
    assert sorted(read) == [*range(1, 201), 1000, 1001, 1002]
    assert len(read) == len(set(read))
    # The ascending end went on past where the descending end started, to the end of the list.
    assert any(q["order"] == "asc" and int(q.get("startingAfter", 0)) >= 200 for q in fake.served)


def test_each_end_keeps_its_keys_in_order_so_the_stager_knows_they_are_unique() -> None:
    pages = walk_both_ends(FakeList(list(range(1, 301))))

    for order, step in (("asc", 1), ("desc", -1)):
        keys = [item["id"] for p in pages if p.query["order"] == order for item in p.items]
        assert keys and all((later - earlier) * step > 0 for earlier, later in itertools.pairwise(keys))


def test_a_failing_descending_request_fails_the_walk_naming_it() -> None:
    ascending = FakeList(list(range(1, 1001)))

    def serve(request: Any) -> tuple[int, dict[str, str], str]:
        if "order=desc" in request.url:
            return 500, {"Content-Type": "application/json"}, json.dumps({"detail": "boom"})
        return ascending(request)

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/tags", callback=serve)
        with make_client(order="both", page_size=10, max_retries=0) as client, pytest.raises(ApiStatusError) as caught:
            list(client.iter_pages(TAGS))

    assert str(caught.value).startswith("tags: GET /api/tags?limit=10&order=desc: HTTP 500")


def test_a_descending_answer_repeating_records_behind_its_cursor_hides_no_unread_record() -> None:
    # The descending end's second answer starts with a record newer than where that end
    # started (created during the walk, repeated out of place). Taking it as the new top made
    # the ascending end skip everything created meanwhile below it.
    fake = FakeList(list(range(1, 101)))
    created = list(range(101, 121)) + [150]

    def serve(request: Any) -> tuple[int, dict[str, str], str]:
        status, headers, text = fake(request)
        query = fake.served[-1]
        if query["order"] == "desc" and query.get("startingAfter"):
            if 101 not in fake.ids:
                fake.ids = sorted(fake.ids + created)
            body = json.loads(text)
            body["items"] = [{"id": 150, "name": "tag 150"}, *body["items"][:-1]]
            text = json.dumps(body)
        return status, headers, text

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/tags", callback=serve)
        with make_client(order="both", page_size=10) as client:
            pages = list(client.iter_pages(TAGS))

    read = [item["id"] for p in pages for item in p.items]
    assert set(read) == set(range(1, 121)) | {150}


def test_a_server_asking_to_wait_longer_than_the_cap_fails_at_once_saying_both() -> None:
    slept: list[float] = []
    retry = make_client(max_wait_seconds=120)._session.get_adapter(BASE).max_retries
    retry = retry.new(sleeper=slept.append)
    answer = HTTPResponse(body=b"", headers={"Retry-After": "99999"}, status=429, preload_content=False)

    with pytest.raises(WaitTooLong) as caught:
        retry.sleep(answer)

    assert str(caught.value) == (
        "HTTP 429 asking to retry after 99,999 s (Retry-After), longer than the 120 s the sync waits at most"
        " (max_wait_seconds); failing now instead of waiting"
    )
    assert slept == []


def test_long_waits_between_retries_are_logged_and_short_ones_are_not() -> None:
    said: list[str] = []
    slept: list[float] = []
    retry = make_client(max_wait_seconds=120, backoff_factor=4, log=said.append)._session.get_adapter(BASE).max_retries
    retry = retry.new(sleeper=slept.append)

    retry.sleep(HTTPResponse(body=b"", headers={"Retry-After": "2"}, status=503, preload_content=False))
    retry.sleep(HTTPResponse(body=b"", headers={"Retry-After": "30"}, status=429, preload_content=False))
    backed_off = retry.increment("GET", "/api/tags", response=HTTPResponse(status=502)).increment(
        "GET", "/api/tags", response=HTTPResponse(status=502)
    )
    backed_off.sleep(HTTPResponse(body=b"", status=502, preload_content=False))

    assert slept == [2.0, 30.0, 8.0]
    assert said == [
        "waiting 30 s before retrying after HTTP 429 (as Retry-After asks)",
        "waiting 8 s before retrying after HTTP 502 (backing off)",
    ]


def test_backoff_is_capped_by_the_longest_wait() -> None:
    retry = make_client(max_wait_seconds=5, backoff_factor=100)._session.get_adapter(BASE).max_retries
    for _ in range(3):
        retry = retry.increment("GET", "/api/tags", response=HTTPResponse(status=503))
    assert retry.get_backoff_time() == 5


def test_a_retry_after_that_is_neither_seconds_nor_a_date_falls_back_to_backing_off() -> None:
    slept: list[float] = []
    retry = make_client(backoff_factor=3)._session.get_adapter(BASE).max_retries.new(sleeper=slept.append)
    retry = retry.increment("GET", "/api/tags", response=HTTPResponse(status=503)).increment(
        "GET", "/api/tags", response=HTTPResponse(status=503)
    )

    retry.sleep(HTTPResponse(body=b"", headers={"Retry-After": "soon-ish"}, status=503, preload_content=False))

    assert slept == [6.0]


class TrackedBody(io.RawIOBase):
    """A body that remembers whether anyone read it."""

    def __init__(self, size: int) -> None:
        self.left, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b" " * count
        self.left -= count
        self.read_bytes += count
        return count


@responses.activate
def test_a_redirect_is_followed_without_reading_its_body() -> None:
    redirect_body = TrackedBody(400 << 20)
    responses.get(f"{BASE}/tags", status=302, headers={"Location": f"{BASE}/v2/tags?limit=100&order=asc"}, body=io.BufferedReader(redirect_body))  # type: ignore[arg-type]
    responses.get(f"{BASE}/v2/tags", json=page([1], False))

    with make_client(max_page_bytes=1 << 20) as client:
        assert [p.items for p in client.iter_pages(TAGS)] == [[{"id": 1, "name": "tag 1"}]]
    assert redirect_body.read_bytes < 1 << 20


@responses.activate
def test_redirects_that_never_end_are_refused() -> None:
    responses.get(f"{BASE}/tags", status=302, headers={"Location": f"{BASE}/tags"})

    with make_client() as client, pytest.raises(ApiResponseError, match="more than 5 redirects; refusing to follow more"):
        list(client.iter_pages(TAGS))
    assert len(responses.calls) == 6


@pytest.mark.parametrize(
    ("key", "said"),
    [
        (KEY + "\n", "has a line break (U+000A) at character 20 of 20, which no API key holds"),
        (" " + KEY, "has a space (U+0020) at character 1 of 20, which no API key holds"),
        (KEY + "ключ", "has a character outside ASCII (U+043A) at character 20 of 23, which no API key holds"),
        (KEY + "\x00", "has a control character (U+0000) at character 20 of 20, which no API key holds"),
        (KEY * 60, "is 1,140 characters long, longer than any API key (at most 1,024)"),
        ("", "is empty"),
    ],
)
@responses.activate
def test_a_key_that_cannot_be_a_header_value_is_refused_before_any_request_without_quoting_it(key: str, said: str) -> None:
    # Sent, requests would refuse it quoting the whole header, or http.client fail to encode it.
    with pytest.raises(ConfigurationError) as caught:
        MarketingApiClient(BASE, key, key_setting="MKT_API_KEY")

    assert str(caught.value) == f"MKT_API_KEY {said}: set it to the key exactly as made in the account's profile settings"
    assert len(responses.calls) == 0
    assert KEY not in str(caught.value)


@responses.activate
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"detail": f"internal error handling X-API-Key: {KEY}"}),
        (400, f"<html>{'x' * 180}X-API-Key: {KEY}</html>"),  # the 200-character excerpt cuts the key
        (422, {"violations": [{"propertyPath": "limit", "message": f"bad for key {KEY}"}]}),
        (200, f"<html>your key {KEY} is echoed here</html>"),
    ],
)
def test_a_server_echoing_the_key_never_gets_it_into_an_error(status: int, body: Any) -> None:
    if isinstance(body, dict):
        responses.get(f"{BASE}/tags", status=status, json=body)
    else:
        responses.get(f"{BASE}/tags", status=status, body=body, content_type="text/html")

    with make_client(max_retries=0) as client, pytest.raises(ApiError) as caught:
        list(client.iter_pages(TAGS))

    said = str(caught.value) + repr(getattr(caught.value, "violations", ""))
    assert KEY[:8] not in said
    assert "[MK" in said  # the mask, perhaps cut where the excerpt ends


REAL_LOOKING_KEY = "sk_live_9fA2bC7dwErTy"


def _failure(key: str, status: int, body: str, content_type: str = "application/json") -> ApiError:
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/tags", status=status, body=body, content_type=content_type)
        client = MarketingApiClient(BASE, key, key_setting="MKT_API_KEY", order="asc", max_retries=0)
        with client, pytest.raises(ApiError) as caught:
            list(client.iter_pages(TAGS))
    return caught.value


def _pieces(error: ApiError, key: str) -> set[str]:
    """The pieces of ``key`` (see ``key_pieces``) all an error says holds, the mask taken out."""
    said = (str(error) + repr(getattr(error, "violations", ""))).replace("[MKT_API_KEY]", " ")
    return {said[start:end] for start, end in key_pieces(said, key)}


def _leaked(key: str, status: int, echoing: str, echoed: str, content_type: str = "application/json") -> set[str]:
    """The pieces of ``key`` an error about a body ``echoing`` the text ``echoed`` says beyond
    those the same error says when nothing is echoed (our own words may hold a few letters
    of a key: "propertyPath" holds "erty")."""
    ours = _pieces(_failure(key, status, echoing.replace(echoed, "~"), content_type), key)
    return _pieces(_failure(key, status, echoing, content_type), key) - ours


@pytest.mark.parametrize(
    "echoed",
    [
        "Key sk_li... has no access",  # its first 5 characters
        "The key ending wErTy has no access",  # its last 5
        "Key sk_l.ive_.9fA2.bC7d has no access",  # cut in pieces of 4
        f"Key {REAL_LOOKING_KEY.upper()} has no access",  # in another case
        "Key ...9FA2... has no access",  # 4 characters
    ],
)
@pytest.mark.parametrize("status", [401, 403, 404, 500, 400, 422])
def test_no_piece_of_the_key_gets_into_an_error_in_any_case_or_cut_up(status: int, echoed: str) -> None:
    body = {"violations": [{"propertyPath": "limit", "message": echoed}]} if status == 422 else {"detail": echoed}

    error = _failure(REAL_LOOKING_KEY, status, json.dumps(body))

    assert _leaked(REAL_LOOKING_KEY, status, json.dumps(body), echoed.split()[-4]) == set()
    if status in (401, 403, 404):
        assert "the API said" not in str(error)  # not quoted at all
    else:
        assert "[MKT_API_KEY]" in str(error) and "has no access" in str(error)  # masked, the rest quoted


def test_a_detail_holding_three_characters_of_the_key_in_a_row_or_none_is_quoted() -> None:
    for detail in ("Your plan does not include tags", "Key sk_... is fine", "Key ...wEr... is fine"):
        error = _failure(REAL_LOOKING_KEY, 403, json.dumps({"detail": detail}))
        assert f"(the API said {json.dumps(detail)})" in str(error)


def test_with_a_key_too_short_to_be_real_every_detail_is_quoted() -> None:
    # The simulator's "k": its letter is in every other word; no piece of it can help guess one.
    assert key_pieces("Unknown key k", "k") == []
    error = _failure("k", 404, json.dumps({"detail": "Unknown key k"}))
    assert '(the API said "Unknown key k")' in str(error)


@pytest.mark.parametrize("seed", range(40))
def test_a_random_key_echoed_in_any_piece_case_or_cutting_never_gets_into_an_error(seed: int) -> None:
    chance = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    key = "".join(chance.choice(alphabet + "_-") for _ in range(chance.randint(8, 48)))
    start = chance.randrange(len(key) - 4)
    piece = key[start : chance.randint(start + 4, len(key))]
    piece = "".join(c.upper() if chance.random() < 0.5 else c.lower() for c in piece)
    cut = "".join(c + (chance.choice([".", " ", "-", "/", ""]) if chance.random() < 0.3 else "") for c in piece)
    words = [chance.choice(["access", "denied", "for", "the", "header", "value", "sent"]) for _ in range(6)]
    words.insert(chance.randint(0, 6), cut)
    text = " ".join(words)
    status, body, content_type = chance.choice(
        [
            (401, json.dumps({"detail": text}), "application/json"),
            (403, json.dumps({"title": text}), "application/json"),
            (404, json.dumps({"detail": text}), "application/json"),
            (500, json.dumps({"detail": text}), "application/json"),
            (502, f"<html><body>{text}</body></html>", "text/html"),
            (422, json.dumps({"detail": text, "violations": [{"propertyPath": text, "message": text}]}), "application/json"),
            (200, f"<html>{text}</html>", "text/html"),
        ]
    )

    assert _leaked(key, status, body, cut, content_type) == set(), (key, text)


# ---------------------------------------------------------------- webhooks

WEBHOOKS_URL = f"{BASE}/webhooks"
WEBHOOK_SECRET = "webhook-secret-7d41c0a9e2"
ALL_EVENTS = ["CONTACT_CREATED", "CONTACT_TAG_ADDED", "CONTACT_TAG_REMOVED", "CONTACT_OPT_IN", "SALE_NEW", "SALE_CANCELED"]


def webhook_json(
    identifier: str = "wh_1", url: str = "https://hooks.example.test/systeme/webhook", **overrides: Any
) -> dict[str, Any]:
    return {
        "id": identifier,
        "name": "mkt-assets",
        "url": url,
        "active": True,
        "subscriptions": [
            {"id": f"s{position}", "event": event, "disabledAt": None, "disabledReason": None}
            for position, event in enumerate(ALL_EVENTS)
        ],
        **overrides,
    }


@responses.activate
def test_the_webhooks_are_listed_with_their_events_and_what_the_platform_disabled() -> None:
    disabled = webhook_json("wh_2", "https://old.example.test/hook", active=False)
    disabled["subscriptions"][0].update(disabledAt="2026-11-30T10:00:00+00:00", disabledReason="BAD_SUCCESS_RATE")
    responses.get(WEBHOOKS_URL, json={"items": [webhook_json(), disabled], "hasMore": False})

    with make_client() as client:
        listed = client.list_webhooks()

    assert listed.complete
    first, second = listed.webhooks
    assert (first.id, first.url, first.active, first.events) == (
        "wh_1",
        "https://hooks.example.test/systeme/webhook",
        True,
        tuple(ALL_EVENTS),
    )
    assert not second.active
    assert (second.subscriptions[0].disabled_reason, second.subscriptions[0].disabled_at) == (
        "BAD_SUCCESS_RATE",
        "2026-11-30T10:00:00+00:00",
    )
    assert responses.calls[0].request.headers["X-API-Key"] == KEY


@responses.activate
def test_a_webhook_list_the_api_says_goes_on_is_marked_incomplete() -> None:
    responses.get(WEBHOOKS_URL, json={"items": [webhook_json(identifier=12)], "hasMore": True})  # type: ignore[arg-type]
    with make_client() as client:
        listed = client.list_webhooks()
    assert not listed.complete and listed.webhooks[0].id == "12"


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ([], "expected a JSON object"),
        ({"hasMore": False}, "no list of 'items'"),
        ({"items": [webhook_json()], "hasMore": "no"}, "'hasMore' is not a boolean"),
        ({"items": [webhook_json(identifier=None)]}, "webhook 1: has no id"),
        ({"items": [webhook_json(identifier=True)]}, "webhook 1: has no id"),
        ({"items": [webhook_json(active="yes")]}, "webhook 1: its 'active' is str"),
        ({"items": [webhook_json(url=["x"])]}, "webhook 1: its 'url' is list"),
        ({"items": [webhook_json(subscriptions=[{"disabledReason": None}])]}, "subscription 1 has no event name"),
    ],
)
@responses.activate
def test_a_webhook_list_not_as_documented_is_refused_naming_the_request_and_the_field(answer: Any, said: str) -> None:
    responses.get(WEBHOOKS_URL, json=answer)
    with make_client() as client, pytest.raises(ApiResponseError, match=said) as raised:
        client.list_webhooks()
    assert "webhooks: GET /api/webhooks" in str(raised.value)


@responses.activate
def test_a_webhook_is_created_with_its_events_and_secret_and_read_back() -> None:
    responses.post(WEBHOOKS_URL, status=201, json=webhook_json("wh_9"))

    with make_client() as client:
        created = client.create_webhook("mkt-assets", "https://hooks.example.test/systeme/webhook", WEBHOOK_SECRET, ALL_EVENTS)

    assert created.id == "wh_9" and created.events == tuple(ALL_EVENTS)
    sent = json.loads(responses.calls[0].request.body or b"")
    assert sent == {
        "name": "mkt-assets",
        "url": "https://hooks.example.test/systeme/webhook",
        "secret": WEBHOOK_SECRET,
        "subscriptions": ALL_EVENTS,
        "active": True,
    }
    assert responses.calls[0].request.headers["X-API-Key"] == KEY


@responses.activate
def test_a_refused_creation_says_why_naming_the_post_without_the_secret_the_server_echoed() -> None:
    violations = [
        {"propertyPath": "url", "message": "This value is not a valid URL."},
        {"propertyPath": "secret", "message": f"'{WEBHOOK_SECRET}' is already used; also {WEBHOOK_SECRET.upper()[3:15]}"},
    ]
    responses.post(WEBHOOKS_URL, status=422, json={"detail": f"secret: {WEBHOOK_SECRET}", "violations": violations})

    with make_client() as client, pytest.raises(ApiValidationError) as raised:
        client.create_webhook("n", "not a url", WEBHOOK_SECRET, ALL_EVENTS)

    message = str(raised.value)
    assert message.startswith("webhooks: POST /api/webhooks: HTTP 422") and "url: This value is not a valid URL." in message
    assert "[MKT_WEBHOOK_SECRET]" in message
    everything = message + repr(raised.value.violations) + repr(raised.value.args)
    assert WEBHOOK_SECRET not in everything and WEBHOOK_SECRET[3:15].lower() not in everything.lower()


@responses.activate
def test_a_creation_that_fails_on_the_server_is_not_sent_twice() -> None:
    responses.post(WEBHOOKS_URL, status=503, json={"detail": "down"})

    with make_client() as client, pytest.raises(ApiStatusError, match=r"webhooks: POST /api/webhooks: HTTP 503") as raised:
        client.create_webhook("n", "https://hooks.example.test/x", WEBHOOK_SECRET, ALL_EVENTS)

    assert len(responses.calls) == 1  # a retry could make a second webhook
    assert raised.value.retriable and WEBHOOK_SECRET not in str(raised.value)


@responses.activate
def test_a_creation_answered_with_a_redirect_is_not_sent_on_with_its_secret() -> None:
    responses.post(WEBHOOKS_URL, status=307, headers={"Location": f"{BASE}/v2/webhooks"})

    with make_client() as client, pytest.raises(ApiResponseError, match="a POST is not sent on") as raised:
        client.create_webhook("n", "https://hooks.example.test/x", WEBHOOK_SECRET, ALL_EVENTS)

    assert len(responses.calls) == 1 and WEBHOOK_SECRET not in str(raised.value)


@responses.activate
def test_listing_webhooks_is_retried_like_any_read() -> None:
    responses.get(WEBHOOKS_URL, status=503)
    responses.get(WEBHOOKS_URL, json={"items": [], "hasMore": False})
    with make_client() as client:
        assert client.list_webhooks().webhooks == ()
    assert len(responses.calls) == 2


@pytest.mark.parametrize(
    ("status", "error", "said"),
    [
        (401, ApiAuthError, "the API key was rejected.*; set MKT_API_KEY"),
        (403, ApiStatusError, "the account may not manage webhooks"),
        (404, ApiStatusError, f"check the base URL \\(MKT_API_BASE_URL: {BASE}\\)"),
    ],
)
@responses.activate
def test_a_webhooks_request_refused_says_what_to_do(status: int, error: type[ApiError], said: str) -> None:
    responses.get(WEBHOOKS_URL, status=status, json={"detail": "no"})
    with make_client() as client, pytest.raises(error, match=f"webhooks: GET /api/webhooks: HTTP {status}.*{said}"):
        client.list_webhooks()



# ------------------------------------------------------------------ one record by its key


def contact(contact_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": contact_id, "email": f"c{contact_id}@example.com", "tags": [{"id": 7, "name": "vip"}], **fields}


@responses.activate
def test_a_record_is_read_by_its_key_alone_and_kept_as_sent() -> None:
    body = json.dumps(contact(42, score=3)).encode()
    responses.get(f"{BASE}/contacts/42", body=body, content_type="application/json", match=[matchers.query_string_matcher("")])

    with make_client() as client:
        one = client.get_record(CONTACTS, 42)

    assert (one.key, one.gone, one.record, one.body) == (42, False, contact(42, score=3), body)
    assert one.unknown_fields == {"score"}
    assert client.stats.requests == 1
    assert responses.calls[0].request.headers["X-API-Key"] == KEY


@responses.activate
def test_a_record_the_api_answers_404_for_is_gone_not_an_error() -> None:
    responses.get(f"{BASE}/contacts/42", status=404, json={"title": "An error occurred", "detail": "Not Found"})

    with make_client() as client:
        one = client.get_record(CONTACTS, 42)

    assert (one.key, one.gone, one.record, one.body) == (42, True, None, b"")


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (contact(42, email=7), "the record: field 'email' (column email VARCHAR) cannot hold a number: not a text"),
        (contact(42, registeredAt="yesterday"), "field 'registeredAt'"),
        (contact(42, tags=[{"id": "7"}]), "field 'tags[0].id'"),
        ({"email": "a@example.com"}, "the record has no 'id'"),
        (contact(42.0), "field 'id' (column id BIGINT) cannot hold 42.0: not an integer"),
        (contact(43), "asked for id 42, the API answered the record of id 43"),
    ],
    ids=["text", "date", "tag-id", "no-key", "float-key", "other-key"],
)
@responses.activate
def test_a_record_read_by_key_is_checked_exactly_like_a_listed_one_and_must_be_the_one_asked_for(
    record: dict[str, Any], problem: str
) -> None:
    responses.get(f"{BASE}/contacts/42", json=record)

    with make_client() as client, pytest.raises(ApiResponseError) as raised:
        client.get_record(CONTACTS, 42)

    assert str(raised.value).startswith("contacts: GET /api/contacts/42: ")
    assert problem in str(raised.value)
    assert "a@example.com" not in str(raised.value)


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b"[1, 2]", "application/json", "expected the record as a JSON object, got list"),
        (b'{"id": 42, "email": "a', "application/json", "the JSON body does not parse"),
        (b"<html>down</html>", "text/html", "expected JSON, got text/html: '<html>down</html>'"),
        (b'{"id": NaN}', "application/json", "the JSON body does not parse"),
        (b"[" * 10_000 + b"]" * 10_000, "application/json", "the JSON body nests deeper than it can be parsed (20000 bytes)"),
    ],
)
@responses.activate
def test_an_answer_that_is_not_one_record_is_a_clear_error(body: bytes, content_type: str, problem: str) -> None:
    responses.get(f"{BASE}/contacts/42", body=body, content_type=content_type)

    with make_client() as client, pytest.raises(ApiResponseError, match=re.escape(problem)) as raised:
        client.get_record(CONTACTS, 42)

    assert str(raised.value).startswith("contacts: GET /api/contacts/42: ")


@pytest.mark.parametrize(("status", "error"), [(401, ApiAuthError), (403, ApiAccessError), (500, ApiStatusError), (429, ApiStatusError)])
@responses.activate
def test_other_failures_of_a_record_raise_the_clients_errors_naming_the_request(status: int, error: type[ApiError]) -> None:
    responses.get(f"{BASE}/contacts/42", status=status, json={"detail": "no"})

    with make_client(max_retries=1) as client, pytest.raises(error) as raised:
        client.get_record(CONTACTS, 42)

    assert str(raised.value).startswith("contacts: GET /api/contacts/42: HTTP ")
    assert len(responses.calls) == (2 if status in (500, 429) else 1)


@pytest.mark.parametrize("key", [0, -3, True, 4.0, "5"])
def test_only_a_positive_integer_key_is_read(key: Any) -> None:
    with make_client() as client, pytest.raises(ValueError, match="a key to read is a positive integer"):
        client.get_record(CONTACTS, key)


def serve_contacts(mock: responses.RequestsMock, gone: set[int], record: Any = contact, seen: list[int] | None = None) -> None:
    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        contact_id = int(urlsplit(request.url).path.rsplit("/", 1)[1])
        if seen is not None:
            seen.append(contact_id)
        if contact_id in gone:
            return 404, {}, json.dumps({"title": "An error occurred", "detail": "Not Found"})
        return 200, {}, json.dumps(record(contact_id))

    mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/contacts/\d+"), callback=answer)


def test_records_are_read_one_request_each_with_at_most_the_concurrency_in_flight() -> None:
    in_flight = max_in_flight = 0
    lock = threading.Lock()
    # Each pair of requests meets before either answers: two really are in flight at once.
    pairs = threading.Barrier(2, timeout=10)

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        nonlocal in_flight, max_in_flight
        with lock:
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
        pairs.wait()
        contact_id = int(urlsplit(request.url).path.rsplit("/", 1)[1])
        with lock:
            in_flight -= 1
        return (404, {}, "{}") if contact_id == 5 else (200, {}, json.dumps(contact(contact_id)))

    with responses.RequestsMock() as mock, make_client() as client:
        mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/contacts/\d+"), callback=answer)
        read = list(client.read_records(CONTACTS, [1, 2, 3, 4, 5, 6], concurrency=2))

        assert sorted((one.key, one.gone) for one in read) == [(1, False), (2, False), (3, False), (4, False), (5, True), (6, False)]
        assert sorted(int(call.request.url.rsplit("/", 1)[1]) for call in mock.calls) == [1, 2, 3, 4, 5, 6]
    assert max_in_flight == 2
    assert client.stats.requests == 6


def test_the_first_failure_stops_the_read_and_names_its_request() -> None:
    seen: list[int] = []

    def record(contact_id: int) -> dict[str, Any]:
        return contact(contact_id, email=None if contact_id != 2 else 5)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock, make_client() as client:
        serve_contacts(mock, set(), record, seen)
        with pytest.raises(ApiResponseError, match=r"^contacts: GET /api/contacts/2: the record: field 'email'"):
            list(client.read_records(CONTACTS, [1, 2, 3, 4], concurrency=1))

    assert seen == [1, 2]


def test_when_every_record_is_gone_the_list_and_its_newest_record_are_read_to_trust_it() -> None:
    with responses.RequestsMock() as mock, make_client() as client:
        serve_contacts(mock, gone={1, 2})
        mock.get(f"{BASE}/contacts", json={"items": [contact(90), contact(80)], "hasMore": True},
                 match=[matchers.query_param_matcher({"limit": "10", "order": "desc"})])  # fmt: skip
        read = list(client.read_records(CONTACTS, [1, 2]))

        assert sorted((one.key, one.gone) for one in read) == [(1, True), (2, True)]
        assert [urlsplit(call.request.url).path for call in mock.calls][2:] == ["/api/contacts", "/api/contacts/90"]


def test_when_every_record_is_gone_and_so_is_the_newest_listed_one_nothing_is_taken_as_gone() -> None:
    with responses.RequestsMock() as mock, make_client() as client:
        serve_contacts(mock, gone={1, 2, 90})
        mock.get(f"{BASE}/contacts", json={"items": [contact(90)], "hasMore": False})
        with pytest.raises(ApiResponseError) as raised:
            list(client.read_records(CONTACTS, [1, 2]))

    assert str(raised.value).startswith(
        "contacts: GET /api/contacts/90: HTTP 404: every one of the 2 contacts read by id answered HTTP 404, and so does id 90,"
        " which the list holds: the API does not serve contacts by id at this address"
    )
    assert "MKT_API_BASE_URL: https://api.example.test/api" in str(raised.value)


def test_when_every_record_is_gone_and_so_is_the_list_the_base_url_is_blamed() -> None:
    with responses.RequestsMock() as mock, make_client() as client:
        serve_contacts(mock, gone={1})
        mock.get(f"{BASE}/contacts", status=404, json={"title": "An error occurred", "detail": "Not Found"})
        with pytest.raises(ApiAccessError) as raised:
            list(client.read_records(CONTACTS, [1]))

    assert str(raised.value).startswith(
        "contacts: GET /api/contacts?limit=10&order=desc: every one of the 1 contacts read by id answered HTTP 404, and so does the list: HTTP 404"
    )
    assert "check the base URL" in str(raised.value)


def test_when_every_record_is_gone_from_an_empty_account_they_are_gone() -> None:
    with responses.RequestsMock() as mock, make_client() as client:
        serve_contacts(mock, gone={1, 2})
        mock.get(f"{BASE}/contacts", json={"items": [], "hasMore": False})

        assert sorted(one.key for one in client.read_records(CONTACTS, [1, 2]) if one.gone) == [1, 2]
        assert len(mock.calls) == 3


def test_some_records_gone_among_others_found_cost_no_further_request() -> None:
    with responses.RequestsMock() as mock, make_client() as client:
        serve_contacts(mock, gone={2})
        read = list(client.read_records(CONTACTS, [1, 2, 3]))

        assert sorted(one.key for one in read if one.gone) == [2]
        assert len(mock.calls) == 3
