"""Pacing by the rate-limit headers, with a fake clock: no sleeping in these tests."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mkt_assets.core.errors import PrivateDirectoryError, PrivateFileError
from mkt_assets.source.ratelimit import SharedRateLimiter, parse_refill, state_path_for

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


def answered(pacer: SharedRateLimiter, answer: dict[str, str] | None = None) -> float:
    """One request, reserved and answered (by ``answer``'s headers, or none); its wait."""
    reservation = pacer.reserve()
    pacer.observe(answer or {}, reservation=reservation)
    return reservation.waited


def test_requests_go_at_once_while_the_quota_lasts_then_wait_for_the_refill(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    assert answered(pacer, headers(remaining=2, refill="2")) == 0  # nothing known yet

    assert pacer.reserve().waited == 0
    assert pacer.reserve().waited == 0
    waited = pacer.reserve().waited

    assert waited == pytest.approx(2.02)
    assert clock.slept == [pytest.approx(2.02)]


def test_processes_sharing_the_state_file_share_the_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    first, second = limiter(tmp_path, clock), limiter(tmp_path, clock)
    answered(first, headers(remaining=3, refill="2"))

    taken = [first.reserve().waited, second.reserve().waited, first.reserve().waited]
    assert taken == [0, 0, 0]
    assert second.reserve().waited > 0  # the fourth request of the window waits, whoever asks


class QuotaSpent(Exception):
    """Raised by the test's sleep: the limiter would wait, so this thread's reservations end."""


def test_threads_of_one_process_share_the_quota_without_losing_reservations(tmp_path: Path) -> None:
    # Both ends of a two-ended walk reserve through one limiter, so one open file: flock
    # alone would let them in together and lose each other's updates.
    clock = FakeClock()

    def refuse(seconds: float) -> None:
        raise QuotaSpent

    pacer = SharedRateLimiter(tmp_path / "quota.json", clock=clock, sleep=refuse)
    pacer.observe(headers(remaining=400, refill="60", limit=400))
    granted: list[int] = []
    start = threading.Barrier(8)

    def reserve() -> None:
        start.wait()
        count = 0
        try:
            while True:
                pacer.reserve()
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
        assert pacer.reserve().waited == 0

    assert pacer.reserve().waited == pytest.approx(1.0 + 0.02)


def test_an_answer_from_a_window_that_ended_is_ignored(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=10, refill="1"))
    clock.now += 1.5

    pacer.observe(headers(remaining=0, refill="1"), received_at=clock.now - 1.4)

    assert pacer.reserve().waited == 0


def test_a_refilled_window_starts_from_the_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=0, refill="1", limit=3))
    clock.now += 1.1

    assert [pacer.reserve().waited for _ in range(3)] == [0, 0, 0]
    assert pacer.reserve().waited > 0


