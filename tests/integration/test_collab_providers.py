"""The collab service against the real @hocuspocus/provider (v3, as Loomio
ships it with server 3.4, and v4), a real Rails stand-in over HTTP, and the
service as a real process."""

from __future__ import annotations

import itertools
import random
import signal

import pytest

from tests.integration.collab_helpers import Provider, start_collab, token
from tests.support import ServiceProcess, wait_for

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow

VERSIONS = ["v3", "v4"]
# Keys of its own in the session's Redis: no draft of another module's documents.
PREFIX = "t-providers:"
_ids = itertools.count(random.Random(__name__).randint(1000, 9000) * 1000)  # seeded: reruns see the same names


def doc_name(kind: str = "comment", suffix: str = "-body") -> str:
    return f"{kind}-{next(_ids)}{suffix}"


@pytest.fixture(scope="module")
def collab(rails, redis_url):
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX)
    yield service
    service.stop()


@pytest.fixture
def ws_url(collab):
    return f"ws://127.0.0.1:{collab.port}"


@pytest.fixture
def providers(ws_url):
    opened = []

    def open_provider(version: str) -> Provider:
        provider = Provider(version, ws_url)
        opened.append(provider)
        return provider

    yield open_provider
    for provider in opened:
        provider.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_two_providers_converge_on_text_and_xml(providers, version):
    name = doc_name()
    a, b = providers(version), providers(version)
    for provider in (a, b):
        provider.attach(name, token("1"))
        assert provider.authenticated(name)["scope"] == "read-write"
        provider.synced(name)

    a.send(op="text", doc=name, insert="hello ")
    b.send(op="para", doc=name, insert="from b")
    b.wait_content(name, lambda c: c["text"] == "hello ")
    b.send(op="text", doc=name, insert="world")
    a.send(op="para", doc=name, insert="from a")

    expected = a.wait_content(name, lambda c: c["text"] == "hello world" and c["xml"].count("<paragraph>") == 2)
    got = b.wait_content(name, lambda c: c["xml"] == expected["xml"] and c["text"] == "hello world")
    assert "from a" in got["xml"] and "from b" in got["xml"]
    # Every update was acknowledged with SyncStatus (the provider counts them down).
    a.wait_content(name, lambda c: c["unsynced"] == 0)
    b.wait_content(name, lambda c: c["unsynced"] == 0)


def test_v3_and_v4_providers_edit_together(providers):
    name = doc_name("discussion", "-description")
    old, new = providers("v3"), providers("v4")
    for provider in (old, new):
        provider.attach(name, token("2"))
        provider.synced(name)
    old.send(op="text", doc=name, insert="v3 ")
    new.wait_content(name, lambda c: c["text"] == "v3 ")
    new.send(op="text", doc=name, insert="v4")
    old.wait_content(name, lambda c: c["text"] == "v3 v4")


@pytest.mark.parametrize("version", VERSIONS)
def test_three_documents_over_one_shared_socket(providers, version):
    names = [doc_name("comment"), doc_name("poll", "-details"), doc_name("discussion", "")]
    tab, other = providers(version), providers(version)
    for name in names:
        tab.attach(name, token("1"))
        other.attach(name, token("2"))
    for name in names:
        tab.synced(name)
        other.synced(name)
    for i, name in enumerate(names):
        tab.send(op="text", doc=name, insert=f"doc {i}")
    for i, name in enumerate(names):
        other.wait_content(name, lambda c, i=i: c["text"] == f"doc {i}")
    # One socket per tab: the service saw exactly two.
    assert tab.events.count({"event": "open"}) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_awareness_appears_and_disappears(providers, version):
    name = doc_name()
    ann, bob = providers(version), providers(version)
    ann.attach(name, token("1"), user="ann")
    ann.synced(name)
    bob.attach(name, token("2"), user="bob")
    bob.synced(name)
    ann.wait_users(name, ["ann", "bob"])
    bob.wait_users(name, ["ann", "bob"])
    bob.close()
    ann.wait_users(name, ["ann"])


def test_a_denied_document_leaves_the_others_on_the_socket_working(providers, rails):
    allowed, denied = doc_name(), doc_name()
    owner, tab = providers("v4"), providers("v4")
    owner.attach(denied, token("1"))
    owner.synced(denied)
    owner.send(op="text", doc=denied, insert="secret draft")
    owner.wait_content(denied, lambda c: c["unsynced"] == 0)

    tab.attach(allowed, token("1"))
    tab.attach(denied, token("3"))  # user 3 may not update this record
    assert tab.denied(denied)["reason"] == "permission-denied"
    tab.synced(allowed)
    tab.send(op="text", doc=allowed, insert="still fine")
    tab.wait_content(allowed, lambda c: c["unsynced"] == 0 and c["text"] == "still fine")
    # Not one byte of the denied document reached that client: only the Auth reply.
    assert tab.read(denied)["text"] == ""
    assert set(tab.frames_for(denied)) == {2}


