"""How far this instance has applied each open document's log, and its own
inbox: the reader's bookkeeping, synchronous (entries in, deliveries out).

A document is unsettled while it is to be loaded or caught up from its log
before the inbox is applied to it; the reader settles those first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from ..metrics import CollabMetrics
from ..snapshot import Loaded, fields_of, id_text, parse_id

log = logging.getLogger("channels.collab.cluster")


class Listener(Protocol):
    def remote_updates(self, name: str, updates: list[bytes]) -> None: ...

    def reload(self, name: str, loaded: Loaded) -> None: ...

    def remote_awareness(self, name: str, update: bytes) -> None: ...

    def awareness_query(self, name: str) -> None: ...

    def backpressure(self, on: bool, names: Iterable[str]) -> None: ...


class Tracked:
    """An open document: how far this instance has applied its log."""

    __slots__ = ("catch_up", "cursor", "gap", "needs_load")

    def __init__(self, cursor: str | None):
        self.cursor = cursor
        # Not loaded yet (Redis was down), back after an outage, or behind
        # the trimmed history (`gap`).
        self.needs_load = cursor is None
        self.gap = False
        # Its log after `cursor` is to be read before the inbox is applied to
        # it: the reader may have passed its entries before it was opened here.
        self.catch_up = True


def _is_before(a: str, b: str) -> bool:
    return parse_id(a) < parse_id(b)


class Positions:
    def __init__(self, instance: bytes, metrics: CollabMetrics):
        self._instance_b = instance
        self.metrics = metrics
        self.tracked: dict[str, Tracked] = {}
        # Open documents to load or catch up before the next read (a set, so
        # a read does not scan every open document).
        self.unsettled: set[str] = set()
        # Last inbox entry applied; None while the inbox is not followed.
        self.inbox_cursor: str | None = None

    # ------------------------------------------------------------ tracking

    def track(self, name: str, loaded: Loaded | None) -> None:
        self.tracked[name] = Tracked(None if loaded is None else loaded.cursor)
        self.unsettled.add(name)

    def untrack(self, name: str) -> bool:
        """Forget `name`; True when it was open here."""
        self.unsettled.discard(name)
        return self.tracked.pop(name, None) is not None

    def is_open(self, name: str) -> bool:
        return name in self.tracked

    def cursor(self, name: str) -> str | None:
        t = self.tracked.get(name)
        return None if t is None or t.needs_load else t.cursor

    def loaded_names(self) -> list[str]:
        return [n for n, t in self.tracked.items() if not t.needs_load]

    def catch_up(self, names: Iterable[str]) -> None:
        """Read the logs of `names` again before their next inbox entries."""
        for name in names:
            t = self.tracked.get(name)
            if t is not None:
                t.catch_up = True
                self.unsettled.add(name)

    def reload_all(self) -> None:
        for t in self.tracked.values():
            t.needs_load = True
        self.unsettled.update(self.tracked)

    def reloaded(self, name: str, loaded: Loaded) -> bool:
        """`name` was loaded again; False when it is no longer open."""
        t = self.tracked.get(name)
        if t is None:
            return False
        if t.gap:
            self.metrics.gap_reloads.inc()
        t.cursor, t.needs_load, t.gap, t.catch_up = loaded.cursor, False, False, True
        return True

    def seen(self, name: str) -> str | None:
        """The inbox position when `name` had all of it applied, else None."""
        t = self.tracked.get(name)
        return self.inbox_cursor if t is not None and not t.catch_up else None

    def pass_own(self, name: str, appended: str, mark: str) -> bool:
        """Move `name` past this instance's append `appended` once the inbox
        was applied up to `mark` (read after it was acknowledged). True when
        there is nothing left to wait for."""
        t = self.tracked.get(name)
        if t is None or t.needs_load:
            return True
        if parse_id(t.cursor) >= parse_id(appended):
            return True
        passed = self.inbox_cursor
        if not t.catch_up and passed is not None and parse_id(passed) >= parse_id(mark):
            t.cursor = appended
            return True
        return False

    # ------------------------------------------------------------ delivery

    def deliver_inbox(self, entries, listener: Listener | None) -> None:
        now_ms = time.time() * 1000
        lag = self.metrics.receive_lag
        updates: dict[str, list[bytes]] = {}
        for raw_id, raw in entries:
            self.inbox_cursor = entry_id = id_text(raw_id)
            fields = fields_of(raw)
            doc = fields.get(b"d")
            t = self.tracked.get(doc.decode("utf-8", "replace")) if doc else None
            if t is None:
                continue  # left here since, or a hello entry
            name = doc.decode("utf-8", "replace")
            position = fields.get(b"e")
            if position is not None:
                if t.needs_load or t.catch_up:
                    continue  # its log is read first
                try:
                    if parse_id(position) <= parse_id(t.cursor):
                        continue  # delivered twice, or already read from the log
                except ValueError:
                    log.warning("inbox entry with a bad log id skipped", extra={"document": name})
                    continue
                t.cursor = id_text(position)
                if fields.get(b"i") == self._instance_b:
                    continue  # applied here before it was appended
                update = fields.get(b"u")
                if update:
                    updates.setdefault(name, []).append(update)
                    try:
                        lag.observe(max(0.0, now_ms - parse_id(entry_id)[0]) / 1000)
                    except ValueError:
                        pass
            elif fields.get(b"i") == self._instance_b or listener is None:
                continue
            elif b"a" in fields:
                listener.remote_awareness(name, fields[b"a"])
            elif b"q" in fields:
                listener.awareness_query(name)
        if listener is not None:
            for name, batch in updates.items():
                listener.remote_updates(name, batch)

    def deliver_log(self, name: str, entries, listener: Listener | None) -> None:
        """Apply entries of `name`'s log; a trim marker past our position
        means a gap, and marks it for a reload."""
        t = self.tracked.get(name)
        if t is None:
            return
        now_ms = time.time() * 1000
        updates: list[bytes] = []
        for raw_id, raw in entries:
            entry_id = id_text(raw_id)
            try:
                position = parse_id(entry_id)
            except ValueError:
                log.warning("stream entry with a bad id skipped", extra={"document": name})
                continue
            if position <= parse_id(t.cursor):
                continue  # delivered twice
            fields = fields_of(raw)
            covered = fields.get(b"t")
            if covered is not None:
                try:
                    behind = _is_before(t.cursor, id_text(covered))
                except ValueError:
                    log.warning("trim marker with a bad id skipped", extra={"document": name})
                    behind = False
                if behind:
                    # Entries between our position and the snapshot were trimmed unread.
                    log.info("reader behind the trimmed history; reloading", extra={"document": name})
                    t.needs_load = t.gap = True
                    self.unsettled.add(name)
                    break
                t.cursor = entry_id
                continue
            t.cursor = entry_id
            if fields.get(b"i") == self._instance_b:
                continue  # applied here before it was appended
            update = fields.get(b"u")
            if update:
                updates.append(update)
                self.metrics.receive_lag.observe(max(0.0, now_ms - position[0]) / 1000)
        if updates and listener is not None:
            listener.remote_updates(name, updates)
