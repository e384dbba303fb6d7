"""`channels-doctor`: what is wrong with a deployment of the channel services,
one ✓/✗ line per check, from the environment the services read.

    channels-doctor [--json] [--records-port N] [--collab-port N] [--bots-port N]

Checks: Redis answers (and its version); its eviction policy and persistence
suit recovery logs and collab drafts; `/current_users/*` values look like
Rails writes them (a bounded sample); how many claim keys the bots keep
(each must expire within the dedupe window); Rails' /api/hocuspocus refuses a wrong
secret; PUBLIC_APP_URL is an origin; each service's port is free or served by
that service. Exit status 1 when any check fails (✗); warnings (!) do not.

Invariant: no output carries a token, a Redis key name or value, or a
password from a URL: keys under /current_users/ are named by the token and
hold user names, so only counts and reasons are reported.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
import redis
from redis.exceptions import ResponseError

from . import jsonin
from .auth import CURRENT_USER_KEY, MAX_USER_RECORD_BYTES, valid_token
from .settings import BotsSettings, CollabSettings, RecordsSettings

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
SYMBOLS = {OK: "✓", WARN: "!", FAIL: "✗", SKIP: "-"}

CURRENT_USERS_PATTERN = CURRENT_USER_KEY.format(token="*")
# The sample of /current_users/* keys: at most this many keys, found in at
# most this many SCAN calls (a big keyspace with few matches stays cheap).
MAX_SAMPLED_KEYS = 100
MAX_SCAN_CALLS = 100
SCAN_COUNT = 1000
AUTH_PATH = "/api/hocuspocus"
# A document name Rails parses (an existing record, not a `new` one).
PROBE_DOCUMENT = "comment-1-body"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    message: str

    def line(self) -> str:
        return f"{SYMBOLS[self.status]} {self.name}: {self.message}"


# --- what the answers mean (pure) -------------------------------------------------


def safe_url(url: str) -> str:
    """A URL without its user and password, for output."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def judge_eviction(policy: str | None) -> Check:
    name = "redis eviction policy"
    if policy is None:
        return Check(name, WARN, "unknown (CONFIG GET is disabled, as on managed Redis): make sure "
                                 "maxmemory-policy is noeviction, or recovery logs and drafts can be evicted")
    if policy == "noeviction":
        return Check(name, OK, "noeviction: recovery logs and drafts are never evicted")
    return Check(name, FAIL, f"{policy} can evict recovery logs and collab drafts (volatile-* evicts keys with "
                             "a TTL, which they have): set maxmemory-policy noeviction, or give the channel "
                             "services a Redis of their own")


def judge_persistence(appendonly: str | None, save: str | None) -> Check:
    name = "redis persistence"
    if appendonly is None and save is None:
        return Check(name, WARN, "unknown (CONFIG GET is disabled): without persistence a Redis restart loses "
                                 "recovery logs and drafts")
    if appendonly == "yes":
        return Check(name, OK, "append-only file on")
    if save and save.strip():
        return Check(name, OK, f"snapshots (save {save.strip()}); appendonly yes would lose less on a crash")
    return Check(name, WARN, "none: a Redis restart loses recovery logs and collab drafts "
                             "(set appendonly yes to keep them)")