@pytest.mark.parametrize("user, why", [("9", "unknown user: 401"), ("500", "rails 500"), ("504", "rails too slow")])
def test_auth_denied_sends_no_content(providers, user, why):
    name = doc_name()
    owner = providers("v3")
    owner.attach(name, token("1"))
    owner.synced(name)
    owner.send(op="text", doc=name, insert="private")
    owner.wait_content(name, lambda c: c["unsynced"] == 0)

    intruder = providers("v3")
    intruder.attach(name, f"{user},whatever")
    intruder.denied(name, timeout=10)
    assert intruder.read(name)["text"] == ""
    assert set(intruder.frames_for(name)) == {2}, why


def test_new_record_documents_follow_the_user_rule(providers):
    mine, theirs = f"comment-new-1-{next(_ids)}", f"comment-new-2-{next(_ids)}"
    tab = providers("v4")
    tab.attach(mine, token("1"))
    tab.attach(theirs, token("1"))
    tab.authenticated(mine)
    tab.denied(theirs)


def test_user_zero_is_always_allowed(providers):
    name = doc_name("group", "-description")
    tab = providers("v3")
    tab.attach(name, "0,anything")
    tab.synced(name)


@pytest.mark.parametrize("version", VERSIONS)
def test_read_only_scope_refuses_updates(providers, version):
    name = doc_name()
    writer, reader = providers(version), providers(version)
    writer.attach(name, token("1"))
    writer.synced(name)
    writer.send(op="text", doc=name, insert="original")
    writer.wait_content(name, lambda c: c["unsynced"] == 0)

    reader.attach(name, token("7"))
    assert reader.authenticated(name)["scope"] == "readonly"
    reader.wait_content(name, lambda c: c["text"] == "original")
    reader.send(op="text", doc=name, insert="vandalism ")
    # The refusal (SyncStatus 0) leaves the change unacknowledged ...
    reader.wait(lambda e: e["event"] == "frame" and e["doc"] == name and e["type"] == 8)
    assert reader.read(name)["unsynced"] >= 1
    # ... and it is never applied nor relayed.
    writer.send(op="text", doc=name, insert="!")
    reader.wait_content(name, lambda c: "!" in c["text"])
    assert writer.read(name)["text"] == "original!"
    late = providers(version)
    late.attach(name, token("2"))
    late.synced(name)
    assert late.read(name)["text"] == "original!"


@pytest.mark.parametrize("version", VERSIONS)
def test_draft_survives_every_client_leaving(providers, collab, version):
    name = doc_name()
    first = providers(version)
    first.attach(name, token("1"))
    first.synced(name)
    first.send(op="para", doc=name, insert="draft paragraph")
    first.wait_content(name, lambda c: c["unsynced"] == 0)
    first.close()

    # The document is stored and unloaded once its last client is gone ...
    wait_for(lambda: collab.metrics().get("collab_loaded_documents", 1) == 0, 10, what="document unloaded")
    assert collab.metrics()["collab_stored_drafts"] >= 1

    # ... and a page reload gets the draft back.
    again = providers(version)
    again.attach(name, token("2"))
    again.synced(name)
    again.wait_content(name, lambda c: "draft paragraph" in c["xml"])


def test_edits_are_stored_while_editing_continues(providers, collab):
    name = doc_name()
    tab = providers("v4")
    tab.attach(name, token("1"))
    tab.synced(name)
    before = collab.metrics().get("collab_drafts_saved_total", 0)
    tab.send(op="text", doc=name, insert="typing")
    # Debounced store (300 ms in this service) while the client stays connected.
    wait_for(lambda: collab.metrics()["collab_drafts_saved_total"] > before, 10, what="debounced store")
    assert collab.metrics()["collab_loaded_documents"] >= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_restart_loses_nothing(rails, redis_url, version):
    """SIGTERM: stored, sockets closed with 4205; the providers reconnect to
    the next process and their state flows back into it."""
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX)
    name = doc_name()
    tab = Provider(version, f"ws://127.0.0.1:{service.port}")
    successor = None
    try:
        tab.attach(name, token("1"))
        tab.synced(name)
        tab.send(op="text", doc=name, insert="keep me")
        tab.wait_content(name, lambda c: c["unsynced"] == 0)
        mark = tab.mark()
        service.signal(signal.SIGTERM)
        tab.wait(lambda e: e["event"] == "close" and e["code"] == 4205, what="close 4205", since=mark)
        wait_for(lambda: service.process.poll() is not None, 15, what="process exit")
        assert "documents stored" in service.logs()

        successor = ServiceProcess("channels-collab", service.port, service.env).start()
        tab.wait(lambda e: e["event"] == "synced" and e["doc"] == name, since=mark, what="resynced")
        fresh = Provider(version, f"ws://127.0.0.1:{service.port}")
        try:
            fresh.attach(name, token("2"))
            fresh.wait_content(name, lambda c: c["text"] == "keep me")
        finally:
            fresh.close()
    finally:
        tab.close()
        service.kill()
        if successor:
            successor.stop()


