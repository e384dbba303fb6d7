"""The collab service on the wire, byte by byte: exact protocol answers, and
hostile input (bad names, oversized, truncated and random frames, pre-auth
floods, silence) against a real process with a real Rails stand-in."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time

import httpx
import pytest
from channels_collab import protocol as p
from pycrdt import Doc, Text
from websockets.exceptions import ConnectionClosed

from tests.integration.collab_helpers import Provider, RailsStandIn, RawClient, start_collab, token
from tests.support import wait_for

_ids = itertools.count(random.randint(10, 90) * 100_000)


def doc_name() -> str:
    return f"comment-{next(_ids)}-body"


@pytest.fixture(scope="module")
def rails():
    server = RailsStandIn().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def collab(rails, redis_url):
    service = start_collab(rails.url, redis_url, COLLAB_MAX_FRAME_BYTES=str(1024 * 1024))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def short(rails, redis_url):
    """A service with a 2 s timeout, for the deadlines."""
    service = start_collab(rails.url, redis_url, COLLAB_TIMEOUT_MS="2000")
    yield service
    service.stop()


@pytest.fixture
def connect(collab):
    opened = []

    def open_client(service=None) -> RawClient:
        client = RawClient(f"ws://127.0.0.1:{(service or collab).port}", max_size=None)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def authenticate(client: RawClient, name: str, tok: str, version: str | None = None) -> p.Message:
    client.send(p.encode_token(name, tok, version))
    return client.recv_until(lambda m: isinstance(m, p.AuthReply) and m.address == name)


def update_with(text: str) -> bytes:
    doc = Doc()
    doc["body"] = Text(text)
    return doc.get_update()


def assert_still_serving(collab, connect):
    assert httpx.get(collab.url + "/healthz").status_code == 200
    client = connect()
    name = doc_name()
    assert authenticate(client, name, token("1")).kind == p.AuthType.AUTHENTICATED


# ---------------------------------------------------------------- protocol


def test_sync_handshake_acks_and_relay(connect):
    name = doc_name()
    a, b = connect(), connect()
    assert authenticate(a, name, token("1")) == p.AuthReply(name, p.AuthType.AUTHENTICATED, "read-write")
    authenticate(b, name, token("2"))

    # SyncStep1 is answered with SyncStep2, then the server's own SyncStep1.
    a.send(p.encode_sync(name, p.SyncStep.STEP1, b"\x00"))
    first = a.recv_until(lambda m: isinstance(m, p.Sync))
    second = a.recv_until(lambda m: isinstance(m, p.Sync))
    assert (first.step, second.step) == (p.SyncStep.STEP2, p.SyncStep.STEP1)

    # SyncReply: a SyncStep1 that must not trigger another SyncStep1.
    a.send(p.encode_sync(name, p.SyncStep.STEP1, b"\x00", reply=True))
    assert a.recv_until(lambda m: isinstance(m, p.Sync)).step == p.SyncStep.STEP2
    assert not [m for m in a.drain(0.3) if isinstance(m, p.Sync)]

    # An update is acknowledged to its sender and relayed to the other peer.
    update = update_with("hi")
    a.send(p.encode_sync(name, p.SyncStep.UPDATE, update))
    assert a.recv_until(lambda m: isinstance(m, p.SyncStatus)) == p.SyncStatus(name, True)
    relayed = b.recv_until(lambda m: isinstance(m, p.Sync))
    assert relayed.step == p.SyncStep.UPDATE
    replica = Doc()
    replica.apply_update(relayed.payload)
    assert str(replica.get("body", type=Text)) == "hi"
    # The sender does not get its own update back.
    assert not [m for m in a.drain(0.2) if isinstance(m, p.Sync)]


def test_awareness_query_and_removal_on_leave(connect):
    name = doc_name()
    a, b = connect(), connect()
    authenticate(a, name, token("1"))
    authenticate(b, name, token("2"))
    state = b"\x01" + p.var_uint(4242) + b"\x01" + p.var_string('{"user":"ann"}')
    a.send(p.encode_awareness(name, state))
    seen = b.recv_until(lambda m: isinstance(m, p.Awareness))
    assert p.decode_awareness_update(seen.update)[0].state == {"user": "ann"}

    b.send(p.encode_query_awareness(name))
    answer = b.recv_until(lambda m: isinstance(m, p.Awareness))
    assert [e.client_id for e in p.decode_awareness_update(answer.update)] == [4242]

    a.close()
    gone = b.recv_until(lambda m: isinstance(m, p.Awareness))
    assert p.decode_awareness_update(gone.update)[0].state is None


def test_stateless_is_not_broadcast_and_broadcast_stateless_is_refused(connect):
    name = doc_name()
    a, b = connect(), connect()
    authenticate(a, name, token("1"))
    authenticate(b, name, token("2"))
    a.send(p.encode_stateless(name, "hello"))
    a.send(p.header(name, p.MessageType.BROADCAST_STATELESS) + p.var_string("to everyone"))
    closed = a.recv_until(lambda m: isinstance(m, p.Close))
    assert "BroadcastStateless" in closed.reason
    assert not [m for m in b.drain(0.3) if isinstance(m, (p.Stateless, p.BroadcastStateless))]
    # The socket itself stays open: the refusal ends that document only.
    other = doc_name()
    assert authenticate(a, other, token("1")).kind == p.AuthType.AUTHENTICATED


def test_connection_ping_is_answered(connect):
    client = connect()
    client.send(p.PING_FRAME)
    assert client.recv() == p.PONG_FRAME


def test_denied_client_gets_not_one_byte_of_the_document(connect):
    name = doc_name()
    owner = connect()
    authenticate(owner, name, token("1"))
    owner.send(p.encode_sync(name, p.SyncStep.UPDATE, update_with("secret")))
    owner.recv_until(lambda m: isinstance(m, p.SyncStatus))
    owner.send(p.encode_awareness(name, b"\x01" + p.var_uint(77) + b"\x01" + p.var_string('{"user":"o"}')))

    intruder = connect()
    intruder.send(p.encode_token(name, token("3")))
    intruder.send(p.encode_sync(name, p.SyncStep.STEP1, b"\x00"))
    intruder.send(p.encode_query_awareness(name))
    frames = intruder.drain(1.0)
    assert frames == [p.AuthReply(name, p.AuthType.PERMISSION_DENIED, "permission-denied")]


def test_a_later_token_may_retry(connect):
    name = f"comment-new-2-{next(_ids)}"
    client = connect()
    assert authenticate(client, name, token("1")).kind == p.AuthType.PERMISSION_DENIED
    assert authenticate(client, name, token("2")).kind == p.AuthType.AUTHENTICATED


# ---------------------------------------------------------- hostile input


def test_invalid_names_never_reach_rails(connect, rails):
    bad = [
        "", "comment", "comment-", "unknown-1", "comment-1-2-3-4", "comment-1;drop", "../comment-1",
        "comment-1 ", "comment-1\n", "comment-\u0661", "comment-" + "1" * 200, "Comment-1", "comment--1",
    ]
    client = connect()
    for name in bad:
        assert authenticate(client, name, token("1")).kind == p.AuthType.PERMISSION_DENIED, name
    asked = set(rails.names_asked())
    assert not asked & set(bad)
    # Frames other than auth for a refused name are dropped, the socket lives.
    client.send(p.encode_sync("unknown-1", p.SyncStep.STEP1, b"\x00"))
    good = doc_name()
    assert authenticate(client, good, token("1")).kind == p.AuthType.AUTHENTICATED
    assert good in rails.names_asked()


def test_oversized_frame_closes_with_1009(collab, connect):
    client = connect()
    client.send(p.encode_sync(doc_name(), p.SyncStep.UPDATE, b"\x00" * (1024 * 1024 + 10)))
    assert client.wait_closed() == 1009
    assert_still_serving(collab, connect)


@pytest.mark.parametrize("cut", [1, 3, 10, -1])
def test_truncated_frame_closes_that_socket(collab, connect, cut):
    name = doc_name()
    bystander = connect()
    authenticate(bystander, name, token("2"))
    frame = p.encode_token(name, token("1"))
    client = connect()
    client.send(frame[:cut])
    assert client.wait_closed() == 1002
    # Other sockets and the process carry on.
    bystander.send(p.encode_sync(name, p.SyncStep.UPDATE, update_with("x")))
    assert bystander.recv_until(lambda m: isinstance(m, p.SyncStatus)).applied
    assert "malformed frame" in collab.logs()


def test_undecodable_update_closes_that_socket(collab, connect):
    name = doc_name()
    client = connect()
    authenticate(client, name, token("1"))
    client.send(p.encode_sync(name, p.SyncStep.UPDATE, b"\xff\xff\xff\x01garbage"))
    assert client.wait_closed() == 1002
    assert_still_serving(collab, connect)


def test_random_frames_never_take_the_process_down(collab, connect):
    rng = random.Random(4)
    name = doc_name()
    for round_ in range(6):
        client = connect()
        if round_ % 2:
            authenticate(client, name, token("1"))
        for _ in range(40):
            if client.closed.is_set():
                break
            kind = rng.randrange(3)
            if kind == 0:
                frame = os.urandom(rng.randrange(1, 64))
            elif kind == 1:  # a valid address, then noise
                frame = p.var_string(name) + os.urandom(rng.randrange(1, 32))
            else:  # a valid header, then noise
                frame = p.header(name, rng.choice(list(p.MessageType))) + os.urandom(rng.randrange(0, 32))
            try:
                client.send(frame)
            except ConnectionClosed:
                break
        client.close()
    assert_still_serving(collab, connect)
    assert collab.process.poll() is None


def test_text_frames_are_refused(connect):
    client = connect()
    client.ws.send("hello")
    assert client.wait_closed() == 1003


def test_pre_auth_message_flood_is_bounded(collab, connect, rails):
    name = doc_name()
    client = connect()
    # Rails takes 3 s for user 504, so everything after the token is queued.
    client.send(p.encode_token(name, "504,slow"))
    frame = p.encode_awareness(name, b"\x00")
    for _ in range(1001):
        client.send(frame)
    assert client.wait_closed() == 4205
    assert "pre-auth queue limit exceeded" in collab.logs()


def test_pre_auth_byte_flood_is_bounded(connect):
    client = connect()
    name = doc_name()
    client.send(p.encode_token(name, "504,slow"))
    big = p.encode_sync(name, p.SyncStep.UPDATE, b"\x00" * (1000 * 1000))
    for _ in range(6):
        client.send(big)
    assert client.wait_closed() == 4205


def test_too_many_pending_documents_close_the_socket(connect):
    client = connect()
    for _ in range(101):
        client.send(p.encode_sync(doc_name(), p.SyncStep.STEP1, b"\x00"))
    assert client.wait_closed() == 4205


def test_socket_that_never_authenticates_is_closed_at_a_deadline(short, connect):
    client = connect(short)
    name = doc_name()
    # Traffic does not extend the pre-auth deadline.
    for _ in range(25):
        if client.closed.is_set():
            break
        with contextlib.suppress(ConnectionClosed):  # the close may come at any moment
            client.send(p.encode_sync(name, p.SyncStep.STEP1, b"\x00"))
        client.closed.wait(0.2)
    assert client.wait_closed() == 4408


def test_idle_authenticated_socket_is_closed_with_4408(short, connect):
    client = connect(short)
    authenticate(client, doc_name(), token("1"))
    assert client.wait_closed() == 4408
    wait_for(lambda: short.metrics().get('collab_closes_total{code="4408"}', 0) >= 1, 5, what="close metric")


def test_v4_socket_is_pinged_and_kept_while_it_answers(short, connect):
    client = connect(short)
    authenticate(client, doc_name(), token("1"), version="4.8.0")
    pings = 0
    for _ in range(3):  # past twice the timeout
        frame = client.recv(timeout=4)
        if frame == p.PING_FRAME:
            pings += 1
            client.send(p.PONG_FRAME)
    assert pings >= 2
    assert not client.closed.is_set()


def test_real_providers_and_the_idle_timeout(short):
    """With a 2 s timeout and no edits: a v4 provider answers the server's
    Pings and keeps its socket; a v3 provider (never pinged, its awareness
    renews only every 15 s) is closed with 4408 and reconnects."""
    url = f"ws://127.0.0.1:{short.port}"
    v3, v4 = Provider("v3", url), Provider("v4", url)
    try:
        for tab in (v3, v4):
            tab.attach(doc_name(), token("1"))
        closed = v3.wait(lambda e: e["event"] == "close" and e["code"] == 4408, timeout=10, what="v3 closed 4408")
        v3.wait(lambda e: e["event"] == "synced", since=v3.events.index(closed), what="v3 resynced")
        time.sleep(2.5)  # v4 has now gone without edits for over twice the timeout
        assert not [e for e in v4.events if e["event"] == "close"]
        assert 9 in [e["type"] for e in v4.events if e["event"] == "frame" and e["doc"] is None]
    finally:
        v3.close()
        v4.close()
