"""Several collab processes on one real Redis, driven by the real
@hocuspocus/provider v3 and v4: edits and awareness cross instances, an
acknowledged edit survives SIGKILL and restarts, a Redis outage loses no word,
Redis memory stays bounded."""

from __future__ import annotations

import itertools
import random
import secrets
import signal
import time

import httpx
import pytest
import redis as redis_sync
from channels_collab.snapshot import APPEND_SCRIPT
from channels_dev.redis_server import start_local_redis
from pycrdt import Doc, Text

from tests.integration.collab_helpers import Provider, start_collab, token
from tests.support import wait_for

# Collab instances as processes: `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow

_ids = itertools.count(random.Random(__name__).randint(1000, 9000) * 1000)  # seeded; the module has its own key prefix


def doc_name() -> str:
    return f"comment-{next(_ids)}-body"


@pytest.fixture(scope="module")
def prefix():
    return f"cc{secrets.token_hex(3)}:"


@pytest.fixture(scope="module")
def three(rails, redis_url, prefix):
    """Three instances for the whole module (tests that kill start their own)."""
    services = [start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=prefix) for _ in range(3)]
    for s in services:
        s.wait_http("/readyz")
    yield services
    for s in services:
        s.stop()


@pytest.fixture
def open_provider():
    opened: list[Provider] = []

    def make(version: str, service) -> Provider:
        provider = Provider(version, f"ws://127.0.0.1:{service.port}")
        opened.append(provider)
        return provider

    yield make
    for provider in opened:
        provider.close()


def settled(tab: Provider, name: str) -> dict:
    """Every change of `tab` acknowledged (so in Redis)."""
    return tab.wait_content(name, lambda c: c["unsynced"] == 0 and c["synced"])


def same_text(tabs: list[Provider], name: str, check=lambda text: True, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        texts = [tab.read(name)["text"] for tab in tabs]
        if len(set(texts)) == 1 and check(texts[0]):
            return texts[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"never converged: {texts}")
        time.sleep(0.05)


def test_three_providers_on_three_instances_converge_under_inserts_and_deletes(three, open_provider):
    name = doc_name()
    tabs = [open_provider(v, s) for v, s in zip(("v3", "v4", "v3"), three, strict=True)]
    for i, tab in enumerate(tabs):
        tab.attach(name, token("1" if i % 2 == 0 else "2"))
        tab.synced(name)
    for rnd in range(8):
        for i, tab in enumerate(tabs):
            # Some at the start, some at the end: concurrent and interleaved.
            tab.send(op="text", doc=name, insert=f"<{i}.{rnd}>", **({"at": 0} if rnd % 2 else {}))
    words = {f"<{i}.{rnd}>" for i in range(3) for rnd in range(8)}
    same_text(tabs, name, lambda t: all(w in t for w in words))
    # Each deletes its own first word while the next one inserts (a delete
    # by position is only meant for the text the deleting tab sees).
    doomed = set()
    text = tabs[0].read(name)["text"]
    for i, tab in enumerate(tabs):
        word = f"<{i}.0>"
        doomed.add(word)
        tab.send(op="delete", doc=name, at=tab.read(name)["text"].index(word), length=len(word))
        tabs[(i + 1) % 3].send(op="text", doc=name, insert=f"<{i}.x>")
        words.add(f"<{i}.x>")
        same_text(tabs, name, lambda t, word=word: word not in t)
    final = same_text(tabs, name, lambda t: not any(w in t for w in doomed) and all(w in t for w in words - doomed))
    assert sorted(final.replace(">", ">\n").split()) == sorted(words - doomed)
    assert len(final) == len(text) - sum(len(w) for w in doomed) + sum(len(f"<{i}.x>") for i in range(3))
    for tab in tabs:
        settled(tab, name)


def test_awareness_crosses_instances_and_goes_when_a_tab_closes_or_its_instance_stops(
    rails, redis_url, prefix, open_provider
):
    p, q = (start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=prefix) for _ in range(2))
    try:
        name = doc_name()
        ann, bob = open_provider("v3", p), open_provider("v4", q)
        ann.attach(name, token("1"), user="ann")
        ann.synced(name)
        bob.attach(name, token("2"), user="bob")
        bob.synced(name)
        bob.wait_users(name, ["ann", "bob"])
        ann.wait_users(name, ["ann", "bob"])
        # A closed tab: gone at once elsewhere (not after the 30 s expiry).
        ann.send(op="detach", doc=name)
        bob.wait_users(name, ["bob"], timeout=8)
        # Back, then its instance is stopped: removed at once too.
        ann.attach(name, token("1"), user="ann")
        ann.synced(name)
        bob.wait_users(name, ["ann", "bob"])
        p.signal(signal.SIGTERM)
        bob.wait_users(name, ["bob"], timeout=8)
    finally:
        p.stop()
        q.stop()


