"""Server frames against byte vectors of RFC 6455 (section 5.7 and the
length encodings of 5.2)."""

from __future__ import annotations

import pytest
from channels_common.wsframe import OP_TEXT, frame_header, text_frame

from tests.support import MASK_KEY, masked


def test_rfc_example_single_frame_unmasked_text():
    # RFC 6455 5.7: "A single-frame unmasked text message" containing "Hello".
    assert text_frame(b"Hello") == bytes.fromhex("810548656c6c6f")


def test_empty_and_125_byte_payloads_use_the_7_bit_length():
    assert text_frame(b"") == b"\x81\x00"
    assert text_frame(b"a" * 125)[:2] == b"\x81\x7d"
    assert len(text_frame(b"a" * 125)) == 127


def test_126_to_65535_bytes_use_the_16_bit_length():
    assert frame_header(OP_TEXT, 126) == b"\x81\x7e\x00\x7e"
    assert frame_header(OP_TEXT, 65535) == b"\x81\x7e\xff\xff"
    # RFC 6455 5.7: 256 bytes binary message in a single unmasked frame.
    assert frame_header(0x2, 256) == bytes.fromhex("827e0100")


def test_65536_bytes_and_more_use_the_64_bit_length():
    assert frame_header(OP_TEXT, 65536) == b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
    # RFC 6455 5.7: 64KiB binary message in a single unmasked frame.
    assert frame_header(0x2, 65536) == bytes.fromhex("827f0000000000010000")
    assert frame_header(OP_TEXT, 2**63 - 1)[2:] == b"\x7f" + b"\xff" * 7
    with pytest.raises(ValueError):
        frame_header(OP_TEXT, 2**63)


def test_utf8_payload_length_counts_bytes_not_characters():
    payload = '42["records",{"t":"héllo ✓"}]'.encode()
    frame = text_frame(payload)
    assert frame[1] == len(payload) and frame[2:] == payload


# -- client frames -------------------------------------------------------------

from channels_common.wsframe import (
    Close,
    FrameParser,
    Message,
    Ping,
    WebSocketProtocolError,
    close_frame,
    pong_frame,
)

KEY = MASK_KEY


def test_rfc_example_masked_hello():
    # RFC 6455 5.7: "A single-frame masked text message" containing "Hello".
    assert FrameParser(100).feed(bytes.fromhex("818537fa213d7f9f4d5158")) == [Message("Hello")]


def test_rfc_example_fragmented_unmasked_is_refused_but_masked_fragments_join():
    p = FrameParser(100)
    with pytest.raises(WebSocketProtocolError) as e:
        p.feed(bytes.fromhex("010348656c"))  # RFC 5.7 fragment, unmasked: not from a client
    assert e.value.code == 1002
    p = FrameParser(100)
    assert p.feed(masked(0x01, b"Hel")) == []
    assert p.feed(masked(0x89, b"mid")) == [Ping(b"mid")]  # control frames may interleave
    assert p.feed(masked(0x80, b"lo")) == [Message("Hello")]


def test_byte_at_a_time_and_several_frames_in_one_read():
    data = masked(0x81, b"a" * 200) + masked(0x82, b"\x00\x01") + masked(0x8A, b"pong")
    p = FrameParser(1000)
    events = []
    for i in range(len(data)):
        events += p.feed(data[i:i + 1])
    assert events == [Message("a" * 200), Message(b"\x00\x01")]  # pongs are swallowed
    assert FrameParser(1000).feed(data) == events


def test_16_and_64_bit_lengths():
    big = b"x" * 70000
    assert FrameParser(100000).feed(masked(0x82, big)) == [Message(big)]
    assert FrameParser(1000).feed(masked(0x81, b"y" * 300)) == [Message("y" * 300)]


