"""Properties of collab's parsers of outside input: the Hocuspocus
protocol decoder (lib0 numbers and strings, every frame type, state
vectors and awareness updates), document names, and client addresses
(the peer and X-Forwarded-For).

Any input gives a value or HocuspocusProtocolError (names and addresses:
a verdict, never an exception); every encoder's frame decodes to what it
was given; declared lengths and counts past what the frame holds are
refused before anything is allocated for them. Hocuspocus frames arrive
as whole websocket messages, so segmentation is the frame parser's
property (libs/common/tests/test_properties_wsframe.py)."""

from __future__ import annotations

import ipaddress
import json
import tracemalloc

from channels_collab import protocol as p
from channels_collab.client_address import MAX_HOPS, client_address, forwarded_hops, parse_address
from channels_collab.names import MAX_LENGTH, RECORD_TYPES, valid_document_name
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import json_values, mutated

# -- lib0 and the Hocuspocus frames ---------------------------------------------------

addresses = st.text(max_size=30)
payloads = st.binary(max_size=60)
texts = st.text(max_size=40)


@given(st.integers(0, 2**56 - 1))
def test_var_uints_read_back(n):
    r = p.Reader(p.var_uint(n) + b"rest")
    assert r.var_uint() == n and r.remaining == 4


@given(st.integers(2**56, 2**80))
def test_var_uints_past_eight_bytes_are_refused(n):
    try:
        p.Reader(p.var_uint(n)).var_uint()
    except p.HocuspocusProtocolError:
        return
    raise AssertionError("accepted")


server_frames = st.one_of(
    st.builds(lambda a, sv: (p.encode_sync_step1(a, sv), p.Sync(a, p.SyncStep.STEP1, sv)), addresses, payloads),
    st.builds(lambda a, u: (p.encode_sync_step2(a, u), p.Sync(a, p.SyncStep.STEP2, u)), addresses, payloads),
    st.builds(lambda a, u: (p.encode_update(a, u), p.Sync(a, p.SyncStep.UPDATE, u)), addresses, payloads),
    st.builds(lambda a, ok: (p.encode_sync_status(a, ok), p.SyncStatus(a, ok)), addresses, st.booleans()),
    st.builds(lambda a, u: (p.encode_awareness(a, u), p.Awareness(a, u)), addresses, payloads),
    st.builds(lambda a: (p.encode_query_awareness(a), p.QueryAwareness(a)), addresses),
    st.builds(lambda a, s: (p.encode_authenticated(a, s), p.AuthReply(a, p.AuthType.AUTHENTICATED, s)),
              addresses, st.sampled_from([p.SCOPE_READ_WRITE, p.SCOPE_READ_ONLY])),
    st.builds(lambda a, r: (p.encode_permission_denied(a, r), p.AuthReply(a, p.AuthType.PERMISSION_DENIED, r)),
              addresses, texts),
    st.builds(lambda a: (p.encode_token_request(a), p.AuthReply(a, p.AuthType.TOKEN, None)), addresses),
    st.builds(lambda a, t: (p.encode_stateless(a, t), p.Stateless(a, t)), addresses, texts),
    st.builds(lambda a, r: (p.encode_close(a, r), p.Close(a, r)), addresses, texts),
)
client_frames = st.one_of(
    st.builds(lambda a, t, v: (p.encode_token(a, t, v), p.Token(a, t, v)), addresses, texts, st.none() | texts),
    st.builds(lambda a, s, u, r: (p.encode_sync(a, s, u, r), p.Sync(a, s, u, r)),
              addresses, st.sampled_from(list(p.SyncStep)), payloads, st.booleans()),
    st.builds(lambda a, u: (p.encode_awareness(a, u), p.Awareness(a, u)), addresses, payloads),
    st.just((p.PING_FRAME, p.ConnectionPing())),
    st.just((p.PONG_FRAME, p.ConnectionPong())),
)


