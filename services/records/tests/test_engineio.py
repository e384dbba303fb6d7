"""Engine.IO 4 byte vectors: every packet the core emits and accepts, the
polling payload, request refusals with engine.io's codes, ping timing and
the upgrade probe. (tests/integration/test_records_interop.py checks the
decoders against the reference parsers themselves.)"""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from channels_records import engineio as eio
from channels_records.engineio import Packet


def test_open_packet_bytes():
    packet = eio.open_packet("abcdefghijklmnopqrst", ["websocket"], 25000, 20000, 65536)
    assert packet.encode() == (
        b'0{"sid":"abcdefghijklmnopqrst","upgrades":["websocket"],"pingInterval":25000,'
        b'"pingTimeout":20000,"maxPayload":65536}'
    )
    assert eio.open_packet("s", [], 1, 2, 3) == '0{"sid":"s","upgrades":[],"pingInterval":1,"pingTimeout":2,"maxPayload":3}'


@pytest.mark.parametrize(
    ("kind", "data", "wire"),
    [
        (eio.OPEN, "", "0"),
        (eio.CLOSE, "", "1"),
        (eio.PING, "", "2"),
        (eio.PING, "probe", "2probe"),
        (eio.PONG, "probe", "3probe"),
        (eio.MESSAGE, '2["records",{}]', '42["records",{}]'),
        (eio.NOOP, "", "6"),
    ],
)
def test_packets_the_server_sends(kind, data, wire):
    assert eio.encode_packet(kind, data) == wire


@pytest.mark.parametrize(
    ("wire", "packet"),
    [
        ("3", Packet(eio.PONG)),
        ("2probe", Packet(eio.PING, "probe")),
        ("3probe", Packet(eio.PONG, "probe")),
        ("40", Packet(eio.MESSAGE, "0")),
        ('40{"pid":"p","offset":"1-0"}', Packet(eio.MESSAGE, '0{"pid":"p","offset":"1-0"}')),
        ("4", Packet(eio.MESSAGE, "")),
        ("1", Packet(eio.CLOSE)),
        ("5", Packet(eio.UPGRADE)),
        ("6", Packet(eio.NOOP)),
        ("0", Packet(eio.OPEN)),
        ("bAQID", Packet(eio.MESSAGE, b"\x01\x02\x03")),  # base64 binary (polling)
        (b"\x01\x02\x03", Packet(eio.MESSAGE, b"\x01\x02\x03")),  # a binary websocket message
        ("4é ✓", Packet(eio.MESSAGE, "é ✓")),
    ],
)
def test_packets_the_server_accepts(wire, packet):
    assert eio.decode_packet(wire) == packet


@pytest.mark.parametrize("wire", ["", "x", "9", "7", "b!!", "b" + "A", "\x1e"])
def test_malformed_packets_are_parse_errors(wire):
    with pytest.raises(eio.EngineIOProtocolError) as err:
        eio.decode_packet(wire)
    assert err.value.reason == "parse error"  # the close reason engine.io gives


def test_polling_payloads():
    assert eio.encode_payload(["0{}"]) == b"0{}"
    assert eio.encode_payload(["42[1]", "2", '42["é"]']) == b'42[1]\x1e2\x1e42["\xc3\xa9"]'
    assert eio.encode_binary_for_polling(b"\x01\x02\x03") == "bAQID"
    assert eio.decode_payload(b"4a\x1ebAQID\x1e2") == [
        Packet(eio.MESSAGE, "a"), Packet(eio.MESSAGE, b"\x01\x02\x03"), Packet(eio.PING)
    ]
    assert eio.decode_payload(b"3") == [Packet(eio.PONG)]
    assert eio.decode_payload(b"40\x1e3") == [Packet(eio.MESSAGE, "0"), Packet(eio.PONG)]


@pytest.mark.parametrize("body", [b"", b"\x1e\x1e4\x1e", b"40\x1e", b"4\xff", b"40\x1ex", b"\x1e"])
def test_malformed_payloads_are_refused_whole(body):
    with pytest.raises(eio.EngineIOProtocolError):
        eio.decode_payload(body)


@pytest.mark.parametrize(
    ("code", "status", "body"),
    [
        (eio.UNKNOWN_TRANSPORT, 400, b'{"code":0,"message":"Transport unknown"}'),
        (eio.UNKNOWN_SID, 400, b'{"code":1,"message":"Session ID unknown"}'),
        (eio.BAD_HANDSHAKE_METHOD, 400, b'{"code":2,"message":"Bad handshake method"}'),
        (eio.BAD_REQUEST, 400, b'{"code":3,"message":"Bad request"}'),
        (eio.FORBIDDEN, 403, b'{"code":4,"message":"Forbidden"}'),
        (eio.UNSUPPORTED_PROTOCOL_VERSION, 400, b'{"code":5,"message":"Unsupported protocol version"}'),
    ],
)
def test_refusals_as_engine_io_gives_them(code, status, body):
    assert eio.error_status(code) == status and eio.error_body(code) == body