def test_close_frames():
    assert FrameParser(10).feed(masked(0x88, b"")) == [Close(1005)]
    assert FrameParser(10).feed(masked(0x88, b"\x03\xe8bye") + masked(0x81, b"late")) == [Close(1000, "bye")]
    assert FrameParser(10).feed(masked(0x88, (4000).to_bytes(2, "big"))) == [Close(4000)]
    for payload, code in [(b"\x03", 1002), (b"\x03\xed", 1002), (b"\x00\x00", 1002), (b"\x03\xe8\xff", 1007)]:
        with pytest.raises(WebSocketProtocolError) as e:
            FrameParser(10).feed(masked(0x88, payload))
        assert e.value.code == code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(0xC1, b"x"), 1002),  # RSV1 without an extension
        (masked(0x83, b"x"), 1002),  # reserved data opcode
        (masked(0x8B, b"x"), 1002),  # reserved control opcode
        (masked(0x09, b"x"), 1002),  # fragmented ping
        (masked(0x89, b"x" * 126), 1002),  # control payload over 125
        (masked(0x80, b"x"), 1002),  # continuation of nothing
        (masked(0x01, b"a") + masked(0x81, b"b"), 1002),  # new message inside a fragmented one
        (masked(0x81, b"\xc3\x28"), 1007),  # invalid UTF-8
        (masked(0x81, b"x" * 11), 1009),  # over max_size
        (masked(0x01, b"x" * 6) + masked(0x80, b"x" * 6), 1009),  # over max_size in fragments
        (bytes((0x82, 0xFF)) + b"\x80" + b"\x00" * 7 + KEY, 1002),  # 64-bit length with the top bit set
    ],
)
def test_protocol_errors(frame, code):
    with pytest.raises(WebSocketProtocolError) as e:
        FrameParser(10).feed(frame)
    assert e.value.code == code


def test_too_big_is_refused_from_the_header_before_the_payload_arrives():
    with pytest.raises(WebSocketProtocolError) as e:
        FrameParser(1000).feed(bytes((0x82, 0xFF)) + (2**40).to_bytes(8, "big"))
    assert e.value.code == 1009


def test_server_control_frames():
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(1002, "bad") == b"\x88\x05\x03\xeabad"
    assert close_frame(1005) == b"\x88\x00"
    long = close_frame(1000, "é" * 100)
    assert len(long) <= 2 + 125 and long[4:].decode("utf-8") == "é" * 61
    assert pong_frame(b"hi") == b"\x8a\x02hi"


# -- segmentation: same events, linear work -------------------------------------


