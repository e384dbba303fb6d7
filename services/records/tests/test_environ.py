"""What a websocket connection keeps of its request for its whole life."""

from channels_records.engine import translate_request


async def test_a_websocket_environ_keeps_only_what_engineio_reads():
    scope = {
        "type": "websocket",
        "path": "/socket.io/",
        "raw_path": b"/socket.io/",
        "query_string": b"EIO=4&transport=websocket&channel_token=secret",
        "headers": [(b"host", b"example.org"), (b"origin", b"https://example.org"), (b"cookie", b"x" * 2000)],
        "client": ("127.0.0.1", 5555),
        "extensions": {"channels.websocket.detach": {}},
    }

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        pass

    environ = await translate_request(scope, receive, send)
    assert environ["QUERY_STRING"] == "EIO=4&transport=websocket&channel_token=secret"
    assert environ["HTTP_ORIGIN"] == "https://example.org"
    assert "HTTP_COOKIE" not in environ  # headers nobody reads later are not kept
    assert environ["asgi.scope"] == {"type": "websocket", "extensions": scope["extensions"]}
    assert environ["asgi.scope"] is not scope  # the request's headers can be freed
