"""Properties of the RFC 6455 frame parser and the server frame encoders:
any bytes give events or a WebSocketProtocolError; any segmentation gives
the same outcome as the whole, copying a bounded number of bytes per byte;
declared lengths past the limit are refused from the header, and a
fragmented message holds memory in proportion to its payload, however many
fragments carry it."""

from __future__ import annotations

import itertools
import tracemalloc

from channels_common.closecodes import APPLICATION_RANGE, SENDABLE
from channels_common.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Close,
    FrameParser,
    Message,
    Ping,
    WebSocketProtocolError,
    binary_frame,
    close_frame,
    frame_header,
    pong_frame,
    text_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import byte_at_a_time, mutated, segmentations
from tests.support import masked

MAX = 4096


def outcome(chunks, max_size: int = MAX):
    """Events until a Close, and the close code of a protocol error (None
    when there was none): what the socket does with these reads."""
    parser = FrameParser(max_size)
    events = []
    for chunk in chunks:
        try:
            new = parser.feed(chunk)
        except WebSocketProtocolError as exc:
            return events, exc.code
        events += new
        if new and type(new[-1]) is Close:
            return events, None
    return events, None


keys = st.binary(min_size=4, max_size=4)


@st.composite
def messages(draw):
    """One client message as frames (maybe fragmented, with control frames
    between fragments) and the events it must give."""
    binary = draw(st.booleans())
    if binary:
        data = draw(st.binary(max_size=300) | st.binary(min_size=126, max_size=140))
    else:
        data = draw(st.text(max_size=120)).encode("utf-8")
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    points = [0, *cuts, len(data)]
    parts = [data[a:b] for a, b in itertools.pairwise(points)]
    frames, events = [], []
    for i, part in enumerate(parts):
        fin = 0x80 if i == len(parts) - 1 else 0
        opcode = (OP_BINARY if binary else OP_TEXT) if i == 0 else 0
        frames.append(masked(fin | opcode, part, draw(keys)))
        if fin:
            break
        if draw(st.booleans()):
            ping = draw(st.binary(max_size=125))
            frames.append(masked(0x80 | OP_PING, ping, draw(keys)))
            events.append(Ping(ping))
        if draw(st.booleans()):
            frames.append(masked(0x80 | 0xA, draw(st.binary(max_size=20)), draw(keys)))  # pong: swallowed
    events.append(Message(data if binary else data.decode("utf-8")))
    return b"".join(frames), events


close_codes = st.sampled_from(sorted(SENDABLE)) | st.integers(APPLICATION_RANGE.start, APPLICATION_RANGE.stop - 1)


