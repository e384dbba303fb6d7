"""collab under the soak: @hocuspocus/provider v3 and v4 editors (several
documents on one shared socket, others on sockets of their own) inserting
and deleting markers `[name.n]` in a few documents, and the invariants: every
edit a provider saw acknowledged holds in the final state of every client
and of a fresh client after all instances restarted, all clients converge,
and a dead client's awareness entry does not outlive its timeout."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field

from tests.support import NodeScript

MARKER = re.compile(r"\[([a-z0-9]+)\.(\d+)\]")
AWARENESS_TIMEOUT = 30.0  # y-protocols' outdatedTimeout


def docs(count: int) -> list[str]:
    return [f"comment-{11 + i}-body" for i in range(count)]


class Editor:
    """One Node process: providers keyed `s:<doc>` (shared socket) and `p:<doc>`."""

    def __init__(self, name: str, version: str, user: str, url: str, address: str,
                 shared: list[str], private: list[str], tokens: dict[str, str]):
        self.name, self.version = name, version
        self.keys = [f"s:{d}" for d in shared] + [f"p:{d}" for d in private]
        self.short = {key: f"{name}{i}" for i, key in enumerate(self.keys)}
        self.edits: dict[str, list[tuple[int, str, str]]] = {k: [] for k in self.keys}
        self.acked: dict[str, int] = dict.fromkeys(self.keys, 0)
        self.counter = 0
        self.replies: list[dict] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        self.dead_at: float | None = None
        config = {"version": version, "url": url, "address": address, "token": tokens[user],
                  "user": name, "shared": shared, "private": private}
        self.node = NodeScript("soak-collab.mjs", json.dumps(config))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.node.lines():
            kind = line.get("t")
            with self.cond:
                if kind == "edit":
                    self.edits[line["key"]].append((line["seq"], line["op"], line["marker"]))
                elif kind == "acked":
                    self.acked[line["key"]] = max(self.acked[line["key"]], line["seq"])
                elif kind in ("content", "aw"):
                    self.replies.append(line)
                elif kind in ("error", "denied"):
                    self.errors.append(json.dumps(line)[:300])
                self.cond.notify_all()

    def insert(self, key: str, r: float) -> None:
        self.counter += 1
        self.node.send({"op": "insert", "key": key, "marker": f"[{self.short[key]}.{self.counter}]", "r": r})

    def delete(self, key: str, marker: str) -> None:
        self.node.send({"op": "delete", "key": key, "marker": marker})

    def live_markers(self, key: str) -> list[str]:
        with self.cond:
            deleted = {m for _, op, m in self.edits[key] if op == "delete"}
            return [m for _, op, m in self.edits[key] if op == "insert" and m not in deleted]

    def ask(self, op: str, key: str, timeout: float = 10.0) -> dict:
        with self.cond:
            start = len(self.replies)
        self.node.send({"op": op, "key": key})
        want = "content" if op == "read" else "aw"
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.replies[start:]:
                    if line["t"] == want and line["key"] == key:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} {key}: no {want}")
                self.cond.wait(left)

    def kill(self) -> None:
        self.node.process.send_signal(signal.SIGKILL)
        self.node.process.wait()
        self.dead_at = time.monotonic()

    def close(self) -> None:
        if self.dead_at is None:
            try:
                self.node.send({"op": "exit"})
            except (BrokenPipeError, OSError, ValueError):
                pass
        self.node.close()


@dataclass
class CollabFigures:
    acked_edits: int = 0
    kept: int = 0
    lost: int = 0
    edits: int = 0
    readers: int = 0
    converged: bool = False
    ghost_entries: int = 0
    problems: list[str] = field(default_factory=list)


TOKENS = {"1": "1,s1", "2": "2,s2"}


class CollabLoad:
    def __init__(self, proxy_port: int, document_count: int, rate: float, seed: int):
        self.url = f"ws://127.0.0.1:{proxy_port}"
        self.docs = docs(document_count)
        self.rate = rate
        self.rng = random.Random(seed ^ 0xC011AB)
        self.stop_event = threading.Event()
        self.editors: list[Editor] = []
        self.ghost: Editor | None = None

    def start(self) -> None:
        d = self.docs
        self.editors = [
            Editor("a", "v3", "1", self.url, "127.0.2.1", shared=d[:3], private=[d[-1], d[0]], tokens=TOKENS),
            Editor("b", "v4", "2", self.url, "127.0.2.2", shared=d[1:], private=[d[0]], tokens=TOKENS),
        ]
        self.ghost = Editor("g", "v3", "1", self.url, "127.0.2.3", shared=d[:2], private=[], tokens=TOKENS)
        self.editors.append(self.ghost)

    def live(self) -> list[Editor]:
        return [e for e in self.editors if e.dead_at is None]

    def edit_loop(self) -> None:
        while not self.stop_event.is_set():
            editor = self.rng.choice(self.live())
            key = self.rng.choice(editor.keys)
            mine = editor.live_markers(key) if editor is not self.ghost else []
            if mine and self.rng.random() < 0.35:
                editor.delete(key, self.rng.choice(mine))
            else:
                editor.insert(key, self.rng.random())
            time.sleep(self.rng.expovariate(self.rate))

    def kill_ghost(self) -> None:
        if self.ghost and self.ghost.dead_at is None:
            self.ghost.kill()

    def settle(self, timeout: float) -> list[str]:
        """Wait until every live provider is synced with nothing unacknowledged;
        the keys that never got there."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for e in self.live():
                for key in e.keys:
                    try:
                        c = e.ask("read", key)
                    except TimeoutError:
                        pending.append(f"{e.name} {key}: no answer")
                        continue
                    if c["unsynced"] or not c["synced"]:
                        pending.append(f"{e.name} {key}: unsynced {c['unsynced']} synced {c['synced']}")
            if not pending or time.monotonic() > deadline:
                return pending
            time.sleep(0.5)

    def contents(self) -> dict[str, dict[str, str]]:
        """doc -> {reader: text} for every live provider."""
        out: dict[str, dict[str, str]] = {d: {} for d in self.docs}
        for e in self.live():
            for key in e.keys:
                out[key[2:]][f"{e.name}:{key[:1]}"] = e.ask("read", key)["text"]
        return out

    def fresh_contents(self) -> dict[str, str]:
        fresh = Editor("f", "v4", "1", self.url, "127.0.2.9", shared=[], private=self.docs, tokens=TOKENS)
        try:
            deadline = time.monotonic() + 30
            texts = {}
            for key in fresh.keys:
                while True:
                    c = fresh.ask("read", key)
                    if c["synced"] or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                texts[key[2:]] = c["text"]
            return texts
        finally:
            fresh.close()

    def check(self, finals: list[dict[str, dict[str, str]]], figures: CollabFigures) -> None:
        """`finals`: doc -> {reader: text} snapshots that must all hold the acknowledged edits."""
        readers: dict[str, dict[str, str]] = {d: {} for d in self.docs}
        for snapshot in finals:
            for doc, texts in snapshot.items():
                readers[doc].update(texts)
        figures.readers = sum(len(v) for v in readers.values())
        figures.converged = True
        for doc, texts in readers.items():
            distinct = set(texts.values())
            if len(distinct) != 1:
                figures.converged = False
                figures.problems.append(f"{doc}: {len(distinct)} different texts among {sorted(texts)}")
            for reader, text in texts.items():
                leftover = MARKER.sub("", text)
                found = MARKER.findall(text)
                if leftover:
                    figures.problems.append(f"{doc} at {reader}: text that is no marker: {leftover[:80]!r}")
                if len(found) != len(set(found)):
                    figures.problems.append(f"{doc} at {reader}: a marker twice")
        for e in self.editors:
            for key in e.keys:
                doc = key[2:]
                acked = e.acked[key]
                log = e.edits[key]
                deleted = {m for _, op, m in log if op == "delete"}
                figures.edits += len(log)
                for seq, op, marker in log:
                    if seq > acked:
                        continue
                    figures.acked_edits += 1
                    if op == "insert" and marker in deleted:
                        # superseded by its own later delete: checked as that delete
                        figures.acked_edits -= 1
                        continue
                    want_present = op == "insert"
                    wrong = [r for r, text in readers[doc].items() if (marker in text) != want_present]
                    if wrong:
                        figures.lost += 1
                        if figures.lost <= 10:
                            figures.problems.append(f"acked {op} {marker} in {doc} ({e.version} {key}) "
                                                    f"does not hold at {','.join(sorted(wrong))}")
                    else:
                        figures.kept += 1

    def check_awareness(self, figures: CollabFigures) -> None:
        ghost = self.ghost
        if ghost is None or ghost.dead_at is None:
            figures.problems.append("the ghost editor never died")
            return
        wait = ghost.dead_at + AWARENESS_TIMEOUT + 5.0 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for e in self.live():
            for key in e.keys:
                users = e.ask("awareness", key)["users"]
                stale = [u for u in users if u.startswith("g/")]
                if stale:
                    figures.ghost_entries += len(stale)
                    figures.problems.append(f"{e.name} {key} still sees the dead editor's {stale} "
                                            f"{time.monotonic() - ghost.dead_at:.0f}s after it died")

    def close(self) -> None:
        for e in self.editors:
            e.close()
