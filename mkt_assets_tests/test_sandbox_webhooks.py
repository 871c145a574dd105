"""The sandbox's webhooks: /api/webhooks as the spec says, and signed deliveries when the account changes.

Every test runs a real SandboxServer and a real receiver (``http.server`` on 127.0.0.1) that
records what it is sent; the sender's log and ``wait_for_deliveries`` say when sending is over.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import pytest
import requests

from mkt_assets.sandbox import (
    EVENTS,
    DeliveryFault,
    DeliverySettings,
    Fault,
    SandboxData,
    SandboxServer,
)
from mkt_assets.sandbox import webhooks as webhooks_module

KEY = "test-key"
SECRET = "whsec-test-1"
WAIT = 10.0  # seconds any wait may last: far above what a passing test needs
NOT_BLANK = "c1051bb4-d103-4f74-8988-acbcafc7fdc3"


# ===================================================================== a real receiver


class Received(NamedTuple):
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    port: int  # the sender's port: one per connection

    def json(self) -> Any:
        return json.loads(self.body)

    def verifies(self, secret: str) -> bool:
        expected = hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-webhook-signature", ""), expected)


class Receiver:
    """A webhook endpoint on loopback: records every POST, answers ``statuses`` in turn, then 200.

    While ``gate`` is clear, answers wait for it (the request is recorded first). With
    ``drop_idle`` it closes each connection after its answer without saying so (no
    ``Connection: close``), as a server does with keep-alive connections idle too long.
    """

    def __init__(self, statuses: Iterable[int] = (), *, drop_idle: bool = False) -> None:
        self.received: list[Received] = []
        self.statuses = deque(statuses)
        self.gate = threading.Event()
        self.gate.set()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Head and body leave in two writes: without this, each waits out a delayed ACK.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._cond:
                    receiver.received.append(Received(self.path, headers, body, self.client_address[1]))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver._cond.notify_all()
                receiver.gate.wait(WAIT)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                self.close_connection = drop_idle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/systeme/webhook"

    def wait_for(self, count: int) -> list[Received]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= count, WAIT), self.received
            return list(self.received)

    def close(self) -> None:
        self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    yield endpoint
    endpoint.close()


@pytest.fixture
def data() -> SandboxData:
    return SandboxData(seed=11, contacts=60)


@pytest.fixture
def server(data: SandboxData) -> Iterator[SandboxServer]:
    with SandboxServer(data, api_key=KEY) as sandbox:
        yield sandbox


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.headers.update({"X-API-Key": KEY, "Accept": "application/json"})
        yield http


def create(http: requests.Session, server: SandboxServer, **body: Any) -> requests.Response:
    return http.post(server.base_url + "/webhooks", json=body, timeout=WAIT)


def patch(http: requests.Session, server: SandboxServer, webhook_id: str, body: Any, **headers: str) -> requests.Response:
    headers = {"Content-Type": "application/merge-patch+json", **headers}
    return http.patch(server.base_url + f"/webhooks/{webhook_id}", data=json.dumps(body), headers=headers, timeout=WAIT)


def register(server: SandboxServer, url: str, secret: str = SECRET, events: Iterable[str] = EVENTS) -> str:
    return str(server.webhooks.register(url, secret, list(events))["id"])


def contact_with_a_tag_to_spare(data: SandboxData) -> tuple[int, int]:
    """A contact and a tag it does not have."""
    for contact_id in data.contact_ids:
        have = {tag["id"] for tag in data.contact(contact_id)["tags"]}
        spare = [tag_id for tag_id in data.tag_ids if tag_id not in have]
        if have and spare:
            return contact_id, spare[0]
    raise AssertionError("no contact with a tag and a tag to spare")


def settle(server: SandboxServer) -> None:
    assert server.wait_for_deliveries(WAIT), f"{server.webhooks.pending} deliveries still pending"


# ===================================================================== the resource


def test_created_webhook_has_the_spec_shape_and_never_shows_its_secret(
    server: SandboxServer, session: requests.Session, receiver: Receiver
) -> None:
    response = create(
        session, server, name="warehouse", url=receiver.url, secret=SECRET, subscriptions=["SALE_NEW", "CONTACT_OPT_IN"]
    )
    assert response.status_code == 201, response.text
    webhook = response.json()
    assert set(webhook) == {"id", "name", "url", "active", "subscriptions"}
    assert isinstance(webhook["id"], str) and (webhook["name"], webhook["url"], webhook["active"]) == (
        "warehouse", receiver.url, True,
    )  # fmt: skip
    assert [(s["event"], s["disabledAt"], s["disabledReason"]) for s in webhook["subscriptions"]] == [
        ("SALE_NEW", None, None),
        ("CONTACT_OPT_IN", None, None),
    ]
    assert all(isinstance(s["id"], str) for s in webhook["subscriptions"])

    listed = session.get(server.base_url + "/webhooks", timeout=WAIT)
    one = session.get(server.base_url + f"/webhooks/{webhook['id']}", timeout=WAIT)
    assert listed.json() == {"items": [webhook], "hasMore": False} and one.json() == webhook
    for text in (response.text, listed.text, one.text, repr(server.webhooks._webhooks)):
        assert SECRET not in text


def test_unknown_webhook_ids_are_404(server: SandboxServer, session: requests.Session) -> None:
    for method in ("GET", "DELETE"):
        answer = session.request(method, server.base_url + "/webhooks/nope", timeout=WAIT)
        assert (answer.status_code, answer.json()) == (404, {"title": "An error occurred", "detail": "Not Found"})
    assert patch(session, server, "nope", {"name": "x"}).status_code == 404
    assert session.get(server.base_url + "/webhooks/a/b", timeout=WAIT).status_code == 404


def test_missing_fields_are_422_not_blank_on_each(server: SandboxServer, session: requests.Session) -> None:
    response = create(session, server)
    assert response.status_code == 422
    body = response.json()
    assert [(v["propertyPath"], v["code"]) for v in body["violations"]] == [
        ("name", NOT_BLANK), ("secret", NOT_BLANK), ("url", NOT_BLANK), ("subscriptions", NOT_BLANK),
    ]  # fmt: skip
    assert body["title"] == "An error occurred" and body["detail"].startswith("name: This value should not be blank.")
    assert server.webhooks.listing() == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "n" * 256, "This value is too long. It should have 255 characters or less."),
        ("name", "", "This value should not be blank."),
        ("secret", "", "This value should not be blank."),
        ("url", "ftp://example.com/hook", "This value is not a valid URL."),
        ("url", "not a url", "This value is not a valid URL."),
        ("url", "https://", "This value is not a valid URL."),
        ("url", "http://example.com:99999/", "This value is not a valid URL."),
        ("url", "https://example.com/a b", "This value is not a valid URL."),
        ("subscriptions", [], "This value should not be blank."),
        ("subscriptions", ["CONTACT_CREATED", "CONTACT_DELETED"], "One or more of the given values is invalid."),
        ("subscriptions", ["SALE_NEW", 3], "One or more of the given values is invalid."),
        ("subscriptions", ["SALE_NEW", "SALE_NEW"], "This collection should contain only unique elements."),
    ],
)
def test_invalid_values_are_422_on_their_property(
    server: SandboxServer, session: requests.Session, field: str, value: Any, message: str
) -> None:
    body = {"name": "n", "url": "https://example.com/hook", "secret": SECRET, "subscriptions": ["SALE_NEW"], field: value}
    response = create(session, server, **body)
    assert response.status_code == 422, response.text
    assert [(v["propertyPath"], v["message"]) for v in response.json()["violations"]] == [(field, message)]
    assert server.webhooks.listing() == []


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"name": ', "Syntax error"),
        (b"[]", 'The input data must be an object, "array" given.'),
        (b'{"name": 5}', 'The type of the "name" attribute must be "string", "int" given.'),
        (b'{"subscriptions": "SALE_NEW"}', 'The type of the "subscriptions" attribute must be "array", "string" given.'),
        (b'{"active": "yes"}', 'The type of the "active" attribute must be "bool", "string" given.'),
        (b'{"secret": null}', 'The type of the "secret" attribute must be "string", "null" given.'),
    ],
)
def test_bodies_of_the_wrong_form_are_400(server: SandboxServer, session: requests.Session, body: bytes, detail: str) -> None:
    response = session.post(server.base_url + "/webhooks", data=body, headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert (response.status_code, response.json()["detail"]) == (400, detail)


def test_a_body_that_is_not_declared_json_is_415(server: SandboxServer, session: requests.Session) -> None:
    body = json.dumps({"name": "n", "url": "https://example.com", "secret": SECRET, "subscriptions": ["SALE_NEW"]})
    response = session.post(server.base_url + "/webhooks", data=body, headers={"Content-Type": "text/plain"}, timeout=WAIT)
    assert response.status_code == 415 and '"text/plain" is not supported' in response.json()["detail"]
    webhook_id = register(server, "https://example.com")
    assert patch(session, server, webhook_id, {"name": "x"}, **{"Content-Type": "application/json"}).status_code == 415


def test_patch_changes_what_it_names_and_keeps_the_rest(
    server: SandboxServer, session: requests.Session, receiver: Receiver
) -> None:
    created = server.webhooks.register(receiver.url, SECRET, ["SALE_NEW", "CONTACT_OPT_IN"], name="before")
    kept_id = created["subscriptions"][0]["id"]
    answer = patch(
        session,
        server,
        created["id"],
        {"name": "after", "secret": None, "subscriptions": ["SALE_NEW", "CONTACT_CREATED"], "url": "https://elsewhere.example"},
    )
    assert answer.status_code == 200, answer.text
    updated = answer.json()
    # url is not part of the update input: ignored, as any unknown key; a null secret keeps it.
    assert (updated["name"], updated["url"], updated["active"]) == ("after", receiver.url, True)
    assert [s["event"] for s in updated["subscriptions"]] == ["SALE_NEW", "CONTACT_CREATED"]
    assert updated["subscriptions"][0]["id"] == kept_id and updated["subscriptions"][1]["id"] not in (
        s["id"] for s in created["subscriptions"]
    )
    assert session.get(server.base_url + f"/webhooks/{created['id']}", timeout=WAIT).json() == updated

    refused = patch(session, server, created["id"], {"name": "", "subscriptions": ["NOPE"]})
    assert refused.status_code == 422
    assert [v["propertyPath"] for v in refused.json()["violations"]] == ["name", "subscriptions"]


def test_a_new_secret_signs_the_next_deliveries(server: SandboxServer, session: requests.Session, receiver: Receiver) -> None:
    webhook_id = register(server, receiver.url)
    assert patch(session, server, webhook_id, {"secret": "rotated"}).status_code == 200
    server.opt_in(server.data.contact_ids[0])
    (delivery,) = receiver.wait_for(1)
    assert delivery.verifies("rotated") and not delivery.verifies(SECRET)


def test_deleted_or_inactive_webhooks_get_nothing(server: SandboxServer, session: requests.Session, receiver: Receiver) -> None:
    deleted = register(server, receiver.url + "?which=deleted")
    inactive = register(server, receiver.url + "?which=inactive")
    active = register(server, receiver.url + "?which=active")
    assert session.delete(server.base_url + f"/webhooks/{deleted}", timeout=WAIT).status_code == 204
    assert session.get(server.base_url + f"/webhooks/{deleted}", timeout=WAIT).status_code == 404
    assert patch(session, server, inactive, {"active": False}).json()["active"] is False

    result = server.opt_in(server.data.contact_ids[0])
    settle(server)
    assert result.deliveries == 1
    assert [(r.path, r.json()["data"]["contact"]["id"]) for r in receiver.received] == [
        ("/systeme/webhook?which=active", server.data.contact_ids[0])
    ]
    assert [record.webhook_id for record in server.deliveries] == [active]


def test_webhook_routes_need_the_key_and_refuse_other_methods(server: SandboxServer, session: requests.Session) -> None:
    webhook_id = register(server, "https://example.com/hook")
    anonymous = requests.Session()  # no key
    for method, path in [
        ("GET", ""),
        ("POST", ""),
        ("GET", f"/{webhook_id}"),
        ("PATCH", f"/{webhook_id}"),
        ("DELETE", f"/{webhook_id}"),
    ]:
        answer = anonymous.request(method, server.base_url + "/webhooks" + path, json={}, timeout=WAIT)
        assert answer.status_code == 401, (method, path)
    wrong = anonymous.get(server.base_url + "/webhooks", headers={"X-API-Key": "wrong"}, timeout=WAIT)
    assert wrong.status_code == 401
    put = session.put(server.base_url + "/webhooks", json={}, timeout=WAIT)
    put_one = session.put(server.base_url + f"/webhooks/{webhook_id}", json={}, timeout=WAIT)
    assert (put.status_code, put.headers["Allow"]) == (405, "GET, POST")
    assert (put_one.status_code, put_one.headers["Allow"]) == (405, "GET, PATCH, DELETE")
    assert len(server.webhooks.listing()) == 1  # the refused requests changed nothing


def test_webhook_requests_are_logged_counted_against_the_quota_and_faulted() -> None:
    with SandboxServer(SandboxData(contacts=5), api_key=KEY, rate_limit=(3, 3600)) as server, requests.Session() as http:
        http.headers["X-API-Key"] = KEY
        server.add_fault(Fault("status", path="/api/webhooks", status=503))
        assert http.get(server.base_url + "/webhooks", timeout=WAIT).status_code == 503
        created = create(http, server, name="n", url="https://example.com", secret=SECRET, subscriptions=["SALE_NEW"])
        assert created.status_code == 201 and created.headers["X-RateLimit-Remaining"] == "1"
        assert http.get(server.base_url + "/webhooks", timeout=WAIT).status_code == 200
        assert http.get(server.base_url + "/webhooks", timeout=WAIT).status_code == 429
        assert [(r.method, r.path, r.status) for r in server.requests] == [
            ("GET", "/api/webhooks", 503), ("POST", "/api/webhooks", 201), ("GET", "/api/webhooks", 200),
            ("GET", "/api/webhooks", 429),
        ]  # fmt: skip


def test_a_request_body_above_a_megabyte_is_refused_unread(server: SandboxServer, session: requests.Session) -> None:
    huge = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    response = session.post(server.base_url + "/webhooks", data=huge, headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert response.status_code == 413 and server.webhooks.listing() == []


# ===================================================================== changes and deliveries


def test_each_change_updates_the_api_and_sends_its_event_signed(
    server: SandboxServer, session: requests.Session, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    server.webhooks.settings = DeliverySettings(shape="data")
    contact_id, tag_id = contact_with_a_tag_to_spare(data)
    pending = next(
        c
        for c in data.contact_ids
        if c != contact_id and (data.contact(c)["needsConfirmation"] or data.contact(c)["unsubscribed"])
    )

    added = server.add_tag(contact_id, tag_id)
    removed = server.remove_tag(contact_id, tag_id)
    (created,) = server.create_contacts(1)
    opted = server.opt_in(pending)
    sold = server.new_sale(contact_id)
    assert sold.sale_id is not None
    canceled = server.cancel_sale(sold.sale_id)
    settle(server)

    assert [r.event for r in (added, removed, created, opted, sold, canceled)] == list(EVENTS[1:3]) + [
        "CONTACT_CREATED", "CONTACT_OPT_IN", "SALE_NEW", "SALE_CANCELED",
    ]  # fmt: skip
    assert [(r.changed, r.deliveries) for r in (added, removed, created, opted, sold, canceled)] == [
        (True, 1), (True, 1), (True, 1), (True, 1), (False, 1), (False, 1),
    ]  # fmt: skip
    received = receiver.received
    assert [r.headers["x-webhook-event"] for r in received] == [r.event for r in (added, removed, created, opted, sold, canceled)]
    assert all(r.verifies(SECRET) and r.headers["content-type"] == "application/json" for r in received)
    bodies = [r.json() for r in received]
    assert [body["type"] for body in bodies] == [r.headers["x-webhook-event"] for r in received]
    tag = next({"id": t["id"], "name": t["name"]} for t in data.records("tags") if t["id"] == tag_id)
    assert bodies[0]["data"]["tag"] == bodies[1]["data"]["tag"] == tag
    assert tag_id in [t["id"] for t in bodies[0]["data"]["contact"]["tags"]]
    assert tag_id not in [t["id"] for t in bodies[1]["data"]["contact"]["tags"]]
    assert bodies[2]["data"]["contact"] == data.contact(created.contact_id)
    assert bodies[3]["data"]["contact"]["needsConfirmation"] is False and bodies[3]["data"]["contact"]["unsubscribed"] is False
    assert bodies[4]["data"]["order"]["id"] == bodies[5]["data"]["order"]["id"] == sold.sale_id
    assert (bodies[4]["data"]["order"]["status"], bodies[5]["data"]["order"]["status"]) == ("completed", "canceled")
    assert all(body["data"]["contact"] == data.contact(body["data"]["contact"]["id"]) for body in bodies[3:])

    # The API answers the new state: the contact as the delivery showed it, the new contact listed.
    page = session.get(server.base_url + "/contacts", params={"limit": 100}, timeout=WAIT).json()["items"]
    by_id = {contact["id"]: contact for contact in page}
    assert by_id[contact_id] == bodies[1]["data"]["contact"] and created.contact_id in by_id
    assert by_id[pending] == bodies[3]["data"]["contact"]


def test_the_flat_shape_carries_contact_and_event_at_the_top(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    server.webhooks.settings = DeliverySettings(shape="flat")
    contact_id, tag_id = contact_with_a_tag_to_spare(data)
    server.add_tag(contact_id, tag_id)
    sale_id = server.new_sale(contact_id).sale_id
    settle(server)
    tagged, sold = (r.json() for r in receiver.received)
    assert set(tagged) == {"event", "createdAt", "contact", "tag"} and tagged["event"] == "CONTACT_TAG_ADDED"
    assert tagged["contact"] == data.contact(contact_id) and tagged["tag"]["id"] == tag_id
    assert set(sold) == {"event", "createdAt", "contact", "sale"} and sold["sale"]["id"] == sale_id


def test_shapes_alternate_by_default(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    register(server, receiver.url)
    for contact_id in data.contact_ids[:4]:
        server.opt_in(contact_id)
    settle(server)
    assert [("type" in body, "data" in body, "contact" in body) for body in (r.json() for r in receiver.received)] == [
        (True, True, False), (False, False, True), (True, True, False), (False, False, True),
    ]  # fmt: skip


def test_each_webhook_gets_its_events_signed_with_its_own_secret(server: SandboxServer, data: SandboxData) -> None:
    sales, everything = Receiver(), Receiver()
    try:
        register(server, sales.url, "sales-secret", ["SALE_NEW"])
        register(server, everything.url, "all-secret")
        server.opt_in(data.contact_ids[0])
        server.new_sale(data.contact_ids[0])
        settle(server)
        assert [(r.headers["x-webhook-event"], r.verifies("sales-secret")) for r in sales.received] == [("SALE_NEW", True)]
        assert [(r.headers["x-webhook-event"], r.verifies("all-secret")) for r in everything.received] == [
            ("CONTACT_OPT_IN", True), ("SALE_NEW", True),
        ]  # fmt: skip
        assert sales.received[0].body == everything.received[1].body  # one body, two signatures
    finally:
        sales.close()
        everything.close()


def test_changes_that_change_nothing_send_nothing(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    register(server, receiver.url)
    contact_id, spare = contact_with_a_tag_to_spare(data)
    has = data.contact(contact_id)["tags"][0]["id"]
    sale_id = server.new_sale(contact_id).sale_id
    assert sale_id is not None
    server.cancel_sale(sale_id)
    settle(server)
    server.webhooks.reset_deliveries()
    assert server.add_tag(contact_id, has)[2:4] == (False, 0)
    assert server.remove_tag(contact_id, spare)[2:4] == (False, 0)
    assert server.cancel_sale(sale_id)[2:4] == (False, 0)
    settle(server)
    assert server.deliveries == [] and len(receiver.received) == 2


def test_changes_to_what_does_not_exist_raise_and_send_nothing(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    missing_contact = data.next_contact_id
    with pytest.raises(KeyError):
        server.add_tag(missing_contact, data.tag_ids[0])
    with pytest.raises(KeyError):
        server.add_tag(data.contact_ids[0], data.unused_tag_id)
    with pytest.raises(KeyError):
        server.opt_in(missing_contact)
    with pytest.raises(KeyError):
        server.new_sale(missing_contact)
    with pytest.raises(KeyError):
        server.cancel_sale(1)
    settle(server)
    assert server.deliveries == []


def test_a_sale_canceled_after_its_contact_was_deleted_names_the_contact_by_id(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url, events=["SALE_CANCELED"])
    server.webhooks.settings = DeliverySettings(shape="flat")
    contact_id = data.contact_ids[3]
    sale_id = server.new_sale(contact_id).sale_id
    assert sale_id is not None
    data.delete_contact(contact_id)
    server.cancel_sale(sale_id)
    (delivery,) = receiver.wait_for(1)
    assert delivery.json()["contact"] == {"id": contact_id}


def test_an_opt_in_shows_in_the_contact_and_where_enrollments_embed_it() -> None:
    data = SandboxData(seed=5, contacts=400)
    enrolled = {record["contact"]["id"] for record in data.records("enrollments")}
    contact_id = next(
        c for c in data.contact_ids if c in enrolled and (data.contact(c)["needsConfirmation"] or data.contact(c)["unsubscribed"])
    )
    before = data.contact(contact_id)
    assert data.opt_in(contact_id) is True and data.opt_in(contact_id) is False
    after = data.contact(contact_id)
    assert (after["needsConfirmation"], after["unsubscribed"]) == (False, False)
    assert {k: v for k, v in after.items() if k not in ("needsConfirmation", "unsubscribed")} == {
        k: v for k, v in before.items() if k not in ("needsConfirmation", "unsubscribed")
    }
    embedded = [r["contact"] for r in data.records("enrollments") if r["contact"]["id"] == contact_id]
    assert embedded and all(not c["needsConfirmation"] and not c["unsubscribed"] for c in embedded)


# ===================================================================== sending


def test_a_5xx_is_retried_with_backoff_and_a_4xx_is_not(server: SandboxServer, data: SandboxData) -> None:
    flaky = Receiver(statuses=[503, 500, 200, 401])
    try:
        server.webhooks.settings = DeliverySettings(attempts=4, backoff=0.01)
        register(server, flaky.url)
        server.opt_in(data.contact_ids[0])
        server.opt_in(data.contact_ids[1])
        settle(server)
        first, second = server.deliveries
        assert (first.attempts, first.status, second.attempts, second.status) == (3, 200, 1, 401)
        assert len(flaky.received) == 4 and flaky.received[0].body == flaky.received[2].body
    finally:
        flaky.close()


def test_a_receiver_that_is_down_is_given_up_after_the_attempts(server: SandboxServer, data: SandboxData) -> None:
    gone = Receiver()
    gone.close()  # its port now refuses connections
    server.webhooks.settings = DeliverySettings(attempts=3, backoff=0.01, timeout=2)
    register(server, gone.url)
    server.opt_in(data.contact_ids[0])
    settle(server)
    (record,) = server.deliveries
    assert (record.attempts, record.status) == (3, None) and record.error and "Connection" in record.error


def test_deliveries_reuse_one_keep_alive_connection_at_well_over_100_a_second(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    ids = data.contact_ids
    started = time.monotonic()
    for index in range(500):
        server.opt_in(ids[index % len(ids)])
    settle(server)
    elapsed = time.monotonic() - started
    assert len(receiver.received) == 500 and all(record.status == 200 for record in server.deliveries)
    assert len({r.port for r in receiver.received}) == 1
    assert 500 / elapsed > 100, f"{500 / elapsed:.0f} deliveries/s"


def test_a_receiver_closing_idle_connections_costs_no_attempt(server: SandboxServer, data: SandboxData) -> None:
    closing = Receiver(drop_idle=True)
    try:
        register(server, closing.url)
        for contact_id in data.contact_ids[:3]:
            server.opt_in(contact_id)
        settle(server)
        assert [(r.attempts, r.status) for r in server.deliveries] == [(1, 200)] * 3
        assert len({r.port for r in closing.received}) == 3
    finally:
        closing.close()


def test_a_slow_receiver_never_holds_up_the_api_or_the_change(
    server: SandboxServer, session: requests.Session, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    receiver.gate.clear()
    server.opt_in(data.contact_ids[0])  # returns at once: the delivery is sent from the sender thread
    receiver.wait_for(1)
    assert session.get(server.base_url + "/contacts", timeout=WAIT).status_code == 200
    assert server.webhooks.pending == 1 and server.deliveries == []
    receiver.gate.set()
    settle(server)
    assert [record.status for record in server.deliveries] == [200]


def test_stop_returns_promptly_while_a_delivery_waits_on_its_receiver(data: SandboxData, receiver: Receiver) -> None:
    server = SandboxServer(data, api_key=KEY).start()
    server.webhooks.settings = DeliverySettings(timeout=30)
    register(server, receiver.url)
    receiver.gate.clear()
    server.opt_in(data.contact_ids[0])
    receiver.wait_for(1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5


# ===================================================================== delivery faults


def test_bad_signature_fault_signs_with_another_key(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    register(server, receiver.url)
    server.add_delivery_fault(DeliveryFault("bad_signature"))
    server.opt_in(data.contact_ids[0])
    server.opt_in(data.contact_ids[1])
    settle(server)
    bad, good = receiver.received
    assert not bad.verifies(SECRET) and good.verifies(SECRET)
    assert len(bad.headers["x-webhook-signature"]) == 64 and int(bad.headers["x-webhook-signature"], 16) >= 0
    assert [record.fault for record in server.deliveries] == ["bad_signature", None]


def test_duplicate_fault_sends_the_same_bytes_twice(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    register(server, receiver.url)
    server.add_delivery_fault(DeliveryFault("duplicate"))
    server.opt_in(data.contact_ids[0])
    server.opt_in(data.contact_ids[1])
    settle(server)
    first, copy, other = receiver.received
    assert (first.body, first.headers["x-webhook-signature"]) == (copy.body, copy.headers["x-webhook-signature"])
    assert first.verifies(SECRET) and other.body != first.body
    assert [(r.seq, r.fault) for r in server.deliveries] == [(1, "duplicate"), (1, "duplicate"), (2, None)]


def test_out_of_order_fault_sends_a_delivery_after_the_next_one(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    server.add_delivery_fault(DeliveryFault("out_of_order"))
    first, second, third = data.contact_ids[:3]
    for contact_id in (first, second, third):
        server.opt_in(contact_id)
    settle(server)
    assert [_contact_id(r.json()) for r in receiver.received] == [second, first, third]
    assert [(r.seq, r.fault) for r in server.deliveries] == [(2, None), (1, "out_of_order"), (3, None)]


def test_a_held_delivery_with_no_next_one_leaves_when_deliveries_are_awaited(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    server.add_delivery_fault(DeliveryFault("out_of_order"))
    server.opt_in(data.contact_ids[0])
    assert server.webhooks.pending == 1 and receiver.received == []
    settle(server)
    assert [_contact_id(r.json()) for r in receiver.received] == [data.contact_ids[0]]


def test_lost_fault_drops_the_delivery_and_logs_it(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    register(server, receiver.url)
    server.add_delivery_fault(DeliveryFault("lost", event="CONTACT_OPT_IN", after=1, times=2))
    contacts = data.contact_ids[:4]
    for contact_id in contacts:
        server.opt_in(contact_id)
    server.new_sale(contacts[0])  # another event: the fault does not count it
    settle(server)
    assert [_contact_id(r.json()) for r in receiver.received] == [contacts[0], contacts[3], contacts[0]]
    assert [(r.event, r.fault, r.attempts, r.status) for r in sorted(server.deliveries, key=lambda r: r.seq)] == [
        ("CONTACT_OPT_IN", None, 1, 200), ("CONTACT_OPT_IN", "lost", 0, None), ("CONTACT_OPT_IN", "lost", 0, None),
        ("CONTACT_OPT_IN", None, 1, 200), ("SALE_NEW", None, 1, 200),
    ]  # fmt: skip


def test_delivery_faults_are_validated() -> None:
    for bad in (
        lambda: DeliveryFault("slow"),
        lambda: DeliveryFault("lost", event="CONTACT_DELETED"),
        lambda: DeliveryFault("lost", times=-2),
        lambda: DeliveryFault("lost", after=True),
        lambda: DeliverySettings(shape="xml"),
        lambda: DeliverySettings(attempts=0),
        lambda: DeliverySettings(timeout=0),
        lambda: DeliverySettings(backoff=61),
    ):
        with pytest.raises(ValueError):
            bad()


def _contact_id(body: Any) -> int:
    return int(body.get("data", body)["contact"]["id"])


# ===================================================================== the admin endpoints


def test_changes_over_http_apply_in_order_and_say_what_they_did(
    server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    register(server, receiver.url)
    contact_id, tag_id = contact_with_a_tag_to_spare(data)
    changes = [
        {"event": "CONTACT_TAG_ADDED", "contact": contact_id, "tag": tag_id},
        {"event": "CONTACT_CREATED", "count": 2},
        {"event": "SALE_NEW", "contact": contact_id},
        {"event": "SALE_CANCELED", "sale": 5001},
    ]
    answer = requests.post(server.url + "/__sandbox/changes", json=changes, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["event"], r["changed"], r["deliveries"]) for r in results] == [
        ("CONTACT_TAG_ADDED", True, 1), ("CONTACT_CREATED", True, 1), ("CONTACT_CREATED", True, 1),
        ("SALE_NEW", False, 1), ("SALE_CANCELED", False, 1),
    ]  # fmt: skip
    assert results[3]["sale_id"] == 5001 and tag_id in [t["id"] for t in data.contact(contact_id)["tags"]]
    assert results[1]["contact_id"] in data.contact_ids

    waited = requests.post(server.url + "/__sandbox/deliveries/wait", json={"timeout": WAIT}, timeout=WAIT + 5)
    assert waited.json() == {"drained": True, "pending": 0}
    logged = requests.get(server.url + "/__sandbox/deliveries", timeout=WAIT).json()
    assert [d["event"] for d in logged["deliveries"]] == [r["event"] for r in results]
    assert json.loads(logged["deliveries"][0]["body"]) == receiver.received[0].json()
    assert SECRET not in json.dumps(logged)
    assert requests.delete(server.url + "/__sandbox/deliveries", timeout=WAIT).json()["deliveries"] == []


@pytest.mark.parametrize(
    "changes",
    [
        {"event": "CONTACT_OPT_IN"},
        [{"event": "CONTACT_DELETED", "contact": 1}],
        [{"event": "CONTACT_OPT_IN"}],
        [{"event": "CONTACT_OPT_IN", "contact": "7"}],
        [{"event": "CONTACT_OPT_IN", "contact": 7, "tag": 1}],
        [{"event": "CONTACT_CREATED", "count": 0}],
        [{"event": "CONTACT_CREATED", "count": 10_001}],
    ],
)
def test_a_malformed_change_list_is_400_and_applies_nothing(server: SandboxServer, data: SandboxData, changes: Any) -> None:
    body = [{"event": "CONTACT_CREATED"}, *changes] if isinstance(changes, list) else changes  # a valid one first
    before = data.count("contacts")
    answer = requests.post(server.url + "/__sandbox/changes", json=body, timeout=WAIT)
    assert answer.status_code == 400 and answer.json()["title"] == "Bad change list"
    assert data.count("contacts") == before


def test_a_change_naming_what_does_not_exist_is_422_after_the_ones_before(server: SandboxServer, data: SandboxData) -> None:
    missing = data.next_contact_id + 1000
    changes = [{"event": "CONTACT_CREATED"}, {"event": "CONTACT_OPT_IN", "contact": missing}, {"event": "CONTACT_CREATED"}]
    before = data.count("contacts")
    answer = requests.post(server.url + "/__sandbox/changes", json=changes, timeout=WAIT)
    assert answer.status_code == 422
    body = answer.json()
    assert f"change 1 (CONTACT_OPT_IN): no contact with id {missing}" in body["detail"]
    assert [r["event"] for r in body["results"]] == ["CONTACT_CREATED"] and data.count("contacts") == before + 1


def test_delivery_faults_and_settings_can_be_set_over_http(server: SandboxServer, receiver: Receiver, data: SandboxData) -> None:
    faults = server.url + "/__sandbox/delivery-faults"
    settings = server.url + "/__sandbox/delivery-settings"
    assert requests.post(faults, json=[{"kind": "lost", "event": "SALE_NEW", "times": -1}], timeout=WAIT).status_code == 200
    assert requests.get(faults, timeout=WAIT).json() == {
        "faults": [{"kind": "lost", "event": "SALE_NEW", "times": -1, "after": 0}]
    }
    assert server.webhooks.faults == [DeliveryFault("lost", event="SALE_NEW", times=-1)]
    assert requests.post(faults, json=[{"kind": "late"}], timeout=WAIT).status_code == 400
    assert requests.post(settings, json={"shape": "flat"}, timeout=WAIT).json() == {
        "shape": "flat", "timeout": 5.0, "attempts": 4, "backoff": 0.25,
    }  # fmt: skip
    assert requests.post(settings, json={"shape": "yaml"}, timeout=WAIT).status_code == 400
    assert requests.get(settings, timeout=WAIT).json()["shape"] == "flat"

    register(server, receiver.url)
    server.new_sale(data.contact_ids[0])
    server.opt_in(data.contact_ids[0])
    settle(server)
    assert [r.json()["event"] for r in receiver.received] == ["CONTACT_OPT_IN"]
    assert requests.delete(faults, timeout=WAIT).json() == {"faults": []} and server.webhooks.faults == []
    assert requests.put(faults, timeout=WAIT).headers["Allow"] == "GET, POST, DELETE"
    assert requests.post(server.url + "/__sandbox/deliveries/wait", json={"timeout": 61}, timeout=WAIT).status_code == 400


# ===================================================================== bounds


def test_the_log_keeps_the_last_deliveries_only(monkeypatch: pytest.MonkeyPatch, data: SandboxData) -> None:
    monkeypatch.setattr(webhooks_module, "LOG_LIMIT", 3)
    with SandboxServer(data, api_key=KEY) as server:
        register(server, "http://127.0.0.1:9/never")  # every delivery is lost before it is sent
        server.add_delivery_fault(DeliveryFault("lost", times=-1))
        for contact_id in data.contact_ids[:5]:
            server.opt_in(contact_id)
        assert [record.seq for record in server.deliveries] == [3, 4, 5]


def test_deliveries_beyond_the_pending_bound_are_dropped_and_logged(
    monkeypatch: pytest.MonkeyPatch, server: SandboxServer, receiver: Receiver, data: SandboxData
) -> None:
    monkeypatch.setattr(webhooks_module, "MAX_PENDING", 2)
    register(server, receiver.url)
    receiver.gate.clear()
    for contact_id in data.contact_ids[:4]:
        server.opt_in(contact_id)
    assert server.webhooks.pending == 2
    receiver.gate.set()
    settle(server)
    assert len(receiver.received) == 2
    outcomes = sorted((record.seq, record.status, record.error) for record in server.deliveries)
    assert outcomes == [
        (1, 200, None), (2, 200, None), (3, None, "dropped: 2 deliveries already pending"),
        (4, None, "dropped: 2 deliveries already pending"),
    ]  # fmt: skip
