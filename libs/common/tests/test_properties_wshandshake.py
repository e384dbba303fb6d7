"""Properties of the opening handshake: any head gives an Upgrade or a
Refusal; a request built from its parts parses back to them; every
response written parses (llhttp) to what was asked for, and no header
value can split it; a request read by the websocket protocol in any
segmentation gives the same scope or refusal, searching each byte a
bounded number of times, and a head past the limit is refused however it
arrives."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import types

import httptools
from channels_common.wshandshake import (
    MAX_REQUEST_BYTES,
    Refusal,
    Upgrade,
    accept_response,
    parse_upgrade,
    refusal_response,
    response_head,
)
from channels_common.wsserver import LeanWebSocketProtocol
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import byte_at_a_time, mutated, segmentations
from tests.support import FakeTransport

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TOKEN, min_size=1, max_size=12)
# Field values as sent: visible latin-1 and inner spaces, no CR or LF.
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30).map(
    str.strip)
targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=30).map(
    lambda t: "/" + t)
RESERVED = {"upgrade", "connection", "sec-websocket-version", "sec-websocket-key", "sec-websocket-protocol"}


@st.composite
def upgrades(draw):
    """(head bytes, the Upgrade it must parse to)."""
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16)))
    protocols = draw(st.lists(tokens, max_size=3))
    fields = [
        ("Upgrade", draw(st.sampled_from(["websocket", "WebSocket", "h2c, websocket"]))),
        ("Connection", draw(st.sampled_from(["Upgrade", "keep-alive, upgrade", "UPGRADE"]))),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", key.decode()),
    ]
    if protocols:
        fields.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    extra = draw(st.lists(st.tuples(tokens.filter(lambda n: n.lower() not in RESERVED), values), max_size=5))
    fields = draw(st.permutations(fields + extra))
    target = draw(targets)
    head = f"GET {target} HTTP/1.1\r\n" + "\r\n".join(f"{n}:{draw(st.sampled_from(['', ' ', '  ']))}{v}"
                                                      for n, v in fields)
    expected = Upgrade(
        target=target.encode(), headers=[(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in fields],
        key=key, subprotocols=protocols,
    )
    return head.encode("latin-1"), expected


@given(upgrades())
def test_a_request_parses_back_to_its_parts(case):
    head, expected = case
    assert parse_upgrade(head) == expected


@given(st.binary(max_size=300) | upgrades().flatmap(lambda case: mutated(case[0])))
def test_any_head_gives_an_upgrade_or_a_refusal(head):
    result = parse_upgrade(head)  # raises nothing (a failure here is the defect)
    assert isinstance(result, (Upgrade, Refusal))
    if isinstance(result, Refusal):
        assert result.status in (400, 426)


def read_response(data: bytes):
    """(status, [(name, value)], body) as llhttp reads a response."""
    got = types.SimpleNamespace(headers=[], body=b"", complete=False)

    class Callbacks:
        def on_header(self, name, value):
            got.headers.append((name, value))

        def on_body(self, body):
            got.body += body

        def on_message_complete(self):
            got.complete = True

    parser = httptools.HttpResponseParser(Callbacks())
    parser.feed_data(data)
    return parser.get_status_code(), got.headers, got.body


header_pairs = st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=6)
# Well-formed names and values, some with a CR or LF put in (the injection
# every writer must refuse; names and values are otherwise the app's).
injected = st.lists(st.tuples(
    st.tuples(tokens, st.sampled_from(["", "\r\n", "\n", "\r"]), tokens).map(lambda t: "".join(t).encode()),
    st.tuples(values, st.sampled_from(["", "\r\n", "\nX-Evil: 1", "\r"]), values).map(
        lambda t: "".join(t).encode("latin-1")),
), max_size=4)


def safe(headers, *, drop_connection=False):
    return [(n, v) for n, v in headers
            if b"\r" not in n + v and b"\n" not in n + v and not (drop_connection and n.lower() == b"connection")]


@given(st.binary(min_size=16, max_size=16), header_pairs, st.none() | tokens)
def test_the_101_carries_the_accept_value_and_no_header_splits_it(raw_key, headers, subprotocol):
    key = base64.b64encode(raw_key)
    response = accept_response(key, headers, subprotocol)
    head, sep, rest = response.partition(b"\r\n\r\n")
    assert sep and rest == b""
    lines = head.split(b"\r\n")
    kept = safe(headers)
    assert len(lines) == 4 + (subprotocol is not None) + len(kept)
    assert lines[:4] == [
        b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()),
    ]
    assert lines[4 + (subprotocol is not None):] == [n + b": " + v for n, v in kept]


@given(st.sampled_from([400, 403, 426, 429, 500, 503, 418]), st.text(max_size=40),
       st.lists(st.tuples(tokens.map(str.encode), values.map(lambda v: v.encode("latin-1"))), max_size=3),
       injected)
def test_refusals_parse_to_their_status_headers_and_reason(status, reason, extra, hostile):
    data = refusal_response(status, reason, [*extra, *hostile])
    code, headers, body = read_response(data)
    assert code == status and body == reason.encode("utf-8")
    names = [n.lower() for n, _ in headers]
    assert names.count(b"connection") == 1 and headers[-1] == (b"Connection", b"close")
    sent = [(n, v) for n, v in [*extra, *safe(hostile)] if n.lower() != b"connection"]
    assert headers[:-1] == [*sent, (b"Content-Type", b"text/plain; charset=utf-8"),
                            (b"Content-Length", b"%d" % len(reason.encode("utf-8")))]
    head = response_head(status, hostile)
    assert len(head.split(b"\r\n")) == 1 + len(safe(hostile, drop_connection=True)) + 1 + 2


# -- the request read by the websocket protocol ----------------------------------


class CountingBuffer(bytearray):
    """The protocol's head buffer, counting the bytes its searches cover."""

    searched = 0

    def find(self, sub, start=0, end=None):
        CountingBuffer.searched += len(self) - start
        return super().find(sub, start) if end is None else super().find(sub, start, end)


