"""The sandbox API behaves like API.md says the real one does, and its faults do what they say.

Every test talks HTTP (requests) to a real SandboxServer on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests

from mkt_assets.sandbox import ACCESS_TYPES, LOCALES, Fault, SandboxData, SandboxServer
from mkt_assets.sandbox import server as server_module

KEY = "test-key"
PATHS = {
    "communities": "/community/communities",
    "contacts": "/contacts",
    "tags": "/tags",
    "contact_fields": "/contact_fields",
    "course_resources": "/school/courses",
    "memberships": "/community/memberships",
    "enrollments": "/school/enrollments",
}
PAGED = ["communities", "contacts", "tags", "course_resources", "memberships", "enrollments"]
RELATIONS = ["memberships", "enrollments"]


class FakeClock:
    """A monotonic clock the test moves by hand, so rate-limit windows need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def data() -> SandboxData:
    return SandboxData(seed=7, contacts=537)


@pytest.fixture(scope="module")
def shared_server(data: SandboxData) -> Iterator[SandboxServer]:
    with SandboxServer(data, api_key=KEY) as server:
        yield server


@pytest.fixture
def server(shared_server: SandboxServer) -> Iterator[SandboxServer]:
    shared_server.clear_faults()
    shared_server.reset_log()
    yield shared_server
    shared_server.clear_faults()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.headers.update({"X-API-Key": KEY, "Accept": "application/json"})
        yield http


def get(http: requests.Session, server: SandboxServer, path: str, **params: Any) -> requests.Response:
    return http.get(server.base_url + path, params=params, timeout=10)


def walk(http: requests.Session, server: SandboxServer, path: str, **params: Any) -> list[dict[str, Any]]:
    """Follow the id cursor until hasMore is false, as a client would."""
    items: list[dict[str, Any]] = []
    query = dict(params)
    for _ in range(10_000):
        response = get(http, server, path, **query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"items", "hasMore"}
        items += body["items"]
        if not body["hasMore"]:
            return items
        query["startingAfter"] = body["items"][-1]["id"]
    raise AssertionError("pagination did not end")


