"""MongoDB unreachable: active sessions keep working from Redis, the outbox grows, and once
MongoDB is back the write-behind drains it and MongoDB converges to the latest versions.

The adapter is made to fail where it meets the driver: every collection call raises
ServerSelectionTimeoutError, as Motor does when no server answers.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import httpx
import pytest
from pymongo.errors import ServerSelectionTimeoutError

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.faults.test_redis_outage import sample
from tests.integration.session_api import create_session, eventually, patch_session

Headers = dict[str, str]


class Unreachable:
    """Stands in for a Motor collection or database whose server does not answer."""

    def __getattr__(self, name: str) -> Unreachable:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Unreachable:
        return self

    def __await__(self) -> Generator[Any, None, None]:
        raise ServerSelectionTimeoutError("no MongoDB server answered (fault injected)")
        yield  # pragma: no cover


def take_down(monkeypatch: pytest.MonkeyPatch, warm: MongoWarmStore) -> None:
    for attribute in ("_db", "_sessions", "_events"):
        monkeypatch.setattr(warm, attribute, Unreachable())


async def metric(api: httpx.AsyncClient, name: str) -> float | None:
    return sample((await api.get("/metrics")).text, name)


async def test_active_sessions_work_from_redis_and_mongodb_catches_up(
    fault_api: httpx.AsyncClient,
    fault_container: Container,
    auth: Callable[..., Headers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = auth()
    warm: MongoWarmStore = await resolve(fault_container.warm)
    active = [(await create_session(fault_api, owner))["id"] for _ in range(3)]
    dormant = (await create_session(fault_api, owner))["id"]
    assert (await fault_api.post(f"/v1/sessions/{dormant}/suspend", headers=owner)).is_success

    take_down(monkeypatch, warm)
    latest = {}
    for sid in active:
        version = 1
        for n in range(3):
            answer = await patch_session(fault_api, owner, sid, version, work_in_progress={"n": n})
            version = answer["version"]
        latest[sid] = version
        read = await fault_api.get(f"/v1/sessions/{sid}", headers=owner)
        assert read.status_code == 200
        assert read.json()["version"] == version

    pending = await eventually(
        lambda: metric(fault_api, "sessionmgr_outbox_pending"), lambda v: (v or 0) >= 9
    )
    assert pending is not None and pending >= 9, "the outbox holds every undelivered update"
    lag = await metric(fault_api, "sessionmgr_outbox_lag_seconds")
    assert lag is not None and lag > 0
    gone = await fault_api.get(f"/v1/sessions/{dormant}", headers=owner)
    assert gone.status_code == 503
    assert gone.json()["backend"] == "mongodb"
    assert int(gone.headers["retry-after"]) >= 1
    created = await fault_api.post("/v1/sessions", json={}, headers=owner)
    assert created.status_code == 503
    assert created.json()["backend"] == "mongodb"
    ready = await fault_api.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert ready.json()["backends"]["mongodb"]["status"] == "down"
    assert ready.json()["read_only"] is False

    monkeypatch.undo()

    async def mongo_versions() -> dict[str, int]:
        return {sid: (record.version if (record := await warm.get(sid)) else 0) for sid in latest}

    assert await eventually(mongo_versions, lambda v: v == latest, timeout_s=15) == latest
    assert (
        await eventually(lambda: metric(fault_api, "sessionmgr_outbox_pending"), lambda v: v == 0)
        == 0
    )
    assert await metric(fault_api, "sessionmgr_outbox_lag_seconds") == 0
    assert (await fault_api.get(f"/v1/sessions/{dormant}", headers=owner)).status_code == 200
