"""The client against three `sessionmgr serve` replicas sharing one redis-server and one
MongoDB (the wire-compatible server the server's multi-replica tests use): concurrent
update() calls spread over the replicas lose nothing, and a takeover on one replica fences
the participant writing through another."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import token_for
from sessionmgr_client import AsyncClient, Fenced, Session

from tests.conftest import JWT_SECRET
from tests.support.redis_server import RedisServer
from tests.support.replicas import Replica, service_env, start_all
from tests.support.wire_mongo import LABEL as WIRE
from tests.support.wire_mongo import WireMongoServer

LEASE_TTL_S = 2


@pytest.fixture(scope="module")
def urls() -> Iterator[list[str]]:
    pytest.importorskip("nx_27017", reason=f"the {WIRE} (nx-27017) is not installed")
    wire = WireMongoServer().start()
    redis = RedisServer().start()
    env = service_env(
        redis_url=redis.url,
        mongodb_uri=wire.uri,
        mongodb_db=f"client{secrets.token_hex(4)}",
        jwt_secret=JWT_SECRET,
        rate_limit_per_s="0",
        lease_ttl_s=str(LEASE_TTL_S),
        log_level="WARNING",
        gc_freeze="false",
    )
    log_dir = Path(tempfile.mkdtemp(prefix="sessionmgr-client-replicas-"))
    replicas = [Replica(f"replica-{i}", env, log_dir) for i in range(3)]
    try:
        start_all(replicas)
        yield [r.url for r in replicas]
    finally:
        for replica in replicas:
            replica.stop()
        redis.cleanup()
        wire.cleanup()


async def test_thirty_updates_through_three_replicas_lose_nothing(urls: list[str]) -> None:
    token = token_for(f"alice-{secrets.token_hex(4)}")
    clients = [AsyncClient(url, token=token) for url in urls]
    try:
        sid = (await clients[0].create_session(work_in_progress={"n": 0})).id

        def increment(session: Session) -> dict[str, Any]:
            return {"work_in_progress": {"n": session.work_in_progress["n"] + 1}}

        await asyncio.gather(
            *(clients[i % 3].update(sid, increment, max_attempts=100) for i in range(30))
        )
        for client in clients:
            final = await client.get_session(sid)
            assert (final.work_in_progress, final.version) == ({"n": 30}, 31)
    finally:
        for client in clients:
            await client.aclose()


async def test_a_takeover_on_another_replica_fences_the_old_holder(urls: list[str]) -> None:
    owner_token = token_for(f"alice-{secrets.token_hex(4)}")
    mad = f"planner-{secrets.token_hex(4)}"
    async with (
        AsyncClient(urls[0], token=owner_token) as owner,
        AsyncClient(urls[1], token=token_for(f"mad:{mad}")) as stalled,
        AsyncClient(urls[2], token=token_for(f"mad:{mad}")) as newer,
    ):
        sid = (await owner.create_session()).id
        await owner.join(sid, mad)
        async with stalled.participant(sid, mad, renew_every=60) as old:
            await asyncio.sleep(LEASE_TTL_S + 0.4)
            await newer.join(sid, mad)
            with pytest.raises(Fenced):
                await old.append([{"kind": "stale"}])
        assert (await owner.get_session(sid)).recent_timeline == []
