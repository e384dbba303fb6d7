"""Byte vectors for every message type of the Hocuspocus wire protocol."""

import pytest
from channels_collab import protocol as p


@pytest.mark.parametrize(
    "value, encoded",
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (2**32, b"\x80\x80\x80\x80\x10")],
)
def test_var_uint(value, encoded):
    assert p.var_uint(value) == encoded
    assert p.Reader(encoded).var_uint() == value


def test_var_string_is_utf8_with_byte_length():
    assert p.var_string("é") == b"\x02\xc3\xa9"
    assert p.Reader(b"\x02\xc3\xa9").var_string() == "é"


# (frame bytes, decoded message): client-to-server and server-to-client.
VECTORS = [
    (b"\x03doc\x00\x00\x01\x00", p.Sync("doc", p.SyncStep.STEP1, b"\x00")),
    (b"\x03doc\x00\x01\x02\x00\x00", p.Sync("doc", p.SyncStep.STEP2, b"\x00\x00")),
    (b"\x03doc\x00\x02\x03abc", p.Sync("doc", p.SyncStep.UPDATE, b"abc")),
    (b"\x03doc\x04\x00\x01\x00", p.Sync("doc", p.SyncStep.STEP1, b"\x00", reply=True)),
    (b"\x03doc\x01\x02\x00\x00", p.Awareness("doc", b"\x00\x00")),
    (b"\x03doc\x02\x00\x03tok", p.Token("doc", "tok")),
    (b"\x03doc\x02\x00\x03tok\x054.8.0", p.Token("doc", "tok", "4.8.0")),
    (b"\x03doc\x02\x00\x00", p.Token("doc", "")),
    (b"\x03doc\x02\x00", p.AuthReply("doc", p.AuthType.TOKEN, None)),
    (b"\x03doc\x02\x01\x11permission-denied", p.AuthReply("doc", p.AuthType.PERMISSION_DENIED, "permission-denied")),
    (b"\x03doc\x02\x02\x0aread-write", p.AuthReply("doc", p.AuthType.AUTHENTICATED, "read-write")),
    (b"\x03doc\x02\x02\x08readonly", p.AuthReply("doc", p.AuthType.AUTHENTICATED, "readonly")),
    (b"\x03doc\x03", p.QueryAwareness("doc")),
    (b"\x03doc\x05\x02hi", p.Stateless("doc", "hi")),
    (b"\x03doc\x06\x02hi", p.BroadcastStateless("doc", "hi")),
    (b"\x03doc\x07", p.Close("doc")),
    (b"\x03doc\x07\x03bye", p.Close("doc", "bye")),
    (b"\x03doc\x08\x01", p.SyncStatus("doc", True)),
    (b"\x03doc\x08\x00", p.SyncStatus("doc", False)),
    (b"\x03doc\x09", p.DocumentPing("doc", pong=False)),
    (b"\x03doc\x0a", p.DocumentPing("doc", pong=True)),
    (b"\x03doc\x0b", p.Unknown("doc", 11)),
    (b"\x09", p.ConnectionPing()),
    (b"\x0a", p.ConnectionPong()),
    (b"\x07doc\x00abc\x03", p.QueryAwareness("doc\0abc")),
]


@pytest.mark.parametrize("frame, message", VECTORS)
def test_decode(frame, message):
    assert p.decode(frame) == message


def test_encoders_match_the_vectors():
    assert p.encode_sync_step1("doc", b"\x00") == b"\x03doc\x00\x00\x01\x00"
    assert p.encode_sync_step2("doc", b"\x00\x00") == b"\x03doc\x00\x01\x02\x00\x00"
    assert p.encode_update("doc", b"abc") == b"\x03doc\x00\x02\x03abc"
    assert p.encode_sync("doc", p.SyncStep.STEP1, b"\x00", reply=True) == b"\x03doc\x04\x00\x01\x00"
    assert p.encode_awareness("doc", b"\x00\x00") == b"\x03doc\x01\x02\x00\x00"
    assert p.encode_token("doc", "tok") == b"\x03doc\x02\x00\x03tok"
    assert p.encode_token("doc", "tok", "4.8.0") == b"\x03doc\x02\x00\x03tok\x054.8.0"
    assert p.encode_token_request("doc") == b"\x03doc\x02\x00"
    assert p.encode_permission_denied("doc", "permission-denied") == b"\x03doc\x02\x01\x11permission-denied"
    assert p.encode_authenticated("doc", "read-write") == b"\x03doc\x02\x02\x0aread-write"
    assert p.encode_query_awareness("doc") == b"\x03doc\x03"
    assert p.encode_stateless("doc", "hi") == b"\x03doc\x05\x02hi"
    assert p.encode_close("doc", "bye") == b"\x03doc\x07\x03bye"
    assert p.encode_sync_status("doc", True) == b"\x03doc\x08\x01"
    assert p.encode_sync_status("doc", False) == b"\x03doc\x08\x00"
    assert p.PING_FRAME == b"\x09" and p.PONG_FRAME == b"\x0a"


