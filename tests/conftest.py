"""Fixtures shared by the folders of tests/ (integration, soak)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synapse():
    """One real Synapse homeserver for the whole session (bots tests, the soak)."""
    from tests.integration.synapse import SynapseUnavailable, start_homeserver

    try:
        server = start_homeserver()
    except SynapseUnavailable as exc:
        pytest.fail(f"Synapse is needed for the bots tests and could not be set up: {exc}", pytrace=False)
    yield server
    server.stop()