def test_rails_down_denies_without_leaking(rails, redis_url):
    name = doc_name()
    # Nothing listens on this port: Rails is down.
    from tests.support import free_port

    service = start_collab(f"http://127.0.0.1:{free_port()}", redis_url, COLLAB_REDIS_PREFIX=PREFIX)
    try:
        tab = Provider("v3", f"ws://127.0.0.1:{service.port}")
        try:
            tab.attach(name, token("1"))
            assert tab.denied(name)["reason"] == "permission-denied"
            assert set(tab.frames_for(name)) == {2}
        finally:
            tab.close()
        assert "rails unreachable" in service.logs()
        assert token("1") not in service.logs()
        assert service.metrics()['collab_auth_total{cause="rails_unreachable",result="denied"}'] == 1
    finally:
        service.stop()


def test_v4_session_awareness_multiplexes_one_document_twice(providers):
    name = doc_name()
    tab = providers("v4")
    tab.send(op="attach", doc=name, token=token("1"), session=True, key="left")
    tab.send(op="attach", doc=name, token=token("1"), session=True, key="right")
    tab.synced("left")
    tab.synced("right")
    tab.send(op="text", doc="left", insert="one socket, ")
    tab.wait_content("right", lambda c: c["text"] == "one socket, ")
    tab.send(op="text", doc="right", insert="two editors")
    tab.wait_content("left", lambda c: c["text"] == "one socket, two editors")


def test_invalid_names_from_a_real_provider_never_reach_rails(providers, rails):
    tab = providers("v4")
    for name in ("secret-1", "comment-1/../../admin", "comment-1--2"):
        tab.attach(name, token("1"))
        tab.denied(name)
    assert not {"secret-1", "comment-1/../../admin", "comment-1--2"} & set(rails.names_asked())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("template", [
    # The front end's names for unsaved records: type, "new", the user's id,
    # its collabKeyParams, the field (Rails reads only the first three parts).
    "comment-new-1-{n}-Discussion-{n}-body",  # a reply: discussionId, parentType, parentId
    "stance-new-1-{n}-reason",  # a vote reason: pollId
    "outcome-new-1-{n}-statement",
])
def test_loomio_names_for_unsaved_records_sync(providers, rails, version, template):
    name = template.format(n=next(_ids))
    a, b = providers(version), providers(version)
    for tab in (a, b):
        tab.attach(name, token("1"))
        tab.synced(name)
    a.send(op="text", doc=name, insert="draft reply")
    b.wait_content(name, lambda c: c["text"] == "draft reply")
    a.wait_content(name, lambda c: c["unsynced"] == 0)
    assert name in rails.names_asked()


def test_health_readiness_and_metrics(providers, collab):
    import httpx

    assert httpx.get(collab.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(collab.url + "/readyz").status_code == 200
    before = collab.metrics()
    name = doc_name()
    tab = providers("v3")
    tab.attach(name, token("1"))
    tab.synced(name)
    tab.send(op="text", doc=name, insert="counted")
    tab.wait_content(name, lambda c: c["unsynced"] == 0)
    after = collab.metrics()
    assert after["collab_open_sockets"] >= 1
    assert after["collab_loaded_documents"] >= 1
    allowed = 'collab_auth_total{cause="allowed",result="allowed"}'
    assert after[allowed] > before.get(allowed, 0)
    assert after['collab_frames_total{type="sync"}'] >= before.get('collab_frames_total{type="sync"}', 0) + 2
    assert after['collab_frames_total{type="auth"}'] > before.get('collab_frames_total{type="auth"}', 0)


def test_logs_carry_no_tokens(collab):
    """Runs last in this module: everything above went through this process."""
    from tests.integration.collab_helpers import USERS

    logs = collab.logs()
    assert "document denied" in logs  # the module did log auth decisions ...
    for user in USERS:
        assert token(user) not in logs  # ... without the tokens
    assert ",whatever" not in logs
