"""The processes of a benchmark run: servers under test and the Node load
generators, each its own OS process, started and stopped by run.py."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server under test: one process, reachable on 127.0.0.1:port."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict, cwd: Path = ROOT):
        self.name = name
        self.argv = argv
        self.port = port
        self.env = env
        self.cwd = cwd
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, health_path: str = "/healthz", timeout: float = 30.0) -> Server:
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.argv, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{health_path}", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {health_path} within {timeout} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class NodeDriver:
    """A load generator in bench/loadgen: JSON commands in, JSON events out."""

    # A young generation of 64 MB instead of Node's default 16: one load
    # generator holds a thousand providers or two thousand sockets, and with
    # the default it scavenged every ~0.6 s for 5-9 ms, holding up every
    # update in flight to it whichever server ran. Measured on collab: its
    # GC time over the edit phase fell from 120-160 ms to ~55 ms, and our
    # p99 from 2.2-11.3 ms (round to round) to 1.7-1.8 ms. The servers run
    # with their own defaults.
    NODE_ARGS = ("--max-semi-space-size=64",)

    def __init__(self, script: str):
        self.process = subprocess.Popen(
            ["node", *self.NODE_ARGS, str(BENCH / "loadgen" / script)],
            cwd=BENCH,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.stderr_tail.append(line)
        self.events.put(None)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-50:]

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def call(self, command: dict, expect: str, timeout: float = 120.0) -> dict:
        """Send a command and wait for the event that answers it."""
        self.send(command)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"load generator gave no {expect!r} within {timeout} s")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                tail = "\n".join(self.stderr_tail[-20:])
                raise RuntimeError(f"load generator exited {self.process.poll()}:\n{tail}")
            if event.get("event") == "error":
                raise RuntimeError(f"load generator: {event.get('error')}")
            if event.get("event") == expect:
                return event

    def close(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "close"})
                self.process.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def end_run(server: Server, driver: NodeDriver | None, profiler, result: dict) -> None:
    """A scenario's teardown, whatever happened: stop the profiler and the
    load generator, then the server; a server found dead by then is an
    error of the run unless one is already recorded."""
    if profiler is not None:
        profiler.stop()
    if driver is not None:
        driver.close()
    alive = server.alive()
    server.stop()
    if not alive and "error" not in result:
        result["error"] = "server exited during the run"
