"""Token parsing and the logging filter that keeps channel tokens out of the
logs."""

from __future__ import annotations

import logging

from channels_records.app import RedactQueryTokens
from channels_records.connections import token_from_query


def test_token_from_query():
    assert token_from_query("channel_token=abc&EIO=4&transport=polling") == "abc"
    assert token_from_query("EIO=4&transport=websocket") is None
    assert token_from_query("") is None
    assert token_from_query("channel_token=a%20b") == "a b"


def record(msg, args=(), exc_info=None, level=logging.INFO):
    return logging.LogRecord("x", level, __file__, 1, msg, args, exc_info)


def test_query_tokens_are_redacted_from_any_log_line():
    r = record('%s - "WebSocket %s" [accepted]', ("1.2.3.4:5", "/socket.io/?channel_token=s3cr3t&EIO=4"))
    RedactQueryTokens().filter(r)
    assert "s3cr3t" not in r.getMessage()
    assert "channel_token=[redacted]&EIO=4" in r.getMessage()
