"""The Rails side of the contract, for tests and for operators poking a
running system: publish records to a room, publish a system notice, write a
channel token, and publish chatbot traffic.

    channels-publish token TOKEN --user-id 7 --group 1 --group 2 [--ttl 3600]
    channels-publish records group-1 '{"discussions": [{"id": 1}]}'
    channels-publish notice '{"type": "maintenance", "message": "soon"}'
    channels-publish chatbot-test SERVER CHANNEL MESSAGE   (token from MATRIX_ACCESS_TOKEN)
    channels-publish chatbot-publish SERVER CHANNEL HTML   (token from MATRIX_ACCESS_TOKEN)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .auth import current_user_key
from .settings import PublishSettings

RECORDS_CHANNEL = "/records"
NOTICE_CHANNEL = "/system_notice"


async def publish_records(redis, room: str, records: Any) -> int:
    """As MessageChannelService.publish_serialized_records does."""
    return await redis.publish(RECORDS_CHANNEL, json.dumps({"room": room, "records": records}))


async def publish_notice(redis, message: Any) -> int:
    """As MessageChannelService.publish_system_notice does."""
    return await redis.publish(NOTICE_CHANNEL, json.dumps(message))


async def set_channel_token(
    redis,
    token: str,
    user_id: int | None,
    group_ids: list[int] | tuple[int, ...] = (),
    name: str = "",
    ttl: int | None = None,
) -> None:
    """As BootController#set_channel_token does (plus an optional expiry)."""
    value = json.dumps({"name": name, "group_ids": list(group_ids), "id": user_id})
    await redis.set(current_user_key(token), value, ex=ttl)


async def publish_chatbot_test(redis, server: str, access_token: str, channel: str, message: str) -> int:
    payload = {"server": server, "access_token": access_token, "channel": channel, "message": message}
    return await redis.publish("chatbot/test", json.dumps(payload))


async def publish_chatbot(redis, server: str, access_token: str, channel: str, html: str) -> int:
    payload = {
        "config": {"server": server, "access_token": access_token, "channel": channel},
        "payload": {"html": html},
    }
    return await redis.publish("chatbot/publish", json.dumps(payload))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="channels-publish", description="Publish as Rails would.")
    p.add_argument("--redis-url", default=None, help="default: REDIS_URL, else redis://localhost:6379/0")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("token", help="write /current_users/{token}")
    t.add_argument("token")
    t.add_argument("--user-id", type=int, default=None)
    t.add_argument("--group", type=int, action="append", default=[])
    t.add_argument("--name", default="")
    t.add_argument("--ttl", type=int, default=None)

    r = sub.add_parser("records", help="publish on /records")
    r.add_argument("room")
    r.add_argument("records", help="JSON")

    n = sub.add_parser("notice", help="publish on /system_notice")
    n.add_argument("message", help="JSON")

    ct = sub.add_parser("chatbot-test", help="publish on chatbot/test")
    ct.add_argument("server")
    ct.add_argument("channel")
    ct.add_argument("message")

    cp = sub.add_parser("chatbot-publish", help="publish on chatbot/publish")
    cp.add_argument("server")
    cp.add_argument("channel")
    cp.add_argument("html")
    return p


async def _run(args: argparse.Namespace, settings: PublishSettings) -> int:
    from .redis import create_redis

    redis = create_redis(args.redis_url or settings.redis_url, max_connections=2)
    try:
        if args.command == "token":
            await set_channel_token(redis, args.token, args.user_id, args.group, args.name, args.ttl)
            print("ok")
        elif args.command == "records":
            print(await publish_records(redis, args.room, json.loads(args.records)))
        elif args.command == "notice":
            print(await publish_notice(redis, json.loads(args.message)))
        elif args.command in ("chatbot-test", "chatbot-publish"):
            secret = settings.matrix_access_token
            token = secret.get_secret_value() if secret is not None else ""
            if not token:
                print("set MATRIX_ACCESS_TOKEN", file=sys.stderr)
                return 2
            if args.command == "chatbot-test":
                print(await publish_chatbot_test(redis, args.server, token, args.channel, args.message))
            else:
                print(await publish_chatbot(redis, args.server, token, args.channel, args.html))
    finally:
        await redis.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, PublishSettings()))
    except json.JSONDecodeError as exc:
        print(f"not JSON: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