def test_acknowledged_edits_survive_sigkill_and_every_instance_restarting(rails, redis_url, prefix, open_provider):
    # No compaction during the test: the edits are in the log alone.
    env = {"COLLAB_REDIS_PREFIX": prefix, "COLLAB_DEBOUNCE_MS": "60000", "COLLAB_MAX_DEBOUNCE_MS": "60000"}
    first, second = start_collab(rails.url, redis_url, **env), start_collab(rails.url, redis_url, **env)
    third = None
    try:
        name = doc_name()
        tab = open_provider("v4", first)
        tab.attach(name, token("1"))
        tab.synced(name)
        for word in ("every ", "acknowledged ", "word "):
            tab.send(op="text", doc=name, insert=word)
        settled(tab, name)
        first.kill()  # SIGKILL right after the acknowledgements
        fresh = open_provider("v3", second)
        fresh.attach(name, token("2"))
        fresh.synced(name)
        assert fresh.read(name)["text"] == "every acknowledged word "
        fresh.send(op="text", doc=name, insert="more")
        settled(fresh, name)
        # Every instance gone; a new one still has the draft.
        second.kill()
        third = start_collab(rails.url, redis_url, **env)
        again = open_provider("v4", third)
        again.attach(name, token("1"))
        again.synced(name)
        assert again.read(name)["text"] == "every acknowledged word more"
    finally:
        first.kill()
        second.kill()
        if third:
            third.stop()


def test_a_client_moving_to_an_instance_without_the_document_sees_the_latest_state(three, open_provider):
    name = doc_name()
    writer = open_provider("v3", three[0])
    writer.attach(name, token("1"))
    writer.synced(name)
    for i in range(20):
        writer.send(op="text", doc=name, insert=f"w{i} ")
    settled(writer, name)
    expected = writer.read(name)["text"]
    mover = open_provider("v4", three[1])
    mark = mover.mark()
    mover.attach(name, token("2"))
    mover.wait(lambda e: e["event"] == "synced" and e["doc"] == name, since=mark)
    assert mover.read(name)["text"] == expected  # at its first synced
    mover.send(op="text", doc=name, insert="moved")
    got = writer.wait_content(name, lambda c: "moved" in c["text"])["text"]
    assert got.count("moved") == 1 and got == expected + "moved"
    time.sleep(0.3)
    assert writer.read(name)["text"] == expected + "moved"
    written, read = three[0].metrics(), three[1].metrics()
    assert written["collab_updates_appended_total"] >= 20
    assert written["collab_receive_lag_seconds_count"] >= 1  # "moved", from the other instance
    assert read["collab_documents_loaded_total"] >= 1
    assert written["collab_unacked_updates"] == 0 and written["collab_redis_up"] == 1


