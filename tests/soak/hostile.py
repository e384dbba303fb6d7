"""Hostile traffic beside the good clients, all through the proxies or
Redis: mutated websocket frames, Engine.IO/Socket.IO packets and Hocuspocus
messages, drip-fed request heads, abandoned pre-auth sockets (some asking
Rails about more documents than collab reads before it pauses them), and
malformed or oversized payloads PUBLISHed on /records, /system_notice and
chatbot/*. What became of each drip-fed head and each greedy socket's
token is kept for run.py's invariants.
It never touches the documents, rooms or Matrix rooms the invariants read
(the hostile renders go to a room of their own)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.support import masked

# collab's share of Rails per socket (rails.MAX_CALLS_PER_CALLER), as the
# contract the soak holds it to, and the time a hung-up socket's calls may
# go on (see Hostile.check).
MAX_CALLS_PER_SOCKET = 4
# As the Rails stand-in sees it, a call collab gave up on at its timeout
# ends a moment after collab has started the next in its slot: each slot
# may show two calls at once, never more.
SEEN_CALLS_PER_SOCKET = 2 * MAX_CALLS_PER_SOCKET
HUNG_UP_GRACE_SECONDS = 6.0
# Auths a greedy socket sends: reading resumes (and a FIN is seen) only once
# fewer than 100 wait, so the pause outlasts the grace by far.
GREEDY_AUTHS = 300


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varstring(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return _varuint(len(b)) + b


def hocuspocus(doc: str, kind: int, payload: bytes) -> bytes:
    return _varstring(doc) + _varuint(kind) + payload


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random bit flips, a cut, or bytes spliced in."""
    b = bytearray(data)
    choice = rng.random()
    if choice < 0.5 and b:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif choice < 0.75 and len(b) > 1:
        del b[rng.randrange(1, len(b)):]
    else:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


