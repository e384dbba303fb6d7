"""Process-level helpers shared by the services' entry points."""

from __future__ import annotations

import gc

from channels_common.server import freeze_startup_objects


def test_objects_alive_at_startup_are_left_out_of_later_collections():
    loaded = {"settings": ["kept for the life of the process"]}
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        tracked = gc.get_objects()
        assert not any(o is loaded for o in tracked)
        later = {"connection": ["comes and goes"]}
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is loaded for o in gc.get_objects())
