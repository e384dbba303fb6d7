"""`channels-dev-rails`: a DEVELOPMENT STAND-IN FOR RAILS, so that `make run`
shows the system working without a Loomio. It is not Rails and never runs in
production (it refuses to start when RAILS_ENV=production).

It does the two things the services need from Rails:
- writes a demo channel token to Redis (`/current_users/{token}`), as
  BootController#set_channel_token does, and rewrites it periodically so a
  restarted development Redis gets it back;
- answers `POST /api/hocuspocus` with 200 for the demo user's secret, whatever
  the document, so the playground's editor may open any document, and 401 for
  any other secret, as Rails refuses unknown users (channels-doctor checks
  that refusal; real Rails also checks permissions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys

from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("channels.dev_rails")

# The demo user of the playground. The token is public on purpose: it only
# exists in development Redis, written by this stand-in.
DEMO_TOKEN = "playground-demo-token"
DEMO_USER_ID = 1
DEMO_USER_NAME = "Playground Demo"
DEMO_GROUP_IDS = (1,)
MAX_BODY_BYTES = 64 * 1024


def collab_token() -> str:
    """The collab token the Loomio client assembles: `{user_id},{secret_token}`."""
    return f"{DEMO_USER_ID},{DEMO_TOKEN}"


def production_refusal(rails_env: str) -> str | None:
    if rails_env == "production":
        return "channels-dev-rails is a development stand-in for Rails and refuses to run with RAILS_ENV=production"
    return None


def parse_hocuspocus_request(body: bytes) -> tuple[str, str] | str:
    """(user_secret, document_name) of a well-formed callback, else a reason."""
    if len(body) > MAX_BODY_BYTES:
        return "body too large"
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "body is not JSON"
    if not isinstance(data, dict):
        return "body is not a JSON object"
    secret, name = data.get("user_secret"), data.get("document_name")
    if not isinstance(secret, str) or not isinstance(name, str) or not name:
        return "user_secret and document_name must be strings"
    return secret, name


def create_app(redis_url: str, refresh_seconds: float = 30.0) -> Starlette:
    from channels_common.observability import health_routes
    from channels_common.publish import set_channel_token
    from channels_common.redis import create_redis
    from channels_common.tasks import spawn

    registry = CollectorRegistry()
    answered = Counter(
        "dev_rails_hocuspocus_requests", "Auth callbacks answered", ["status"], registry=registry
    )
    state = {"token_written": False}

    async def keep_token(redis) -> None:
        while True:
            try:
                await set_channel_token(redis, DEMO_TOKEN, DEMO_USER_ID, DEMO_GROUP_IDS, DEMO_USER_NAME)
                if not state["token_written"]:
                    log.info("demo channel token written", extra={"user_id": DEMO_USER_ID})
                state["token_written"] = True
            except (RedisError, OSError) as exc:  # Redis away: say so, try again later
                state["token_written"] = False
                log.warning("cannot write the demo channel token", extra={"error": str(exc)})
            await asyncio.sleep(refresh_seconds if state["token_written"] else 1.0)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        redis = create_redis(redis_url, max_connections=2)
        task = spawn(keep_token(redis), name="dev-rails-token")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await redis.aclose()

    async def hocuspocus(request: Request) -> Response:
        parsed = parse_hocuspocus_request(await request.body())
        if isinstance(parsed, str):
            log.warning("bad /api/hocuspocus request", extra={"reason": parsed})
            answered.labels("400").inc()
            return JSONResponse({"error": parsed}, status_code=400)
        secret, name = parsed
        if not secrets.compare_digest(secret.encode(), collab_token().encode()):
            log.info("document denied: not the demo user (development stand-in)", extra={"document": name[:200]})
            answered.labels("401").inc()
            return JSONResponse({"error": "unknown user"}, status_code=401)
        log.info("document allowed (development stand-in)", extra={"document": name[:200]})
        answered.labels("200").inc()
        return JSONResponse({"ok": True})

    routes = [
        Route("/api/hocuspocus", hocuspocus, methods=["POST"]),
        *health_routes(registry, lambda: (state["token_written"], {"demo_token": state["token_written"]})),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> int:
    from channels_common.observability import setup_logging
    from channels_common.server import serve
    from channels_common.settings import DevRailsSettings

    settings = DevRailsSettings()
    refusal = production_refusal(settings.rails_env)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    setup_logging("dev-rails", settings.log_level)
    log.warning("DEVELOPMENT STAND-IN FOR RAILS: allows every document to the demo user; never use in production")
    serve(
        create_app(settings.redis_url, settings.token_refresh_seconds),
        host=settings.host,
        port=settings.port,
        grace_seconds=settings.shutdown_grace_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
