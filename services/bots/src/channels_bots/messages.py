"""chatbot/* payloads (as Rails' ChatbotService publishes them) -> typed
commands. Everything from Redis is treated as hostile: anything that is not
exactly a known channel with a complete payload raises `Rejected` with a
short reason that is safe to log (never the access token, never the payload).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from channels_common import jsonin

from .render import TRUNCATED, html_to_text

TEST_CHANNEL = "chatbot/test"
PUBLISH_CHANNEL = "chatbot/publish"
CHANNELS = (TEST_CHANNEL, PUBLISH_CHANNEL)

# Matrix caps an event at 64 KiB; a payload far beyond that is not a message.
MAX_PAYLOAD_BYTES = 256 * 1024
# What the content of one event may take (its canonical JSON, UTF-8): Matrix
# refuses an event over 64 KiB, and room, sender, hashes and signatures
# need the rest.
MAX_CONTENT_BYTES = 60 * 1024
MAX_SERVER_LENGTH = 2048
MAX_TOKEN_LENGTH = 4096
# `#alias:server` (the server part may carry a port) or a room id: `!opaque:server`,
# or from room version 12 on just `!opaque`.
_ROOM = re.compile(r"^(#[^\s:]{1,255}:[A-Za-z0-9.\-\[\]:]{1,255}|![^\s]{1,255})$")
_SERVER = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", re.IGNORECASE)


class Rejected(ValueError):
    """A message that is dropped; `reason` is a metric label and a log word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Bot:
    """Where and as whom to post. The token stays out of repr and logs."""

    server: str
    access_token: str = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.server, self.access_token)


@dataclass(frozen=True, slots=True)
class Command:
    """One Matrix message to deliver."""

    kind: str  # "test" or "publish"
    bot: Bot
    room: str  # as Rails gave it: an alias or a room id
    content: dict = field(repr=False)
    # The message's identity (transaction_id): every attempt, by any
    # instance, is the same transaction to the homeserver.
    txn_id: str

    @property
    def fresh_client(self) -> bool:
        # chatbot/test checks a configuration: its client is used once.
        return self.kind == "test"

    @property
    def queue_key(self) -> tuple[str, str]:
        return (self.bot.server, self.room)


def transaction_id(channel: str, data: bytes) -> str:
    """The Matrix transaction id of a message, from the message itself (its
    channel and payload bytes): the same publish gets the same id in every
    instance and every version of the service."""
    digest = hashlib.sha256(channel.encode() + b"\0" + data).hexdigest()
    return "lc1" + digest[:40]


def _text_field(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise Rejected("incomplete", f"{where}{name} missing or not a string")
    return value


def _bot_and_room(obj: dict, where: str) -> tuple[Bot, str]:
    server = _text_field(obj, "server", where).strip().rstrip("/")
    token = _text_field(obj, "access_token", where)
    room = _text_field(obj, "channel", where).strip()
    if not (0 < len(server) <= MAX_SERVER_LENGTH and _SERVER.match(server)):
        raise Rejected("invalid", f"{where}server is not an http(s) URL")
    if not (0 < len(token) <= MAX_TOKEN_LENGTH) or not token.isprintable() or " " in token:
        raise Rejected("invalid", f"{where}access_token is malformed")
    if not _ROOM.match(room):
        raise Rejected("invalid", f"{where}channel is not a #alias:server or a !room id")
    return Bot(server=server, access_token=token), room


def _content_bytes(content: dict) -> int:
    return len(json.dumps(content, ensure_ascii=False).encode())


def _fitted(content: dict) -> dict:
    """`content` if it fits one event; else its plain text alone, cut (and
    marked TRUNCATED) to fit. Each try is linear; the cut is proportional,
    so a few tries at most."""
    if _content_bytes(content) <= MAX_CONTENT_BYTES:
        return content
    text = content["body"].removesuffix(TRUNCATED)
    plain = {"msgtype": content["msgtype"], "body": content["body"]}
    while (size := _content_bytes(plain)) > MAX_CONTENT_BYTES:
        keep = max(0, len(text) * MAX_CONTENT_BYTES // size - len(TRUNCATED) - 64)
        text = text[:keep].rstrip()
        plain["body"] = text + TRUNCATED
    return plain


def parse(channel: str, data: bytes) -> Command:
    """The command a chatbot/* message asks for, or `Rejected`."""
    if channel not in CHANNELS:
        raise Rejected("unknown_channel")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise Rejected("too_large", f"{len(data)} bytes")
    try:
        obj = jsonin.loads(data, max_bytes=MAX_PAYLOAD_BYTES)
    except jsonin.JSONInputError as exc:
        raise Rejected("not_json", exc.reason) from None
    if not isinstance(obj, dict):
        raise Rejected("incomplete", "payload is not an object")

    if channel == TEST_CHANNEL:
        bot, room = _bot_and_room(obj, "")
        message = _text_field(obj, "message", "")
        return Command("test", bot, room, _fitted({"msgtype": "m.notice", "body": message}),
                       transaction_id(channel, data))

    config = obj.get("config")
    payload = obj.get("payload")
    if not isinstance(config, dict):
        raise Rejected("incomplete", "config missing or not an object")
    if not isinstance(payload, dict):
        raise Rejected("incomplete", "payload missing or not an object")
    bot, room = _bot_and_room(config, "config.")
    html = _text_field(payload, "html", "payload.")
    content = {
        "msgtype": "m.text",
        "body": html_to_text(html),
        "format": "org.matrix.custom.html",
        "formatted_body": html,
    }
    return Command("publish", bot, room, _fitted(content), transaction_id(channel, data))
