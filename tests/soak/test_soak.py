"""The 45-second soak in `make test`: a fixed seed, every invariant of the
full soak (`make soak`), failing with the seed and the fault schedule."""

from __future__ import annotations

import os

import pytest

from tests.soak.run import Config, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEED = 24


def test_a_short_soak_keeps_every_invariant(synapse):
    bots = int(os.environ.get("SOAK_BOTS_INSTANCES") or 2)
    result = run(Config(seconds=45, seed=SEED, bots=bots, synapse=synapse))
    assert result.ok, "\n".join(result.lines[-60:])
