"""Stand-in Rails for benchmarks: answers POST /api/hocuspocus with 200 for
any well-formed request, so both collab servers pay the same auth round trip.
Shared by our service and the reference in the same run."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if 0 < length <= 65536 else b""
        try:
            data = json.loads(body)
            ok = self.path == "/api/hocuspocus" and isinstance(data.get("user_secret"), str) and isinstance(
                data.get("document_name"), str
            )
        except (ValueError, AttributeError):
            ok = False
        status = 200 if ok else 401
        reply = b"{}" if ok else b'{"error":"unauthorized"}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):  # one line per auth call would drown the bench output
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a burst of auth connections (one
    # per provider opening at once) overflowed it and waited out the 1 s SYN
    # retransmit. Rails behind puma has the kernel's default (4096).
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # Clients closing kept-alive connections at shutdown are not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    server = Server(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
