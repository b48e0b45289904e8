"""The composition root: the one place that picks and wires the concrete adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dependency_injector import containers, providers
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.metrics import serve_metrics
from sessionmgr.metrics import Metrics
from sessionmgr.services.ports import WarmStore
from sessionmgr.services.sessions import Limits, SessionService
from sessionmgr.services.write_behind import WriteBehindWorker, running
from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage.hot import RedisHotStore, redis_client
from sessionmgr.storage.traced import traced
from sessionmgr.storage.warm import open_warm_store
from sessionmgr.telemetry import open_tracing, tracer_of

# XREADGROUP blocks this long; the worker's client waits a little longer for the reply.
WORKER_BLOCK_MS = 1000


async def open_redis(
    settings: Settings, socket_timeout_s: float | None = None
) -> AsyncIterator[Redis]:
    client = redis_client(settings, socket_timeout_s=socket_timeout_s)
    try:
        yield client
    finally:
        await client.aclose()


async def open_verifier(settings: Settings) -> AsyncIterator[TokenVerifier]:
    verifier = TokenVerifier(settings)
    try:
        yield verifier
    finally:
        await verifier.aclose()


async def run_worker(
    redis: Redis,
    warm: WarmStore,
    settings: Settings,
    enabled: bool,
    metrics: Metrics | None = None,
    tracer: Tracer | None = None,
) -> AsyncIterator[WriteBehindWorker | None]:
    if not enabled:
        yield None
        return
    worker = WriteBehindWorker(
        redis,
        warm,
        batch=settings.outbox_batch,
        block_ms=WORKER_BLOCK_MS,
        claim_idle_ms=settings.outbox_claim_idle_ms,
        max_deliveries=settings.outbox_max_deliveries,
        metrics=metrics,
        tracer=tracer,
    )
    async with running(worker):
        yield worker


def limits_from(settings: Settings) -> Limits:
    return Limits(
        recent_timeline=settings.recent_timeline,
        lease_ttl_s=settings.lease_ttl_s,
        max_field_bytes=settings.max_field_bytes,
        max_events_per_append=settings.max_events_per_append,
        page_size_default=settings.page_size_default,
        page_size_max=settings.page_size_max,
    )


class Container(containers.DeclarativeContainer):
    settings = providers.Singleton(load_settings)
    run_write_behind = providers.Object(True)
    metrics = providers.Singleton(Metrics)
    metrics_listener = providers.Resource(serve_metrics, settings, metrics)
    tracer_provider = providers.Resource(open_tracing)
    tracer = providers.Singleton(tracer_of, tracer_provider)

    redis = providers.Resource(open_redis, settings)
    worker_redis = providers.Resource(
        open_redis, settings, socket_timeout_s=WORKER_BLOCK_MS / 1000 + 2
    )
    warm = providers.Resource(open_warm_store, settings)
    verifier = providers.Resource(open_verifier, settings)

    hot = providers.Singleton(
        RedisHotStore,
        redis,
        recent_timeline=settings.provided.recent_timeline,
        lease_ttl_s=settings.provided.lease_ttl_s,
        idempotency_ttl_s=settings.provided.idempotency_ttl_s,
    )
    # Services and the worker see the stores through a span per call; health checks do not.
    traced_hot = providers.Singleton(traced, hot, tracer, "redis")
    traced_warm = providers.Singleton(traced, warm, tracer, "mongodb")
    limits = providers.Singleton(limits_from, settings)
    sessions = providers.Singleton(SessionService, traced_hot, traced_warm, limits, metrics)
    write_behind = providers.Resource(
        run_worker, worker_redis, traced_warm, settings, run_write_behind, metrics, tracer
    )


def build_container(settings: Settings | None = None, *, write_behind: bool = True) -> Container:
    container = Container()
    if settings is not None:
        container.settings.override(providers.Object(settings))
    container.run_write_behind.override(providers.Object(write_behind))
    return container
