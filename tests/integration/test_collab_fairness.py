"""Anonymous sockets against everyone's logins: a real provider logs in
beside raw sockets that each ask Rails about a hundred documents it answers
slowly, then hang up. The Rails stand-in is a real HTTP server; what is
asserted is counts and order of the calls it receives, never wall time."""

from __future__ import annotations

import itertools
import random
import socket
import struct

import pytest
from channels_collab import protocol as p

from tests.integration.collab_helpers import Provider, RailsStandIn, RawClient, start_collab, token
from tests.support import wait_for

pytestmark = pytest.mark.slow

PREFIX = "t-fair:"
HOSTILE_SOCKETS = 10
DOCUMENTS_EACH = 300  # well past the 100 pending documents that pause reading, for the whole test
_ids = itertools.count(random.Random(__name__).randint(10, 90) * 100_000)


def doc_name() -> str:
    return f"comment-{next(_ids)}-body"


def hang_up(client: RawClient, reset: bool) -> None:
    """Gone without a closing handshake: an RST, or a FIN."""
    sock = client.ws.socket
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_abandoned_sockets_neither_starve_a_login_nor_keep_calling_rails(redis_url):
    rails = RailsStandIn(slow_seconds=2.0).start()  # user 504: answered after 2 s
    service = start_collab(rails.url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, COLLAB_AUTH_TIMEOUT_SECONDS="10")
    ws_url = f"ws://127.0.0.1:{service.port}"
    hostile, tab = [], None

    def slow_calls() -> int:
        return sum(1 for r in list(rails.requests) if str(r.get("user_secret")).startswith("504,"))

    try:
        for _ in range(HOSTILE_SOCKETS):
            client = RawClient(ws_url)
            hostile.append(client)
            for _ in range(DOCUMENTS_EACH):
                client.send(p.encode_token(doc_name(), "504,slow"))
        # Every one of the 32 Rails clients is busy with a slow, hostile call.
        wait_for(lambda: rails.in_flight >= 32, 10, what="the Rails pool taken by hostile calls")
        wait_for(lambda: service.logs().count("pre-auth limits reached; reading paused") >= HOSTILE_SOCKETS, 10,
                 what="every hostile socket paused")

        asked_before = len(rails.requests)
        tab = Provider("v4", ws_url)
        legit = doc_name()
        tab.attach(legit, token("1"))
        tab.authenticated(legit, timeout=30)
        served_at = rails.names_asked().index(legit)
        # Served in its turn: after at most about one call per other socket,
        # not behind the hundreds queued before it.
        assert served_at - asked_before <= 2 * HOSTILE_SOCKETS, (served_at, asked_before)

        # From now on Rails takes 30 s over each slow call: once only such
        # calls are in flight, the hostile sockets leave without a word while
        # their reading is paused, half with an RST, half with a FIN.
        rails.slow_seconds = 30.0
        mark = len(rails.requests)
        def only_long_calls() -> bool:
            with rails.lock:
                return len(rails.deciding) >= 32 and min(rails.deciding) >= mark

        wait_for(only_long_calls, 10, what="the Rails pool busy with 30 s hostile calls")
        for i, client in enumerate(hostile):
            hang_up(client, reset=i % 2 == 0)
        at_hang_up = slow_calls()
        # collab notices (it looks for hung-up peers every second) and
        # cancels their auths: every call Rails is deciding is abandoned,
        # long before it would be answered...
        wait_for(lambda: rails.in_flight == 0, 15, what="the abandoned sockets' calls cancelled")
        assert not [i for i in rails.answered_slowly if i >= mark]
        # ...and none is made any more. The service serves on (a login beside
        # them round-trips), and still nothing is asked for those sockets.
        settled = slow_calls()
        assert settled - at_hang_up <= 4 * HOSTILE_SOCKETS, (at_hang_up, settled)
        second = doc_name()
        tab.attach(second, token("1"))
        tab.authenticated(second, timeout=10)
        wait_for(lambda: rails.in_flight == 0, 10, what="Rails idle")
        assert slow_calls() == settled
        assert service.process.poll() is None
        assert "peers hung up while their reading was paused" in service.logs()
    finally:
        if tab is not None:
            tab.close()
        for client in hostile:
            client.close()
        service.stop()
        rails.stop()
