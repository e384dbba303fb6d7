"""The private names of other libraries that our code still relies on, each
checked against the installed release, so that an upgrade fails here, first
and loudly, naming our file that depends on it.

CONTRACTS below is the complete list (a test keeps it so: any `obj._name`
in libs/*/src or services/*/src that our code does not define must be
listed, and every listed name must still be used by the files listed).
Names without a leading underscore that are still internal (uvicorn's
Config.loaded_app, ServerState, the protocol-class constructor) cannot be
found that way; they are listed by hand and checked all the same.

When a test here fails after an upgrade: fix the named file (or cap the
library below the release in its pyproject.toml), then `make lock`. The
pyproject floors passed this module too (uvicorn 0.30.0, redis-py 5.3.0).
`send.__self__` (collab's app.py) is not listed: that is our own protocol,
wsserver.py's LeanWebSocketProtocol, whose DETACH extension documents it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn
from channels_common.server import _Server
from channels_common.wsserver import LeanWebSocketProtocol

from tests.support import until

ROOT = Path(__file__).resolve().parent.parent
WSSERVER = "libs/common/src/channels_common/wsserver.py"
SERVER = "libs/common/src/channels_common/server.py"
REDIS = "libs/common/src/channels_common/redis.py"
HTTPSERVER = "services/records/src/channels_records/httpserver.py"
RENDER = "services/bots/src/channels_bots/render.py"
HTTPHEAD = "libs/common/src/channels_common/httphead.py"


def _sources() -> list[Path]:
    roots = [ROOT / "libs/common/src", ROOT / "libs/dev/src", *sorted((ROOT / "services").glob("*/src"))]
    return [f for r in roots for f in sorted(r.rglob("*.py"))]


def _calls_without_arguments(method: str) -> tuple[str, ...]:
    """Our files that call `<something>.<method>()` with no arguments."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
                    and not node.args and not node.keywords):
                found.append(str(path.relative_to(ROOT)))
                break
    return tuple(found)


@dataclass(frozen=True)
class Contract:
    name: str  # the library's name, as its users spell it
    attr: str  # the attribute our code reads (what the source scan looks for)
    files: tuple[str, ...]  # our files that depend on it

    def broken(self, detail: str) -> str:
        return (f"{self.name} changed ({detail}): {', '.join(self.files)} depend(s) on it. "
                f"Fix that code, or cap the library below this release, then `make lock`.")


CONTRACTS = {c.name: c for c in (
    # uvicorn: wsserver.py is a protocol class for Config(ws=...); server.py
    # subclasses Server.
    Contract("uvicorn.Config.loaded_app", "loaded_app", (WSSERVER,)),
    Contract("uvicorn.Config.root_path", "root_path", (WSSERVER,)),
    Contract("uvicorn.Config.asgi_version", "asgi_version", (WSSERVER,)),
    Contract("uvicorn.Config.ws_max_size", "ws_max_size", (WSSERVER,)),
    Contract("uvicorn.Config.timeout_graceful_shutdown", "timeout_graceful_shutdown", (SERVER,)),
    Contract("uvicorn ServerState.connections", "connections", (WSSERVER,)),
    Contract("uvicorn ServerState.tasks", "tasks", (WSSERVER,)),
    Contract("uvicorn ServerState.default_headers", "default_headers", (WSSERVER,)),
    Contract("uvicorn ws protocol class (config=, server_state=, app_state=; connection_made, data_received)",
             "server_state", (WSSERVER, HTTPSERVER)),
    # records' HTTP protocol is a class for Config(http=...); it serves the
    # whole port itself and builds the websocket class (above) itself.
    Contract("uvicorn http protocol class (config=, server_state=, app_state=)", "server_state", (HTTPSERVER,)),
    Contract("uvicorn connection.shutdown() on stop", "shutdown", (WSSERVER,)),
    # collab's request-head deadline subclasses uvicorn's httptools protocol
    # and hooks the parser callbacks that begin and end a head.
    Contract("uvicorn HttpToolsProtocol (connection_made/lost, on_message_begin, on_headers_complete, transport)",
             "HttpToolsProtocol", (HTTPHEAD,)),
    Contract("uvicorn.Server.shutdown(sockets=None)", "shutdown", (SERVER,)),
    Contract("uvicorn.Server.servers", "servers", (SERVER,)),
    # redis-py (and asyncio's StreamReader): RespConnection takes a
    # connection over from redis-py once it is set up.
    Contract("redis.asyncio.Connection._reader", "_reader", (REDIS,)),
    Contract("redis.asyncio.Connection._writer", "_writer", (REDIS,)),
    Contract("asyncio.StreamReader._buffer", "_buffer", (REDIS,)),
    # The stdlib's HTML parser: what it holds back after feed() (bots' render.py).
    Contract("html.parser.HTMLParser.rawdata (the unparsed rest after feed)", "rawdata", (RENDER,)),
    # Since redis-py 5.3 (the floor in the pyproject files).
    Contract("redis.asyncio.ConnectionPool.get_connection() without arguments", "get_connection",
             _calls_without_arguments("get_connection")),
)}


