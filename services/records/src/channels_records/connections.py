"""One socket's life: the CONNECT handshake (rooms joined before the reply,
or a recovered session replayed), rooms that wait for Redis, disconnects,
and keeping recovery sessions alive."""

from __future__ import annotations

import asyncio
import logging

from channels_common.auth import ChannelUser, lookup_channel_user, parse_current_user, valid_token
from channels_common.closecodes import SERVICE_RESTART
from channels_common.redis import with_backoff
from channels_common.tasks import spawn
from redis.exceptions import RedisError

from . import engineio as eio
from .broadcast import Broadcaster
from .gateway import CLIENT_DISCONNECT
from .protocol import RecoveryRequest, encode_connect, encode_event, parse_recovery
from .recovery import new_pid
from .rooms import rooms_for
from .sockets import Rooms, new_sid

log = logging.getLogger("channels.records.connections")

REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


def token_from_query(query_string: str) -> str | None:
    return eio.query_value(query_string, "channel_token")


class Connections:
    def __init__(
        self,
        engine,
        rooms: Rooms,
        broadcaster: Broadcaster,
        redis,
        metrics,
        store=None,
        *,
        lookup_timeout: float = 3.0,
        touch_interval: float = 60.0,
        order_key=None,
        relayed_offset=lambda: None,
        relayed_count=lambda: 0,
        feed=lambda: 0,
        wait_feed=None,
    ):
        self.rooms = rooms
        self.sockets = engine.sockets
        self.broadcaster = broadcaster
        self.redis = redis
        self.metrics = metrics
        self.store = store
        self.lookup_timeout = lookup_timeout
        self.touch_interval = touch_interval
        self.order_key = order_key
        self.relayed_offset = relayed_offset
        self.relayed_count = relayed_count
        # The generation of the live pub/sub subscription, None while it is
        # down: a recovery needs the same one live from its log read to its
        # CONNECT reply, or what is published meanwhile never reaches it.
        self.feed = feed
        # async (timeout) -> None: wait that long at most for the
        # subscription to be live (a restarted process, a Redis blip).
        self.wait_feed = wait_feed
        self._background: set[asyncio.Task] = set()
        # sid -> recovery pid (None when the session could not be stored).
        # Membership means "connected and counted".
        self.live: dict[str, str | None] = {}
        self.deferred: dict[str, asyncio.Task] = {}
        self.stopping = False

    # -- handshake -------------------------------------------------------

    async def connect(self, eio_sid: str, auth: object) -> None:
        sock = self.sockets.get(eio_sid)
        if sock is None or sock.closing:
            return
        if eio_sid in self.broadcaster.held:
            return  # a second CONNECT while the first is being handled
        token = token_from_query(sock.query)
        # From here on, broadcasts for this socket wait until the CONNECT
        # reply (and any replay) has been queued.
        self.broadcaster.hold(eio_sid)
        try:
            request = parse_recovery(auth)
            if request is not None and self.store is not None and await self._recover(eio_sid, token, request):
                return
            await self._connect_fresh(eio_sid, token)
        except Exception:
            # Whatever went wrong, leave nothing half-registered and let the
            # client try again on a new connection.
            log.exception("connect failed")
            sid = self.rooms.sid_of.get(eio_sid)
            if sid is not None:
                self._forget_local(sid)
                self.rooms.remove(sid)
            sock = self.sockets.get(eio_sid)
            if sock is not None:
                sock.close(eio.SERVER_CLOSE)
        finally:
            self.broadcaster.drop_held(eio_sid)

    def _gone(self, eio_sid: str) -> bool:
        sock = self.sockets.get(eio_sid)
        return sock is None or sock.closed or sock.closing

    async def _lookup(self, token: str | None) -> tuple[ChannelUser | None, bool]:
        """(user, deferred): deferred when Redis could not answer now."""
        try:
            # asyncio.timeout, not wait_for: no extra task per connect.
            async with asyncio.timeout(self.lookup_timeout):
                user = await lookup_channel_user(self.redis, token)
            return user, False
        except REDIS_FAILURES as exc:
            log.warning("token lookup deferred until redis answers", extra={"error": type(exc).__name__})
            return None, True

    async def _open(self, sid: str, token: str) -> tuple[ChannelUser | None, bool, str | None]:
        """(user, deferred, pid): the token lookup and the recovery session
        in one Redis round trip."""
        try:
            async with asyncio.timeout(self.lookup_timeout):
                pid, _, raw = await self.store.open_session(sid, token)
            return parse_current_user(raw), False, pid
        except REDIS_FAILURES as exc:
            log.warning("token lookup deferred until redis answers", extra={"error": type(exc).__name__})
            return None, True, None

    async def _connect_fresh(self, eio_sid: str, token: str | None) -> None:
        sid = new_sid()
        self.rooms.add(sid, eio_sid)
        opened = self.store is not None and valid_token(token)
        if opened:
            user, deferred, pid = await self._open(sid, token)
        else:
            user, deferred = await self._lookup(token)
            pid = None
        rooms = rooms_for(user)
        for room in rooms:
            self.rooms.enter(sid, room)
        if self.store is not None and not deferred and not opened:
            try:
                async with asyncio.timeout(self.lookup_timeout):
                    pid, _ = await self.store.create_session(sid, token, rooms)
            except REDIS_FAILURES as exc:
                log.warning("recovery session not stored", extra={"error": type(exc).__name__})
        if self._gone(eio_sid):
            self.rooms.remove(sid)
            return
        if deferred and self.store is not None:
            # The session is stored once Redis answers (_join_later); the
            # client has its pid from now on, so a later drop recovers.
            pid = new_pid()
        self.broadcaster.send_now(eio_sid, encode_connect(sid, pid))
        self._mark_live(sid, pid)
        self.broadcaster.release(eio_sid)
        log.debug("connected", extra={"sid": sid, "rooms": len(rooms), "deferred": deferred})
        if deferred:
            self.metrics.lookup_retries.inc()
            self.deferred[sid] = spawn(self._join_later(sid, token, pid), name="records-join-later")

    async def _recover(self, eio_sid: str, token: str | None, request: RecoveryRequest) -> bool:
        """Register the session again and queue its CONNECT reply, then every
        missed event of its rooms in offset order, then what was broadcast
        to it meanwhile (held; copies of replayed events skipped). False,
        with nothing left registered: the client gets a fresh session."""
        generation = self.feed()
        if generation is None and self.wait_feed is not None:
            await self.wait_feed(self.lookup_timeout)
            generation = None if self._gone(eio_sid) else self.feed()
        if generation is None:
            log.info("recovery refused", extra={"reason": "not subscribed to redis"})
            self.metrics.recoveries.labels("refused").inc()
            return False
        count = self.relayed_count()
        restored = await self._restore(eio_sid, token, request.pid, request.offset, "recovery unavailable")
        if restored is False:
            self.metrics.recoveries.labels("error").inc()
            return False
        if restored is None:
            self.metrics.recoveries.labels("refused").inc()
            return False
        sid = restored.sid
        await self._take_over(sid)
        if self._gone(eio_sid):
            return True  # nothing registered yet, nothing to undo
        # Registered as the old sid at once: a socket dropping from here on
        # is cleaned up by the gateway as usual.
        self.rooms.add(sid, eio_sid)
        for room in restored.rooms:
            self.rooms.enter(sid, room)
        missed = await self._missed_meanwhile(
            request, token, restored.missed, relayed_meanwhile=self.relayed_count() != count, eio_sid=eio_sid
        )
        if self._gone(eio_sid):
            return True  # registered: the gateway cleans it up
        if missed is None or self.feed() != generation:
            # Something may be missing from both the log reads and the held
            # packets: the second read failed, or the subscription dropped
            # (what was published while it was down reached neither).
            reason = "second log read failed" if missed is None else "redis subscription lost during the recovery"
            log.info("recovery refused", extra={"reason": reason})
            self.metrics.recoveries.labels("refused").inc()
            self.rooms.remove(sid)
            self.broadcaster.drop_held(eio_sid)
            self.broadcaster.hold(eio_sid)  # for the fresh CONNECT that follows
            return False
        self.broadcaster.send_now(eio_sid, encode_connect(sid, request.pid))
        replayed = set()
        for event in missed:
            text = encode_event(event.event, event.data.decode("utf-8"), event.offset)
            if not self.broadcaster.send_now(eio_sid, text):
                break
            replayed.add(event.offset)
        if replayed and self.order_key is not None:
            # Another instance may have logged these before this one relayed
            # them: this instance's own live copies may be still to come.
            # Skipped by offset until an event past the replay arrives.
            self.broadcaster.set_floor(eio_sid, missed[-1].offset, replayed)
        self._mark_live(sid, request.pid)
        self.broadcaster.release(eio_sid, replayed)
        self.metrics.recoveries.labels("recovered").inc()
        log.info("session recovered", extra={"sid": sid, "replayed": len(replayed)})
        return True

    async def _restore(self, eio_sid: str | None, token: str | None, pid: str, offset: str | None, failed: str):
        """The restore's log read, asked again with backoff while Redis
        says "not now" (a restarted Redis loading its AOF answers LOADING
        for seconds after the subscription is back, a stale pooled
        connection) for up to twice the lookup timeout in all. False (and
        the warning `failed`) when Redis never answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lookup_timeout * 2
        attempt = 0
        while True:
            try:
                return await asyncio.wait_for(
                    self.store.restore(pid, token, offset), max(0.05, deadline - loop.time())
                )
            except REDIS_FAILURES as exc:
                attempt += 1
                delay = min(1.0, 0.05 * 2 ** attempt)
                if (eio_sid is not None and self._gone(eio_sid)) or loop.time() + delay >= deadline:
                    log.warning(failed, extra={"error": type(exc).__name__, "attempts": attempt})
                    return False
                await asyncio.sleep(delay)

    async def _missed_meanwhile(
        self, request: RecoveryRequest, token: str | None, missed: list, relayed_meanwhile: bool = False,
        eio_sid: str | None = None,
    ) -> list | None:
        """Events this instance broadcast while the restore was reading the
        log went to the session's rooms before the socket was in them, and
        the read may have been too early for them. Every event is logged
        before it is broadcast, so a second read, now that the socket is in
        its rooms (and held), finds them. Read again when this instance
        relayed past what the first read saw, or relayed anything at all
        meanwhile (`relayed_meanwhile`: its offsets are not trusted alone).
        None when that read fails: the replay could have a hole."""
        if self.order_key is None:
            return missed
        relayed = self.relayed_offset()
        newest = missed[-1].offset if missed else request.offset
        if not relayed_meanwhile and (
            relayed is None or (newest is not None and self.order_key(relayed) <= self.order_key(newest))
        ):
            return missed
        again = await self._restore(eio_sid, token, request.pid, newest, "recovery second read failed")
        if again is None or again is False:
            return None
        seen = {event.offset for event in missed}
        return missed + [event for event in again.missed if event.offset not in seen]

    async def _take_over(self, sid: str) -> None:
        """The dropped connection of a recovering session may still be
        registered here (its loss not noticed yet): close it first."""
        old_eio = self.rooms.eio_of.get(sid)
        if old_eio is None:
            return
        sock = self.sockets.get(old_eio)
        if sock is not None:
            sock.close(eio.TRANSPORT_CLOSE, abort=True)
        if self.rooms.eio_of.get(sid) is not None:
            self.rooms.remove(sid)
        self._forget_local(sid)

    def _mark_live(self, sid: str, pid: str | None) -> None:
        if sid not in self.live:
            self.metrics.connected.inc()
        self.live[sid] = pid

    async def _join_later(self, sid: str, token: str | None, pid: str | None = None) -> None:
        """Redis could not answer at connect: the token lookup, and the
        recovery session under `pid` (sent in the CONNECT reply), once it
        does; the session is stored before the rooms are joined, so that
        anything the socket gets live is in its replay should it drop."""
        try:
            if pid is not None and valid_token(token):
                _, _, raw = await with_backoff(
                    lambda: self.store.open_session(sid, token, pid=pid), what="recovery session"
                )
                user = parse_current_user(raw)
                rooms = rooms_for(user)
            else:
                user = await with_backoff(lambda: lookup_channel_user(self.redis, token), what="token lookup")
                rooms = rooms_for(user)
                if pid is not None:
                    await with_backoff(
                        lambda: self.store.create_session(sid, token, rooms, pid=pid), what="recovery session"
                    )
        except asyncio.CancelledError:
            return
        if sid not in self.live:
            return
        for room in rooms:
            self.rooms.enter(sid, room)
        self.deferred.pop(sid, None)
        log.info("rooms joined after redis returned", extra={"sid": sid, "rooms": len(rooms), "stored": pid is not None})

    # -- disconnects and sessions ------------------------------------------

    def _forget_local(self, sid: str) -> str | None:
        task = self.deferred.pop(sid, None)
        if task is not None:
            task.cancel()
        if sid in self.live:
            self.metrics.connected.dec()
            return self.live.pop(sid)
        return None

    def disconnected(self, sid: str, reason: str) -> None:
        """Synchronous on purpose: the gateway removes the sid from its rooms
        right after this returns, and a recovering connection may be about
        to register the same sid; no await may come in between."""
        eio_sid = self.rooms.eio_of.get(sid)
        if eio_sid is not None:
            self.broadcaster.forget(eio_sid)
        pid = self._forget_local(sid)
        if pid is None or self.store is None or self.stopping:
            return
        spawn(self._session_after_disconnect(pid, reason), name="records-session-disconnect", tasks=self._background)

    async def _session_after_disconnect(self, pid: str, reason: str) -> None:
        try:
            if reason == CLIENT_DISCONNECT:
                # The client said goodbye itself: nothing to recover.
                await self.store.forget(pid)
            else:
                # The window counts from the moment the client dropped.
                await self.store.touch([pid])
        except REDIS_FAILURES as exc:
            log.warning("recovery session not updated on disconnect", extra={"error": type(exc).__name__})

    async def touch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.touch_interval)
            await self.touch_all()

    async def touch_all(self) -> None:
        if self.store is None:
            return
        pids = [pid for pid in self.live.values() if pid]
        for start in range(0, len(pids), 1000):
            try:
                await self.store.touch(pids[start:start + 1000])
            except REDIS_FAILURES as exc:
                log.warning("recovery sessions not refreshed", extra={"error": type(exc).__name__})
                return

    async def close_all(self) -> None:
        """SIGTERM: refresh every session, then close each engine.io session
        (a CLOSE packet for polling, close code 1012 for websockets), so that
        clients reconnect, to another instance if need be."""
        self.stopping = True
        try:
            # Best effort: a Redis that does not answer must not hold up the exit.
            await asyncio.wait_for(self.touch_all(), 1.0)
        except TimeoutError:
            log.warning("recovery sessions not refreshed before shutdown")
        socks = list(self.sockets.values())
        for sock in socks:
            try:
                sock.close(eio.SERVER_CLOSE, ws_code=SERVICE_RESTART)
            except Exception:
                log.exception("closing a socket failed")
        # Let pending long-polls carry the CLOSE packet out.
        await asyncio.sleep(0.2)
        log.info("sockets closed for shutdown", extra={"count": len(socks)})
