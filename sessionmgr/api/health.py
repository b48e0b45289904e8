"""Health routes: liveness never touches a backend; readiness reports each backend's state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from sessionmgr.api.bridge import resolve
from sessionmgr.domain.errors import BackendUnavailable

CHECK_TIMEOUT_S = 1.0


class BackendState(msgspec.Struct):
    status: str
    detail: str | None = None


class Readiness(msgspec.Struct):
    """`ok`, or `degraded` (read-only: Redis down) — still 200 so replicas stay in the Service."""

    status: str
    backends: dict[str, BackendState]
    read_only: bool = False


async def _check(store: Any) -> BackendState:
    try:
        await asyncio.wait_for(store.ping(), CHECK_TIMEOUT_S)
    except (BackendUnavailable, TimeoutError, OSError) as exc:
        return BackendState(status="down", detail=str(exc) or type(exc).__name__)
    return BackendState(status="up")


class CachedReadiness:
    """One backend check serves every probe for `ttl_s`: an open, unauthenticated route must
    not turn each call into a PING and a MongoDB round trip. Concurrent callers share it.

    `seen` tells what the process already knows of its backends (the breakers' states): when
    it changes, the next call checks anew, so an outage or a recovery shows at once.
    """

    def __init__(
        self,
        check: Callable[[], Awaitable[tuple[int, Readiness]]],
        ttl_s: float,
        seen: Callable[[], object] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._seen = seen
        self._monotonic = monotonic
        self._answer: tuple[int, Readiness] | None = None
        self._answered_seeing: object = None
        self._until = -float("inf")
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return (
            self._answer is not None
            and self._monotonic() < self._until
            and self._seen() == self._answered_seeing
        )

    async def get(self) -> tuple[int, Readiness]:
        if self._fresh():
            assert self._answer is not None
            return self._answer
        async with self._lock:
            if not self._fresh():
                seeing = self._seen()  # a change during the check makes the next call check
                self._answer = await self._check()
                self._answered_seeing = seeing
                self._until = self._monotonic() + self._ttl_s
            assert self._answer is not None
            return self._answer


def _cached(state: State) -> CachedReadiness:
    cached: CachedReadiness | None = state.get("readiness")
    if cached is None:
        container = state.container
        breakers = container.breakers()
        cached = state["readiness"] = CachedReadiness(
            lambda: readiness(state),
            container.settings().health_cache_s,
            lambda: (breakers["redis"].state, breakers["mongodb"].state),
        )
    return cached


async def readiness(state: State) -> tuple[int, Readiness]:
    # Through the breakers: an open one answers at once, and a due one takes this as its trial.
    hot = await resolve(state.container.guarded_hot)
    warm = await resolve(state.container.guarded_warm)
    redis, mongodb = await asyncio.gather(_check(hot), _check(warm))
    read_only = redis.status != "up"
    backends = {"redis": redis, "mongodb": mongodb}
    down = [name for name, check in backends.items() if check.status != "up"]
    if len(down) == len(backends):
        return 503, Readiness(status="unavailable", backends=backends, read_only=read_only)
    # One backend down still serves part of the traffic (reads from MongoDB, or active
    # sessions from Redis); failing readiness would pull every replica out at once.
    return 200, Readiness(
        status="degraded" if down else "ok", backends=backends, read_only=read_only
    )


UNAVAILABLE = {
    503: ResponseSpec(data_container=Readiness, description="Redis and MongoDB are both down")
}


class HealthController(Controller):
    path = "/health"
    tags = ["health"]
    include_in_schema = True

    @get("/live", cache=False, operation_id="getLiveness", summary="Liveness")
    async def live(self) -> dict[str, str]:
        """The process answers; says nothing of the backends (a restart would not help them)."""
        return {"status": "alive"}

    @get(
        "/ready",
        cache=False,
        responses=UNAVAILABLE,
        operation_id="getReadiness",
        summary="Readiness",
    )
    async def ready(self, state: State) -> Response[Readiness]:
        """200 `ok` or `degraded` (a backend down); 503 only when both are unreachable."""
        status, body = await _cached(state).get()
        return Response(body, status_code=status)

    @get("/", cache=False, responses=UNAVAILABLE, operation_id="getHealth", summary="Health report")
    async def health(self, state: State) -> Response[Readiness]:
        """The readiness report, for people and the seed's `/health` probe."""
        status, body = await _cached(state).get()
        return Response(body, status_code=status)