WS_CLASS = "uvicorn ws protocol class (config=, server_state=, app_state=; connection_made, data_received)"


@contextmanager
def breaks(*names: str):
    """Any error but a failed assertion inside is one of these contracts broken."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 -- reported, with our file named, as a failure
        files = sorted({f for n in names for f in CONTRACTS[n].files})
        pytest.fail(Contract(" / ".join(names), "", tuple(files)).broken(f"{type(exc).__name__}: {exc}"))


async def _asgi_app(scope, receive, send):
    return None


def _config(**options) -> uvicorn.Config:
    options = {"ws": LeanWebSocketProtocol, "http": "httptools", **options}
    with breaks(WS_CLASS, "uvicorn.Config.timeout_graceful_shutdown", "uvicorn.Config.loaded_app"):
        config = uvicorn.Config(_asgi_app, host="127.0.0.1", port=0, lifespan="off", log_config=None, **options)
        config.load()
    return config


@asynccontextmanager
async def _serving(server):
    """The uvicorn server, started within 10 s for the block, then stopped."""
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not serving.done(), serving.exception()
                await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


# --- uvicorn ------------------------------------------------------------------


def test_uvicorn_config_has_what_the_websocket_protocol_reads():
    config = _config(ws_max_size=12345, root_path="/base", timeout_graceful_shutdown=3)
    c = CONTRACTS
    assert callable(getattr(config, "loaded_app", None)), c["uvicorn.Config.loaded_app"].broken("no loaded_app after load()")
    assert getattr(config, "root_path", None) == "/base", c["uvicorn.Config.root_path"].broken("root_path")
    assert getattr(config, "asgi_version", None) == "3.0", c["uvicorn.Config.asgi_version"].broken("asgi_version")
    assert getattr(config, "ws_max_size", None) == 12345, c["uvicorn.Config.ws_max_size"].broken("ws_max_size")
    assert getattr(config, "timeout_graceful_shutdown", None) == 3, \
        c["uvicorn.Config.timeout_graceful_shutdown"].broken("timeout_graceful_shutdown")


async def test_uvicorn_builds_a_websocket_protocol_the_way_ours_expects():
    """An HTTP Upgrade reaching uvicorn's httptools protocol (the one
    server.py selects) builds our class with these keywords, hands it the
    transport, then the request bytes, then makes it the transport's protocol."""
    contract = CONTRACTS[WS_CLASS]
    calls = []

    class Recorder(LeanWebSocketProtocol):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            calls.append(("init", args, sorted(kwargs)))
            super().__init__(*args, **kwargs)

        def connection_made(self, transport):
            calls.append(("connection_made", transport))

        def data_received(self, data):
            calls.append(("data_received", data))

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.protocol = None

        def get_extra_info(self, name, default=None):
            return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

        def set_protocol(self, protocol):
            self.protocol = protocol

        def write(self, data):
            pass

        def is_closing(self):
            return False

        def close(self):
            pass

    config = _config(ws=Recorder)
    transport = Transport()
    request = (b"GET /ws?x=1 HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with breaks(WS_CLASS):
        state = uvicorn.Server(config).server_state
        # uvicorn's own http protocol (collab's), as uvicorn builds it.
        http = config.http_protocol_class(config=config, server_state=state, app_state={})
        http.connection_made(transport)
        http.data_received(request)

    assert [c[0] for c in calls] == ["init", "connection_made", "data_received"], contract.broken(f"calls {calls}")
    assert calls[0][1] == () and calls[0][2] == ["app_state", "config", "server_state"], \
        contract.broken(f"constructor arguments {calls[0][1:]}")
    assert calls[1][1] is transport, contract.broken("connection_made got another transport")
    assert calls[2][1].startswith(b"GET /ws?x=1 HTTP/1.1\r\n") and b"sec-websocket-key" in calls[2][1].lower(), \
        contract.broken(f"the request is not replayed to the protocol: {calls[2][1]!r}")
    assert isinstance(transport.protocol, Recorder), contract.broken("the transport is not handed to the protocol")


async def test_uvicorn_server_state_and_shutdown_are_as_server_py_and_wsserver_expect():
    """A real Server started on a free port: `servers` holds the listeners,
    ServerState has the collections wsserver.py adds itself to, and
    shutdown(sockets) runs our on_stop with listeners closed before it asks
    each connection to shutdown()."""
    c = CONTRACTS
    params = inspect.signature(uvicorn.Server.shutdown).parameters
    assert list(params) == ["self", "sockets"] and params["sockets"].default is None, \
        c["uvicorn.Server.shutdown(sockets=None)"].broken(f"signature {list(params)}")

    events = []

    class Connection:
        def shutdown(self):
            events.append("connection.shutdown")
            server.server_state.connections.discard(self)  # as connection_lost does

    server = _Server(_config(timeout_graceful_shutdown=2))

    async def on_stop():
        events.append(("on_stop", [s.is_serving() for s in server.servers]))

    server.on_stop = on_stop
    state = server.server_state
    for attr, kind in (("connections", set), ("tasks", set), ("default_headers", list)):
        assert isinstance(getattr(state, attr, None), kind), \
            c[f"uvicorn ServerState.{attr}"].broken(f"{attr} is {type(getattr(state, attr, None))}")
    with breaks("uvicorn.Server.servers", "uvicorn.Server.shutdown(sockets=None)"):
        async with _serving(server):
            servers = getattr(server, "servers", None)
            assert servers and all(isinstance(s, asyncio.Server) and s.sockets for s in servers), \
                c["uvicorn.Server.servers"].broken(f"servers is {servers!r}")
            assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in state.default_headers), \
                c["uvicorn ServerState.default_headers"].broken(f"{state.default_headers!r}")
            state.connections.add(Connection())
    assert events == [("on_stop", [False] * len(servers)), "connection.shutdown"], \
        c["uvicorn connection.shutdown() on stop"].broken(f"shutdown order {events}")


