"""One client WebSocket: several documents multiplexed on it, each with its
own auth state, and the limits that keep a hostile socket cheap.

Before a document's auth completes its frames are queued, within the
bounds Hocuspocus uses (5 MiB, 1,000 messages, 100 pending documents per
socket). Reaching one stops reading the socket until pending auths finish:
TCP holds the client back, and a legitimate client (500 documents on one
socket) is never refused. A paused socket whose peer hangs up is found by
the service's sweep (wsserver.abort_hung_up) and its auths are cancelled;
its Rails calls share the pool fairly with other sockets' (rails.py). A socket that authenticates no document by an
absolute deadline is closed with 4408, after every auth still pending got
PermissionDenied. Liveness of authenticated sockets is RFC 6455 pings
(`KeepAlive`, run by the service's sweep), not an idle timeout. A malformed
frame closes the socket with 1002 and a log line; an oversized one with 1009.

`receive` is synchronous: frames of one socket are handled strictly in order
and a document's queue is drained in one go once Rails says yes, so nothing
can slip between Authenticated and the queued SyncStep1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from channels_common.closecodes import CONNECTION_TIMEOUT, MESSAGE_TOO_BIG, PROTOCOL_ERROR
from channels_common.tasks import spawn

from . import protocol as p
from .documents import BadUpdate, DocumentRegistry, LiveDocument
from .metrics import CollabMetrics
from .names import valid_document_name
from .rails import DENIED_REASON, Decision

log = logging.getLogger("channels.collab.connection")


class Transport(Protocol):
    def send(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...


# The reason this module pauses a socket's reading (see Transport).
PAUSED_FOR_AUTH = "pending-auth"


class Authenticator(Protocol):
    def authenticate(self, token: str, document_name: str, caller: object = None) -> Awaitable[Decision]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_seconds: float = 30.0
    max_frame_bytes: int = 10 * 1024 * 1024
    max_queue_bytes: int = 5 * 1024 * 1024
    max_queue_messages: int = 1000
    max_pending_documents: int = 100
    broadcast_stateless: bool = False


@dataclass(slots=True)
class _Pending:
    queue: list = field(default_factory=list)
    size: int = 0
    task: asyncio.Task | None = None


class Session:
    """An authenticated document on this socket: the registry's peer."""

    __slots__ = ("address", "connection", "doc", "name", "readonly")

    def __init__(self, connection: Connection, address: str, name: str, readonly: bool):
        self.connection = connection
        self.address = address
        self.name = name
        self.readonly = readonly
        self.doc: LiveDocument | None = None

    def send(self, frame: bytes) -> None:
        self.connection.transport.send(frame)

    def pause(self, reason: str) -> None:
        self.connection.transport.pause_reading(reason)

    def resume(self, reason: str) -> None:
        self.connection.transport.resume_reading(reason)


_KIND_NAMES = {
    p.ConnectionPing: "connection_ping",
    p.ConnectionPong: "connection_pong",
    p.Sync: "sync",
    p.Awareness: "awareness",
    p.Token: "auth",
    p.AuthReply: "auth",
    p.QueryAwareness: "query_awareness",
    p.Stateless: "stateless",
    p.BroadcastStateless: "broadcast_stateless",
    p.Close: "close",
    p.SyncStatus: "sync_status",
    p.DocumentPing: "ping",
    p.Unknown: "unknown",
}


