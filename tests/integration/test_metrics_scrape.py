"""A scripted workload, then one scrape of `/metrics`: each family shows what the workload did."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from sessionmgr.container import build_container
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import ContextUpdate, SessionRecord, TimelineEvent
from sessionmgr.services.ports import OutboxEntry
from sessionmgr.settings import Settings
from sessionmgr.storage.hot import OUTBOX_STREAM, RedisHotStore
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.conftest import serving
from tests.integration.session_api import create_session, eventually, get_session

Headers = Callable[..., dict[str, str]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SESSION = "/v1/sessions/{session_id}"

# Each of these shows its values in the second test below; the first checks they are exposed.
EXPOSED_ELSEWHERE = [
    "sessionmgr_outbox_pending",
    "sessionmgr_outbox_lag_seconds",
    "sessionmgr_circuit_breaker_state",
    "sessionmgr_retries",
    "sessionmgr_backend_errors",
    "sessionmgr_read_only",
    "sessionmgr_rate_limited_requests",
    "sessionmgr_archives",
    "sessionmgr_archive_duration_seconds",
    "sessionmgr_rehydrations",
    "sessionmgr_rehydrate_duration_seconds",
]


async def scrape(api: httpx.AsyncClient) -> tuple[set[str], Samples]:
    r = await api.get("/metrics")
    assert r.status_code == 200, r.text
    families = list(text_string_to_metric_families(r.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def call(api: httpx.AsyncClient, method: str, url: str, status: int, **kw: Any) -> Any:
    r = await api.request(method, url, **kw)
    assert r.status_code == status, r.text
    return r.json() if r.content else None


async def test_the_scrape_shows_exactly_what_the_workload_did(
    api: httpx.AsyncClient,
    redis: Redis,
    auth: Headers,
    monkeypatch: pytest.MonkeyPatch,
):
    real_apply, calls = MongoWarmStore.apply, []

    async def rejects_the_first(
        self: MongoWarmStore,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        calls.append(record.id)
        if len(calls) == 1:
            raise RuntimeError("document failed validation")  # retried, then delivered
        return await real_apply(self, record, events, context)

    async def one_at_a_time(self: MongoWarmStore, entries: Sequence[OutboxEntry]) -> list[int]:
        return list(range(len(entries)))  # every entry through `apply`, whatever the batch

    monkeypatch.setattr(MongoWarmStore, "apply", rejects_the_first)
    monkeypatch.setattr(MongoWarmStore, "apply_many", one_at_a_time)
    h = auth()

    hot = (await create_session(api, h))["id"]
    dormant = (await create_session(api, h))["id"]
    await call(api, "POST", f"/v1/sessions/{dormant}/suspend", 200, headers=h)
    await get_session(api, h, hot)  # hot read
    await get_session(api, h, dormant)  # warm read
    patch = {"expected_version": 1, "patch": {"work_in_progress": {"step": 1}}}
    await call(api, "PATCH", f"/v1/sessions/{hot}", 200, json=patch, headers=h)  # outbox: 1
    await call(api, "PATCH", f"/v1/sessions/{hot}", 409, json=patch, headers=h)
    stale = {"events": [{"kind": "note", "data": {}}], "expected_version": 1}
    await call(api, "POST", f"/v1/sessions/{hot}/timeline", 409, json=stale, headers=h)
    participants = f"/v1/sessions/{hot}/participants"
    await call(api, "POST", participants, 200, json={"mad_name": "planner"}, headers=h)  # 2
    await call(api, "PUT", f"{participants}/planner/lease", 200, headers=h)
    await call(api, "DELETE", f"{participants}/planner", 204, headers=h)  # outbox: 3
    await redis.xadd(OUTBOX_STREAM, {"sid": hot, "junk": "not an entry"})  # parked at once

    async def settled() -> tuple[int, float, float]:
        # The worker counts an entry just after its acknowledgement (or its parking) empties
        # the stream: wait for both, then check the counts are exactly the workload's.
        samples = (await scrape(api))[1]
        entries = "sessionmgr_write_behind_entries_total"
        applied = value(samples, entries, outcome="applied") or 0.0
        parked = value(samples, entries, outcome="parked") or 0.0
        return int(await redis.xlen(OUTBOX_STREAM)), applied, parked

    left, *_ = await eventually(settled, lambda s: s[0] == 0 and s[1] >= 3 and s[2] >= 1)
    assert left == 0
    names, samples = await scrape(api)

    assert value(samples, "sessionmgr_retrievals_total", tier="hot") == 1
    assert value(samples, "sessionmgr_retrievals_total", tier="warm") == 1
    assert value(samples, "sessionmgr_retrievals_total", tier="cold") is None
    assert value(samples, "sessionmgr_retrieval_duration_seconds_count", tier="hot") == 1
    assert value(samples, "sessionmgr_retrieval_duration_seconds_count", tier="warm") == 1
    hot_seconds = value(samples, "sessionmgr_retrieval_duration_seconds_sum", tier="hot")
    assert hot_seconds is not None and hot_seconds > 0

    assert value(samples, "sessionmgr_version_conflicts_total", operation="update") == 1
    assert value(samples, "sessionmgr_version_conflicts_total", operation="append") == 1
    for operation in ("join", "renew", "leave"):
        assert value(samples, "sessionmgr_lease_operations_total", operation=operation) == 1
    # The first PATCH reads; each 409 is refused on memory, then read and refused again; the
    # lease's join, renewal and leave each decide on what the write before them left.
    decisions = "sessionmgr_hot_write_decisions_total"
    assert value(samples, decisions, on="read") == 3
    assert value(samples, decisions, on="memory") == 5
    assert value(samples, decisions, on="refused_commit") == 0
    assert value(samples, "sessionmgr_hot_view_cache_sessions") == 1
    remembered = value(samples, "sessionmgr_hot_view_cache_bytes")
    assert remembered is not None and remembered > 0

    assert value(samples, "sessionmgr_write_behind_entries_total", outcome="applied") == 3
    assert value(samples, "sessionmgr_write_behind_entries_total", outcome="retried") == 1
    assert value(samples, "sessionmgr_write_behind_entries_total", outcome="parked") == 1
    assert value(samples, "sessionmgr_outbox_dead_letters") == 1

    requests = "sessionmgr_http_requests_total"
    assert value(samples, requests, route="/v1/sessions", method="POST", status="201") == 2
    assert value(samples, requests, route=SESSION, method="GET", status="200") == 2
    assert value(samples, requests, route=SESSION, method="PATCH", status="200") == 1
    assert value(samples, requests, route=SESSION, method="PATCH", status="409") == 1
    timeline = f"{SESSION}/timeline"
    assert value(samples, requests, route=timeline, method="POST", status="409") == 1
    latency = "sessionmgr_http_request_duration_seconds_count"
    assert value(samples, latency, route=SESSION, method="PATCH") == 2
    assert value(samples, latency, route="/v1/sessions", method="POST") == 2

    for name in EXPOSED_ELSEWHERE:
        assert name in names, name


async def test_metrics_start_at_zero_for_each_app(api: httpx.AsyncClient):
    _, samples = await scrape(api)
    assert value(samples, "sessionmgr_retrievals_total", tier="hot") is None
    assert value(samples, "sessionmgr_outbox_dead_letters") == 0
    for on in ("memory", "read", "refused_commit"):  # shown at 0, so a rate is never empty
        assert value(samples, "sessionmgr_hot_write_decisions_total", on=on) == 0
    assert value(samples, "sessionmgr_hot_view_cache_sessions") == 0


class FlakyRedisLoads:
    """RedisHotStore.load that fails as an unreachable Redis does while `down` is set."""

    def __init__(self) -> None:
        self.down, self.calls = False, 0

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = RedisHotStore.load

        async def load(store: RedisHotStore, session_id: str) -> Any:
            if self.down:
                self.calls += 1
                raise BackendUnavailable("redis", "connection refused (injected)")
            return await real(store, session_id)

        monkeypatch.setattr(RedisHotStore, "load", load)


@pytest.fixture
def outage_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings,
        breaker_failures=2,
        breaker_reset_s=600,  # stays open for the rest of the test
        rate_limit_per_s=0.001,  # no refill within the test
        rate_limit_burst=12,
    )


async def test_the_scrape_shows_breakers_retries_limits_and_the_cold_tier(
    outage_settings: Settings, auth: Headers, monkeypatch: pytest.MonkeyPatch
):
    flaky = FlakyRedisLoads()
    flaky.patch(monkeypatch)
    async with serving(build_container(outage_settings)) as api:
        h = auth("carol")
        sid = (await create_session(api, h))["id"]  # 1 request of carol's 12
        await call(api, "POST", f"/v1/sessions/{sid}/archive", 200, headers=h)  # 2
        await get_session(api, h, sid)  # 3: rehydrated from S3, a cold retrieval

        flaky.down = True
        # The first read's load is tried 3 times (tests/conftest.py: stamina's test mode): the
        # try and the first retry fail and open Redis' breaker (2 failures), the second retry
        # fails fast, as do the next reads, without asking Redis. MongoDB answers them all.
        for _ in range(3):  # 4-6
            await get_session(api, h, sid)
        patch = {"expected_version": 1, "patch": {"work_in_progress": {"x": 1}}}
        r = await api.patch(f"/v1/sessions/{sid}", json=patch, headers=h)  # 7: read-only
        assert r.status_code == 503, r.text
        for _ in range(5):  # 8-12
            await api.get(f"/v1/sessions/{sid}", headers=h)
        r = await api.get(f"/v1/sessions/{sid}", headers=h)  # 13: over the burst
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1

        _, samples = await scrape(api)

    assert flaky.calls == 2  # then the open breaker failed fast
    assert value(samples, "sessionmgr_retries_total", backend="redis", operation="load") == 2
    assert value(samples, "sessionmgr_circuit_breaker_state", backend="redis") == 2  # open
    assert value(samples, "sessionmgr_circuit_breaker_state", backend="mongodb") == 0
    assert value(samples, "sessionmgr_circuit_breaker_state", backend="s3") == 0
    assert value(samples, "sessionmgr_read_only") == 1
    assert value(samples, "sessionmgr_backend_errors_total", backend="redis") == 1  # the PATCH
    assert value(samples, "sessionmgr_rate_limited_requests_total") == 1

    assert value(samples, "sessionmgr_archives_total", outcome="ok") == 1
    assert value(samples, "sessionmgr_archive_duration_seconds_count") == 1
    assert value(samples, "sessionmgr_rehydrations_total", outcome="ok") == 1
    assert value(samples, "sessionmgr_rehydrate_duration_seconds_count") == 1
    assert value(samples, "sessionmgr_retrievals_total", tier="cold") == 1
    # Every read after the rehydration came from MongoDB (Redis was "down"; the session was
    # never reactivated), the rehydrating one is counted as cold only.
    assert value(samples, "sessionmgr_retrievals_total", tier="warm") == 8
    assert value(samples, "sessionmgr_retrievals_total", tier="hot") is None
    assert value(samples, "sessionmgr_outbox_pending") == 0
    assert value(samples, "sessionmgr_outbox_lag_seconds") == 0