def test_answers_without_rate_limit_headers_leave_requests_unpaced(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe({"Content-Type": "application/json"})

    assert all(pacer.reserve().waited == 0 for _ in range(1000))


def test_a_corrupt_state_file_is_started_afresh(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "quota.json").write_text("{not json")
    (tmp_path / "quota.json").chmod(0o600)  # ours and private, only torn

    assert limiter(tmp_path, clock).reserve().waited == 0


def test_each_api_origin_has_its_own_state_file(tmp_path: Path) -> None:
    one = state_path_for("https://api.systeme.io", "key-a", str(tmp_path))
    assert one == state_path_for("https://api.systeme.io", "key-a", str(tmp_path))
    assert one != state_path_for("http://127.0.0.1:8765", "key-a", str(tmp_path))
    # Two accounts on one host keep their own quotas, and no file name holds a key.
    assert one != state_path_for("https://api.systeme.io", "key-b", str(tmp_path))
    assert "key-a" not in one.name
    assert one.parent == tmp_path


def test_a_spent_quota_with_no_refill_known_is_waited_out_not_forever(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    pacer.observe(headers(remaining=0, refill="1", limit=1))
    clock.now += 1.1
    assert pacer.reserve().waited == 0  # the window refilled; the request it sent got no answer

    assert pacer.reserve().waited == pytest.approx(1.02)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def logging_limiter(path: Path, clock: FakeClock, **options: float) -> tuple[SharedRateLimiter, list[str]]:
    logged: list[str] = []
    return SharedRateLimiter(path, log=logged.append, clock=clock, sleep=clock.sleep, **options), logged


def test_a_state_directory_owned_by_another_user_is_refused(tmp_path: Path, give_away: Callable[[Path], int]) -> None:
    quota = tmp_path / "quota"
    quota.mkdir(mode=0o700)
    owner = give_away(quota)

    problem = rf"refusing {re.escape(str(quota))} for private files: it is owned by uid {owner}, not you \(uid {os.getuid()}\); remove it, or set staging_dir / quota_state_dir"
    with pytest.raises(PrivateDirectoryError, match=problem):
        state_path_for("https://api.systeme.io", "key", str(quota))


def test_a_state_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    quota = tmp_path / "quota"
    quota.mkdir()
    quota.chmod(0o755)

    with pytest.raises(PrivateDirectoryError, match=r"quota for private files: its mode is 0755: group or others have access"):
        state_path_for("https://api.systeme.io", "key", str(quota))


def test_the_default_state_directory_is_the_users_own_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    path = state_path_for("https://api.systeme.io", "key")

    assert path.parent == tmp_path / f"mkt_assets-{os.getuid()}" / "quota"
    assert (mode(path.parent.parent), mode(path.parent)) == (0o700, 0o700)


def test_a_default_directory_planted_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"mkt_assets-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # open to all, so its maker can swap what we put in it
    if os.getuid() == 0:
        os.chown(planted, 1001, -1)

    with pytest.raises(PrivateDirectoryError, match=rf"refusing {re.escape(str(planted))} for private files"):
        state_path_for("https://api.systeme.io", "key")
    assert list(planted.iterdir()) == []


@pytest.mark.parametrize("target_exists", [True, False], ids=["to a file", "dangling"])
def test_a_symlinked_state_file_is_refused_and_its_target_never_written(tmp_path: Path, target_exists: bool) -> None:
    target = tmp_path / "someone_elses_file"
    if target_exists:
        target.write_text("precious")
    (tmp_path / "quota.json").symlink_to(target)
    pacer = limiter(tmp_path, FakeClock())

    with pytest.raises(PrivateFileError, match=r"quota.json: it is a symbolic link \(to .*someone_elses_file\)"):
        pacer.reserve()
    with pytest.raises(PrivateFileError):
        pacer.observe(headers(remaining=5, refill="2"))

    assert (target.read_text() if target_exists else target.exists()) == ("precious" if target_exists else False)


def test_a_state_file_others_may_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "quota.json").write_text("")
    (tmp_path / "quota.json").chmod(0o644)

    with pytest.raises(PrivateFileError, match=r"quota.json: its mode is 0644"):
        limiter(tmp_path, FakeClock()).reserve()


@pytest.mark.parametrize(
    "stored",
    [
        '{"limit": 20, "remaining": 0, "refill_at": %r}' % (NOW + 3600),  # an hour ahead
        '{"limit": 20, "remaining": 0, "refill_at": %r}' % (NOW + 99999),  # what 'Refill: 99999' stored
        '{"limit": 20, "remaining": 0, "refill_at": 1764612345679.0}',  # ... and Unix milliseconds
        '{"limit": 20, "remaining": 0, "refill_at": NaN}',
        '{"limit": 20, "remaining": 0, "refill_at": Infinity}',
        '{"limit": 20, "remaining": -1, "refill_at": %r}' % (NOW + 60),
        '{"limit": 20, "remaining": "0", "refill_at": %r}' % (NOW + 60),
        '{"limit": 20, "remaining": false, "refill_at": %r}' % (NOW + 60),
        '{"limit": 20, "remaining": 0, "refill_at": "soon"}',
        '{"limit": 20, "remaining": 0, "refill_at": %r, "wait": 1}' % (NOW + 60),
        '[0, 0, 0]',
    ],
)
def test_no_stored_state_stalls_or_breaks_a_later_run(tmp_path: Path, stored: str) -> None:
    state = tmp_path / "quota.json"
    state.write_text(stored)
    state.chmod(0o600)
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)

    assert [answered(pacer) for _ in range(3)] == [0, 0, 0]
    assert clock.slept == []
    assert json.loads(state.read_text())["refill_at"] is None  # and it is gone for the next run too


def test_a_stored_refill_beyond_the_horizon_is_logged_when_dropped(tmp_path: Path) -> None:
    state = tmp_path / "quota.json"
    state.write_text(json.dumps({"limit": 20, "remaining": 0, "refill_at": NOW + 3600}))
    state.chmod(0o600)
    pacer, logged = logging_limiter(state, FakeClock())

    assert pacer.reserve().waited == 0

    assert logged == [f"rate-limit state {state}: a refill 60.0 min ahead is beyond the 120 s horizon: treated as unknown"]


