"""One logging setup, error reporting, and the /healthz, /readyz and /metrics
endpoints every service serves.

Logs are one JSON object per line. Secrets never reach them: callers pass
only what is safe in `extra`, and the formatter drops any field whose name
says it holds a token or secret, as a second line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# color_message: uvicorn's copy of the message with terminal colour codes.
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}
_SECRET_WORDS = ("token", "secret", "password", "pid", "authorization")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            if any(word in key.lower() for word in _SECRET_WORDS):
                value = "[redacted]"
            entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs would carry query strings, and the channel token is one.
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def setup_sentry(dsn: str | None, service: str) -> None:
    if not dsn:
        return
    try:
        import sentry_sdk
    except ImportError:
        logging.getLogger("channels").warning(
            "SENTRY_DSN is set but sentry-sdk is not installed; error reporting is off"
        )
        return
    sentry_sdk.init(dsn=dsn, server_name=service, send_default_pii=False)


def _ready_flag(ready: Callable[[], bool | tuple[bool, dict]]) -> float:
    result = ready()
    return 1.0 if (result[0] if isinstance(result, tuple) else result) else 0.0


def observe_service(
    registry: CollectorRegistry,
    service: str,
    ready: Callable[[], bool | tuple[bool, dict]],
    subscription_live: Callable[[], bool] | None = None,
) -> None:
    """What the operators' kit (deploy/observability) watches in every
    service, read at scrape time: `{service}_ready` (what /readyz answers),
    `{service}_redis_subscription_live` when the service subscribes to Redis,
    and the process's CPU, memory and file descriptors (`process_*`, Linux
    only) and Python version (`python_info`)."""
    Gauge(f"{service}_ready", "1 when /readyz answers 200 (the service can do its job)", registry=registry
          ).set_function(lambda: _ready_flag(ready))
    if subscription_live is not None:
        Gauge(f"{service}_redis_subscription_live", "1 while the Redis pub/sub subscription is live",
              registry=registry).set_function(lambda: 1.0 if subscription_live() else 0.0)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def health_routes(
    registry: CollectorRegistry, ready: Callable[[], bool | tuple[bool, dict]]
) -> list[Route]:
    """/healthz: the process answers. /readyz: `ready()` says it can do its
    job (for example its Redis subscription is live). /metrics: Prometheus."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        result = ready()
        ok, detail = result if isinstance(result, tuple) else (result, {})
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
