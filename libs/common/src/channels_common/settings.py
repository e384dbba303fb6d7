"""Every setting of every service and tool, read from the environment names
that the original Node.js deployment used (docs/contracts.md lists them).
No other module reads the environment (channels-healthcheck aside: see
healthcheck.py)."""

from __future__ import annotations

import ipaddress

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://localhost:6379/0", validation_alias="REDIS_URL")
    sentry_dsn: str | None = Field(
        None, validation_alias=AliasChoices("SENTRY_DSN", "SENTRY_PUBLIC_DSN")
    )
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    # Seconds a service waits for in-flight work after SIGTERM before exiting.
    shutdown_grace_seconds: float = Field(5.0, validation_alias="SHUTDOWN_GRACE_SECONDS")
    host: str = Field("0.0.0.0", validation_alias="HOST")
    # Seconds a client may take over a request's head (line and headers),
    # counted from when its connection opens (or its next request begins);
    # then 408 and the connection is closed (records and collab; httphead.py).
    http_head_timeout_seconds: float = Field(10.0, gt=0, validation_alias="HTTP_HEAD_TIMEOUT_SECONDS")
    # Connections in their request head at once, per process; past it the
    # one waiting longest is closed.
    http_max_pending_heads: int = Field(5000, gt=0, validation_alias="HTTP_MAX_PENDING_HEADS")


def _networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    # strict=False: "10.1.2.3/8" means the /8 it lies in.
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in spec.split(",") if e.strip())


def _strip_channels_prefix(host: str) -> str:
    return host.removeprefix("channels.")


class RecordsSettings(CommonSettings):
    port: int = Field(5000, validation_alias="PORT")
    public_app_url: str | None = Field(None, validation_alias="PUBLIC_APP_URL")
    canonical_host: str | None = Field(None, validation_alias="CANONICAL_HOST")
    virtual_host: str | None = Field(None, validation_alias="VIRTUAL_HOST")
    recovery_window_seconds: int = Field(1800, validation_alias="RECOVERY_WINDOW_SECONDS")
    # Connections to Redis for token lookups; further lookups wait for a free one.
    redis_pool_size: int = Field(50, validation_alias="REDIS_POOL_SIZE")
    # Bytes queued for one client before it is considered stuck and disconnected.
    max_client_buffer_bytes: int = Field(
        4 * 1024 * 1024, validation_alias="MAX_CLIENT_BUFFER_BYTES"
    )
    # Events the recovery log keeps per room (approximately, at least this
    # many); a client that missed more gets a fresh session, never a partial replay.
    recovery_max_events_per_room: int = Field(1000, validation_alias="RECOVERY_MAX_EVENTS_PER_ROOM")

    @property
    def cors_origin(self) -> str | None:
        """The one browser origin allowed, as the original computed it."""
        if self.public_app_url:
            return self.public_app_url.rstrip("/")
        host = self.canonical_host or self.virtual_host
        if host:
            return "https://" + _strip_channels_prefix(host)
        return None


