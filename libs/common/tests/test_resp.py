"""RESP codec vectors: what Redis sends, byte for byte, and what comes out."""

from __future__ import annotations

import pytest
from channels_common.resp import ReplyError, ReplyReader, RespProtocolError, pack_command


def test_pack_command_byte_vectors():
    assert pack_command("GET", "k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert pack_command("SET", "é", b"\x00\r\n", 42) == (
        b"*4\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$3\r\n\x00\r\n\r\n$2\r\n42\r\n"
    )


MESSAGE = b"*3\r\n$7\r\nmessage\r\n$8\r\n/records\r\n$13\r\n{\"room\":\"a\"}\n\r\n"


@pytest.mark.parametrize(
    "wire, replies",
    [
        (b"+OK\r\n", [b"OK"]),
        (b":42\r\n:-1\r\n", [42, -1]),
        (b"$5\r\nhello\r\n$0\r\n\r\n$-1\r\n", [b"hello", b"", None]),
        (b"$4\r\na\r\nb\r\n", [b"a\r\nb"]),  # CRLF inside a bulk string is data
        (b"-ERR unknown command\r\n", [ReplyError("ERR unknown command")]),
        (b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", [[b"pong", b""]]),
        (b"*-1\r\n*0\r\n", [None, []]),
        (MESSAGE, [[b"message", b"/records", b'{"room":"a"}\n']]),
        (
            b"*4\r\n$8\r\npmessage\r\n$9\r\nchatbot/*\r\n$12\r\nchatbot/test\r\n$2\r\nhi\r\n",
            [[b"pmessage", b"chatbot/*", b"chatbot/test", b"hi"]],
        ),
        (b"*3\r\n$9\r\nsubscribe\r\n$8\r\n/records\r\n:1\r\n", [[b"subscribe", b"/records", 1]]),
        # RESP3: pushes, nulls, booleans, doubles, big numbers, maps, sets,
        # verbatim strings, bulk errors, and an attribute that is skipped.
        (b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nd\r\n", [[b"message", b"c", b"d"]]),
        (b"_\r\n#t\r\n#f\r\n,1.5\r\n(12345678901234567890\r\n", [None, True, False, 1.5, 12345678901234567890]),
        (b"%1\r\n+k\r\n:1\r\n~2\r\n+a\r\n+b\r\n", [[b"k", 1], [b"a", b"b"]]),
        (b"=7\r\ntxt:abc\r\n", [b"abc"]),
        (b"!9\r\nNOSCRIPT!\r\n", [ReplyError("NOSCRIPT!")]),
        (b"|1\r\n+key\r\n+val\r\n+PONG\r\n", [b"PONG"]),
    ],
)
def test_replies(wire, replies):
    got = ReplyReader().feed(wire)
    assert [str(r) if isinstance(r, ReplyError) else r for r in got] == [
        str(r) if isinstance(r, ReplyError) else r for r in replies
    ]
    assert all(isinstance(g, ReplyError) == isinstance(r, ReplyError) for g, r in zip(got, replies))


def test_a_reply_split_anywhere_comes_out_once_complete():
    wire = MESSAGE * 3 + b":7\r\n"
    for cut in range(1, len(wire)):
        reader = ReplyReader()
        first = reader.feed(wire[:cut])
        second = reader.feed(wire[cut:])
        assert first + second == [[b"message", b"/records", b'{"room":"a"}\n']] * 3 + [7], cut
        assert reader.buffered == 0


def test_byte_by_byte():
    reader = ReplyReader()
    out = []
    for i in range(len(MESSAGE)):
        out += reader.feed(MESSAGE[i : i + 1])
    assert out == [[b"message", b"/records", b'{"room":"a"}\n']]


def test_error_code():
    (reply,) = ReplyReader().feed(b"-NOPERM this user has no permissions\r\n")
    assert reply.code == "NOPERM"


@pytest.mark.parametrize(
    "wire",
    [
        b"?what\r\n",  # no such type
        b"$abc\r\n",  # length is not a number
        b"$3\r\nabcXY",  # bulk not followed by CRLF
        b":1.5\r\n",
        b",nope\r\n",
        b"$100\r\n",  # over max_bulk below
        b"*5000000\r\n",  # over max_items
    ],
)
def test_garbage_is_a_protocol_error(wire):
    with pytest.raises(RespProtocolError):
        ReplyReader(max_bulk=64).feed(wire)


def test_an_endless_line_is_a_protocol_error():
    reader = ReplyReader()
    reader.feed(b"+" + b"x" * 1000)  # incomplete so far, kept
    with pytest.raises(RespProtocolError):
        reader.feed(b"x" * 70_000)


def test_a_long_reply_in_small_pieces_is_parsed_once():
    # An XREAD-like reply: 1000 entries, each an id and a field/value array.
    entries = b"".join(b"*2\r\n$3\r\n%03d\r\n*2\r\n$1\r\nu\r\n$40\r\n%s\r\n" % (i % 1000, b"v" * 40) for i in range(1000))
    wire = b"*1\r\n*2\r\n$5\r\ninbox\r\n*1000\r\n" + entries + b":1\r\n"
    reader = ReplyReader()
    out, feeds = [], 0
    for i in range(0, len(wire), 7):
        out += reader.feed(wire[i:i + 7])
        feeds += 1
    [[[name, items]], one] = out
    assert name == b"inbox" and len(items) == 1000 and items[999] == [b"999", [b"u", b"v" * 40]] and one == 1
    headers = 4 + 1000 * 5 + 1  # every element of the reply, and the integer after it
    # Each element read at most twice (the reply was not whole), plus once per feed that cut one.
    assert headers <= reader.headers_read <= 2 * headers + feeds
    assert reader.buffered == 0


# -- hostile replies found by the property tests (test_properties_resp.py) ------


def _outcome(chunks):
    reader = ReplyReader()
    out = []
    try:
        for chunk in chunks:
            out += reader.feed(chunk)
    except RespProtocolError:
        return out, True
    return out, False


def _nested(depth: int) -> bytes:
    return b"*1\r\n" * depth + b":1\r\n"


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_nesting_past_the_bound_is_a_protocol_error_read_whole_or_in_pieces(depth):
    # Read whole it recursed: RecursionError out of data_received at ~1000.
    wire = _nested(depth)
    assert _outcome([wire]) == ([], True)
    assert _outcome(wire[i:i + 3] for i in range(0, len(wire), 3)) == ([], True)
    value = 1
    for _ in range(32):
        value = [value]
    assert _outcome([_nested(32)]) == ([value], False)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_a_negative_bulk_error_length_is_a_protocol_error(n):
    # `!-7` moved the reader back before itself: an endless loop filling
    # memory with error replies.
    assert _outcome([b"!-%d\r\n+ok\r\n" % n]) == ([], True)


def test_a_line_over_64_kib_is_refused_whether_it_arrives_whole_or_in_pieces():
    # Cut, it was refused; whole, accepted.
    wire = b"+" + b"x" * (65 * 1024) + b"\r\n"
    assert _outcome([wire]) == ([], True)
    assert _outcome(wire[i:i + 4096] for i in range(0, len(wire), 4096)) == ([], True)
    assert _outcome([b"+" + b"x" * (64 * 1024) + b"\r\n"]) == ([b"x" * (64 * 1024)], False)


def test_an_attribute_before_an_element_is_dropped_not_counted_as_one():
    # It was taken for the first element: the array ended one element early
    # and the reader was out of step with Redis from there on.
    wire = b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n+next\r\n"
    for chunks in ([wire], [wire[i:i + 1] for i in range(len(wire))]):
        assert _outcome(chunks) == ([[1, 2], b"next"], False)


def test_replies_cut_across_reads_leave_no_memory_behind():
    # A reply that is not complete yet must leave nothing pinned once it is
    # read (a shared exception instance once kept every cut reply alive
    # through its ever-growing traceback).
    import gc
    import tracemalloc

    reader = ReplyReader()
    wire = b"*3\r\n$7\r\nmessage\r\n$8\r\n/records\r\n$300000\r\n" + b"y" * 300_000 + b"\r\n"

    def rounds(n):
        for _ in range(n):
            assert len(reader.feed(wire[:200_000]) + reader.feed(wire[200_000:])) == 1
            assert len(reader.feed(wire[:20]) + reader.feed(wire[20:40]) + reader.feed(wire[40:])) == 1

    tracemalloc.start()
    try:
        rounds(2)  # warm up: the reader's buffer at its working size
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        rounds(50)  # 100 replies, 30 MB in all
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, grown
