"""The webhook receiver over real HTTP on loopback: what it keeps, what it refuses and how, its
bounds (size, rate, connections, time), its log, and that what it answered 200 survives it."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV, WebhookSecret, sign
from mkt_assets.webhooks import receiver as receiver_module
from mkt_assets.webhooks.inbox import MAX_READ, Inbox
from mkt_assets.webhooks.receiver import MAX_BODY_BYTES, WEBHOOK_PATH, Receiver, TokenBucket
from mkt_assets_tests.test_inbox import HOLD_THE_INBOX

ROOT = Path(__file__).resolve().parents[1]
SECRET_TEXT = "receiver-test-secret-5f1c2a"
SECRET = WebhookSecret(SECRET_TEXT)
EMAIL = "grace.hopper@example.com"


def delivery(number: int, event: str = "CONTACT_TAG_ADDED") -> bytes:
    return json.dumps({"type": event, "data": {"contact": {"id": number, "email": EMAIL}}, "tag": {"id": 3}}).encode()


def signed(body: bytes, secret: WebhookSecret | str = SECRET) -> dict[str, str]:
    return {"X-Webhook-Signature": sign(body, secret), "Content-Type": "application/json"}


@pytest.fixture()
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    with Inbox(tmp_path / "inbox.sqlite") as opened:
        yield opened


@pytest.fixture()
def receiver(inbox: Inbox) -> Iterator[Receiver]:
    with Receiver(inbox, SECRET, port=0) as serving:
        yield serving


def raw_exchange(receiver: Receiver, request: bytes, *, read_until_closed: bool = False, timeout: float = 10.0) -> bytes:
    """Send bytes as they are, and read the answer (the status line and headers, and the body
    if its length is given); with ``read_until_closed``, everything until the server closes."""
    with socket.create_connection((receiver.host, receiver.port), timeout=timeout) as connection:
        connection.sendall(request)
        return read_answer(connection, read_until_closed)


def read_answer(connection: socket.socket, read_until_closed: bool = False) -> bytes:
    answer = b""
    while True:
        piece = connection.recv(65536)
        if not piece:
            return answer
        answer += piece
        if read_until_closed or b"\r\n\r\n" not in answer:
            continue
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head)
        if length is None or len(rest) >= int(length.group(1)):
            return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ---------------------------------------------------------------- what is kept, what is refused


def test_a_signed_delivery_is_kept_and_answered_200(receiver: Receiver, inbox: Inbox) -> None:
    body = delivery(42)
    answer = requests.post(receiver.url, data=body, headers=signed(body), timeout=10)

    assert answer.status_code == 200
    (kept,) = inbox.since(0)
    assert (kept.event_type, kept.contact_id, kept.signature_verified, kept.body) == (
        "CONTACT_TAG_ADDED",
        42,
        True,
        body.decode(),
    )


def test_a_signature_in_uppercase_hex_is_accepted(receiver: Receiver, inbox: Inbox) -> None:
    body = delivery(1)
    headers = {"X-Webhook-Signature": sign(body, SECRET).upper()}
    assert requests.post(receiver.url, data=body, headers=headers, timeout=10).status_code == 200
    assert inbox.count() == 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no signature"),
        pytest.param({"X-Webhook-Signature": ""}, id="empty"),
        pytest.param({"X-Webhook-Signature": "0" * 64}, id="wrong"),
        pytest.param({"X-Webhook-Signature": sign(delivery(1), "another-secret-abcdef012345")}, id="another secret's"),
        pytest.param({"X-Webhook-Signature": sign(delivery(2), SECRET)}, id="another body's"),
    ],
)
def test_a_delivery_without_the_right_signature_is_refused_401_and_nothing_is_kept(
    receiver: Receiver, inbox: Inbox, headers: dict[str, str]
) -> None:
    answer = requests.post(receiver.url, data=delivery(1), headers=headers, timeout=10)

    assert answer.status_code == 401
    assert inbox.count() == 0


def test_two_signature_headers_are_refused_even_if_one_is_right(receiver: Receiver, inbox: Inbox) -> None:
    body = delivery(1)
    request = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"X-Webhook-Signature: {'0' * 64}\r\nX-Webhook-Signature: {sign(body, SECRET)}\r\n\r\n"
    ).encode() + body
    assert status(raw_exchange(receiver, request)) == 401
    assert inbox.count() == 0


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2, 3]", b'"a text"', b'{"a": NaN}', b"\xff\xfe", b"", b"[" * 50_000 + b"]" * 50_000],
    ids=["text", "list", "string", "NaN", "not UTF-8", "empty", "deep"],
)
def test_a_signed_body_that_is_not_a_json_object_is_refused_400_and_not_kept(
    receiver: Receiver, inbox: Inbox, body: bytes
) -> None:
    answer = requests.post(receiver.url, data=body, headers=signed(body), timeout=10)

    assert answer.status_code == 400
    assert inbox.count() == 0


def test_the_same_delivery_twice_is_answered_200_both_times_and_kept_once(receiver: Receiver, inbox: Inbox) -> None:
    body = delivery(7)
    with requests.Session() as session:
        answers = [session.post(receiver.url, data=body, headers=signed(body), timeout=10) for _ in range(3)]
        later = session.post(receiver.url, data=delivery(8), headers=signed(delivery(8)), timeout=10)

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [answer.json()["detail"] for answer in answers] == ["kept", "already kept", "already kept"]
    assert later.status_code == 200
    assert [(kept.seq, kept.contact_id) for kept in inbox.since(0)] == [(1, 7), (2, 8)]


def test_deliveries_out_of_order_are_each_kept_in_the_order_they_arrived(receiver: Receiver, inbox: Inbox) -> None:
    for number in (3, 1, 2):
        body = delivery(number)
        assert requests.post(receiver.url, data=body, headers=signed(body), timeout=10).status_code == 200
    assert [kept.contact_id for kept in inbox.since(0)] == [3, 1, 2]


def test_a_delivery_naming_no_contact_is_kept_with_none(receiver: Receiver, inbox: Inbox) -> None:
    body = b'{"type": "SALE_NEW", "order": {"id": 9}}'
    assert requests.post(receiver.url, data=body, headers=signed(body), timeout=10).status_code == 200
    (kept,) = inbox.since(0)
    assert (kept.event_type, kept.contact_id) == ("SALE_NEW", None)


def test_the_event_header_names_the_event_when_the_body_does_not(receiver: Receiver, inbox: Inbox) -> None:
    body = b'{"contact": {"id": 5}}'
    headers = {**signed(body), "X-Webhook-Event": "CONTACT_OPT_IN"}
    assert requests.post(receiver.url, data=body, headers=headers, timeout=10).status_code == 200
    (kept,) = inbox.since(0)
    assert (kept.event_type, kept.contact_id) == ("CONTACT_OPT_IN", 5)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", WEBHOOK_PATH, 405),
        ("PUT", WEBHOOK_PATH, 405),
        ("POST", "/", 404),
        ("POST", "/systeme/webhook/x", 404),
        ("GET", "/", 404),
    ],
)
def test_only_a_post_to_the_webhook_path_is_served(
    receiver: Receiver, inbox: Inbox, method: str, path: str, expected: int
) -> None:
    body = delivery(1)
    root = receiver.url.removesuffix(WEBHOOK_PATH)
    answer = requests.request(method, root + path, data=body, headers=signed(body), timeout=10)

    assert answer.status_code == expected
    if expected == 405:
        assert answer.headers["Allow"] == "POST"
    assert inbox.count() == 0


def test_an_inbox_held_by_another_process_past_its_bound_is_answered_503_and_kept_once_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite"
    body = delivery(1)
    with Inbox(path, busy_seconds=0.2) as inbox, Receiver(inbox, SECRET, port=0) as receiver:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_THE_INBOX, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
            refused = requests.post(receiver.url, data=body, headers=signed(body), timeout=10)
            holder.communicate("release\n", timeout=30)
        finally:
            holder.kill()
            holder.wait()
        kept = requests.post(receiver.url, data=body, headers=signed(body), timeout=10)

        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert kept.status_code == 200 and inbox.count() == 1


def test_an_unforeseen_failure_is_answered_500_and_logged_by_its_type_alone(
    receiver: Receiver, inbox: Inbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*arguments: object, **keywords: object) -> tuple[int, bool]:
        raise RuntimeError(f"a bug quoting {EMAIL}")

    monkeypatch.setattr(inbox, "add", broken)
    body = delivery(1)
    answer = requests.post(receiver.url, data=body, headers=signed(body), timeout=10)

    assert answer.status_code == 500
    assert "could not keep a delivery (500): RuntimeError" in caplog.text and EMAIL not in caplog.text


# ---------------------------------------------------------------- sizes and lengths


def test_a_body_over_1_mb_is_refused_413_unread_and_not_kept(receiver: Receiver, inbox: Inbox) -> None:
    body = b'{"pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    answer = requests.post(receiver.url, data=body, headers=signed(body), timeout=30)

    assert answer.status_code == 413
    assert inbox.count() == 0


def test_a_body_of_exactly_1_mb_is_kept(receiver: Receiver, inbox: Inbox) -> None:
    head = b'{"type": "SALE_NEW", "pad": "'
    body = head + b"x" * (MAX_BODY_BYTES - len(head) - 2) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    assert requests.post(receiver.url, data=body, headers=signed(body), timeout=30).status_code == 200
    assert inbox.count() == 1


def test_a_client_expecting_100_continue_is_refused_before_it_sends_an_oversized_body(receiver: Receiver) -> None:
    request = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    answer = raw_exchange(receiver, request, read_until_closed=True)

    assert status(answer) == 413 and b"100 Continue" not in answer


def test_a_client_expecting_100_continue_is_told_to_go_on_and_its_delivery_kept(receiver: Receiver, inbox: Inbox) -> None:
    body = delivery(1)
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        f"X-Webhook-Signature: {sign(body, SECRET)}\r\n\r\n"
    ).encode()
    with socket.create_connection((receiver.host, receiver.port), timeout=10) as connection:
        connection.sendall(head)
        assert connection.recv(100).startswith(b"HTTP/1.1 100 Continue")
        connection.sendall(body)
        assert status(read_answer(connection)) == 200
    assert inbox.count() == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("Transfer-Encoding: chunked\r\n", 411),
        ("Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", 411),
        ("", 411),
        ("Content-Length: -1\r\n", 400),
        ("Content-Length: 2, 2\r\n", 400),
        ("Content-Length: 2\r\nContent-Length: 2\r\n", 400),
    ],
    ids=["chunked", "chunked with a length", "no length", "negative", "a list", "twice"],
)
def test_a_body_of_unknown_or_ambiguous_length_is_refused_and_the_connection_closed(
    receiver: Receiver, inbox: Inbox, headers: str, expected: int
) -> None:
    request = f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{headers}\r\n2\r\n{{}}\r\n0\r\n\r\n".encode()
    answer = raw_exchange(receiver, request, read_until_closed=True)

    assert status(answer) == expected
    assert b"Connection: close" in answer
    assert answer.count(b"HTTP/1.1") == 1  # the body was not taken for another request
    assert inbox.count() == 0


def test_a_body_that_stops_arriving_is_given_up_within_the_socket_timeout(
    receiver: Receiver, inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receiver_module._Handler, "timeout", 0.5)
    body = delivery(1)
    request = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nX-Webhook-Signature: {sign(body, SECRET)}\r\n\r\n"
    ).encode() + body[:10]
    started = time.monotonic()
    answer = raw_exchange(receiver, request, read_until_closed=True)

    assert status(answer) == 408
    assert time.monotonic() - started < 5
    assert inbox.count() == 0


# ---------------------------------------------------------------- rate and connections


def test_requests_past_the_rate_limit_are_told_when_to_come_back(inbox: Inbox) -> None:
    now = [1000.0]
    with Receiver(inbox, SECRET, port=0, rate_per_second=2, burst=3, clock=lambda: now[0]) as receiver:
        with requests.Session() as session:

            def post(number: int) -> requests.Response:
                body = delivery(number)
                return session.post(receiver.url, data=body, headers=signed(body), timeout=10)

            first = [post(number).status_code for number in (1, 2, 3)]
            refused = post(4)
            now[0] += 0.5  # one token back at 2 a second
            again = post(4)
            refused_again = post(5)

    assert first == [200, 200, 200]
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert again.status_code == 200 and refused_again.status_code == 429
    assert [kept.contact_id for kept in inbox.since(0)] == [1, 2, 3, 4]


def test_a_token_bucket_passes_its_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 1.0
    assert sum(bucket.take() == 0.0 for _ in range(20)) == 5  # refilled to its burst, no more


def test_connections_past_the_bound_are_answered_503_at_once(inbox: Inbox) -> None:
    with Receiver(inbox, SECRET, port=0, max_connections=2) as receiver:
        held = [socket.create_connection((receiver.host, receiver.port), timeout=10) for _ in range(2)]
        try:
            for connection in held:  # each served once, and kept open: both slots taken
                connection.sendall(f"GET {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert status(read_answer(connection)) == 405
            answer = raw_exchange(receiver, f"GET {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), read_until_closed=True)
            assert status(answer) == 503
        finally:
            for connection in held:
                connection.close()


# ---------------------------------------------------------------- many at once


def post_all(url: str, bodies: list[bytes], threads: int) -> list[int]:
    local = threading.local()

    def post(body: bytes) -> int:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        return session.post(url, data=body, headers=signed(body), timeout=60).status_code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, bodies))


def test_concurrent_deliveries_are_each_kept_once_under_consecutive_seqs(receiver: Receiver, inbox: Inbox) -> None:
    bodies = [delivery(number) for number in range(1, 201)]
    statuses = post_all(receiver.url, bodies + bodies[:50], threads=16)  # some sent twice, racing

    assert statuses == [200] * 250
    kept = inbox.since(0, MAX_READ)
    assert [delivery.seq for delivery in kept] == list(range(1, 201))
    assert sorted(delivery.contact_id or 0 for delivery in kept) == list(range(1, 201))


@pytest.mark.slow
def test_a_burst_of_1000_deliveries_in_under_10_seconds_lands_without_a_429(receiver: Receiver, inbox: Inbox) -> None:
    bodies = [delivery(number) for number in range(1, 1001)]
    started = time.monotonic()
    statuses = post_all(receiver.url, bodies, threads=20)
    seconds = time.monotonic() - started

    assert statuses == [200] * 1000
    assert inbox.count() == 1000
    assert seconds < 10, f"1000 deliveries took {seconds:.1f} s"
    print(f"1000 deliveries kept in {seconds:.2f} s ({1000 / seconds:.0f}/s)")


# ---------------------------------------------------------------- the log and shutting down


def test_the_log_says_what_happened_without_the_secret_a_signature_or_a_contacts_values(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    body = delivery(4242)
    caplog.set_level(logging.DEBUG)
    with requests.Session() as session:
        session.post(receiver.url, data=body, headers=signed(body), timeout=10)
        session.post(receiver.url, data=body, headers=signed(body), timeout=10)
        session.post(receiver.url, data=body, headers={"X-Webhook-Signature": "0" * 64}, timeout=10)
        bad = b'{"contact": ' + EMAIL.encode()
        session.post(receiver.url, data=bad, headers=signed(bad), timeout=10)

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "delivery 1 (CONTACT_TAG_ADDED) kept (200)" in text
    assert "kept once (200)" in text and "wrong signature (401)" in text and "(400)" in text
    for secret_or_value in (SECRET_TEXT, sign(body, SECRET), EMAIL, "4242", "grace"):
        assert secret_or_value not in text


def test_stopping_ends_idle_keep_alive_connections_at_once(inbox: Inbox) -> None:
    receiver = Receiver(inbox, SECRET, port=0).start()
    session = requests.Session()
    body = delivery(1)
    assert session.post(receiver.url, data=body, headers=signed(body), timeout=10).status_code == 200

    started = time.monotonic()
    receiver.stop()  # the session's connection is idle, waiting for a next request

    assert time.monotonic() - started < receiver_module.SOCKET_TIMEOUT_SECONDS / 2
    with pytest.raises(requests.ConnectionError):
        session.post(receiver.url, data=body, headers=signed(body), timeout=5)
    session.close()
    assert inbox.count() == 1


# ---------------------------------------------------------------- across processes


def start_serving(inbox_path: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """``mkt-assets webhooks serve`` on a free port, as a user starts it; its process and URL."""
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mkt-assets")), "webhooks", "serve", "--port", "0", "--inbox", str(inbox_path)],
        env={**os.environ, WEBHOOK_SECRET_ENV: SECRET_TEXT, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "receiver.log", "w"),  # noqa: SIM115 - the child writes it
        text=True,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 60)
    assert ready, "the receiver did not start within 60 s"
    banner = process.stdout.readline()
    found = re.search(r"serving (http://\S+/systeme/webhook);", banner)
    assert found, banner + (tmp_path / "receiver.log").read_text()
    return process, found.group(1)


@pytest.mark.slow
def test_every_delivery_answered_200_survives_the_receiver_killed_with_sigkill(tmp_path: Path) -> None:
    inbox_path = tmp_path / "inbox.sqlite"
    process, url = start_serving(inbox_path, tmp_path)
    answered: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def keep_posting(first: int) -> None:
        with requests.Session() as session:
            number = first
            while not stop.is_set():
                body = delivery(number)
                try:
                    answer = session.post(url, data=body, headers=signed(body), timeout=10)
                except requests.ConnectionError:
                    return  # killed
                if answer.status_code == 200:
                    with lock:
                        answered.append(number)
                number += 1

    posters = [threading.Thread(target=keep_posting, args=(first,)) for first in (1, 1_000_001, 2_000_001, 3_000_001)]
    for poster in posters:
        poster.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it in the middle of the flow
            with lock:
                if len(answered) >= 100:
                    break
            stop.wait(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        stop.set()
        for poster in posters:
            poster.join(timeout=30)
        process.kill()

    with lock:
        acknowledged = set(answered)
    assert len(acknowledged) >= 100
    with Inbox(inbox_path) as inbox:
        kept = {delivery.contact_id for delivery in inbox.since(0, MAX_READ)}
    assert acknowledged <= kept, f"answered 200 but lost: {sorted(acknowledged - kept)[:10]}"


@pytest.mark.slow
def test_sigterm_stops_the_receiver_cleanly_with_its_deliveries_kept(tmp_path: Path) -> None:
    inbox_path = tmp_path / "inbox.sqlite"
    process, url = start_serving(inbox_path, tmp_path)
    try:
        with requests.Session() as session:
            body = delivery(1)
            assert session.post(url, data=body, headers=signed(body), timeout=10).status_code == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    log = (tmp_path / "receiver.log").read_text()
    assert "Traceback" not in log and SECRET_TEXT not in log and EMAIL not in log
    with Inbox(inbox_path) as inbox:
        assert [kept.contact_id for kept in inbox.since(0)] == [1]


def test_another_process_reads_whole_deliveries_in_order_while_the_receiver_writes(receiver: Receiver, tmp_path: Path) -> None:
    total = 150
    reader = subprocess.Popen(
        [sys.executable, "-c", READ_WHILE_WRITTEN, str(receiver.inbox.path), str(total)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        statuses = post_all(receiver.url, [delivery(number) for number in range(1, total + 1)], threads=8)
        out, err = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert statuses == [200] * total
    assert reader.returncode == 0, err
    seen: dict[str, Any] = json.loads(out)
    assert seen["seqs"] == list(range(1, total + 1))  # each once, in order, none skipped
    assert sorted(seen["contacts"]) == list(range(1, total + 1))
    assert seen["reads"] > 1  # it read while the deliveries were arriving


READ_WHILE_WRITTEN = """
import json, sys, time
from mkt_assets.webhooks.inbox import Inbox
path, total = sys.argv[1], int(sys.argv[2])
seqs, contacts, reads = [], [], 0
with Inbox(path) as inbox:
    print("reading", flush=True)
    deadline = time.monotonic() + 100
    while len(seqs) < total and time.monotonic() < deadline:
        batch = inbox.since(seqs[-1] if seqs else 0, 7)
        reads += 1
        for delivery in batch:
            json.loads(delivery.body)  # whole: a delivery is never seen half written
            seqs.append(delivery.seq)
            contacts.append(delivery.contact_id)
        if not batch:
            time.sleep(0.005)  # polling, as a sensor does
print(json.dumps({"seqs": seqs, "contacts": contacts, "reads": reads}))
"""
