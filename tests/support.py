"""Helpers shared by the tests: service processes, Node clients, ports."""

from __future__ import annotations

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


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


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
