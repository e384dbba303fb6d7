"""Socket.IO 5 byte vectors: what the server accepts from clients (and the
reference parser's error for each malformed packet), and what it answers."""

from __future__ import annotations

import pytest
from channels_records import socketio as sio
from channels_records.protocol import encode_connect, encode_event
from channels_records.socketio import Packet

# (wire, packet) the server accepts; every one of them the reference parser
# decodes to the same thing (tests/integration/test_records_interop.py).
ACCEPTED = [
    ("0", Packet(sio.CONNECT)),
    ("", Packet(sio.CONNECT)),
    ("0{}", Packet(sio.CONNECT, data={})),
    ('0{"pid":"abc","offset":"1700000000000-0"}', Packet(sio.CONNECT, data={"pid": "abc", "offset": "1700000000000-0"})),
    ("0/admin,{}", Packet(sio.CONNECT, "/admin", data={})),
    ("0/admin", Packet(sio.CONNECT, "/admin")),
    ("1", Packet(sio.DISCONNECT)),
    ('2["a"]', Packet(sio.EVENT, data=["a"])),
    ("2[1]", Packet(sio.EVENT, data=[1])),
    ('212["a"]', Packet(sio.EVENT, id=12, data=["a"])),
    ('2/admin,7["x"]', Packet(sio.EVENT, "/admin", 7, ["x"])),
    ("3[]", Packet(sio.ACK, data=[])),
    ('4{"message":"x"}', Packet(sio.CONNECT_ERROR, data={"message": "x"})),
    ('4"x"', Packet(sio.CONNECT_ERROR, data="x")),
]

# (wire, the reference parser's error message)
REFUSED = [
    ("0null", "invalid payload"),
    ("0[]", "invalid payload"),
    ('0"x"', "invalid payload"),
    ("0false", "invalid payload"),
    ("0{not json", "invalid payload"),
    ("1{}", "invalid payload"),
    ("2[]", "invalid payload"),
    ('2["connect"]', "invalid payload"),
    ('2["disconnecting"]', "invalid payload"),
    ("2[true]", "invalid payload"),
    ("2[", "invalid payload"),
    ('2["a",NaN]', "invalid payload"),
    ("2{}", "invalid payload"),
    ("3{}", "invalid payload"),
    ("5-[]", "Illegal attachments"),
    ("5x-[]", "Illegal attachments"),
    ("7", "unknown packet type 7"),
    ("9[]", "unknown packet type 9"),
    ("x", "unknown packet type NaN"),
    ("4" + "[" * 5000 + "]" * 5000, "invalid payload"),
]


@pytest.mark.parametrize(("wire", "packet"), ACCEPTED)
def test_packets_accepted(wire, packet):
    assert sio.decode(wire) == packet


@pytest.mark.parametrize(("wire", "message"), REFUSED)
def test_malformed_packets_get_the_reference_parsers_error(wire, message):
    with pytest.raises(sio.SocketIOProtocolError) as err:
        sio.decode(wire)
    assert str(err.value) == message


def test_what_the_server_refuses_beyond_the_reference_parser():
    # Binary attachments (the reference waits for them): never buffered here.
    with pytest.raises(sio.SocketIOProtocolError, match="binary packets are not accepted"):
        sio.decode('51-["a",{"_placeholder":true,"num":0}]')
    with pytest.raises(sio.SocketIOProtocolError, match="got binary data"):
        sio.decode(b"\x01")
    with pytest.raises(sio.SocketIOProtocolError, match="invalid ack id"):
        sio.decode("2" + "9" * 40 + '["a"]')


def test_packets_the_server_sends():
    assert encode_connect("SID") == '0{"sid":"SID"}'
    assert encode_connect("SID", "PID") == '0{"sid":"SID","pid":"PID"}'
    assert encode_event("records", '{"room":"g"}') == '2["records",{"room":"g"}]'
    assert encode_event("records", '{"room":"g"}', "1-0") == '2["records",{"room":"g"},"1-0"]'
    assert sio.encode_connect_error("Invalid namespace", "/admin") == '4/admin,{"message":"Invalid namespace"}'
    assert sio.encode_connect_error("Invalid namespace") == '4{"message":"Invalid namespace"}'
    assert sio.encode_disconnect() == "1"
    assert sio.encode_disconnect("/x") == "1/x,"