@given(server_frames | client_frames, st.binary(max_size=8))
def test_every_encoded_frame_decodes_to_what_it_was_given(case, trailing):
    frame, message = case
    assert p.decode(frame) == message
    if len(frame) > 1 and not isinstance(message, (p.Token, p.Close, p.AuthReply, p.SyncStatus)):
        # Trailing bytes are ignored, as the Hocuspocus server ignores them
        # (frames whose last field is optional read them as that field).
        assert p.decode(frame + trailing) == message


@given(st.binary(max_size=120) | (server_frames | client_frames).flatmap(lambda case: mutated(case[0])))
def test_any_frame_gives_a_message_or_a_protocol_error(frame):
    try:
        message = p.decode(frame)
    except p.HocuspocusProtocolError:
        return
    assert message is not None


def _outcome(decoder, frame):
    try:
        return decoder(frame)
    except p.HocuspocusProtocolError:
        return p.HocuspocusProtocolError


sync_frames = st.builds(lambda a, s, u, r: p.encode_sync(a, s, u, r), addresses,
                        st.sampled_from(list(p.SyncStep)), st.binary(max_size=20_000), st.booleans())


@given(st.binary(max_size=120) | (sync_frames | server_frames.map(lambda c: c[0])).flatmap(mutated) | sync_frames)
def test_the_short_sync_fast_path_decodes_as_the_reader_does(frame):
    # decode() tries a Reader-free path for common Sync frames first; it must
    # never answer differently from the full decoder (a value, or refusal).
    assert _outcome(p.decode, frame) == _outcome(p._decode_with_reader, frame)


@given(addresses.filter(lambda a: "\0" not in a), st.none() | st.text(max_size=20))
def test_addresses_split_into_name_and_session(name, session):
    address = name if session is None else name + p.SESSION_SEPARATOR + session
    assert p.split_address(address) == (name, session)


@given(st.dictionaries(st.integers(0, 2**53), st.integers(0, 2**53), max_size=8))
def test_state_vectors_read_back(vector):
    data = p.var_uint(len(vector)) + b"".join(p.var_uint(c) + p.var_uint(k) for c, k in vector.items())
    assert p.decode_state_vector(data) == vector


@given(st.lists(st.tuples(st.integers(0, 2**53), st.integers(0, 2**32), st.none() | json_values), max_size=6))
def test_awareness_updates_read_back(entries):
    data = p.var_uint(len(entries)) + b"".join(
        p.var_uint(c) + p.var_uint(k) + p.var_string("" if s is None else json.dumps(s)) for c, k, s in entries)
    decoded = p.decode_awareness_update(data)
    assert [(e.client_id, e.clock, e.state) for e in decoded] == [
        (c, k, s) for c, k, s in entries]


@given(st.binary(max_size=120))
def test_any_state_vector_or_awareness_update_gives_a_value_or_a_protocol_error(data):
    for decode in (p.decode_state_vector, p.decode_awareness_update):
        try:
            decode(data)
        except p.HocuspocusProtocolError:
            pass


def test_deeply_nested_awareness_state_is_a_protocol_error():
    state = "[" * 100_000
    data = p.var_uint(1) + p.var_uint(1) + p.var_uint(1) + p.var_string(state)
    try:
        p.decode_awareness_update(data)
    except p.HocuspocusProtocolError:
        return
    raise AssertionError("accepted")


@given(st.integers(1, 2**56 - 1), st.sampled_from(["bytes", "state_vector", "awareness"]), st.binary(max_size=20))
def test_declared_lengths_and_counts_past_the_frame_are_refused_before_allocating(declared, kind, rest):
    if kind == "bytes":
        data = p.header("doc", p.MessageType.AWARENESS) + p.var_uint(declared + len(rest)) + rest
        decode = p.decode
    else:
        data = p.var_uint(declared + len(rest) + 64) + rest
        decode = p.decode_state_vector if kind == "state_vector" else p.decode_awareness_update
    tracemalloc.start()
    try:
        try:
            decode(data)
        except p.HocuspocusProtocolError:
            pass
        else:
            raise AssertionError("a length past the frame was accepted")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024, peak


