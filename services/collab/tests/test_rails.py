"""The Rails callback client against a real (tiny) HTTP server on loopback."""

import asyncio
import json

import pytest
from channels_collab.rails import RailsAuthenticator


class FakeRails:
    """Answers each request with the next scripted reply: (status, body),
    "drop" (close without answering) or "hang"."""

    def __init__(self, replies, delay=0.0):
        self.replies = list(replies)
        self.requests = []
        self.delay = delay
        self.connections = 0
        self.in_flight = self.most_in_flight = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def handle(self, reader, writer):
        self.connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client closed its kept-alive connection
            lines = head.split(b"\r\n")
            length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
            self.requests.append((lines[0].decode(), json.loads(body)))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(self.delay)
            self.in_flight -= 1
            reply = self.replies.pop(0) if self.replies else (200, b"")
            if reply == "drop":
                writer.close()
                return
            if reply == "hang":
                await asyncio.sleep(10)
                return
            status, payload = reply
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()


async def decide(replies, token="1,s", name="comment-1", timeout=2.0):
    async with FakeRails(replies) as rails:
        auth = RailsAuthenticator(rails.url, timeout_seconds=timeout)
        try:
            return await auth.authenticate(token, name), rails.requests
        finally:
            await auth.aclose()


async def test_allowed_with_the_contract_body():
    decision, requests = await decide([(200, b"")])
    assert decision.allowed and decision.scope == "read-write"
    assert requests == [("POST /api/hocuspocus HTTP/1.1", {"user_secret": "1,s", "document_name": "comment-1"})]


@pytest.mark.parametrize("body", [b'{"scope": "readonly"}', b'{"read_only": true}'])
async def test_read_only_answer(body):
    decision, _ = await decide([(200, body)])
    assert decision.allowed and decision.readonly


@pytest.mark.parametrize("body", [b"[" * 4000, b'{"scope": ' * 300 + b'"readonly"' + b"}" * 300, b"{oops"])
async def test_an_unreadable_200_body_allows_read_write(body):
    decision, _ = await decide([(200, body)])
    assert decision.allowed and decision.scope == "read-write"


@pytest.mark.parametrize("status", [401, 403, 404, 500, 302])
async def test_anything_but_200_denies(status):
    decision, _ = await decide([(status, b"{}")])
    assert not decision.allowed


async def test_timeout_denies():
    decision, _ = await decide(["hang"], timeout=0.3)
    assert not decision.allowed and decision.detail == "timeout"


async def test_a_dropped_connection_is_retried():
    decision, requests = await decide(["drop", (200, b"")])
    assert decision.allowed and len(requests) == 2


async def test_a_burst_shares_a_bounded_set_of_kept_alive_connections():
    async with FakeRails([], delay=0.01) as rails:
        auth = RailsAuthenticator(rails.url, timeout_seconds=5, max_concurrent=4)
        try:
            decisions = await asyncio.gather(*(auth.authenticate("1,s", f"comment-{i}") for i in range(60)))
        finally:
            await auth.aclose()
    assert all(d.allowed for d in decisions)
    assert len(rails.requests) == 60
    assert rails.most_in_flight == 4
    assert rails.connections == 4


async def test_a_call_waiting_for_a_busy_connection_is_denied_at_its_deadline():
    async with FakeRails(["hang", "hang"]) as rails:
        auth = RailsAuthenticator(rails.url, timeout_seconds=0.3, max_concurrent=1)
        try:
            first, second = await asyncio.gather(
                auth.authenticate("1,s", "comment-1"), auth.authenticate("1,s", "comment-2")
            )
        finally:
            await auth.aclose()
    assert first.detail == second.detail == "timeout"


async def test_unreachable_denies():
    auth = RailsAuthenticator("http://127.0.0.1:9", timeout_seconds=1)
    try:
        decision = await auth.authenticate("1,s", "comment-1")
    finally:
        await auth.aclose()
    assert not decision.allowed and decision.detail == "unreachable"


async def test_no_url_or_no_token_denies_without_asking():
    _, requests = await decide([], token="")
    assert requests == []
    auth = RailsAuthenticator(None, timeout_seconds=1)
    assert not (await auth.authenticate("1,s", "comment-1")).allowed
    await auth.aclose()


def test_tls_is_verified_unless_rails_is_plain_http():
    for url, verified in (("https://rails.example", True), ("HTTPS://rails.example", True),
                          ("http://rails:3000", False), ("HTTP://rails:3000", False)):
        auth = RailsAuthenticator(url, timeout_seconds=1)
        assert (auth._verify is not False) is verified, url


