"""`channels-doctor` as an operator runs it, against real parts: a Redis of
its own (with a password, persistence and noeviction), the development Rails
stand-in, and records, collab and bots as `make run` starts them; then the
same with Redis stopped, an allkeys-lru Redis, a Redis without CONFIG, an
unreachable Rails, a Rails that allows anyone, and bad /current_users/ keys.
No output ever carries a token, a key, a user name or a password."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis as redis_sync
from channels_dev.redis_server import start_local_redis

from tests.support import VENV_BIN, ServiceProcess, free_port

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow

PASSWORD = "doctor-redis-password-7f3a"
TOKEN = "secret-channel-token-4b1d9e"
USER_NAME = "Ada Lovelace-Doctor"
APP_URL = "http://localhost:5000"
SECRETS = (PASSWORD, TOKEN, USER_NAME, "playground-demo-token", "Playground Demo")


@pytest.fixture(scope="module")
def system():
    """A healthy deployment: Redis with a password and an append-only file,
    dev-rails, records, collab and bots, each on a free port."""
    redis = start_local_redis(extra_args=("--appendonly", "yes", "--requirepass", PASSWORD))
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"
    services = []
    try:
        rails = ServiceProcess("channels-dev-rails", free_port(), {"REDIS_URL": url}).start(ready=True)
        services.append(rails)
        env = {"REDIS_URL": url, "PUBLIC_APP_URL": APP_URL, "PRIVATE_APP_URL": rails.url}
        for script in ("channels-records", "channels-collab", "channels-bots"):
            services.append(ServiceProcess(script, free_port(), env).start(ready=True))
        # As Rails' BootController writes it.
        client = redis_sync.Redis.from_url(url)
        client.set(f"/current_users/{TOKEN}", json.dumps({"name": USER_NAME, "group_ids": [1, 2], "id": 42}))
        client.close()
        ports = {"records": services[1].port, "collab": services[2].port, "bots": services[3].port}
        yield {"redis": redis, "env": env, "ports": ports, "url": url}
    finally:
        for service in services:
            service.stop()
        redis.cleanup()


def doctor(system, *args: str, **env: str) -> tuple[int, str]:
    ports = system["ports"]
    argv = [str(VENV_BIN / "channels-doctor"), "--timeout", "2",
            "--records-port", str(ports["records"]), "--collab-port", str(ports["collab"]),
            "--bots-port", str(ports["bots"]), *args]
    environment = {k: v for k, v in os.environ.items() if k not in ("PORT", "CANONICAL_HOST", "APP_URL")}
    environment.update(system["env"])
    environment.update(env)
    done = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    for secret in SECRETS:
        assert secret not in output, f"doctor printed a secret: {secret!r}"
    assert not re.search(r"/current_users/[^*]", output), "doctor printed a key name"
    return done.returncode, done.stdout


def lines(stdout: str) -> dict[str, str]:
    """{check name: the line's symbol}."""
    out = {}
    for line in stdout.splitlines():
        symbol, _, rest = line.partition(" ")
        out[rest.split(": ", 1)[0]] = symbol
    return out


def test_a_healthy_system_is_all_ticks(system):
    code, out = doctor(system)
    marks = lines(out)
    assert set(marks.values()) == {"✓"}, out
    assert code == 0
    assert {"redis", "redis eviction policy", "redis persistence", "/current_users/* keys", "bots claim keys",
            "rails auth callback", "PUBLIC_APP_URL"} <= set(marks)
    assert sum(name.startswith("port ") for name in marks) == 3
    assert "Valkey" in out or "Redis" in out
    assert "served by channels records" in out and "served by channels collab" in out
    assert "refuses a made-up user with a wrong secret (HTTP 401)" in out


def test_json_output(system):
    code, out = doctor(system, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert {c["status"] for c in report["checks"]} == {"ok"}
    assert all(set(c) == {"name", "status", "message"} for c in report["checks"])


def test_redis_stopped(system):
    redis = system["redis"]
    redis.stop()
    try:
        code, out = doctor(system)
    finally:
        redis.start()
    marks = lines(out)
    assert code == 1
    assert marks["redis"] == "✗"
    assert marks["redis eviction policy"] == marks["/current_users/* keys"] == "-"
    assert marks["rails auth callback"] == "✓"


def test_an_allkeys_lru_redis_fails_with_what_to_change(system):
    lru = start_local_redis(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"))
    try:
        code, out = doctor(system, REDIS_URL=lru.url)
    finally:
        lru.cleanup()
    marks = lines(out)
    assert code == 1
    assert marks["redis eviction policy"] == "✗"
    assert "allkeys-lru" in out and "noeviction" in out
    assert marks["redis"] == "✓"
    assert marks["redis persistence"] == "!"  # no persistence: a warning, not a failure
    assert marks["/current_users/* keys"] == "!"  # none there


def test_config_get_disabled_is_unknown_not_a_failure(system):
    managed = start_local_redis(extra_args=("--rename-command", "CONFIG", "", "--requirepass", PASSWORD))
    try:
        client = redis_sync.Redis(port=managed.port, password=PASSWORD)
        client.set(f"/current_users/{TOKEN}", json.dumps({"id": None, "name": USER_NAME}))
        client.close()
        code, out = doctor(system, REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{managed.port}/0")
    finally:
        managed.cleanup()
    marks = lines(out)
    assert marks["redis eviction policy"] == marks["redis persistence"] == "!"
    assert "unknown" in out
    assert marks["/current_users/* keys"] == "✓"  # a visitor's token: id null, no groups
    assert code == 0


def test_rails_unreachable(system):
    code, out = doctor(system, PRIVATE_APP_URL=f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert lines(out)["rails auth callback"] == "✗"
    assert "unreachable" in out


class _AllowEveryone(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_rails_that_allows_unknown_tokens_fails(system):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AllowEveryone)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, out = doctor(system, PRIVATE_APP_URL=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1
    assert lines(out)["rails auth callback"] == "✗"
    assert "allows unknown tokens" in out


def test_bad_current_users_values_fail_without_naming_keys(system):
    client = redis_sync.Redis.from_url(system["url"])
    bad = {f"/current_users/{TOKEN}-a": "not json", f"/current_users/{TOKEN}-b": json.dumps({"id": "42"})}
    try:
        for key, value in bad.items():
            client.set(key, value)
        client.hset(f"/current_users/{TOKEN}-c", "id", 1)
        code, out = doctor(system)
    finally:
        client.delete(*bad, f"/current_users/{TOKEN}-c")
        client.close()
    assert code == 1
    assert lines(out)["/current_users/* keys"] == "✗"
    assert re.search(r"✗ /current_users/\* keys: 3 of 5 sampled", out), out  # and the two good ones
    assert "not JSON (1)" in out and "id is not a number or null (1)" in out and "not a string value (1)" in out


def test_bad_public_app_url_and_a_port_taken_by_a_stranger(system):
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        code, out = doctor(system, "--bots-port", str(port), PUBLIC_APP_URL="https://loomio.example.org/app")
    marks = lines(out)
    assert code == 1
    assert marks["PUBLIC_APP_URL"] == "✗"
    assert marks[f"port {port} (bots)"] == "✗"
    assert "not a channel service" in out


def test_inside_a_service_container_one_port_serves_them_all(system):
    """With PORT set, as in every container, each service's port setting is
    the same: that port is fine when any one of them serves it."""
    collab = str(system["ports"]["collab"])
    code, out = doctor(system, "--records-port", collab, "--bots-port", collab)
    assert code == 0, out
    assert f"✓ port {collab} (records, collab, bots): served by channels collab" in out
    # A port that one of ours serves, but not the service expected there.
    code, out = doctor(system, "--bots-port", collab, "--collab-port", str(free_port()))
    assert code == 1
    assert f"✗ port {collab} (bots): served by channels collab, not bots" in out
