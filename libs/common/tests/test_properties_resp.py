"""Properties of the RESP reader: any bytes give replies or a
RespProtocolError; replies encoded as Redis sends them read back as the
values they carry, however the bytes are cut, with a bounded number of
element headers read per element and per read; lengths and counts past
the limits, and nesting past its bound, are refused before anything is
allocated for them; replies cut across reads leave no memory behind once
read."""

from __future__ import annotations

import itertools
import tracemalloc

from channels_common.resp import ReplyError, ReplyReader, RespProtocolError, pack_command
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import byte_at_a_time, mutated, segmentations

line_text = st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b)


def plain(value):
    """Replies as comparable values (a ReplyError is compared by its text)."""
    if isinstance(value, ReplyError):
        return ("error", str(value))
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# (wire bytes, the value read) for every RESP2 and RESP3 type.
scalars = st.one_of(
    st.binary(max_size=40).map(lambda b: (b"$%d\r\n%b\r\n" % (len(b), b), b)),
    st.binary(max_size=40).map(lambda b: (b"=%d\r\ntxt:%b\r\n" % (len(b) + 4, b), b)),
    line_text.map(lambda b: (b"+" + b + b"\r\n", b)),
    st.text(max_size=20).filter(lambda t: "\r" not in t and "\n" not in t).map(
        lambda t: (b"-" + t.encode() + b"\r\n", ("error", t))),
    st.text(max_size=20).map(lambda t: (b"!%d\r\n%b\r\n" % (len(t.encode()), t.encode()), ("error", t))),
    st.integers(-(2**70), 2**70).map(lambda n: (b":%d\r\n" % n, n)),
    st.integers(-(2**200), 2**200).map(lambda n: (b"(%d\r\n" % n, n)),
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"_\r\n"]).map(lambda w: (w, None)),
    st.booleans().map(lambda v: (b"#t\r\n" if v else b"#f\r\n", v)),
    st.floats(allow_nan=False).map(lambda f: (b",%b\r\n" % repr(f).encode(), f)),
)


def _aggregate(children):
    kinds = st.sampled_from([b"*", b">", b"~"])

    def array(kind, items):
        return kind + b"%d\r\n" % len(items) + b"".join(w for w, _ in items), [v for _, v in items]

    def mapping(pairs):
        wire = b"%%%d\r\n" % len(pairs) + b"".join(k[0] + v[0] for k, v in pairs)
        return wire, [x for k, v in pairs for x in (k[1], v[1])]

    def attributed(attrs, reply):
        # An attribute precedes the reply it describes and is dropped.
        return b"|%d\r\n" % len(attrs) + b"".join(k[0] + v[0] for k, v in attrs) + reply[0], reply[1]

    return (
        st.builds(array, kinds, st.lists(children, max_size=4))
        | st.builds(mapping, st.lists(st.tuples(children, children), max_size=3))
        | st.builds(attributed, st.lists(st.tuples(scalars, children), min_size=1, max_size=2), children)
    )


replies = st.recursive(scalars, _aggregate, max_leaves=15)


def read(chunks, reader=None):
    """Replies until a protocol error, and whether one came."""
    reader = reader or ReplyReader()
    out = []
    for chunk in chunks:
        try:
            out += reader.feed(chunk)
        except RespProtocolError:
            return plain(out), True
    return plain(out), False


@given(st.lists(replies, max_size=6), st.data())
def test_replies_read_back_as_their_values_however_the_bytes_are_cut(items, data):
    wire = b"".join(w for w, _ in items)
    values = [v for _, v in items]
    assert read([wire]) == (values, False)
    chunks = data.draw(segmentations(wire, max_cuts=60))
    reader = ReplyReader()
    assert read(chunks, reader) == (values, False)
    assert reader.buffered == 0
    # Each element header is read at most twice, plus twice per read that
    # cuts a reply (the whole attempt, then element by element).
    elements = wire.count(b"\r\n")
    assert reader.headers_read <= 2 * elements + 2 * len(chunks), (elements, len(chunks), reader.headers_read)
    reader = ReplyReader()
    assert read(byte_at_a_time(wire), reader) == (values, False)
    assert reader.headers_read <= 2 * elements + 2 * len(wire)


@given(st.lists(st.binary(max_size=30) | st.text(max_size=10) | st.integers(-(2**63), 2**63), max_size=8))
def test_a_packed_command_reads_back_as_its_arguments(args):
    expected = [a.encode() if isinstance(a, str) else b"%d" % a if isinstance(a, int) else a for a in args]
    assert ReplyReader().feed(pack_command(*args)) == [expected]


@given(st.binary(max_size=300) | st.lists(replies, min_size=1, max_size=4).flatmap(
    lambda items: mutated(b"".join(w for w, _ in items))), st.data())
def test_any_bytes_give_replies_or_a_protocol_error_the_same_however_cut(raw, data):
    # A feed that raises returns none of its replies (the connection is
    # dropped anyway): cut finer, more of them come out first, never others.
    whole = read([raw])  # raises nothing else (a failure here is the defect)
    finest = read(byte_at_a_time(raw))
    for values, failed in (read(data.draw(segmentations(raw))), finest):
        assert failed == whole[1]
        if failed:
            assert values == finest[0][:len(values)]
        else:
            assert values == whole[0]


@given(
    st.sampled_from([b"$", b"=", b"!"]).flatmap(
        lambda kind: st.integers(1024 * 1024 + 1, 2**62).map(lambda n: (kind, n, True))
        | st.integers(1000, 1024 * 1024).map(lambda n: (kind, n, False)))
    | st.sampled_from([b"*", b">", b"~", b"%", b"|"]).flatmap(
        lambda kind: st.integers(4097, 2**62).map(lambda n: (kind, n, True))
        | st.integers(100, 4096).map(lambda n: (kind, n, False))),
)
def test_declared_lengths_and_counts_allocate_nothing_and_past_the_limit_are_refused(case):
    kind, n, over = case
    reader = ReplyReader(max_bulk=1024 * 1024, max_items=4096)
    tracemalloc.start()
    try:
        try:
            got = reader.feed(kind + b"%d\r\n" % n + b"ab")
        except RespProtocolError:
            got = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (got is None) == over and got in (None, [])
    assert peak < 16 * 1024, peak


@given(
    st.integers(8 * 1024, 32 * 1024),
    st.integers(10, 20),
    st.data(),
)
def test_replies_cut_across_reads_leave_no_memory_behind_once_read(size, rounds, data):
    # Memory held after many cut replies is bounded by one reply (the
    # reader's own buffer), not by how many were cut: a shared exception
    # instance, raised for "not all there yet", once kept every cut read
    # alive on its ever-growing traceback.
    wire = b"*3\r\n$7\r\nmessage\r\n$8\r\n/records\r\n$%d\r\n%b\r\n" % (size, b"y" * size)
    cuts = [sorted(data.draw(st.lists(st.integers(len(wire) // 2, len(wire) - 1), min_size=1, max_size=3)))
            for _ in range(rounds)]
    reader = ReplyReader()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for points in cuts:
            edges = [0, *points, len(wire)]
            got = []
            for a, b in itertools.pairwise(edges):
                got += reader.feed(wire[a:b])
            assert len(got) == 1 and len(got[0][2]) == size
            del got
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert reader.buffered == 0
    # At least half of every reply was read before it was complete: held,
    # they would be rounds / 2 replies' worth.
    reply = len(wire)
    assert grown <= 2 * reply + 32 * 1024, f"{grown} bytes held after {rounds} cut replies of {reply}"
