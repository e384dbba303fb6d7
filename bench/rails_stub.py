"""Stand-in Rails for benchmarks: answers POST /api/hocuspocus with 200 for
any well-formed request, so both collab servers pay the same auth round trip.
Shared by our service and the reference in the same run.

It is an event-loop server answering each request in one write, as Rails
behind puma answers a cheap request: fast under concurrency, no stall per
request. The thread-per-connection `http.server` it replaces answered 1,000
requests one at a time in 1.6 s but 20 at a time in 3.5-4.2 s (threads
queueing for the GIL), and on a kept-alive connection held every body back
40 ms for the client's delayed ACK of the headers (Nagle): the bench's
"load all documents" row measured that, not the servers.
"""

from __future__ import annotations

import asyncio
import json
import sys

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}


def decide(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    if method == "GET":
        return (200 if path == "/healthz" else 404), b""
    if method != "POST" or path != "/api/hocuspocus":
        return 404, b""
    try:
        data = json.loads(body)
        ok = isinstance(data.get("user_secret"), str) and isinstance(data.get("document_name"), str)
    except (ValueError, AttributeError):
        ok = False
    return (200, b"{}") if ok else (401, b'{"error":"unauthorized"}')


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, lower-cased headers) of a request head ending in a blank line."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _version = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            try:
                method, path, headers = parse_head(head)
                length = int(headers.get("content-length") or 0)
            except ValueError:
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            if not 0 <= length <= MAX_BODY_BYTES:
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            body = await reader.readexactly(length) if length else b""
            status, reply = decide(method, path, body)
            close = headers.get("connection", "").lower() == "close"
            writer.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                % (status, REASONS[status], len(reply), b"connection: close\r\n" if close else b"", reply)
            )
            if close:
                return
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return  # the client went away, or sent more head than we read
    finally:
        writer.close()


async def main_async(port: int) -> None:
    # A burst of auth connections (one per provider opening at once) needs
    # a backlog well past the default; Rails behind puma has the kernel's.
    server = await asyncio.start_server(serve_connection, "127.0.0.1", port, backlog=1024, limit=MAX_HEAD_BYTES)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    try:
        import uvloop

        uvloop.run(main_async(port))
    except ImportError:
        asyncio.run(main_async(port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
