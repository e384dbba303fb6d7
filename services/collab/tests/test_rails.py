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
