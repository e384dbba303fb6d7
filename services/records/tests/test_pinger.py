"""The engine's one pinger: a PING to each socket a ping interval after its
last PONG, none to a socket still owing one (stand-in sockets)."""

from __future__ import annotations

import asyncio
import time

from channels_records import engine as engine_module
from channels_records.engine import RecordsEngine


class Sock:
    def __init__(self, next_ping, last_ping=None):
        self.next_ping = next_ping
        self.last_ping = last_ping
        self.closing = self.closed = False
        self.sent = []

    async def send(self, pkt):
        self.sent.append(pkt.encode())


async def test_pings_only_the_sockets_that_are_due(monkeypatch):
    monkeypatch.setattr(engine_module, "PING_TICK_SECONDS", 0.01)
    eng = RecordsEngine(async_mode="asgi", ping_interval=25)
    now = time.monotonic()
    due, later, owing, closing = Sock(now - 1), Sock(now + 60), Sock(now - 1, last_ping=time.time()), Sock(now - 1)
    closing.closing = True
    for i, s in enumerate((due, later, owing, closing)):
        eng.sockets[f"s{i}"] = s
    eng.start_pinger()
    try:
        await asyncio.sleep(0.1)
    finally:
        eng._pinger.cancel()
    assert due.sent == ["2"] and due.last_ping is not None  # once: it now owes a PONG
    assert later.sent == [] and owing.sent == [] and closing.sent == []
