"""collab_auth_total{result, cause}: every way a Rails callback can end, as
the real authenticator decides it against a loopback HTTP server, lands on
its own cause."""

import pytest
from channels_collab import protocol as p
from channels_collab.metrics import CollabMetrics
from channels_collab.rails import Decision, RailsAuthenticator
from prometheus_client import generate_latest

from .test_connection import world  # noqa: F401 - the fixture, used below
from .test_rails import decide


def counts(metrics: CollabMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for sample in metrics.auth.collect()[0].samples:
        if sample.name == "collab_auth_total":
            out[(sample.labels["result"], sample.labels["cause"])] = sample.value
    return out


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([(200, b"")], ("allowed", "allowed")),
        ([(401, b"")], ("denied", "rails_denied")),
        ([(500, b"")], ("denied", "rails_denied")),
        (["hang"], ("denied", "rails_timeout")),
    ],
)
async def test_each_rails_answer_counts_under_its_cause(replies, expected):
    decision, _ = await decide(replies, timeout=0.3)
    metrics = CollabMetrics()
    metrics.auth_decided(decision)
    assert counts(metrics) == {expected: 1}


async def test_unreachable_rails_and_a_missing_url_count_as_unreachable():
    metrics = CollabMetrics()
    # A port nobody listens on: connection refused.
    refused = RailsAuthenticator("http://127.0.0.1:9", timeout_seconds=2)
    try:
        metrics.auth_decided(await refused.authenticate("1,s", "comment-1"))
    finally:
        await refused.aclose()
    metrics.auth_decided(await RailsAuthenticator(None, timeout_seconds=1).authenticate("1,s", "comment-1"))
    assert counts(metrics) == {("denied", "rails_unreachable"): 2}


async def test_refused_names_bad_tokens_and_our_own_faults_have_causes_too():
    metrics = CollabMetrics()
    metrics.auth_refused_name()
    auth = RailsAuthenticator("http://127.0.0.1:9", timeout_seconds=1)
    try:
        metrics.auth_decided(await auth.authenticate("", "comment-1"))
    finally:
        await auth.aclose()
    metrics.auth_decided(Decision(False, detail="error"))  # what connection.py makes of an exception
    assert counts(metrics) == {
        ("refused_name", "refused_name"): 1,
        ("denied", "invalid_token"): 1,
        ("denied", "error"): 1,
    }
    assert b'collab_auth_total{cause="invalid_token",result="denied"} 1.0' in generate_latest(metrics.registry)


async def test_the_socket_counts_each_outcome_once_under_its_cause(world):  # noqa: F811 - the fixture
    """Through a real Connection: allowed, a name refused before Rails is
    asked, and an auth Rails had not answered by the socket's deadline."""
    from channels_collab.connection import Connection, Limits

    from .test_connection import NAME, Transport, settle

    metrics = CollabMetrics()
    conn = Connection(Transport(), world.registry, world.auth, Limits(timeout_seconds=30), clock=world.clock,
                      metrics=metrics)
    conn.receive(p.encode_token(NAME, "ok"))
    conn.receive(p.encode_token("nonsense-name", "ok"))
    await settle()
    # Another socket whose only auth is still waiting for Rails at its deadline.
    waiting = Connection(Transport(), world.registry, world.auth, Limits(timeout_seconds=30), clock=world.clock,
                         metrics=metrics)
    world.auth.gate.clear()
    waiting.receive(p.encode_token("comment-2-body", "ok"))
    await settle()
    world.clock.now += 31
    waiting.check()
    assert waiting.transport.closed_with == 4408
    assert counts(metrics) == {
        ("allowed", "allowed"): 1,
        ("refused_name", "refused_name"): 1,
        ("denied", "rails_timeout"): 1,
    }