class CollabSettings(CommonSettings):
    port: int | None = Field(None, validation_alias="PORT")
    rails_env: str = Field("development", validation_alias="RAILS_ENV")
    private_app_url: str | None = Field(None, validation_alias="PRIVATE_APP_URL")
    app_url: str | None = Field(None, validation_alias="APP_URL")
    public_app_url: str | None = Field(None, validation_alias="PUBLIC_APP_URL")
    canonical_host: str | None = Field(None, validation_alias="CANONICAL_HOST")
    timeout_ms: int = Field(30000, validation_alias="COLLAB_TIMEOUT_MS")
    debounce_ms: int = Field(5000, validation_alias="COLLAB_DEBOUNCE_MS")
    max_debounce_ms: int = Field(30000, validation_alias="COLLAB_MAX_DEBOUNCE_MS")
    # Drafts live in Redis and expire this long after their last activity.
    draft_ttl_seconds_set: int | None = Field(None, validation_alias="COLLAB_DRAFT_TTL_SECONDS")
    # Deprecated alias of COLLAB_DRAFT_TTL_SECONDS (logged at startup when used).
    draft_max_idle_seconds: int | None = Field(None, validation_alias="COLLAB_DRAFT_MAX_IDLE_SECONDS")
    # Prefix of every collab key: Loomio's Redis is shared with Rails.
    redis_prefix: str = Field("collab:", validation_alias="COLLAB_REDIS_PREFIX")
    # Bytes of client updates applied but not yet in Redis, per process;
    # beyond it the sockets of their documents are no longer read.
    max_unacked_bytes: int = Field(64 * 1024 * 1024, validation_alias="COLLAB_MAX_UNACKED_BYTES")
    # Seconds to wait for Rails to answer an auth request.
    auth_timeout_seconds: float = Field(10.0, validation_alias="COLLAB_AUTH_TIMEOUT_SECONDS")
    max_frame_bytes: int = Field(10 * 1024 * 1024, validation_alias="COLLAB_MAX_FRAME_BYTES")
    # Relay a client's stateless messages to the document's other clients
    # (Hocuspocus only does so from an onStateless hook; Loomio has none).
    broadcast_stateless: bool = Field(False, validation_alias="COLLAB_BROADCAST_STATELESS")
    # Connection attempts per client address per window, then a ban; 0 = off
    # (a whole office behind one NAT reconnects at once after a deploy).
    throttle_attempts: int = Field(0, ge=0, validation_alias="COLLAB_THROTTLE_ATTEMPTS")
    throttle_window_seconds: float = Field(60.0, gt=0, validation_alias="COLLAB_THROTTLE_WINDOW_SECONDS")
    throttle_ban_seconds: float = Field(300.0, gt=0, validation_alias="COLLAB_THROTTLE_BAN_SECONDS")
    # Comma-separated addresses or CIDRs of the proxies in front: only their
    # X-Forwarded-For is believed when telling clients apart.
    trusted_proxies: str = Field("", validation_alias="TRUSTED_PROXIES")

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: str) -> str:
        _networks(value)  # a bad entry fails startup, named in the error
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return _networks(self.trusted_proxies)

    @model_validator(mode="after")
    def _default_port(self) -> CollabSettings:
        if self.port is None:
            self.port = 5000 if self.rails_env == "production" else 4444
        return self

    @property
    def is_production(self) -> bool:
        return self.rails_env == "production"

    @property
    def draft_ttl_seconds(self) -> int:
        if self.draft_ttl_seconds_set is not None:
            return self.draft_ttl_seconds_set
        if self.draft_max_idle_seconds is not None:
            return self.draft_max_idle_seconds
        return 86400

    @property
    def rails_base_url(self) -> str | None:
        """First one set of PRIVATE_APP_URL, APP_URL, PUBLIC_APP_URL, CANONICAL_HOST."""
        for value in (self.private_app_url, self.app_url, self.public_app_url):
            if value:
                return value.rstrip("/")
        if self.canonical_host:
            host = self.canonical_host
            return host.rstrip("/") if "://" in host else "https://" + host
        return None


