"""The peer the original design named: FastAPI + pydantic, the same hot GET and update.

Same JWT check (PyJWT, HS256, `exp` and `sub` required), same RBAC rule (owner, ACL or role
admin), same Redis operations on the same keys as sessionmgr's hot tier: a pipelined HGETALL +
LRANGE for a GET; WATCH, HGETALL, compare the version, MULTI, HSET + XADD, EXEC for a PATCH.
pydantic models validate the body and shape the answer. Its pool is redis-py's stock
`BlockingConnectionPool`, what a peer built on stock redis-py has (sessionmgr's `BoundedPool`
saves about 15 us per command, docs/benchmarks.md); its heap is frozen after start-up as
sessionmgr's is. Serve it with
`uvicorn bench.baselines.fastapi_app:app`, BENCH_REDIS_URL and BENCH_JWT_SECRET set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import WatchError

from bench.baselines import freeze_after_startup
from sessionmgr.storage import keys as layout

POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "64"))
OUTBOX = "bench_fastapi_outbox"  # not sessionmgr's stream: its write-behind must not see these
ETAG = re.compile(r'^"?(\d{1,18})"?$')


class Principal(BaseModel):
    sub: str
    roles: list[str] = []


class TimelineEvent(BaseModel):
    seq: int
    at: datetime
    actor: str
    kind: str
    data: dict[str, Any] = {}


class Participant(BaseModel):
    joined_at: datetime
    lease_expires_at: datetime
    active: bool = False


class Session(BaseModel):
    id: str
    version: int
    state: str
    owner_id: str
    acl: list[str] = []
    created_at: datetime
    last_active: datetime
    participants: dict[str, Participant] = {}
    work_in_progress: dict[str, Any] = {}
    context_summary: dict[str, Any] = {}
    recent_timeline: list[TimelineEvent] = []
    archive: dict[str, Any] | None = None


class PatchFields(BaseModel, extra="forbid"):
    work_in_progress: dict[str, Any] | None = None
    context_summary: dict[str, Any] | None = None


class PatchBody(BaseModel, extra="forbid"):
    expected_version: int | None = Field(default=None, ge=1)
    patch: PatchFields


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = BlockingConnectionPool.from_url(
        os.environ["BENCH_REDIS_URL"], max_connections=POOL_SIZE, timeout=2.0
    )
    app.state.redis = Redis(connection_pool=pool)
    app.state.secret = os.environ["BENCH_JWT_SECRET"]
    freeze_after_startup()
    try:
        yield
    finally:
        await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token")
    try:
        claims = jwt.decode(
            token,
            request.app.state.secret,
            algorithms=["HS256"],
            leeway=30,
            options={"require": ["exp", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise HTTPException(401, "token is invalid") from exc
    return Principal(sub=claims["sub"], roles=claims.get("roles", []))


Caller = Annotated[Principal, Depends(principal)]


def require_access(caller: Principal, owner_id: str, acl: list[str]) -> None:
    if caller.sub != owner_id and caller.sub not in acl and "admin" not in caller.roles:
        raise HTTPException(403, "forbidden")


def keys(session_id: str) -> tuple[str, str]:
    return layout.hot(session_id), layout.timeline(session_id)  # sessionmgr's keys


_NOT_FIELDS = frozenset({b"timeline_seq", b"rev"})


def to_session(raw: dict[bytes, bytes], recent: list[bytes]) -> Session:
    # The hash's bookkeeping fields are not the session's (sessionmgr's `decode_record` skips
    # them too): `rev`, its write stamp, is not even JSON.
    fields = {k.decode(): json.loads(v) for k, v in raw.items() if k not in _NOT_FIELDS}
    return Session(**fields, recent_timeline=[json.loads(e) for e in recent])


@app.get("/v1/sessions/{session_id}", response_model=Session)
async def get_session(
    session_id: str, caller: Caller, request: Request, response: Response
) -> Session:
    hot, timeline = keys(session_id)
    async with request.app.state.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(hot)
        pipe.lrange(timeline, 0, -1)
        raw, recent = await pipe.execute()
    if not raw:
        raise HTTPException(404, "no such session")
    session = to_session(raw, recent)
    require_access(caller, session.owner_id, session.acl)
    response.headers["ETag"] = f'"{session.version}"'
    return session


@app.patch("/v1/sessions/{session_id}", response_model=Session)
async def update_session(
    session_id: str,
    body: PatchBody,
    caller: Caller,
    request: Request,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> Session | JSONResponse:
    match = ETAG.fullmatch(if_match.strip()) if if_match else None
    expected = body.expected_version or (int(match.group(1)) if match else None)
    if expected is None:
        raise HTTPException(428, "expected_version or If-Match is required")
    hot, timeline = keys(session_id)
    changes = body.patch.model_dump(exclude_none=True)
    for _ in range(8):
        async with request.app.state.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(hot)
                raw = await pipe.hgetall(hot)
                if not raw:
                    raise HTTPException(404, "no such session")
                recent = await pipe.lrange(timeline, 0, -1)
                session = to_session(raw, recent)
                require_access(caller, session.owner_id, session.acl)
                if session.version != expected:
                    return JSONResponse(
                        {
                            "status": 409,
                            "instance": f"/v1/sessions/{session_id}",
                            "current_version": session.version,
                        },
                        status_code=409,
                    )
                now = datetime.now(UTC)
                new = session.model_copy(
                    update={**changes, "version": session.version + 1, "last_active": now}
                )
                written = {k: json.dumps(v) for k, v in changes.items()}
                written["version"] = str(new.version)
                written["last_active"] = json.dumps(now.isoformat().replace("+00:00", "Z"))
                pipe.multi()
                pipe.hset(hot, mapping=written)
                pipe.xadd(
                    OUTBOX, {"sid": session_id, "entry": new.model_dump_json()}, maxlen=10_000
                )
                await pipe.execute()
            except WatchError:
                continue
        response.headers["ETag"] = f'"{new.version}"'
        return new
    raise HTTPException(409, "too many concurrent writers")