class Connection:
    # Slots: one per socket, thousands at once; a dict each would cost more.
    __slots__ = (
        "_pinged_for", "answers_ping", "authenticated_once", "authenticator", "clock", "closed", "last_received",
        "limits", "metrics", "opened_at", "paused_for_auth", "pending", "queued_bytes", "queued_messages",
        "registry", "sessions", "transport",
    )

    def __init__(
        self,
        transport: Transport,
        registry: DocumentRegistry,
        authenticator: Authenticator,
        limits: Limits = Limits(),
        metrics: CollabMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.transport = transport
        self.registry = registry
        self.authenticator = authenticator
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.pending: dict[str, _Pending] = {}
        self.queued_bytes = 0
        self.queued_messages = 0
        self.opened_at = self.last_received = clock()
        self.authenticated_once = False
        # v4 providers say their version in Auth; only they understand Ping.
        self.answers_ping = False
        self._pinged_for: float | None = None
        self.paused_for_auth = False
        self.closed = False

    # --------------------------------------------------------------- input

    def receive(self, frame: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.clock()
        if len(frame) > self.limits.max_frame_bytes:
            log.warning("frame over the size limit", extra={"size": len(frame)})
            self.close(MESSAGE_TOO_BIG, "Message Too Big")
            return
        try:
            msg = p.decode(frame)
        except p.HocuspocusProtocolError as exc:
            self.malformed(str(exc), len(frame))
            return
        if self.metrics:
            self.metrics.frame(_KIND_NAMES.get(type(msg), "unknown"))
        if isinstance(msg, p.ConnectionPing):
            self.transport.send(p.PONG_FRAME)
            return
        if isinstance(msg, p.ConnectionPong):
            return
        session = self.sessions.get(msg.address)
        if session is not None:
            self._dispatch(session, msg)
        else:
            self._before_auth(msg, len(frame))

    def malformed(self, why: str, size: int = 0) -> None:
        log.warning("malformed frame; closing the socket", extra={"error": why, "size": size})
        self.close(PROTOCOL_ERROR, "Malformed frame")

    # ------------------------------------------------------ pre-auth queue

    def _before_auth(self, msg: p.Message, size: int) -> None:
        address = msg.address
        pending = self.pending.get(address)
        if pending is None:
            name, _session = p.split_address(address)
            if not valid_document_name(name):
                self._refuse_name(msg, name)
                return
            pending = self.pending[address] = _Pending()
        if isinstance(msg, p.Close):
            # The provider was destroyed before its auth completed.
            pending = self._release(address)
            if pending.task is not None and not pending.task.done():
                pending.task.cancel()
            self._resume_if_below_limits()
            return
        if isinstance(msg, p.Token) and pending.task is None:
            if msg.provider_version is not None:
                self.answers_ping = True
            name, _session = p.split_address(address)
            pending.task = spawn(self._authenticate(address, name, msg.token), name="collab-auth")
        else:
            # Frames of one read already parsed are kept even past a limit
            # (the overshoot is bounded by a read and a frame): nothing
            # accepted is dropped, reading just stops below.
            pending.queue.append(msg)
            pending.size += size
            self.queued_bytes += size
            self.queued_messages += 1
        if not self.paused_for_auth and self._over_limits():
            log.info(
                "pre-auth limits reached; reading paused until pending auths finish",
                extra={"pending": len(self.pending), "queued_bytes": self.queued_bytes,
                       "queued_messages": self.queued_messages},
            )
            self.paused_for_auth = True
            self.transport.pause_reading(PAUSED_FOR_AUTH)

    def _over_limits(self) -> bool:
        limits = self.limits
        return (
            len(self.pending) >= limits.max_pending_documents
            or self.queued_bytes >= limits.max_queue_bytes
            or self.queued_messages >= limits.max_queue_messages
        )

    def _resume_if_below_limits(self) -> None:
        if self.paused_for_auth and not self.closed and not self._over_limits():
            self.paused_for_auth = False
            self.transport.resume_reading(PAUSED_FOR_AUTH)

    def _refuse_name(self, msg: p.Message, name: str) -> None:
        if isinstance(msg, p.Token):
            log.warning("document name refused", extra={"document": name[:120]})
            if self.metrics:
                self.metrics.auth_refused_name()
            self.transport.send(p.encode_permission_denied(msg.address, DENIED_REASON))
        # Anything else for a refused name can never be served: dropped.

    def _release(self, address: str) -> _Pending | None:
        pending = self.pending.pop(address, None)
        if pending is not None:
            self.queued_bytes -= pending.size
            self.queued_messages -= len(pending.queue)
        return pending

    async def _authenticate(self, address: str, name: str, token: str) -> None:
        try:
            # This socket is the caller: Rails' clients are shared fairly
            # between sockets, a few calls each at a time (rails.py).
            decision = await self.authenticator.authenticate(token, name, caller=self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("auth failed unexpectedly", extra={"document": name})
            decision = Decision(False, detail="error")
        if self.closed:
            return
        if decision.allowed:
            # Loaded (from Redis) before Authenticated: the first sync sees
            # the latest state. Frames keep queuing meanwhile.
            await self.registry.prepare(name)
            if self.closed:
                return
        pending = self._release(address)
        if pending is None:
            return
        self._resume_if_below_limits()
        if not decision.allowed:
            log.info("document denied", extra={"document": name, "reason": decision.detail})
            if self.metrics:
                self.metrics.auth_decided(decision)
            # Its queued frames go with it; a later Token starts afresh.
            self.transport.send(p.encode_permission_denied(address, DENIED_REASON))
            return
        if self.metrics:
            self.metrics.auth_decided(decision)
        self.authenticated_once = True
        self.transport.send(p.encode_authenticated(address, decision.scope))
        session = Session(self, address, name, decision.readonly)
        self.sessions[address] = session
        session.doc = self.registry.open(name, session)
        for msg in pending.queue:
            if self.closed or address not in self.sessions:
                break
            self._dispatch(session, msg)

    # ------------------------------------------------------- authenticated

    def _dispatch(self, session: Session, msg: p.Message) -> None:
        doc = session.doc
        try:
            if isinstance(msg, p.Sync):
                self.registry.sync(doc, session, msg)
            elif isinstance(msg, p.Awareness):
                self.registry.awareness(doc, session, msg.update)
            elif isinstance(msg, p.QueryAwareness):
                self.registry.query_awareness(doc, session)
            elif isinstance(msg, p.Stateless):
                log.debug("stateless message", extra={"document": session.name, "size": len(msg.payload)})
                if self.limits.broadcast_stateless:
                    self.registry.stateless(doc, session, msg.payload)
            elif isinstance(msg, p.Close):
                self._end_session(session, notify=None)
            elif isinstance(msg, p.BroadcastStateless):
                log.warning("BroadcastStateless from a client refused", extra={"document": session.name})
                self._end_session(session, notify="BroadcastStateless is not accepted from clients")
            elif isinstance(msg, p.Token):
                log.debug("token for an authenticated document ignored", extra={"document": session.name})
            elif isinstance(msg, p.DocumentPing):
                pass
            else:
                log.warning(
                    "message type not accepted from clients; dropped",
                    extra={"document": session.name, "type": type(msg).__name__},
                )
        except (BadUpdate, p.HocuspocusProtocolError) as exc:
            self.malformed(f"{type(msg).__name__}: {exc}")

    def _end_session(self, session: Session, notify: str | None) -> None:
        if self.sessions.pop(session.address, None) is None:
            return
        if notify is not None:
            self.transport.send(p.encode_close(session.address, notify))
        if session.doc is not None:
            self.registry.leave(session.doc, session)

    # ------------------------------------------------------------- timers

    def check(self, now: float | None = None) -> None:
        """Called periodically: the pre-auth deadline and, for v4 providers,
        a protocol Ping once the socket has been quiet for half the timeout."""
        if self.closed:
            return
        now = self.clock() if now is None else now
        timeout = self.limits.timeout_seconds
        if not self.authenticated_once:
            if now - self.opened_at > timeout:
                self._deny_pending_at_deadline()
                log.info("socket never authenticated a document; closing it")
                self.close(CONNECTION_TIMEOUT, "Connection Timeout")
            return
        if self.answers_ping and now - self.last_received > timeout / 2 and self._pinged_for != self.last_received:
            self._pinged_for = self.last_received
            self.transport.send(p.PING_FRAME)

    def _deny_pending_at_deadline(self) -> None:
        """An auth Rails has not answered by the socket's deadline is denied
        before the socket closes, so the provider hears authenticationFailed
        instead of reconnecting into the same wait forever."""
        for address, pending in list(self.pending.items()):
            if pending.task is None:
                continue  # no Token yet: nothing was asked
            if not pending.task.done():
                pending.task.cancel()
            self._release(address)
            name, _session = p.split_address(address)
            log.warning("auth did not finish before the connection deadline; denied", extra={"document": name})
            if self.metrics:
                self.metrics.auth_timed_out()
            self.transport.send(p.encode_permission_denied(address, DENIED_REASON))

    # ------------------------------------------------------------ teardown

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        if self.metrics:
            self.metrics.closed(code)
        self.transport.close(code, reason)
        self.disconnected()

    def disconnected(self) -> None:
        """The socket is gone (or going): leave every document, drop queues."""
        self.closed = True
        for address in list(self.pending):
            pending = self._release(address)
            if pending and pending.task is not None and not pending.task.done():
                pending.task.cancel()
        for session in list(self.sessions.values()):
            self._end_session(session, notify=None)
