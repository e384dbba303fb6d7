"""What the collab tests share: a real HTTP server standing in for Rails
(with the decision rules of contracts.md), the service as a real process,
the real @hocuspocus/provider driven from Node, and a raw WebSocket client
for hostile input."""

from __future__ import annotations

import contextlib
import json
import queue
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import NodeScript, ServiceProcess, free_port

# user id -> secret token. User 0 is always allowed (as Rails does);
# user 3 exists but may update nothing; user 7 is answered read-only.
USERS = {"1": "s1", "2": "s2", "3": "s3", "7": "s7"}
EDITORS = {"1", "2"}


def token(user: str) -> str:
    return f"{user},{USERS.get(user, 'x')}"


class _Server(ThreadingHTTPServer):
    # A burst of auths (500 documents on one socket) opens up to 32
    # connections at once; socketserver's default backlog of 5 refuses some.
    request_queue_size = 128


class RailsStandIn:
    """POST /api/hocuspocus, decided as Rails does. Special users: 500
    answers 500, 504 answers after `slow_seconds` (past the auth timeout),
    or not at all if the caller hangs up first (`abandoned`)."""

    def __init__(self, slow_seconds: float = 3.0):
        self.requests: list[dict] = []
        # Indices (in `requests`) of the requests being decided now, of the
        # slow ones answered and of the slow ones whose caller hung up first.
        self.deciding: set[int] = set()
        self.answered_slowly: list[int] = []
        self.abandoned: list[int] = []
        self.slow_seconds = slow_seconds
        # Per user_secret: when each call came (time.monotonic()), how many
        # are being decided now, and the most ever decided at once.
        self.calls_at: dict[str, list[float]] = {}
        self.in_flight_by: Counter[str] = Counter()
        self.peak_in_flight_by: Counter[str] = Counter()
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                secret = str(body.get("user_secret", ""))
                with stand_in.lock:
                    index = len(stand_in.requests)
                    stand_in.requests.append({"path": self.path, **body})
                    stand_in.deciding.add(index)
                    stand_in.calls_at.setdefault(secret, []).append(time.monotonic())
                    stand_in.in_flight_by[secret] += 1
                    stand_in.peak_in_flight_by[secret] = max(stand_in.peak_in_flight_by[secret],
                                                             stand_in.in_flight_by[secret])
                try:
                    decided = stand_in.decide(self.path, body, self.connection, index)
                finally:
                    with stand_in.lock:
                        stand_in.deciding.discard(index)
                        stand_in.in_flight_by[secret] -= 1
                if decided is None:
                    return  # the caller hung up before the answer
                status, answer = decided
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the service gave up waiting, as it should

        self.server = _Server(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def in_flight(self) -> int:
        return len(self.deciding)

    def _caller_left(self, connection: socket.socket | None, seconds: float, index: int) -> bool:
        """Waits `seconds` for a slow answer, unless the caller hangs up
        first (it sends nothing more while it waits for the answer)."""
        left = False
        if connection is None:
            time.sleep(seconds)
        elif select.select([connection], [], [], seconds)[0]:
            try:
                left = connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                left = True
        with self.lock:
            (self.abandoned if left else self.answered_slowly).append(index)
        return left

    def decide(self, path: str, body: dict, connection: socket.socket | None = None,
               index: int = -1) -> tuple[int, dict] | None:
        if path != "/api/hocuspocus":
            return 404, {}
        user, _, secret = str(body.get("user_secret", "")).partition(",")
        name = str(body.get("document_name", ""))
        if user == "500":
            return 500, {"error": "boom"}
        if user == "504":
            return None if self._caller_left(connection, self.slow_seconds, index) else (200, {})
        if user == "0":
            return 200, {}
        if USERS.get(user) != secret:
            return 401, {}
        _record_type, _, rest = name.partition("-")
        record_id, _, field = rest.partition("-")
        if record_id == "new":
            return (200, {}) if field.split("-")[0] == user else (401, {})
        if user == "7":
            return 200, {"scope": "readonly"}
        if user in EDITORS and record_id.isdigit():
            return 200, {}
        return 401, {}

    def names_asked(self) -> list[str]:
        with self.lock:
            return [r.get("document_name") for r in self.requests]

    def start(self) -> RailsStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_collab(rails_url: str | None, redis_url: str, **env) -> ServiceProcess:
    """One collab process on `redis_url` (collab needs Redis: without it,
    acknowledgements wait)."""
    base = {
        "REDIS_URL": redis_url,
        "COLLAB_TIMEOUT_MS": "30000",
        "COLLAB_DEBOUNCE_MS": "300",
        "COLLAB_MAX_DEBOUNCE_MS": "1000",
        "COLLAB_AUTH_TIMEOUT_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }
    if rails_url:
        base["PRIVATE_APP_URL"] = rails_url
    base.update(env)
    return ServiceProcess("channels-collab", free_port(), base).start()


class Provider:
    """One Node process: a shared HocuspocusProviderWebsocket and any number
    of documents on it, with every event collected for the test to await."""

    def __init__(self, version: str, ws_url: str):
        self.version = version
        self.script = NodeScript("hocuspocus-client.mjs", version, ws_url)
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait(lambda e: e["event"] == "ready", what="node client ready")

    def _read(self):
        for event in self.script.lines():
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def send(self, **command) -> None:
        self.script.send(command)

    def wait(self, predicate, timeout: float = 15.0, what: str = "event", since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    errors = self.script.process.stderr.read() if self.script.process.poll() is not None else ""
                    raise AssertionError(f"timed out waiting for {what}; events: {self.events[-15:]} {errors}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def attach(self, doc: str, tok: str, user: str | None = None) -> None:
        self.send(op="attach", doc=doc, token=tok, user=user)

    def authenticated(self, doc: str, timeout: float = 15.0) -> dict:
        return self.wait(lambda e: e["event"] == "authenticated" and e["doc"] == doc, timeout, f"auth {doc}")

    def synced(self, doc: str, timeout: float = 15.0) -> dict:
        return self.wait(lambda e: e["event"] == "synced" and e["doc"] == doc, timeout, f"synced {doc}")

    def denied(self, doc: str, timeout: float = 15.0) -> dict:
        return self.wait(lambda e: e["event"] == "denied" and e["doc"] == doc, timeout, f"denied {doc}")

    def read(self, doc: str) -> dict:
        start = self.mark()
        self.send(op="read", doc=doc)
        return self.wait(lambda e: e["event"] == "content" and e["doc"] == doc, since=start, what="content")

    def wait_content(self, doc: str, check, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            content = self.read(doc)
            if check(content):
                return content
            if time.monotonic() > deadline:
                raise AssertionError(f"content of {doc} never matched: {content}")
            time.sleep(0.05)

    def wait_users(self, doc: str, users: list[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            start = self.mark()
            self.send(op="awareness", doc=doc)
            got = self.wait(lambda e: e["event"] == "awareness" and e["doc"] == doc, since=start)
            if got["users"] == sorted(users):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"awareness of {doc} is {got['users']}, expected {sorted(users)}")
            time.sleep(0.05)

    def frames_for(self, doc: str) -> list[int]:
        with self._cond:
            return [e["type"] for e in self.events if e["event"] == "frame" and e.get("doc") == doc]

    def close(self) -> None:
        try:
            self.send(op="exit")
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.script.close()


class RawClient:
    """A bare WebSocket speaking the Hocuspocus framing by hand, in a
    background thread: for hostile or precise input."""

    def __init__(self, ws_url: str, max_size: int | None = None):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=max_size, open_timeout=10, close_timeout=5)
        self.frames: queue.Queue[bytes] = queue.Queue()
        self.close_code: int | None = None
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        from websockets.exceptions import ConnectionClosed

        try:
            for frame in self.ws:
                self.frames.put(frame)
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
            self.closed.set()

    def send(self, frame: bytes) -> None:
        self.ws.send(frame)

    def recv(self, timeout: float = 10.0) -> bytes:
        return self.frames.get(timeout=timeout)

    def recv_until(self, predicate, timeout: float = 10.0):
        from channels_collab import protocol as p

        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"frame never came; saw {seen[-10:]}")
            try:
                msg = p.decode(self.frames.get(timeout=left))
            except queue.Empty:
                raise AssertionError(f"frame never came; saw {seen[-10:]}") from None
            seen.append(msg)
            if predicate(msg):
                return msg

    def drain(self, wait: float = 0.3) -> list:
        from channels_collab import protocol as p

        out = []
        time.sleep(wait)
        while True:
            try:
                out.append(p.decode(self.frames.get_nowait()))
            except queue.Empty:
                return out

    def wait_closed(self, timeout: float = 15.0) -> int:
        assert self.closed.wait(timeout), "socket was not closed by the server"
        return self.close_code

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.ws.close()
