"""The development playground: its routes (never in production, publish only
from loopback, hostile input refused) against real Redis, and the page in
headless Chromium against the real services: two tabs edit one document
together through collab, and a record published from the page's form
reaches both through Redis and records."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from channels_common.settings import PlaygroundSettings
from channels_records.playground import default_dist_dir, parse_publish_request, playground_routes
from starlette.applications import Starlette

from tests.support import ROOT, ServiceProcess, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PLAYGROUND = ROOT / "playground"


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"kind": "records", "room": "group-1", "payload": {"a": 1}}', ("records", "group-1", {"a": 1})),
        (b'{"kind": "records", "room": "user-7", "payload": {}}', ("records", "user-7", {})),
        (b'{"kind": "notice", "payload": {"m": "x"}}', ("notice", None, {"m": "x"})),
        (b'{"kind": "records", "room": "notice", "payload": {}}', "room must be user-<id> or group-<id>"),
        (b'{"kind": "records", "room": "group-1; FLUSHALL", "payload": {}}', "room must be user-<id> or group-<id>"),
        (b'{"kind": "records", "payload": {}}', "room must be user-<id> or group-<id>"),
        (b'{"kind": "chatbot", "payload": {}}', "kind must be 'records' or 'notice'"),
        (b'{"kind": "notice", "payload": [1]}', "payload must be a JSON object"),
        (b"[]", "body is not a JSON object"),
        (b"{", "body is not JSON"),
        (b"\xff", "body is not JSON"),
        (b'{"kind": "notice", "payload": {"x": "' + b"a" * 70000 + b'"}}', "body over 65536 bytes"),
    ],
)
def test_publish_request_parsing(body, expected):
    assert parse_publish_request(body) == expected


def test_no_routes_in_production(tmp_path):
    settings = PlaygroundSettings.model_validate({"RAILS_ENV": "production", "PLAYGROUND_DIST": str(tmp_path)})
    assert playground_routes(settings) == []
    assert PlaygroundSettings.model_validate({"RAILS_ENV": "development"}).enabled


def test_default_bundle_location_is_the_checkout():
    assert default_dist_dir() == PLAYGROUND / "dist"


@pytest.fixture
def fake_dist(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>pg</title>")
    (tmp_path / "playground.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("not served")
    return tmp_path


def _client(routes, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(Starlette(routes=routes), client=(host, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://playground.test")


async def test_routes_serve_the_page_and_publish_from_loopback_only(fake_dist, redis_url, redis_sync_client):
    settings = PlaygroundSettings.model_validate({
        "RAILS_ENV": "development", "PLAYGROUND_DIST": str(fake_dist), "REDIS_URL": redis_url,
        "PLAYGROUND_COLLAB_URL": "ws://127.0.0.1:9999"})
    routes = playground_routes(settings)
    pubsub = redis_sync_client.pubsub()
    pubsub.subscribe("/records", "/system_notice")
    pubsub.get_message(timeout=1)
    pubsub.get_message(timeout=1)

    async with _client(routes, "127.0.0.1") as client:
        assert (await client.get("/")).text.startswith("<!doctype html>")
        script = await client.get("/playground/playground.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert (await client.get("/playground/secret.txt")).status_code == 404
        assert (await client.get("/playground/..%2Fsecret.txt")).status_code == 404
        config = (await client.get("/playground/config.json")).json()
        assert config["collabUrl"] == "ws://127.0.0.1:9999"
        assert config["collabToken"] == f"{config['user']['id']},{config['channelToken']}"
        assert "group-1" in config["rooms"]

        answer = await client.post("/playground/publish", json={
            "kind": "records", "room": "group-1", "payload": {"discussions": [{"id": 5}]}})
        assert answer.status_code == 200 and answer.json()["subscribers"] == 1
        message = pubsub.get_message(timeout=5)
        assert message["channel"] == b"/records"
        assert json.loads(message["data"]) == {"room": "group-1", "records": {"discussions": [{"id": 5}]}}

        answer = await client.post("/playground/publish", json={"kind": "notice", "payload": {"message": "hi"}})
        assert answer.status_code == 200
        message = pubsub.get_message(timeout=5)
        assert (message["channel"], json.loads(message["data"])) == (b"/system_notice", {"message": "hi"})

        bad = await client.post("/playground/publish", content=b'{"kind": "records", "room": "*"}')
        assert bad.status_code == 400 and "payload" in bad.json()["error"]

        # A reverse proxy on this machine relays remote requests from loopback.
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            proxied = await client.post("/playground/publish", headers={header: "198.51.100.7"},
                                        json={"kind": "notice", "payload": {}})
            assert proxied.status_code == 403, header

    async with _client(routes, "192.0.2.10") as remote:
        answer = await remote.post("/playground/publish", json={"kind": "notice", "payload": {}})
        assert answer.status_code == 403
        assert (await remote.get("/")).status_code == 200
    assert pubsub.get_message(timeout=0.5) is None, "nothing published for the refused requests"
    pubsub.close()


async def test_missing_bundle_says_how_to_build_it(tmp_path):
    settings = PlaygroundSettings.model_validate({"RAILS_ENV": "development", "PLAYGROUND_DIST": str(tmp_path)})
    routes = playground_routes(settings)
    async with _client(routes, "127.0.0.1") as client:
        page = await client.get("/")
        publish = await client.post("/playground/publish", json={"kind": "notice", "payload": {}})
    assert page.status_code == 503 and "make install" in page.text
    # Without a built bundle (an installed package, not a checkout) nothing can publish.
    assert publish.status_code in (404, 405)
    assert [r.path for r in routes] == ["/"]


# --- the page in a browser ---------------------------------------------------------


@pytest.fixture
def running_system(redis_url, redis_sync_client):
    """dev-rails, collab and records as `make run` starts them, on free ports."""
    rails = ServiceProcess("channels-dev-rails", free_port(), {"REDIS_URL": redis_url})
    collab = ServiceProcess("channels-collab", free_port(), {
        "REDIS_URL": redis_url, "RAILS_ENV": "development", "PRIVATE_APP_URL": rails.url})
    records_port = free_port()
    records = ServiceProcess("channels-records", records_port, {
        "REDIS_URL": redis_url, "RAILS_ENV": "development",
        "PUBLIC_APP_URL": f"http://127.0.0.1:{records_port}",
        "PLAYGROUND_COLLAB_URL": f"ws://127.0.0.1:{collab.port}",
        "PLAYGROUND_DIST": str(PLAYGROUND / "dist"),
    })
    started = []
    try:
        for service in (rails, collab, records):
            service.start(ready=True)
            started.append(service)
        yield {"rails": rails, "collab": collab, "records": records}
    finally:
        for service in reversed(started):
            service.stop()


@pytest.mark.slow
def test_two_tabs_edit_together_and_see_a_published_record(running_system, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it): "
                    "browser test not run")
    assert (PLAYGROUND / "dist" / "playground.js").exists(), "playground bundle missing: run `make install`"
    assert (PLAYGROUND / "node_modules" / "playwright-core").exists(), "run `make install`"
    records = running_system["records"]
    screenshot = tmp_path / "playground.png"

    done = subprocess_run_node(
        PLAYGROUND / "e2e" / "two-tabs.mjs", records.url + "/", str(screenshot), CHROMIUM, str(tmp_path / "profile"))
    steps = {line["step"]: line for line in done}
    print(f"\nplayground screenshot: {screenshot}")
    assert steps["loaded"]["socket"] == ["connected", "connected"]
    assert steps["loaded"]["editor"] == ["synced", "synced"]
    assert steps["edit"]["seen_by_other_tab"] == "Hello from tab one. And from tab two."
    assert steps["edit"]["tab_one"] == steps["edit"]["tab_two"]
    record = {"discussions": [{"id": 42, "title": "Published from the playground form"}]}
    # The records event carries Rails' whole message; the form's publish went
    # through the development endpoint, Redis /records and the relay.
    assert steps["published"]["records_seen"] == [{"room": "group-1", "records": record}] * 2
    assert steps["published"]["notice_seen"] == [{"message": "notice from tab two"}] * 2
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    assert "Traceback" not in records.logs()


def subprocess_run_node(script: Path, *args: str, timeout: float = 120.0) -> list[dict]:
    import subprocess

    started = time.monotonic()
    done = subprocess.run(["node", str(script), *args], cwd=script.parent.parent, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ}, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        raise AssertionError(f"{script.name} failed after {time.monotonic() - started:.0f}s "
                             f"({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    return lines

