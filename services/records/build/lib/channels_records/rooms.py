"""Which rooms a connection joins, from the user its channel token names."""

from __future__ import annotations

from channels_common.auth import ChannelUser

NOTICE_ROOM = "notice"


def rooms_for(user: ChannelUser | None) -> list[str]:
    """`notice` for everyone; `user-{id}` and `group-{g}` when Rails vouched
    for the token. A logged-out visitor (id null) joins no user room."""
    rooms = [NOTICE_ROOM]
    if user is None:
        return rooms
    if user.id is not None:
        rooms.append(f"user-{user.id}")
    seen = set()
    for group_id in user.group_ids:
        if group_id not in seen:
            seen.add(group_id)
            rooms.append(f"group-{group_id}")
    return rooms
