"""Fixtures for the integration tests that need more than Redis."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synapse():
    """One real Synapse homeserver for the whole session (bots tests)."""
    from tests.integration.synapse import SynapseUnavailable, start_homeserver

    try:
        server = start_homeserver()
    except SynapseUnavailable as exc:
        pytest.fail(f"Synapse is needed for the bots tests and could not be set up: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rails():
    """A stand-in for Rails' collab auth endpoint (collab tests), one per module."""
    from tests.integration.collab_helpers import RailsStandIn

    server = RailsStandIn().start()
    yield server
    server.stop()
