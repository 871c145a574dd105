"""Pacing by the rate-limit headers, with a fake clock: no sleeping in these tests."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mkt_assets.ratelimit import SharedRateLimiter, parse_refill, state_path_for

NOW = 1_800_000_000.0  # a Unix time in 2027


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def headers(remaining: int, refill: str, limit: int = 20) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining), "X-RateLimit-Refill": refill}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", NOW + 2),  # seconds from now
        ("0.5", NOW + 0.5),
        (str(int(NOW) + 30), NOW + 31),  # a Unix time, whole seconds: up to a second later
        (f"{NOW + 30.25}", NOW + 30.25),
        ("Fri, 15 Jan 2027 08:20:31 GMT", 1_800_001_232.0),  # an HTTP date
        ("2027-01-15T08:20:31+00:00", 1_800_001_232.0),  # an ISO date
        ("soon", None),
    ],
)
def test_refill_is_read_as_seconds_a_unix_time_or_a_date(value: str, expected: float | None) -> None:
    assert parse_refill(value, NOW) == expected


def limiter(tmp_path: Path, clock: FakeClock) -> SharedRateLimiter:
    return SharedRateLimiter(tmp_path / "quota.json", clock=clock, sleep=clock.sleep)


def test_requests_go_at_once_while_the_quota_lasts_then_wait_for_the_refill(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    assert pacer.acquire() == 0  # nothing known yet
    pacer.observe(headers(remaining=2, refill="2"))

    assert pacer.acquire() == 0
    assert pacer.acquire() == 0
    waited = pacer.acquire()

    assert waited == pytest.approx(2.02)
    assert clock.slept == [pytest.approx(2.02)]


def test_processes_sharing_the_state_file_share_the_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    first, second = limiter(tmp_path, clock), limiter(tmp_path, clock)
    first.acquire()
    first.observe(headers(remaining=3, refill="2"))

    taken = [first.acquire(), second.acquire(), first.acquire()]
    assert taken == [0, 0, 0]
    assert second.acquire() > 0  # the fourth request of the window waits, whoever asks


class QuotaSpent(Exception):
    """Raised by the test's sleep: the limiter would wait, so this thread's reservations end."""


def test_threads_of_one_process_share_the_quota_without_losing_reservations(tmp_path: Path) -> None:
    # Both ends of a two-ended walk reserve through one limiter, so one open file: flock
    # alone would let them in together and lose each other's updates.
    clock = FakeClock()

    def refuse(seconds: float) -> None:
        raise QuotaSpent

    pacer = SharedRateLimiter(tmp_path / "quota.json", clock=clock, sleep=refuse)
    pacer.observe(headers(remaining=400, refill="3600", limit=400))
    granted: list[int] = []
    start = threading.Barrier(8)

    def reserve() -> None:
        start.wait()
        count = 0
        try:
            while True:
                pacer.acquire()
                count += 1
        except QuotaSpent:
            granted.append(count)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(granted) == 8
    assert sum(granted) == 400


def test_the_refill_estimate_tightens_across_answers(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=5, refill="2"))  # the window ends within (now+1, now+2]
    clock.now += 0.6
    pacer.observe(headers(remaining=4, refill="1"))  # ... and within (now+0.6, now+1.6]
    for _ in range(4):
        assert pacer.acquire() == 0

    assert pacer.acquire() == pytest.approx(1.0 + 0.02)


def test_an_answer_from_a_window_that_ended_is_ignored(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=10, refill="1"))
    clock.now += 1.5

    pacer.observe(headers(remaining=0, refill="1"), received_at=clock.now - 1.4)

    assert pacer.acquire() == 0


def test_a_refilled_window_starts_from_the_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=0, refill="1", limit=3))
    clock.now += 1.1

    assert [pacer.acquire() for _ in range(3)] == [0, 0, 0]
    assert pacer.acquire() > 0


def test_answers_without_rate_limit_headers_leave_requests_unpaced(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe({"Content-Type": "application/json"})

    assert all(pacer.acquire() == 0 for _ in range(1000))


def test_a_corrupt_state_file_is_started_afresh(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "quota.json").write_text("{not json")

    assert limiter(tmp_path, clock).acquire() == 0


def test_each_api_origin_has_its_own_state_file(tmp_path: Path) -> None:
    one = state_path_for("https://api.systeme.io", str(tmp_path))
    assert one == state_path_for("https://api.systeme.io", str(tmp_path))
    assert one != state_path_for("http://127.0.0.1:8765", str(tmp_path))
    assert one.parent == tmp_path


def test_a_spent_quota_with_no_refill_known_is_waited_out_not_forever(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=0, refill="1", limit=1))
    clock.now += 1.1
    assert pacer.acquire() == 0  # the window refilled; the request it sent got no answer

    assert pacer.acquire() == pytest.approx(1.02)
