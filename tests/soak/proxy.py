"""A small asyncio TCP balancer in front of the instances of one service.

Each client is kept on one live instance by its source address (as an L4
balancer hashing client addresses does, so long-polling requests of one
client meet the same instance); a dead instance's clients move to the next
live one. Faults: `cut` aborts a share of the open connections, `stall`
stops reading from either side for a while (a balancer under pressure),
`block` takes one client's network away for a while."""

from __future__ import annotations

import asyncio
import random
import zlib


class BalancingProxy:
    def __init__(self, name: str, backends: list[int]):
        self.name = name
        self.backends = list(backends)
        self.port = 0
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter, str]] = set()
        self.stalled = asyncio.Event()
        self.stalled.set()  # set: reading; cleared: stalled
        self.accepted = 0
        self.blocked: dict[str, float] = {}  # source address -> loop time its outage ends

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def _order(self, address: str) -> list[int]:
        first = zlib.crc32(address.encode()) % len(self.backends)
        return self.backends[first:] + self.backends[:first]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        address = writer.get_extra_info("peername")[0]
        if self.blocked.get(address, 0.0) > asyncio.get_running_loop().time():
            writer.transport.abort()
            return
        upstream = None
        for port in self._order(address):
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
            except (TimeoutError, OSError):
                continue
        if upstream is None:
            writer.transport.abort()
            return
        up_reader, up_writer = upstream
        pair = (writer, up_writer, address)
        self.pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.pairs.discard(pair)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.stalled.wait()
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    def cut(self, share: float, rng: random.Random) -> int:
        """Abort about `share` of the open connections; how many were cut."""
        pairs = sorted(self.pairs, key=id)
        chosen = [p for p in pairs if rng.random() < share]
        for client, upstream, _ in chosen:
            client.transport.abort()
            upstream.transport.abort()
        return len(chosen)

    def block(self, address: str, seconds: float) -> None:
        """The network of the client at `address` goes for `seconds`: its
        connections are cut and new ones refused (no goodbye is sent)."""
        self.blocked[address] = asyncio.get_running_loop().time() + seconds
        for client, upstream, source in list(self.pairs):
            if source == address:
                client.transport.abort()
                upstream.transport.abort()

    async def stall(self, seconds: float) -> None:
        self.stalled.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.stalled.set()

    def close(self) -> None:
        self.server.close()
        for client, upstream, _ in list(self.pairs):
            client.transport.abort()
            upstream.transport.abort()