@pytest.mark.parametrize(
    ("refill", "ahead"),
    [("99999", "27.8 h"), ("1764612345678", "55,860 years"), ("Fri, 31 Dec 9999 23:59:59 GMT", "7,973 years")],
)
def test_a_refill_beyond_the_horizon_is_treated_as_unknown_and_logged_once(tmp_path: Path, refill: str, ahead: str) -> None:
    clock = FakeClock()
    pacer, logged = logging_limiter(tmp_path / "quota.json", clock)

    for _ in range(3):
        pacer.observe(headers(remaining=0, refill=refill))
        assert pacer.reserve().waited == 0

    assert clock.slept == []
    assert logged == [f"X-RateLimit-Refill: {refill} is {ahead} ahead, more than the 120 s horizon: treated as unknown"]


def test_the_horizon_is_a_setting(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer, logged = logging_limiter(tmp_path / "quota.json", clock, horizon=600.0)
    pacer.observe(headers(remaining=0, refill="300"))

    assert pacer.reserve().waited == pytest.approx(300.02)
    assert logged[0].startswith("rate limit: waiting 300.0 s")


def test_a_server_sending_a_new_implausible_refill_on_every_answer_does_not_flood_the_log(tmp_path: Path) -> None:
    pacer, logged = logging_limiter(tmp_path / "quota.json", FakeClock())

    for millisecond in range(50):
        pacer.observe(headers(remaining=0, refill=str(1764612345678 + millisecond)))

    assert len(logged) == 5 and logged[-1].endswith("(further implausible values are not logged)")


@pytest.mark.parametrize("refill", ["nan", "inf", "-inf", "1e400", "Mon, 01 Jan 99999 00:00:00 GMT"])
def test_refill_values_no_clock_can_reach_are_ignored(tmp_path: Path, refill: str) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)

    pacer.observe(headers(remaining=0, refill=refill))

    assert pacer.reserve().waited == 0 and clock.slept == []


def test_odd_counts_in_the_headers_never_break_the_pacing(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)

    pacer.observe({"X-RateLimit-Limit": "²", "X-RateLimit-Remaining": "-3", "X-RateLimit-Refill": "2"})

    assert pacer.reserve().waited == pytest.approx(2.02)  # a negative count is a spent quota


