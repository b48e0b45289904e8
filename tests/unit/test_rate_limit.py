"""The per-principal token bucket, and the 429 it answers through the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.app import create_app
from sessionmgr.container import build_container
from sessionmgr.domain.errors import RateLimited
from sessionmgr.metrics import Metrics
from sessionmgr.settings import Settings


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admits_spends_as_take_does_and_a_refusal_changes_and_counts_nothing() -> None:
    """The read lane's question (sessionmgr/api/lane.py): it hands a refusal to `take`."""
    clock, metrics = Clock(), Metrics()
    limiter = RateLimiter(per_s=2, burst=2, metrics=metrics, clock=clock)
    assert limiter.admits("alice")
    limiter.take("alice")
    for _ in range(3):
        assert not limiter.admits("alice")
    assert metrics.registry.get_sample_value("sessionmgr_rate_limited_requests_total") == 0
    with pytest.raises(RateLimited) as refused:
        limiter.take("alice")
    assert refused.value.retry_after_s == 1  # as if no refusal came before it
    assert metrics.registry.get_sample_value("sessionmgr_rate_limited_requests_total") == 1
    clock.now += 0.5
    assert limiter.admits("alice")  # the refill ran through the refusals
    assert not limiter.admits("alice")
    assert RateLimiter(per_s=0, burst=1).admits("bob")  # no limit


def test_a_refused_caller_stays_the_most_recent_and_keeps_its_empty_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(per_s=1, burst=1, clock=clock, max_principals=2)
    limiter.take("alice")
    limiter.take("bob")
    assert not limiter.admits("alice")  # refused: alice is now the most recent of the two
    limiter.take("carol")  # drops the least recent: bob
    with pytest.raises(RateLimited):
        limiter.take("alice")  # still empty: not dropped, so not refilled


def test_a_burst_then_the_steady_rate() -> None:
    clock, metrics = Clock(), Metrics()
    limiter = RateLimiter(per_s=2, burst=3, metrics=metrics, clock=clock)
    for _ in range(3):
        limiter.take("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.take("alice")
    assert refused.value.retry_after_s == 1
    limiter.take("bob")  # each principal has its own bucket
    clock.now += 0.5
    limiter.take("alice")  # one token back after 1/rate seconds
    with pytest.raises(RateLimited):
        limiter.take("alice")
    assert metrics.registry.get_sample_value("sessionmgr_rate_limited_requests_total") == 2


def test_a_refusal_describes_the_policy() -> None:
    limiter = RateLimiter(per_s=2, burst=3, clock=Clock())
    for _ in range(3):
        limiter.take("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.take("alice")
    assert (refused.value.policy, refused.value.quota, refused.value.window_s) == ("default", 3, 2)


def test_services_have_a_limit_of_their_own() -> None:
    limiter = RateLimiter(per_s=1, burst=1, service_per_s=10, service_burst=5, clock=Clock())
    for _ in range(5):
        limiter.take("svc", service=True)
    with pytest.raises(RateLimited) as refused:
        limiter.take("svc", service=True)
    assert (refused.value.policy, refused.value.quota) == ("service", 5)
    limiter.take("alice")
    with pytest.raises(RateLimited):
        limiter.take("alice")


def test_without_a_service_limit_services_share_the_default() -> None:
    limiter = RateLimiter(per_s=1, burst=1, clock=Clock())
    limiter.take("svc", service=True)
    with pytest.raises(RateLimited) as refused:
        limiter.take("svc", service=True)
    assert refused.value.policy == "default"


def test_a_service_limit_of_zero_means_none() -> None:
    limiter = RateLimiter(per_s=1, burst=1, service_per_s=0, clock=Clock())
    for _ in range(100):
        limiter.take("svc", service=True)


def test_a_slow_rate_says_how_long_to_wait() -> None:
    limiter = RateLimiter(per_s=0.1, burst=1, clock=Clock())
    limiter.take("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.take("alice")
    assert refused.value.retry_after_s == 10


def test_zero_turns_it_off() -> None:
    limiter = RateLimiter(per_s=0, burst=1, clock=Clock())
    assert not limiter.enabled
    for _ in range(100):
        limiter.take("alice")


def test_the_least_recently_seen_principal_is_forgotten_first() -> None:
    clock = Clock()
    limiter = RateLimiter(per_s=1, burst=1, max_principals=2, clock=clock)
    limiter.take("alice")
    limiter.take("bob")
    limiter.take("carol")  # alice, seen least recently, is dropped: a full bucket again
    limiter.take("alice")
    with pytest.raises(RateLimited):
        limiter.take("carol")


async def test_the_api_answers_429_with_retry_after(
    settings: Settings, auth: Callable[..., dict[str, str]]
) -> None:
    changed = msgspec.structs.replace(settings, rate_limit_per_s=0.01, rate_limit_burst=2)
    limited = build_container(changed, write_behind=False)
    async with AsyncTestClient(app=create_app(limited)) as client:
        answers = [await client.get("/v1/sessions", headers=auth()) for _ in range(3)]
        other = await client.get("/v1/sessions", headers=auth("bob"))
        health = await client.get("/health/live")
        metrics = await client.get("/metrics")
    assert [a.status_code for a in answers] == [200, 200, 429]
    refused: Any = answers[2]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["status"] == 429
    assert other.status_code == 200, "the limit is per principal"
    assert health.status_code == 200, "operational routes are not limited"
    assert "sessionmgr_rate_limited_requests_total 1.0" in metrics.text
