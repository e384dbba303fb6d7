"""Properties of records' parsers of outside input: Engine.IO packets,
polling payloads and query strings, Socket.IO packets, the /records and
/system_notice payloads (through to the EVENT a client decodes), and the
HTTP/1.1 request reader of the records port (chunked bodies included).

Any input gives a value or the layer's own error (never another
exception, never an ERROR log); what an encoder writes decodes back to
what it was given; a request stream read in any segmentation serves the
same, feeding each byte to the parser once; declared lengths past the
limits are refused without buffering them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import tracemalloc
import types
from urllib.parse import urlencode

import httptools
import uvicorn
from channels_common.wsserver import LeanWebSocketProtocol
from channels_records import engineio as eio
from channels_records import socketio as sio
from channels_records.httpserver import MAX_HEAD_BYTES, RecordsHttpProtocol
from channels_records.polling import Cors, Polling
from channels_records.protocol import encode_connect, encode_event, parse_recovery
from channels_records.relay import (
    MAX_ROOM_LENGTH,
    NOTICE_CHANNEL,
    RECORDS_CHANNEL,
    Broadcast,
    Dropped,
    parse_message,
)
from channels_records.sockets import Engine
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import byte_at_a_time, json_values, mutated, segmentations
from tests.support import HttpTransport as Transport
from tests.support import masked

# -- Engine.IO -------------------------------------------------------------------

texts = st.text(max_size=60)


@given(st.sampled_from(sorted(eio.PACKET_TYPES)), texts)
def test_engineio_packets_decode_to_what_was_encoded(kind, data):
    assert eio.decode_packet(eio.encode_packet(kind, data)) == eio.Packet(kind, data)


@given(st.binary(max_size=100))
def test_binary_for_polling_decodes_to_its_bytes(data):
    assert eio.decode_packet(eio.encode_binary_for_polling(data)) == eio.Packet(eio.MESSAGE, data)
    assert eio.decode_packet(data) == eio.Packet(eio.MESSAGE, data)  # a binary websocket message


packet_texts = st.tuples(st.sampled_from(sorted(eio.PACKET_TYPES)), texts.map(lambda t: t.replace("\x1e", ""))).map(
    "".join) | st.binary(max_size=30).map(eio.encode_binary_for_polling)


@given(st.lists(packet_texts, min_size=1, max_size=8))
def test_polling_payloads_decode_to_their_packets(packets):
    assert eio.decode_payload(eio.encode_payload(packets)) == [eio.decode_packet(p) for p in packets]


@given(st.binary(max_size=200) | st.lists(packet_texts, min_size=1, max_size=4).flatmap(
    lambda packets: mutated(eio.encode_payload(packets))))
def test_any_polling_body_gives_packets_or_an_engineio_error(body):
    try:
        packets = eio.decode_payload(body)
    except eio.EngineIOProtocolError as exc:
        assert exc.reason == eio.PARSE_ERROR
        return
    assert packets and all(p.type in eio.PACKET_TYPES for p in packets)


@given(st.text(max_size=80) | st.binary(max_size=80))
def test_any_websocket_message_gives_a_packet_or_an_engineio_error(data):
    try:
        packet = eio.decode_packet(data)
    except eio.EngineIOProtocolError:
        return
    assert packet.type in eio.PACKET_TYPES


@given(st.text(max_size=20), st.lists(st.sampled_from(["polling", "websocket"]), max_size=2),
       st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**8))
def test_the_open_packet_is_engineio_json(sid, upgrades, interval, timeout, max_payload):
    packet = eio.decode_packet(eio.open_packet(sid, upgrades, interval, timeout, max_payload))
    assert packet.type == eio.OPEN and json.loads(packet.data) == {
        "sid": sid, "upgrades": upgrades, "pingInterval": interval, "pingTimeout": timeout, "maxPayload": max_payload}


query_names = st.sampled_from(["transport", "sid", "EIO", "b64", "x", "t"])


@given(st.lists(st.tuples(query_names, st.text(max_size=12)), max_size=6))
def test_query_strings_read_as_parse_qs_reads_them(pairs):
    from urllib.parse import parse_qs

    query = urlencode(pairs).encode()
    parsed = parse_qs(query.decode(), keep_blank_values=False)
    first = {name: values[0] for name, values in parsed.items()}
    q = eio.parse_query(query)
    assert (q.transport, q.sid, q.eio, q.b64) == (
        first.get("transport"), first.get("sid"), first.get("EIO"), "b64" in first)
    assert eio.query_value(query, "t") == first.get("t")


@given(st.binary(max_size=100) | st.text(max_size=100))
def test_any_query_string_gives_a_query(query):
    q = eio.parse_query(query)
    assert all(v is None or isinstance(v, str) for v in (q.transport, q.sid, q.eio))


# -- Socket.IO -------------------------------------------------------------------

namespaces = st.just("/") | st.text(min_size=1, max_size=10).filter(lambda t: "," not in t).map(lambda t: "/" + t)
event_names = st.text(max_size=10).filter(lambda n: n not in sio.RESERVED_EVENTS)


@st.composite
def client_packets(draw):
    """(text, Packet) of what clients send: CONNECT, DISCONNECT, EVENT, ACK."""
    kind = draw(st.sampled_from([sio.CONNECT, sio.DISCONNECT, sio.EVENT, sio.ACK]))
    namespace = draw(namespaces)
    ack = draw(st.none() | st.integers(0, 10**15)) if kind in (sio.EVENT, sio.ACK) else None
    if kind == sio.CONNECT:
        data = draw(st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    elif kind == sio.DISCONNECT:
        data = None
    elif kind == sio.EVENT:
        data = [draw(event_names), *draw(st.lists(json_values, max_size=3))]
    else:
        data = draw(st.lists(json_values, max_size=3))
    if kind == sio.ACK and ack is None:
        ack = 0
    text = str(kind) + ("" if namespace == "/" else namespace + ",") + ("" if ack is None else str(ack))
    text += "" if data is None else json.dumps(data)
    return text, sio.Packet(kind, namespace, ack, data)


@given(client_packets())
def test_socketio_packets_decode_to_their_parts(case):
    text, packet = case
    assert sio.decode(text) == packet


@given(st.text(max_size=100) | client_packets().flatmap(
    lambda case: mutated(case[0].encode()).map(lambda b: b.decode("utf-8", "replace"))))
def test_any_text_gives_a_socketio_packet_or_its_error(text):
    try:
        packet = sio.decode(text)
    except sio.SocketIOProtocolError:
        return
    assert 0 <= packet.type <= 6


def test_deeply_nested_json_is_a_socketio_error():
    for text in ("2" + "[" * 100_000, '2["e",' + "{\"a\":" * 50_000):
        try:
            sio.decode(text)
        except sio.SocketIOProtocolError:
            continue
        raise AssertionError("accepted")


@given(st.integers(sio.MAX_ACK_ID_DIGITS + 1, 20_000), st.integers(4301, 20_000))
def test_ack_ids_and_numbers_past_their_bounds_are_socketio_errors(digits, number_digits):
    for text in ("3" + "1" * digits + "[]", '2["e",' + "1" * number_digits + "]"):
        try:
            sio.decode(text)
        except sio.SocketIOProtocolError:
            continue
        raise AssertionError(f"accepted {text[:20]}...")


@given(texts, namespaces)
def test_server_packets_decode_to_what_was_encoded(message, namespace):
    assert sio.decode(sio.encode_connect_error(message, namespace)) == sio.Packet(
        sio.CONNECT_ERROR, namespace, None, {"message": message})
    assert sio.decode(sio.encode_disconnect(namespace)) == sio.Packet(sio.DISCONNECT, namespace)


@given(st.text(max_size=20), st.none() | st.text(max_size=20))
def test_connect_replies_decode_to_their_sid_and_pid(sid, pid):
    data = {"sid": sid} if pid is None else {"sid": sid, "pid": pid}
    assert sio.decode(encode_connect(sid, pid)) == sio.Packet(sio.CONNECT, "/", None, data)


@given(json_values | st.text(max_size=300))
def test_any_connect_payload_gives_a_recovery_request_or_none(auth):
    request = parse_recovery(auth)
    if request is not None:
        assert request.pid == auth["pid"] and request.offset == auth.get("offset")


# -- /records and /system_notice payloads, through to the client's EVENT ------------

rooms = st.text(min_size=1, max_size=MAX_ROOM_LENGTH).filter(str.isprintable)


@given(rooms, st.dictionaries(st.text(max_size=6).filter(lambda k: k != "room"), json_values, max_size=4),
       st.none() | st.text(min_size=1, max_size=20), st.sampled_from([None, 2, "\t"]))
def test_a_records_payload_reaches_the_client_as_published(room, fields, offset, indent):
    obj = {"room": room, **fields}
    data = json.dumps(obj, indent=indent).encode()
    broadcast = parse_message(RECORDS_CHANNEL, b" \n" + data + b"\r\n")
    assert broadcast == Broadcast(room=room, event="records", payload=data.decode())
    packet = sio.decode(encode_event(broadcast.event, broadcast.payload, offset))
    assert packet.type == sio.EVENT and packet.data == ["records", obj, *([] if offset is None else [offset])]


@given(json_values)
def test_a_notice_payload_reaches_the_client_as_published(value):
    data = json.dumps(value).encode()
    broadcast = parse_message(NOTICE_CHANNEL, data)
    assert isinstance(broadcast, Broadcast) and broadcast.event == "notice"
    assert sio.decode(encode_event("notice", broadcast.payload)).data == ["notice", value]


@given(st.sampled_from([RECORDS_CHANNEL, NOTICE_CHANNEL, "/other"]),
       st.binary(max_size=200) | rooms.flatmap(lambda room: mutated(json.dumps({"room": room}).encode())))
def test_any_payload_gives_a_broadcast_of_valid_json_or_a_drop(channel, data):
    result = parse_message(channel, data)
    assert isinstance(result, (Broadcast, Dropped))
    if isinstance(result, Broadcast):
        json.loads(result.payload)  # embedded as is in every client's packet: it must be JSON
        assert sio.decode(encode_event(result.event, result.payload)).type == sio.EVENT


def test_deeply_nested_json_payloads_are_dropped():
    for data in (b"[" * 100_000, b'{"room":"r","a":' * 50_000):
        assert parse_message(RECORDS_CHANNEL, data) == Dropped("not_json")


# -- the HTTP/1.1 request reader ----------------------------------------------------

MAX_PAYLOAD = 1000


async def echo_app(scope, receive, send):
    if scope["type"] == "websocket":  # an upgrade handed to the websocket protocol: echo
        await receive()
        await send({"type": "websocket.accept"})
        while (event := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", **{k: v for k, v in event.items() if k in ("text", "bytes")}})
        return
    if scope["type"] != "http":
        return
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class CountingParser:
    """httptools' parser, counting the bytes fed to it."""

    def __init__(self, parser):
        self.parser = parser
        self.fed = 0

    def feed_data(self, data):
        self.fed += len(data)
        return self.parser.feed_data(data)

    def __getattr__(self, name):
        return getattr(self.parser, name)


