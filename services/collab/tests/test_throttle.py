"""The attempt throttle on an injected clock: allow, refuse, ban, expire, bounded tables."""

from __future__ import annotations

import logging

import pytest
from channels_collab.throttle import Throttle

from tests.support import FakeClock


def make(attempts=3, window=60.0, ban=300.0, **kw):
    clock = FakeClock(1000.0)
    return Throttle(attempts, window, ban, clock, **kw), clock


def test_attempts_within_the_limit_pass_then_the_next_starts_a_ban():
    throttle, clock = make(attempts=3)
    assert [throttle.attempt("a") for _ in range(3)] == [None, None, None]
    refused = throttle.attempt("a")
    assert refused is not None and refused.ban_started and refused.retry_after == 300.0
    clock.now += 100
    again = throttle.attempt("a")
    assert again is not None and not again.ban_started and again.retry_after == 200.0
    # Other addresses are counted on their own.
    assert throttle.attempt("b") is None


def test_attempts_during_a_ban_do_not_extend_it_and_the_address_starts_afresh_after():
    throttle, clock = make(attempts=2, window=10, ban=30)
    throttle.attempt("a"), throttle.attempt("a")
    assert throttle.attempt("a").ban_started
    for _ in range(20):
        clock.now += 1
        assert throttle.attempt("a") is not None
    clock.now += 10  # 30 s after the ban started
    assert throttle.attempt("a") is None
    assert throttle.attempt("a") is None
    assert throttle.attempt("a").ban_started


def test_the_window_slides():
    throttle, clock = make(attempts=3, window=10)
    throttle.attempt("a")  # t=0
    clock.now += 6
    throttle.attempt("a"), throttle.attempt("a")  # t=6 twice
    clock.now += 4.5  # t=10.5: the first attempt has left the window
    assert throttle.attempt("a") is None
    assert throttle.attempt("a").ban_started  # three in the last 10 s already


def test_retry_after_header_rounds_up_to_whole_seconds():
    throttle, clock = make(attempts=1, window=1, ban=1.5)
    throttle.attempt("a")
    assert throttle.attempt("a").retry_after_header == b"2"
    clock.now += 1.4
    assert throttle.attempt("a").retry_after_header == b"1"  # never 0: that would invite a retry now


def test_a_flood_of_distinct_addresses_stays_within_the_cap_and_keeps_the_newest():
    throttle, _ = make(attempts=1, max_addresses=100)
    for i in range(10_000):
        address = f"a{i}"
        throttle.attempt(address)
        throttle.attempt(address)  # banned
    assert len(throttle) <= 200  # 100 tracked, 100 banned
    assert throttle.attempt("a9999") is not None  # the newest ban still holds


def test_entries_expire_with_their_window_and_ban():
    throttle, clock = make(attempts=1, window=10, ban=20)
    for i in range(50):
        throttle.attempt(f"a{i}")
    throttle.attempt("b"), throttle.attempt("b")
    assert len(throttle) == 51
    clock.now += 10.5
    throttle.attempt("c")
    assert len(throttle) == 2  # b's ban and c's attempt
    clock.now += 10
    throttle.attempt("c")
    assert len(throttle) == 1


@pytest.mark.parametrize(("attempts", "window", "ban"), [(0, 60, 300), (15, 0, 300), (15, 60, 0)])
def test_bad_parameters_are_refused(attempts, window, ban):
    with pytest.raises(ValueError):
        Throttle(attempts, window, ban, FakeClock(1000.0))


async def drive(service, scope):
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    await service.endpoint(scope, receive, send)
    return sent


async def test_the_endpoint_answers_429_with_retry_after_before_any_upgrade_and_counts_it(caplog):
    from channels_collab.app import CollabService
    from channels_common.settings import CollabSettings
    from channels_common.wsserver import HTTP_RESPONSE

    service = CollabService(CollabSettings(COLLAB_THROTTLE_ATTEMPTS=1, COLLAB_THROTTLE_BAN_SECONDS=30,
                                           TRUSTED_PROXIES="127.0.0.1"))
    service.throttle.attempt("198.51.100.1")  # the one allowed attempt
    scope = {"type": "websocket", "client": ("127.0.0.1", 4000), "extensions": {HTTP_RESPONSE: {}},
             "headers": [(b"x-forwarded-for", b"198.51.100.1")]}
    with caplog.at_level(logging.WARNING, logger="channels.collab"):
        start, body = await drive(service, scope)
        assert await drive(service, scope) == [start, body]
    assert start["type"] == "websocket.http.response.start" and start["status"] == 429
    assert (b"retry-after", b"30") in start["headers"]
    assert body == {"type": "websocket.http.response.body", "body": b"Too many connection attempts"}
    assert caplog.text.count("client banned") == 1  # once per ban, not per attempt
    assert service.metrics.registry.get_sample_value("collab_throttled_total") == 2
    # A server without the denial extension can only refuse the upgrade (403).
    scope["extensions"] = {}
    assert await drive(service, scope) == [{"type": "websocket.close", "code": 1008}]


def test_the_endpoint_has_no_throttle_unless_configured():
    from channels_collab.app import CollabService
    from channels_common.settings import CollabSettings

    assert CollabService(CollabSettings(COLLAB_THROTTLE_ATTEMPTS=0)).throttle is None
