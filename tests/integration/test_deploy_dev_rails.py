"""The development stand-in for Rails (`channels-dev-rails`) and the image
health probe (`channels-healthcheck`), run as their console scripts."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from channels_common import healthcheck
from channels_dev import dev_rails

from tests.support import VENV_BIN, ServiceProcess, free_port, wait_for


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"user_secret": "1,abc", "document_name": "comment-1-body"}', ("1,abc", "comment-1-body")),
        (b"not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[1, 2]", "body is not a JSON object"),
        (b'{"user_secret": 5, "document_name": "x"}', "user_secret and document_name must be strings"),
        (b'{"user_secret": "a", "document_name": ""}', "user_secret and document_name must be strings"),
        (b'{"user_secret": "' + b"a" * 70000 + b'", "document_name": "x"}', "body too large"),
    ],
)
def test_hocuspocus_request_parsing(body, expected):
    assert dev_rails.parse_hocuspocus_request(body) == expected


def test_refuses_to_start_in_production():
    port = free_port()
    done = subprocess.run([str(VENV_BIN / "channels-dev-rails")], check=False, capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "RAILS_ENV": "production", "PORT": str(port)})
    assert done.returncode == 2
    assert "development stand-in for Rails" in done.stderr
    assert "refuses to run with RAILS_ENV=production" in done.stderr


@pytest.fixture
def stand_in(redis_url, redis_sync_client):
    service = ServiceProcess("channels-dev-rails", free_port(), {"REDIS_URL": redis_url, "RAILS_ENV": "development"})
    service.start(ready=True)
    yield service
    service.stop()


def test_writes_the_demo_token_and_allows_documents(stand_in, redis_sync_client):
    stored = json.loads(redis_sync_client.get(f"/current_users/{dev_rails.DEMO_TOKEN}"))
    assert stored == {"id": dev_rails.DEMO_USER_ID, "name": dev_rails.DEMO_USER_NAME,
                      "group_ids": list(dev_rails.DEMO_GROUP_IDS)}
    assert dev_rails.collab_token() == f"{dev_rails.DEMO_USER_ID},{dev_rails.DEMO_TOKEN}"

    ok = httpx.post(stand_in.url + "/api/hocuspocus",
                    json={"user_secret": dev_rails.collab_token(), "document_name": "comment-1-body"})
    assert ok.status_code == 200
    # Anyone else is refused, as Rails refuses unknown users.
    other = httpx.post(stand_in.url + "/api/hocuspocus",
                       json={"user_secret": f"{dev_rails.DEMO_USER_ID},wrong", "document_name": "comment-1-body"})
    assert other.status_code == 401

    # Hostile input: a clear 400 and a log line, and the process carries on.
    for bad in (b"{", b"[]", b'{"user_secret": null}'):
        answer = httpx.post(stand_in.url + "/api/hocuspocus", content=bad)
        assert answer.status_code == 400
    assert httpx.get(stand_in.url + "/api/hocuspocus").status_code == 405
    assert httpx.get(stand_in.url + "/healthz").status_code == 200
    logs = stand_in.logs()
    assert "bad /api/hocuspocus request" in logs
    assert "DEVELOPMENT STAND-IN FOR RAILS" in logs
    assert dev_rails.DEMO_TOKEN not in logs  # never log secrets, even a demo one


def test_demo_token_comes_back_after_redis_loses_it(redis_url, redis_sync_client):
    service = ServiceProcess("channels-dev-rails", free_port(), {
        "REDIS_URL": redis_url, "DEV_RAILS_TOKEN_REFRESH_SECONDS": "0.2"})
    service.start(ready=True)
    try:
        redis_sync_client.flushdb()
        wait_for(lambda: redis_sync_client.exists(f"/current_users/{dev_rails.DEMO_TOKEN}"), 10,
                 what="the demo token to be rewritten")
    finally:
        service.stop()


def test_healthcheck_probe_url_follows_port():
    assert healthcheck.probe_url(5000, "/healthz", {}) == "http://127.0.0.1:5000/healthz"
    assert healthcheck.probe_url(5000, "/healthz", {"PORT": "6001"}) == "http://127.0.0.1:6001/healthz"
    with pytest.raises(ValueError):
        healthcheck.probe_url(5000, "/healthz", {"PORT": "50; rm -rf"})


def test_healthcheck_exit_status(stand_in, monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    assert healthcheck.main(["--port", str(stand_in.port)]) == 0
    assert healthcheck.main(["--port", str(stand_in.port), "--path", "/nope"]) == 1
    assert healthcheck.main(["--port", str(free_port()), "--timeout", "1"]) == 1