class CountingBuffer(bytearray):
    """The protocol's request buffer, counting the bytes copied into it."""

    def __init__(self):
        super().__init__()
        self.copied = 0

    def __iadd__(self, other):
        self.copied += len(other)
        return super().__iadd__(other)


class ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def read_responses(data: bytes) -> list[tuple[int, bytes]]:
    """The responses written, as llhttp reads them (it raises on anything else)."""
    out = []

    class Callbacks:
        def on_message_begin(self):
            out.append([0, b""])

        def on_body(self, body):
            out[-1][1] += body

        def on_message_complete(self):
            out[-1][0] = parser.get_status_code()

    parser = httptools.HttpResponseParser(Callbacks())
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:  # a 101: websocket frames follow
        out[-1][0] = 101
    return [tuple(r) for r in out]


def serve(chunks_for, *, session: bool = False):
    """Serve one connection: `chunks_for(sid)` gives its reads (sid: a
    polling session opened first, when asked). Returns the responses
    written, the messages the engine received, whether the connection was
    closed, the ERROR records logged, and the parser and buffer counts."""

    async def run():
        messages = []
        engine = Engine(max_payload=MAX_PAYLOAD, on_message=lambda sock, data: messages.append(data))
        config = uvicorn.Config(echo_app, lifespan="off", log_config=None, ws=LeanWebSocketProtocol)
        config.load()
        state = types.SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
        cls = RecordsHttpProtocol.serving(Polling(engine, Cors(None)), app=echo_app, websocket=LeanWebSocketProtocol)
        errors = ErrorLog()
        logger = logging.getLogger("channels")
        logger.addHandler(errors)
        try:
            sid = None
            if session:
                sock, _ = engine.open("EIO=4&transport=polling", "polling")
                sid = sock.sid
            protocol = cls(config, state, {})
            transport = Transport()
            protocol.connection_made(transport)
            transport.protocol = protocol
            protocol.parser = counting = CountingParser(protocol.parser)
            protocol.buffer = buffer = CountingBuffer()
            for chunk in chunks_for(sid):
                for _ in range(50):  # a paused transport delivers nothing
                    if not transport.paused:
                        break
                    await asyncio.sleep(0)
                if transport.closed:
                    break
                transport.protocol.data_received(chunk)
                await asyncio.sleep(0)  # what is ready runs between reads
            for _ in range(20):
                await asyncio.sleep(0)
            transport.protocol.connection_lost(None)
            for _ in range(5):
                await asyncio.sleep(0)
            engine.stop_pinger()
            for sock in list(engine.sockets.values()):
                sock.discard()
            return (read_responses(bytes(transport.data)), messages, transport.closed, errors.records,
                    counting.fed, buffer.copied)
        finally:
            logger.removeHandler(errors)

    return asyncio.run(run())