def judge_current_user(token: str, raw: bytes | None) -> str | None:
    """Why a /current_users/{token} value is not what Rails writes, or None."""
    if not valid_token(token):
        return "token part empty, over 256 characters or unprintable"
    if raw is None:
        return "not a string value"
    try:
        data = jsonin.loads(raw, max_bytes=MAX_USER_RECORD_BYTES)
    except jsonin.JSONInputError:
        return "not JSON"
    if not isinstance(data, dict):
        return "not a JSON object"
    if "id" not in data:
        return "no id"
    user_id = data["id"]
    if user_id is not None and (not isinstance(user_id, int) or isinstance(user_id, bool)):
        return "id is not a number or null"
    groups = data.get("group_ids", [])
    if not isinstance(groups, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        return "group_ids is not a list of numbers"
    if not isinstance(data.get("name", ""), (str, type(None))):
        return "name is not a string"
    return None


def judge_current_users(sampled: int, problems: Counter) -> Check:
    name = "/current_users/* keys"
    if sampled == 0:
        return Check(name, WARN, "none found: nobody has loaded Loomio since Redis started, or Rails writes to "
                                 "another Redis or database than REDIS_URL")
    if not problems:
        return Check(name, OK, f"{sampled} sampled, all as Rails writes them")
    bad = sum(problems.values())
    reasons = ", ".join(f"{reason} ({count})" for reason, count in problems.most_common())
    return Check(name, FAIL, f"{bad} of {sampled} sampled are not as Rails writes them: {reasons}")


def judge_bots_claims(rooms: int, messages: int, without_ttl: int, complete: bool, window: float,
                      sample_bytes: float | None) -> Check:
    """The bots' claim keys: counted (a bounded SCAN), all with a TTL. They
    number about rooms + messages heard per window, which bounds them."""
    name = "bots claim keys"
    count = rooms + messages
    about = "" if complete else "at least "
    size = f", about {count * sample_bytes / 1024:.0f} KiB" if sample_bytes is not None and count else ""
    summary = f"{about}{count} ({rooms} rooms, {messages} messages{size}) for a {window / 3600:g} h dedupe window"
    if without_ttl:
        return Check(name, WARN, f"{summary}; {without_ttl} sampled without an expiry (every one should expire "
                                 "on its own: a bots version mismatch, or a key written by hand?)")
    return Check(name, OK, f"{summary}, each expiring on its own (bounded by window x message rate)")


def judge_rails_status(where: str, status: int) -> Check:
    name = "rails auth callback"
    if status in (401, 403):
        return Check(name, OK, f"{where} refuses a made-up user with a wrong secret (HTTP {status})")
    if status == 200:
        return Check(name, FAIL, f"{where} ALLOWED a made-up user with a wrong secret: Rails allows unknown "
                                 "tokens, so anyone can open any document")
    if status == 404:
        return Check(name, FAIL, f"{where} answered 404: is PRIVATE_APP_URL (or APP_URL) Rails?")
    if 300 <= status < 400:
        return Check(name, FAIL, f"{where} answered a redirect ({status}), which collab does not follow: "
                                 "point PRIVATE_APP_URL at Rails itself")
    if status >= 500:
        return Check(name, FAIL, f"{where} answered {status}: Rails fails; every document will be denied")
    return Check(name, WARN, f"{where} refused with HTTP {status} (Rails refuses unknown users with 401)")


def judge_origin(records: RecordsSettings) -> Check:
    name = "PUBLIC_APP_URL"
    origin = records.cors_origin
    if origin is None:
        return Check(name, FAIL, "not set (nor CANONICAL_HOST or VIRTUAL_HOST): browsers on the Loomio site "
                                 "cannot connect to records")
    source = "PUBLIC_APP_URL" if records.public_app_url else "CANONICAL_HOST/VIRTUAL_HOST"
    parts = urllib.parse.urlsplit(origin)
    problem = None
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        problem = "its port is not a number"
    if parts.scheme not in ("http", "https"):
        problem = "it must start with https:// (or http://)"
    elif not parts.hostname:
        problem = "it has no host"
    elif parts.username or parts.password:
        problem = "it carries a user or password"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "an origin has no path, query or fragment"
    if problem:
        return Check(name, FAIL, f"{safe_url(origin)} (from {source}) is not a browser origin: {problem}")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1"):
        return Check(name, WARN, f"{origin} (from {source}) is plain http")
    return Check(name, OK, f"{origin} (from {source})")


# --- looking (I/O) ---------------------------------------------------------------


def check_redis(url: str, timeout: float) -> tuple[list[Check], redis.Redis | None]:
    where = safe_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        info = client.info("server")
    except (redis.RedisError, OSError, ValueError) as exc:
        return [Check("redis", FAIL, f"{where} does not answer ({type(exc).__name__}): is REDIS_URL right "
                                     "and Redis running?")], None
    server = f"Valkey {info['valkey_version']}" if "valkey_version" in info else f"Redis {info.get('redis_version')}"
    return [Check("redis", OK, f"{server} at {where}")], client


def _config(client: redis.Redis, key: str) -> str | None:
    """A CONFIG GET value, or None where CONFIG is disabled or forbidden."""
    try:
        value = client.config_get(key).get(key)
    except ResponseError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def check_redis_config(client: redis.Redis) -> list[Check]:
    return [
        judge_eviction(_config(client, "maxmemory-policy")),
        judge_persistence(_config(client, "appendonly"), _config(client, "save")),
    ]


def check_current_users(client: redis.Redis) -> Check:
    keys: list[bytes] = []
    cursor = 0
    for _ in range(MAX_SCAN_CALLS):
        cursor, batch = client.scan(cursor, match=CURRENT_USERS_PATTERN, count=SCAN_COUNT)
        keys.extend(batch[: MAX_SAMPLED_KEYS - len(keys)])
        if cursor == 0 or len(keys) >= MAX_SAMPLED_KEYS:
            break
    if not keys:
        return judge_current_users(0, Counter())
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    types = pipe.execute()
    strings = [key for key, kind in zip(keys, types, strict=True) if kind in (b"string", "string")]
    values = dict(zip(strings, client.mget(strings), strict=True)) if strings else {}
    prefix = CURRENT_USERS_PATTERN[:-1].encode()
    problems: Counter = Counter()
    for key in keys:
        token = key[len(prefix):].decode("utf-8", "replace")
        reason = judge_current_user(token, values.get(key))
        if reason:
            problems[reason] += 1
    return judge_current_users(len(keys), problems)


def check_bots_claims(client: redis.Redis, bots: BotsSettings) -> Check:
    prefix = bots.redis_prefix
    rooms = messages = 0
    sample: list[bytes] = []
    cursor, complete = 0, False
    for _ in range(MAX_SCAN_CALLS):
        cursor, batch = client.scan(cursor, match=prefix + "*", count=SCAN_COUNT)
        for key in batch:
            kind = key[len(prefix):].split(b":", 1)[0]
            rooms += kind == b"room"
            messages += kind == b"msg"
        sample.extend(batch[: MAX_SAMPLED_KEYS - len(sample)])
        if cursor == 0:
            complete = True
            break
    without_ttl, sizes = 0, []
    if sample:
        pipe = client.pipeline(transaction=False)
        for key in sample:
            pipe.pttl(key)
        without_ttl = sum(1 for ttl in pipe.execute() if ttl == -1)
        try:
            sizes = [client.memory_usage(key) or 0 for key in sample[:20]]
        except ResponseError:
            sizes = []
    average = sum(sizes) / len(sizes) if sizes else None
    return judge_bots_claims(rooms, messages, without_ttl, complete, bots.dedupe_window_seconds, average)


def check_rails(collab: CollabSettings, timeout: float) -> Check:
    base = collab.rails_base_url
    if not base:
        return Check("rails auth callback", FAIL, "no Rails URL (PRIVATE_APP_URL, APP_URL, PUBLIC_APP_URL, "
                                                  "CANONICAL_HOST): collab denies every document")
    url = base + AUTH_PATH
    where = safe_url(url)
    # A made-up, non-zero user id with a secret nobody has.
    secret = f"{secrets.randbelow(10**9) + 10**9},{secrets.token_urlsafe(24)}"
    try:
        response = httpx.post(url, json={"user_secret": secret, "document_name": PROBE_DOCUMENT},
                              timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException:
        return Check("rails auth callback", FAIL, f"{where} did not answer within {timeout:g} s")
    except httpx.HTTPError as exc:
        return Check("rails auth callback", FAIL, f"{where} is unreachable ({type(exc).__name__}): "
                                                  "collab denies every document")
    return judge_rails_status(where, response.status_code)


def check_port(host: str, port: int, services: list[str], timeout: float) -> Check:
    """Free, or served by one of `services` (several when they share a port
    setting, as inside one service's container where PORT is set)."""
    name = f"port {port} ({', '.join(services)})"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return Check(name, OK, "free")
    except OSError as exc:
        return Check(name, FAIL, f"cannot tell whether it is free ({exc.strerror or type(exc).__name__})")
    base = f"http://{host}:{port}"
    try:
        healthy = httpx.get(base + "/healthz", timeout=timeout).json() == {"status": "ok"}
        metrics = httpx.get(base + "/metrics", timeout=timeout).text if healthy else ""
    except (httpx.HTTPError, ValueError):
        healthy, metrics = False, ""
    if not healthy:
        return Check(name, FAIL, "taken by something that is not a channel service")
    serving = [s for s in ("records", "collab", "bots") if f"\n{s}_ready " in metrics]
    if len(serving) == 1 and serving[0] in services:
        return Check(name, OK, f"served by channels {serving[0]} (/healthz ok)")
    if serving:
        return Check(name, FAIL, f"served by channels {serving[0]}, not {' or '.join(services)}")
    return Check(name, WARN, "served by a channel service that does not say which (/healthz ok)")


def diagnose(host: str, ports: dict[str, int], timeout: float) -> list[Check]:
    records, collab = RecordsSettings(), CollabSettings()
    checks, client = check_redis(records.redis_url, timeout)
    if client is None:
        for name in ("redis eviction policy", "redis persistence", "/current_users/* keys", "bots claim keys"):
            checks.append(Check(name, SKIP, "Redis unreachable"))
    else:
        try:
            checks += check_redis_config(client)
            checks.append(check_current_users(client))
            checks.append(check_bots_claims(client, BotsSettings()))
        except (redis.RedisError, OSError) as exc:
            checks.append(Check("redis", FAIL, f"failed while checking ({type(exc).__name__})"))
        finally:
            client.close()
    checks.append(check_rails(collab, timeout))
    checks.append(judge_origin(records))
    by_port: dict[int, list[str]] = {}
    for service, port in ports.items():
        by_port.setdefault(port, []).append(service)
    for port, services in by_port.items():
        checks.append(check_port(host, port, services, timeout))
    return checks


def default_ports() -> dict[str, int]:
    """Each service's port as the service itself would pick it."""
    return {"records": RecordsSettings().port, "collab": CollabSettings().port, "bots": BotsSettings().port}


def main(argv: list[str] | None = None) -> int:
    defaults = default_ports()
    parser = argparse.ArgumentParser(prog="channels-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--host", default="127.0.0.1", help="where the services' ports are checked")
    for service, port in defaults.items():
        parser.add_argument(f"--{service}-port", type=int, default=port, help=f"default {port}")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per network call")
    args = parser.parse_args(argv)
    ports = {s: getattr(args, f"{s}_port") for s in defaults}
    checks = diagnose(args.host, ports, args.timeout)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        sys.stdout.reconfigure(errors="replace")
        for check in checks:
            print(check.line())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
