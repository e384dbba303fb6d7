"""A real Matrix homeserver for the bots tests: Synapse from PyPI, installed
once into its own virtualenv (its dependencies must not meet ours), configured
here (loopback, SQLite, shared-secret registration) and run as a subprocess.

The message rate limit is hard for everyone; the test users that should not
be limited get a per-user override through the admin API, so one homeserver
serves both the ordinary tests and the rate-limit test.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

CACHE_DIR = Path(os.environ.get("CHANNELS_TEST_CACHE", Path.home() / ".cache" / "channels-test"))
VENV = CACHE_DIR / "synapse-venv"
# Synapse is pinned to a major version; the fixture speaks only the stable
# client and admin APIs, so minor versions are interchangeable.
SYNAPSE_REQUIREMENT = os.environ.get("SYNAPSE_REQUIREMENT", "matrix-synapse>=1.100,<2")
SERVER_NAME = "localhost"
# The hard limit every user without an override gets (the rate-limit test's bot).
HARD_MESSAGES_PER_SECOND = 2.0
HARD_BURST = 2


class SynapseUnavailable(RuntimeError):
    pass


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_installed(timeout: float = 900.0) -> Path:
    """Install Synapse into its own virtualenv unless already there. A file
    lock keeps concurrent test sessions from installing into it together."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    marker = VENV / ".channels-installed"
    with open(CACHE_DIR / "synapse-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and _venv_python().exists():
            # A cached venv outlives the interpreter it was made from; check it still works.
            check = subprocess.run([str(_venv_python()), "-c", "import synapse"],
                                   capture_output=True, timeout=120, check=False)
            if check.returncode == 0:
                return _venv_python()
        shutil.rmtree(VENV, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(VENV)],
            [str(_venv_python()), "-m", "pip", "install", "-q", SYNAPSE_REQUIREMENT],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise SynapseUnavailable(
                    f"could not install Synapse ({' '.join(step[-2:])}): exit {done.returncode}\n"
                    f"{done.stderr[-3000:]}"
                )
        marker.write_text(SYNAPSE_REQUIREMENT + "\n")
        return _venv_python()


def _config(directory: Path, port: int, shared_secret: str) -> dict:
    generous = {"per_second": 1000, "burst_count": 1000}
    return {
        "server_name": SERVER_NAME,
        "pid_file": str(directory / "homeserver.pid"),
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(directory / "log.yaml"),
        "media_store_path": str(directory / "media"),
        "signing_key_path": str(directory / "signing.key"),
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "report_stats": False,
        "enable_metrics": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "bcrypt_rounds": 4,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "rc_message": {"per_second": HARD_MESSAGES_PER_SECOND, "burst_count": HARD_BURST},
        "rc_registration": generous,
        "rc_login": {"address": generous, "account": generous, "failed_attempts": generous},
        "rc_joins": {"local": generous, "remote": generous},
        "rc_joins_per_room": generous,
        "rc_invites": {"per_room": generous, "per_user": generous, "per_issuer": generous},
        "rc_admin_redaction": generous,
        "rc_3pid_validation": generous,
    }


_LOG_CONFIG = """\
version: 1
formatters:
  plain:
    format: '%(asctime)s %(levelname)s %(name)s %(message)s'
handlers:
  file:
    class: logging.FileHandler
    filename: {path}
    formatter: plain
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


@dataclass
class MatrixUser:
    user_id: str
    access_token: str


def _memory_dir() -> str | None:
    """/dev/shm when there is one: the homeserver's SQLite database keeps
    nothing worth an fsync (300 sends: 19 s there, 33 s on disk, measured)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class Synapse:
    """One running homeserver and a small client for the tests' own calls."""

    def __init__(self, python: Path, port: int):
        self.python = python
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="synapse-", dir=_memory_dir()))
        self.shared_secret = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self.admin: MatrixUser | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "homeserver.log"

    def start(self, timeout: float = 90.0) -> None:
        config_path = self.directory / "homeserver.yaml"
        # JSON is YAML, and needs no YAML library on our side.
        config_path.write_text(json.dumps(_config(self.directory, self.port, self.shared_secret), indent=1))
        (self.directory / "log.yaml").write_text(_LOG_CONFIG.format(path=self.log_path))
        keys = subprocess.run(
            [str(self.python), "-m", "synapse.app.homeserver", "-c", str(config_path), "--generate-keys"],
            capture_output=True, text=True, timeout=120, cwd=self.directory, check=False,
        )
        if keys.returncode != 0:
            raise SynapseUnavailable(f"synapse --generate-keys failed:\n{keys.stderr[-3000:]}")
        # Held open for the life of the process, closed in stop().
        self._stdout = open(self.directory / "stdout.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(self.python), "-m", "synapse.app.homeserver", "-c", str(config_path)],
            cwd=self.directory, stdout=self._stdout, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SynapseUnavailable(f"synapse exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if self.http.get("/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SynapseUnavailable(f"synapse did not answer /health within {timeout}s:\n{self.logs()}")
        self.admin = self.register("admin", admin=True)
        self.unlimit(self.admin)

    def logs(self) -> str:
        parts = []
        for name in ("stdout.log", "homeserver.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        if getattr(self, "_stdout", None):
            self._stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- client and admin API, as a test needs it -------------------------------

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> dict:
        """A client API call that waits out rate limiting, as any client would."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for _ in range(50):
            response = self.http.request(method, path, headers=headers, **kwargs)
            if response.status_code == 429:
                time.sleep(response.json().get("retry_after_ms", 500) / 1000)
                continue
            if response.status_code >= 400:
                raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
            return response.json()
        raise AssertionError(f"{method} {path}: still rate limited")

    def register(self, localpart: str, admin: bool = False) -> MatrixUser:
        """Shared-secret registration (the admin API Synapse documents)."""
        path = "/_synapse/admin/v1/register"
        nonce = self.request("GET", path)["nonce"]
        password = secrets.token_hex(12)
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(
            [nonce.encode(), localpart.encode(), password.encode(), b"admin" if admin else b"notadmin"]
        ))
        body = self.request("POST", path, json={
            "nonce": nonce, "username": localpart, "password": password,
            "admin": admin, "mac": mac.hexdigest(),
        })
        user = MatrixUser(body["user_id"], body["access_token"])
        user.password = password  # type: ignore[attr-defined]
        return user

    def login(self, user: MatrixUser) -> str:
        """A further access token for the same user (another device)."""
        localpart = user.user_id.split(":")[0][1:]
        body = self.request("POST", "/_matrix/client/v3/login", json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": user.password,  # type: ignore[attr-defined]
        })
        return body["access_token"]

    def unlimit(self, user: MatrixUser) -> None:
        quoted = urllib.parse.quote(user.user_id)
        self.request("POST", f"/_synapse/admin/v1/users/{quoted}/override_ratelimit",
                     token=self.admin.access_token, json={"messages_per_second": 0, "burst_count": 0})

    def create_room(self, owner: MatrixUser, alias_localpart: str) -> str:
        body = self.request("POST", "/_matrix/client/v3/createRoom", token=owner.access_token, json={
            "preset": "public_chat", "room_alias_name": alias_localpart, "name": alias_localpart,
        })
        return body["room_id"]

    def join(self, user: MatrixUser, room: str) -> None:
        self.request("POST", f"/_matrix/client/v3/join/{urllib.parse.quote(room)}", token=user.access_token)

    def messages(self, reader: MatrixUser, room_id: str) -> list[dict]:
        """Every m.room.message event of a room, oldest first."""
        events: list[dict] = []
        params = {"dir": "f", "limit": "500"}
        path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/messages"
        while True:
            body = self.request("GET", path, token=reader.access_token, params=params)
            chunk = body.get("chunk", [])
            events.extend(e for e in chunk if e.get("type") == "m.room.message")
            if not chunk or "end" not in body:
                return events
            params["from"] = body["end"]


def start_homeserver() -> Synapse:
    """Install if needed and start one homeserver; a machine that cannot
    install or run Synapse makes the caller fail, never skip."""
    from tests.support import free_port

    server = Synapse(ensure_installed(), free_port())
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
