"""The opening handshake against RFC 6455's example and hostile requests."""

from __future__ import annotations

from channels_common.wshandshake import (
    Refusal,
    Upgrade,
    accept_response,
    accept_value,
    parse_upgrade,
    refusal_response,
    response_head,
)

GOOD = (
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
    b"Host: server.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Origin: http://example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Version: 13"
)


def test_rfc_example_accept_value():
    # RFC 6455 1.3.
    assert accept_value(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_good_request():
    up = parse_upgrade(GOOD)
    assert isinstance(up, Upgrade)
    assert up.target == b"/socket.io/?EIO=4&transport=websocket"
    assert (b"origin", b"http://example.com") in up.headers
    assert up.subprotocols == ["chat", "superchat"]
    response = accept_response(up.key, [(b"X-A", b"1"), (b"X-Bad", b"a\r\nInjected: 1")], "chat")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"Sec-WebSocket-Protocol: chat\r\n" in response and b"X-A: 1\r\n" in response
    assert b"Injected" not in response and response.endswith(b"\r\n\r\n")


def test_refusals():
    cases = {
        GOOD.replace(b"GET ", b"POST "): 400,
        GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c"): 400,
        GOOD.replace(b"keep-alive, Upgrade", b"keep-alive"): 400,
        GOOD.replace(b"Version: 13", b"Version: 8"): 426,
        GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"): 400,
        GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!!!!!!!!!!!!!!!!!!!!!!"): 400,
        GOOD + b"\r\nno colon here": 400,
        b"\x00\xff garbage": 400,
    }
    for request, status in cases.items():
        result = parse_upgrade(request)
        assert isinstance(result, Refusal) and result.status == status, request
    refusal = parse_upgrade(GOOD.replace(b"Version: 13", b"Version: 8"))
    response = refusal_response(refusal.status, refusal.reason, refusal.extra_headers)
    assert response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Sec-WebSocket-Version: 13\r\n" in response and b"Connection: close\r\n" in response


def test_response_head_closes_and_drops_headers_that_would_split_it():
    head = response_head(429, [(b"Retry-After", b"3"), (b"X-Evil", b"a\r\nSet-Cookie: x"), (b"Connection", b"keep-alive")])
    assert head == b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nConnection: close\r\n\r\n"
    assert response_head(418).startswith(b"HTTP/1.1 418 Error\r\n")
