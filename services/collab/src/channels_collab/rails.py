"""Asking Rails whether a user may open a document: `POST {base}/api/hocuspocus`
with `{"user_secret": token, "document_name": name}`. 200 allows; anything
else, a timeout or an unreachable Rails denies. The token never reaches a
log line. Requests go through single-connection httpx clients lent out one
request at a time (why, measured: docs/collab.md, `rails.py`).

The clients are shared by every socket, fairly (`FairShare`): a socket has
at most MAX_CALLS_PER_CALLER calls to Rails at once, and a free client goes
to the next socket in turn, so no socket, however many documents it asks
about, holds others' logins back by more than one call each."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import anyio.streams.stapled
import anyio.streams.tls
import httpx
from channels_common import jsonin

from .protocol import SCOPE_READ_ONLY, SCOPE_READ_WRITE

log = logging.getLogger("channels.collab.rails")

AUTH_PATH = "/api/hocuspocus"
MAX_TOKEN_LENGTH = 1024
RETRIES = 2
MAX_CALLS_PER_CALLER = 4
DENIED_REASON = "permission-denied"
MAX_BODY_BYTES = 4096  # of a 200 answer: a longer one is not read

# Why a decision went the way it did, as the `cause` label of
# collab_auth_total (a fixed set, so the label cannot grow).
ALLOWED = "allowed"
RAILS_DENIED = "rails_denied"
RAILS_TIMEOUT = "rails_timeout"
RAILS_UNREACHABLE = "rails_unreachable"
INVALID_TOKEN = "invalid_token"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    scope: str = SCOPE_READ_WRITE
    # Why, for our log line only; the client always gets DENIED_REASON.
    detail: str = ""
    # One of the causes above; empty means ALLOWED or ERROR by `allowed`.
    cause: str = ""

    @property
    def readonly(self) -> bool:
        return self.scope == SCOPE_READ_ONLY


def _scope_from_body(response: httpx.Response) -> str:
    """Rails answers 200 with no particular body today; a JSON body saying
    `{"scope": "readonly"}` (or `"read_only": true`) opens the document
    read-only."""
    if not response.content or len(response.content) > MAX_BODY_BYTES:
        return SCOPE_READ_WRITE
    try:
        body = jsonin.loads(response.content, max_bytes=MAX_BODY_BYTES)
    except jsonin.JSONInputError:
        return SCOPE_READ_WRITE
    if not isinstance(body, dict):
        return SCOPE_READ_WRITE
    if body.get("scope") in ("readonly", "read-only", "read_only"):
        return SCOPE_READ_ONLY
    if body.get("readonly") is True or body.get("read_only") is True:
        return SCOPE_READ_ONLY
    return SCOPE_READ_WRITE


class FairShare:
    """`size` slots shared by callers (sockets): each caller holds at most
    `per_caller` at once, and a freed slot goes to the next waiting caller
    in round-robin order, each caller's own waits first come, first served.
    A wait cancelled before its slot is granted takes nothing, even when
    the grant comes before its task resumes; one cancelled just after
    gives its slot back."""

    def __init__(self, size: int, per_caller: int):
        self.size = size
        self.per_caller = per_caller
        self.running = 0
        self._held: dict[object, int] = {}
        # Callers with waits, in turn order (a dict keeps insertion order).
        self._waiting: dict[object, deque[asyncio.Future]] = {}

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def held(self, caller: object) -> int:
        return self._held.get(caller, 0)

    def _take(self, caller: object) -> None:
        self.running += 1
        self._held[caller] = self._held.get(caller, 0) + 1

    async def acquire(self, caller: object) -> None:
        if self.running < self.size and self.held(caller) < self.per_caller and caller not in self._waiting:
            self._take(caller)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(caller, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(caller)  # granted as it was cancelled
            else:
                queue = self._waiting.get(caller)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[caller]
            raise

    def release(self, caller: object) -> None:
        self.running -= 1
        left = self._held[caller] - 1
        if left:
            self._held[caller] = left
        else:
            del self._held[caller]
        self._grant()

    def _grant(self) -> None:
        # At most size / per_caller callers are at their cap, so each grant
        # looks at a bounded number of callers.
        while self.running < self.size and self._waiting:
            for caller in self._waiting:
                if self.held(caller) < self.per_caller:
                    break
            else:
                return  # every waiting caller is at its cap
            queue = self._waiting.pop(caller)
            future = queue.popleft()
            if queue:
                self._waiting[caller] = queue  # to the back of the turn order
            if future.done():
                # Cancelled, its task not yet resumed to take it out (a
                # socket's auths cancelled together): nothing to grant.
                continue
            self._take(caller)
            future.set_result(None)


class RailsAuthenticator:
    def __init__(
        self,
        base_url: str | None,
        *,
        timeout_seconds: float,
        max_concurrent: int = 32,
        max_per_caller: int = MAX_CALLS_PER_CALLER,
    ):
        self.url = base_url.rstrip("/") + AUTH_PATH if base_url else None
        self.timeout_seconds = timeout_seconds
        self.max_concurrent = max_concurrent
        # Clients are made on demand, up to max_concurrent; requests beyond
        # that wait for an idle one, bounded by the same deadline.
        self._clients: list[httpx.AsyncClient] = []
        self._idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        # Who may use a client next; with it no request waits for a client.
        self.share = FairShare(max_concurrent, max_per_caller)
        # One TLS context for every client, made here: loading the CA bundle
        # takes ~3 MB and a moment. Only a plain-HTTP Rails (the usual
        # internal PRIVATE_APP_URL) goes without; redirects are not followed,
        # so it never reaches TLS. Any other scheme verifies.
        plain_http = self.url is not None and httpx.URL(self.url).scheme == "http"
        self._verify = False if plain_http else httpx.create_ssl_context()
        if self.url is None:
            log.warning("no Rails URL configured (PRIVATE_APP_URL, APP_URL, PUBLIC_APP_URL, CANONICAL_HOST): "
                        "every document will be denied")
        else:
            # The first one now, so that startup pays for what it loads.
            self._idle.put_nowait(self._new_client())

    async def warm_up(self) -> None:
        """Load at startup what the first call would: anyio (4.16 imports
        lazily) loads its asyncio backend and its socket modules, which
        httpcore connects with, on first use (~750 KiB, docs/collab.md)."""
        await anyio.lowlevel.checkpoint()
        anyio.connect_tcp  # noqa: B018 - the attribute's lazy import is the point

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()

    def _new_client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_seconds),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
            verify=self._verify,
        )
        self._clients.append(client)
        return client

    async def _client(self) -> httpx.AsyncClient:
        if self._idle.empty() and len(self._clients) < self.max_concurrent:
            return self._new_client()
        return await self._idle.get()

    async def _post(self, body: dict) -> httpx.Response:
        client = await self._client()
        try:
            return await self._post_with(client, body)
        finally:
            self._idle.put_nowait(client)

    async def _post_with(self, client: httpx.AsyncClient, body: dict) -> httpx.Response:
        # One retry when the connection failed before any answer: a kept-alive
        # connection the server has just closed, or a reset from a full accept
        # queue. Asking again is harmless, the request changes nothing.
        for attempt in range(RETRIES + 1):
            try:
                return await client.post(self.url, json=body)
            except httpx.TimeoutException:
                raise
            except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if attempt == RETRIES:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def authenticate(self, token: str, document_name: str, caller: object = None) -> Decision:
        """Rails' decision. `caller` (the socket) shares the clients fairly
        with other callers; the wait for its turn is not bounded here (each
        call ahead is, by the timeout), the call itself is."""
        if self.url is None:
            return Decision(False, detail="no rails url", cause=RAILS_UNREACHABLE)
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return Decision(False, detail="empty or oversized token", cause=INVALID_TOKEN)
        body = {"user_secret": token, "document_name": document_name}
        caller = object() if caller is None else caller
        await self.share.acquire(caller)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                response = await self._post(body)
        except (TimeoutError, httpx.TimeoutException):
            log.warning("rails auth timed out", extra={"document": document_name})
            return Decision(False, detail="timeout", cause=RAILS_TIMEOUT)
        except httpx.HTTPError as exc:
            log.warning(
                "rails unreachable for auth", extra={"document": document_name, "error": type(exc).__name__}
            )
            return Decision(False, detail="unreachable", cause=RAILS_UNREACHABLE)
        finally:
            self.share.release(caller)
        if response.status_code != 200:
            return Decision(False, detail=f"rails answered {response.status_code}", cause=RAILS_DENIED)
        return Decision(True, scope=_scope_from_body(response), cause=ALLOWED)
