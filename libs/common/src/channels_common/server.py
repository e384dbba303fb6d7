"""Running an ASGI app the same way in every service: uvloop, no access log
(query strings carry channel tokens), graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import uvicorn

log = logging.getLogger("channels.server")


def serve(app, *, host: str, port: int, grace_seconds: float = 5.0, ws: str = "websockets", **options) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws=ws,
        # Server frames are written pre-encoded and identical for every
        # recipient, which compression would prevent.
        ws_per_message_deflate=False,
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=grace_seconds,
        server_header=False,
        **options,
    )
    server = uvicorn.Server(config)
    log.info("listening", extra={"host": host, "port": port})
    server.run()
