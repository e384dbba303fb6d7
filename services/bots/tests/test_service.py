"""The bots service as a process (its console script), fed through real
Redis, posting to the stand-in homeserver: shutdown and Redis outages, the
cases a real Synapse cannot be made to produce on demand."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import pytest
import redis as redis_sync

from tests.support import ServiceProcess, free_port, wait_for

ROOM = "!room:localhost"
TOKEN = "stand-in-token-4f1b"


def publish(url: str, server: str, html: str, token: str = TOKEN, room: str = ROOM) -> None:
    payload = {"config": {"server": server, "access_token": token, "channel": room}, "payload": {"html": html}}
    client = redis_sync.Redis.from_url(url)
    try:
        assert client.publish("chatbot/publish", json.dumps(payload)) == 1
    finally:
        client.close()


def start_bots(redis_url: str, **env) -> ServiceProcess:
    settings = {"REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "BOTS_RETRY_BASE_SECONDS": "0.05", **env}
    return ServiceProcess("channels-bots", free_port(), settings).start(ready=True)


def exited_cleanly(code: int | None) -> bool:
    # serve() turns uvicorn's re-raised signal into a normal exit.
    return code == 0


@pytest.fixture
def bots_process():
    started: list[ServiceProcess] = []

    def start(redis_url: str, **env) -> ServiceProcess:
        started.append(start_bots(redis_url, **env))
        return started[-1]

    yield start
    for service in started:
        if service.process and service.process.poll() is None:
            service.kill()


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
def test_sigterm_finishes_in_flight_and_queued_sends(redis_url, homeserver, bots_process):
    homeserver.add_bot(TOKEN, ROOM)
    homeserver.send_delay = 0.5
    bots = bots_process(redis_url, SHUTDOWN_GRACE_SECONDS="20")
    for i in range(3):
        publish(redis_url, homeserver.url, f"<p>message {i}</p>")
    wait_for(lambda: homeserver.count("send") >= 1, 10, what="first send in flight")
    bots.signal(signal.SIGTERM)
    code = bots.process.wait(30)
    assert exited_cleanly(code), bots.logs()[-2000:]
    assert homeserver.bodies(ROOM) == ["message 0", "message 1", "message 2"]
    assert '"abandoned": 0' in bots.logs()


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
def test_sigterm_gives_up_on_sends_that_outlast_the_grace_period(redis_url, homeserver, bots_process):
    homeserver.add_bot(TOKEN, ROOM)
    # A homeserver that does not answer for far longer than the grace period.
    homeserver.fail("send", *[homeserver.answer(200, {"event_id": "$late"}, delay=60)] * 2)
    bots = bots_process(redis_url, SHUTDOWN_GRACE_SECONDS="1")
    publish(redis_url, homeserver.url, "<p>stuck</p>")
    publish(redis_url, homeserver.url, "<p>queued behind it</p>")
    wait_for(lambda: homeserver.count("send") >= 1, 10, what="send in flight")
    bots.signal(signal.SIGTERM)
    try:
        code = bots.process.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("the service did not exit after its grace period:\n" + bots.logs()[-2000:])
    assert exited_cleanly(code)
    logs = bots.logs()
    assert "shutdown: messages not delivered" in logs and '"count": 2' in logs
    assert TOKEN not in logs


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
def test_survives_a_redis_outage_and_delivers_afterwards(private_redis, homeserver, bots_process):
    homeserver.add_bot(TOKEN, ROOM)
    bots = bots_process(private_redis.url)
    assert httpx.get(bots.url + "/readyz").json() == {"ready": True, "redis": True, "claims": True, "pending": 0}
    publish(private_redis.url, homeserver.url, "<p>before</p>")
    wait_for(lambda: homeserver.bodies(ROOM) == ["before"], 10, what="first message")

    private_redis.kill()
    wait_for(lambda: httpx.get(bots.url + "/readyz").status_code == 503, 20, what="readiness down")
    wait_for(lambda: httpx.get(bots.url + "/readyz").json()["claims"] is False, 20, what="claims seen down")
    assert httpx.get(bots.url + "/healthz").status_code == 200
    down = bots.metrics()
    assert down["bots_ready"] == down["bots_redis_subscription_live"] == 0
    private_redis.start()
    bots.wait_http("/readyz", 30)
    up = bots.metrics()
    assert up["bots_ready"] == up["bots_redis_subscription_live"] == 1
    assert up["bots_redis_reconnects_total"] == 1

    publish(private_redis.url, homeserver.url, "<p>after</p>")
    wait_for(lambda: homeserver.bodies(ROOM) == ["before", "after"], 10, what="message after the outage")
    assert bots.process.poll() is None


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
def test_idle_clients_are_closed_by_the_sweeper(redis_url, homeserver, bots_process):
    homeserver.add_bot(TOKEN, ROOM)
    bots = bots_process(redis_url, BOTS_CLIENT_IDLE_SECONDS="1")
    publish(redis_url, homeserver.url, "<p>hello</p>")
    wait_for(lambda: homeserver.bodies(ROOM) == ["hello"], 10, what="the message")
    wait_for(
        lambda: bots.metrics().get('bots_clients_evicted_total{cause="idle"}') == 1,
        10, what="the idle client to be swept",
    )
    metrics = bots.metrics()
    assert metrics["bots_cached_clients"] == 0 and metrics["bots_open_clients"] == 0


@pytest.mark.slow
def test_not_ready_while_claims_cannot_be_made(redis_url, homeserver, bots_process):
    """A Redis that takes the subscription but refuses scripts (an ACL
    without EVALSHA, say): the bridge could not claim a room, so not ready."""
    client = redis_sync.Redis.from_url(redis_url)
    user = "bots-no-scripts"
    client.acl_setuser(user, enabled=True, passwords=["+pw"], commands=["+@all", "-evalsha", "-eval"],
                       keys=["*"], channels=["*"])
    try:
        parts = redis_url.split("://", 1)[1].split("/", 1)
        limited = f"redis://{user}:pw@{parts[0].split('@')[-1]}/{parts[1] if len(parts) > 1 else '0'}"
        bots = ServiceProcess("channels-bots", free_port(), {"REDIS_URL": limited, "LOG_LEVEL": "INFO"}).start()
        try:
            wait_for(lambda: httpx.get(bots.url + "/readyz").json().get("redis") is True, 20, what="subscribed")
            answer = httpx.get(bots.url + "/readyz")
            assert answer.status_code == 503 and answer.json()["claims"] is False
        finally:
            bots.stop()
    finally:
        client.acl_deluser(user)
        client.close()