def feed_all(parser: FrameParser, chunks) -> list:
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def test_a_frame_trickled_a_byte_at_a_time_or_in_small_reads_copies_about_what_it_does_fed_whole():
    # Copies counted, not time: the old parser joined its whole pending buffer
    # with each read, ~n^2/2 bytes copied (3.4e10 for 256 KiB a byte at a time).
    # Trickled, each byte is copied in once, at most twice more as the buffer
    # doubles, and out once with the payload: under 4x, plus a read or two.
    for size, step in [(256 * 1024, 1), (10 * 1024 * 1024, 1024)]:
        payload = bytes(range(256)) * (size // 256)
        frame = masked(0x82, payload)
        whole = FrameParser(size)
        assert whole.feed(frame) == [Message(payload)]
        assert whole.bytes_copied == size  # the payload, taken out once
        trickled = FrameParser(size)
        events = feed_all(trickled, (frame[i:i + step] for i in range(0, len(frame), step)))
        assert events == [Message(payload)]
        assert size < trickled.bytes_copied <= 4 * whole.bytes_copied + 2 * step + 64, (size, step, trickled.bytes_copied)


def test_trickled_frames_among_others_copy_a_constant_amount_per_byte():
    # Several frames of mixed sizes, cut into reads that never line up with them.
    frames = [masked(0x82, bytes([i]) * n) for i, n in enumerate([70000, 3, 125, 126, 65535, 1, 200000, 0])]
    data = b"".join(frames)
    for step in (1, 7, 1000, 4096, 65537):
        p = FrameParser(1 << 20)
        events = feed_all(p, (data[i:i + step] for i in range(0, len(data), step)))
        assert events == [Message(bytes([i]) * n) for i, n in enumerate([70000, 3, 125, 126, 65535, 1, 200000, 0])]
        assert p.bytes_copied <= 4 * len(data) + 8 * 2 * step, (step, p.bytes_copied)


STREAM = (
    masked(0x01, b"He")  # text, first fragment
    + masked(0x89, b"mid")  # ping between fragments
    + masked(0x00, b"l")  # continuation, not final
    + masked(0x8A, b"pong")  # pong between fragments: swallowed
    + masked(0x80, b"lo")  # final continuation
    + masked(0x82, bytes(range(130)))  # 16-bit length
    + masked(0x02, b"ab")  # binary, first fragment
    + masked(0x89, b"")  # empty ping
    + masked(0x80, b"cd")
    + masked(0x81, "✓".encode())  # a UTF-8 character
    + masked(0x88, b"\x03\xe8bye")
)
STREAM_EVENTS = [
    Ping(b"mid"), Message("Hello"), Message(bytes(range(130))), Ping(b""), Message(b"abcd"), Message("✓"),
    Close(1000, "bye"),
]


def test_fragments_and_interleaved_control_frames_split_at_every_byte_boundary():
    assert FrameParser(1000).feed(STREAM) == STREAM_EVENTS
    assert feed_all(FrameParser(1000), (STREAM[i:i + 1] for i in range(len(STREAM)))) == STREAM_EVENTS
    for i in range(len(STREAM) + 1):
        assert feed_all(FrameParser(1000), [STREAM[:i], STREAM[i:]]) == STREAM_EVENTS, i


def test_every_three_way_split_of_a_small_fragmented_message():
    data = masked(0x01, b"ab") + masked(0x89, b"p") + masked(0x80, b"cd") + masked(0x82, b"\x00" * 126)
    expected = [Ping(b"p"), Message("abcd"), Message(b"\x00" * 126)]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert feed_all(FrameParser(1000), [data[:i], data[i:j], data[j:]]) == expected, (i, j)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(0x89, b"x" * 126), 1002),
        (masked(0x01, b"a") + masked(0x89, b"p") + masked(0x81, b"b"), 1002),
        (masked(0x81, b"ok") + masked(0x81, b"\xc3\x28"), 1007),
        (masked(0x01, b"x" * 6) + masked(0x89, b"") + masked(0x80, b"x" * 6), 1009),
        (masked(0x82, b"y" * 200), 1009),
    ],
)
def test_errors_are_the_same_wherever_the_reads_are_cut(frame, code):
    for i in range(len(frame) + 1):
        with pytest.raises(WebSocketProtocolError) as e:
            feed_all(FrameParser(10), [frame[:i], frame[i:]])
        assert e.value.code == code, i


def test_too_big_is_refused_on_the_last_header_byte_when_the_header_trickles_in():
    header = bytes((0x82, 0xFF)) + (2**40).to_bytes(8, "big")
    p = FrameParser(1000)
    for byte in header[:-1]:
        assert p.feed(bytes([byte])) == []
    with pytest.raises(WebSocketProtocolError) as e:
        p.feed(header[-1:])
    assert e.value.code == 1009


def test_a_message_of_many_empty_or_one_byte_fragments_holds_its_bytes_not_an_object_per_fragment():
    # It held a list entry per fragment (and a bytes object per non-empty
    # one): 20,000 fragments of a 10,001-byte message held ~1 MB, unbounded
    # for empty ones, whatever max_size said.
    import tracemalloc

    p = FrameParser(1 << 20)
    assert p.feed(masked(0x02, b"a")) == []
    tracemalloc.start()
    try:
        for _ in range(10):
            assert p.feed((masked(0x00, b"") + masked(0x00, b"b")) * 1000) == []
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2 * 10001 + 8192, held
    assert p.feed(masked(0x80, b"c")) == [Message(b"a" + b"b" * 10000 + b"c")]