async def test_uvicorn_builds_the_http_protocol_class_with_these_keywords():
    contract = CONTRACTS["uvicorn http protocol class (config=, server_state=, app_state=)"]
    built = asyncio.get_running_loop().create_future()

    class Recorder(asyncio.Protocol):
        def __init__(self, *args, **kwargs):
            if not built.done():
                built.set_result((args, sorted(kwargs)))

    server = uvicorn.Server(_config(http=Recorder, timeout_graceful_shutdown=1))
    with breaks(contract.name):
        async with _serving(server):
            async with asyncio.timeout(10):
                port = server.servers[0].sockets[0].getsockname()[1]
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                args, keywords = await built
            writer.close()
    # httpserver.py also takes the optional `_loop` uvicorn passes.
    assert args == () and set(keywords) - {"_loop"} == {"app_state", "config", "server_state"}, \
        contract.broken(f"built with {args} {keywords}")


async def test_uvicorn_httptools_protocol_calls_the_head_hooks_as_the_guard_expects():
    from channels_common.httphead import HeadGuard, guarded_httptools

    contract = CONTRACTS["uvicorn HttpToolsProtocol (connection_made/lost, on_message_begin, on_headers_complete, "
                         "transport)"]
    guard = HeadGuard(30, 10)

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    with breaks(contract.name):
        config = uvicorn.Config(ok, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                http=guarded_httptools(guard), timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    with breaks(contract.name):
        async with _serving(server):
            async with asyncio.timeout(10):
                port = server.servers[0].sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await until(lambda: len(guard) == 1, 5)  # from connection_made
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
                await asyncio.sleep(0.05)
                assert len(guard) == 1, contract.broken("a head begun is not in the guard")
                writer.write(b"\r\n")
                await until(lambda: len(guard) == 0, 5)  # on_headers_complete
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"GET / HTTP/1.1\r\n")  # the next head of a kept-alive connection
                await until(lambda: len(guard) == 1, 5)  # on_message_begin
                writer.close()
                await until(lambda: len(guard) == 0, 5)  # connection_lost


# --- redis-py -------------------------------------------------------------------


