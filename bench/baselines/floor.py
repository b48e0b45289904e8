"""The floor: a bare Litestar route that does one HGETALL of a session's hash and returns it.

No auth, no decoding of the stored fields, no timeline: what any Python ASGI service on this
stack pays for one Redis round trip and a JSON answer. It gets every process-level saving
sessionmgr has (the same server, parser and pool, the heap frozen after start-up), so that it
stays a floor. Serve it with
`uvicorn bench.baselines.floor:app` and BENCH_REDIS_URL pointing at the seeded Redis.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from redis.asyncio import Redis

from bench.baselines import freeze_after_startup
from sessionmgr.storage.keys import hot
from sessionmgr.storage.redis_pool import BoundedPool

POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "64"))


@asynccontextmanager
async def redis_lifespan(app: Litestar) -> AsyncIterator[None]:
    pool = BoundedPool.from_url(
        os.environ["BENCH_REDIS_URL"], max_connections=POOL_SIZE, timeout=2.0
    )
    app.state.redis = Redis(connection_pool=pool, decode_responses=False)
    freeze_after_startup()
    try:
        yield
    finally:
        await app.state.redis.aclose()


@get("/floor/{session_id:str}")
async def floor_get(session_id: str, state: State) -> dict[str, str]:
    raw = await state.redis.hgetall(hot(session_id))  # sessionmgr's key: its partition's tag
    if not raw:
        raise NotFoundException()
    return {k.decode(): v.decode() for k, v in raw.items()}


app = Litestar(route_handlers=[floor_get], lifespan=[redis_lifespan], logging_config=None)