# ===================================================================== auth and routing


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}], ids=["missing", "wrong"])
def test_missing_or_wrong_key_is_401_with_rate_limit_headers(server: SandboxServer, headers: dict[str, str]) -> None:
    response = requests.get(server.base_url + "/contacts", headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.json() == {"detail": "Full authentication is required to access this resource."}
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Refill"} <= set(response.headers)


def test_unknown_path_is_404_and_other_methods_are_refused(server: SandboxServer, session: requests.Session) -> None:
    missing = get(session, server, "/payment/nothing")
    assert missing.status_code == 404
    assert missing.json() == {"title": "An error occurred", "detail": "Not Found"}
    assert session.post(server.base_url + "/contacts", json={}, timeout=10).status_code == 405


def test_responses_are_compact_json_over_keep_alive(server: SandboxServer, session: requests.Session) -> None:
    first = get(session, server, "/tags", limit=10)
    second = get(session, server, "/tags", limit=10)
    assert first.headers["Content-Type"] == "application/json"
    assert int(first.headers["Content-Length"]) == len(first.content)
    assert b", " not in first.content.split(b'"name"')[0]  # separators without spaces
    assert "close" not in first.headers.get("Connection", "") and second.status_code == 200


# ===================================================================== one contact by id


def test_one_contact_by_id_is_the_object_the_list_holds(server: SandboxServer, session: requests.Session) -> None:
    listed = walk(session, server, "/contacts", limit=100, order="asc")
    for contact in (listed[0], listed[len(listed) // 2], listed[-1]):
        response = get(session, server, f"/contacts/{contact['id']}")
        assert response.status_code == 200
        assert response.json() == contact
        assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Refill"} <= set(response.headers)
    assert [record.path for record in server.requests][-1] == f"/api/contacts/{listed[-1]['id']}"


@pytest.mark.parametrize("raw_id", ["0", "1", "abc", "-5", "12.0", "1e3", "\uff11", "99999999999999999999"])
def test_an_id_no_live_contact_has_or_that_is_not_an_integer_is_404(
    server: SandboxServer, session: requests.Session, raw_id: str
) -> None:
    response = get(session, server, f"/contacts/{raw_id}")
    assert response.status_code == 404
    assert response.json() == {"title": "An error occurred", "detail": "Not Found"}


def test_a_deleted_contact_is_404_and_other_methods_on_one_contact_are_refused(session: requests.Session) -> None:
    data = SandboxData(seed=3, contacts=30)
    with SandboxServer(data, api_key=KEY) as server:
        gone, kept = data.contact_ids[4], data.contact_ids[5]
        assert get(session, server, f"/contacts/{gone}").status_code == 200
        data.delete_contact(gone)
        assert get(session, server, f"/contacts/{gone}").json() == {"title": "An error occurred", "detail": "Not Found"}
        assert session.patch(f"{server.base_url}/contacts/{kept}", json={}, timeout=10).status_code == 405
        assert requests.get(f"{server.base_url}/contacts/{kept}", timeout=10).status_code == 401


def test_one_contact_spends_the_quota_and_takes_the_faults_of_its_path(session: requests.Session) -> None:
    clock = FakeClock()
    data = SandboxData(seed=3, contacts=30)
    one, other = data.contact_ids[0], data.contact_ids[1]
    with SandboxServer(data, api_key=KEY, rate_limit=(4, 10), clock=clock) as server:
        server.add_fault(Fault("status", path=f"/api/contacts/{one}", status=500))
        server.add_fault(Fault("bad_type", path=f"/api/contacts/{other}"))
        assert get(session, server, f"/contacts/{one}").status_code == 500
        assert get(session, server, f"/contacts/{one}").json() == data.contact(one)
        assert get(session, server, f"/contacts/{other}").json()["id"] == "abc"
        assert get(session, server, f"/contacts/{other}").json() == data.contact(other)
        refused = get(session, server, f"/contacts/{one}")
        assert (refused.status_code, refused.headers["X-RateLimit-Remaining"]) == (429, "0")
        assert [record.status for record in server.requests] == [500, 200, 200, 200, 429]


# ===================================================================== pagination


@pytest.mark.parametrize("limit", ["9", "101", "0", "ten", "10.5"])
def test_limit_outside_10_to_100_is_422_on_pagination_limit(
    server: SandboxServer, session: requests.Session, limit: str
) -> None:
    response = get(session, server, "/contacts", limit=limit)
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "https://tools.ietf.org/html/rfc2616#section-10"
    assert body["title"] == "An error occurred"
    assert body["detail"].startswith("limit: ")
    assert [violation["propertyPath"] for violation in body["violations"]] == ["pagination.limit"]
    if limit in ("9", "101"):
        assert body["detail"] == "limit: This value should be between 10 and 100."


def test_unknown_order_is_422_on_pagination_order(server: SandboxServer, session: requests.Session) -> None:
    response = get(session, server, "/tags", order="newest")
    assert response.status_code == 422
    assert response.json()["violations"][0]["propertyPath"] == "pagination.order"


def test_default_is_ten_records_newest_first(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    body = get(session, server, "/contacts").json()
    newest = sorted(data.contact_ids, reverse=True)[:10]
    assert [item["id"] for item in body["items"]] == newest
    assert body["hasMore"] is True


@pytest.mark.parametrize("resource", PAGED)
@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("limit", [10, 37, 100])
def test_cursor_walk_visits_every_record_once_and_matches_the_data(
    server: SandboxServer, session: requests.Session, data: SandboxData, resource: str, order: str, limit: int
) -> None:
    items = walk(session, server, PATHS[resource], order=order, limit=limit)
    expected = list(data.records(resource))
    if order == "desc":
        expected.reverse()
    assert items == expected
    assert len({item["id"] for item in items}) == data.count(resource)


def test_has_more_is_false_exactly_on_the_last_page(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    ids = list(data.contact_ids)
    before_last = get(session, server, "/contacts", order="asc", limit=10, startingAfter=ids[-11]).json()
    assert [item["id"] for item in before_last["items"]] == ids[-10:]
    assert before_last["hasMore"] is False
    past_the_end = get(session, server, "/contacts", order="asc", startingAfter=ids[-1]).json()
    assert past_the_end == {"items": [], "hasMore": False}


def test_contact_fields_come_in_one_page_whatever_the_parameters(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    response = get(session, server, "/contact_fields", limit=9, order="sideways", startingAfter="x")
    assert response.status_code == 200
    assert response.json() == {"items": list(data.records("contact_fields")), "hasMore": False}
    slugs = {field["slug"] for field in response.json()["items"]}
    assert {"first_name", "surname", "phone_number", "country", "city"} <= slugs


def test_deleted_contact_id_still_works_as_a_cursor(session: requests.Session) -> None:
    data = SandboxData(seed=3, contacts=120)
    ids = list(data.contact_ids)
    gone = ids[50]
    data.delete_contact(gone)
    with SandboxServer(data, api_key=KEY) as server:
        down = get(session, server, "/contacts", order="desc", limit=10, startingAfter=gone).json()
        up = get(session, server, "/contacts", order="asc", limit=10, startingAfter=gone).json()
        assert [item["id"] for item in down["items"]] == ids[40:50][::-1]
        assert [item["id"] for item in up["items"]] == ids[51:61]
        assert gone not in {item["id"] for item in walk(session, server, "/contacts", limit=100)}


def test_registered_after_returns_only_later_contacts(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    contacts = list(data.records("contacts"))
    pivot = contacts[200]
    later = walk(session, server, "/contacts", order="asc", limit=100, registeredAfter=pivot["registeredAt"])
    assert [item["id"] for item in later] == [contact["id"] for contact in contacts[201:]]
    bad = get(session, server, "/contacts", registeredAfter="yesterday")
    assert bad.status_code == 422 and bad.json()["violations"][0]["propertyPath"] == "registeredAfter"


def test_mutations_show_up_in_the_api(session: requests.Session) -> None:
    data = SandboxData(seed=5, contacts=30)
    old_max = max(data.contact_ids)
    new_ids = data.add_contacts(3)
    tag_id = data.tag_ids[0]
    data.set_contact_tags(new_ids[0], [tag_id])
    with SandboxServer(data, api_key=KEY) as server:
        newest = get(session, server, "/contacts", limit=10).json()["items"]
    assert min(new_ids) > old_max and new_ids == sorted(new_ids)
    assert [item["id"] for item in newest[:3]] == new_ids[::-1]
    assert newest[2]["tags"] == [{"id": tag_id, "name": next(data.records("tags"))["name"]}]
    assert newest[0]["registeredAt"] > newest[3]["registeredAt"]


# ===================================================================== data


def test_same_seed_and_size_give_identical_data_and_bytes(session: requests.Session) -> None:
    first, second = SandboxData(seed=11, contacts=300), SandboxData(seed=11, contacts=300)
    for resource in PATHS:
        assert list(first.records(resource)) == list(second.records(resource))
    with SandboxServer(first, api_key=KEY) as one, SandboxServer(second, api_key=KEY) as two:
        for path in PATHS.values():
            assert get(session, one, path, limit=100).content == get(session, two, path, limit=100).content
    assert list(SandboxData(seed=12, contacts=300).records("contacts")) != list(first.records("contacts"))


def test_records_have_the_spec_shapes(data: SandboxData) -> None:
    contacts = list(data.records("contacts"))
    tag_names = {tag["id"]: tag["name"] for tag in data.records("tags")}
    assert [c["id"] for c in contacts] == sorted(c["id"] for c in contacts)
    assert any(b["id"] - a["id"] > 1 for a, b in itertools.pairwise(contacts))  # ids have gaps
    stamps = [datetime.fromisoformat(c["registeredAt"]) for c in contacts]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(c["registeredAt"].endswith("+00:00") for c in contacts)
    assert {c["locale"] for c in contacts} <= set(LOCALES)
    assert any(c["sourceURL"] is None for c in contacts) and any(c["sourceURL"] for c in contacts)
    assert any(c["fields"] == [] for c in contacts) and any(c["tags"] == [] for c in contacts)
    values = [f["value"] for c in contacts for f in c["fields"]]
    assert None in values and "" in values
    assert all(tag_names[t["id"]] == t["name"] for c in contacts for t in c["tags"])
    courses = list(data.records("course_resources"))
    assert any(course["modules"] == [] for course in courses)
    assert any(module["id"] is None for course in courses for module in course["modules"])
    assert 4 <= data.count("communities") <= 6 and 36 <= data.count("tags") <= 44
    assert 10 <= data.count("course_resources") <= 14 and 7 <= data.count("contact_fields") <= 9


def test_unicode_and_quotes_survive_the_round_trip(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    names = {tag["name"] for tag in walk(session, server, "/tags", limit=100)}
    assert {"Café ☕", "日本語", "x'); DROP TABLE contacts;--"} <= names
    assert any("'" in name for name in names) and any('"' in name for name in names)
    assert names == {tag["name"] for tag in data.records("tags")}


# ===================================================================== memberships and enrollments


def embedded_contact(contact: dict[str, Any]) -> dict[str, Any]:
    """A contact as enrollments embed it: the record without fields and tags."""
    return {key: value for key, value in contact.items() if key not in ("fields", "tags")}


def embedded_course(course: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in course.items() if key not in ("domainName", "modules")}




@pytest.mark.parametrize("resource", RELATIONS)
@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("limit", [10, 100])
def test_relation_walk_gives_every_record_once_in_strict_id_order(
    server: SandboxServer, session: requests.Session, data: SandboxData, resource: str, order: str, limit: int
) -> None:
    items = walk(session, server, PATHS[resource], order=order, limit=limit)
    ids = ids_of({"items": items})
    pairs = list(itertools.pairwise(ids))
    assert all(a < b for a, b in pairs) if order == "asc" else all(a > b for a, b in pairs)
    assert sorted(ids) == [record["id"] for record in data.records(resource)]
    assert len(ids) == data.count(resource) > 100  # several pages of 100, so the cursor was used
    # Ids grow with the contact: walking them is walking the contacts in the same order.
    contacts = [item["contact"]["id"] for item in items]
    assert contacts == sorted(contacts, reverse=order == "desc")


def test_memberships_have_the_spec_shape_and_current_communities(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    communities = {community["id"]: community for community in data.records("communities")}
    live = set(data.contact_ids)
    items = walk(session, server, "/community/memberships", limit=100)
    for item in items:
        assert list(item) == ["id", "community", "contact"]
        assert type(item["id"]) is int
        assert item["community"] == communities[item["community"]["id"]]
        assert list(item["community"]) == ["id", "name", "domainName", "path"]
        assert list(item["contact"]) == ["id"] and item["contact"]["id"] in live
    per_contact: dict[int, list[int]] = {}
    for item in items:
        per_contact.setdefault(item["contact"]["id"], []).append(item["community"]["id"])
    assert {len(ids) for ids in per_contact.values()} == {1, 2}
    assert all(len(set(ids)) == len(ids) for ids in per_contact.values())  # never twice in one community
    assert {item["community"]["id"] for item in items} == set(communities)


def test_enrollments_have_the_spec_shape_with_the_current_contact_and_course(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    courses = {course["id"]: course for course in data.records("course_resources")}
    items = walk(session, server, "/school/enrollments", limit=100)
    for item in items:
        assert list(item) == ["id", "contact", "course", "accessType", "active"]
        assert type(item["id"]) is int
        assert item["contact"] == embedded_contact(data.contact(item["contact"]["id"]))
        assert list(item["contact"]) == [
            "id", "email", "registeredAt", "locale", "sourceURL", "unsubscribed", "bounced", "needsConfirmation",
        ]  # fmt: skip
        assert item["course"] == embedded_course(courses[item["course"]["id"]])
        assert list(item["course"]) == ["id", "locale", "path", "active", "name"]
        assert item["accessType"] in ACCESS_TYPES and type(item["active"]) is bool
    assert {item["accessType"] for item in items} == set(ACCESS_TYPES)
    assert {item["active"] for item in items} == {True, False}
    per_contact: dict[int, list[int]] = {}
    for item in items:
        per_contact.setdefault(item["contact"]["id"], []).append(item["course"]["id"])
    assert {len(ids) for ids in per_contact.values()} == {1, 2}
    assert all(len(set(ids)) == len(ids) for ids in per_contact.values())


def test_relations_follow_contact_mutations(session: requests.Session) -> None:
    data = SandboxData(seed=9, contacts=200)
    enrollments = list(data.records("enrollments"))
    memberships = list(data.records("memberships"))
    enrolled = enrollments[len(enrollments) // 2]["contact"]["id"]
    member = next(item["contact"]["id"] for item in memberships if item["contact"]["id"] != enrolled)
    data.set_contact_tags(enrolled, data.tag_ids[:3])
    gone_enrollments = sum(item["contact"]["id"] == member for item in enrollments)
    data.delete_contact(member)
    new_ids = data.add_contacts(60)
    with SandboxServer(data, api_key=KEY) as server:
        served_enrollments = walk(session, server, "/school/enrollments", order="asc", limit=100)
        served_memberships = walk(session, server, "/community/memberships", order="asc", limit=100)
        for path in ("/community/memberships", "/school/enrollments"):
            assert get(session, server, path, contact=member).json() == {"items": [], "hasMore": False}
        tagged = get(session, server, "/school/enrollments", contact=enrolled).json()["items"]
    # Retagged: the embedded contact is still the contact as it is now.
    assert tagged and all(item["contact"] == embedded_contact(data.contact(enrolled)) for item in tagged)
    # Deleted: its memberships and enrollments went with it, and nothing else did.
    assert member not in {item["contact"]["id"] for item in served_memberships + served_enrollments}
    assert served_memberships == list(data.records("memberships"))
    assert served_enrollments == list(data.records("enrollments"))
    old_ids = set(data.contact_ids) - set(new_ids)
    assert [item for item in served_memberships if item["contact"]["id"] in old_ids] == [
        item for item in memberships if item["contact"]["id"] != member
    ]
    assert len([item for item in served_enrollments if item["contact"]["id"] in old_ids]) == (
        len(enrollments) - gone_enrollments
    )
    # Added: the new contacts come with memberships and enrollments of their own.
    assert {item["contact"]["id"] for item in served_memberships} & set(new_ids)
    assert {item["contact"]["id"] for item in served_enrollments} & set(new_ids)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_relation_filters_select_matching_records(
    server: SandboxServer, session: requests.Session, data: SandboxData, order: str
) -> None:
    memberships = list(data.records("memberships"))
    enrollments = list(data.records("enrollments"))
    if order == "desc":
        memberships.reverse()
        enrollments.reverse()
    for community_id in data.community_ids:
        expected = [item for item in memberships if item["community"]["id"] == community_id]
        served = walk(session, server, "/community/memberships", order=order, limit=10, community=community_id)
        assert served == expected and len(expected) > 10  # more than a page: the cursor is filtered too
    for course_id in data.course_ids[:3]:
        expected = [item for item in enrollments if item["course"]["id"] == course_id]
        assert walk(session, server, "/school/enrollments", order=order, limit=10, course=course_id) == expected
    two_communities = next(
        contact for contact, n in Counter(item["contact"]["id"] for item in memberships).items() if n == 2
    )
    mine = [item for item in memberships if item["contact"]["id"] == two_communities]
    assert walk(session, server, "/community/memberships", order=order, contact=two_communities) == mine
    both = {"contact": two_communities, "community": mine[1]["community"]["id"]}
    assert walk(session, server, "/community/memberships", order=order, **both) == mine[1:]
    enrolled = enrollments[7]["contact"]["id"]
    expected = [item for item in enrollments if item["contact"]["id"] == enrolled]
    assert walk(session, server, "/school/enrollments", order=order, contact=str(enrolled)) == expected
    # Ids that name nothing (no such community, course or contact) match nothing.
    nobody = max(data.contact_ids) + 1
    for path, params in [
        ("/community/memberships", {"community": max(data.community_ids) + 1}),
        ("/community/memberships", {"contact": nobody}),
        ("/community/memberships", {"contact": -4}),
        ("/school/enrollments", {"course": max(data.course_ids) + 1}),
        ("/school/enrollments", {"contact": nobody}),
    ]:
        assert get(session, server, path, order=order, **params).json() == {"items": [], "hasMore": False}


def test_relation_filters_empty_or_of_the_other_resource_are_ignored(
    server: SandboxServer, session: requests.Session
) -> None:
    everything = get(session, server, "/community/memberships", limit=50).json()
    assert get(session, server, "/community/memberships", limit=50, community="", contact="").json() == everything
    # Like API Platform, a parameter the collection has no filter for changes nothing.
    assert get(session, server, "/community/memberships", limit=50, course="1").json() == everything
    with pytest.raises(ValueError):
        SandboxData(contacts=10).page("memberships", limit=10, order="asc", filters={"course": 1})


@pytest.mark.parametrize("path", ["/community/memberships", "/school/enrollments"])
@pytest.mark.parametrize("limit", ["9", "101", "ten"])
def test_relation_limits_outside_10_to_100_are_422(
    server: SandboxServer, session: requests.Session, path: str, limit: str
) -> None:
    response = get(session, server, path, limit=limit)
    assert response.status_code == 422
    assert [violation["propertyPath"] for violation in response.json()["violations"]] == ["pagination.limit"]
    assert get(session, server, path, order="sideways").json()["violations"][0]["propertyPath"] == "pagination.order"


@pytest.mark.parametrize(
    ("path", "params", "bad"),
    [
        ("/community/memberships", {"community": "abc"}, ["community"]),
        ("/community/memberships", {"contact": "1.5"}, ["contact"]),
        ("/community/memberships", {"community": "x", "contact": "12a"}, ["community", "contact"]),
        ("/school/enrollments", {"course": "abc"}, ["course"]),
        ("/school/enrollments", {"contact": "-3"}, ["contact"]),  # a string filter: digits only
        ("/school/enrollments", {"contact": "1e3", "limit": "5"}, ["pagination.limit", "contact"]),
    ],
)
def test_relation_filters_that_are_not_ids_are_422(
    server: SandboxServer, session: requests.Session, path: str, params: dict[str, str], bad: list[str]
) -> None:
    response = get(session, server, path, **params)
    assert response.status_code == 422
    body = response.json()
    assert body["title"] == "An error occurred"
    assert [violation["propertyPath"] for violation in body["violations"]] == bad
    assert body["detail"].splitlines()[-1].startswith(f"{bad[-1]}: ")


def test_same_seed_gives_byte_identical_relation_pages(session: requests.Session) -> None:
    first, second = SandboxData(seed=21, contacts=400), SandboxData(seed=21, contacts=400)
    other = SandboxData(seed=22, contacts=400)
    with (
        SandboxServer(first, api_key=KEY) as one,
        SandboxServer(second, api_key=KEY) as two,
        SandboxServer(other, api_key=KEY) as three,
    ):
        for path in ("/community/memberships", "/school/enrollments"):
            for order in ("asc", "desc"):
                cursor: Any = None
                for _ in range(3):
                    params = {"order": order, "limit": 37, "startingAfter": cursor}
                    page_one = get(session, one, path, **params)
                    assert page_one.content == get(session, two, path, **params).content
                    assert page_one.content != get(session, three, path, **params).content
                    cursor = page_one.json()["items"][-1]["id"]


def test_relations_average_about_0_3_memberships_and_0_4_enrollments_per_contact() -> None:
    data = SandboxData(seed=13, contacts=20_000)
    memberships, enrollments = data.count("memberships") / 20_000, data.count("enrollments") / 20_000
    # The standard error of each mean is ~0.004 here: a band of +-0.03 only fails on a real change.
    assert 0.27 <= memberships <= 0.33, memberships
    assert 0.37 <= enrollments <= 0.43, enrollments
    per_contact = Counter(item["contact"]["id"] for item in data.records("memberships"))
    assert set(per_contact.values()) == {1, 2}
    assert 0.7 < 1 - len(per_contact) / 20_000 < 0.8  # three in four contacts are in no community


def test_a_relation_page_of_a_million_contacts_is_served_in_milliseconds(session: requests.Session) -> None:
    data = SandboxData(seed=1, contacts=1_000_000)
    middle = data.contact_ids[500_000] * 4
    with SandboxServer(data, api_key=KEY) as server:
        assert get(session, server, "/tags").status_code == 200  # the connection is open before timing
        timings = {}
        for path in ("/community/memberships", "/school/enrollments"):
            started = time.perf_counter()
            response = get(session, server, path, limit=100, startingAfter=middle)
            timings[path] = time.perf_counter() - started
            assert response.status_code == 200 and len(response.json()["items"]) == 100
    # A walk from the start (or a count) would take seconds at this size; a page takes a few ms.
    assert timings["/community/memberships"] < 0.05, timings
    assert timings["/school/enrollments"] < 0.05, timings


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_repeat_cursor_fault_on_a_relation_serves_the_page_the_client_already_has(
    server: SandboxServer, session: requests.Session, order: str
) -> None:
    for path in ("/community/memberships", "/school/enrollments"):
        first = get(session, server, path, order=order, limit=20).json()
        server.add_fault(Fault("repeat_cursor", path="/api" + path))
        again = get(session, server, path, order=order, limit=20, startingAfter=first["items"][-1]["id"]).json()
        assert again == first


@pytest.mark.parametrize("resource", ["contacts", *RELATIONS])
def test_a_list_is_newest_first_by_default_and_a_cursor_reads_on_from_any_id(
    server: SandboxServer, session: requests.Session, data: SandboxData, resource: str
) -> None:
    ids = [record["id"] for record in data.records(resource)]
    newest_first = get(session, server, PATHS[resource]).json()
    assert [item["id"] for item in newest_first["items"]] == ids[::-1][:10] and newest_first["hasMore"] is True
    # What an incremental read asks: ascending after the newest id stored.
    assert get(session, server, PATHS[resource], order="asc", startingAfter=ids[-1]).json() == {"items": [], "hasMore": False}
    before_last = get(session, server, PATHS[resource], order="asc", limit=10, startingAfter=ids[-4]).json()
    assert [item["id"] for item in before_last["items"]] == ids[-3:] and before_last["hasMore"] is False
    # A cursor that is no record's id (between two, or past every one) reads on from where it falls.
    between = ids[20] + 1 if ids[21] > ids[20] + 1 else ids[20]
    up = get(session, server, PATHS[resource], order="asc", limit=10, startingAfter=between).json()
    down = get(session, server, PATHS[resource], order="desc", limit=10, startingAfter=between + 1).json()
    assert [item["id"] for item in up["items"]] == ids[21:31]
    assert [item["id"] for item in down["items"]] == ids[11:21][::-1]
    past_the_end = get(session, server, PATHS[resource], order="desc", limit=10, startingAfter=ids[-1] + 10).json()
    assert past_the_end["items"][0]["id"] == ids[-1]


def test_a_relation_added_to_an_existing_contact_comes_after_every_earlier_id_and_a_removed_one_goes(
    session: requests.Session,
) -> None:
    data = SandboxData(seed=9, contacts=200)
    before = {resource: list(data.records(resource)) for resource in RELATIONS}
    member = next(contact for contact in data.contact_ids if not any(m["contact"]["id"] == contact for m in before["memberships"]))
    membership = data.add_relation("memberships", member, data.community_ids[-1])
    student = before["enrollments"][0]["contact"]["id"]
    taken = {item["course"]["id"] for item in before["enrollments"] if item["contact"]["id"] == student}
    course = next(course for course in data.course_ids if course not in taken)
    enrollment = data.add_relation("enrollments", student, course)
    new_contacts = data.add_contacts(40)
    removed = before["memberships"][5]["id"]
    data.remove_relation("memberships", removed)
    data.remove_relation("enrollments", enrollment)
    with SandboxServer(data, api_key=KEY) as server:
        served = {resource: walk(session, server, PATHS[resource], order="asc", limit=10) for resource in RELATIONS}
        backwards = walk(session, server, PATHS["memberships"], order="desc", limit=10)
        newer = walk(session, server, PATHS["memberships"], order="asc", startingAfter=before["memberships"][-1]["id"])
        mine = get(session, server, PATHS["memberships"], contact=member).json()["items"]
        in_community = walk(session, server, PATHS["memberships"], limit=10, community=data.community_ids[-1])
    assert membership > max(item["id"] for item in before["memberships"] + before["enrollments"])
    # Contacts added later still have relations with higher ids than the added one.
    later = [item for item in served["memberships"] if item["contact"]["id"] in set(new_contacts)]
    assert later and min(item["id"] for item in later) > membership
    assert served["memberships"] == list(data.records("memberships")) and backwards == served["memberships"][::-1]
    assert [item["id"] for item in newer] == [membership] + [item["id"] for item in later]
    community = next(record for record in data.records("communities") if record["id"] == data.community_ids[-1])
    assert mine == [{"id": membership, "community": community, "contact": {"id": member}}]
    assert membership in {item["id"] for item in in_community}
    assert removed not in {item["id"] for item in served["memberships"]}
    assert enrollment not in {item["id"] for item in served["enrollments"]}
    assert data.count("memberships") == len(served["memberships"]) == len(before["memberships"]) + 1 + len(later) - 1
    # Deleting the contact takes the relation added to it too; a removed id cannot be removed again.
    data.delete_contact(member)
    assert membership not in {item["id"] for item in data.records("memberships")}
    with pytest.raises(KeyError):
        data.remove_relation("memberships", removed)
    with pytest.raises(KeyError):
        data.add_relation("memberships", member, data.community_ids[0])
    with pytest.raises(KeyError):
        data.add_relation("enrollments", student, max(data.course_ids) + 1)


# ===================================================================== rate limit


def test_rate_limit_allows_n_requests_then_429_until_the_window_refills(session: requests.Session) -> None:
    clock = FakeClock()
    with SandboxServer(SandboxData(contacts=20), api_key=KEY, rate_limit=(3, 10), clock=clock) as server:
        remaining = [get(session, server, "/tags").headers["X-RateLimit-Remaining"] for _ in range(3)]
        assert remaining == ["2", "1", "0"]
        clock.now += 2.5
        refused = get(session, server, "/tags")
        assert refused.status_code == 429
        assert refused.json() == {"title": "Too Many Requests"}
        assert refused.headers["Retry-After"] == "8"
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert refused.headers["X-RateLimit-Refill"] == "8"
        # Neither bad keys nor admin calls spend the quota, but both report it.
        assert requests.get(server.base_url + "/tags", timeout=10).status_code == 401
        assert requests.get(server.url + "/__sandbox/requests", timeout=10).status_code == 200
        clock.now += 7.5
        assert get(session, server, "/tags").headers["X-RateLimit-Remaining"] == "2"


def test_without_rate_limit_headers_still_advertise_a_quota(server: SandboxServer, session: requests.Session) -> None:
    headers = get(session, server, "/tags").headers
    assert int(headers["X-RateLimit-Limit"]) >= 100_000
    assert int(headers["X-RateLimit-Remaining"]) > 0 and int(headers["X-RateLimit-Refill"]) >= 0


# ===================================================================== faults


def test_status_fault_answers_that_status_with_retry_after(server: SandboxServer, session: requests.Session) -> None:
    server.add_fault(Fault("status", path="/api/contacts", status=503, retry_after=2))
    failed = get(session, server, "/contacts")
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "2"
    assert failed.json()["title"] == "An error occurred"
    assert "X-RateLimit-Limit" in failed.headers
    assert get(session, server, "/contacts").status_code == 200  # times=1: only once


def test_truncated_fault_sends_half_a_json_body(server: SandboxServer, session: requests.Session) -> None:
    whole = get(session, server, "/tags", limit=50).content
    server.add_fault(Fault("truncated"))
    cut = get(session, server, "/tags", limit=50)
    assert cut.status_code == 200 and cut.content == whole[: len(whole) // 2]
    with pytest.raises(ValueError):
        json.loads(cut.content)


def test_html_fault_sends_an_html_page(server: SandboxServer, session: requests.Session) -> None:
    server.add_fault(Fault("html"))
    page = get(session, server, "/tags")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.text.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("no_items", lambda body: "items" not in body and body["hasMore"] is True),
        ("items_not_list", lambda body: isinstance(body["items"], dict) and len(body["items"]) == 10),
        ("no_has_more", lambda body: "hasMore" not in body and len(body["items"]) == 10),
        ("missing_id", lambda body: sum("id" not in item for item in body["items"]) == 1),
        ("bad_type", lambda body: [item["id"] for item in body["items"]].count("abc") == 1),
        ("empty_has_more", lambda body: body == {"items": [], "hasMore": True}),
        ("empty", lambda body: body == {"items": [], "hasMore": False}),
        ("extra_field", lambda body: all(item["score"] == 42 for item in body["items"])),
    ],
)
def test_shape_faults_break_the_page_as_named(
    server: SandboxServer, session: requests.Session, kind: str, check: Any
) -> None:
    server.add_fault(Fault(kind, path="/api/contacts"))
    broken = get(session, server, "/contacts", limit=10)
    assert broken.status_code == 200
    assert check(broken.json()), broken.text
    assert set(get(session, server, "/contacts", limit=10).json()) == {"items", "hasMore"}


def test_repeat_cursor_fault_serves_the_page_the_client_already_has(
    server: SandboxServer, session: requests.Session
) -> None:
    for order in ("desc", "asc"):
        server.add_fault(Fault("repeat_cursor", after=1))
        first = get(session, server, "/contacts", order=order, limit=20).json()
        cursor = first["items"][-1]["id"]
        again = get(session, server, "/contacts", order=order, limit=20, startingAfter=cursor).json()
        assert again == first and again["items"][-1]["id"] == cursor


def test_reset_fault_aborts_the_connection_mid_body(server: SandboxServer, session: requests.Session) -> None:
    server.add_fault(Fault("reset", path="/api/tags"))
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        get(session, server, "/tags", limit=100)
    assert get(session, server, "/tags").status_code == 200  # the session reconnects
    assert [record.status for record in server.requests] == [200, 200]


def test_delay_fault_makes_the_client_time_out(session: requests.Session) -> None:
    # An own server: stopping it wakes the delayed handler, which would otherwise finish (and
    # log its request) during a later test.
    with SandboxServer(SandboxData(contacts=10), api_key=KEY) as server:
        server.add_fault(Fault("delay", delay=30.0))
        with pytest.raises(requests.exceptions.ReadTimeout):
            session.get(server.base_url + "/tags", timeout=0.2)
        assert get(session, server, "/tags").status_code == 200  # times=1: answered at once


def test_redirect_fault_points_to_location_with_same_path_and_query(
    server: SandboxServer, session: requests.Session
) -> None:
    server.add_fault(Fault("redirect", location="http://127.0.0.1:9/elsewhere"))
    moved = session.get(server.base_url + "/contacts?limit=20&order=asc", allow_redirects=False, timeout=10)
    assert moved.status_code == 302
    assert moved.headers["Location"] == "http://127.0.0.1:9/elsewhere/api/contacts?limit=20&order=asc"


def test_fault_after_and_times_pick_which_requests_fail(server: SandboxServer, session: requests.Session) -> None:
    server.add_fault(Fault("status", path="/api/contacts", after=2, times=2, status=500))
    server.add_fault(Fault("status", path="/api/tags", times=-1, status=502))
    statuses = [get(session, server, "/contacts").status_code for _ in range(5)]
    assert statuses == [200, 200, 500, 500, 200]
    assert [get(session, server, "/tags").status_code for _ in range(3)] == [502, 502, 502]
    assert get(session, server, "/school/courses").status_code == 200


def test_invalid_faults_are_rejected() -> None:
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(ValueError):
        Fault("redirect")


# ===================================================================== hostile records


def ids_of(body: dict[str, Any]) -> list[Any]:
    return [item["id"] for item in body["items"]]


def max_depth(text: bytes) -> int:
    """The deepest bracket nesting of a JSON text, counted in a loop (json.loads would recurse)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    assert depth == 0 and not in_string, "unbalanced JSON text"
    return deepest


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_float_id_fault_gives_the_middle_record_the_previous_id_plus_a_half(
    server: SandboxServer, session: requests.Session, order: str
) -> None:
    normal = get(session, server, "/contacts", order=order, limit=10).json()
    server.add_fault(Fault("float_id", path="/api/contacts"))
    broken = get(session, server, "/contacts", order=order, limit=10)
    ids, expected = ids_of(broken.json()), ids_of(normal)
    assert ids[5] == expected[4] + 0.5 and isinstance(ids[5], float)
    assert ids[:5] == expected[:5] and ids[6:] == expected[6:]
    assert f'"id":{expected[4]}.5,'.encode() in broken.content  # a JSON number, not a string
    assert broken.json()["items"][5]["email"] == normal["items"][5]["email"]  # only the id changed


def test_float_id_fault_gives_a_record_without_id_the_id_half(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    server.add_fault(Fault("float_id", path="/api/contact_fields"))
    fields = list(data.records("contact_fields"))
    fields[len(fields) // 2]["id"] = 0.5
    assert get(session, server, "/contact_fields").json()["items"] == fields


def test_swapped_fault_trades_the_two_middle_records(server: SandboxServer, session: requests.Session) -> None:
    normal = get(session, server, "/tags", order="asc", limit=10).json()
    server.add_fault(Fault("swapped", path="/api/tags"))
    broken = get(session, server, "/tags", order="asc", limit=10).json()
    items = normal["items"]
    assert broken["items"] == items[:4] + [items[5], items[4]] + items[6:]
    assert broken["hasMore"] == normal["hasMore"]
    assert ids_of(broken) != sorted(ids_of(broken))


@pytest.mark.parametrize(
    ("resource", "value_of"),
    [
        ("contacts", lambda record: record["fields"][0]["value"]),
        ("tags", lambda record: record["name"]),
        ("course_resources", lambda record: record["name"]),
        ("contact_fields", lambda record: record["fieldName"]),
        ("memberships", lambda record: record["community"]["name"]),
        ("enrollments", lambda record: record["course"]["name"]),
    ],
)
def test_big_value_fault_puts_size_x_in_the_middle_record(
    server: SandboxServer, session: requests.Session, data: SandboxData, resource: str, value_of: Any
) -> None:
    normal = get(session, server, PATHS[resource], limit=10).json()["items"]
    middle = len(normal) // 2
    if resource == "contacts":
        assert normal[middle]["fields"], "the middle contact of this page must have a field to overwrite"
    server.add_fault(Fault("big_value", size=300_000))
    broken = get(session, server, PATHS[resource], limit=10).json()["items"]
    assert value_of(broken[middle]) == "x" * 300_000
    assert broken[:middle] + broken[middle + 1 :] == normal[:middle] + normal[middle + 1 :]


def test_big_value_fault_adds_a_field_to_a_contact_without_any(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    contacts = list(data.records("contacts"))
    bare = next(index for index, contact in enumerate(contacts) if index > 5 and contact["fields"] == [])
    cursor = contacts[bare - 6]["id"]  # ascending pages of 10: the page after it has `bare` in the middle
    server.add_fault(Fault("big_value", size=1000))
    items = get(session, server, "/contacts", order="asc", limit=10, startingAfter=cursor).json()["items"]
    first_field = next(data.records("contact_fields"))
    assert items[5]["id"] == contacts[bare]["id"]
    assert items[5]["fields"] == [{**first_field, "value": "x" * 1000}]


def test_dangling_fault_points_a_membership_at_a_contact_that_never_existed(session: requests.Session) -> None:
    data = SandboxData(seed=4, contacts=300)
    newest = max(data.contact_ids)
    data.delete_contact(newest)  # the dangling id must not be a deleted one either
    with SandboxServer(data, api_key=KEY) as server:
        normal = get(session, server, "/community/memberships", limit=10).json()
        server.add_fault(Fault("dangling", path="/api/community/memberships"))
        broken = get(session, server, "/community/memberships", limit=10).json()
        assert get(session, server, "/community/memberships", limit=10).json() == normal  # times=1
    dangling = broken["items"][5]["contact"]["id"]
    assert dangling == data.next_contact_id and dangling > newest
    assert dangling not in set(data.contact_ids)
    assert broken["items"][5] == {**normal["items"][5], "contact": {"id": dangling}}  # only the contact changed
    assert broken["items"][:5] + broken["items"][6:] == normal["items"][:5] + normal["items"][6:]
    assert broken["hasMore"] == normal["hasMore"]


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_dangling_fault_embeds_a_contact_not_yet_registered_in_an_enrollment(
    session: requests.Session, order: str
) -> None:
    data = SandboxData(seed=4, contacts=300)
    with SandboxServer(data, api_key=KEY) as server:
        normal = get(session, server, "/school/enrollments", order=order, limit=10).json()
        server.add_fault(Fault("dangling"))
        broken = get(session, server, "/school/enrollments", order=order, limit=10).json()
    items, expected = broken["items"], normal["items"]
    phantom = items[5]["contact"]
    assert phantom["id"] not in set(data.contact_ids) and phantom["id"] > max(data.contact_ids)
    assert list(phantom) == list(expected[5]["contact"])  # a whole, well-formed contact
    assert items[5] == {**expected[5], "contact": phantom}
    assert items[:5] + items[6:] == expected[:5] + expected[6:]
    # It is the contact the next registration creates: what a sync that read contacts first misses.
    (added,) = data.add_contacts(1)
    assert phantom == embedded_contact(data.contact(added))


def test_dangling_fault_gives_a_contact_a_tag_that_does_not_exist(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    normal = get(session, server, "/contacts", limit=10).json()["items"]
    server.add_fault(Fault("dangling", path="/api/contacts"))
    broken = get(session, server, "/contacts", limit=10).json()["items"]
    extra = broken[5]["tags"][-1]
    assert extra["id"] not in set(data.tag_ids) and extra["id"] == data.unused_tag_id
    assert type(extra["id"]) is int and isinstance(extra["name"], str)
    assert broken[5] == {**normal[5], "tags": normal[5]["tags"] + [extra]}
    assert broken[:5] + broken[6:] == normal[:5] + normal[6:]


def test_dangling_fault_leaves_resources_without_references_alone_but_is_spent(
    server: SandboxServer, session: requests.Session
) -> None:
    normal = {path: get(session, server, path, limit=10).content for path in ("/tags", "/contact_fields", "/contacts")}
    server.add_fault(Fault("dangling"))
    assert get(session, server, "/tags", limit=10).content == normal["/tags"]
    assert get(session, server, "/contacts", limit=10).content == normal["/contacts"]  # already fired
    server.add_fault(Fault("dangling", path="/api/contact_fields"))
    assert get(session, server, "/contact_fields").content == normal["/contact_fields"]


def test_deep_json_fault_nests_a_list_size_levels_deep_in_valid_json(
    server: SandboxServer, session: requests.Session
) -> None:
    depth = 5000  # deeper than the recursion limit: the body cannot have come from json.dumps
    normal = get(session, server, "/tags", limit=10).json()
    server.add_fault(Fault("deep_json", path="/api/tags", size=depth))
    body = get(session, server, "/tags", limit=10).content
    assert max_depth(body) == depth + 3  # the page object, its items list, the record
    start = body.index(b'"deep":') + len(b'"deep":')
    assert body[start : start + 2 * depth] == b"[" * depth + b"]" * depth
    shallow = json.loads(body[:start] + b"[]" + body[start + 2 * depth :])
    assert shallow["items"][5].pop("deep") == []
    assert shallow == normal


def test_short_has_more_fault_drops_the_last_record_and_says_more_follow(
    server: SandboxServer, session: requests.Session, data: SandboxData
) -> None:
    server.add_fault(Fault("short_has_more", path="/api/contact_fields"))
    fields = list(data.records("contact_fields"))
    assert get(session, server, "/contact_fields").json() == {"items": fields[:-1], "hasMore": True}
    assert get(session, server, "/contact_fields").json() == {"items": fields, "hasMore": False}
    ids = list(data.contact_ids)
    last_page = get(session, server, "/contacts", order="asc", startingAfter=ids[-11]).json()
    server.add_fault(Fault("short_has_more"))
    short = get(session, server, "/contacts", order="asc", startingAfter=ids[-11]).json()
    assert last_page["hasMore"] is False
    assert short == {"items": last_page["items"][:-1], "hasMore": True}


def test_size_defaults_resolve_as_documented() -> None:
    assert Fault("big_value").effective_size() == 10 * 1024 * 1024
    assert Fault("deep_json").effective_size() == 10_000
    assert Fault("big_value", size=7).effective_size() == 7
    assert Fault("short_has_more").effective_size() == 0  # takes no size


def test_new_fault_fields_are_validated() -> None:
    for bad_size in (-1, True, 1.5, "10"):
        with pytest.raises(ValueError):
            Fault("big_value", size=bad_size)  # type: ignore[arg-type]


# ===================================================================== hostile pages


@pytest.mark.parametrize("resource", PAGED)
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_repeat_last_fault_starts_the_page_with_the_previous_pages_last_record(
    session: requests.Session, resource: str, order: str
) -> None:
    path = PATHS[resource]
    # Every resource needs a second page, which the default few communities do not fill, nor
    # fewer than ~70 contacts' memberships and enrollments (0.3 and 0.4 per contact).
    with SandboxServer(SandboxData(seed=2, contacts=100, communities=25, courses=25), api_key=KEY) as server:
        first = get(session, server, path, order=order, limit=10).json()
        cursor = first["items"][-1]["id"]
        normal = get(session, server, path, order=order, limit=10, startingAfter=cursor).json()
        server.add_fault(Fault("repeat_last", path="/api" + path))
        repeated = get(session, server, path, order=order, limit=10, startingAfter=cursor).json()
    assert len(normal["items"]) == 10 and normal["hasMore"] is True
    assert repeated == {"items": [first["items"][-1]] + normal["items"][:-1], "hasMore": True}


def test_repeat_last_fault_leaves_a_first_page_alone_but_is_spent(
    server: SandboxServer, session: requests.Session
) -> None:
    first = get(session, server, "/contacts", limit=10).json()
    second = get(session, server, "/contacts", limit=10, startingAfter=first["items"][-1]["id"]).json()
    server.add_fault(Fault("repeat_last"))
    assert get(session, server, "/contacts", limit=10).json() == first
    assert get(session, server, "/contacts", limit=10, startingAfter=first["items"][-1]["id"]).json() == second


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_oversized_fault_sends_size_records_continuing_the_page_in_order(
    server: SandboxServer, session: requests.Session, data: SandboxData, order: str
) -> None:
    cursor = data.contact_ids[200]
    normal = get(session, server, "/contacts", order=order, limit=10, startingAfter=cursor).json()
    server.add_fault(Fault("oversized", path="/api/contacts", size=1500))  # more than the account holds
    big = get(session, server, "/contacts", order=order, limit=10, startingAfter=cursor).json()
    ids = ids_of(big)
    assert len(ids) == 1500 and big["items"][:10] == normal["items"] and big["hasMore"] == normal["hasMore"]
    pairs = list(itertools.pairwise(ids))
    assert all(a < b for a, b in pairs) if order == "asc" else all(a > b for a, b in pairs)
    assert all(type(i) is int for i in ids)
    assert all(item.keys() == normal["items"][0].keys() for item in big["items"])


def test_oversized_fault_defaults_to_ten_times_the_limit_and_works_without_ids(
    server: SandboxServer, session: requests.Session
) -> None:
    server.add_fault(Fault("oversized", path="/api/tags"))
    assert len(get(session, server, "/tags", limit=37).json()["items"]) == 370
    server.add_fault(Fault("oversized", path="/api/contact_fields", size=50))
    fields = get(session, server, "/contact_fields").json()["items"]
    assert len(fields) == 50 and len({field["slug"] for field in fields}) == 50
    assert all(set(field) == {"fieldName", "slug"} for field in fields)


def test_oversized_fault_serves_100k_records_in_seconds(server: SandboxServer, session: requests.Session) -> None:
    server.add_fault(Fault("oversized", path="/api/contacts", size=100_000))
    started = time.monotonic()
    body = get(session, server, "/contacts", order="asc", limit=100).content
    elapsed = time.monotonic() - started
    # Ids read from the text: parsing ~60 MB of JSON would cost more than serving it.
    ids = [int(found) for found in re.findall(rb'\{"id":(\d+),"email"', body)]
    assert len(ids) == 100_000 and all(a < b for a, b in itertools.pairwise(ids))
    assert elapsed < 5, f"100k oversized records took {elapsed:.1f} s"


def test_oversized_size_defaults_to_ten_times_the_limit() -> None:
    assert Fault("oversized").effective_size(limit=37) == 370
    assert Fault("oversized").effective_size() == 100  # contact_fields: the default limit
    assert Fault("oversized", size=5).effective_size(limit=37) == 5


# ===================================================================== hostile transport


def send_raw(server: SandboxServer, path: str) -> socket.socket:
    """A GET written by hand on a new connection, so the answer can be read byte by byte."""
    connection = socket.create_connection((server.host, server.port), timeout=5)
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: sandbox\r\nX-API-Key: {KEY}\r\n\r\n".encode())
    return connection


def read_timed(connection: socket.socket, count: int) -> list[tuple[bytes, float]]:
    return [(connection.recv(1), time.monotonic()) for _ in range(count)]


def assert_spaced(stamps: list[tuple[bytes, float]], delay: float) -> None:
    """Bytes came one by one, ``delay`` apart.

    Judged on the whole span: on a busy machine one late read can shorten a gap, not the span.
    """
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(stamps)]
    assert all(len(byte) == 1 for byte, _ in stamps)
    assert sum(gaps) >= 0.6 * delay * len(gaps) and max(gaps) < delay + 1.0, gaps


def read_head(connection: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(4096)
        assert chunk, f"connection closed inside the head: {head!r}"
        head += chunk
    return head


def test_drip_fault_sends_the_answer_from_the_status_line_one_byte_at_a_time(session: requests.Session) -> None:
    with SandboxServer(SandboxData(contacts=20), api_key=KEY) as server:
        server.add_fault(Fault("drip", delay=0.05))
        with send_raw(server, "/api/tags") as connection:
            stamps = read_timed(connection, 5)
        assert b"".join(byte for byte, _ in stamps) == b"HTTP/"
        assert_spaced(stamps, 0.05)
        assert get(session, server, "/tags").status_code == 200  # times=1: the next one is normal


def test_stop_returns_promptly_while_a_drip_is_in_progress() -> None:
    server = SandboxServer(SandboxData(contacts=20), api_key=KEY).start()
    server.add_fault(Fault("drip", delay=30.0))
    with send_raw(server, "/api/tags") as connection:
        assert connection.recv(1) == b"H"  # the handler is inside its drip now
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        assert connection.recv(100) == b""  # the rest of the answer never comes


def test_drip_body_fault_sends_the_head_at_once_then_the_body_slowly(session: requests.Session) -> None:
    with SandboxServer(SandboxData(contacts=20), api_key=KEY) as server:
        normal = get(session, server, "/tags")
        server.add_fault(Fault("drip_body", delay=0.05))
        with send_raw(server, "/api/tags") as connection:
            started = time.monotonic()
            head, _, early_body = read_head(connection).partition(b"\r\n\r\n")
            head_time = time.monotonic() - started
            stamps = read_timed(connection, 4)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head_time < 0.5
        assert f"Content-Length: {len(normal.content)}".encode() in head.split(b"\r\n")
        assert len(early_body) <= 1  # at most the first byte, sent with no wait
        assert_spaced(stamps, 0.05)
        assert early_body + b"".join(byte for byte, _ in stamps) == normal.content[: len(early_body) + 4]


def test_drip_body_fault_delivers_the_whole_body_in_the_end(session: requests.Session) -> None:
    with SandboxServer(SandboxData(contacts=20), api_key=KEY) as server:
        normal = get(session, server, "/nothing")  # a 404: a short body, so dripping it is quick
        server.add_fault(Fault("drip_body", delay=0.002))
        dripped = get(session, server, "/nothing")
        assert (dripped.status_code, dripped.content) == (404, normal.content)


def test_drip_stops_quietly_when_the_client_goes_away() -> None:
    written: list[bytes] = []

    def write(chunk: bytes) -> None:
        if len(written) == 2:
            raise BrokenPipeError
        written.append(chunk)

    assert server_module._drip(write, b"abcdef", 0.001, threading.Event()) is False
    assert written == [b"a", b"b"]
    stopped = threading.Event()
    stopped.set()
    started = time.monotonic()
    assert server_module._drip(written.append, b"xyz", 30.0, stopped) is False
    assert time.monotonic() - started < 1 and written[-1] == b"x"
    assert server_module._drip(written.append, b"pq", 0.001, threading.Event()) is True


def test_gzip_bomb_fault_sends_a_small_gzip_body_that_inflates_to_size(
    server: SandboxServer, session: requests.Session
) -> None:
    size = 32 << 20
    server.add_fault(Fault("gzip_bomb", path="/api/contacts", size=size))
    with session.get(server.base_url + "/contacts", stream=True, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Content-Encoding"] == "gzip"
        compressed = response.raw.read(1 << 20, decode_content=False)
        assert len(compressed) == int(response.headers["Content-Length"]) < size // 500
    prefix = zlib.decompressobj(31).decompress(compressed, 4096)  # inflate 4 KiB, not 32 MiB
    assert prefix == (b'{"items": [' + b" " * 4096)[:4096]


def test_gzip_bomb_inflates_exactly_to_size_and_is_compressed_once() -> None:
    size = (3 << 20) + 5
    bomb = server_module._gzip_bomb(size)
    assert server_module._gzip_bomb(size) is bomb  # cached
    inflated = zlib.decompress(bomb, 31)
    assert len(inflated) == size and inflated == b'{"items": [' + b" " * (size - 11)
    assert zlib.decompress(server_module._gzip_bomb(4), 31) == b'{"it'
    assert Fault("gzip_bomb").effective_size() == 1 << 30


def test_headers_fault_overrides_the_rate_limit_headers(server: SandboxServer, session: requests.Session) -> None:
    normal = get(session, server, "/tags")
    injected = {"X-RateLimit-Remaining": "0", "X-RateLimit-Refill": "99999", "x-ratelimit-limit": "7"}
    server.add_fault(Fault("headers", path="/api/tags", headers=injected))
    lying = get(session, server, "/tags")
    assert (lying.status_code, lying.content) == (200, normal.content)
    assert lying.headers["X-RateLimit-Remaining"] == "0" and lying.headers["X-RateLimit-Refill"] == "99999"
    assert lying.raw.headers.getlist("X-RateLimit-Limit") == ["7"]  # replaced, not sent twice
    assert get(session, server, "/tags").headers["X-RateLimit-Remaining"] != "0"


def test_transport_fault_fields_are_validated() -> None:
    with pytest.raises(ValueError):
        Fault("headers")
    with pytest.raises(ValueError):
        Fault("status", headers={"X-A": "1"})
    for bad in ({}, {"X-A": 1}, {"X-A": "1\r\nX-B: 2"}, {"Bad Name": "1"}, {"": "1"}):
        with pytest.raises(ValueError):
            Fault("headers", headers=bad)  # type: ignore[arg-type]
    for kind in ("drip", "drip_body"):
        with pytest.raises(ValueError):
            Fault(kind)
        with pytest.raises(ValueError):
            Fault(kind, delay=-1)


# ===================================================================== admin endpoints and log


def test_faults_can_be_set_and_cleared_over_http(server: SandboxServer, session: requests.Session) -> None:
    admin = server.url + "/__sandbox/faults"
    faults = [{"kind": "status", "path": "/api/tags", "status": 429, "retry_after": 1, "times": -1}]
    assert requests.post(admin, json=faults, timeout=10).status_code == 200
    assert server.faults == [Fault("status", path="/api/tags", status=429, retry_after=1, times=-1)]
    assert get(session, server, "/tags").status_code == 429
    assert requests.delete(admin, timeout=10).status_code == 200
    assert get(session, server, "/tags").status_code == 200
    assert requests.post(admin, json=[{"kind": "nope"}], timeout=10).status_code == 400


def test_new_fault_fields_can_be_set_over_http(server: SandboxServer, session: requests.Session) -> None:
    admin = server.url + "/__sandbox/faults"
    faults: list[Any] = [
        {"kind": "headers", "path": "/api/tags", "headers": {"X-RateLimit-Remaining": "0"}},
        {"kind": "oversized", "path": "/api/contacts", "size": 25},
    ]
    assert requests.post(admin, json=faults, timeout=10).status_code == 200
    listed = requests.get(admin, timeout=10).json()["faults"]
    assert [(fault["kind"], fault["headers"], fault["size"]) for fault in listed] == [
        ("headers", {"X-RateLimit-Remaining": "0"}, 0),
        ("oversized", None, 25),
    ]
    assert get(session, server, "/tags").headers["X-RateLimit-Remaining"] == "0"
    assert len(get(session, server, "/contacts").json()["items"]) == 25
    bad: list[Any] = [{"kind": "headers", "headers": {"X-A": 1}}]
    assert requests.post(admin, json=bad, timeout=10).status_code == 400


def test_request_log_records_path_query_headers_and_status(server: SandboxServer, session: requests.Session) -> None:
    get(session, server, "/contacts", limit=10, order="asc")
    requests.get(server.base_url + "/tags", timeout=10)
    first, second = server.requests
    assert (first.method, first.path, first.status) == ("GET", "/api/contacts", 200)
    assert first.query == {"limit": "10", "order": "asc"}
    assert first.headers["X-API-Key"] == KEY and first.headers["x-api-key"] == KEY
    assert (second.path, second.status) == ("/api/tags", 401)
    logged = requests.get(server.url + "/__sandbox/requests", timeout=10).json()["requests"]
    assert [entry["path"] for entry in logged] == ["/api/contacts", "/api/tags"]
    assert KEY not in json.dumps(logged)  # the unauthenticated endpoint does not leak the key
    server.reset_log()
    assert server.requests == []


# ===================================================================== server behaviour


@pytest.mark.slow  # a load of concurrent clients on the simulator
def test_many_concurrent_clients_are_served(server: SandboxServer) -> None:
    failures: list[str] = []

    def client() -> None:
        with requests.Session() as http:
            http.headers["X-API-Key"] = KEY
            for _ in range(5):
                response = http.get(server.base_url + "/contacts", params={"limit": 100}, timeout=10)
                if response.status_code != 200 or len(response.json()["items"]) != 100:
                    failures.append(response.text)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(server.requests) == 24 * 5


def test_stop_returns_with_an_idle_keep_alive_connection_open(session: requests.Session) -> None:
    server = SandboxServer(SandboxData(contacts=10), api_key=KEY).start()
    assert get(session, server, "/tags").status_code == 200  # the session keeps the socket open
    server.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        get(session, server, "/tags")


def test_cli_prints_the_url_but_never_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(self: SandboxServer) -> None:
        self.stop()
        raise KeyboardInterrupt

    monkeypatch.setattr(server_module.SandboxServer, "serve_forever", interrupted)
    argv = ["--port", "0", "--contacts", "25", "--seed", "4", "--api-key", "s3cret", "--rate-limit", "20/2"]
    assert server_module.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Sandbox API serving http://127.0.0.1:") and "/api (contacts=25, seed=4)" in out
    assert "s3cret" not in out


def test_a_held_answer_is_the_account_as_it_was_asked_and_leaves_on_release() -> None:
    data = SandboxData(seed=3, contacts=5)  # its own: the test changes the account
    contact_id = data.contact_ids[0]
    data.set_contact_tags(contact_id, [data.tag_ids[0]])
    answers: list[dict[str, Any]] = []
    with SandboxServer(data, api_key=KEY) as server, requests.Session() as first, requests.Session() as second:
        for http in (first, second):
            http.headers.update({"X-API-Key": KEY})
        server.add_fault(Fault("hold", path="/api/contacts"))
        asking = threading.Thread(target=lambda: answers.append(get(first, server, "/contacts", limit=10, order="asc").json()))
        asking.start()

        assert server.wait_until_held(timeout=30)
        data.set_contact_tags(contact_id, [data.tag_ids[1]])
        assert answers == [] and asking.is_alive()
        after = get(second, server, "/contacts", limit=10, order="asc").json()  # the fault fired once
        server.release_held()
        asking.join(timeout=30)

    assert [tag["id"] for tag in answers[0]["items"][0]["tags"]] == [data.tag_ids[0]]
    assert [tag["id"] for tag in after["items"][0]["tags"]] == [data.tag_ids[1]]