# -- document names -------------------------------------------------------------------

PART = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"


def grammar(name: str) -> bool:
    """The documented grammar, written out plainly."""
    if len(name) > MAX_LENGTH:
        return False
    first, *rest = name.split("-")
    return first in RECORD_TYPES and bool(rest) and all(part and set(part) <= set(PART) for part in rest)


names = st.tuples(st.sampled_from(RECORD_TYPES), st.lists(st.text(PART, min_size=1, max_size=12), min_size=1,
                                                         max_size=6)).map(lambda t: "-".join([t[0], *t[1]]))


@given(names)
def test_names_of_the_grammar_are_valid_up_to_the_length_limit(name):
    assert valid_document_name(name) == (len(name) <= MAX_LENGTH)


@given(st.text(max_size=60) | names.flatmap(lambda n: mutated(n.encode()).map(lambda b: b.decode("latin-1")))
       | st.none() | st.integers() | st.binary(max_size=10) | json_values)
def test_any_name_gets_the_grammars_verdict(name):
    assert valid_document_name(name) == (isinstance(name, str) and grammar(name))


# -- client addresses -----------------------------------------------------------------

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)


@given(ipv4 | ipv6, st.integers(0, 65535))
def test_addresses_as_proxies_write_them_read_back(address, port):
    plain = address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
    assert parse_address(str(address)) == plain
    assert parse_address(f" {address} ") == plain
    if address.version == 6:
        assert parse_address(f"[{address}]:{port}") == plain
        assert parse_address(f"[{address}]") == plain
    else:
        assert parse_address(f"{address}:{port}") == plain


@given(st.text(max_size=60) | st.ip_addresses().map(str).flatmap(
    lambda a: mutated(a.encode()).map(lambda b: b.decode("latin-1"))))
def test_any_text_gives_an_address_or_none(text):
    assert parse_address(text) is None or isinstance(parse_address(text), (ipaddress.IPv4Address,
                                                                         ipaddress.IPv6Address))


@given(st.lists(st.tuples(st.sampled_from([b"x-forwarded-for", b"X-Forwarded-For", b"host"]), st.binary(max_size=60)),
                max_size=4))
def test_any_headers_give_hops(headers):
    hops = forwarded_hops(headers)
    assert all(isinstance(h, str) for h in hops)


PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
proxy_hops = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address((10 << 24) + n)))


@given(ipv4 | ipv6, st.lists(st.text(max_size=20) | ipv4.map(str) | proxy_hops, max_size=20), st.booleans())
def test_only_hops_vouched_for_by_trusted_proxies_are_believed(peer, hops, trusted_peer):
    peer_text = "10.1.2.3" if trusted_peer else str(peer)
    result = client_address(peer_text, hops, PROXIES)
    # The oracle: walk from the peer leftwards while the current address is
    # a trusted proxy and the next hop parses (MAX_HOPS hops at most).
    current = parse_address(peer_text)
    for hop in reversed(hops[-MAX_HOPS:]):
        if not any(current.version == net.version and current in net for net in PROXIES):
            break
        forwarded = parse_address(hop)
        if forwarded is None:
            break
        current = forwarded
    assert result == str(current)
    if not any(parse_address(peer_text) in net for net in PROXIES if net.version == parse_address(peer_text).version):
        assert result == str(parse_address(peer_text))  # an untrusted peer is never overridden
    assert client_address(peer_text, hops, []) == str(parse_address(peer_text))


@given(st.integers(MAX_HOPS + 1, 5000))
def test_a_long_forwarded_chain_is_walked_no_further_than_max_hops(n):
    hops = ["203.0.113.9"] + ["10.0.0.1"] * n
    assert client_address("10.0.0.2", hops, PROXIES) == "10.0.0.1"  # the real client is past the walk
    within = ["203.0.113.9", *["10.0.0.1"] * (MAX_HOPS - 1)]  # MAX_HOPS hops: walked to the client
    assert client_address("10.0.0.2", within, PROXIES) == "203.0.113.9"
