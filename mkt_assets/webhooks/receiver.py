"""The webhook receiver: ``POST /systeme/webhook``, verified, bounded, kept before it is answered.

Each request is judged in this order, the cheapest refusal first, and nothing is kept unless
every step passes:

1. the method and path (404 elsewhere, 405 for another method on the path);
2. the request rate: a token bucket shared by every connection (429 with ``Retry-After``);
3. the length: ``Content-Length`` required (411; ``Transfer-Encoding`` too, chunked or not),
   at most ``MAX_BODY_BYTES`` (413), the body read whole within ``BODY_SECONDS``;
4. the signature (``core.deliveries.verify`` with the secret): missing or wrong -> 401;
5. the body: a JSON object (400 otherwise);
6. the inbox: committed to disk (``Inbox.add``), then 200; the same body again -> 200, kept
   once. An inbox that cannot be written answers 503: the platform retries later.

An answer given before the body was read closes the connection (what follows on it is that
body, not a request). Connections are kept alive otherwise, each read bounded by
``SOCKET_TIMEOUT_SECONDS``, and at most ``MAX_CONNECTIONS`` are served at once.

The log says what happened to each request (the delivery's seq and event type, the status),
never the secret, a signature, a body or anything of a contact in it.

Standard library only, with the inbox and the core's delivery format: no Dagster.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import urlsplit

from mkt_assets.core.deliveries import SIGNATURE_HEADER, DeliveryFormatError, WebhookSecret, parse, verify
from mkt_assets.core.errors import InboxUnavailableError
from mkt_assets.webhooks.inbox import Inbox

WEBHOOK_PATH = "/systeme/webhook"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
MAX_BODY_BYTES = 1 << 20
# A burst of 1,000 deliveries in 10 s passes whole; a flood beyond 200 a second is told to wait.
DEFAULT_RATE_PER_SECOND = 200.0
DEFAULT_BURST = 2000
# Each read of a request (its line, headers, a piece of its body) and an idle keep-alive
# connection wait at most this long; a body must arrive whole within BODY_SECONDS.
SOCKET_TIMEOUT_SECONDS = 10.0
BODY_SECONDS = 30.0
MAX_CONNECTIONS = 128
# What a client told to wait (429, 503) is asked to wait at least.
_RETRY_AFTER_UNAVAILABLE = 5
_READ_PIECE = 1 << 16
# How often the serving loop looks for a stop: stop() waits up to this long.
_POLL_SECONDS = 0.05
# How much of a refused body is read and dropped before the connection is closed.
_DRAIN_SECONDS = 2.0
_DRAIN_BYTES = 4 * MAX_BODY_BYTES
_BUSY_ANSWER = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

log = logging.getLogger(__name__)
Clock = Callable[[], float]


class TokenBucket:
    """``rate`` requests a second on average, ``burst`` at once; thread-safe."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._filled_at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 if a request may pass now (and it is counted), else the seconds until one may."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._filled_at) * self.rate)
            self._filled_at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate


class Receiver:
    """The receiver on ``host:port`` (0 picks a free port), keeping deliveries in ``inbox``.
    ``start()`` serves in a background thread; ``stop()`` lets the requests in hand finish."""

    def __init__(
        self,
        inbox: Inbox,
        secret: WebhookSecret,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        rate_per_second: float = DEFAULT_RATE_PER_SECOND,
        burst: int = DEFAULT_BURST,
        max_connections: int = MAX_CONNECTIONS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self._secret = secret
        self.bucket = TokenBucket(rate_per_second, burst, clock)
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = self._closed = False
        self._httpd = _HTTPServer((host, port), self, max_connections)

    def __repr__(self) -> str:
        return f"Receiver(url={self.url!r}, inbox={self.inbox!r})"

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{WEBHOOK_PATH}"

    def start(self) -> Receiver:
        with self._state_lock:
            if self._started or self._closed:
                raise RuntimeError("a Receiver can be started once")
            self._started = True
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(_POLL_SECONDS,), name=f"webhook-receiver-{self.port}", daemon=True
            )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop taking connections, let each request in hand finish (its delivery kept and
        answered), close idle connections, and wait for every handler to end."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._httpd.stopping.set()
        self._httpd.wake_idle_connections()
        self._httpd.server_close()  # joins the handler threads

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def verify(self, body: bytes, signature: str | None) -> bool:
        return verify(body, self._secret, signature)


