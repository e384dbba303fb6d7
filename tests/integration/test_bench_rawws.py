"""The records load generator's bare websocket client (bench/loadgen/rawws.mjs)
against a server that sends hand-made frames: the byte layouts of RFC 6455
the bench depends on, including the ones both servers rarely produce."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import subprocess
import threading

from tests.support import ROOT

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PROBE = """
import { RawWebSocket } from "./rawws.mjs";
const ws = new RawWebSocket(process.argv[1]);
const out = (o) => process.stdout.write(JSON.stringify(o) + "\\n");
ws.on("open", () => { out({ event: "open" }); ws.send("40"); });
ws.on("message", (data, binary) => out({ event: "message", binary, text: binary ? data.length : data.toString() }));
ws.on("error", (err) => out({ event: "error", error: err.message }));
ws.on("close", () => out({ event: "close" }));
"""


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if masked:
        head += b"\0\0\0\0"
    return head + payload


def read_client_frame(conn: socket.socket) -> tuple[int, bytes]:
    b0, b1 = conn.recv(2, socket.MSG_WAITALL)
    assert b1 & 0x80, "client frames must be masked"
    n = b1 & 0x7F
    key = conn.recv(4, socket.MSG_WAITALL)
    data = conn.recv(n, socket.MSG_WAITALL) if n else b""
    return b0 & 0x0F, bytes(c ^ key[i % 4] for i, c in enumerate(data))


def serve_once(script, accept_key_ok: bool = True):
    """A one-connection server: handshake, then `script(conn)`. Returns (url, thread, log)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    seen: dict = {}

    def run():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            seen["request"] = request.decode("latin1")
            key = next(
                line.split(":", 1)[1].strip()
                for line in seen["request"].split("\r\n")
                if line.lower().startswith("sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            if not accept_key_ok:
                accept = "wrong" + accept
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            )
            script(conn, seen)
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", thread, seen


def run_probe(url: str) -> list[dict]:
    done = subprocess.run(
        ["node", "--input-type=module", "-e", PROBE, url],
        cwd=ROOT / "bench" / "loadgen", capture_output=True, text=True, timeout=20, check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_frames_split_fragmented_long_and_pinged_arrive_whole_and_in_order():
    long_text = "x" * 300  # 16-bit length
    huge = b"y" * 70000  # 64-bit length

    def script(conn, seen):
        seen["first"] = read_client_frame(conn)
        # One frame delivered a byte at a time, then several frames in one write.
        for byte in frame(0x1, b"0{}"):
            conn.sendall(bytes([byte]))
        conn.sendall(frame(0x1, b'42["a",', fin=False) + frame(0x9, b"hi") + frame(0x0, b"1]"))
        seen["pong"] = read_client_frame(conn)
        conn.sendall(frame(0x1, long_text.encode()) + frame(0x2, huge) + frame(0x8, struct.pack(">H", 1000)))
        seen["close"] = read_client_frame(conn)

    url, thread, seen = serve_once(script)
    events = run_probe(url)
    thread.join(5)
    assert "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1" in seen["request"]
    assert "Sec-WebSocket-Extensions" not in seen["request"]
    assert seen["first"] == (0x1, b"40")
    assert seen["pong"] == (0xA, b"hi")
    assert seen["close"] == (0x8, struct.pack(">H", 1000))
    messages = [(e["binary"], e["text"]) for e in events if e["event"] == "message"]
    assert messages == [(False, "0{}"), (False, '42["a",1]'), (False, long_text), (True, 70000)]
    assert events[0] == {"event": "open"} and events[-1] == {"event": "close"}


def test_a_masked_server_frame_or_a_wrong_accept_key_is_an_error_and_a_close():
    url, thread, _ = serve_once(lambda conn, seen: (read_client_frame(conn), conn.sendall(frame(0x1, b"0", masked=True))))
    events = run_probe(url)
    thread.join(5)
    assert {"event": "error", "error": "server frames must not be masked"} in events
    assert events[-1] == {"event": "close"}

    url, thread, _ = serve_once(lambda conn, seen: conn.recv(1), accept_key_ok=False)
    events = run_probe(url)
    thread.join(5)
    assert {"event": "error", "error": "bad Sec-WebSocket-Accept"} in events
    assert {"event": "open"} not in events