# ------------------------------------------------------------ the fair share


async def test_fair_share_caps_each_caller_and_serves_callers_in_turn():
    from channels_collab.rails import FairShare

    share = FairShare(size=4, per_caller=2)
    order = []

    async def call(caller, i, release_after: asyncio.Event):
        await share.acquire(caller)
        order.append((caller, i))
        await release_after.wait()
        share.release(caller)

    done = asyncio.Event()
    hog = [asyncio.create_task(call("hog", i, done)) for i in range(10)]
    await asyncio.sleep(0)
    assert order == [("hog", 0), ("hog", 1)] and share.running == 2  # its cap, not the whole pool
    others = [asyncio.create_task(call(name, 0, done)) for name in ("a", "b")]
    await asyncio.sleep(0)
    assert share.running == 4 and ("a", 0) in order and ("b", 0) in order
    late = asyncio.create_task(call("c", 0, done))
    await asyncio.sleep(0)
    assert ("c", 0) not in order and share.waiting == 9
    done.set()
    await asyncio.gather(*hog, *others, late)
    # Once slots freed, "c" came before the hog's eight other waits.
    assert order.index(("c", 0)) < order.index(("hog", 4))
    assert share.running == 0 and share.waiting == 0


async def test_fair_share_cancelled_waits_take_nothing():
    from channels_collab.rails import FairShare

    share = FairShare(size=1, per_caller=1)
    await share.acquire("a")
    waiting = [asyncio.create_task(share.acquire("b")) for _ in range(3)]
    await asyncio.sleep(0)
    assert share.waiting == 3
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert share.waiting == 0
    share.release("a")
    assert share.running == 0
    # Granted and cancelled in the same turn: the slot comes back.
    await share.acquire("a")
    granted = asyncio.create_task(share.acquire("b"))
    await asyncio.sleep(0)
    share.release("a")  # grants "b"
    granted.cancel()
    await asyncio.gather(granted, return_exceptions=True)
    assert share.running == 0 and share.held("b") == 0


async def test_fair_share_a_slot_freed_as_waits_are_cancelled_goes_to_a_live_wait():
    # A socket's auths cancelled together, its call first: the call's
    # release ran before the cancelled waits had taken themselves out, and
    # granted one of them: InvalidStateError out of release() (an "auth
    # failed unexpectedly" traceback) and a slot lost for good.
    from channels_collab.rails import FairShare

    share = FairShare(size=1, per_caller=1)

    async def call(caller):
        await share.acquire(caller)
        try:
            await asyncio.sleep(30)
        finally:
            share.release(caller)

    holder = asyncio.create_task(call("a"))
    await asyncio.sleep(0)
    cancelled = [asyncio.create_task(call("a")) for _ in range(3)]
    live = asyncio.create_task(call("b"))
    await asyncio.sleep(0)
    holder.cancel()
    for task in cancelled:
        task.cancel()
    results = await asyncio.gather(holder, *cancelled, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    await asyncio.sleep(0)
    assert share.running == 1 and share.held("b") == 1 and share.held("a") == 0 and share.waiting == 0
    live.cancel()
    await asyncio.gather(live, return_exceptions=True)
    assert share.running == 0 and share.waiting == 0


async def test_one_caller_holds_at_most_its_share_of_rails():
    async with FakeRails([], delay=0.2) as rails:
        auth = RailsAuthenticator(rails.url, timeout_seconds=5, max_concurrent=8, max_per_caller=2)
        try:
            hog = object()
            calls = [auth.authenticate("1,s", f"comment-{i}", caller=hog) for i in range(6)]
            other = auth.authenticate("2,s", "comment-other", caller=object())
            results = await asyncio.gather(*calls, other)
        finally:
            await auth.aclose()
    assert all(r.allowed for r in results)
    assert rails.most_in_flight == 3  # the hog's two, and the other caller's one
    # The other caller was not queued behind the hog's six.
    assert [r[1]["document_name"] for r in rails.requests].index("comment-other") <= 2


WARM_UP_CHECK = """
import asyncio, sys
from channels_collab.rails import RailsAuthenticator

async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    await reader.read(4096)
    writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n{}")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    auth = RailsAuthenticator(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_seconds=5)
    await auth.warm_up()
    before = set(sys.modules)
    decision = await auth.authenticate("token", "comment-1-body")
    assert decision.allowed, decision
    print(sorted(set(sys.modules) - before))

asyncio.run(main())
"""


def test_after_the_warm_up_the_first_call_imports_nothing():
    # In a process of its own: in this one, earlier tests imported everything.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WARM_UP_CHECK], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