def test_long_addresses_use_multi_byte_lengths():
    name = "comment-" + "1" * 150
    frame = p.encode_query_awareness(name)
    assert frame[:2] == b"\x9e\x01"  # 158 as a varUint
    assert p.decode(frame) == p.QueryAwareness(name)


def test_trailing_bytes_are_tolerated():
    # Newer providers append fields; the frame is still understood.
    assert p.decode(b"\x03doc\x03\xff\xff") == p.QueryAwareness("doc")


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x03do",  # address cut short
        b"\x03doc",  # no type
        b"\x03doc\x00",  # sync without step
        b"\x03doc\x00\x03\x01\x00",  # unknown sync step
        b"\x03doc\x00\x02\x05ab",  # update cut short
        b"\x03doc\x02",  # auth without subtype
        b"\x03doc\x02\x07",  # unknown auth subtype
        b"\x03doc\x02\x00\x05to",  # token cut short
        b"\x03doc\x05",  # stateless without payload
        b"\x02\xc3\x28\x03",  # address is not UTF-8
        b"\x03doc\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varUint too long
        b"\x0b",  # one byte that is no ping/pong
    ],
)
def test_malformed_frames_raise(frame):
    with pytest.raises(p.HocuspocusProtocolError):
        p.decode(frame)


def test_split_address():
    assert p.split_address("comment-1") == ("comment-1", None)
    assert p.split_address("comment-1\0s1") == ("comment-1", "s1")


def test_state_vector():
    assert p.decode_state_vector(b"\x00") == {}
    assert p.decode_state_vector(b"\x02\x01\x05\xac\x02\x01") == {1: 5, 300: 1}
    with pytest.raises(p.HocuspocusProtocolError):
        p.decode_state_vector(b"\x05\x01")


def test_awareness_update():
    update = b"\x02" + b"\x05\x02\x0e" + b'{"user":"ann"}' + b"\x06\x03\x04null"
    assert p.decode_awareness_update(update) == [
        p.AwarenessEntry(5, 2, {"user": "ann"}),
        p.AwarenessEntry(6, 3, None),
    ]


@pytest.mark.parametrize("update", [b"", b"\x01\x05", b"\x01\x05\x02\x05{bad}", b"\x01\x05\x02\x09{\"a\":", b"\xff\x01",
                                    b"\x01\x05\x02\xa0\x9c\x01" + b"[" * 20_000])
def test_bad_awareness_update_raises(update):
    with pytest.raises(p.HocuspocusProtocolError):
        p.decode_awareness_update(update)


def test_token_never_shows_in_a_repr():
    message = p.decode(p.encode_token("doc", "1,very-secret"))
    assert message.token == "1,very-secret"
    assert "very-secret" not in repr(message)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 16_383, 16_384, 70_000])
@pytest.mark.parametrize("address", ["d", "a" * 127, "a" * 128, "doc\0session"])
def test_sync_frames_of_every_length_class_decode_alike_on_both_paths(size, address):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = p.encode_sync(address, p.SyncStep.UPDATE, payload)
    assert p.decode(frame) == p._decode_with_reader(frame) == p.Sync(address, p.SyncStep.UPDATE, payload)
    # Cut anywhere, both refuse it alike.
    for cut in {1, len(frame) // 2, len(frame) - 1}:
        with pytest.raises(p.HocuspocusProtocolError):
            p.decode(frame[:cut])
