"""The Matrix side: matrix-nio clients kept in a bounded LRU cache, room
aliases resolved through a TTL cache, and one send per attempt with the
command's fixed transaction id. Every failure leaves here as a `Transient`,
`RateLimited` or `Permanent` error; retrying is the dispatcher's business, so
nio's own retry loops are switched off.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from nio import AsyncClient, AsyncClientConfig
from nio.responses import ErrorResponse, RoomResolveAliasResponse, RoomSendResponse

from .errors import DeliveryError, Permanent, RateLimited, Transient
from .messages import Bot, Command

log = logging.getLogger("channels.bots.matrix")

# A 429 without retry_after_ms still means "not now".
DEFAULT_RETRY_AFTER = 1.0


def make_client(bot: Bot, request_timeout: float = 30.0) -> AsyncClient:
    config = AsyncClientConfig(
        # 0: nio returns the 429 / raises the timeout instead of looping itself.
        max_limit_exceeded=0,
        max_timeouts=0,
        request_timeout=request_timeout,
        encryption_enabled=False,
        store_sync_tokens=False,
    )
    client = AsyncClient(bot.server, config=config)
    client.access_token = bot.access_token
    return client


def classify(response: ErrorResponse, step: str) -> DeliveryError:
    """The error a homeserver's answer amounts to. `step` is "resolve" or
    "send": a 404 on the directory is an unknown alias, not a missing room."""
    status = response.transport_response.status if response.transport_response is not None else None
    errcode = response.status_code
    detail = f"{step}: HTTP {status} {errcode or ''}".strip()
    if status == 429 or errcode == "M_LIMIT_EXCEEDED":
        wait = (response.retry_after_ms or 0) / 1000 or DEFAULT_RETRY_AFTER
        return RateLimited(wait, detail)
    if status is None or status >= 500 or status == 408 or 200 <= status < 300:
        # 2xx here means a body nio could not read: a proxy's page, a hiccup.
        return Transient("server_error" if status and status >= 500 else "bad_response", detail)
    if status == 401 or errcode in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"):
        return Permanent("unknown_token", detail)
    if step == "resolve" and (status == 404 or errcode == "M_NOT_FOUND"):
        return Permanent("unknown_alias", detail)
    if status == 403 or errcode == "M_FORBIDDEN":
        return Permanent("not_in_room", detail)
    if status == 404:
        return Permanent("not_found", detail)
    return Permanent("rejected", detail)


@dataclass
class _Entry:
    client: AsyncClient
    last_used: float
    leases: int = 0
    evicted: bool = False


@dataclass
class ClientCache:
    """Clients per (homeserver, access token), least recently used first.

    At most `max_size` are cached; one idle for `idle_seconds` is dropped by
    `sweep()`. A dropped client is closed at once, or, when a send is still
    using it, as soon as that send gives it back.
    """

    max_size: int
    idle_seconds: float
    factory: Callable[[Bot], AsyncClient] = make_client
    clock: Callable[[], float] = time.monotonic
    on_evict: Callable[[str], None] | None = None
    _entries: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    # Clients alive outside the cache: fresh ones and evicted ones still in use.
    _outside: int = field(default=0, init=False)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def open_clients(self) -> int:
        return len(self._entries) + self._outside

    @asynccontextmanager
    async def lease(self, bot: Bot, fresh: bool = False) -> AsyncIterator[AsyncClient]:
        if fresh:
            client = self.factory(bot)
            self._outside += 1
            try:
                yield client
            finally:
                self._outside -= 1
                await _close(client)
            return
        entry = self._entries.get(bot.key)
        if entry is None:
            entry = _Entry(self.factory(bot), self.clock(), leases=1)
            self._entries[bot.key] = entry
            # Leased before shrinking: even a cache of size 0 closes the new
            # client only once this send is done with it.
            await self._shrink()
        else:
            self._entries.move_to_end(bot.key)
            entry.leases += 1
        try:
            yield entry.client
        finally:
            entry.leases -= 1
            entry.last_used = self.clock()
            if entry.evicted and entry.leases == 0:
                self._outside -= 1
                await _close(entry.client)

    async def discard(self, bot: Bot, cause: str) -> None:
        entry = self._entries.pop(bot.key, None)
        if entry is not None:
            await self._drop(entry, cause)

    async def sweep(self) -> int:
        """Drop the clients idle for longer than `idle_seconds`."""
        cutoff = self.clock() - self.idle_seconds
        stale = [k for k, e in self._entries.items() if e.leases == 0 and e.last_used <= cutoff]
        for key in stale:
            await self._drop(self._entries.pop(key), "idle")
        return len(stale)

    async def close(self) -> None:
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            await self._drop(entry, "shutdown")

    async def _shrink(self) -> None:
        while len(self._entries) > self.max_size:
            _, entry = self._entries.popitem(last=False)
            await self._drop(entry, "lru")

    async def _drop(self, entry: _Entry, cause: str) -> None:
        if self.on_evict:
            self.on_evict(cause)
        if entry.leases:
            entry.evicted = True
            self._outside += 1
        else:
            await _close(entry.client)


async def _close(client: AsyncClient) -> None:
    try:
        await client.close()
    except Exception:  # a session that cannot close cleanly is gone either way
        log.debug("closing a matrix client failed", exc_info=True)


@dataclass
class AliasCache:
    """Room ids by (homeserver, alias), each trusted for `ttl` seconds."""

    ttl: float
    max_size: int = 10000
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def get(self, server: str, alias: str) -> str | None:
        hit = self._entries.get((server, alias))
        if hit is None:
            return None
        room_id, expires = hit
        if expires <= self.clock():
            del self._entries[(server, alias)]
            return None
        self._entries.move_to_end((server, alias))
        return room_id

    def put(self, server: str, alias: str, room_id: str) -> None:
        self._entries[(server, alias)] = (room_id, self.clock() + self.ttl)
        self._entries.move_to_end((server, alias))
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def forget(self, server: str, alias: str) -> None:
        self._entries.pop((server, alias), None)

    def __len__(self) -> int:
        return len(self._entries)


class Matrix:
    """One delivery attempt of a command: resolve its room, send its event."""

    def __init__(self, clients: ClientCache, aliases: AliasCache):
        self.clients = clients
        self.aliases = aliases

    def lease(self, command: Command):
        return self.clients.lease(command.bot, fresh=command.fresh_client)

    async def deliver(self, client: AsyncClient, command: Command) -> str:
        """Post the command's event; its event id, or a DeliveryError."""
        server = command.bot.server
        try:
            room_id = await self._resolve(client, command)
            response = await client.room_send(
                room_id, "m.room.message", command.content, tx_id=command.txn_id
            )
        except DeliveryError as error:
            await self._after_failure(command, error)
            raise
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise Permanent("bad_server", type(exc).__name__) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Transient("network", type(exc).__name__) from None
        if isinstance(response, RoomSendResponse):
            return response.event_id
        error = classify(response, "send")
        if command.room.startswith("#") and isinstance(error, Permanent):
            # The alias may point elsewhere by now: ask again next time.
            self.aliases.forget(server, command.room)
        await self._after_failure(command, error)
        raise error

    async def _resolve(self, client: AsyncClient, command: Command) -> str:
        room = command.room
        if room.startswith("!"):
            return room
        cached = self.aliases.get(command.bot.server, room)
        if cached:
            return cached
        response = await client.room_resolve_alias(room)
        if isinstance(response, RoomResolveAliasResponse):
            self.aliases.put(command.bot.server, room, response.room_id)
            return response.room_id
        raise classify(response, "resolve")

    async def _after_failure(self, command: Command, error: DeliveryError) -> None:
        if error.reason == "unknown_token" and not command.fresh_client:
            await self.clients.discard(command.bot, "unknown_token")