def handshake(chunks: list[bytes]):
    """What the protocol made of a request read in `chunks`: the scope it
    gave the application, or the refusal it wrote; and the bytes searched."""
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)
        await send({"type": "websocket.close"})

    async def run():
        config = types.SimpleNamespace(loaded_app=app, root_path="", asgi_version="3.0", ws_max_size=1000)
        state = types.SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
        proto = LeanWebSocketProtocol(config, state, {})
        transport = FakeTransport()
        proto.connection_made(transport)
        CountingBuffer.searched = 0
        for chunk in chunks:
            if transport.closed:
                break
            before = proto._head
            if not before:
                CountingBuffer.searched += len(chunk)  # the first read is searched whole
            proto.data_received(chunk)
            if proto._head and type(proto._head) is bytearray:
                proto._head = CountingBuffer(proto._head)
        for _ in range(5):
            await asyncio.sleep(0)
        scope = seen[0] if seen else None
        if scope is not None:
            scope = {k: scope[k] for k in ("path", "raw_path", "query_string", "headers", "subprotocols")}
        return scope, None if seen else bytes(transport.take()), CountingBuffer.searched

    return asyncio.run(run())


@given(st.data(), upgrades() | st.binary(max_size=200).map(lambda b: (b, None)))
def test_a_request_read_in_any_segmentation_gives_the_same_scope_or_refusal(data, case):
    head = case[0] + b"\r\n\r\n"
    whole = handshake([head])
    assert whole[0] is not None or whole[1]  # served, or refused in words
    for chunks in (data.draw(segmentations(head)), byte_at_a_time(head)):
        scope, refusal, searched = handshake(chunks)
        assert (scope, refusal) == whole[:2]
        # Only new bytes are searched, with the three before them.
        assert searched <= len(head) + 3 * len(chunks), (len(head), len(chunks), searched)


@given(st.integers(MAX_REQUEST_BYTES + 1, 3 * MAX_REQUEST_BYTES), st.data())
def test_a_head_over_the_limit_is_refused_however_it_arrives(size, data):
    good = data.draw(upgrades())[0]
    head = good + b"\r\nX-Padding: " + b"a" * size + b"\r\n\r\n"
    for chunks in ([head], data.draw(segmentations(head, max_cuts=5))):
        scope, refusal, _ = handshake(chunks)
        assert scope is None and refusal.startswith(b"HTTP/1.1 400 "), (scope or {}).get("path")
