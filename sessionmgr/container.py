"""The composition root: the one place that picks and wires the concrete adapters."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from dependency_injector import containers, providers
from opentelemetry.trace import Tracer
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.metrics import serve_metrics
from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.metrics import Metrics
from sessionmgr.services.archive import Archivist
from sessionmgr.services.divergence import Reconciler
from sessionmgr.services.idle import IdleSweeper, sweeping
from sessionmgr.services.ports import HotStore, WarmStore
from sessionmgr.services.resilience import Breakers, Guarded, RetryPolicy, probing
from sessionmgr.services.sessions import Limits, SessionService
from sessionmgr.services.write_behind import WriteBehindWorker, running
from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage import keys
from sessionmgr.storage.cold import open_archive_store
from sessionmgr.storage.feed_hub import open_feed_hub
from sessionmgr.storage.hot import RedisHotStore, redis_client
from sessionmgr.storage.idle import RedisIdleIndex, RedisSweepLock
from sessionmgr.storage.outbox import RedisOutbox
from sessionmgr.storage.redis_nodes import SessionmgrCluster
from sessionmgr.storage.traced import traced
from sessionmgr.storage.warm import open_warm_store
from sessionmgr.telemetry import open_tracing, tracer_of

log = logging.getLogger(__name__)
# The change feed's shared reader blocks in XREAD this long (sessionmgr.storage.feed_hub).
FEED_BLOCK_MS = 1000
# XREADGROUP blocks this long; the worker's client waits a little longer for the reply.
WORKER_BLOCK_MS = 1000


async def open_redis(
    settings: Settings, socket_timeout_s: float | None = None, *, check: bool = False
) -> AsyncIterator[Redis]:
    client = redis_client(settings, socket_timeout_s=socket_timeout_s)
    try:
        if check:
            await checked_layout(client)
        yield client
    finally:
        await (client.close_all() if isinstance(client, SessionmgrCluster) else client.aclose())


async def checked_layout(client: Redis) -> None:
    """Refuse to start on a Redis laid out otherwise (storage/keys.py); a Redis that cannot be
    reached now is checked by no one (the replica starts read-only and serves what it can)."""
    try:
        await keys.check_layout(client)
    except (RedisError, RedisClusterException, OSError) as exc:
        log.warning("Redis key layout not checked at start (%s): Redis is unreachable", exc)


async def open_verifier(settings: Settings) -> AsyncIterator[TokenVerifier]:
    verifier = TokenVerifier(settings)
    try:
        yield verifier
    finally:
        await verifier.aclose()


class RedisWriteBehindWorker(WriteBehindWorker):
    """The write-behind on the Redis outbox (`RedisOutbox`), as every replica runs it."""

    def __init__(self, redis: Redis, warm: WarmStore, **options: Any) -> None:
        super().__init__(RedisOutbox(redis), warm, **options)


async def run_worker(
    redis: Redis,
    warm: WarmStore,
    settings: Settings,
    enabled: bool,
    metrics: Metrics | None = None,
    tracer: Tracer | None = None,
    reconciler: Reconciler | None = None,
) -> AsyncIterator[WriteBehindWorker | None]:
    if not enabled:
        yield None
        return
    worker = RedisWriteBehindWorker(
        redis,
        warm,
        batch=settings.outbox_batch,
        block_ms=WORKER_BLOCK_MS,
        claim_idle_ms=settings.outbox_claim_idle_ms,
        max_deliveries=settings.outbox_max_deliveries,
        park_after_s=settings.outbox_park_after_s,
        backoff_max_s=settings.outbox_backoff_max_s,
        metrics=metrics,
        tracer=tracer,
        reconciler=reconciler,
    )
    async with running(worker):
        yield worker


async def run_idle_sweep(
    sweeper: IdleSweeper, settings: Settings, enabled: bool
) -> AsyncIterator[IdleSweeper | None]:
    """The idle sweep in the background of a replica (not of a CLI run, which sweeps once)."""
    if not (enabled and settings.idle_sweep):
        yield None
        return
    async with sweeping(sweeper, settings.idle_sweep_interval_s):
        yield sweeper


def idle_sweeper_from(
    hot: HotStore, sessions: SessionService, redis: Redis, settings: Settings, metrics: Metrics
) -> IdleSweeper:
    """The sweep on the traced, guarded hot store, suspending through the service."""
    return IdleSweeper(
        hot,
        sessions.suspend_unattended,
        RedisIdleIndex(redis),
        RedisSweepLock(redis),
        idle_after_s=settings.idle_suspend_after,
        batch=settings.idle_sweep_batch,
        metrics=metrics,
    )


async def run_probe(hot: object, warm: object, breakers: Breakers) -> AsyncIterator[None]:
    async with probing({"redis": hot, "mongodb": warm}, breakers):
        yield


def retry_policy_from(settings: Settings) -> RetryPolicy:
    return RetryPolicy(attempts=settings.retry_attempts, timeout_s=settings.retry_timeout_s)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        recent_timeline=settings.recent_timeline,
        lease_ttl_s=settings.lease_ttl_s,
        max_field_bytes=settings.max_field_bytes,
        max_events_per_append=settings.max_events_per_append,
        page_size_default=settings.page_size_default,
        page_size_max=settings.page_size_max,
        idempotency_max_answer_bytes=settings.idempotency_max_answer_bytes,
        idempotency_max_keys_per_caller=settings.idempotency_max_keys_per_caller,
        lease_grace_s=settings.lease_grace_s,
        participants_role=settings.participants_role,
        max_sessions_per_owner=settings.max_sessions_per_owner,
        max_participants=settings.max_participants,
        max_timeline_events=settings.max_timeline_events,
        quota_privileged_factor=settings.quota_privileged_factor,
        timeline_page_max=settings.timeline_page_max,
        full_timeline_max=settings.full_timeline_max,
        quota_count_ttl_s=settings.quota_count_ttl_s,
    )


def hot_store_from(redis: Redis, settings: Settings, metrics: Metrics) -> RedisHotStore:
    """The Redis store, telling `metrics` what each write was decided on and how much it
    remembers of the sessions it wrote."""
    store = RedisHotStore(
        redis,
        recent_timeline=settings.recent_timeline,
        lease_ttl_s=settings.lease_ttl_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
        feed_maxlen=settings.feed_maxlen,
        feed_retention_s=settings.feed_retention_s,
        view_cache_mb=settings.hot_view_cache_mb,
        decided=metrics.hot_write_decided,
        batch_scripts=settings.redis_batch,
    )
    metrics.watch_hot_views(store.view_memory)
    return store


class Container(containers.DeclarativeContainer):
    settings = providers.Singleton(load_settings)
    run_write_behind = providers.Object(True)
    metrics = providers.Singleton(Metrics)
    metrics_listener = providers.Resource(serve_metrics, settings, metrics)
    tracer_provider = providers.Resource(open_tracing)
    tracer = providers.Singleton(tracer_of, tracer_provider)

    redis = providers.Resource(open_redis, settings, check=True)
    worker_redis = providers.Resource(
        open_redis, settings, socket_timeout_s=WORKER_BLOCK_MS / 1000 + 2
    )
    feed_redis = providers.Resource(open_redis, settings, socket_timeout_s=FEED_BLOCK_MS / 1000 + 2)
    warm = providers.Resource(open_warm_store, settings)
    verifier = providers.Resource(open_verifier, settings)
    cold = providers.Resource(open_archive_store, settings)

    hot = providers.Singleton(hot_store_from, redis, settings, metrics)
    # The service, the health probes and the write-behind reach the backends through their
    # breakers; `hot` and `warm` stay the bare adapters (tests inspect the stores through them).
    breakers = providers.Singleton(
        Breakers,
        metrics,
        fail_max=settings.provided.breaker_failures,
        reset_s=settings.provided.breaker_reset_s,
    )
    retry_policy = providers.Singleton(retry_policy_from, settings)
    guarded_hot = providers.Singleton(
        Guarded, hot, breakers.provided["redis"], retry_policy, metrics
    )
    guarded_warm = providers.Singleton(
        Guarded, warm, breakers.provided["mongodb"], retry_policy, metrics
    )
    probe = providers.Resource(run_probe, guarded_hot, guarded_warm, breakers)
    rate_limiter = providers.Singleton(
        RateLimiter,
        settings.provided.rate_limit_per_s,
        settings.provided.rate_limit_burst,
        metrics,
        service_per_s=settings.provided.rate_limit_service_per_s,
        service_burst=settings.provided.rate_limit_service_burst,
    )
    limits = providers.Singleton(limits_from, settings)
    guarded_cold = providers.Singleton(
        Guarded, cold, breakers.provided["s3"], retry_policy, metrics
    )
    # Services and the worker see the guarded stores through a span per call (retries and
    # fail-fast included); the health probes use the guarded stores and make no spans.
    traced_hot = providers.Singleton(traced, guarded_hot, tracer, "redis")
    traced_warm = providers.Singleton(traced, guarded_warm, tracer, "mongodb")
    traced_cold = providers.Singleton(traced, guarded_cold, tracer, "s3")
    archivist = providers.Singleton(Archivist, traced_hot, traced_warm, traced_cold, metrics)
    sessions = providers.Singleton(
        SessionService, traced_hot, traced_warm, limits, archivist, metrics
    )
    feed = providers.Resource(open_feed_hub, redis, feed_redis, metrics, settings)
    reconciler = providers.Singleton(Reconciler, traced_hot, traced_warm, metrics)
    write_behind = providers.Resource(
        run_worker,
        worker_redis,
        traced_warm,
        settings,
        run_write_behind,
        metrics,
        tracer,
        reconciler,
    )

    idle_sweeper = providers.Singleton(
        idle_sweeper_from, traced_hot, sessions, redis, settings, metrics
    )
    idle_sweep = providers.Resource(run_idle_sweep, idle_sweeper, settings, run_write_behind)


def build_container(settings: Settings | None = None, *, write_behind: bool = True) -> Container:
    container = Container()
    if settings is not None:
        container.settings.override(providers.Object(settings))
    container.run_write_behind.override(providers.Object(write_behind))
    return container