def test_a_wait_of_five_seconds_or_more_is_logged_and_a_shorter_one_is_not(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer, logged = logging_limiter(tmp_path / "quota.json", clock)
    pacer.observe(headers(remaining=0, refill="2"))
    assert pacer.reserve().waited == pytest.approx(2.02)
    assert logged == []

    pacer.observe(headers(remaining=0, refill="30"))
    assert pacer.reserve().waited == pytest.approx(30.02)

    assert logged == [
        "rate limit: waiting 30.0 s for the quota to refill before the next request: 0 of 20 requests"
        " remain in this window (it refills then, by the answers' X-RateLimit-Refill)"
    ]


def test_no_single_wait_is_longer_than_the_horizon_even_when_the_clock_steps_back(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = SharedRateLimiter(tmp_path / "quota.json", horizon=60.0, clock=clock, sleep=clock.sleep)
    pacer.observe(headers(remaining=0, refill="50"))
    clock.now -= 30  # the stored refill is now 80 s ahead

    pacer.reserve()

    assert all(pause <= 60.0 for pause in clock.slept)


def test_while_nothing_is_known_the_first_request_goes_alone_until_its_answer_says_how_many_follow(
    tmp_path: Path,
) -> None:
    # Ten requests sent at once into a window nothing was known of overdrew it: its answers
    # count only what had arrived, and each thread took the count as room for more.
    clock = FakeClock()
    first, second = limiter(tmp_path, clock), limiter(tmp_path, clock)
    probe = first.reserve()
    held = threading.Event()

    def sleep(seconds: float) -> None:
        held.set()
        clock.now += seconds
        if len(clock.slept) == 3:  # the answer arrives while the second request waits
            first.observe(headers(remaining=19, refill="2"), reservation=probe)
        clock.slept.append(seconds)

    waiting = SharedRateLimiter(tmp_path / "quota.json", clock=clock, sleep=sleep)

    assert waiting.reserve().waited == pytest.approx(4 * 0.005)
    assert held.is_set()
    state = json.loads((tmp_path / "quota.json").read_text())
    assert (state["remaining"], state["issued"] - state["answered"]) == (18, 1)  # 19 less the one in flight
    assert second.reserve().waited == 0


def test_a_first_request_that_never_answers_holds_the_others_two_seconds_at_most(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    hanging = pacer.reserve()  # no answer, no error yet

    second = pacer.reserve()
    assert second.waited == pytest.approx(2.0, abs=0.006)

    # Requests that fail with no answer are no longer in flight: the next goes at once.
    pacer.abandon(hanging)
    pacer.abandon(second)
    assert pacer.reserve().waited == 0


def test_an_answer_without_rate_limit_headers_stops_the_probing(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)

    assert answered(pacer) == 0
    held = [pacer.reserve() for _ in range(5)]  # all at once: there is nothing to pace by

    assert clock.slept == [] and len(held) == 5
    assert answered(pacer, headers(remaining=10, refill="2")) == 0
    assert json.loads((tmp_path / "quota.json").read_text())["paced"] is True


def test_a_new_window_the_server_began_early_counts_the_requests_in_flight(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    answered(pacer, headers(remaining=10, refill="5"))
    in_flight = [pacer.reserve() for _ in range(4)]

    # The server's window ended early; this answer is the new window's, its count taken
    # before the three other requests in flight arrived.
    pacer.observe(headers(remaining=19, refill="7"), reservation=in_flight[0])

    state = json.loads((tmp_path / "quota.json").read_text())
    assert (state["remaining"], state["refill_at"]) == (16, NOW + 7)


def test_an_answer_sent_before_the_window_refilled_does_not_end_the_new_window_early(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    answered(pacer, headers(remaining=1, refill="2", limit=3))
    late = pacer.reserve()  # the old window's last request; its answer is slow to come
    clock.now += 2.0  # the old window ends; the next reservation takes the quota as refilled
    fresh = pacer.reserve()

    pacer.observe(headers(remaining=2, refill="2", limit=3), reservation=fresh)
    # The late answer's count was taken in the old window, a moment before it ended: the
    # refill it names ("1", rounded up to whole seconds) is that of the window that ended.
    pacer.observe(headers(remaining=0, refill="1", limit=3), reservation=late)

    state = json.loads((tmp_path / "quota.json").read_text())
    assert (state["remaining"], state["refill_at"]) == (2, NOW + 2.0 + 2)
    assert [pacer.reserve().waited for _ in range(2)] == [0, 0]
    clock.now += 1.5  # where the stale answer would have refilled the quota
    assert pacer.reserve().waited > 0


def test_an_older_answer_overtaken_by_a_newer_one_is_not_taken_for_a_new_window(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    # The server's window ends 1.01 s from now: whole seconds rounded up, "2" until 1 s is
    # left, then "1". The older answer was counted before that moment, the newer one after.
    answered(pacer, headers(remaining=12, refill="2"))
    older = pacer.reserve()
    clock.now += 0.02
    newer = pacer.reserve()
    clock.now += 0.01
    pacer.observe(headers(remaining=9, refill="1"), reservation=newer)
    clock.now += 0.03
    pacer.observe(headers(remaining=10, refill="2"), reservation=older)

    state = json.loads((tmp_path / "quota.json").read_text())
    assert state["remaining"] == 9
    assert state["refill_at"] == pytest.approx(NOW + 1.03)


def test_a_late_answer_from_the_window_the_server_ended_early_does_not_end_the_new_one(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    answered(pacer, headers(remaining=5, refill="5"))
    late, early = pacer.reserve(), pacer.reserve()
    clock.now += 0.5
    # The server began a new window already: the second request arrived in it, the first
    # just before, and the second's answer comes first.
    pacer.observe(headers(remaining=19, refill="7"), reservation=early)
    pacer.observe(headers(remaining=2, refill="1"), reservation=late)

    state = json.loads((tmp_path / "quota.json").read_text())
    assert (state["remaining"], state["refill_at"]) == (18, NOW + 7.5)


def test_a_lower_count_from_the_server_leaves_out_the_requests_reserved_after_it(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = limiter(tmp_path, clock)
    answered(pacer, headers(remaining=10, refill="5"))
    first = pacer.reserve()
    [pacer.reserve() for _ in range(2)]  # out, unanswered: the server had not counted them
    # Something else spent five of the quota (another machine with the same key).
    pacer.observe(headers(remaining=4, refill="5"), reservation=first)

    state = json.loads((tmp_path / "quota.json").read_text())
    assert state["remaining"] == 2
