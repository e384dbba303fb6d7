"""The pycrdt private names live.lean_doc replaces (pycrdt is capped below
0.15 in services/collab/pyproject.toml): they exist as it expects, and a
lean Doc still does what those names serve."""

from __future__ import annotations

from channels_collab.live import lean_doc
from pycrdt import Doc, Text


def test_a_plain_doc_has_the_names_lean_doc_replaces():
    doc = Doc()
    lock = doc._txn_async_lock
    assert callable(lock.acquire) and callable(lock.release)
    assert doc._send_streams == {False: set(), True: set()}


async def test_a_lean_doc_runs_async_transactions_one_at_a_time():
    doc = lean_doc()
    doc["text"] = text = Text()
    async with doc.new_transaction():
        text += "hello"
    async with doc.new_transaction():
        text += " world"
    assert str(text) == "hello world"
    assert doc._txn_async_lock._lock is not None and not doc._txn_async_lock._lock.locked()


def test_a_lean_doc_stays_synchronous_and_lock_free_when_only_used_so():
    doc = lean_doc()
    doc["text"] = text = Text()
    with doc.transaction():
        text += "x"
    other = Doc()
    other.apply_update(doc.get_update())
    assert str(other.get("text", type=Text)) == "x"
    assert doc._txn_async_lock._lock is None and dict(doc._send_streams) == {}


async def test_a_lean_doc_streams_its_events():
    doc = lean_doc()
    doc["text"] = text = Text()
    async with doc.events() as events:
        text += "x"
        event = await events.receive()
    assert event.update