def post(sid: str, body: bytes, chunks: list[int] | None) -> bytes:
    head = f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
    if chunks is None:
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    out, pos = [(head + "Transfer-Encoding: chunked\r\n\r\n").encode()], 0
    for size in chunks:
        piece = body[pos:pos + size]
        pos += len(piece)
        if piece:
            out.append(b"%x\r\n%b\r\n" % (len(piece), piece))
    if pos < len(body):
        out.append(b"%x;ext=1\r\n%b\r\n" % (len(body) - pos, body[pos:]))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


message_texts = st.text(max_size=30).map(lambda t: t.replace("\x1e", ""))


@st.composite
def conversations(draw):
    """Pipelined requests on one connection (POSTs of packets to a polling
    session, with a Content-Length or chunked, then maybe requests for the
    application: a long-poll behind one of those ends the connection, by
    design) and the messages they deliver: (requests, messages)."""
    requests, messages = [], []
    for _ in range(draw(st.integers(1, 4))):
        if requests and draw(st.integers(0, 3)) == 0:
            for body in draw(st.lists(st.binary(max_size=40), min_size=1, max_size=2)):
                requests.append(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (
                    len(body), body))
            break
        texts = draw(st.lists(message_texts, min_size=1, max_size=4))
        body = eio.encode_payload(["4" + t for t in texts])
        messages += texts
        chunks = draw(st.none() | st.lists(st.integers(1, 20), max_size=6))
        requests.append(("POST", body, chunks))
    return requests, messages


