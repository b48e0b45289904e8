"""Settings from `SESSIONMGR_*` environment variables, validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from sessionmgr.domain.rules import FREE_FORM_FIELDS, participants_that_fit

PREFIX = "SESSIONMGR_"
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})
LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR"})
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ConfigError(ValueError):
    """Invalid configuration; the message names the variable."""


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    redis_url: str = "redis://localhost:6379/0"
    redis_ca_file: str | None = None
    redis_socket_timeout_s: float = 0.5
    redis_pool_size: int = 64
    mongodb_uri: str = "mongodb://localhost:27017"
    mongodb_db: str = "sessionmgr"
    mongodb_ca_file: str | None = None
    mongodb_timeout_ms: int = 2000
    s3_bucket: str = "sessionmgr-archive"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_ca_bundle: str | None = None
    s3_timeout_s: float = 5.0
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 30
    lease_ttl_s: int = 30
    recent_timeline: int = 20
    hot_view_cache_mb: int = 8
    max_body_bytes: int = 1_048_576
    max_field_bytes: int = 262_144
    max_events_per_append: int = 100
    page_size_default: int = 20
    page_size_max: int = 100
    idempotency_ttl_s: int = 86_400
    outbox_claim_idle_ms: int = 30_000
    outbox_max_deliveries: int = 5
    outbox_batch: int = 1000
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    retry_attempts: int = 3
    retry_timeout_s: float = 1.5
    rate_limit_per_s: float = 50.0
    rate_limit_burst: int = 100
    shutdown_grace_s: int = 20
    log_level: str = "INFO"
    # Serve /metrics on this port instead of the API's (keeps it off the public Service).
    metrics_port: int | None = None
    # Move what start-up built out of the garbage collector's reach (sessionmgr.api.bridge).
    gc_freeze: bool = True
    # The write-behind through a MongoDB outage: pauses grow to this, and an entry MongoDB
    # refuses for its own content is parked only after this long and `outbox_max_deliveries`.
    outbox_backoff_max_s: float = 5.0
    outbox_park_after_s: float = 900.0
    # The hot reads and commits requests ask for in one event-loop turn go to Redis as one
    # pipeline (storage/script_batch.py); false: each its own round trip.
    redis_batch: bool = True
    # The sessions creates store in one event-loop turn go to MongoDB as one insert
    # (storage/insert_batch.py); false: each its own insert.
    mongodb_batch: bool = True
    # Redis WAIT after each write: acknowledged means held by this many replicas (0: off).
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 500
    # An Idempotency-Key's record keeps answers up to this size whole; a larger one keeps a
    # receipt (id, version) and a replay answers the session as it is then.
    idempotency_max_answer_bytes: int = 16_384
    idempotency_max_keys_per_caller: int = 10_000
    # Redis Sentinel: the master named `redis_sentinel_master` is found through these
    # sentinels (host, port); `redis_url` then gives only its credentials, database and TLS.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = None
    redis_sentinel_tls: bool = False
    # A participant whose lease lapsed this long ago leaves `participants` and the ACL.
    lease_grace_s: int = 300
    # Holders of this JWT role may add and remove other participants and suspend, like the owner.
    participants_role: str | None = None
    # Callers with role `service`: a rate limit of their own (unset: the same as everyone's).
    rate_limit_service_per_s: float | None = None
    rate_limit_service_burst: int | None = None
    # HTTP-level limits (sessionmgr.api.guarded_http, docs/security.md).
    max_head_bytes: int = 16_384
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_rate_bps: int = 1024
    max_connections: int = 256
    # Token rules beyond DESIGN §5 (docs/security.md): none by default.
    jwt_max_lifetime_s: int | None = None
    jwt_require_iat: bool = False
    # /health and /health/ready answer from one backend check per replica this long.
    health_cache_s: float = 1.0
    # Quotas (403 quota-exceeded); callers with role admin or service get FACTOR times each.
    max_sessions_per_owner: int = 1000
    max_participants: int = 64
    max_timeline_events: int = 100_000
    quota_privileged_factor: int = 10
    # Timeline reads: events a GET .../timeline page may hold, and `?include=full` inlines.
    timeline_page_max: int = 500
    full_timeline_max: int = 1000
    # The idle sweep (services/idle.py): an active session with no write and no live lease
    # for this long (seconds; the variable also takes 90s, 30m, 2h or 1d) is suspended.
    idle_suspend_after: int = 1800
    idle_sweep: bool = True  # run the sweep in this replica (the CLI `idle-sweep` runs it too)
    idle_sweep_interval_s: float = 60.0
    idle_sweep_batch: int = 100
    # The session inspector at /ui (docs/ui.md): on or off, the key that signs its sign-in
    # cookie (unset: derived from jwt_secret, else random per process), and how long a
    # sign-in lasts (never longer than its token).
    ui: bool = True
    ui_cookie_key: str | None = None
    ui_session_s: int = 900
    # The change feed (GET /v1/sessions/{id}/changes, sessionmgr.services.feed): entries each
    # session's feed stream keeps (approximately), heartbeat and client retry, open streams
    # per principal, events a slow subscriber may have queued before it gets `reset`, and how
    # long a dormant or deleted session's feed stays readable.
    feed_maxlen: int = 1000
    feed_heartbeat_s: float = 15.0
    feed_retry_ms: int = 2000
    feed_max_streams_per_principal: int = 16
    feed_queue_size: int = 256
    feed_retention_s: int = 3600
    # Redis Cluster (sessionmgr.storage.keys): `redis_url` names any node. Every key of a
    # session carries the hash tag of one of `redis_partitions` partitions, in every mode;
    # the count is FIXED for the life of a deployment (Redis records it; a replica configured
    # with another count refuses to start).
    redis_cluster: bool = False
    redis_partitions: int = 256
    # How long a count of an owner's sessions (MongoDB, before a create) stands in for the
    # next creates of that owner on this replica, while it is under half the quota; 0 counts
    # before every create (sessionmgr.services.quotas.OwnerCounts).
    quota_count_ttl_s: float = 1.0

    @property
    def mongodb_in_memory(self) -> bool:
        return self.mongodb_uri.startswith("mongomock://")

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be a whole number between {lo} and {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number between {lo} and {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


_DURATION = re.compile(r"^(\d{1,9})([smhd]?)$")
_DURATION_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration(lo: int, hi: int) -> Callable[[str], int]:
    """Seconds, written as seconds (`1800`) or with a unit: `90s`, `30m`, `2h`, `1d`."""

    def parse(raw: str) -> int:
        match = _DURATION.fullmatch(raw.lower())
        if match is None:
            raise ValueError("must be seconds or a duration like 90s, 30m, 2h or 1d")
        value = int(match.group(1)) * _DURATION_S[match.group(2)]
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi} seconds")
        return value

    return parse


def _algorithms(raw: str) -> tuple[str, ...]:
    algs = tuple(a.strip().upper() for a in raw.split(",") if a.strip())
    unknown = set(algs) - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
    if unknown or not algs:
        raise ValueError(f"unsupported algorithm(s) {sorted(unknown)}; 'none' is never allowed")
    if set(algs) & HMAC_ALGORITHMS and set(algs) & ASYMMETRIC_ALGORITHMS:
        raise ValueError("do not mix HS* with RS*/ES*/PS* algorithms")
    return algs


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not raw.startswith(schemes):
            raise ValueError(f"must start with one of {', '.join(schemes)}")
        return raw

    return parse


def _level(raw: str) -> str:
    if raw.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {sorted(LOG_LEVELS)}")
    return raw.upper()


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _text(raw: str) -> str:
    return raw


def _bucket(raw: str) -> str:
    if not S3_BUCKET.fullmatch(raw) or ".." in raw:
        raise ValueError("must be an S3 bucket name: 3-63 lowercase letters, digits, '.' or '-'")
    return raw


def _host_ports(raw: str) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in (i.strip() for i in raw.split(",")):
        host, sep, port = item.rpartition(":")
        if not item or not sep or not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise ValueError(f"{item!r} is not host:port (a comma-separated list of them)")
        found.append((host.strip("[]"), int(port)))
    return tuple(found)


def _existing_file(raw: str) -> str:
    if not os.path.isfile(raw):
        raise ValueError("no such file")
    return raw


_PARSERS: dict[str, Callable[[str], Any]] = {
    "redis_url": _url(("redis://", "rediss://", "unix://")),
    "redis_socket_timeout_s": _float(0.05, 30),
    "redis_pool_size": _int(1, 10_000),
    "mongodb_uri": _url(("mongodb://", "mongodb+srv://", "mongomock://")),
    "mongodb_timeout_ms": _int(100, 60_000),
    "s3_bucket": _bucket,
    "s3_endpoint_url": _url(("http://", "https://")),
    "s3_ca_bundle": _existing_file,
    "s3_timeout_s": _float(0.1, 60),
    "jwt_jwks_url": _url(("https://", "http://")),
    "jwt_algorithms": _algorithms,
    "jwt_leeway_s": _int(0, 60),
    "lease_ttl_s": _int(1, 3600),
    "recent_timeline": _int(1, 1000),
    "hot_view_cache_mb": _int(0, 1024),
    "max_body_bytes": _int(1024, 64 * 1_048_576),
    "max_field_bytes": _int(256, 64 * 1_048_576),
    "max_events_per_append": _int(1, 10_000),
    "page_size_default": _int(1, 1000),
    "page_size_max": _int(1, 1000),
    "idempotency_ttl_s": _int(60, 30 * 86_400),
    "outbox_claim_idle_ms": _int(1000, 3_600_000),
    "outbox_max_deliveries": _int(1, 1000),
    "outbox_batch": _int(1, 10_000),
    "breaker_failures": _int(1, 1000),
    "breaker_reset_s": _float(0.1, 600),
    "retry_attempts": _int(1, 10),
    "retry_timeout_s": _float(0.1, 10),
    "rate_limit_per_s": _float(0, 100_000),
    "rate_limit_burst": _int(1, 1_000_000),
    "shutdown_grace_s": _int(1, 600),
    "log_level": _level,
    "metrics_port": _int(1, 65_535),
    "gc_freeze": _bool,
    "outbox_backoff_max_s": _float(0.1, 600),
    "outbox_park_after_s": _float(0, 7 * 86_400),
    "redis_batch": _bool,
    "mongodb_batch": _bool,
    "redis_wait_replicas": _int(0, 16),
    "redis_wait_timeout_ms": _int(1, 60_000),
    "idempotency_max_answer_bytes": _int(256, 16 * 1_048_576),
    "idempotency_max_keys_per_caller": _int(1, 10_000_000),
    "redis_sentinels": _host_ports,
    "redis_sentinel_tls": _bool,
    "lease_grace_s": _int(0, 30 * 86_400),
    "rate_limit_service_per_s": _float(0, 100_000),
    "rate_limit_service_burst": _int(1, 1_000_000),
    "max_head_bytes": _int(1024, 1_048_576),
    "max_headers": _int(10, 10_000),
    "header_timeout_s": _float(0.1, 600),
    "body_timeout_s": _float(0.1, 3600),
    "body_min_rate_bps": _int(0, 1_073_741_824),
    "max_connections": _int(1, 1_000_000),
    "jwt_max_lifetime_s": _int(1, 366 * 86_400),
    "jwt_require_iat": _bool,
    "health_cache_s": _float(0, 60),
    "max_sessions_per_owner": _int(1, 100_000_000),
    "max_participants": _int(1, 100_000),
    "max_timeline_events": _int(1, 1_000_000_000),
    "quota_privileged_factor": _int(1, 1_000_000),
    "timeline_page_max": _int(1, 10_000),
    "full_timeline_max": _int(1, 1_000_000),
    "idle_suspend_after": _duration(1, 30 * 86_400),
    "idle_sweep": _bool,
    "idle_sweep_interval_s": _float(0.1, 86_400),
    "idle_sweep_batch": _int(1, 10_000),
    "ui": _bool,
    "ui_cookie_key": _text,
    "ui_session_s": _int(60, 86_400),
    "feed_maxlen": _int(10, 10_000_000),
    "feed_heartbeat_s": _float(0.1, 3600),
    "feed_retry_ms": _int(0, 3_600_000),
    "feed_max_streams_per_principal": _int(1, 100_000),
    "feed_queue_size": _int(1, 1_000_000),
    "feed_retention_s": _int(1, 30 * 86_400),
    "redis_cluster": _bool,
    "redis_partitions": _int(1, 16_384),
    "quota_count_ttl_s": _float(0, 3600),
}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read `SESSIONMGR_*` from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.__struct_fields__:
        var = PREFIX + name.upper()
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            values[name] = _PARSERS.get(name, _text)(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{var}={raw!r} is invalid: {exc}") from None
    values.update(overrides)
    settings = Settings(**values)
    _check_jwt(settings)
    _check_sentinel(settings)
    _check_document_size(settings)
    if settings.ui_cookie_key is not None and len(settings.ui_cookie_key) < 32:
        raise ConfigError(f"{PREFIX}UI_COOKIE_KEY must be at least 32 characters")
    if settings.page_size_default > settings.page_size_max:
        raise ConfigError(
            f"{PREFIX}PAGE_SIZE_DEFAULT ({settings.page_size_default}) must not exceed "
            f"{PREFIX}PAGE_SIZE_MAX ({settings.page_size_max}): lower the default or raise the max"
        )
    return settings


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """`SESSIONMGR_*` names that match no setting: most often a typo that silently does nothing."""
    env = os.environ if environ is None else environ
    known = {PREFIX + name.upper() for name in Settings.__struct_fields__}
    known.add(PREFIX + "TEST_MONGODB_URI")  # read by the test suite, not the service
    return sorted(k for k in env if k.startswith(PREFIX) and k not in known)


def _check_jwt(s: Settings) -> None:
    sources = [n for n in ("jwt_secret", "jwt_public_key", "jwt_jwks_url") if getattr(s, n)]
    if len(sources) > 1:
        names = " and ".join(PREFIX + n.upper() for n in sources)
        raise ConfigError(f"set only one of {names}")
    if s.jwt_secret is not None and len(s.jwt_secret) < 32:
        raise ConfigError(f"{PREFIX}JWT_SECRET must be at least 32 characters")
    algs = set(s.jwt_algorithms)
    if s.jwt_secret and algs and not algs <= HMAC_ALGORITHMS:
        raise ConfigError(f"{PREFIX}JWT_ALGORITHMS must be HS* algorithms with JWT_SECRET")
    if (s.jwt_public_key or s.jwt_jwks_url) and algs and not algs <= ASYMMETRIC_ALGORITHMS:
        raise ConfigError(f"{PREFIX}JWT_ALGORITHMS must be RS*/ES*/PS* with a public key or JWKS")


def _check_document_size(s: Settings) -> None:
    """A session's MongoDB document must fit MongoDB's limit however full its fields are, or
    an acknowledged write could never be written behind (domain/rules.py)."""
    fit = participants_that_fit(s.max_field_bytes)
    if s.max_participants > fit:
        raise ConfigError(
            f"{PREFIX}MAX_FIELD_BYTES={s.max_field_bytes} with {PREFIX}MAX_PARTICIPANTS="
            f"{s.max_participants} lets a session's MongoDB document pass MongoDB's 16 MiB "
            f"limit ({FREE_FORM_FIELDS} fields of that size and that many participants): with "
            f"this MAX_FIELD_BYTES at most {fit} participants fit; lower one of them"
        )


def _check_sentinel(s: Settings) -> None:
    if s.redis_sentinels and not s.redis_sentinel_master:
        raise ConfigError(
            f"{PREFIX}REDIS_SENTINELS is set: set {PREFIX}REDIS_SENTINEL_MASTER to the name the "
            "sentinels monitor the master under (their `sentinel monitor <name> ...` line)"
        )
    if s.redis_sentinel_master and not s.redis_sentinels:
        raise ConfigError(
            f"{PREFIX}REDIS_SENTINEL_MASTER needs {PREFIX}REDIS_SENTINELS (host:port,host:port)"
        )
    if s.redis_cluster and s.redis_sentinels:
        raise ConfigError(
            f"set either {PREFIX}REDIS_CLUSTER or {PREFIX}REDIS_SENTINELS: a Redis Cluster "
            "elects its own masters, without sentinels"
        )
    if s.redis_cluster and s.redis_wait_replicas:
        raise ConfigError(
            f"{PREFIX}REDIS_WAIT_REPLICAS is not supported with {PREFIX}REDIS_CLUSTER yet: "
            "set it to 0 (a Cluster failover can then take writes acknowledged in its last "
            "moments, as a Redis crash can; see the README)"
        )


def require_jwt(settings: Settings) -> None:
    """`serve` refuses to start without a way to check tokens."""
    if not settings.jwt_configured:
        raise ConfigError(
            f"set one of {PREFIX}JWT_SECRET, {PREFIX}JWT_PUBLIC_KEY or {PREFIX}JWT_JWKS_URL"
        )


def effective_algorithms(settings: Settings) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    return ("HS256",) if settings.jwt_secret else ("RS256", "ES256")
