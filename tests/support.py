"""Helpers shared by every test folder (libs/*/tests, services/*/tests,
tests/): waits, fakes (a clock, an asyncio transport and websocket
protocol, masked client frames), ports, service processes, Node clients.
Service tests import it as `tests.support` (pytest's rootdir is on sys.path)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- waits -------------------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """The first truthy value of `predicate()`, polled from a blocking test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """The first truthy value of `predicate()`, polled from a coroutine (the
    event loop runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def settle(rounds: int = 10) -> None:
    """Let callbacks and tasks that are ready run, without waiting on time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- fakes -------------------------------------------------------------------


class FakeClock:
    """A clock the test moves: call it for the time, `advance` it by seconds.
    `per_second` is its units per second (1000: an integer millisecond clock)."""

    def __init__(self, start: float = 0.0, *, per_second: int = 1):
        self.now = start
        self.per_second = per_second

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        step = seconds * self.per_second
        self.now += int(step) if isinstance(self.now, int) else step


class FakeTransport:
    """An asyncio transport that keeps what is written: `out` (every byte;
    `take()` drains it) and `writes` (each buffer, as given). With
    `reads=False` the peer reads nothing: `buffer` (which a test may clear,
    as a client reading would) is what get_write_buffer_size reports."""

    PEER = ("127.0.0.1", 5555)
    SOCK = ("127.0.0.1", 5000)

    def __init__(self, *, reads: bool = True):
        self.reads = reads
        self.out = bytearray()
        self.writes: list = []
        self.buffer = bytearray()
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data) -> None:
        self.out += data
        self.writes.append(data)
        if not self.reads:
            self.buffer += data

    def get_write_buffer_size(self) -> int:
        return 0 if self.reads else len(self.buffer)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": self.PEER, "sockname": self.SOCK}.get(name, default)

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


class FakeProtocol:
    """The websocket protocol a service's socket transport drives: its
    `transport` and the (code, reason) of each close asked of it."""

    def __init__(self, transport: FakeTransport | None = None):
        self.transport = transport if transport is not None else FakeTransport()
        self.closed_with: list[tuple[int, str]] = []

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with.append((code, reason))


MASK_KEY = bytes.fromhex("37fa213d")


def masked(first: int, payload: bytes, key: bytes = MASK_KEY) -> bytes:
    """A client frame (clients mask, RFC 6455 5.3): first byte, length, key, payload."""
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = (key * (n // 4 + 1))[:n]
    return head + key + bytes(a ^ b for a, b in zip(payload, mask, strict=True))


# -- processes ---------------------------------------------------------------


@dataclass
class ServiceProcess:
    """A service started from its console script, as in production."""

    script: str
    port: int
    env: dict
    process: subprocess.Popen | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, ready: bool = False, timeout: float = 20.0) -> ServiceProcess:
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()/kill()
        self.process = subprocess.Popen(
            [str(VENV_BIN / self.script)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        if wait:
            self.wait_http("/readyz" if ready else "/healthz", timeout)
        return self

    def wait_http(self, path: str, timeout: float = 20.0) -> None:
        def ok():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.script} exited {self.process.returncode}:\n{self.logs()[-3000:]}")
            try:
                return httpx.get(self.url + path, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ok, timeout, what=f"{self.script} {path}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if not self.process:
            return None
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus text parsed into {'name{labels}': value}."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


class NodeScript:
    """A Node script from tests/node run as a child process that prints one
    JSON object per line on stdout (events) and reads commands on stdin."""

    def __init__(self, script: str, *args: str, env: dict | None = None):
        self.process = subprocess.Popen(
            ["node", str(NODE_DIR / script), *args],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
        )

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def lines(self):
        for line in self.process.stdout:
            line = line.strip()
            if line:
                yield json.loads(line)

    def close(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_node(script: str, *args: str, timeout: float = 60.0, env: dict | None = None) -> list[dict]:
    """Run a Node script to completion; return the JSON lines it printed."""
    done = subprocess.run(  # noqa: PLW1510 - the return code is checked below
        ["node", str(NODE_DIR / script), *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise AssertionError(f"node {script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


class ScriptedRedis:
    """A TCP server that speaks just enough RESP to stand in for a Redis
    that misbehaves: every command is answered by `answer(command)` (a list
    of bytes arguments -> the raw bytes to send back), and `connections`
    holds the writer of each connection so a test can push bytes of its own
    (garbage, a message) at any time."""

    def __init__(self, answer):
        self.answer = answer
        self.connections: list = []
        self.commands: list[list[bytes]] = []

    async def start(self) -> str:
        import asyncio

        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader, writer):
        from channels_common.resp import ReplyReader

        self.connections.append(writer)
        parser = ReplyReader()
        try:
            while data := await reader.read(65536):
                for command in parser.feed(data):
                    self.commands.append(command)
                    writer.write(self.answer(command))
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self):
        self.server.close()
        for writer in self.connections:
            writer.close()


class HttpTransport(asyncio.Transport):
    """A real asyncio.Transport that keeps what is written (`data`; `take()`
    drains whole HTTP responses) and the protocol an upgrade hands it to."""
    def __init__(self):
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.paused = False
        self.protocol = None

    def write(self, data):
        self.data += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 5000)}.get(name, default)

    def set_protocol(self, protocol):
        self.protocol = protocol

    def take(self) -> list[tuple[bytes, dict, bytes]]:
        """The complete responses written so far."""
        out = []
        while b"\r\n\r\n" in self.data:
            head, _, rest = bytes(self.data).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines[1:])}
            n = int(headers[b"content-length"])
            out.append((lines[0], headers, rest[:n]))
            del self.data[: len(head) + 4 + n]
        return out