def test_get_connection_takes_no_arguments():
    for pool in (aioredis.ConnectionPool, aioredis.BlockingConnectionPool):
        required = [p.name for p in list(inspect.signature(pool.get_connection).parameters.values())[1:]
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert required == [], CONTRACTS["redis.asyncio.ConnectionPool.get_connection() without arguments"].broken(
            f"{pool.__name__}.get_connection requires {required}")


async def test_a_connected_redis_connection_has_the_stream_pair_redis_py_reads(redis_url):
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=1)
    try:
        with breaks("redis.asyncio.ConnectionPool.get_connection() without arguments"):
            conn = await pool.get_connection()
        assert conn.is_connected
        reader, writer = getattr(conn, "_reader", None), getattr(conn, "_writer", None)
        assert isinstance(reader, asyncio.StreamReader), \
            CONTRACTS["redis.asyncio.Connection._reader"].broken(f"_reader is {type(reader)}")
        assert isinstance(writer, asyncio.StreamWriter) and isinstance(writer.transport, asyncio.Transport), \
            CONTRACTS["redis.asyncio.Connection._writer"].broken(f"_writer is {type(writer)}")
        # The stream's protocol feeds the reader: taking the transport over
        # (set_protocol) is what stops redis-py from reading.
        assert isinstance(writer.transport.get_protocol(), asyncio.StreamReaderProtocol), \
            CONTRACTS["redis.asyncio.Connection._writer"].broken("its transport is not read through a StreamReader")
        assert isinstance(reader._buffer, bytearray) and len(reader._buffer) == 0, \
            CONTRACTS["asyncio.StreamReader._buffer"].broken(f"after connect: {reader._buffer!r}")
        await pool.release(conn)
    finally:
        await pool.disconnect()


def test_stream_reader_keeps_unread_bytes_in_a_bytearray_buffer():
    reader = asyncio.StreamReader(loop=asyncio.new_event_loop())
    reader.feed_data(b"+OK\r\n")
    buffer = getattr(reader, "_buffer", None)
    assert isinstance(buffer, bytearray) and bytes(buffer) == b"+OK\r\n", \
        CONTRACTS["asyncio.StreamReader._buffer"].broken(f"{buffer!r}")
    buffer.clear()
    assert reader._buffer == b"", CONTRACTS["asyncio.StreamReader._buffer"].broken("not cleared in place")


def test_html_parser_holds_back_an_unterminated_tag_in_rawdata():
    from html.parser import HTMLParser

    contract = CONTRACTS["html.parser.HTMLParser.rawdata (the unparsed rest after feed)"]
    with breaks(contract.name):
        parser = HTMLParser(convert_charrefs=True)
        parser.feed("text <b>bold</b> <a href='x")
        rest = parser.rawdata
    assert rest == "<a href='x", contract.broken(f"rawdata after feed: {rest!r}")
    parser.reset()
    assert parser.rawdata == "", contract.broken("reset() keeps rawdata")


# --- the list stays complete --------------------------------------------------------


def _scan() -> tuple[set[str], dict[str, set[str]]]:
    """(names our code defines, {attribute read: our files reading it})."""
    defined: set[str] = set()
    reads: dict[str, set[str]] = {}
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute):
                if isinstance(node.ctx, ast.Store):
                    defined.add(node.attr)
                else:
                    reads.setdefault(node.attr, set()).add(rel)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                defined.add(node.value)  # __slots__ entries
    return defined, reads


def test_every_private_name_of_another_library_we_read_is_listed_here():
    defined, reads = _scan()
    foreign = {name: sorted(files) for name, files in reads.items()
               if name.startswith("_") and not name.startswith("__") and name not in defined}
    listed = {c.attr for c in CONTRACTS.values()}
    unlisted = {name: files for name, files in foreign.items() if name not in listed}
    assert unlisted == {}, ("private names of other libraries read by our code but not checked in "
                            f"{Path(__file__).name}: add a Contract and a test for each: {unlisted}")


def test_every_listed_name_is_still_used_by_the_files_listed():
    _, reads = _scan()
    stale = {c.name: c.files for c in CONTRACTS.values()
             if not all((ROOT / f).exists() and re.search(rf"\b{c.attr}\b", (ROOT / f).read_text())
                        for f in c.files)}
    assert stale == {}, f"no longer used where listed: update CONTRACTS in {Path(__file__).name}: {stale}"
    private_users = {c.attr: set(c.files) for c in CONTRACTS.values() if c.attr.startswith("_")}
    spread = {attr: sorted(reads.get(attr, set()) - files) for attr, files in private_users.items()
              if reads.get(attr, set()) - files}
    assert spread == {}, f"private names now read in more files: list them in CONTRACTS: {spread}"


@pytest.mark.parametrize("pyproject, library", [
    ("libs/common/pyproject.toml", "uvicorn"), ("libs/common/pyproject.toml", "redis"),
    ("services/records/pyproject.toml", "uvicorn"), ("services/records/pyproject.toml", "redis"),
    ("services/collab/pyproject.toml", "uvicorn"), ("services/collab/pyproject.toml", "pycrdt"),
    ("services/bots/pyproject.toml", "uvicorn"), ("services/bots/pyproject.toml", "redis"),
])
def test_libraries_whose_internals_we_use_are_capped(pyproject, library):
    """An upper bound on each, so that no routine install moves past the
    releases these tests have seen."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / pyproject).read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == library]
    assert any(s.operator in ("<", "~=") for s in req.specifier), f"{pyproject}: {req} has no upper bound"
