"""A scriptable stand-in homeserver for the bots tests that need failures a
real Synapse will not produce on demand (5xx, dropped connections, slow
answers). It is a real HTTP server on loopback, speaking the two client API
calls the bridge makes, with Synapse's transaction-id idempotency."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

DIRECTORY = "/_matrix/client/v3/directory/room/"
ROOMS = "/_matrix/client/v3/rooms/"


@dataclass
class Scripted:
    status: int
    body: dict | bytes | None = None
    delay: float = 0.0
    drop: bool = False  # close the connection without an answer
    # Handle the request normally (store the event) and then answer as
    # scripted: the homeserver did the work but the client never hears it.
    after_work: bool = False


@dataclass
class FakeHomeserver:
    tokens: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)
    joined: set[tuple[str, str]] = field(default_factory=set)  # (token, room_id)
    # Answers to give before behaving normally, per call: "resolve" / "send".
    script: dict[str, list[Scripted]] = field(default_factory=lambda: {"resolve": [], "send": []})
    send_delay: float = 0.0
    events: list[dict] = field(default_factory=list)  # accepted events, in order
    requests: list[tuple[str, str]] = field(default_factory=list)  # (call, alias or txn id)
    _txns: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_bot(self, token: str, *rooms: str) -> None:
        self.tokens.add(token)
        for room in rooms:
            self.joined.add((token, room))

    @staticmethod
    def answer(status: int, body: dict | bytes | None = None, delay: float = 0.0, drop: bool = False,
               after_work: bool = False) -> Scripted:
        return Scripted(status, body, delay, drop, after_work)

    def fail(self, call: str, *answers: Scripted) -> None:
        with self.lock:
            self.script[call].extend(answers)

    def bodies(self, room_id: str | None = None) -> list[str]:
        with self.lock:
            return [e["content"]["body"] for e in self.events if room_id in (None, e["room_id"])]

    def count(self, call: str) -> int:
        with self.lock:
            return sum(1 for c, _ in self.requests if c == call)

    # -- serving -----------------------------------------------------------------

    def start(self) -> FakeHomeserver:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_PUT(self):
                fake._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(request.path).path
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        if method == "GET" and path.startswith(DIRECTORY):
            call, key = "resolve", urllib.parse.unquote(path[len(DIRECTORY):])
        elif method == "PUT" and path.startswith(ROOMS) and "/send/" in path:
            room_part, _, rest = path[len(ROOMS):].partition("/send/")
            call = "send"
            key = urllib.parse.unquote(rest.split("/")[-1])
        else:
            return self._reply(request, 404, {"errcode": "M_UNRECOGNIZED", "error": "unknown endpoint"})
        with self.lock:
            self.requests.append((call, key))
            scripted = self.script[call].pop(0) if self.script[call] else None
        if scripted is not None and not scripted.after_work:
            if scripted.delay:
                time.sleep(scripted.delay)
            if scripted.drop:
                request.close_connection = True
                request.connection.shutdown(2)
                return
            return self._reply(request, scripted.status, scripted.body)
        if call == "resolve":
            room_id = self.aliases.get(key)
            if room_id is None:
                return self._reply(request, 404, {"errcode": "M_NOT_FOUND", "error": "Room alias not found"})
            return self._reply(request, 200, {"room_id": room_id, "servers": ["localhost"]})
        if self.send_delay:
            time.sleep(self.send_delay)
        room_id = urllib.parse.unquote(room_part)
        if token not in self.tokens:
            return self._reply(request, 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
        if (token, room_id) not in self.joined:
            return self._reply(request, 403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
        with self.lock:
            event_id = self._txns.get((token, key))
            if event_id is None:
                event_id = f"$event{len(self.events)}"
                self._txns[(token, key)] = event_id
                self.events.append({"room_id": room_id, "txn": key, "token": token, "content": json.loads(raw)})
        if scripted is not None:
            return self._reply(request, scripted.status, scripted.body)
        self._reply(request, 200, {"event_id": event_id})

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        request.send_response(status)
        ctype = "text/html" if isinstance(body, bytes) else "application/json"
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


@pytest.fixture
def homeserver():
    fake = FakeHomeserver().start()
    yield fake
    fake.stop()
