"""The appender's hand-encoded append command against the generic RESP encoder."""

from __future__ import annotations

from channels_collab.cluster import Cluster
from channels_common.resp import pack_command


async def test_the_append_command_is_what_pack_command_writes():
    c = Cluster("redis://127.0.0.1:1", prefix="p:", ttl_seconds=600, instance_id="me")
    a = c.appender
    a._append._sha = "f" * 40  # as if loaded
    c.track("doc-1", None)
    updates = [b"\x00\r\n\x01", b"x" * 300, "é".encode()]
    for u in updates:
        a.append("doc-1", u, None)
    a.append("doc-1", None, None)  # an ack-only entry writes nothing
    a.append("other-é", b"y", None)  # not open here: its TTL is set every time
    commands, positions = a._commands(list(a._queue), [], [])
    k = c.keys
    expected = [
        pack_command("EVALSHA", "f" * 40, 2, k.log(n), k.members(n), b"me", u, ttl, 10_000, n, k.inbox_prefix())
        for n, u, ttl in [("doc-1", updates[0], 600_000), ("doc-1", updates[1], 0), ("doc-1", updates[2], 0),
                          ("other-é", b"y", 600_000)]
    ]
    assert commands == expected
    assert positions == [(0, "doc-1"), (1, "doc-1"), (2, "doc-1"), (3, "other-é")]
    await c.stop()


async def test_an_exchange_that_fails_unexpectedly_is_retried_and_acked_once(redis_url):
    from tests.support import until

    c = Cluster(redis_url, prefix="ap:", ttl_seconds=600)
    c.start()
    try:
        acked = []
        c.append("doc-2", b"\x00\x00", lambda: acked.append(1))
        await until(lambda: not c.unacked_updates)  # the line is open and the script loaded
        line = c.appender.line
        real, failures = line.start, []

        def start_failing_once(*args):
            if not failures:
                failures.append(1)
                raise RuntimeError("a bug below the appender")
            return real(*args)

        line.start = start_failing_once
        c.append("doc-2", b"\x00\x00", lambda: acked.append(2))
        await until(lambda: acked == [1, 2], timeout=10)
        assert failures == [1] and not c.unacked_updates
        assert not c.appender.busy
    finally:
        await c.stop()
