import pytest
from channels_common.settings import BotsSettings, CollabSettings, RecordsSettings


def test_records_defaults(monkeypatch):
    for name in ("PORT", "PUBLIC_APP_URL", "CANONICAL_HOST", "VIRTUAL_HOST", "REDIS_URL", "RECOVERY_WINDOW_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    s = RecordsSettings()
    assert s.port == 5000
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.recovery_window_seconds == 1800
    assert s.cors_origin is None


def test_records_cors_origin_fallbacks(monkeypatch):
    monkeypatch.delenv("PUBLIC_APP_URL", raising=False)
    monkeypatch.setenv("VIRTUAL_HOST", "channels.loomio.example")
    assert RecordsSettings().cors_origin == "https://loomio.example"
    monkeypatch.setenv("CANONICAL_HOST", "channels.app.example")
    assert RecordsSettings().cors_origin == "https://app.example"
    monkeypatch.setenv("PUBLIC_APP_URL", "https://public.example/")
    assert RecordsSettings().cors_origin == "https://public.example"


def test_collab_port_depends_on_rails_env(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("RAILS_ENV", raising=False)
    assert CollabSettings().port == 4444
    monkeypatch.setenv("RAILS_ENV", "production")
    assert CollabSettings().port == 5000
    monkeypatch.setenv("PORT", "6001")
    assert CollabSettings().port == 6001


def test_collab_rails_base_url_order(monkeypatch):
    for name in ("PRIVATE_APP_URL", "APP_URL", "PUBLIC_APP_URL", "CANONICAL_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert CollabSettings().rails_base_url is None
    monkeypatch.setenv("CANONICAL_HOST", "loomio.example")
    assert CollabSettings().rails_base_url == "https://loomio.example"
    monkeypatch.setenv("PUBLIC_APP_URL", "https://public.example")
    assert CollabSettings().rails_base_url == "https://public.example"
    monkeypatch.setenv("APP_URL", "http://app:3000/")
    assert CollabSettings().rails_base_url == "http://app:3000"
    monkeypatch.setenv("PRIVATE_APP_URL", "http://private:3000")
    assert CollabSettings().rails_base_url == "http://private:3000"
    monkeypatch.setenv("COLLAB_TIMEOUT_MS", "1000")
    assert CollabSettings().timeout_ms == 1000


def test_collab_throttle_is_off_by_default_and_trusted_proxies_parse(monkeypatch):
    for name in ("COLLAB_THROTTLE_ATTEMPTS", "COLLAB_THROTTLE_WINDOW_SECONDS", "COLLAB_THROTTLE_BAN_SECONDS",
                 "TRUSTED_PROXIES"):
        monkeypatch.delenv(name, raising=False)
    s = CollabSettings()
    assert (s.throttle_attempts, s.throttle_window_seconds, s.throttle_ban_seconds) == (0, 60.0, 300.0)
    assert s.trusted_proxy_networks == ()
    monkeypatch.setenv("COLLAB_THROTTLE_ATTEMPTS", "15")
    monkeypatch.setenv("COLLAB_THROTTLE_BAN_SECONDS", "1.5")
    monkeypatch.setenv("TRUSTED_PROXIES", " 127.0.0.1, 10.1.2.3/8,,fd00::/8 ")
    s = CollabSettings()
    assert s.throttle_attempts == 15 and s.throttle_ban_seconds == 1.5
    assert [str(n) for n in s.trusted_proxy_networks] == ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
    for bad in ("10.0.0.0/33", "proxy.internal", "127.0.0.1;"):
        monkeypatch.setenv("TRUSTED_PROXIES", bad)
        with pytest.raises(ValueError):
            CollabSettings()
    monkeypatch.setenv("TRUSTED_PROXIES", "")
    monkeypatch.setenv("COLLAB_THROTTLE_WINDOW_SECONDS", "0")
    with pytest.raises(ValueError):
        CollabSettings()


def test_bots_defaults(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    assert BotsSettings().port == 5002


def test_publish_settings_keep_the_matrix_token_secret(monkeypatch):
    from channels_common.settings import PublishSettings

    monkeypatch.setenv("MATRIX_ACCESS_TOKEN", "syt_secret")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/2")
    s = PublishSettings()
    assert s.redis_url == "redis://elsewhere:6379/2"
    assert s.matrix_access_token.get_secret_value() == "syt_secret"
    assert "syt_secret" not in repr(s)


def test_request_head_limits(monkeypatch):
    for name in ("HTTP_HEAD_TIMEOUT_SECONDS", "HTTP_MAX_PENDING_HEADS"):
        monkeypatch.delenv(name, raising=False)
    s = CollabSettings()
    assert (s.http_head_timeout_seconds, s.http_max_pending_heads) == (10.0, 5000)
    monkeypatch.setenv("HTTP_HEAD_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("HTTP_MAX_PENDING_HEADS", "7")
    s = RecordsSettings()
    assert (s.http_head_timeout_seconds, s.http_max_pending_heads) == (2.5, 7)
    monkeypatch.setenv("HTTP_MAX_PENDING_HEADS", "0")
    with pytest.raises(ValueError):
        RecordsSettings()


def test_bots_dedupe_window_must_outlast_what_is_kept(monkeypatch):
    import pytest
    from channels_common.settings import BotsSettings

    settings = BotsSettings()
    assert settings.dedupe_window_seconds > settings.max_pending_age_seconds
    assert settings.claim_lease_seconds == 10.0
    monkeypatch.setenv("BOTS_DEDUPE_WINDOW_SECONDS", "600")
    monkeypatch.setenv("BOTS_MAX_PENDING_AGE_SECONDS", "900")
    with pytest.raises(ValueError, match="BOTS_DEDUPE_WINDOW_SECONDS"):
        BotsSettings()