def render(requests, sid):
    return b"".join(r if isinstance(r, bytes) else post(sid, r[1], r[2]) for r in requests)


@given(conversations(), st.data())
def test_pipelined_requests_serve_the_same_however_they_are_cut(conversation, data):
    requests, messages = conversation
    streams = []

    def whole(sid):
        return [render(requests, sid)]

    def segmented(sid):
        streams.append(render(requests, sid))
        return data.draw(segmentations(streams[-1], max_cuts=60))

    def trickled(sid):
        streams.append(render(requests, sid))
        return byte_at_a_time(streams[-1])

    responses, got, closed, errors, _, _ = serve(whole, session=True)
    assert got == messages and not errors and not closed
    assert [status for status, _ in responses] == [200] * len(requests)
    for chunks_for in (segmented, trickled):
        again, got, closed, errors, fed, copied = serve(chunks_for, session=True)
        assert (again, got, closed, errors) == (responses, messages, False, [])
        # Each byte goes to llhttp once and into the request buffer at most once.
        assert fed <= len(streams[-1]) and copied <= len(streams[-1]), (len(streams[-1]), fed, copied)


requests_to_mutate = st.sampled_from([
    b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nOrigin: http://x\r\n\r\n",
    b"POST /socket.io/?EIO=4&transport=polling&sid=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n4hi",
    (b"POST /socket.io/?EIO=4&transport=polling&sid=abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\n4hi\r\n0\r\n\r\n"),
    (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + masked(0x81, b"hi")),
    b"OPTIONS /socket.io/ HTTP/1.1\r\nOrigin: http://a\r\nAccess-Control-Request-Headers: x\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
])