@st.composite
def streams(draw):
    """Several messages, maybe ending with a close frame."""
    data, events = b"", []
    for frames, expected in draw(st.lists(messages(), max_size=5)):
        data += frames
        events += expected
    if draw(st.booleans()):
        code, reason = draw(close_codes), draw(st.text(max_size=30))
        data += masked(0x80 | OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8"), draw(keys))
        events.append(Close(code, reason))
    return data, events


@given(st.data(), streams())
def test_valid_streams_give_their_events_however_they_are_cut(data, stream):
    frames, events = stream
    assert outcome([frames]) == (events, None)
    assert outcome(data.draw(segmentations(frames))) == (events, None)


@given(st.binary(max_size=400) | streams().flatmap(lambda s: mutated(s[0])), st.data())
def test_any_bytes_give_events_or_a_protocol_error_and_the_same_outcome_however_cut(raw, data):
    # A read that breaks the protocol raises, so the events of its earlier
    # frames are not returned (the socket is failed anyway): cut finer, more
    # of them come out before the same error, never other events.
    whole = outcome([raw])  # raises nothing else (a failure here is the defect)
    assert whole[1] is None or whole[1] in (1002, 1007, 1009)
    finest = outcome(byte_at_a_time(raw))
    cut = outcome(data.draw(segmentations(raw)))
    for events, code in (cut, finest):
        assert code == whole[1]
        if code is None:
            assert events == whole[0]
        else:
            assert events == finest[0][:len(events)]


@st.composite
def big_streams(draw):
    sizes = draw(st.lists(st.integers(0, 3000) | st.sampled_from([125, 126, 127, 65535, 65536, 70000]),
                          min_size=1, max_size=4))
    return b"".join(masked(0x82, bytes([i % 256]) * n) for i, n in enumerate(sizes)), sizes


@given(big_streams(), st.data())
def test_segmented_input_copies_a_bounded_number_of_bytes_per_byte(stream, data):
    # Each byte: in once, at most twice more while a held frame doubles, out
    # once with its payload, once more in the rest of a read that completed
    # a held frame or as the tail kept of one: 6 in all, plus a few headers.
    frames, sizes = stream
    chunkings = [[frames], data.draw(segmentations(frames, max_cuts=200))]
    if len(frames) < 20000:
        chunkings.append(byte_at_a_time(frames))
    for chunks in chunkings:
        parser = FrameParser(1 << 20)
        events = []
        for chunk in chunks:
            events += parser.feed(chunk)
        assert events == [Message(bytes([i % 256]) * n) for i, n in enumerate(sizes)]
        assert parser.bytes_copied <= 6 * len(frames) + 64, (len(frames), len(chunks), parser.bytes_copied)


def as_client(server_frame: bytes) -> bytes:
    """A server (unmasked) frame as a client would send it: mask bit set,
    an all-zero key (which leaves the payload as it is)."""
    first, second = server_frame[0], server_frame[1]
    header = 2 + {126: 2, 127: 8}.get(second & 0x7F, 0)
    return bytes((first, second | 0x80)) + server_frame[2:header] + b"\0\0\0\0" + server_frame[header:]


@given(st.text(max_size=200) | st.text(min_size=70, max_size=80).map(lambda t: t * 1000))
def test_server_text_and_binary_frames_decode_to_their_payload(text):
    payload = text.encode("utf-8")
    size = len(payload) + 1
    assert FrameParser(size).feed(as_client(text_frame(payload))) == [Message(text)]
    assert FrameParser(size).feed(as_client(binary_frame(payload))) == [Message(payload)]
    header = frame_header(OP_TEXT, len(payload))
    assert len(header) == (2 if len(payload) < 126 else 4 if len(payload) < 65536 else 10)


@given(close_codes, st.text(max_size=130), st.binary(max_size=125))
def test_server_close_and_control_frames_decode_to_what_they_carry(code, reason, ping):
    [event] = FrameParser(10).feed(as_client(close_frame(code, reason)))
    # At most 123 bytes of reason, cut on a character boundary.
    assert event.code == code and reason.startswith(event.reason)
    assert len(event.reason.encode("utf-8")) <= 123 < len(event.reason.encode("utf-8")) + 4 or event.reason == reason
    assert FrameParser(10).feed(as_client(close_frame(1005))) == [Close(1005)]
    assert FrameParser(10).feed(as_client(pong_frame(ping))) == []  # pongs are swallowed
    assert FrameParser(10).feed(as_client(frame_header(OP_PING, len(ping)) + ping)) == [Ping(ping)]


@given(st.integers(1, 1 << 20), st.integers(1, 2**63 - 1), st.booleans(), st.data())
def test_a_declared_length_over_the_limit_is_refused_from_the_header_alone(max_size, over, fragment, data):
    length = max_size + over if max_size + over < 2**63 else 2**63 - 1
    if length < 65536:
        header = bytes((0x82, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x82, 0x80 | 127)) + length.to_bytes(8, "big")
    parser = FrameParser(max_size)
    if fragment:  # the limit is on the message: earlier fragments count
        first = data.draw(st.integers(0, min(max_size, 200)))
        assert parser.feed(masked(0x02, b"x" * first)) == []
        length = max_size - first + 1
        header = bytes((0x80, 0x80 | 127)) + length.to_bytes(8, "big")
    tracemalloc.start()
    try:
        try:
            parser.feed(header + b"\x01\x02\x03\x04" + b"y" * 10)
        except WebSocketProtocolError as exc:
            assert exc.code == 1009
        else:
            raise AssertionError("a message over the limit was not refused")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024  # nothing allocated for the declared length


@settings(max_examples=20)  # 40 cases in all; each traces thousands of frames
@given(st.integers(1, 5), st.booleans(), st.sampled_from([0, 1, 2, 4]))
def test_a_fragmented_message_holds_memory_in_proportion_to_its_payload(rounds, with_empty, size):
    # Many fragments of a few bytes (or none) must cost what their bytes
    # cost, not a Python object each: the message is bounded by max_size in
    # bytes, and its memory must be too.
    batch = masked(0x00, b"z" * size) * 400 + (masked(0x00, b"") * 400 if with_empty else b"")
    parser = FrameParser(64 * 1024)
    parser.feed(masked(0x02, b"a"))
    tracemalloc.start()
    try:
        for _ in range(rounds):
            assert parser.feed(batch) == []
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    payload = 1 + rounds * 400 * size
    assert held <= 2 * payload + 8 * 1024, (held, payload)