class Hostile:
    def __init__(self, records_port: int, collab_port: int, redis_url: str, seed: int,
                 junk_chatbot: str | None, rate: float = 4.0):
        self.records_port, self.collab_port = records_port, collab_port
        self.redis_url = redis_url
        self.rng = random.Random(seed ^ 0x4057)
        self.junk_chatbot = junk_chatbot  # a chatbot/publish payload template for the junk room, or None
        self.rate = rate
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.slots = asyncio.Semaphore(12)
        self.drips = asyncio.Semaphore(4)
        # Drip-fed heads: closed by the server (a 408, EOF or reset) before
        # the whole head was sent, or sent whole without being closed.
        self.drips_closed = 0
        self.drips_outlived = 0
        # Greedy abandoned collab sockets, at most two at a time: the token
        # each asked Rails with, and when it hung up (time.monotonic()).
        self.greedy = asyncio.Semaphore(2)
        self.greedy_hung_up: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        self.redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        actions = [self.records_frames, self.records_polling, self.drip_head, self.abandoned,
                   self.hocuspocus_frames, self.publish_junk]
        try:
            while not stop.is_set():
                action = self.rng.choice(actions)
                seed = self.rng.getrandbits(32)
                await self.slots.acquire()
                task = asyncio.create_task(self._one(action, random.Random(seed)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                try:
                    await asyncio.wait_for(stop.wait(), self.rng.expovariate(self.rate))
                except TimeoutError:
                    pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.redis.aclose()

    async def _one(self, action, rng: random.Random) -> None:
        try:
            self.counts[action.__name__] += 1
            await asyncio.wait_for(action(rng), 40)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError, RedisError):
            pass  # refused, cut or closed (Redis too, while it restarts): what hostile input should get
        except Exception as exc:  # noqa: BLE001 - a bug of the harness, counted and shown
            self.errors[f"{action.__name__}: {type(exc).__name__}: {exc}"[:200]] += 1
        finally:
            self.slots.release()

    # -- helpers -----------------------------------------------------------------

    def _connect(self, port: int):
        """A connection from one of 200 loopback addresses: the proxy spreads
        them over the instances as it spreads the good clients."""
        source = f"127.0.3.{self.rng.randint(1, 200)}"
        return asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

    async def _ws(self, port: int, path: str):
        reader, writer = await self._connect(port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Origin: https://app.loomio.test\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if b" 101 " not in head.split(b"\r\n")[0]:
            writer.close()
            return None
        return reader, writer

    @staticmethod
    async def _drain(reader, seconds: float) -> None:
        try:
            while await asyncio.wait_for(reader.read(65536), seconds):
                pass
        except TimeoutError:
            pass

    # -- actions -----------------------------------------------------------------

    async def records_frames(self, rng: random.Random) -> None:
        ws = await self._ws(self.records_port, "/socket.io/?EIO=4&transport=websocket")
        if ws is None:
            return
        reader, writer = ws
        packets = [b"40", b'42["records",{"room":"group-1"}]', b"2", b"3probe", b"5",
                   b'451-["e",{"_placeholder":true,"num":0}]', b"40" + b"{" * 50, b"4" + b"x" * 5000,
                   b'40{"pid":"' + b"A" * 300 + b'","offset":"x"}', b"\xff\xfe", b"1"]
        for _ in range(rng.randint(1, 8)):
            payload = rng.choice(packets)
            if rng.random() < 0.5:
                payload = mutate(payload, rng)
            opcode = rng.choice([0x1, 0x1, 0x1, 0x2, 0x0, 0x3, 0x9, 0xA, 0xB])
            frame = masked((0x80 if rng.random() < 0.9 else 0) | opcode, payload)
            if rng.random() < 0.2:
                frame = mutate(frame, rng)
            writer.write(frame)
        if rng.random() < 0.2:  # a length far beyond any limit
            writer.write(bytes((0x81, 0xFF)) + (1 << 40).to_bytes(8, "big") + b"abcd" + b"x" * 100)
        await writer.drain()
        await self._drain(reader, rng.uniform(0.2, 2))
        writer.transport.abort()

    async def records_polling(self, rng: random.Random) -> None:
        reader, writer = await self._connect(self.records_port)
        sid = "".join(rng.choice("abcdefXYZ0123-_") for _ in range(20))
        body = rng.choice([b"40", b"42[", b"\x1e\x1e4", b"2\x1e" * 200, mutate(b'42["x",{"y":1}]', rng),
                           rng.randbytes(rng.randint(1, 3000))])
        path = rng.choice([f"/socket.io/?EIO=4&transport=polling&sid={sid}", "/socket.io/?EIO=3&transport=polling",
                           "/socket.io/?EIO=4&transport=flash", "/socket.io/?EIO=4&transport=polling&sid=%ff%00"])
        if rng.random() < 0.3:
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:5], body[5:])) + rng.choice(
                [b"0\r\n\r\n", b"zz\r\n", b"fffffffffffff\r\n", b""])
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            writer.write(head + chunks)
        else:
            length = len(body) if rng.random() < 0.8 else rng.choice([10**12, -1, len(body) + 50])
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + body)
        await writer.drain()
        await self._drain(reader, 2)
        writer.transport.abort()

    async def drip_head(self, rng: random.Random) -> None:
        # 73 bytes, one each 0.4 s: about 29 s, near three times the head
        # deadline (HTTP_HEAD_TIMEOUT_SECONDS, 10 s), and within the act's 40 s.
        async with self.drips:
            port = rng.choice([self.records_port, self.collab_port])
            head = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nX-Slow: yy\r\n\r\n"
            reader, writer = await self._connect(port)
            answer = asyncio.ensure_future(reader.read(1))  # done: the server answered or closed
            try:
                for byte in head:
                    if answer.done():
                        self.drips_closed += 1
                        return
                    try:
                        writer.write(bytes((byte,)))
                        await writer.drain()
                    except (ConnectionError, OSError):
                        self.drips_closed += 1
                        return
                    await asyncio.sleep(0.4)
                self.drips_outlived += 1
            finally:
                answer.cancel()
                writer.transport.abort()

    async def abandoned(self, rng: random.Random) -> None:
        """A socket opened and never authenticated (or never even spoken on)."""
        if rng.random() < 0.5:
            ws = await self._ws(self.collab_port, "/")
            if ws is None:
                return
            reader, writer = ws
            kind = rng.random()
            if kind < 0.35 and not self.greedy.locked():
                await self._greedy(rng, reader, writer)
                return
            if kind < 0.7:  # an auth that Rails answers too late
                writer.write(masked(0x82, hocuspocus("comment-77-body", 2, b"\x00" + _varstring("504,x"))))
        else:
            reader, writer = await self._connect(self.records_port)
            if rng.random() < 0.5:
                ws = await self._ws(self.records_port, "/socket.io/?EIO=4&transport=websocket")
                if ws is None:
                    writer.transport.abort()
                    return
                writer.transport.abort()
                reader, writer = ws
        await self._drain(reader, rng.uniform(5, 25))
        writer.transport.abort()

    async def _greedy(self, rng: random.Random, reader, writer) -> None:
        """GREEDY_AUTHS auths Rails answers too late (past the 100 pending documents
        that pause collab's reading of the socket), then 3 s later a
        hang-up, FIN and RST in turn. After a FIN the client still reads,
        so collab's writes succeed and only its poll of paused sockets can
        tell it has gone. Its calls to Rails must stay within its share and
        stop once it is gone (Hostile.check counts them at the Rails stand-in)."""
        async with self.greedy:
            token = f"504,greedy-{rng.getrandbits(48):012x}"
            base = rng.randrange(10**6, 10**7)
            fin = len(self.greedy_hung_up) % 2 == 0
            writer.write(b"".join(masked(0x82, hocuspocus(f"comment-{base + i}-body", 2, b"\x00" + _varstring(token)))
                                  for i in range(GREEDY_AUTHS)))
            try:
                await writer.drain()
                await asyncio.sleep(3)
                if fin:
                    writer.write_eof()
                    self.greedy_hung_up[token] = time.monotonic()
                    try:
                        await asyncio.wait_for(self._read_to_end(reader), 30)
                    except (TimeoutError, OSError):
                        pass
            finally:
                writer.transport.abort()
                self.greedy_hung_up.setdefault(token, time.monotonic())

    @staticmethod
    async def _read_to_end(reader) -> None:
        while await reader.read(65536):
            pass

    async def hocuspocus_frames(self, rng: random.Random) -> None:
        ws = await self._ws(self.collab_port, "/")
        if ws is None:
            return
        reader, writer = ws
        doc = f"comment-{rng.randint(500, 520)}-body"
        frames = [
            hocuspocus(doc, 2, b"\x00" + _varstring(rng.choice(["0,x", "1,wrong", "3,s3", "x" * 300]))),
            hocuspocus(doc, 0, b"\x00\x00"),
            hocuspocus(doc, 0, b"\x02" + _varstring(rng.randbytes(40))),
            hocuspocus(doc, 1, _varstring(rng.randbytes(30))),
            hocuspocus(doc, 6, b"x"),
            hocuspocus(doc, 99, b""),
            _varuint(10**9) + b"abc",
            hocuspocus("not a document", 2, b"\x00" + _varstring("1,s1")),
            rng.randbytes(rng.randint(1, 64)),
        ]
        writer.write(masked(0x82, frames[0]))
        for _ in range(rng.randint(1, 8)):
            frame = rng.choice(frames)
            if rng.random() < 0.5:
                frame = mutate(frame, rng)
            writer.write(masked(rng.choice([0x82, 0x82, 0x81, 0x02]), frame))
        await writer.drain()
        await self._drain(reader, rng.uniform(0.2, 2))
        writer.transport.abort()

    async def publish_junk(self, rng: random.Random) -> None:
        deep = "[" * 20000 + "]" * 20000
        choices = [
            ("/records", b"{not json"),
            ("/records", b"\xff\xfe\x00"),
            ("/records", json.dumps({"room": 5, "records": {}}).encode()),
            ("/records", json.dumps({"room": "group-999", "records": {"x": deep}}).encode()),
            ("/records", b'{"room": "group-998", "records": ' + deep.encode() + b"}"),
            ("/records", b'{"room": "group-997", "records": {"a": "' + b"x" * 3_000_000 + b'"}}'),
            ("/system_notice", b"["),
            ("/system_notice", b"x" * 2_000_000),
            ("/system_notice", deep.encode()),
            ("chatbot/publish", b"{"),
            ("chatbot/publish", b"x" * 400_000),
            ("chatbot/publish", json.dumps({"config": {"server": 5}, "payload": []}).encode()),
            ("chatbot/test", json.dumps({"server": "http://127.0.0.1:1", "access_token": "t",
                                         "channel": "#nowhere:localhost", "message": "m"}).encode()),
            ("chatbot/other", b"{}"),
        ]
        if self.junk_chatbot is not None:
            nested = "<div>" * 3000 + "deep" + "</div>" * 3000
            wide = "<p>" + "<b>x</b>" * 5000 + "</p>"
            links = "".join(f'<a href="https://e.test/{i}">{i}</a>' for i in range(3000))
            for html in (nested, wide, links, "<p>" + "&amp;" * 20000 + "</p>"):
                choices.append(("chatbot/publish", self.junk_chatbot.replace("@HTML@", json.dumps(html)[1:-1]).encode()))
        channel, data = rng.choice(choices)
        await self.redis.publish(channel, data)

    def check(self, rails) -> list[str]:
        """The invariants of the hostile acts themselves (issue 21's heads
        that never time out and the Rails pool one socket could drain):
        every drip-fed head was closed by the server before it was sent
        whole; no greedy socket had more than SEEN_CALLS_PER_SOCKET calls at
        Rails at once, nor had one begun over HUNG_UP_GRACE_SECONDS after
        it hung up (collab polls paused sockets for their peer once a
        second; a stalled proxy passes the hang-up on within 4 s)."""
        problems = []
        if self.drips_outlived:
            problems.append(f"{self.drips_outlived} drip-fed request heads were sent whole without the server "
                            f"closing them ({self.drips_closed} closed)")
        with rails.lock:
            for token, hung_up in self.greedy_hung_up.items():
                calls = rails.calls_at.get(token, [])
                late = sum(1 for at in calls if at > hung_up + HUNG_UP_GRACE_SECONDS)
                peak = rails.peak_in_flight_by.get(token, 0)
                if peak > SEEN_CALLS_PER_SOCKET:
                    problems.append(f"a greedy pre-auth socket had {peak} calls at Rails at once "
                                    f"(its share is {MAX_CALLS_PER_SOCKET}, seen as at most {SEEN_CALLS_PER_SOCKET}; "
                                    f"{len(calls)} calls in all)")
                if late:
                    problems.append(f"{late} of a greedy pre-auth socket's {len(calls)} calls to Rails began "
                                    f"over {HUNG_UP_GRACE_SECONDS} s after it hung up")
        return problems

    def greedy_figure(self, rails) -> str:
        with rails.lock:
            peaks = [rails.peak_in_flight_by.get(t, 0) for t in self.greedy_hung_up]
            calls = [len(rails.calls_at.get(t, [])) for t in self.greedy_hung_up]
        return (f"hostile: {self.drips_closed} drip-fed heads closed by the server, {self.drips_outlived} sent whole; "
                f"{len(peaks)} greedy pre-auth sockets, at most {max(peaks, default=0)} Rails calls at once and "
                f"{max(calls, default=0)} in all for one")

    def figure(self) -> str:
        return f"{sum(self.counts.values())} hostile acts"
