"""The development playground: a page at `/` that shows the system working
without a Loomio (live `records`/`notice` events, a form that publishes one
as Rails would, and a shared editor synced through collab).

Development only: `playground_routes()` returns no routes at all when
RAILS_ENV=production, and the images never ship the bundle. The demo user
comes from channels_dev (dev_rails), imported only when the playground is
enabled; the images do not hold that package. The publish
endpoint lets anyone who can reach it write to any room, so it exists only
beside a built bundle (a source checkout after `make install`) and answers
only direct requests from the loopback interface: not other hosts, and not
anything relayed by a reverse proxy on the same machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from pathlib import Path

from channels_common import jsonin
from channels_common.publish import publish_notice, publish_records
from channels_common.redis import create_redis
from channels_common.settings import PlaygroundSettings
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

log = logging.getLogger("channels.records.playground")

DOCUMENT_NAME = "discussion-1-description"
MAX_PUBLISH_BYTES = 64 * 1024
ROOM = re.compile(r"(user|group)-\d{1,18}")
# Files of the built bundle the page may load; nothing else under dist/.
STATIC_FILES = {
    "playground.js": "text/javascript",
    "playground.js.map": "application/json",
    "playground.css": "text/css",
}
_MISSING_BUNDLE = """<!doctype html><title>playground not built</title>
<h1>The playground bundle is not built</h1>
<p>Run <code>make install</code> (it builds <code>playground/dist</code>), then reload.</p>"""


def default_dist_dir() -> Path:
    # services/records/src/channels_records/playground.py -> repository root
    return Path(__file__).resolve().parents[4] / "playground" / "dist"


def parse_publish_request(body: bytes) -> tuple[str, str | None, dict] | str:
    """('records', room, records) or ('notice', None, message), else a reason."""
    if len(body) > MAX_PUBLISH_BYTES:
        return f"body over {MAX_PUBLISH_BYTES} bytes"
    try:
        data = jsonin.loads(body, max_bytes=MAX_PUBLISH_BYTES)
    except jsonin.JSONInputError:
        return "body is not JSON"
    if not isinstance(data, dict):
        return "body is not a JSON object"
    kind, payload = data.get("kind"), data.get("payload")
    if not isinstance(payload, dict):
        return "payload must be a JSON object"
    if kind == "notice":
        return "notice", None, payload
    if kind == "records":
        room = data.get("room")
        if not isinstance(room, str) or not ROOM.fullmatch(room):
            return "room must be user-<id> or group-<id>"
        return "records", room, payload
    return "kind must be 'records' or 'notice'"


_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _local_request(request: Request) -> bool:
    if request.client is None or any(h in request.headers for h in _PROXY_HEADERS):
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(request.client.host).is_loopback
    return False


def playground_routes(settings: PlaygroundSettings | None = None) -> list[BaseRoute]:
    settings = settings or PlaygroundSettings()
    if not settings.enabled:
        return []
    try:
        from channels_dev.dev_rails import (
            DEMO_GROUP_IDS,
            DEMO_TOKEN,
            DEMO_USER_ID,
            DEMO_USER_NAME,
            collab_token,
        )
    except ModuleNotFoundError as exc:
        if exc.name != "channels_dev":
            raise  # channels_dev is there but broken: say so loudly
        log.warning("no playground: channels-dev is not installed (`make install` installs it)")
        return []
    dist = Path(settings.dist_dir) if settings.dist_dir else default_dist_dir()
    if not (dist / "index.html").exists():
        log.warning("playground bundle not built; run `make install`", extra={"dist": str(dist)})

        async def not_built(request: Request) -> Response:
            return HTMLResponse(_MISSING_BUNDLE, status_code=503)

        return [Route("/", not_built)]
    log.info("development playground at /", extra={"dist": str(dist)})
    redis_holder: dict = {}

    def redis():
        # Opened on first use: a records instance that never sees the form
        # never holds the extra connection.
        if "client" not in redis_holder:
            redis_holder["client"] = create_redis(settings.redis_url, max_connections=2)
        return redis_holder["client"]

    async def page(request: Request) -> Response:
        index = dist / "index.html"
        if not index.exists():  # removed while running (a rebuild)
            return HTMLResponse(_MISSING_BUNDLE, status_code=503)
        return FileResponse(index, media_type="text/html", headers={"cache-control": "no-store"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES or not (dist / name).exists():
            return Response("not found", status_code=404)
        return FileResponse(dist / name, media_type=STATIC_FILES[name], headers={"cache-control": "no-store"})

    async def config(request: Request) -> Response:
        return JSONResponse({
            "channelToken": DEMO_TOKEN,
            "collabToken": collab_token(),
            "collabUrl": settings.collab_url,
            "documentName": DOCUMENT_NAME,
            "user": {"id": DEMO_USER_ID, "name": DEMO_USER_NAME},
            "rooms": ["notice", f"user-{DEMO_USER_ID}", *(f"group-{g}" for g in DEMO_GROUP_IDS)],
        })

    async def publish(request: Request) -> Response:
        if not _local_request(request):
            log.warning("playground publish refused: not a direct request from loopback")
            return JSONResponse({"error": "the playground publishes only for direct local requests"},
                                status_code=403)
        parsed = parse_publish_request(await request.body())
        if isinstance(parsed, str):
            log.warning("bad playground publish request", extra={"reason": parsed})
            return JSONResponse({"error": parsed}, status_code=400)
        kind, room, payload = parsed
        try:
            if kind == "records":
                subscribers = await publish_records(redis(), room, payload)
            else:
                subscribers = await publish_notice(redis(), payload)
        except (RedisError, OSError) as exc:  # Redis away: tell the page, keep serving
            log.warning("playground publish failed", extra={"error": str(exc)})
            return JSONResponse({"error": "Redis unavailable"}, status_code=503)
        log.info("playground published", extra={"kind": kind, "room": room, "subscribers": subscribers})
        return JSONResponse({"kind": kind, "room": room, "subscribers": subscribers})

    return [
        Route("/", page),
        Route("/playground/config.json", config),
        Route("/playground/publish", publish, methods=["POST"]),
        Route("/playground/{name}", static),
    ]
