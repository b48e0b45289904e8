"""SIGTERM during a write load on a real `sessionmgr serve`: nothing acknowledged is lost.

uvicorn stops accepting, finishes the requests in flight (within SESSIONMGR_SHUTDOWN_GRACE_S),
then the lifespan stops the write-behind after its current entry and closes the clients.

Every update answered 2xx must be in Redis. For MongoDB the honest check depends on the
engine: with a real MongoDB (SESSIONMGR_TEST_MONGODB_URI, marker `mongodb`) a drain after the
shutdown must bring MongoDB to every acknowledged version. With the in-memory engine the
process's MongoDB dies with it, so the test checks what another replica would find: every
acknowledged version the process had not delivered is still in the outbox, and draining that
outbox into a MongoDB holding the sessions brings each of them to its acknowledged version.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.container import RedisWriteBehindWorker as WriteBehindWorker
from sessionmgr.devstack import free_port
from sessionmgr.domain.model import SessionState
from sessionmgr.settings import load_settings
from sessionmgr.storage.hot import OUTBOX_STREAM, OutboxEntry
from sessionmgr.storage.warm import MongoWarmStore, open_warm_store
from tests.conftest import JWT_SECRET
from tests.integration.session_api import hot_record
from tests.integration.test_warm_store_contract import real_mongodb_uri  # noqa: F401

Headers = dict[str, str]
WRITERS = 6
LOAD_BEFORE_SIGTERM_S = 1.5
START_TIMEOUT_S = 30.0
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


class Served:
    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def serve(redis_url: str, mongodb_uri: str, mongodb_db: str, log: Path) -> Served:
    """`sessionmgr serve` in a process of its own; its log goes to a file (a pipe nobody
    reads would fill up and stall the server)."""
    port = free_port()
    env = {
        **os.environ,
        "SESSIONMGR_REDIS_URL": redis_url,
        "SESSIONMGR_MONGODB_URI": mongodb_uri,
        "SESSIONMGR_MONGODB_DB": mongodb_db,
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
        "SESSIONMGR_RATE_LIMIT_PER_S": "0",
        "SESSIONMGR_SHUTDOWN_GRACE_S": "10",
        "SESSIONMGR_LOG_LEVEL": "INFO",
    }
    process = launch(env, port, log)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url) as http:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if (await http.get("/health/live")).status_code == 200:
                    return Served(process, base_url, log)
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"sessionmgr serve did not start: {read_log(log)[-2000:]}")


def launch(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(  # fixed argv, no shell
            [
                *(sys.executable, "-m", "sessionmgr", "serve"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


async def write_until_refused(
    http: httpx.AsyncClient, owner: Headers, sid: str, acked: dict[str, int]
) -> None:
    """PATCH one session again and again, noting each version answered 2xx."""
    version = acked[sid]
    while True:
        body = {"expected_version": version, "patch": {"work_in_progress": {"v": version + 1}}}
        try:
            answer = await http.patch(f"/v1/sessions/{sid}", json=body, headers=owner)
        except httpx.TransportError:
            return  # the server stopped accepting
        if answer.status_code == 503:
            return  # shutting down mid-request is allowed to refuse, never to lose
        assert answer.status_code == 200, answer.text
        version = answer.json()["version"]
        acked[sid] = version


async def run_load_and_sigterm(served: Served, auth: Callable[..., Headers]) -> dict[str, int]:
    owner = auth()
    acked: dict[str, int] = {}
    limits = httpx.Limits(max_connections=WRITERS * 2)
    async with httpx.AsyncClient(base_url=served.base_url, limits=limits, timeout=15) as http:
        for _ in range(WRITERS):
            created = await http.post("/v1/sessions", json={}, headers=owner)
            assert created.status_code == 201, created.text
            acked[created.json()["id"]] = 1
        writers = [
            asyncio.create_task(write_until_refused(http, owner, sid, acked)) for sid in acked
        ]
        await asyncio.sleep(LOAD_BEFORE_SIGTERM_S)
        served.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*writers), timeout=30)
    await asyncio.to_thread(served.process.wait, timeout=30)
    log = read_log(served.log)
    # uvicorn ends by re-raising the signal it handled, once everything is shut down.
    assert served.process.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert "write-behind worker" in log and "stopped" in log, log[-2000:]
    assert "did not stop" not in log
    assert "Traceback" not in log, log[-4000:]
    assert sum(acked.values()) > WRITERS, "the load wrote before the signal"
    return acked


async def assert_in_redis(redis: Redis, acked: dict[str, int]) -> None:
    for sid, version in acked.items():
        record = await hot_record(redis, sid)
        assert record is not None, f"session {sid} vanished"
        assert record.version >= version, f"{sid}: acknowledged v{version}, Redis v{record.version}"
        if record.version == version and version > 1:
            assert record.work_in_progress == {"v": version}


async def outbox_latest(redis: Redis) -> dict[str, int]:
    latest: dict[str, int] = {}
    for _id, fields in await redis.xrange(OUTBOX_STREAM):
        entry = _decode_entry(fields[b"entry"])
        latest[entry.record.id] = max(latest.get(entry.record.id, 0), entry.record.version)
    return latest


async def drain(redis_url: str, warm: MongoWarmStore) -> None:
    """What a surviving replica does: its worker delivers the outbox, orphaned entries too."""
    redis = Redis.from_url(redis_url)
    worker = WriteBehindWorker(redis, warm, block_ms=10, claim_idle_ms=1)
    try:
        await worker.ensure_group()
        for _ in range(100):
            await worker.step()
            if not await worker.pending():
                break
            await asyncio.sleep(0.01)
        assert await worker.pending() == 0, "the outbox did not drain"
    finally:
        await redis.aclose()


async def warm_store(uri: str, db: str) -> AsyncIterator[MongoWarmStore]:
    resource = open_warm_store(load_settings({}, mongodb_uri=uri, mongodb_db=db))
    store = await anext(resource)
    try:
        yield store
    finally:
        if uri != "mongomock://":
            await store._client.drop_database(db)
        await resource.aclose()


async def test_sigterm_during_writes_loses_nothing_acknowledged(
    redis_url: str, redis_client: Redis, auth: Callable[..., Headers], tmp_path: Path
) -> None:
    served = await serve(redis_url, "mongomock://", "sessionmgr", tmp_path / "serve.log")
    acked = await run_load_and_sigterm(served, auth)
    await assert_in_redis(redis_client, acked)

    # The process's in-memory MongoDB is gone; a replica's would hold what it delivered. What
    # it had not delivered must still be in the outbox, at the acknowledged version or later.
    pending = await outbox_latest(redis_client)
    for sid, version in pending.items():
        assert version >= acked[sid]
    # Draining that outbox into a MongoDB that has the sessions brings each to its version.
    async for warm in warm_store("mongomock://", "drain"):
        for sid in pending:
            record = await hot_record(redis_client, sid)
            assert record is not None
            await warm.insert(msgspec.structs.replace(record, version=1, state=SessionState.ACTIVE))
        await drain(redis_url, warm)
        for sid in pending:
            stored = await warm.get(sid)
            assert stored is not None
            assert stored.version >= acked[sid]


@pytest.mark.mongodb
async def test_sigterm_then_drain_mongodb_has_every_acknowledged_version(
    redis_url: str,
    redis_client: Redis,
    auth: Callable[..., Headers],
    real_mongodb_uri: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    db = f"t{secrets.token_hex(4)}"
    served = await serve(redis_url, real_mongodb_uri, db, tmp_path / "serve.log")
    acked = await run_load_and_sigterm(served, auth)
    await assert_in_redis(redis_client, acked)
    async for warm in warm_store(real_mongodb_uri, db):
        await drain(redis_url, warm)
        for sid, version in acked.items():
            stored: Any = await warm.get(sid)
            assert stored is not None and stored.version >= version
