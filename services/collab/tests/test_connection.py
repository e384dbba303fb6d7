"""One socket's logic with a fake transport and authenticator on top of the
real document registry (real pycrdt documents)."""

import asyncio
import itertools
from types import SimpleNamespace

import pytest
from channels_collab import protocol as p
from channels_collab.connection import PAUSED_FOR_AUTH, Connection, Limits
from channels_collab.documents import DocumentRegistry
from channels_collab.rails import Decision
from channels_collab.store import DraftStore
from pycrdt import Doc, Text

from tests.support import FakeClock, settle

NAME = "comment-1-body"


class Transport:
    def __init__(self):
        self.frames: list[bytes] = []
        self.closed_with = None
        self.paused: set[str] = set()

    def send(self, frame):
        if self.closed_with is None:
            self.frames.append(frame)

    def close(self, code, reason):
        self.closed_with = self.closed_with or code

    def pause_reading(self, reason):
        self.paused.add(reason)

    def resume_reading(self, reason):
        self.paused.discard(reason)

    def messages(self):
        return [p.decode(f) for f in self.frames]


class Auth:
    """Decides per token; `gate` holds every decision until set."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked = []

    async def authenticate(self, token, name, caller=None):
        self.asked.append(name)
        await self.gate.wait()
        if token == "ro":
            return Decision(True, scope="readonly")
        return Decision(token == "ok", detail="test")


@pytest.fixture
def world():
    clock = FakeClock(100.0)
    timers = []
    registry = DocumentRegistry(
        DraftStore(100, 3600, clock=clock),
        debounce_seconds=5,
        max_debounce_seconds=30,
        call_later=lambda delay, cb: timers.append((clock.now + delay, cb)) or _Handle(),
        clock=clock,
    )
    auth = Auth()

    def connect(**limits):
        transport = Transport()
        conn = Connection(transport, registry, auth, Limits(timeout_seconds=30, **limits), clock=clock)
        return conn, transport

    return SimpleNamespace(registry=registry, auth=auth, clock=clock, timers=timers, connect=connect)


class _Handle:
    def cancel(self):
        pass


def update_with(text):
    doc = Doc()
    doc["body"] = Text(text)
    return doc.get_update()


async def test_queued_frames_run_after_authenticated_in_order(world):
    conn, t = world.connect()
    world.auth.gate.clear()
    conn.receive(p.encode_token(NAME, "ok"))
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("hi")))
    await settle(5)
    assert t.frames == [] and conn.queued_messages == 2
    world.auth.gate.set()
    await settle(5)
    kinds = [(type(m).__name__, getattr(m, "step", None)) for m in t.messages()]
    assert kinds == [
        ("AuthReply", None),
        ("Sync", p.SyncStep.STEP2),
        ("Sync", p.SyncStep.STEP1),
        ("SyncStatus", None),
    ]
    assert conn.queued_messages == 0 and conn.queued_bytes == 0
    assert str(world.registry.docs[NAME].ydoc.get("body", type=Text)) == "hi"


async def test_denied_document_gets_nothing_and_is_not_loaded(world):
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "no"))
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
    await settle(5)
    assert t.messages() == [p.AuthReply(NAME, p.AuthType.PERMISSION_DENIED, "permission-denied")]
    assert NAME not in world.registry.docs and conn.pending == {}
    # A later token may retry.
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    assert t.messages()[-1].kind == p.AuthType.AUTHENTICATED


async def test_invalid_name_is_refused_without_asking(world):
    conn, t = world.connect()
    conn.receive(p.encode_token("secret-1", "ok"))
    await settle(5)
    assert world.auth.asked == []
    assert t.messages() == [p.AuthReply("secret-1", p.AuthType.PERMISSION_DENIED, "permission-denied")]


async def test_update_is_encoded_once_for_all_peers(world):
    a, ta = world.connect()
    b, tb = world.connect()
    c, tc = world.connect()
    for conn in (a, b, c):
        conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    for t in (ta, tb, tc):
        t.frames.clear()
    a.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("x")))
    assert ta.messages() == [p.SyncStatus(NAME, True)]
    assert tb.frames[0] is tc.frames[0]  # the very same bytes object
    assert p.decode(tb.frames[0]).step == p.SyncStep.UPDATE


async def test_read_only_updates_are_refused_and_not_applied(world):
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "ro"))
    await settle(5)
    assert t.messages()[0] == p.AuthReply(NAME, p.AuthType.AUTHENTICATED, "readonly")
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("x")))
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP2, update_with("y")))
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP2, p.EMPTY_UPDATE))
    statuses = [m.applied for m in t.messages() if isinstance(m, p.SyncStatus)]
    assert statuses == [False, False, True]
    assert world.registry.docs[NAME].state() == p.EMPTY_UPDATE


async def test_pre_auth_message_bound_pauses_reading_until_auth_finishes(world):
    conn, t = world.connect()
    world.auth.gate.clear()
    conn.receive(p.encode_token(NAME, "ok"))
    frame = p.encode_awareness(NAME, b"\x00")
    for _ in range(999):
        conn.receive(frame)
    assert t.paused == set()
    conn.receive(frame)
    assert t.paused == {PAUSED_FOR_AUTH}
    # Frames of a read already under way are kept, never refused.
    conn.receive(frame)
    assert t.closed_with is None and conn.queued_messages == 1001
    world.auth.gate.set()
    await settle(5)
    assert t.paused == set() and t.closed_with is None
    assert conn.queued_messages == 0 and conn.pending == {}
    assert p.AuthReply(NAME, p.AuthType.AUTHENTICATED, "read-write") in t.messages()


async def test_pre_auth_byte_bound_pauses_reading(world):
    conn, t = world.connect(max_queue_bytes=1000)
    world.auth.gate.clear()
    conn.receive(p.encode_token(NAME, "ok"))
    conn.receive(p.encode_awareness(NAME, b"\x00" * 900))
    assert t.paused == set()
    conn.receive(p.encode_awareness(NAME, b"\x00" * 100))
    assert t.paused == {PAUSED_FOR_AUTH} and t.closed_with is None
    world.auth.gate.set()
    await settle(5)
    assert t.paused == set() and conn.queued_bytes == 0


async def test_pending_document_bound_pauses_reading_and_every_document_is_served(world):
    """500 documents on one socket (a shared HocuspocusProviderWebsocket):
    reading stops at 100 pending, resumes as Rails answers, none is refused."""
    conn, t = world.connect()
    world.auth.gate.clear()
    names = [f"comment-{i}-body" for i in range(500)]
    fed = 0
    while fed < len(names) or conn.pending:
        # The socket is read only while the connection is not paused.
        while fed < len(names) and not t.paused:
            conn.receive(p.encode_token(names[fed], "ok"))
            conn.receive(p.encode_sync(names[fed], p.SyncStep.STEP1, b"\x00"))
            fed += 1
        assert len(conn.pending) <= 100
        world.auth.gate.set()
        await settle(5)
        world.auth.gate.clear()
    assert t.closed_with is None and t.paused == set()
    authenticated = {m.address for m in t.messages() if isinstance(m, p.AuthReply)
                     and m.kind == p.AuthType.AUTHENTICATED}
    assert authenticated == set(names)
    step2 = {m.address for m in t.messages() if isinstance(m, p.Sync) and m.step == p.SyncStep.STEP2}
    assert step2 == set(names)


async def test_auth_still_pending_at_the_deadline_is_denied_before_the_close(world):
    conn, t = world.connect()
    world.auth.gate.clear()
    conn.receive(p.encode_token(NAME, "ok"))
    conn.receive(p.encode_sync("comment-2-body", p.SyncStep.STEP1, b"\x00"))  # no token: nothing asked
    await settle(5)
    world.clock.now += 31
    conn.check()
    assert t.messages() == [p.AuthReply(NAME, p.AuthType.PERMISSION_DENIED, "permission-denied")]
    assert t.closed_with == 4408
    world.auth.gate.set()
    await settle(5)
    assert len(t.messages()) == 1 and NAME not in world.registry.docs


async def test_pre_auth_deadline_is_absolute(world):
    conn, t = world.connect()
    for _ in range(7):  # 28 s of steady traffic, timeout 30 s
        world.clock.now += 4
        conn.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
        conn.check()
    assert t.closed_with is None
    world.clock.now += 3
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
    conn.check()  # traffic a moment ago does not help: the deadline counts from open
    assert t.closed_with == 4408


async def test_v4_ping_and_no_idle_close(world):
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "ok", "4.8.0"))
    await settle(5)
    t.frames.clear()
    world.clock.now += 16
    conn.check()
    conn.check()
    assert t.frames == [p.PING_FRAME]  # once per quiet stretch
    conn.receive(p.PONG_FRAME)
    # Liveness is the websocket layer's keep-alive: a quiet socket is never
    # closed here, however long it says nothing.
    world.clock.now += 300
    conn.check()
    assert t.closed_with is None
    assert t.frames == [p.PING_FRAME, p.PING_FRAME]


async def test_no_ping_for_v3_providers(world):
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    t.frames.clear()
    world.clock.now += 20
    conn.check()
    assert t.frames == []


async def test_oversized_and_malformed_frames_close_the_socket(world):
    conn, t = world.connect(max_frame_bytes=100)
    conn.receive(b"\x00" * 101)
    assert t.closed_with == 1009
    conn, t = world.connect()
    conn.receive(b"\x03do")
    assert t.closed_with == 1002
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, b"\xff\xfe garbage"))
    assert t.closed_with == 1002


async def test_close_before_auth_cancels_it(world):
    conn, t = world.connect()
    world.auth.gate.clear()
    conn.receive(p.encode_token(NAME, "ok"))
    conn.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
    conn.receive(p.header(NAME, p.MessageType.CLOSE))
    world.auth.gate.set()
    await settle(5)
    assert t.frames == [] and conn.pending == {} and NAME not in world.registry.docs


async def test_draft_is_stored_on_debounce_and_when_the_last_peer_leaves(world):
    conn, _ = world.connect()
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("draft")))
    assert [due - world.clock.now for due, _ in world.timers] == [5]
    world.clock.now += 5
    world.timers[0][1]()
    assert NAME in world.registry.store

    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("more")))
    conn.receive(p.header(NAME, p.MessageType.CLOSE))
    assert NAME not in world.registry.docs
    again, t2 = world.connect()
    again.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    again.receive(p.encode_sync(NAME, p.SyncStep.STEP1, b"\x00"))
    step2 = next(m for m in t2.messages() if isinstance(m, p.Sync))
    replica = Doc()
    replica.apply_update(step2.payload)
    assert "draft" in str(replica.get("body", type=Text))
    assert "more" in str(replica.get("body", type=Text))


async def test_awareness_removed_when_a_peer_leaves(world):
    a, _ = world.connect()
    b, tb = world.connect()
    a.receive(p.encode_token(NAME, "ok"))
    b.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    a.receive(p.encode_awareness(NAME, b"\x01\x07\x01" + p.var_string('{"user":"a"}')))
    seen = [m for m in tb.messages() if isinstance(m, p.Awareness)]
    assert p.decode_awareness_update(seen[-1].update)[0].state == {"user": "a"}
    a.disconnected()
    gone = [m for m in tb.messages() if isinstance(m, p.Awareness)][-1]
    assert p.decode_awareness_update(gone.update) == [p.AwarenessEntry(7, 1, None)]


async def test_awareness_clients_per_peer_are_bounded(world):
    conn, t = world.connect()
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    many = p.var_uint(20) + b"".join(p.var_uint(i + 1) + b"\x01" + p.var_string("{}") for i in range(20))
    conn.receive(p.encode_awareness(NAME, many))
    assert world.registry.docs[NAME].awareness.states == {}
    assert t.closed_with is None


async def test_store_timer_follows_the_debounce_and_the_max_delay(world):
    conn, _ = world.connect()
    conn.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    saves = []
    original = world.registry.store.put
    world.registry.store.put = lambda name, state: (saves.append(world.clock.now), original(name, state))

    def run_until(end, edit_every=None):
        """Advance the clock second by second, editing and firing due timers."""
        while world.clock.now < end:
            world.clock.now += 1
            if edit_every and world.clock.now % edit_every == 0:
                conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with(str(world.clock.now))))
            for timer in [t for t in world.timers if t[0] <= world.clock.now]:
                world.timers.remove(timer)
                timer[1]()

    start = world.clock.now  # 100
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("a")))
    world.clock.now += 4
    conn.receive(p.encode_sync(NAME, p.SyncStep.UPDATE, update_with("b")))
    run_until(start + 20)
    assert saves == [start + 9]  # 5 s after the last edit, not after the first

    # An edit every 4 s never leaves 5 s of quiet: stored at the 30 s cap anyway.
    begin = world.clock.now
    run_until(begin + 70, edit_every=4)
    first_edit = begin + 4 - begin % 4
    assert saves[1] == first_edit + 30
    # Each later window opens with the first edit after a store (within 4 s).
    assert len(saves) >= 3 and all(b - a <= 34 for a, b in itertools.pairwise(saves[1:]))


@pytest.mark.parametrize("relay", [False, True])
async def test_stateless_is_relayed_only_when_enabled(world, relay):
    a, _ = world.connect(broadcast_stateless=relay)
    b, tb = world.connect(broadcast_stateless=relay)
    a.receive(p.encode_token(NAME, "ok"))
    b.receive(p.encode_token(NAME, "ok"))
    await settle(5)
    tb.frames.clear()
    a.receive(p.encode_stateless(NAME, "ping"))
    assert tb.messages() == ([p.Stateless(NAME, "ping")] if relay else [])


async def test_awareness_expires_after_30_s_without_renewal_in_the_documents_given(world):
    other = "comment-2-body"
    a, ta = world.connect()
    for name in (NAME, other):
        a.receive(p.encode_token(name, "ok"))
    await settle(5)
    for client, name in ((7, NAME), (8, other)):
        a.receive(p.encode_awareness(name, b"\x01" + p.var_uint(client) + b"\x01" + p.var_string('{"u":1}')))
    docs = world.registry.docs
    # Each renewal is stamped by the wall clock, so the two may differ by a
    # millisecond or more: every instant below is taken from its own stamp.
    first = docs[NAME].awareness.meta[7]["lastUpdated"]
    second = docs[other].awareness.meta[8]["lastUpdated"]
    assert world.registry.expire_awareness(min(first, second) + 29_999) == 0
    # A sweep's batch: only the documents handed over are looked at, however
    # overdue the others are.
    assert world.registry.expire_awareness(max(first, second) + 30_000, [docs[other]]) == 1
    assert list(docs[NAME].awareness.states) == [7] and not docs[other].awareness.states
    assert world.registry.expire_awareness(first + 30_000) == 1
    gone = [m for m in ta.messages() if isinstance(m, p.Awareness) and m.address == NAME][-1]
    assert p.decode_awareness_update(gone.update) == [p.AwarenessEntry(7, 1, None)]
