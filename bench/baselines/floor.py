"""The floors: bare Litestar routes that do the least a session store's operation can do.

No auth, no checks, no decoding of the stored fields, no idempotency, no change feed: what any
Python ASGI service on this stack pays for the operation's round trips and a JSON answer. They
get every process-level saving sessionmgr has (the same server, parser and pool, the heap
frozen after start-up), so that they stay floors. Serve them with
`uvicorn bench.baselines.floor:app`, BENCH_REDIS_URL pointing at the seeded Redis and, for the
create, BENCH_MONGODB_URI at the warm tier's server.

- `GET /floor/{id}`: one HGETALL of the session's hash, returned.
- `POST /v1/sessions/{id}/timeline`: the body's events (checked as JSON, kept as the bytes
  sent) and a write-behind entry in one EVALSHA, as sessionmgr's commit is one (HINCRBY of a
  version, RPUSH of each event, XADD of the change to a stream that nothing drains, trimmed to
  `OUTBOX_CAP` entries), on keys of the floor's own (`floor:...`), so that the seeded sessions
  stay as sessionmgr left them.
- `POST /v1/sessions`: one `insert_one` of the session's document into the warm tier, then one
  HSET of its hash, as DESIGN §2 orders a create (MongoDB first). Through Motor, as
  sessionmgr; `BENCH_FLOOR_MONGO_CLIENT=pymongo` takes PyMongo's own asyncio client instead
  (no thread hand-off per call), a what-if outside the project's stack.

A floor is not a service: it is what 10x the peer is held against (`bench/report.py`). When a
floor's CPU per request is above a tenth of the peer's, no change to sessionmgr that keeps
this stack and these round trips reaches 10x on one core.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import PathParameter
from redis.asyncio import Redis

from bench.baselines import freeze_after_startup
from sessionmgr.storage.keys import hot
from sessionmgr.storage.redis_pool import BoundedPool

POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "64"))
OUTBOX_CAP = 100_000  # the floor's stream is never drained: keep Redis' memory bounded
OUTBOX = b"floor:outbox"
SessionId = Annotated[str, PathParameter()]
# An append in one command, as sessionmgr's commit is one EVALSHA: the version, the events, and
# the change for a write-behind. KEYS: hash, timeline, outbox; ARGV: id, events as one JSON
# array, then each event.
APPEND_LUA = f"""
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('RPUSH', KEYS[2], unpack(ARGV, 3))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', {OUTBOX_CAP}, '*', 'sid', ARGV[1], 'events', ARGV[2])
return version
"""


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    pool = BoundedPool.from_url(
        os.environ["BENCH_REDIS_URL"], max_connections=POOL_SIZE, timeout=2.0
    )
    app.state.redis = Redis(connection_pool=pool, decode_responses=False)
    app.state.append_sha = await app.state.redis.script_load(APPEND_LUA)
    app.state.sessions = None
    mongo: Any = None
    if uri := os.environ.get("BENCH_MONGODB_URI"):
        if os.environ.get("BENCH_FLOOR_MONGO_CLIENT") == "pymongo":  # a what-if: not the stack
            from pymongo import AsyncMongoClient

            mongo = AsyncMongoClient(uri, maxPoolSize=POOL_SIZE)
        else:  # Motor, as sessionmgr (Beanie) uses it
            from motor.motor_asyncio import AsyncIOMotorClient

            mongo = AsyncIOMotorClient(uri, maxPoolSize=POOL_SIZE)
        app.state.sessions = mongo[os.environ.get("BENCH_MONGODB_DB", "bench_floor")]["sessions"]
    freeze_after_startup()
    try:
        yield
    finally:
        await app.state.redis.aclose()
        if mongo is not None:
            closed = mongo.close()
            if closed is not None:  # PyMongo's async client closes as a coroutine
                await closed


@get("/floor/{session_id:str}")
async def floor_get(session_id: SessionId, state: State) -> dict[str, str]:
    raw = await state.redis.hgetall(hot(session_id))  # sessionmgr's key: its partition's tag
    if not raw:
        raise NotFoundException()
    return {k.decode(): v.decode() for k, v in raw.items()}


class _Append(msgspec.Struct):
    events: list[msgspec.Raw]  # each event's bytes as sent: checked as JSON, never rebuilt


class _Create(msgspec.Struct):
    work_in_progress: dict[str, Any] = {}
    context_summary: dict[str, Any] = {}


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ValidationException(str(exc)) from exc


@post("/v1/sessions/{session_id:str}/timeline", status_code=200)
async def floor_append(
    session_id: SessionId, request: Request[Any, Any, Any], state: State
) -> dict[str, Any]:
    events = [bytes(e) for e in _decode(await request.body(), _Append).events]
    if not events:
        raise ValidationException("events must not be empty")
    keys = (f"floor:session:{session_id}", f"floor:timeline:{session_id}", OUTBOX)
    version = await state.redis.execute_command(
        "EVALSHA", state.append_sha, 3, *keys, session_id, b"[" + b",".join(events) + b"]", *events
    )
    return {"id": session_id, "version": version, "appended": len(events)}


@post("/v1/sessions", status_code=201)
async def floor_create(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    body = _decode(await request.body(), _Create)
    if state.sessions is None:
        raise NotFoundException("BENCH_MONGODB_URI is not set: the create floor is off")
    sid = uuid.uuid4().hex
    now = datetime.now(UTC)
    doc = {
        "_id": sid,
        "version": 1,
        "state": "active",
        "owner_id": "bench",
        "created_at": now,
        "last_active": now,
        "work_in_progress": body.work_in_progress,
        "context_summary": body.context_summary,
    }
    await state.sessions.insert_one(doc)
    await state.redis.hset(
        f"floor:session:{sid}",
        mapping={
            "version": 1,
            "owner_id": "bench",
            "work_in_progress": msgspec.json.encode(body.work_in_progress),
            "context_summary": msgspec.json.encode(body.context_summary),
        },
    )
    return {"id": sid, "version": 1}


app = Litestar(
    route_handlers=[floor_get, floor_append, floor_create],
    lifespan=[lifespan],
    logging_config=None,
)
