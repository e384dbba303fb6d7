"""The cluster's scripts and its appender/reader against a real Redis: two
Cluster objects stand for two instances."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from channels_collab.cluster import Cluster
from channels_collab.documents import DocumentRegistry
from channels_collab.snapshot import APPEND_SCRIPT, Keys, parse_id
from channels_collab.store import DraftStore
from channels_dev.redis_server import free_port
from pycrdt import Doc, Text

from tests.support import until


class Recorder:
    """A listener that records what the reader delivers."""

    def __init__(self):
        self.updates: list[tuple[str, bytes]] = []
        self.reloads: list[str] = []
        self.awareness: list[bytes] = []
        self.queries: list[str] = []
        self.pressure: list[bool] = []
        self.event = asyncio.Event()

    def remote_updates(self, name, updates):
        self.updates += [(name, u) for u in updates]
        self.event.set()

    def reload(self, name, loaded):
        self.reloads.append(name)
        self.event.set()

    def remote_awareness(self, name, update):
        self.awareness.append(update)
        self.event.set()

    def awareness_query(self, name):
        self.queries.append(name)
        self.event.set()

    def backpressure(self, on, names):
        self.pressure.append(on)


def edits(*words: str) -> tuple[Doc, list[bytes]]:
    """A document typed word by word, and the update of each word."""
    doc = Doc()
    text = doc.get("body", type=Text)
    updates = []
    sub = doc.observe(lambda e: updates.append(e.update))
    for word in words:
        text += word
    doc.unobserve(sub)
    return doc, updates


def text_of(*updates: bytes | None) -> str:
    doc = Doc()
    for u in updates:
        if u:
            doc.apply_update(u)
    return str(doc.get("body", type=Text))


@pytest.fixture
async def cluster_factory(redis_url, redis):
    prefix = f"t{secrets.token_hex(3)}:"
    made: list[Cluster] = []

    def make(start: bool = True, url: str | None = None, **kw) -> Cluster:
        c = Cluster(url or redis_url, prefix=prefix, ttl_seconds=600, **kw)
        c.listener = Recorder()
        if start:
            c.start()
        made.append(c)
        return c

    yield make
    for c in made:
        await c.stop()


def name() -> str:
    return f"comment-{secrets.randbelow(10**9)}-body"


async def xadd(redis, keys: Keys, doc: str, update: bytes, instance: bytes = b"other") -> str:
    """Append as another instance would: to the log, and the inboxes of the
    instances that have the document open."""
    entry = await redis.eval(APPEND_SCRIPT, 2, keys.log(doc), keys.members(doc), instance, update, 600_000, 1000,
                             doc, keys.inbox_prefix())
    return entry.decode()


async def test_load_returns_snapshot_and_the_tail_after_it(cluster_factory, redis):
    c = cluster_factory(start=False)
    doc = name()
    _, ups = edits("one ", "two ", "three")
    ids = [await xadd(redis, c.keys, doc, u) for u in ups]
    loaded = await c.load(doc)
    assert loaded.state is None and loaded.cursor == ids[-1]
    assert text_of(*loaded.updates) == "one two three"

    # Snapshot covering the first two: the tail is the third only.
    assert await c.compact_to(doc, text_of_state(ups[:2]), ids[1])
    loaded = await c.load(doc)
    assert loaded.snapshot_id == ids[1]
    assert len(loaded.updates) == 1 and loaded.updates[0] == ups[2]
    assert text_of(loaded.state, *loaded.updates) == "one two three"
    # Trimmed up to the snapshot, plus one marker saying so.
    entries = await redis.xrange(c.keys.log(doc))
    assert entries[0][0].decode() == ids[2]
    assert entries[-1][1] == {b"t": ids[1].encode()}
    assert 0 < await redis.pttl(c.keys.snap(doc)) <= 600_000


def text_of_state(updates: list[bytes]) -> bytes:
    doc = Doc()
    for u in updates:
        doc.apply_update(u)
    return doc.get_update()


async def test_compaction_only_moves_forward_and_two_at_once_are_safe(cluster_factory, redis):
    a, b = cluster_factory(start=False), cluster_factory(start=False)
    doc = name()
    _, ups = edits(*[f"w{i} " for i in range(6)])
    ids = [await xadd(redis, a.keys, doc, u) for u in ups]
    # Two instances compact at once, one further than the other.
    results = await asyncio.gather(
        a.compact_to(doc, text_of_state(ups[:5]), ids[4]),
        b.compact_to(doc, text_of_state(ups[:2]), ids[1]),
    )
    assert results[0]
    snap_id = (await redis.hget(a.keys.snap(doc), "id")).decode()
    assert snap_id == ids[4]
    # The older one, later, is refused: the snapshot never goes back.
    assert not await b.compact_to(doc, text_of_state(ups[:2]), ids[1])
    assert (await redis.hget(a.keys.snap(doc), "id")).decode() == ids[4]
    loaded = await b.load(doc)
    assert text_of(loaded.state, *loaded.updates) == "".join(f"w{i} " for i in range(6))


async def test_append_acks_only_once_in_redis_and_the_other_instance_reads_it(cluster_factory, redis):
    a, b = cluster_factory(), cluster_factory()
    doc = name()
    b.track(doc, await b.load(doc))
    a.track(doc, await a.load(doc))
    _, ups = edits("hello", " world")
    acked = []
    for u in ups:
        a.append(doc, u, lambda u=u: acked.append(u))
    await until(lambda: len(acked) == 2)
    assert acked == ups
    entries = await redis.xrange(a.keys.log(doc))
    assert [e[1][b"u"] for e in entries] == ups  # in Redis when acknowledged
    assert 0 < await redis.pttl(a.keys.log(doc)) <= 600_000  # never a key without its TTL
    await until(lambda: len(b.listener.updates) == 2)
    assert [u for _, u in b.listener.updates] == ups
    assert a.metrics.updates_appended._value.get() == 2
    # Its own entries are not handed back to the instance that wrote them.
    await asyncio.sleep(0.2)
    assert a.listener.updates == []


async def test_an_ack_only_entry_waits_for_the_appends_before_it(cluster_factory):
    a = cluster_factory()
    doc = name()
    order = []
    _, ups = edits("x")
    a.append(doc, ups[0], lambda: order.append("update"))
    a.append(doc, None, lambda: order.append("barrier"))
    await until(lambda: len(order) == 2)
    assert order == ["update", "barrier"]


async def test_a_reader_behind_the_trimmed_history_reloads(cluster_factory, redis):
    reader = cluster_factory(start=False)
    doc = name()
    _, ups = edits("a", "b", "c")
    first = await xadd(redis, reader.keys, doc, ups[0])
    reader.track(doc, await reader.load(doc))
    assert reader.cursor(doc) == first
    # While it is not reading, two more edits are written and compacted away.
    ids = [await xadd(redis, reader.keys, doc, u) for u in ups[1:]]
    writer = cluster_factory(start=False)
    assert await writer.compact_to(doc, text_of_state(ups), ids[-1])
    reader.start()
    await until(lambda: reader.listener.reloads == [doc])
    assert reader.metrics.gap_reloads._value.get() == 1
    assert reader.listener.updates == []  # nothing half-applied from the log
    assert reader.cursor(doc) is not None and parse_id(reader.cursor(doc)) >= parse_id(ids[-1])


async def test_the_same_entry_twice_changes_the_document_once(cluster_factory, redis):
    c = cluster_factory()
    registry = DocumentRegistry(DraftStore(0, 60), debounce_seconds=5, max_debounce_seconds=30, history=c)
    doc = name()
    await registry.prepare(doc)
    live = registry.docs[doc]
    _, ups = edits("once")
    await xadd(redis, c.keys, doc, ups[0])
    await xadd(redis, c.keys, doc, ups[0])  # a writer retried its pipeline
    await until(lambda: str(live.ydoc.get("body", type=Text)) == "once")
    await asyncio.sleep(0.2)
    assert str(live.ydoc.get("body", type=Text)) == "once"
    # And one inbox entry handed to the reader twice is applied once.
    entries = [(b"9999999999999-0", {b"d": doc.encode(), b"e": b"9999999999999-0", b"i": b"x",
                                     b"u": edits("!")[1][0]})]
    c._deliver_inbox(entries)
    c._deliver_inbox(entries)
    assert registry.docs[doc].ydoc.get("body", type=Text).to_py() in ("once!", "!once")


async def test_awareness_travels_on_the_capped_inbox_never_in_the_history(cluster_factory, redis):
    a, b = cluster_factory(inbox_maxlen=100), cluster_factory()
    doc = name()
    b.track(doc, await b.load(doc))
    await until(lambda: not b._tracked[doc].catch_up)
    for i in range(300):
        a.publish_awareness(doc, bytes([1, i % 100 + 1, 1, 2]) + b"{}")
    await until(lambda: len(b.listener.awareness) >= 1)
    await until(lambda: not a._aw_queue)
    assert await redis.exists(a.keys.log(doc)) == 0  # never in the document's history
    assert await redis.xlen(b.inbox) < 300  # capped
    assert await redis.exists(a.inbox) == 0  # the sender's own inbox never hears it


async def test_a_reader_behind_its_capped_inbox_catches_up_from_the_logs(cluster_factory, redis):
    reader = cluster_factory(start=False)
    doc = name()
    reader.track(doc, await reader.load(doc))
    reader._tracked[doc].catch_up = False
    _, ups = edits("seed", *[f"{i} " for i in range(60)])
    await xadd(redis, reader.keys, doc, ups[0])
    reader._inbox_cursor = (await redis.xrevrange(reader.inbox, count=1))[0][0].decode()
    writer = cluster_factory(inbox_maxlen=10)
    for u in ups[1:]:
        writer.append(doc, u, None)
    await until(lambda: writer.unacked_updates == 0)
    assert await redis.xlen(reader.inbox) < 60  # what the reader would have read is gone
    reader.start()
    await until(lambda: len(reader.listener.updates) >= 61)
    assert text_of(*[u for _, u in reader.listener.updates]) == "seed" + "".join(f"{i} " for i in range(60))


async def test_an_instance_with_the_document_open_gets_exactly_the_other_instances_updates(cluster_factory, redis):
    a, b, outsider = cluster_factory(), cluster_factory(), cluster_factory()
    doc = name()
    for c in (a, b):
        c.track(doc, await c.load(doc))
    await until(lambda: not a._tracked[doc].catch_up and not b._tracked[doc].catch_up)
    _, ups = edits("a1 ", "b1 ", "x1 ", "a2 ")
    for writer, update in zip((a, b, outsider, a), ups, strict=True):
        writer.append(doc, update, None)
        await until(lambda w=writer: w.unacked_updates == 0)
    await until(lambda: len(a.listener.updates) == 2 and len(b.listener.updates) == 3)
    await asyncio.sleep(0.2)
    assert [u for _, u in a.listener.updates] == [ups[1], ups[2]]
    assert [u for _, u in b.listener.updates] == [ups[0], ups[2], ups[3]]
    # The outsider has it not open: its inbox never heard of it.
    assert outsider.listener.updates == [] and await redis.exists(outsider.inbox) == 0
    assert await redis.zscore(a.keys.members(doc), b.instance) is not None
    assert await redis.zscore(a.keys.members(doc), outsider.instance) is None


async def test_a_single_instance_never_wakes_its_reader_and_compacts_its_own_appends(cluster_factory, redis):
    c = cluster_factory()
    registry = DocumentRegistry(DraftStore(0, 60), debounce_seconds=5, max_debounce_seconds=30, history=c)
    doc = name()
    await registry.prepare(doc)
    live = registry.open(doc, Peer(doc))
    await until(lambda: c._inbox_cursor is not None and not c._unsettled)
    woken = c.wakeups
    _, ups = edits(*[f"w{i} " for i in range(50)])
    acked = []
    for u in ups:
        c.append(doc, u, lambda: acked.append(1))
        live.ydoc.apply_update(u)
    await until(lambda: len(acked) == 50)
    await asyncio.sleep(0.3)
    assert c.wakeups == woken  # no inbox read returned anything
    assert [e[1] for e in await redis.xrange(c.inbox)] in ([], [{b"h": c.instance.encode()}])
    # Compaction covers its own appends, though the reader never saw them.
    last = (await redis.xrevrange(c.keys.log(doc), count=1))[0][0].decode()
    c.compact(doc, live.state)
    await until(lambda: not c._compacting and not c._compactions)
    assert (await redis.hget(c.keys.snap(doc), "id")).decode() == last
    assert [e[1] for e in await redis.xrange(c.keys.log(doc))] == [{b"t": last.encode()}]


async def test_an_expired_member_gets_no_more_writes_and_is_pruned(cluster_factory, redis):
    crashed = cluster_factory(start=False, member_ttl_ms=400)  # registers, then never renews
    doc = name()
    crashed.track(doc, await crashed.load(doc))
    _, ups = edits("before ", "after")
    await xadd(redis, crashed.keys, doc, ups[0])
    assert await redis.xlen(crashed.inbox) == 2  # hello, and the update
    await asyncio.sleep(0.5)
    await xadd(redis, crashed.keys, doc, ups[1])
    assert await redis.xlen(crashed.inbox) == 2
    assert await redis.zcard(crashed.keys.members(doc)) == 0
    assert 0 < await redis.pttl(crashed.inbox) <= 800


async def test_a_lapsed_registration_is_renewed_and_caught_up_from_the_log(cluster_factory, redis):
    stalled = cluster_factory(start=False, member_ttl_ms=300)
    doc = name()
    stalled.track(doc, await stalled.load(doc))
    stalled._tracked[doc].catch_up = False
    stalled._unsettled.clear()
    await asyncio.sleep(0.4)
    _, ups = edits("missed")
    await xadd(redis, stalled.keys, doc, ups[0])  # not in its inbox: its registration had lapsed
    stalled.member_ttl_ms = 60_000
    await stalled.refresh_membership()
    assert stalled._tracked[doc].catch_up
    stalled.start()
    await until(lambda: [u for _, u in stalled.listener.updates] == ups)


async def test_a_document_left_here_is_no_longer_written_to_this_inbox(cluster_factory, redis):
    c = cluster_factory()
    doc = name()
    c.track(doc, await c.load(doc))
    assert await redis.zscore(c.keys.members(doc), c.instance) is not None
    c.untrack(doc)
    assert await c.flush(2)
    assert await redis.zscore(c.keys.members(doc), c.instance) is None
    before = await redis.xlen(c.inbox)
    await xadd(redis, c.keys, doc, edits("x")[1][0])
    assert await redis.xlen(c.inbox) == before


async def test_without_redis_acks_wait_and_the_bound_pauses(cluster_factory):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    c = cluster_factory(url=dead, max_unacked_bytes=1000)
    doc = name()
    acked = []
    c.append(doc, b"x" * 600, lambda: acked.append(1))
    await asyncio.sleep(0.3)
    assert acked == [] and c.unacked_bytes == 600 and not c.healthy
    assert c.listener.pressure == []
    c.append(doc, b"y" * 600, lambda: acked.append(2))
    assert c.backpressured and c.listener.pressure == [True]
    assert c.pending_updates(doc) == [b"x" * 600, b"y" * 600]


async def test_scripts_survive_an_emptied_script_cache(cluster_factory, redis):
    c = cluster_factory(start=False)
    doc = name()
    _, ups = edits("kept")
    entry = await xadd(redis, c.keys, doc, ups[0])
    await c.load(doc)
    await redis.script_flush()  # as after a Redis restart
    assert await c.compact_to(doc, ups[0], entry)
    assert (await c.load(doc)).state == ups[0]


class Peer:
    """A registry peer that records frames and read pauses."""

    def __init__(self, address: str):
        self.address = address
        self.readonly = False
        self.frames: list[bytes] = []
        self.paused: set[str] = set()

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def pause(self, reason: str) -> None:
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)


async def test_redis_down_acks_wait_sockets_pause_past_the_bound_and_all_resume(private_redis):
    from channels_collab import protocol as p

    c = Cluster(private_redis.url, prefix="bp:", max_unacked_bytes=2000)
    registry = DocumentRegistry(DraftStore(0, 60), debounce_seconds=5, max_debounce_seconds=30, history=c)
    c.start()
    try:
        doc = name()
        await registry.prepare(doc)
        writer, reader = Peer(doc), Peer(doc)
        live = registry.open(doc, writer)
        registry.open(doc, reader)
        await until(lambda: c.healthy)
        private_redis.kill()
        _, ups = edits(*[f"word{i:03d} " * 20 for i in range(20)])
        for u in ups:
            registry.sync(live, writer, p.Sync(doc, p.SyncStep.UPDATE, u))
        acked = [f for f in writer.frames if f == p.encode_sync_status(doc, True)]
        # The co-editor here got every change at once; nothing is acknowledged.
        assert len([f for f in reader.frames if f.startswith(p.encode_update(doc, b"")[:-1])]) >= 20
        assert acked == [] and c.unacked_updates == 20
        assert writer.paused == {"unacked"} and reader.paused == {"unacked"}
        await until(lambda: not c.healthy)
        private_redis.start()
        await until(lambda: c.unacked_updates == 0, timeout=15)
        assert len([f for f in writer.frames if f == p.encode_sync_status(doc, True)]) == 20
        assert writer.paused == set() and reader.paused == set()
        loaded = await c.load(doc)
        assert text_of(loaded.state, *loaded.updates) == "".join(f"word{i:03d} " * 20 for i in range(20))
    finally:
        await c.stop()


def test_the_old_idle_setting_is_an_alias_of_the_ttl():
    from channels_common.settings import CollabSettings

    assert CollabSettings().draft_ttl_seconds == 86400
    assert CollabSettings(COLLAB_DRAFT_MAX_IDLE_SECONDS="60").draft_ttl_seconds == 60
    assert CollabSettings(COLLAB_DRAFT_MAX_IDLE_SECONDS="60", COLLAB_DRAFT_TTL_SECONDS="90").draft_ttl_seconds == 90


async def test_the_old_idle_setting_logs_its_deprecation(redis_url, caplog):
    import gc
    import logging

    from channels_collab.app import CollabService
    from channels_common.settings import CollabSettings

    service = CollabService(CollabSettings(REDIS_URL=redis_url, COLLAB_DRAFT_MAX_IDLE_SECONDS="60"))
    with caplog.at_level(logging.WARNING, logger="channels.collab"):
        await service.start()
    try:
        assert "COLLAB_DRAFT_MAX_IDLE_SECONDS is deprecated" in caplog.text
        assert service.cluster.ttl_ms == 60_000
    finally:
        await service.stop()
        gc.unfreeze()
