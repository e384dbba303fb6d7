"""channels_common.closecodes against its sources: the Hocuspocus codes as
the real @hocuspocus/common (tests/node) declares them, the RFC 6455 ones
as the frame parser accepts them."""

from __future__ import annotations

import json
import subprocess

from channels_common import closecodes
from channels_common.wsframe import FrameParser, WebSocketProtocolError

from tests.support import NODE_DIR, masked

HOCUSPOCUS = {
    "MessageTooBig": closecodes.MESSAGE_TOO_BIG,
    "ResetConnection": closecodes.RESET_CONNECTION,
    "Unauthorized": closecodes.UNAUTHORIZED,
    "Forbidden": closecodes.FORBIDDEN,
    "ConnectionTimeout": closecodes.CONNECTION_TIMEOUT,
}


def test_hocuspocus_codes_are_those_of_hocuspocus_common():
    script = (
        'import * as c from "@hocuspocus/common";'
        f"console.log(JSON.stringify(Object.fromEntries({json.dumps(list(HOCUSPOCUS))}.map(n => [n, c[n].code]))));"
    )
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=30, check=True)
    assert json.loads(done.stdout) == HOCUSPOCUS


def close(code: int) -> bytes:
    return masked(0x88, code.to_bytes(2, "big"))


def test_sendable_codes_are_the_registered_ones_and_the_parser_refuses_the_rest():
    # RFC 6455 7.4.1/7.4.2 and the IANA registry: 1004 reserved; 1005, 1006
    # and 1015 only reported locally; 1016-2999 unassigned.
    assert closecodes.SENDABLE == frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})
    for code in (999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
        try:
            FrameParser(100).feed(close(code))
        except WebSocketProtocolError as exc:
            assert exc.code == closecodes.PROTOCOL_ERROR
        else:
            raise AssertionError(f"close code {code} accepted")
    for code in (*closecodes.SENDABLE, 3000, 4205, 4999):
        assert [(e.code, e.reason) for e in FrameParser(100).feed(close(code))] == [(code, "")]