SESSIONS = {"P": "polling", "W": "websocket"}


@pytest.mark.parametrize(
    ("query", "method", "upgrade", "expected"),
    [
        ("EIO=4&transport=polling", "GET", False, None),
        ("EIO=4&transport=websocket", "GET", True, None),
        ("EIO=4&transport=polling&sid=P", "GET", False, None),
        ("EIO=4&transport=polling&sid=P", "POST", False, None),
        ("EIO=4&transport=websocket&sid=P", "GET", True, None),  # the upgrade
        ("EIO=4", "GET", False, eio.UNKNOWN_TRANSPORT),
        ("EIO=4&transport=flash", "GET", False, eio.UNKNOWN_TRANSPORT),
        ("EIO=4&transport=polling&sid=nope", "GET", False, eio.UNKNOWN_SID),
        ("EIO=4&transport=polling&sid=nope", "POST", False, eio.UNKNOWN_SID),
        ("EIO=4&transport=polling", "POST", False, eio.BAD_HANDSHAKE_METHOD),
        ("EIO=4&transport=websocket", "GET", False, eio.BAD_REQUEST),
        ("EIO=4&transport=polling&sid=W", "GET", False, eio.BAD_REQUEST),  # upgraded already
        ("EIO=4&transport=polling&sid=P", "GET", True, eio.BAD_REQUEST),
        ("EIO=3&transport=polling", "GET", False, eio.UNSUPPORTED_PROTOCOL_VERSION),
        ("transport=polling", "GET", False, eio.UNSUPPORTED_PROTOCOL_VERSION),
    ],
)
def test_request_checks(query, method, upgrade, expected):
    assert eio.check_request(eio.parse_query(query), method, upgrade, SESSIONS.get) == expected


def test_query_parsing():
    q = eio.parse_query(b"EIO=4&transport=polling&t=abc&sid=xyz&channel_token=t")
    assert (q.eio, q.transport, q.sid, q.b64) == ("4", "polling", "xyz", False)


@pytest.mark.parametrize("query", [
    "EIO=4&transport=polling&sid=a%2Bb&b64=1",
    "EIO=4&EIO=3&transport=websocket",  # the first value wins
    "sid=&sid=second&transport=",  # blank values are left out
    "%45IO=4&trans%70ort=pol+ling&sid=a+b%20c",  # escapes in names and values
    "EIO&transport&b64",  # no values at all
    "sid=%ZZ%e2%82%ac%ff&t=\xe9",  # bad escapes, UTF-8, latin-1 bytes
    "&&EIO=4&&sid=x=y&",
    "",
])
def test_query_parsing_reads_as_parse_qs(query):
    values = parse_qs(query.encode("latin-1").decode("latin-1"))

    def first(name):
        return values[name][0] if name in values else None

    expected = (first("transport"), first("sid"), first("EIO"), first("b64") is not None)
    assert tuple(eio.parse_query(query.encode("latin-1"))) == expected
    assert eio.query_value(query, "sid") == first("sid")


def test_ping_clock():
    clock = eio.PingClock(interval=25, timeout=20, now=100)
    assert clock.tick(124.9) is None
    assert clock.tick(125) == eio.PING
    assert clock.tick(130) is None  # waiting for the PONG
    clock.pong(131)
    assert clock.tick(155.9) is None and clock.tick(156) == eio.PING
    assert clock.tick(175.9) is None
    assert clock.tick(176) == eio.PING_TIMEOUT  # no PONG within the timeout
    clock.pong(1)  # a PONG nobody asked for changes nothing
    other = eio.PingClock(25, 20, 0)
    other.pong(10)
    assert other.tick(25) == eio.PING


def test_upgrade_probe():
    probe = eio.UpgradeProbe()
    assert probe.feed(Packet(eio.PING, "probe")) == "probe"
    assert probe.feed(Packet(eio.NOOP)) is None
    assert probe.feed(Packet(eio.UPGRADE)) == "upgrade"
    assert probe.state == probe.DONE
    for first in (Packet(eio.PING), Packet(eio.UPGRADE), Packet(eio.MESSAGE, "0")):
        assert eio.UpgradeProbe().feed(first) == "fail"
    probe = eio.UpgradeProbe()
    probe.feed(Packet(eio.PING, "probe"))
    assert probe.feed(Packet(eio.MESSAGE, "0")) == "fail"
