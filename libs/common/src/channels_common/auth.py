"""How Rails vouches for a user: the channel token that Rails writes to Redis
at boot (`/current_users/{token}`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import jsonin

log = logging.getLogger("channels.auth")

CURRENT_USER_KEY = "/current_users/{token}"
MAX_TOKEN_LENGTH = 256
# A user record is a few ids; one in a thousand groups is some 10 KB.
MAX_USER_RECORD_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChannelUser:
    id: int | None
    group_ids: tuple[int, ...]


def current_user_key(token: str) -> str:
    return CURRENT_USER_KEY.format(token=token)


def valid_token(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH and token.isprintable()


def parse_current_user(raw: bytes | str | None) -> ChannelUser | None:
    """Parse the JSON Rails stored for a token; None when it is missing or
    unusable. Only ids are kept: the user's name is never needed here."""
    if raw is None:
        return None
    try:
        data = jsonin.loads(raw, max_bytes=MAX_USER_RECORD_BYTES)
    except jsonin.JSONInputError as exc:
        log.warning("unparseable current user record", extra={"size": len(raw), "reason": exc.reason})
        return None
    if not isinstance(data, dict):
        log.warning("current user record is not an object", extra={"size": len(raw)})
        return None
    user_id = data.get("id")
    if not (isinstance(user_id, int) and not isinstance(user_id, bool)):
        user_id = None
    groups = data.get("group_ids") or []
    if not isinstance(groups, list):
        groups = []
    group_ids = tuple(g for g in groups if isinstance(g, int) and not isinstance(g, bool))
    return ChannelUser(id=user_id, group_ids=group_ids)


async def lookup_channel_user(redis, token: str | None) -> ChannelUser | None:
    """The user a channel token belongs to, or None (unknown, missing or
    malformed token). Redis errors propagate so the caller can retry."""
    if not valid_token(token):
        return None
    raw = await redis.get(current_user_key(token))
    return parse_current_user(raw)
