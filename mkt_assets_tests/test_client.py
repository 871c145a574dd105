"""The HTTP client against faked HTTP (responses): pagination, retries, errors, the key."""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from responses import matchers

from mkt_assets.catalog import RESOURCES_BY_NAME
from mkt_assets.client import MarketingApiClient
from mkt_assets.errors import (
    ApiAuthError,
    ApiError,
    ApiResponseError,
    ApiStatusError,
    ApiValidationError,
    PaginationError,
)

BASE = "https://api.example.test/api"
KEY = "test-key-0123456789"
CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
FIELDS = RESOURCES_BY_NAME["contact_fields"]


def make_client(**options: Any) -> MarketingApiClient:
    options.setdefault("backoff_factor", 0)
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
@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_fails_at_once_naming_the_setting(status: int) -> None:
    responses.get(f"{BASE}/contacts", status=status, json={"detail": "Full authentication is required to access this resource."})

    with make_client() as client, pytest.raises(ApiAuthError) as caught:
        list(client.iter_pages(CONTACTS))

    assert len(responses.calls) == 1
    assert "MKT_API_KEY" in str(caught.value) and "rejected" in str(caught.value)
    assert KEY not in str(caught.value)


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
def test_a_last_record_without_id_cannot_continue() -> None:
    responses.get(f"{BASE}/tags", json={"items": [{"id": 1}, {"name": "no id"}], "hasMore": True})

    with make_client() as client, pytest.raises(PaginationError, match=r"page 1: the last record \(position 2\) has no integer 'id'"):
        list(client.iter_pages(TAGS))


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
