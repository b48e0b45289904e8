"""SESSIONMGR_REDIS_WAIT_REPLICAS: "acknowledged" means "held by that many replicas" (WAIT).

A write that no replica confirms in time answers 503 "outcome unknown", never 200; with a
replica attached, every 200 is already on the replica when the client reads it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import msgspec
import pytest
import redis as redis_sync

from sessionmgr.container import build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.hot import decode_record, hot_key
from tests.integration.conftest import serving
from tests.support.redis_server import RedisServer

Headers = dict[str, str]


@pytest.fixture
def master() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def api(settings: Settings, master: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    # WAIT for 1 s, on connections that allow 2 s: a loaded CI machine does not make a
    # replicated write late (a refused write waits it out once).
    waiting = msgspec.structs.replace(
        settings,
        redis_url=master.url,
        redis_wait_replicas=1,
        redis_wait_timeout_ms=1000,
        redis_socket_timeout_s=2.0,
    )
    async with serving(build_container(waiting, write_behind=False)) as http:
        yield http


def attach_replica(master: RedisServer) -> RedisServer:
    replica = RedisServer()
    replica.persistence = (
        *RedisServer.persistence,
        *("--replicaof", "127.0.0.1", str(master.port)),
    )
    replica.start()
    probe = redis_sync.Redis.from_url(master.url)
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            slaves = [v for k, v in probe.info("replication").items() if k.startswith("slave")]
            if slaves and all(s.get("state") == "online" for s in slaves):
                return replica
            time.sleep(0.05)
    finally:
        probe.close()
    replica.stop()
    raise AssertionError("the replica did not come online within 15 s")


async def test_unreplicated_writes_are_503_and_replicated_ones_are_on_the_replica(
    api: httpx.AsyncClient, master: RedisServer, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    refused = await api.post("/v1/sessions", json={}, headers=owner)
    assert refused.status_code == 503, refused.text
    assert "0 of the 1 replicas" in refused.json()["detail"]

    replica = attach_replica(master)
    try:
        created = await api.post("/v1/sessions", json={"work_in_progress": {"n": 1}}, headers=owner)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        patched = await api.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": 1, "patch": {"work_in_progress": {"n": 2}}},
            headers=owner,
        )
        assert patched.status_code == 200, patched.text
        on_replica = redis_sync.Redis.from_url(replica.url).hgetall(hot_key(sid))
        record = decode_record(on_replica)
        assert (record.version, record.work_in_progress) == (2, {"n": 2})
    finally:
        replica.stop()
