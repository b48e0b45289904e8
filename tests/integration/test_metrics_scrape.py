"""A scripted workload, then one scrape of `/metrics`: each family shows what the workload did."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from sessionmgr.domain.model import ContextUpdate, SessionRecord, TimelineEvent
from sessionmgr.storage.hot import OUTBOX_STREAM
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import create_session, eventually, get_session

Headers = Callable[..., dict[str, str]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SESSION = "/v1/sessions/{session_id}"

# Wired by the resilience and cold-tier work: here only their presence is checked.
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

    monkeypatch.setattr(MongoWarmStore, "apply", rejects_the_first)
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

    async def outbox_left() -> int:
        return int(await redis.xlen(OUTBOX_STREAM))

    assert await eventually(outbox_left, lambda n: n == 0) == 0
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
