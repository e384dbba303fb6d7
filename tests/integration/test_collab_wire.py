"""The collab service on the wire, byte by byte: exact protocol answers, and
hostile input (bad names, oversized, truncated and random frames, pre-auth
floods, silence) against a real process with a real Rails stand-in."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time

import httpx
import pytest
from channels_collab import protocol as p
from channels_common import wsframe
from pycrdt import Doc, Text
from websockets.exceptions import ConnectionClosed

from tests.integration.collab_helpers import Provider, RawClient, start_collab, token
from tests.support import wait_for

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow

# Keys of its own in the session's Redis: no draft of another module's documents.
PREFIX = "t-wire:"
_ids = itertools.count(random.Random(__name__).randint(10, 90) * 100_000)  # seeded: reruns see the same names


def doc_name() -> str:
    return f"comment-{next(_ids)}-body"


@pytest.fixture(scope="module")
def collab(rails, redis_url):
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, COLLAB_MAX_FRAME_BYTES=str(1024 * 1024))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def short(rails, redis_url):
    """A service with a 2 s timeout, for the deadlines."""
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, COLLAB_TIMEOUT_MS="2000")
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
        "", "comment", "comment-", "unknown-1", "comment-1--2", "comment-1;drop", "../comment-1",
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
                frame = rng.randbytes(rng.randrange(1, 64))
            elif kind == 1:  # a valid address, then noise
                frame = p.var_string(name) + rng.randbytes(rng.randrange(1, 32))
            else:  # a valid header, then noise
                frame = p.header(name, rng.choice(list(p.MessageType))) + rng.randbytes(rng.randrange(0, 32))
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


def test_pre_auth_message_flood_pauses_reading_instead_of_closing(collab, connect, rails):
    name = doc_name()
    client = connect()
    # Rails takes 3 s for user 504 (past the 1 s auth timeout): everything
    # after the token waits, and past 1,000 messages the socket is not read.
    client.send(p.encode_token(name, "504,slow"))
    frame = p.encode_awareness(name, b"\x00")
    for _ in range(1001):
        client.send(frame)
    assert authenticate_reply(client, name).kind == p.AuthType.PERMISSION_DENIED
    wait_for(lambda: "pre-auth limits reached; reading paused" in collab.logs(), 5, what="pause log line")
    # Not closed: once the auth is answered, reading resumes and the same
    # socket serves a document it may open.
    good = doc_name()
    assert authenticate(client, good, token("1")).kind == p.AuthType.AUTHENTICATED
    assert not client.closed.is_set()


def authenticate_reply(client: RawClient, name: str) -> p.Message:
    return client.recv_until(lambda m: isinstance(m, p.AuthReply) and m.address == name)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_pre_auth_byte_flood_leaves_memory_flat(short, connect):
    """One unauthenticated socket pushing 24 MB at a document whose auth
    hangs: the server stops reading at 5 MiB, holds no more, and closes the
    socket at its deadline."""
    pid = short.process.pid
    # Warm up: one document through its whole life, so the baseline counts
    # what every socket costs.
    warm = connect(short)
    assert authenticate(warm, doc_name(), token("1")).kind == p.AuthType.AUTHENTICATED
    warm.close()
    before = _rss_bytes(pid)
    client = connect(short)
    name = doc_name()
    client.send(p.encode_token(name, "504,slow"))
    big = p.encode_sync(name, p.SyncStep.UPDATE, b"\x00" * (1000 * 1000))
    peak = before

    def flood():
        with contextlib.suppress(ConnectionClosed, OSError):
            for _ in range(24):
                client.send(big)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    while not client.closed.is_set():
        peak = max(peak, _rss_bytes(pid))
        client.closed.wait(0.05)
    assert client.close_code == 4408
    assert peak - before < 16 * 1024 * 1024, f"server grew {(peak - before) >> 20} MiB"


@pytest.fixture(scope="module")
def patient(rails, redis_url):
    """A service with the default 10 s auth timeout, for bursts of auths."""
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, COLLAB_AUTH_TIMEOUT_SECONDS="10")
    yield service
    service.stop()


def test_five_hundred_pending_documents_on_one_socket_all_authenticate(patient, connect):
    client = connect(patient)
    names = [doc_name() for _ in range(500)]
    for name in names:
        client.send(p.encode_token(name, token("1")))
        client.send(p.encode_sync(name, p.SyncStep.STEP1, b"\x00"))
    answered = set()
    while len(answered) < len(names):
        reply = client.recv_until(lambda m: isinstance(m, p.AuthReply), timeout=30)
        assert reply.kind == p.AuthType.AUTHENTICATED, reply
        answered.add(reply.address)
    assert answered == set(names) and not client.closed.is_set()
    assert "pre-auth limits reached; reading paused" in patient.logs()


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v3", "v4"])
def test_five_hundred_documents_over_one_real_provider_socket_all_sync(patient, version):
    tab = Provider(version, f"ws://127.0.0.1:{patient.port}")
    try:
        names = [doc_name() for _ in range(500)]
        for name in names:
            tab.attach(name, token("1"))
        for name in names:
            tab.synced(name, timeout=60)
        assert not [e for e in tab.events if e["event"] in ("close", "disconnect", "denied")]
    finally:
        tab.close()


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


def test_quiet_socket_that_answers_pings_is_kept(short, connect):
    client = connect(short)  # the websockets client answers pings by itself
    authenticate(client, doc_name(), token("1"))
    assert not client.closed.wait(6.5)  # over three timeout periods of silence


def test_a_peer_that_stops_answering_pings_is_closed_with_4408(short):
    """A raw TCP client: after the handshake and one auth it neither reads
    nor answers anything, as a vanished peer behind a live NAT would."""
    sock = socket.create_connection(("127.0.0.1", short.port), timeout=10)
    with sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 101")
        received = received.partition(b"\r\n\r\n")[2]
        payload = p.encode_token(doc_name(), token("1"))
        key = os.urandom(4)
        sock.sendall(bytes([0x82, 0x80 | len(payload)]) + key + wsframe.unmask(payload, key))
        # From here on it answers nothing; read until the server's close frame.
        deadline = time.monotonic() + 10
        while b"\x88" not in received[-64:] and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert b"\x89\x00" in received  # it was pinged
    assert wsframe.close_frame(4408, "Connection Timeout") in received
    wait_for(lambda: short.metrics().get('collab_closes_total{code="4408"}', 0) >= 1, 5, what="close metric")
    assert "did not answer a ping" in short.logs()


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


def test_real_providers_stay_connected_through_long_silence(short):
    """With a 2 s timeout and no edits for over three periods, neither a v3
    provider (its awareness renews only every 15 s) nor a v4 one is closed:
    both answer the websocket pings on their own."""
    url = f"ws://127.0.0.1:{short.port}"
    v3, v4 = Provider("v3", url), Provider("v4", url)
    try:
        for tab in (v3, v4):
            name = doc_name()
            tab.attach(name, token("1"))
            tab.synced(name)
        time.sleep(6.5)
        for tab in (v3, v4):
            assert not [e for e in tab.events if e["event"] in ("close", "disconnect")], tab.version
        assert 9 in [e["type"] for e in v4.events if e["event"] == "frame" and e["doc"] is None]
    finally:
        v3.close()
        v4.close()


@pytest.mark.parametrize("version", ["v3", "v4"])
def test_rails_hanging_past_the_connection_deadline_gives_authentication_failed(rails, redis_url, version):
    """Rails answers user 504 after 3 s; the socket's deadline is 2 s and the
    configured auth timeout (10 s) is cut to it: the provider hears
    authenticationFailed, with the usual wire reason."""
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, COLLAB_TIMEOUT_MS="2000", COLLAB_AUTH_TIMEOUT_SECONDS="10")
    tab = Provider(version, f"ws://127.0.0.1:{service.port}")
    try:
        name = doc_name()
        tab.attach(name, "504,slow")
        assert tab.denied(name, timeout=10)["reason"] == "permission-denied"
        assert "timed out" in service.logs() or "did not finish before the connection deadline" in service.logs()
    finally:
        tab.close()
        service.stop()
