"""Socket.IO packet text for the default namespace, sans I/O.

Only what the records service sends or must understand: CONNECT replies
(with the private `pid` of connection state recovery), broadcast EVENTs (with
the recovery offset appended to the data array), and the `{pid, offset}`
payload a reconnecting client puts in its CONNECT packet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CONNECT = "0"
EVENT = "2"

# Generous bounds: socket.io's own pids are 20-30 characters and offsets are
# short; anything longer is not from a real client.
MAX_PID_LENGTH = 128
MAX_OFFSET_LENGTH = 64


def encode_event(event: str, payload_json: str, offset: str | None = None) -> str:
    """`2["event",<payload>(,"offset")]`. `payload_json` must be one complete,
    already validated JSON value: it is embedded as is, never re-serialised,
    so a broadcast costs one string join however many recipients it has."""
    if offset is None:
        return f"{EVENT}[{json.dumps(event)},{payload_json}]"
    return f"{EVENT}[{json.dumps(event)},{payload_json},{json.dumps(offset)}]"


def encode_connect(sid: str, pid: str | None = None) -> str:
    body = {"sid": sid} if pid is None else {"sid": sid, "pid": pid}
    return CONNECT + json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class RecoveryRequest:
    pid: str
    offset: str | None  # None when the client received no event before it dropped


def _short_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def parse_recovery(auth: object) -> RecoveryRequest | None:
    """The recovery request in a CONNECT payload, or None when there is none
    or it is malformed (the client then gets a fresh session)."""
    if not isinstance(auth, dict):
        return None
    pid = auth.get("pid")
    if not _short_text(pid, MAX_PID_LENGTH):
        return None
    offset = auth.get("offset")
    if offset is not None and not _short_text(offset, MAX_OFFSET_LENGTH):
        return None
    return RecoveryRequest(pid=pid, offset=offset)