class _HTTPServer(ThreadingHTTPServer):
    # Joined on close: a handler keeping a delivery finishes before the inbox is closed.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], receiver: Receiver, max_connections: int) -> None:
        self.receiver = receiver
        self.max_connections = max_connections
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up (getfqdn), which can hang without DNS.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Every slot is taken (slow or idle clients): say so at once rather than queue.
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY_ANSWER)
            except OSError:
                pass  # the client is gone already
            self.shutdown_request(request)
            log.warning("refused a connection: %d already open (503)", self.max_connections)
            return
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._connections_lock:
            if request not in self._connections:
                return
            self._connections.discard(request)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback per broken connection (a client gone mid-answer).
        error = sys.exc_info()[1]
        log.warning("a connection ended in an error (%s)", type(error).__name__)

    def wake_idle_connections(self) -> None:
        """End every connection's reading side: a handler waiting for a next request sees the
        end and exits; one answering a request still sends its answer."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # closed meanwhile by its handler


class _Answer(Exception):
    """A refusal: the status, what to say, and the headers to add."""

    def __init__(self, status: int, detail: str, **headers: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes: with Nagle's algorithm on, a keep-alive
    # sender waits out the delayed ACK (40 ms) on each delivery.
    disable_nagle_algorithm = True
    server_version = "mkt-assets-webhooks"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_SECONDS
    server: _HTTPServer

    # ---------------------------------------------------------------- routing

    _unread_body = False

    def parse_request(self) -> bool:
        self._head_checked = False
        return super().parse_request()

    def finish(self) -> None:
        super().finish()
        if self._unread_body:
            self._drain()

    def _drain(self) -> None:
        """Read (and drop) what the client is still sending, for a little while, before the
        connection is closed: closed on unread data, it would be reset, and the client could
        lose the answer (a 413 saying why) before reading it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_SECONDS
            drained = 0
            while drained < _DRAIN_BYTES and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                piece = self.connection.recv(_READ_PIECE)
                if not piece:
                    break
                drained += len(piece)
        except OSError:
            pass  # the client is gone or too slow: the connection closes now either way

    def handle_expect_100(self) -> bool:
        # "Expect: 100-continue": refuse before the client sends a body we would not read.
        try:
            self._check_head()
        except _Answer as answer:
            self._answer(answer.status, answer.detail, body_read=False, **answer.headers)
            return False
        self._head_checked = True
        return super().handle_expect_100()

    def do_POST(self) -> None:
        body_read = False
        try:
            if not self._head_checked:
                self._check_head()
            body = self._read_body()
            body_read = True
            status, detail = self._keep(body)
        except _Answer as answer:
            self._answer(answer.status, answer.detail, body_read=body_read, **answer.headers)
            return
        except Exception as error:  # noqa: BLE001 - a bug answers 500 (the platform retries), logged by its type alone: its message could quote the body
            log.error("could not keep a delivery (500): %s", type(error).__name__)
            self._answer(500, "the delivery could not be kept; send it again later", body_read=body_read)
            return
        self._answer(status, detail, body_read=True)

    def _not_post(self) -> None:
        if urlsplit(self.path).path == WEBHOOK_PATH:
            self._answer(405, "only POST is answered here", body_read=False, Allow="POST")
        else:
            self._answer(404, f"nothing here: deliveries go to POST {WEBHOOK_PATH}", body_read=False)

    do_GET = do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_post

    def _check_head(self) -> None:
        """Steps 1 to 3 of the module's docstring, before any of the body is read."""
        if urlsplit(self.path).path != WEBHOOK_PATH:
            raise _Answer(404, f"nothing here: deliveries go to POST {WEBHOOK_PATH}")
        wait = self.server.receiver.bucket.take()
        if wait > 0:
            log.warning("refused a delivery: over the rate limit (429)")
            raise _Answer(429, "too many requests", **{"Retry-After": str(max(1, math.ceil(wait)))})
        if self.headers.get_all("Transfer-Encoding"):
            raise _Answer(411, "send the body with a Content-Length, not a Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise _Answer(411, "a Content-Length is required")
        if len(lengths) > 1 or not lengths[0].strip().isdigit() or not lengths[0].strip().isascii():
            raise _Answer(400, "the Content-Length is not one whole number")
        if int(lengths[0]) > MAX_BODY_BYTES:
            log.warning("refused a delivery: its body is over %d bytes (413)", MAX_BODY_BYTES)
            raise _Answer(413, f"the body is larger than {MAX_BODY_BYTES} bytes")

    def _read_body(self) -> bytes:
        length = int(self.headers["Content-Length"])
        deadline = time.monotonic() + BODY_SECONDS
        pieces: list[bytes] = []
        left = length
        try:
            while left > 0:
                if time.monotonic() > deadline:
                    raise _Answer(408, f"the body did not arrive within {BODY_SECONDS:g} s")
                piece = self.rfile.read1(min(left, _READ_PIECE))
                if not piece:
                    if self.server.stopping.is_set():  # cut by stop(): the platform should send it again
                        raise _Answer(
                            503, "the receiver is stopping; send it again later", **{"Retry-After": str(_RETRY_AFTER_UNAVAILABLE)}
                        )
                    raise _Answer(400, "the connection ended before the whole body arrived")
                pieces.append(piece)
                left -= len(piece)
        except TimeoutError:
            raise _Answer(408, f"no part of the body arrived for {SOCKET_TIMEOUT_SECONDS:g} s") from None
        return b"".join(pieces)

    # ---------------------------------------------------------------- keeping

    def _keep(self, body: bytes) -> tuple[int, str]:
        """Steps 4 to 6: verified, parsed, kept. The status and what to say."""
        signatures = self.headers.get_all(SIGNATURE_HEADER) or []
        if len(signatures) != 1 or not self.server.receiver.verify(body, signatures[0]):
            why = "no signature" if not signatures else "several signatures" if len(signatures) > 1 else "a wrong signature"
            log.warning("refused a delivery: %s (401)", why)
            raise _Answer(401, f"the {SIGNATURE_HEADER} header is missing or does not sign this body")
        try:
            facts = parse(body, self.headers.items())
        except DeliveryFormatError as error:
            log.warning("refused a signed delivery: %s (400)", error)
            raise _Answer(400, str(error)) from None
        try:
            seq, new = self.server.receiver.inbox.add(body, facts)
        except InboxUnavailableError as error:
            log.error("could not keep a delivery (503): %s", error)
            raise _Answer(
                503, "the delivery could not be kept; send it again later", **{"Retry-After": str(_RETRY_AFTER_UNAVAILABLE)}
            ) from None
        event = facts.event_type or "no event type"
        if new:
            log.info("delivery %d (%s) kept (200)", seq, event)
            return 200, "kept"
        log.info("delivery %d (%s) received again, kept once (200)", seq, event)
        return 200, "already kept"

    # ---------------------------------------------------------------- answering

    def _answer(self, status: int, detail: str, *, body_read: bool, **headers: str) -> None:
        # An unread body would be taken for the next request: the connection ends with the answer.
        # A POST refused before its body was read meant to send one, whatever its headers said.
        unread = not body_read and (self.command == "POST" or self._may_have_body())
        closing = unread or self.server.stopping.is_set()
        if closing:
            self.close_connection = True
        self._unread_body = self._unread_body or unread
        content = json.dumps({"status": status, "detail": detail}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        for name, value in headers.items():
            self.send_header(name, value)
        if closing:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _may_have_body(self) -> bool:
        length = self.headers.get("Content-Length", "0").strip()
        return bool(self.headers.get_all("Transfer-Encoding")) or length != "0"

    def log_message(self, format: str, *args: Any) -> None:
        # http.server would log each request line, which may carry anything: the receiver logs
        # what it decided instead.
        pass
