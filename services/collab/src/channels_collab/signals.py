"""SIGTERM and SIGINT drain the collab service (store, then close with 4205)
before the server's own handler runs; installed once, from the lifespan."""

from __future__ import annotations

import asyncio
import signal
import threading

from channels_common.tasks import spawn


def drain_before_signals(service) -> None:
    """The server closes open WebSockets with 1012 on SIGTERM before the app
    hears of it; catch the signal first, store and close with 4205, then pass
    it on to the server's own handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            async def drain_then_forward():
                try:
                    await service.drain()
                finally:
                    previous(signum, frame)

            loop.call_soon_threadsafe(lambda: spawn(drain_then_forward(), name="collab-drain", loop=loop))

        signal.signal(sig, handler)