class BotsSettings(CommonSettings):
    # The bots service serves only /healthz, /readyz and /metrics.
    port: int = Field(5002, validation_alias="PORT")
    client_cache_size: int = Field(100, validation_alias="BOTS_CLIENT_CACHE_SIZE")
    client_idle_seconds: float = Field(900.0, validation_alias="BOTS_CLIENT_IDLE_SECONDS")
    alias_ttl_seconds: float = Field(300.0, validation_alias="BOTS_ALIAS_TTL_SECONDS")
    max_concurrent_sends: int = Field(20, validation_alias="BOTS_MAX_CONCURRENT_SENDS")
    # Requests to any one homeserver at once, so a slow one cannot take every slot.
    max_concurrent_sends_per_server: int = Field(10, validation_alias="BOTS_MAX_CONCURRENT_SENDS_PER_SERVER")
    max_attempts: int = Field(6, validation_alias="BOTS_MAX_ATTEMPTS")
    # Backoff between attempts after network errors and 5xx: base * 2^n, capped, jittered.
    retry_base_seconds: float = Field(0.5, validation_alias="BOTS_RETRY_BASE_SECONDS")
    retry_max_seconds: float = Field(30.0, validation_alias="BOTS_RETRY_MAX_SECONDS")
    # Seconds one request to a homeserver may take.
    request_timeout_seconds: float = Field(30.0, validation_alias="BOTS_REQUEST_TIMEOUT_SECONDS")
    # What an instance keeps of the messages it heard (its own to post, and
    # copies for a takeover) until it sees them done: at most this many, this
    # many bytes of payload, this old. Beyond a bound a message is dropped and logged.
    max_pending_messages: int = Field(10000, gt=0, validation_alias="BOTS_MAX_PENDING_MESSAGES")
    max_pending_bytes: int = Field(64 * 1024 * 1024, gt=0, validation_alias="BOTS_MAX_PENDING_BYTES")
    max_pending_age_seconds: float = Field(3600.0, gt=0, validation_alias="BOTS_MAX_PENDING_AGE_SECONDS")
    # Several instances share the work through claims in Redis (docs/bots.md).
    # A room's claim lasts this long unless renewed; a dead instance's rooms
    # are taken over after it.
    claim_lease_seconds: float = Field(10.0, gt=0, validation_alias="BOTS_CLAIM_LEASE_SECONDS")
    # Identical publishes (same channel and payload) within this window count
    # as one; the claim keys live this long. Synapse remembers transaction ids
    # for 24 hours, so a shorter window does not make repeats post again there.
    dedupe_window_seconds: float = Field(86400.0, gt=0, validation_alias="BOTS_DEDUPE_WINDOW_SECONDS")
    # Seconds after the subscription (re)starts before what it heard is given
    # a place in its room's order: instances that heard earlier messages of
    # the room register them first.
    settle_seconds: float = Field(1.0, ge=0, validation_alias="BOTS_SETTLE_SECONDS")
    redis_prefix: str = Field("bots:", validation_alias="BOTS_REDIS_PREFIX")

    @model_validator(mode="after")
    def _window_outlasts_what_is_kept(self) -> BotsSettings:
        if self.dedupe_window_seconds <= self.max_pending_age_seconds:
            raise ValueError("BOTS_DEDUPE_WINDOW_SECONDS must be longer than BOTS_MAX_PENDING_AGE_SECONDS")
        return self


class PlaygroundSettings(CommonSettings):
    """The development playground page served by records (never in production)."""

    rails_env: str = Field("development", validation_alias="RAILS_ENV")
    # Where the page's editor reaches collab; unset: the page's own host, port 4444.
    collab_url: str | None = Field(None, validation_alias="PLAYGROUND_COLLAB_URL")
    # The built front-end bundle; unset: playground/dist of the source checkout.
    dist_dir: str | None = Field(None, validation_alias="PLAYGROUND_DIST")

    @property
    def enabled(self) -> bool:
        return self.rails_env != "production"


class DevRailsSettings(CommonSettings):
    """channels-dev-rails, the development stand-in for Rails (refused in production)."""

    port: int = Field(3030, validation_alias="PORT")
    rails_env: str = Field("development", validation_alias="RAILS_ENV")
    # Seconds between rewrites of the demo channel token (survives a Redis restart).
    token_refresh_seconds: float = Field(30.0, validation_alias="DEV_RAILS_TOKEN_REFRESH_SECONDS")


class PublishSettings(CommonSettings):
    """channels-publish, which publishes as Rails would (REDIS_URL from CommonSettings)."""

    # The Matrix token of the chatbot-test and chatbot-publish commands:
    # from the environment, never the command line (it would show in `ps`).
    matrix_access_token: SecretStr | None = Field(None, validation_alias="MATRIX_ACCESS_TOKEN")
