"""channels-doctor's judgements, without I/O: what each answer means."""

import json
from collections import Counter

import pytest
from channels_common import doctor
from channels_common.settings import RecordsSettings


def test_urls_lose_their_credentials():
    assert doctor.safe_url("redis://:pw@redis:6379/0") == "redis://redis:6379/0"
    assert doctor.safe_url("rediss://user:pw@[::1]:6380/2?ssl_cert_reqs=none") == "rediss://[::1]:6380/2"
    assert doctor.safe_url("http://app:3000/api/hocuspocus") == "http://app:3000/api/hocuspocus"


@pytest.mark.parametrize(("policy", "status"), [
    ("noeviction", "ok"), ("allkeys-lru", "fail"), ("volatile-lru", "fail"), ("volatile-ttl", "fail"),
    ("allkeys-random", "fail"), (None, "warn"),
])
def test_only_noeviction_keeps_recovery_logs_and_drafts(policy, status):
    check = doctor.judge_eviction(policy)
    assert check.status == status
    if status == "fail":
        assert "noeviction" in check.message


@pytest.mark.parametrize(("appendonly", "save", "status"), [
    ("yes", "", "ok"), ("no", "3600 1 300 100", "ok"), ("no", "", "warn"), (None, None, "warn"),
])
def test_persistence(appendonly, save, status):
    assert doctor.judge_persistence(appendonly, save).status == status


@pytest.mark.parametrize(("token", "raw", "reason"), [
    ("tok", json.dumps({"name": "A", "group_ids": [1, 2], "id": 3}).encode(), None),
    ("tok", json.dumps({"id": None}).encode(), None),  # a visitor
    ("tok", json.dumps({"id": None, "group_ids": []}).encode(), None),
    ("tok", None, "not a string value"),
    ("tok", b"\xff{", "not JSON"),
    ("tok", b"[1]", "not a JSON object"),
    ("tok", b"[" * 100_000, "not JSON"),
    ("tok", b"{}", "no id"),
    ("tok", b'{"id": true}', "id is not a number or null"),
    ("tok", b'{"id": "3"}', "id is not a number or null"),
    ("tok", b'{"id": 3, "group_ids": "1,2"}', "group_ids is not a list of numbers"),
    ("tok", b'{"id": 3, "group_ids": [1, "2"]}', "group_ids is not a list of numbers"),
    ("tok", b'{"id": 3, "name": 5}', "name is not a string"),
    ("", b'{"id": 3}', "token part empty, over 256 characters or unprintable"),
    ("x" * 257, b'{"id": 3}', "token part empty, over 256 characters or unprintable"),
])
def test_current_user_values(token, raw, reason):
    assert doctor.judge_current_user(token, raw) == reason


def test_current_users_summary_names_reasons_and_counts_only():
    assert doctor.judge_current_users(0, Counter()).status == "warn"
    assert doctor.judge_current_users(7, Counter()).status == "ok"
    check = doctor.judge_current_users(7, Counter({"not JSON": 2, "no id": 1}))
    assert check.status == "fail"
    assert check.message == "3 of 7 sampled are not as Rails writes them: not JSON (2), no id (1)"


@pytest.mark.parametrize(("status", "verdict"), [
    (401, "ok"), (403, "ok"), (200, "fail"), (404, "fail"), (302, "fail"), (500, "fail"), (502, "fail"),
    (400, "warn"),
])
def test_rails_answers_to_a_wrong_secret(status, verdict):
    assert doctor.judge_rails_status("http://app:3000/api/hocuspocus", status).status == verdict


@pytest.mark.parametrize(("env", "status"), [
    ({"PUBLIC_APP_URL": "https://loomio.example.org"}, "ok"),
    ({"PUBLIC_APP_URL": "https://loomio.example.org/"}, "ok"),
    ({"PUBLIC_APP_URL": "http://localhost:5000"}, "ok"),
    ({"CANONICAL_HOST": "loomio.example.org"}, "ok"),
    ({"PUBLIC_APP_URL": "http://loomio.example.org"}, "warn"),
    ({"PUBLIC_APP_URL": "loomio.example.org"}, "fail"),
    ({"PUBLIC_APP_URL": "https://loomio.example.org/app"}, "fail"),
    ({"PUBLIC_APP_URL": "https://user:pw@loomio.example.org"}, "fail"),
    ({"PUBLIC_APP_URL": "https://loomio.example.org:http"}, "fail"),
    ({}, "fail"),
])
def test_public_app_url_must_be_an_origin(env, status):
    check = doctor.judge_origin(RecordsSettings.model_validate(env))
    assert check.status == status
    assert "pw" not in check.message


def test_bots_claim_keys_are_counted_and_must_expire():
    ok = doctor.judge_bots_claims(3, 120, 0, True, 86400.0, 200.0)
    assert ok.status == "ok" and "123 (3 rooms, 120 messages, about 24 KiB) for a 24 h dedupe window" in ok.message
    assert doctor.judge_bots_claims(0, 0, 0, True, 3600.0, None).status == "ok"
    partial = doctor.judge_bots_claims(5, 5, 0, False, 3600.0, None)
    assert "at least 10" in partial.message
    assert doctor.judge_bots_claims(1, 1, 1, True, 3600.0, None).status == "warn"


def test_bots_claim_keys_counted_in_a_real_redis(redis_sync_client):
    from channels_common.settings import BotsSettings

    client = redis_sync_client
    for i in range(3):
        client.hset(f"bots:room:r{i}", "e", "x")
        client.pexpire(f"bots:room:r{i}", 60_000)
    for i in range(7):
        client.hset(f"bots:msg:m{i}", "s", i)
        client.pexpire(f"bots:msg:m{i}", 60_000)
    client.set("unrelated", "1")
    check = doctor.check_bots_claims(client, BotsSettings())
    assert check.status == "ok" and check.message.startswith("10 (3 rooms, 7 messages"), check.message
    client.hset("bots:msg:forever", "s", 1)
    assert doctor.check_bots_claims(client, BotsSettings()).status == "warn"
