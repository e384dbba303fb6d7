import json

from channels_common.auth import ChannelUser, lookup_channel_user, parse_current_user, valid_token
from channels_common.publish import main as publish_main
from channels_common.publish import publish_notice, publish_records, set_channel_token


def test_parse_current_user_keeps_only_ids():
    user = parse_current_user(b'{"id": 7, "name": "Ann", "group_ids": [1, 2, "x", true]}')
    assert user == ChannelUser(id=7, group_ids=(1, 2))


def test_parse_current_user_logged_out_and_garbage():
    assert parse_current_user(b'{"id": null, "group_ids": []}') == ChannelUser(id=None, group_ids=())
    assert parse_current_user(b"not json") is None
    assert parse_current_user(b"[1, 2]") is None
    assert parse_current_user(None) is None
    assert parse_current_user(b'{"id": "7", "group_ids": 5}') == ChannelUser(id=None, group_ids=())


def test_parse_current_user_refuses_deep_nesting_with_a_warning(caplog):
    # Once a RecursionError out of the token reader, not a refusal.
    with caplog.at_level("WARNING", logger="channels.auth"):
        assert parse_current_user(b"[" * 100_000) is None
        assert parse_current_user(b'{"id": 1, "group_ids": ' + b"[" * 5000 + b"]" * 5000 + b"}") is None
    assert [r.getMessage() for r in caplog.records] == ["unparseable current user record"] * 2


def test_valid_token():
    assert valid_token("abc")
    assert not valid_token("")
    assert not valid_token(None)
    assert not valid_token("a" * 1000)
    assert not valid_token("a\nb")


async def test_token_roundtrip_and_ttl(redis):
    await set_channel_token(redis, "tok", 7, [1, 2], name="Ann", ttl=60)
    assert await lookup_channel_user(redis, "tok") == ChannelUser(7, (1, 2))
    assert 0 < await redis.ttl("/current_users/tok") <= 60
    assert await lookup_channel_user(redis, "missing") is None


async def test_publish_shapes(redis):
    pubsub = redis.pubsub()
    await pubsub.subscribe("/records", "/system_notice")
    await pubsub.get_message(timeout=1)
    await pubsub.get_message(timeout=1)
    await publish_records(redis, "group-1", {"comments": [{"id": 1}]})
    await publish_notice(redis, {"type": "maintenance"})
    got = []
    while len(got) < 2:
        msg = await pubsub.get_message(timeout=2, ignore_subscribe_messages=True)
        if msg:
            got.append((msg["channel"], json.loads(msg["data"])))
    assert got == [
        (b"/records", {"room": "group-1", "records": {"comments": [{"id": 1}]}}),
        (b"/system_notice", {"type": "maintenance"}),
    ]
    await pubsub.aclose()


def test_cli_writes_token(redis_url, redis_sync_client):
    assert publish_main(["--redis-url", redis_url, "token", "t1", "--user-id", "3", "--group", "9"]) == 0
    assert json.loads(redis_sync_client.get("/current_users/t1")) == {"name": "", "group_ids": [9], "id": 3}
    assert publish_main(["--redis-url", redis_url, "notice", "{bad"]) == 2


def test_cli_reads_redis_url_and_matrix_token_from_the_environment(redis_url, redis_sync_client, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("MATRIX_ACCESS_TOKEN", raising=False)
    assert publish_main(["chatbot-test", "https://hs.example", "#r:hs.example", "hi"]) == 2
    assert "MATRIX_ACCESS_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "syt_secret")
    pubsub = redis_sync_client.pubsub()
    pubsub.subscribe("chatbot/test")
    pubsub.get_message(timeout=2)  # the subscribe confirmation
    assert publish_main(["chatbot-test", "https://hs.example", "#r:hs.example", "hi"]) == 0
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert json.loads(message["data"])["access_token"] == "syt_secret"
