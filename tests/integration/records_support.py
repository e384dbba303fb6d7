"""Helpers for the records service tests: the service as a real process and
real socket.io-client sockets driven through tests/node/sio-client.mjs."""

from __future__ import annotations

import json
import threading
import time

import redis as redis_sync
from channels_common.publish import NOTICE_CHANNEL, RECORDS_CHANNEL

from tests.support import NodeScript, ServiceProcess, free_port

APP_ORIGIN = "https://app.loomio.test"


def _raise_fd_limit(want: int = 16384) -> None:
    """Thousands of sockets per process in the storm tests: lift the soft
    limit (children inherit it) as far as the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_raise_fd_limit()


def start_records(redis_url: str, ready: bool = True, **env) -> ServiceProcess:
    environment = {"REDIS_URL": redis_url, "PUBLIC_APP_URL": APP_ORIGIN, "LOG_LEVEL": "INFO"}
    environment.update({k: str(v) for k, v in env.items()})
    return ServiceProcess("channels-records", free_port(), environment).start(ready=ready)


class Rails:
    """The Rails side, synchronously: tokens and publishes."""

    def __init__(self, redis_url: str):
        self.r = redis_sync.Redis.from_url(redis_url)

    def token(self, token: str, user_id: int | None, groups=(), name: str = "Jane Secretname") -> None:
        self.r.set(f"/current_users/{token}", json.dumps({"name": name, "group_ids": list(groups), "id": user_id}))

    def records(self, room: str, records) -> int:
        return self.r.publish(RECORDS_CHANNEL, json.dumps({"room": room, "records": records}))

    def notice(self, message) -> int:
        return self.r.publish(NOTICE_CHANNEL, json.dumps(message))

    def raw(self, channel: str, data: bytes | str) -> int:
        return self.r.publish(channel, data)

    def close(self) -> None:
        self.r.close()


class SioClients:
    """socket.io-client 4.8 sockets in one Node process; every line it prints
    is collected here."""

    def __init__(self, url: str, clients: list[dict], **config):
        self.lines: list[dict] = []
        # Kept as lines arrive, so that waiting on thousands of clients does
        # not rescan every line on every wake-up.
        self.connects: dict[str, int] = {}
        self.type_counts: dict[str, int] = {}
        self.by_client: dict[str, list[dict]] = {}
        self.cond = threading.Condition()
        self.node = NodeScript("sio-client.mjs", json.dumps({"url": url, "clients": clients, **config}))
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.wait(lambda ls: any(l.get("type") == "started" for l in ls), 20, "node client start")

    def _read(self) -> None:
        for line in self.node.lines():
            with self.cond:
                self.lines.append(line)
                self.by_client.setdefault(line.get("c"), []).append(line)
                kind = line.get("type")
                self.type_counts[kind] = self.type_counts.get(kind, 0) + 1
                if kind == "connect":
                    self.connects[line["c"]] = self.connects.get(line["c"], 0) + 1
                self.cond.notify_all()

    def _read_err(self) -> None:
        for line in self.node.process.stderr:
            self.stderr.append(line)

    def wait(self, predicate, timeout: float = 15.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(self.lines)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = self.lines[-15:]
                    raise AssertionError(f"timed out waiting for {what}; last lines: {tail}; stderr: {self.stderr[-5:]}")
                self.cond.wait(min(left, 0.2))

    def of(self, name: str, type_: str | None = None) -> list[dict]:
        with self.cond:
            lines = self.by_client.get(name, [])
            return [l for l in lines if type_ is None or l.get("type") == type_]

    def events(self, name: str, event: str | None = None) -> list[list]:
        return [l["args"] for l in self.of(name, "event") if event is None or l["event"] == event]

    def wait_connected(self, names, timeout: float = 20.0, count: int = 1) -> None:
        waiting = set(names)

        def done(_):
            for n in list(waiting):
                if self.connects.get(n, 0) >= count:
                    waiting.discard(n)
            return not waiting

        self.wait(done, timeout, f"{len(waiting)} clients connected")

    def count(self, type_: str) -> int:
        return self.type_counts.get(type_, 0)

    def wait_events(self, name: str, n: int, event: str | None = None, timeout: float = 15.0) -> list[list]:
        self.wait(lambda _: len(self.events(name, event)) >= n, timeout, f"{n} events for {name}")
        return self.events(name, event)

    def send(self, **command) -> None:
        self.node.send(command)

    def status(self) -> dict:
        before = len(self.lines)
        self.send(cmd="status")
        line = self.wait(
            lambda ls: next((l for l in ls[before:] if l.get("type") == "status"), None), 20, "status"
        )
        return line["clients"]

    def close(self) -> None:
        try:
            self.send(cmd="quit")
        except (BrokenPipeError, OSError):
            pass
        self.node.close()


class TcpProxy:
    """A small asyncio TCP proxy on its own thread. It can delay every chunk
    (a slow Redis), switch new connections to another backend, and cut all
    open connections (what a load balancer moving a client looks like)."""

    def __init__(self, target_port: int, delay: float = 0.0):
        import asyncio

        self.asyncio = asyncio
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.writers: set = set()
        # While refusing, new connections are closed at once: a network that
        # is down for the clients behind this proxy.
        self.refusing = False
        self.generation = 0
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio = self.asyncio
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.delay:
                    await self.asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (OSError, self.asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        generation = self.generation
        self.writers.add(writer)
        try:
            up_reader, up_writer = await self.asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self.writers.discard(writer)
            writer.close()
            return
        if self.refusing or generation != self.generation:
            # cut while this one was being connected: it must not survive
            self.writers.discard(writer)
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.writers.add(up_writer)
        await self.asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.writers.discard(writer)
        self.writers.discard(up_writer)

    def switch(self, target_port: int, cut: bool = True) -> None:
        self.target_port = target_port
        if cut:
            self.cut()

    def cut(self) -> None:
        async def abort_all():
            self.generation += 1
            for w in list(self.writers):
                w.transport.abort()

        self.asyncio.run_coroutine_threadsafe(abort_all(), self.loop).result(5)

    def outage(self) -> None:
        """Cut every connection and refuse new ones until `restore()`."""
        self.refusing = True
        self.cut()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RawWebSocket:
    """A websocket client that does the handshake and then never reads: the
    hostile or stuck client the buffer limit is for."""

    def __init__(self, port: int, path: str, rcvbuf: int = 4096):
        import base64
        import os
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise AssertionError("handshake refused")
            head += chunk
        assert b" 101 " in head.split(b"\r\n")[0], head

    def send_text(self, text: str) -> None:
        import os
        import struct

        payload = text.encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def drain_until_eof(self, timeout: float) -> bool:
        """Read everything; True when the server closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 20):
                pass
            return True
        except ConnectionResetError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()
