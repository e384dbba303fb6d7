"""Fixtures for the integration tests that need more than Redis (Synapse:
tests/conftest.py, shared with the soak)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def rails():
    """A stand-in for Rails' collab auth endpoint (collab tests), one per module."""
    from tests.integration.collab_helpers import RailsStandIn

    server = RailsStandIn().start()
    yield server
    server.stop()
