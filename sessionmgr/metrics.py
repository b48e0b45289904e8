"""Every Prometheus metric sessionmgr exports, in one registry per process (or per test).

This module is the contract that `config/` (dashboard, alert rules) and the README rely on:
rename a family here and they must change with it. Counters appear on `/metrics` with the
`_total` suffix that prometheus-client adds (`sessionmgr_http_requests_total`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_MAX_CACHED_LABEL_SETS = 10_000  # route x method x status; unknown methods are not bounded
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# What a write in Redis is decided on (`sessionmgr_hot_write_decisions_total{on}`).
HOT_WRITE_DECISIONS = ("memory", "read", "refused_commit")


class BreakerState(IntEnum):
    """The value of `sessionmgr_circuit_breaker_state`."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Metrics:
    """The metric families; each app (and each test) gets its own registry, starting at zero."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._retrieval_children: dict[str, tuple[Any, Any]] = {}

        # HTTP, per route template.
        self.http_requests = Counter(
            "sessionmgr_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "sessionmgr_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=_FAST,
            registry=r,
        )

        # Reads, by the tier that answered them: hot (Redis), warm (MongoDB), cold (S3).
        self.retrievals = Counter(
            "sessionmgr_retrievals",
            "Session reads, by the tier that answered (hot, warm, cold).",
            ["tier"],
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "sessionmgr_retrieval_duration_seconds",
            "Time to read a session, by the tier that answered.",
            ["tier"],
            buckets=_FAST,
            registry=r,
        )

        # The optimistic write path and leases.
        self.version_conflicts = Counter(
            "sessionmgr_version_conflicts",
            "Writes refused with 409 because the session moved on, by operation.",
            ["operation"],
            registry=r,
        )
        self.write_contended = Counter(
            "sessionmgr_write_contended",
            "Requests answered 503 contended: beaten by other writers of the session (or kept "
            "waiting for their turn) for longer than a write may keep trying; also a suspend, "
            "archive or rehydrating read that the session moved under at each try.",
            registry=r,
        )
        self.hot_write_decisions = Counter(
            "sessionmgr_hot_write_decisions",
            "Write decisions in Redis, by the state they were decided on: this replica's "
            "memory of its last commit of the session (memory), a read (read), or the answer "
            "of a commit that another write had beaten (refused_commit).",
            ["on"],
            registry=r,
        )
        self._decision_children = {
            on: self.hot_write_decisions.labels(on) for on in HOT_WRITE_DECISIONS
        }
        self.hot_view_cache_bytes = Gauge(
            "sessionmgr_hot_view_cache_bytes",
            "Bytes of Redis hashes this replica remembers from its own commits "
            "(bounded by SESSIONMGR_HOT_VIEW_CACHE_MB).",
            registry=r,
        )
        self.hot_view_cache_sessions = Gauge(
            "sessionmgr_hot_view_cache_sessions",
            "Sessions this replica remembers from its own commits.",
            registry=r,
        )
        self.lease_operations = Counter(
            "sessionmgr_lease_operations",
            "Participant lease operations (join, renew, leave).",
            ["operation"],
            registry=r,
        )

        # The write-behind outbox (Redis stream -> MongoDB).
        self.outbox_pending = Gauge(
            "sessionmgr_outbox_pending",
            "Outbox entries not yet written to MongoDB.",
            registry=r,
        )
        self.outbox_lag = Gauge(
            "sessionmgr_outbox_lag_seconds",
            "Age of the oldest outbox entry not yet written to MongoDB (0 when empty).",
            registry=r,
        )
        self.outbox_dead_letters = Gauge(
            "sessionmgr_outbox_dead_letters",
            "Entries parked in the dead-letter stream after too many failed deliveries.",
            registry=r,
        )
        self.write_behind_entries = Counter(
            "sessionmgr_write_behind_entries",
            "Outbox entries handled by the write-behind worker, by outcome "
            "(applied, retried, parked, diverged).",
            ["outcome"],
            registry=r,
        )
        self.write_behind_backoff = Gauge(
            "sessionmgr_write_behind_backoff_seconds",
            "How long the write-behind waits before its next try (0 while MongoDB takes writes).",
            registry=r,
        )
        self.write_divergences = Counter(
            "sessionmgr_write_divergences",
            "Writes that reused a version or timeline seq MongoDB already held for another "
            "write (Redis lost acknowledged writes); each is kept in session_conflicts.",
            registry=r,
        )

        # Resilience.
        self.breaker_state = Gauge(
            "sessionmgr_circuit_breaker_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
            ["backend"],
            registry=r,
        )
        self.retries = Counter(
            "sessionmgr_retries",
            "Retries of transient backend errors, by backend and operation.",
            ["backend", "operation"],
            registry=r,
        )
        self.backend_errors = Counter(
            "sessionmgr_backend_errors",
            "Requests answered 503 because a backend was unavailable, by backend.",
            ["backend"],
            registry=r,
        )
        self.read_only = Gauge(
            "sessionmgr_read_only",
            "1 while Redis is unreachable and the service answers reads only.",
            registry=r,
        )
        self.rate_limited = Counter(
            "sessionmgr_rate_limited_requests",
            "Requests refused with 429 by the per-principal rate limit.",
            registry=r,
        )

        # The cold tier.
        self.archives = Counter(
            "sessionmgr_archives",
            "Sessions archived to S3, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.archive_latency = Histogram(
            "sessionmgr_archive_duration_seconds",
            "Time to archive one session to S3.",
            buckets=_SLOW,
            registry=r,
        )
        self.rehydrations = Counter(
            "sessionmgr_rehydrations",
            "Archived sessions restored from S3 to MongoDB, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.rehydrate_latency = Histogram(
            "sessionmgr_rehydrate_duration_seconds",
            "Time to restore one archived session from S3.",
            buckets=_SLOW,
            registry=r,
        )

        # The idle sweep (services/idle.py): active sessions left alone are suspended.
        self.idle_suspended = Counter(
            "sessionmgr_idle_suspended",
            "Active sessions the idle sweep suspended (no write and no live lease for "
            "SESSIONMGR_IDLE_SUSPEND_AFTER).",
            registry=r,
        )
        self.idle_sweeps = Counter(
            "sessionmgr_idle_sweeps",
            "Idle sweeps, by outcome (done, locked: another replica held the lock, error).",
            ["outcome"],
            registry=r,
        )
        self.idle_sweep_latency = Histogram(
            "sessionmgr_idle_sweep_duration_seconds",
            "Time one idle sweep took (the lock held).",
            buckets=_SLOW,
            registry=r,
        )

        # The change feed (sessionmgr.services.feed).
        self.feed_streams = Gauge(
            "sessionmgr_feed_open_streams",
            "Change feeds (GET /v1/sessions/{id}/changes) open on this replica.",
            registry=r,
        )
        self.feed_events = Counter(
            "sessionmgr_feed_events_delivered",
            "Change-feed events handed to subscribers, by event name.",
            ["kind"],
            registry=r,
        )
        self.feed_resets = Counter(
            "sessionmgr_feed_resets",
            "`reset` events sent: position no longer retained (`gone`) or subscriber too slow "
            "(`overflow`).",
            ["reason"],
            registry=r,
        )
        self.feed_lag = Histogram(
            "sessionmgr_feed_lag_seconds",
            "From a feed entry's commit (its stream id's time) to its hand-off to a subscriber.",
            buckets=_FAST,
            registry=r,
        )

    # The per-request calls: `labels()` takes a lock and builds a key each time, so the
    # children of the label sets seen are kept (a bounded map; prometheus-client returns the
    # same child for the same labels, and nothing here ever removes one).
    def request_answered(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(route, method, str(status)),
                self.http_latency.labels(route, method),
            )
            if len(self._http_children) < _MAX_CACHED_LABEL_SETS:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def session_retrieved(self, tier: str, seconds: float) -> None:
        children = self._retrieval_children.get(tier)
        if children is None:
            children = (self.retrievals.labels(tier), self.retrieval_latency.labels(tier))
            self._retrieval_children[tier] = children  # three tiers
        children[0].inc()
        children[1].observe(seconds)

    def hot_write_decided(self, on: str) -> None:
        """A write decided in Redis on `on`: memory, read or refused_commit (`RedisHotStore`)."""
        self._decision_children[on].inc()

    def watch_hot_views(self, size: Callable[[], tuple[int, int]]) -> None:
        """Read the view memory's (sessions, bytes) at each scrape."""
        self.hot_view_cache_sessions.set_function(lambda: size()[0])
        self.hot_view_cache_bytes.set_function(lambda: size()[1])
