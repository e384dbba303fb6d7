"""chatbot/* payloads -> commands, and every way a payload can be refused."""

import json

import pytest
from channels_bots.messages import MAX_PAYLOAD_BYTES, Rejected, parse, transaction_id

SERVER = "https://matrix.example.org"
TOKEN = "syt_secret_token_value"


def test_test_channel_becomes_a_notice_with_the_message_as_body():
    data = json.dumps({"server": SERVER, "access_token": TOKEN, "channel": "#loomio:example.org", "message": "hi"})
    command = parse("chatbot/test", data.encode())
    assert command.kind == "test"
    assert command.fresh_client
    assert command.bot.server == SERVER and command.bot.access_token == TOKEN
    assert command.room == "#loomio:example.org"
    assert command.content == {"msgtype": "m.notice", "body": "hi"}


def test_publish_becomes_html_text_with_a_plain_body():
    html = "<p>New thread: <a href='https://loomio.example/d/1'>Budget</a></p>"
    data = {"config": {"server": SERVER + "/", "access_token": TOKEN, "channel": "!abc:example.org"},
            "payload": {"html": html}}
    command = parse("chatbot/publish", json.dumps(data).encode())
    assert command.kind == "publish" and not command.fresh_client
    assert command.bot.server == SERVER  # trailing slash dropped: one client per homeserver
    assert command.content == {
        "msgtype": "m.text",
        "format": "org.matrix.custom.html",
        "formatted_body": html,
        "body": "New thread: Budget (https://loomio.example/d/1)",
    }


def test_room_ids_without_a_server_part_are_accepted():
    # Room version 12 ids carry no server name.
    data = {"config": {"server": SERVER, "access_token": TOKEN, "channel": "!OuJpphXFeCaHGtHB0x8h9lDv5"},
            "payload": {"html": "x"}}
    assert parse("chatbot/publish", json.dumps(data).encode()).room == "!OuJpphXFeCaHGtHB0x8h9lDv5"


def test_the_transaction_id_is_the_message_itself_and_the_token_stays_hidden():
    data = json.dumps({"server": SERVER, "access_token": TOKEN, "channel": "#a:b", "message": "m"}).encode()
    first, second = parse("chatbot/test", data), parse("chatbot/test", data)
    # The same publish is the same transaction, in any instance.
    assert first.txn_id == second.txn_id == transaction_id("chatbot/test", data)
    assert first.txn_id.startswith("lc1") and len(first.txn_id) == 43
    other = json.dumps({"server": SERVER, "access_token": TOKEN, "channel": "#a:b", "message": "n"}).encode()
    assert parse("chatbot/test", other).txn_id != first.txn_id
    assert transaction_id("chatbot/publish", data) != first.txn_id
    assert TOKEN not in repr(first) and TOKEN not in first.txn_id


def _test_payload(**changes):
    base = {"server": SERVER, "access_token": TOKEN, "channel": "#a:example.org", "message": "m"}
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "channel, data, reason",
    [
        ("chatbot/other", _test_payload(), "unknown_channel"),
        ("chatbot/test", b"{not json", "not_json"),
        ("chatbot/test", b"\xff\xfe", "not_json"),
        ("chatbot/test", b"[1, 2]", "incomplete"),
        ("chatbot/test", b"null", "incomplete"),
        ("chatbot/test", _test_payload(message=...), "incomplete"),
        ("chatbot/test", _test_payload(access_token=...), "incomplete"),
        ("chatbot/test", _test_payload(server=12), "incomplete"),
        ("chatbot/test", _test_payload(server="ftp://x.org"), "invalid"),
        ("chatbot/test", _test_payload(server="https://bad host"), "invalid"),
        ("chatbot/test", _test_payload(channel="general"), "invalid"),
        ("chatbot/test", _test_payload(channel="@user:example.org"), "invalid"),
        ("chatbot/test", _test_payload(channel="#noserver"), "invalid"),
        ("chatbot/test", _test_payload(access_token=""), "invalid"),
        ("chatbot/test", _test_payload(access_token="a\nb"), "invalid"),
        ("chatbot/publish", b'{"config": {}}', "incomplete"),
        ("chatbot/publish", b'{"config": "x", "payload": {"html": "x"}}', "incomplete"),
        ("chatbot/publish", json.dumps({"config": {"server": SERVER, "access_token": TOKEN,
                                                   "channel": "#a:b"}}).encode(), "incomplete"),
        ("chatbot/publish", json.dumps({"config": {"server": SERVER, "access_token": TOKEN, "channel": "#a:b"},
                                        "payload": {"html": None}}).encode(), "incomplete"),
        ("chatbot/test", b" " * (MAX_PAYLOAD_BYTES + 1), "too_large"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason_that_never_shows_the_token(channel, data, reason):
    with pytest.raises(Rejected) as caught:
        parse(channel, data)
    assert caught.value.reason == reason
    assert TOKEN not in str(caught.value)


def _event_bytes(content: dict) -> int:
    return len(json.dumps(content, ensure_ascii=False).encode())


def test_an_over_long_publish_becomes_plain_text_that_fits_one_event():
    # Matrix refuses an event over 64 KiB: HTML too long for it is sent as its text alone.
    from channels_bots.messages import MAX_CONTENT_BYTES
    from channels_bots.render import TRUNCATED

    html = "<p>" + "é\"" * 30_000 + "</p>"  # 90 KB of UTF-8, more once JSON escapes the quotes
    data = {"config": {"server": SERVER, "access_token": TOKEN, "channel": "!abc:example.org"},
            "payload": {"html": html}}
    content = parse("chatbot/publish", json.dumps(data).encode()).content
    assert set(content) == {"msgtype", "body"} and content["msgtype"] == "m.text"
    assert content["body"].startswith("é\"é\"") and content["body"].endswith(TRUNCATED)
    assert _event_bytes(content) <= MAX_CONTENT_BYTES
    # One that fits keeps its HTML.
    data["payload"]["html"] = "<p>" + "é" * 10_000 + "</p>"
    assert "formatted_body" in parse("chatbot/publish", json.dumps(data).encode()).content


def test_an_over_long_test_message_is_cut_to_fit_one_event():
    from channels_bots.messages import MAX_CONTENT_BYTES

    data = {"server": SERVER, "access_token": TOKEN, "channel": "#a:b", "message": "\U0001f600" * 50_000}
    content = parse("chatbot/test", json.dumps(data, ensure_ascii=False).encode()).content
    assert content["body"].startswith("\U0001f600") and _event_bytes(content) <= MAX_CONTENT_BYTES


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"config":' * 10_000 + b"1" + b"}" * 10_000])
def test_deeply_nested_json_is_rejected_as_not_json(data):
    with pytest.raises(Rejected) as rejected:
        parse("chatbot/publish", data)
    assert rejected.value.reason == "not_json"


def test_a_rejected_message_is_logged_once_and_counted(caplog):
    from channels_bots.app import BotsService
    from channels_bots.metrics import BotsMetrics
    from channels_common.redis import Message
    from channels_common.settings import BotsSettings

    metrics = BotsMetrics()
    service = BotsService(BotsSettings(), metrics)
    with caplog.at_level("WARNING", logger="channels"):
        service.handle(Message("chatbot/publish", b"[" * 100_000))
    dropped = [r for r in caplog.records if r.getMessage() == "chatbot message dropped"]
    assert len(dropped) == 1 and dropped[0].reason == "not_json" and dropped[0].levelname == "WARNING"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert metrics.registry.get_sample_value("bots_messages_failed_total", {"reason": "not_json"}) == 1