def test_redis_that_may_lose_drafts_is_warned_about_once(three, redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    try:
        policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
        persistent = client.config_get("appendonly")["appendonly"] == "yes" or client.config_get("save")["save"]
    finally:
        client.close()
    expected = 0 if policy == "noeviction" and persistent else 1
    for service in three:
        assert service.logs().count("redis can lose collab drafts") == expected


def test_many_clients_on_three_instances_open_a_document_each_instance_loading_it_once(three, open_provider):
    name = doc_name()
    before = [s.metrics().get("collab_documents_loaded_total", 0) for s in three]
    tabs = [open_provider("v3" if i % 2 else "v4", three[i % 3]) for i in range(9)]
    for i, tab in enumerate(tabs):
        tab.attach(name, token(str(1 + i % 2)))
    for tab in tabs:
        tab.synced(name)
    tabs[4].send(op="text", doc=name, insert="all here")
    same_text(tabs, name, lambda t: t == "all here")
    after = [s.metrics()["collab_documents_loaded_total"] for s in three]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_the_same_stream_entry_twice_shows_once(three, open_provider, redis_url, prefix):
    name = doc_name()
    tab = open_provider("v4", three[2])
    tab.attach(name, token("1"))
    tab.synced(name)
    doc = Doc()
    doc["body"] = Text("twice?")
    update = doc.get_update()
    client = redis_sync.Redis.from_url(redis_url)
    try:
        for _ in range(2):  # as a writer that retried its pipeline
            client.eval(APPEND_SCRIPT, 2, f"{prefix}{{{name}}}:log", f"{prefix}{{{name}}}:members", "elsewhere",
                        update, 60_000, 1000, name, f"{prefix}inbox:")
    finally:
        client.close()
    tab.wait_content(name, lambda c: c["text"] == "twice?")
    time.sleep(0.3)
    assert tab.read(name)["text"] == "twice?"


@pytest.mark.slow
def test_20000_small_edits_leave_redis_memory_bounded(three, open_provider, redis_url, prefix):
    name = doc_name()
    tab = open_provider("v4", three[0])
    tab.attach(name, token("1"))
    tab.synced(name)
    chars = "abcdefghij" * 200
    for _ in range(10):
        tab.send(op="type", doc=name, chars=chars)
    wait_for(lambda: len(tab.read(name)["text"]) == 20_000, 60, what="20,000 edits typed")
    settled(tab, name)
    client = redis_sync.Redis.from_url(redis_url)
    try:
        snap, log = f"{prefix}{{{name}}}:snap", f"{prefix}{{{name}}}:log"

        seen = {}

        def compacted():
            state = client.hget(snap, "state") or b""
            used = sum(client.memory_usage(k, samples=0) or 0 for k in (snap, log))
            seen.update(state_bytes=len(state), log_entries=client.xlen(log), redis_bytes=used)
            # Everything typed is in the snapshot; the log keeps its trim marker.
            return len(state) > 20_000 and seen["log_entries"] <= 1 and used <= 4 * len(state) + 64 * 1024

        # Compaction runs within COLLAB_MAX_DEBOUNCE_MS (1 s here) of the edits.
        try:
            wait_for(compacted, 15, what="redis memory within 4x state + 64 KiB")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {seen}") from None
        assert 0 < client.pttl(snap) <= 86_400_000
    finally:
        client.close()


@pytest.mark.slow
def test_redis_stopped_and_restarted_during_editing_loses_no_word(rails, open_provider):
    redis = start_local_redis(extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    a_svc = start_collab(rails.url, redis.url)
    b_svc = start_collab(rails.url, redis.url)
    try:
        a_svc.wait_http("/readyz")
        name = doc_name()
        ann, amy = open_provider("v3", a_svc), open_provider("v4", a_svc)
        bob = open_provider("v4", b_svc)
        for tab, user in ((ann, "1"), (amy, "2"), (bob, "1")):
            tab.attach(name, token(user))
            tab.synced(name)
        words: list[str] = []

        def say(tab, word):
            words.append(word)
            tab.send(op="text", doc=name, insert=word + " ")

        for i in range(5):
            say(ann, f"a{i}")
            say(bob, f"b{i}")
        same_text([ann, amy, bob], name, lambda t: all(w in t for w in words))
        redis.kill()
        for i in range(5, 15):
            say(ann, f"a{i}")
            say(bob, f"b{i}")
            say(amy, f"m{i}")
        # Editors on one instance keep editing together meanwhile ...
        same_text([ann, amy], name, lambda t: "a14" in t and "m14" in t)
        # ... their acknowledgements wait, and readiness says so.
        assert ann.read(name)["unsynced"] > 0
        wait_for(lambda: httpx.get(a_svc.url + "/readyz").status_code == 503, 10, what="readyz 503")
        redis.start()
        final = same_text([ann, amy, bob], name, lambda t: all(w in t for w in words), timeout=30)
        assert sorted(final.split()) == sorted(words)
        for tab in (ann, amy, bob):
            settled(tab, name)
        wait_for(lambda: httpx.get(a_svc.url + "/readyz").status_code == 200, 15, what="readyz 200")
        # Append-only and noeviction: nothing to warn about.
        assert "redis can lose collab drafts" not in a_svc.logs()
    finally:
        a_svc.stop()
        b_svc.stop()
        redis.cleanup()


@pytest.mark.slow
def test_started_without_redis_it_serves_local_editors_and_catches_up(rails, private_redis, open_provider):
    private_redis.kill()
    alone = start_collab(rails.url, private_redis.url)
    other = None
    try:
        assert httpx.get(alone.url + "/readyz").status_code == 503
        name = doc_name()
        ann, amy = open_provider("v4", alone), open_provider("v3", alone)
        for tab, user in ((ann, "1"), (amy, "2")):
            tab.attach(name, token(user))
            tab.synced(name)
        ann.send(op="text", doc=name, insert="before redis ")
        amy.wait_content(name, lambda c: c["text"] == "before redis ")
        assert ann.read(name)["unsynced"] > 0  # not acknowledged: not in Redis
        private_redis.start()
        settled(ann, name)
        wait_for(lambda: httpx.get(alone.url + "/readyz").status_code == 200, 15, what="readyz 200")
        other = start_collab(rails.url, private_redis.url)
        fresh = open_provider("v4", other)
        fresh.attach(name, token("1"))
        fresh.synced(name)
        assert fresh.read(name)["text"] == "before redis "
    finally:
        alone.stop()
        if other:
            other.stop()