@given(st.binary(max_size=300) | st.lists(requests_to_mutate, min_size=1, max_size=3).flatmap(
    lambda reqs: mutated(b"".join(reqs), max_edits=3)), st.data())
def test_any_bytes_get_responses_or_a_refusal_never_a_traceback(raw, data):
    for chunks in ([raw], data.draw(segmentations(raw))):
        responses, _, _, errors, _, _ = serve(lambda sid, chunks=chunks: chunks)  # raises nothing
        assert not errors, [r.getMessage() for r in errors]
        assert all(100 <= status < 600 for status, _ in responses)


@given(st.integers(MAX_PAYLOAD + 1, 2**62), st.booleans())
def test_a_declared_body_over_the_limit_is_refused_without_buffering_it(length, chunked):
    def chunks(sid):
        head = f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n"
        if chunked:  # one chunk declared past the limit; a few bytes of it sent
            return [(head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n" % length + b"4" * 50]
        return [(head + f"Content-Length: {length}\r\n\r\n").encode() + b"4" * 50]

    tracemalloc.start()
    try:
        responses, messages, _, errors, _, _ = serve(chunks, session=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not messages and not errors
    if not chunked:
        assert [status for status, _ in responses] == [413]  # refused from the head alone
    # Chunked, the 413 waits for the body's end (nothing of it is kept).
    assert peak < 4 * 1024 * 1024, peak  # what serving costs, nothing of the declared length


@given(st.lists(st.integers(1, 300), min_size=1, max_size=20))
def test_a_chunked_body_over_the_limit_is_refused_and_not_kept(sizes):
    total = sum(sizes)

    def chunks(sid):
        head = f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        return [head.encode() + b"".join(b"%x\r\n%b\r\n" % (n, b"4" * n) for n in sizes) + b"0\r\n\r\n"]

    responses, messages, _, errors, _, _ = serve(chunks, session=True)
    assert not errors
    if total > MAX_PAYLOAD:
        assert [s for s, _ in responses] == [413] and not messages
    else:
        assert [s for s, _ in responses] == [200] and messages == ["4" * (total - 1)]


@given(st.integers(MAX_HEAD_BYTES + 1, 2 * MAX_HEAD_BYTES), st.integers(1, 8))
def test_a_head_over_the_limit_is_refused(size, pieces):
    head = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nX-Padding: " + b"a" * size
    step = len(head) // pieces + 1
    responses, _, closed, errors, _, _ = serve(lambda sid: [head[i:i + step] for i in range(0, len(head), step)])
    assert [s for s, _ in responses] == [400] and closed and not errors


def test_base64_binary_packets_in_a_polling_body_reach_the_engine():
    payload = eio.encode_payload([eio.encode_binary_for_polling(b"\x00\xff"), "4text"])
    responses, messages, _, _, _, _ = serve(lambda sid: [post(sid, payload, [3, 4])], session=True)
    assert [s for s, _ in responses] == [200] and messages == [b"\x00\xff", "text"]
    assert base64.b64decode(payload[1:5])  # the first packet is the base64 one
