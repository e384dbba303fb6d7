"""The records service as a real process, against real Redis, with the real
socket.io-client 4.8 (Node) and python-socketio's AsyncClient."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import socketio

from tests.integration.records_support import APP_ORIGIN, Rails, SioClients, start_records
from tests.support import wait_for

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(redis_url):
    svc = start_records(redis_url)
    yield svc
    svc.stop()


@pytest.fixture
def rails(redis_url):
    r = Rails(redis_url)
    yield r
    r.close()


@pytest.fixture
def clients_factory(service):
    made = []

    def make(clients, **config):
        c = SioClients(service.url, clients, **config)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def records_rooms(events):
    return [args[0]["room"] for args in events]


def test_rooms_isolation_unknown_tokens_and_notices(service, rails, clients_factory):
    rails.token("tok-alice", 1, [10, 11])
    rails.token("tok-bob", 2, [11])
    rails.token("tok-visitor", None, [])
    c = clients_factory([
        {"name": "alice", "token": "tok-alice"},
        {"name": "bob", "token": "tok-bob", "transports": ["websocket"]},
        {"name": "visitor", "token": "tok-visitor"},
        {"name": "unknown", "token": "no-such-token"},
        {"name": "anonymous"},
    ])
    names = ["alice", "bob", "visitor", "unknown", "anonymous"]
    c.wait_connected(names)
    for room in ["group-10", "group-11", "user-1", "user-2", "group-99", "user-3"]:
        rails.records(room, {"discussions": [{"id": 1, "room": room}]})
    rails.notice({"type": "maintenance", "message": "soon"})
    for name in names:
        c.wait_events(name, 1, "notice")
    c.wait_events("alice", 3, "records")
    c.wait_events("bob", 2, "records")
    time.sleep(0.3)  # anything misrouted would have arrived by now
    assert records_rooms(c.events("alice", "records")) == ["group-10", "group-11", "user-1"]
    assert records_rooms(c.events("bob", "records")) == ["group-11", "user-2"]
    for name in ["visitor", "unknown", "anonymous"]:
        assert c.events(name, "records") == []
    # The whole {room, records} object is the single argument.
    first = c.events("alice", "records")[0][0]
    assert first == {"room": "group-10", "records": {"discussions": [{"id": 1, "room": "group-10"}]}}
    for name in names:
        assert c.events(name, "notice")[0][0] == {"type": "maintenance", "message": "soon"}
    logs = service.logs()
    assert "tok-alice" not in logs and "Jane Secretname" not in logs


def test_polling_only_and_upgraded_clients(service, rails, clients_factory):
    rails.token("tok-poll", 5, [50])
    c = clients_factory([
        {"name": "poll", "token": "tok-poll", "transports": ["polling"]},
        {"name": "upgrade", "token": "tok-poll", "transports": ["polling", "websocket"]},
        {"name": "ws", "token": "tok-poll", "transports": ["websocket"]},
    ])
    c.wait_connected(["poll", "upgrade", "ws"])
    assert c.of("poll", "connect")[0]["transport"] == "polling"
    assert c.of("ws", "connect")[0]["transport"] == "websocket"
    assert c.of("upgrade", "open")[0]["transport"] == "polling"
    c.wait(lambda _: c.of("upgrade", "upgrade"), 10, "upgrade to websocket")
    for i in range(20):
        rails.records("group-50", {"n": i})
    for name in ["poll", "upgrade", "ws"]:
        got = c.wait_events(name, 20, "records")
        assert [a[0]["records"]["n"] for a in got] == list(range(20))


def test_allowed_and_refused_origins(service, rails, clients_factory):
    rails.token("tok-o", 6, [60])
    c = clients_factory([
        {"name": "good-poll", "token": "tok-o", "transports": ["polling"], "origin": APP_ORIGIN},
        {"name": "good-ws", "token": "tok-o", "transports": ["websocket"], "origin": APP_ORIGIN},
        {"name": "bad-poll", "token": "tok-o", "transports": ["polling"], "origin": "https://evil.test"},
        {"name": "bad-ws", "token": "tok-o", "transports": ["websocket"], "origin": "https://evil.test"},
    ])
    c.wait_connected(["good-poll", "good-ws"])
    c.wait(lambda _: c.of("bad-poll", "connect_error") and c.of("bad-ws", "connect_error"), 10, "refusals")
    assert c.of("bad-poll", "connect") == [] and c.of("bad-ws", "connect") == []
    # CORS headers: exactly the app origin, with credentials.
    r = httpx.get(service.url + "/socket.io/?EIO=4&transport=polling", headers={"Origin": APP_ORIGIN})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    r = httpx.get(service.url + "/socket.io/?EIO=4&transport=polling", headers={"Origin": "https://evil.test"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_malformed_payloads_are_dropped_and_a_valid_one_follows(service, rails, clients_factory):
    rails.token("tok-m", 7, [70])
    c = clients_factory([{"name": "m", "token": "tok-m"}])
    c.wait_connected(["m"])
    bad = [
        ("/records", b"{not json"),
        ("/records", b"[1, 2, 3]"),
        ("/records", b'"a string"'),
        ("/records", b'{"records": {"no": "room"}}'),
        ("/records", b'{"room": 5, "records": {}}'),
        ("/records", b'{"room": "group-70", "records": NaN}'),
        ("/records", b"\xff\xfe not utf8"),
        ("/system_notice", b"not json either"),
    ]
    for channel, data in bad:
        rails.raw(channel, data)
    rails.records("group-70", {"ok": True})
    rails.notice({"after": "bad"})
    c.wait_events("m", 1, "records")
    c.wait_events("m", 1, "notice")
    assert [a[0] for a in c.events("m", "records")] == [{"room": "group-70", "records": {"ok": True}}]
    assert [a[0] for a in c.events("m", "notice")] == [{"after": "bad"}]
    logs = service.logs()
    for reason in ["not_json", "not_object", "no_room", "not_utf8"]:
        assert f'"reason": "{reason}"' in logs
    assert "{not json" not in logs  # the body is never logged
    metrics = service.metrics()
    assert metrics['records_messages_dropped_total{reason="not_json"}'] >= 3


async def test_python_socketio_client(service, rails):
    rails.token("tok-py", 8, [80])
    client = socketio.AsyncClient(reconnection=False)
    got = []
    done = __import__("asyncio").Event()

    @client.on("records")
    async def on_records(data, *rest):
        got.append(data)
        done.set()

    await client.connect(service.url + "?channel_token=tok-py", transports=["websocket"])
    try:
        rails.records("user-8", {"hello": "python"})
        await __import__("asyncio").wait_for(done.wait(), 10)
        assert got == [{"room": "user-8", "records": {"hello": "python"}}]
    finally:
        await client.disconnect()


def test_health_ready_metrics(service):
    assert httpx.get(service.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(service.url + "/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    m = service.metrics()
    assert "records_connected_sockets" in m
    assert any(k.startswith("records_deliveries") for k in m)


def test_hostile_packets_leave_the_service_and_other_clients_alone(service, rails, clients_factory):
    from tests.integration.records_support import RawWebSocket

    rails.token("tok-h", 9, [90])
    c = clients_factory([{"name": "ok", "token": "tok-h", "transports": ["websocket"]}])
    c.wait_connected(["ok"])
    garbage = [
        "", "x", "9", "4", "40{not json", "42[", '42["records"', "40/admin,", '40{"pid": 5, "offset": []}',
        '40{"pid": "' + "p" * 5000 + '"}', "45-[]", '42["records", {"room": "group-90"}]',
        "4" + "[" * 5000 + "]" * 5000, "4" + "x" * 100_000,
    ]
    for g in garbage:
        raw = RawWebSocket(service.port, "/socket.io/?EIO=4&transport=websocket&channel_token=tok-h")
        raw.send_text("40")
        raw.send_text(g)
        raw.drain_until_eof(0.3)  # give the server the chance to answer before we hang up
        raw.close()
    # Polling with garbage bodies and bogus sessions.
    base = service.url + "/socket.io/?EIO=4&transport=polling"
    assert httpx.post(base + "&sid=nope", content=b"40").status_code == 400
    assert httpx.get(base + "&sid=nope").status_code == 400
    sid = json.loads(httpx.get(base).text[1:])["sid"]
    httpx.post(base + f"&sid={sid}", content=b"\x1e\x1e4\x1e")
    rails.records("group-90", {"still": "fine"})
    assert [a[0] for a in c.wait_events("ok", 1, "records")] == [{"room": "group-90", "records": {"still": "fine"}}]
    assert c.of("ok", "disconnect") == []
    assert httpx.get(service.url + "/healthz").status_code == 200
    assert service.process.poll() is None
    wait_for(lambda: "malformed packet from client, connection closed" in service.logs(), 10, what="warning")
    logs = service.logs()
    assert "malformed request from client, rejected" in logs
    assert "malformed engine.io packet from client, connection closed" in logs
    assert "Exception in ASGI application" not in logs
