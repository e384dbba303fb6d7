"""Byte vectors for the Socket.IO packets, the relay's validation, rooms."""

from __future__ import annotations

import json

import pytest
from channels_common.auth import ChannelUser
from channels_records.protocol import RecoveryRequest, encode_connect, encode_event, parse_recovery
from channels_records.relay import Broadcast, Dropped, parse_message
from channels_records.rooms import rooms_for


def test_event_packet_embeds_the_payload_text_and_appends_the_offset():
    assert encode_event("records", '{"room":"g-1","records":{}}') == '2["records",{"room":"g-1","records":{}}]'
    assert encode_event("notice", '{"a": 1}', "1700000000000-3") == '2["notice",{"a": 1},"1700000000000-3"]'
    # Whatever the payload, the packet is one valid JSON array after the type.
    packet = encode_event("records", '{"x": "quote \\" and \\u2028"}', "5-0")
    assert json.loads(packet[1:]) == ["records", {"x": 'quote " and \u2028'}, "5-0"]


def test_connect_packet_with_and_without_pid():
    assert encode_connect("abc") == '0{"sid":"abc"}'
    assert encode_connect("abc", "p1d") == '0{"sid":"abc","pid":"p1d"}'


@pytest.mark.parametrize(
    "auth, expected",
    [
        ({"pid": "p" * 32, "offset": "17-0"}, RecoveryRequest("p" * 32, "17-0")),
        ({"pid": "p" * 32}, RecoveryRequest("p" * 32, None)),
        (None, None),
        ("pid", None),
        ({"offset": "1-0"}, None),
        ({"pid": 5, "offset": "1-0"}, None),
        ({"pid": "", "offset": "1-0"}, None),
        ({"pid": "x" * 500}, None),
        ({"pid": "ok-pid-value", "offset": 12}, None),
        ({"pid": "ok-pid-value", "offset": "1\n0"}, None),
    ],
)
def test_parse_recovery(auth, expected):
    assert parse_recovery(auth) == expected


def test_records_message_is_relayed_verbatim_to_its_room():
    data = b'{"room": "group-1", "records": {"discussions": [{"id": 1}]}}'
    assert parse_message("/records", data) == Broadcast("group-1", "records", data.decode())


@pytest.mark.parametrize(
    "channel, data, reason",
    [
        ("/records", b"{nope", "not_json"),
        ("/records", b"", "not_json"),
        ("/records", b"[1]", "not_object"),
        ("/records", b"null", "not_object"),
        ("/records", b'{"records": {}}', "no_room"),
        ("/records", b'{"room": "", "records": {}}', "no_room"),
        ("/records", b'{"room": ["g"], "records": {}}', "no_room"),
        ("/records", b'{"room": "g\\n1", "records": {}}', "bad_room"),
        ("/records", b'{"room": "g-1", "records": NaN}', "not_json"),
        ("/records", b'{"room": "g-1", "records": Infinity}', "not_json"),
        ("/records", b"\xc3\x28", "not_utf8"),
        ("/records", b"[" * 100000 + b"]" * 100000, "not_json"),
        ("/system_notice", b"not json", "not_json"),
        ("/elsewhere", b"{}", "unknown_channel"),
    ],
)
def test_bad_messages_are_dropped_with_a_reason(channel, data, reason):
    assert parse_message(channel, data) == Dropped(reason)


def test_any_json_notice_goes_to_everyone():
    assert parse_message("/system_notice", b' {"type": "maintenance"}\n') == Broadcast(
        "notice", "notice", '{"type": "maintenance"}'
    )


def test_rooms_from_the_token_user():
    assert rooms_for(None) == ["notice"]
    assert rooms_for(ChannelUser(id=None, group_ids=())) == ["notice"]
    assert rooms_for(ChannelUser(id=7, group_ids=(1, 2, 1))) == ["notice", "user-7", "group-1", "group-2"]
