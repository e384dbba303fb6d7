"""The real images: built by `make images` (deploy/images/build.py: buildah
here, on the bookworm base it keeps between runs), then each one's own
entrypoint run as its USER on the host network against a real Redis, with
real clients: records relays a /records message to socket.io-client, collab
syncs two @hocuspocus/provider clients and stores the draft in Redis, bots
answers /readyz. Each image's HEALTHCHECK command succeeds inside it while
the service runs and fails once it has stopped; SIGTERM stops it cleanly.
The images are what the compose file runs: names, ports, health checks."""

from __future__ import annotations

import itertools
import os
import subprocess

import httpx
import pytest
import redis as redis_sync
import yaml

from tests.integration.collab_helpers import Provider, token
from tests.integration.deploy_support import (
    COMPOSE_NAMES,
    DEPLOY,
    ROOT,
    SERVICES,
    Dockerfile,
    production_port,
    service_script,
)
from tests.integration.image_support import ImageConfig, Running, build_module, remove_left_over_containers
from tests.integration.records_support import APP_ORIGIN, Rails, SioClients
from tests.support import free_port, wait_for

# Cold (no base yet): debootstrap and three builds; warm: the kept base and
# buildah's layer cache.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Tagged apart from `make images`' own (latest), built by the same command.
TAG = "test"
BUILD_TIMEOUT = 1400
_names = itertools.count()
# Containers are named {CONTAINERS}{pid}-...: those of a run that was killed are removed by the next.
CONTAINERS = "channels-test-"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    log = tmp_path_factory.mktemp("images") / "build.log"
    with open(log, "wb") as out:
        done = subprocess.run(["make", "-s", "images", f"IMAGES_ARGS=--tag {TAG}"], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, check=False)
    output = log.read_text(errors="replace")
    assert done.returncode == 0, f"make images failed:\n{output[-5000:]}"
    build = build_module()
    engine = build.pick_engine().name
    return engine, {s: ImageConfig.inspect(engine, build.image_name(s, TAG)) for s in SERVICES}


@pytest.fixture
def run_image(images):
    engine, configs = images
    remove_left_over_containers(engine, CONTAINERS)
    started: list[Running] = []

    def run(service: str, **env: str) -> Running:
        port = free_port()
        env = {"PORT": str(port), "HOST": "127.0.0.1", **env}
        running = Running(engine, configs[service], env, f"{CONTAINERS}{os.getpid()}-{service}-{next(_names)}")
        running.port = port
        started.append(running)

        def ready():
            if running.exited() is not None:
                raise AssertionError(f"{service} exited {running.exited()}:\n{running.logs()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, 0.2, what=f"the {service} image's /readyz")
        return running

    yield run
    for running in started:
        running.remove()


def _healthy_then_stopped(running: Running) -> None:
    """The image's HEALTHCHECK passes inside it; SIGTERM exits 0; then it fails."""
    check = running.healthcheck()
    assert check.returncode == 0, (check.stdout, check.stderr)
    code = running.stop()
    logs = running.logs()
    assert code == 0, f"SIGTERM exit {code}:\n{logs[-3000:]}"
    assert "Traceback" not in logs, logs[-3000:]
    assert running.healthcheck().returncode != 0


def compose_services() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


@pytest.mark.parametrize("service", SERVICES)
def test_built_image_is_what_compose_runs(images, service):
    _, configs = images
    config = configs[service]
    build = build_module()
    assert config.ref == build.image_name(service, TAG)
    svc = compose_services()[COMPOSE_NAMES[service]]
    assert svc["image"] == build.image_name(service, "${CHANNELS_TAG:-latest}")
    port = production_port(service)
    assert config.exposed == {f"{port}/tcp"}
    assert {str(p).split(":")[-1] for p in svc.get("ports", [])} | {str(p) for p in svc.get("expose", [])} == {
        str(port)}
    assert svc["environment"]["PORT"] == str(port)
    assert svc["healthcheck"]["test"] == config.healthcheck
    assert config.entrypoint == [service_script(service)]
    (user,) = Dockerfile.load(DEPLOY / f"{service}.Dockerfile").final("USER")
    assert config.user == user and not user.startswith(("0", "root"))
    assert config.env["RAILS_ENV"] == "production"


def test_records_image_relays_a_record_to_socket_io_client(run_image, redis_url):
    records = run_image("records", REDIS_URL=redis_url, PUBLIC_APP_URL=APP_ORIGIN)
    rails = Rails(redis_url)
    clients = None
    try:
        rails.token("tok-image", 41, [410])
        clients = SioClients(f"http://127.0.0.1:{records.port}", [{"name": "tab", "token": "tok-image"}])
        clients.wait_connected(["tab"])
        message = {"discussions": [{"id": 7, "title": "from the image"}]}
        wait_for(lambda: rails.records("group-410", message) >= 1, 10, 0.1, what="records subscribed")
        # The whole {room, records} object first (an offset for recovery follows).
        args = clients.wait_events("tab", 1, "records")[0]
        assert args[0] == {"room": "group-410", "records": message}
    finally:
        if clients:
            clients.close()
        rails.close()
    _healthy_then_stopped(records)


def test_collab_image_syncs_two_providers_and_stores_the_draft(run_image, redis_url, rails):
    prefix = "t-images:"
    collab = run_image("collab", REDIS_URL=redis_url, PRIVATE_APP_URL=rails.url, COLLAB_REDIS_PREFIX=prefix,
                       COLLAB_DEBOUNCE_MS="200", COLLAB_MAX_DEBOUNCE_MS="500")
    name = f"comment-{free_port()}-body"
    ws = f"ws://127.0.0.1:{collab.port}"
    first, second = Provider("v3", ws), Provider("v4", ws)
    try:
        for provider in (first, second):
            provider.attach(name, token("1"))
            assert provider.authenticated(name)["scope"] == "read-write"
            provider.synced(name)
        first.send(op="text", doc=name, insert="drafted in the image")
        second.wait_content(name, lambda c: c["text"] == "drafted in the image")
        first.wait_content(name, lambda c: c["unsynced"] == 0)
    finally:
        first.close()
        second.close()
    assert name in rails.names_asked()
    # The draft is in Redis, under the document's keys (log or compacted snapshot).
    r = redis_sync.Redis.from_url(redis_url)
    try:
        def stored() -> bool:
            log = b"".join(v for _, fields in r.xrange(f"{prefix}{{{name}}}:log") for v in fields.values())
            snap = r.hget(f"{prefix}{{{name}}}:snap", "state") or b""
            return b"drafted in the image" in log + snap
        wait_for(stored, 15, 0.1, what="the draft in Redis")
    finally:
        r.close()
    _healthy_then_stopped(collab)


def test_bots_image_answers_readyz(run_image, redis_url):
    bots = run_image("bots", REDIS_URL=redis_url)
    ready = httpx.get(f"http://127.0.0.1:{bots.port}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["redis"] is True
    _healthy_then_stopped(bots)
