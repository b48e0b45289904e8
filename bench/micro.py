"""`python -m bench.micro`: CPU per request of the app called as ASGI in a loop, and of one
Redis command through each connection pool, in one process, no HTTP server, no load tool.

The steadier figure for a change to the hot path: no network stack, no wrk, no scheduler
noise from other processes, only `time.process_time()` around N calls. `app` sends a hot GET,
an update (PATCH), an append and a create straight to the Litestar app, and the hot GET's
session to the floor (`bench.baselines.floor`) the same way (a private redis-server,
the in-memory MongoDB, tracing off); `pool` times HGETALL through redis-py's
`BlockingConnectionPool`, its plain `ConnectionPool` and sessionmgr's `BoundedPool`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


async def per_call_us(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(min(2000, n // 4)):  # warm-up
        await fn()
    started = time.process_time()
    for _ in range(n):
        await fn()
    return (time.process_time() - started) / n * 1e6


async def app_figures(redis_url: str, n: int, mongodb_uri: str = "mongomock://") -> None:
    from bench import shape
    from bench.inprocess import bearer, build_app

    # Creates by the thousand for one owner: no quota (its count is measured all the same).
    app = build_app(redis_url, mongodb_uri=mongodb_uri, max_sessions_per_owner=100_000_000)
    auth = bearer().encode()
    answer: dict[str, Any] = {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] = message.get("body", b"")

    async def call(method: str, path: str, body: bytes = b"", to: Any = app) -> None:
        headers = [(b"host", b"bench"), (b"authorization", auth)]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 5555),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await to(scope, receive, send)

    async with app.lifespan():
        await call("POST", "/v1/sessions/", b'{"work_in_progress": {"step": 0}}')
        assert answer["status"] == 201, answer
        import msgspec

        created = msgspec.json.decode(answer["body"])
        path, version = f"/v1/sessions/{created['id']}", [created["version"]]

        async def hot_get() -> None:
            await call("GET", path)

        async def update() -> None:
            body = b'{"expected_version": %d, "patch": {"work_in_progress": {"step": %d}}}' % (
                version[0],
                version[0],
            )
            await call("PATCH", path, body)
            version[0] += 1

        timeline = f"{path}/timeline"
        create_body, append_body = shape.CREATE_BODY.encode(), shape.APPEND_BODY.encode()

        async def append() -> None:
            await call("POST", timeline, append_body)

        async def create() -> None:
            await call("POST", "/v1/sessions/", create_body)

        floor = floor_app(redis_url)

        async def floor_get() -> None:
            await call("GET", f"/floor/{created['id']}", to=floor)

        figures = (
            ("hot GET", hot_get, 200),
            ("floor GET", floor_get, 200),
            ("update", update, 200),
            ("append", append, 200),
            ("create", create, 201),
        )
        async with floor.lifespan():
            for name, fn, status in figures:
                # Each create adds a session the next one's quota count may scan: fewer of them.
                us = await per_call_us(fn, n if name != "create" else min(n, 500))
                assert answer["status"] == status, answer
                print(
                    f"{name}: {us:.1f} us of CPU per request (app only, in-process; "
                    f"MongoDB: {mongodb_uri.split(':')[0]})",
                    flush=True,
                )


def floor_app(redis_url: str) -> Any:
    """`bench.baselines.floor`'s app on `redis_url` (it reads the URL when it starts)."""
    import os

    os.environ["BENCH_REDIS_URL"] = redis_url
    from bench.baselines.floor import app

    return app


async def pool_figures(redis_url: str, n: int) -> None:
    from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

    from sessionmgr.storage.redis_pool import BoundedPool

    pools = (
        (
            "redis-py BlockingConnectionPool",
            BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=1),
        ),
        ("redis-py ConnectionPool", ConnectionPool.from_url(redis_url, max_connections=64)),
        ("sessionmgr BoundedPool", BoundedPool.from_url(redis_url, max_connections=64, timeout=1)),
    )
    for name, pool in pools:
        client = Redis(connection_pool=pool)
        await client.hset("bench-micro", mapping={"a": "1", "b": "2"})
        us = await per_call_us(lambda client=client: client.hgetall("bench-micro"), n)
        print(f"{name}: {us:.1f} us of CPU per HGETALL")
        await client.aclose()


WHAT_IFS = ("touch", "warm-insert", "quota-count", "view-cache", "redis-commit")


def what_if(skipped: Sequence[str]) -> None:
    """Measure without a step, to size what removing or moving it could give (never a
    configuration: the service is wrong without them). `touch`: the idle-index ZADD before
    each hot write, its own round trip; `warm-insert`: a create's MongoDB writes (as if they
    went through the outbox); `quota-count`: a create's count of the owner's sessions;
    `view-cache`: the views a write decides on without a read (storage/hot_views.py), as
    `SESSIONMGR_HOT_VIEW_CACHE_MB=0`; `redis-commit`: the commit script's round trip, answered
    as applied without Redis, so that an update's and an append's figures are the service's
    own CPU around it (the round trip's wait and wake are most of the figure with it, and
    most of its noise: the steadier figure for a change to their Python)."""
    from sessionmgr.storage import hot_views
    from sessionmgr.storage.hot import RedisHotStore
    from sessionmgr.storage.warm import MongoWarmStore

    async def touch(self: Any, session_id: str) -> None:
        return None

    async def insert(self: Any, record: Any) -> bool:
        return True

    async def count_owned(self: Any, owner_id: str, limit: int, other_than: Any = None) -> int:
        return 0

    async def applied(self: Any, client: Any, keys: list[str], words: list[Any]) -> int:
        return 1  # what the commit script answers when it applied the change

    for name in skipped:
        if name == "touch":
            RedisHotStore._touch = touch  # type: ignore[method-assign]
        elif name == "warm-insert":
            MongoWarmStore.insert = insert  # type: ignore[method-assign]
        elif name == "redis-commit":
            RedisHotStore._run_commit = applied  # type: ignore[method-assign]
        elif name == "quota-count":
            MongoWarmStore.count_owned = count_owned  # type: ignore[method-assign]
        elif name == "view-cache":
            real_init = hot_views.HotViews.__init__

            def no_views(self: Any, budget_bytes: int, real_init: Any = real_init) -> None:
                real_init(self, 0)

            hot_views.HotViews.__init__ = no_views  # type: ignore[method-assign]
        print(f"what-if: without {name}", flush=True)


async def measure(what: str, n: int, wire: bool) -> None:
    from bench.stack import running_stack
    from sessionmgr.devstack import RedisServer

    redis = RedisServer().start()
    try:
        if what in ("app", "all"):
            with running_stack(None, None) as stack:
                # --wire: the warm tier in a process of its own (its CPU not counted here).
                uri = stack.start_wire_mongo() if wire else "mongomock://"
                await app_figures(redis.url, n, uri)
        if what in ("pool", "all"):
            await pool_figures(redis.url, n)
    finally:
        redis.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("what", choices=["app", "pool", "all"], nargs="?", default="all")
    parser.add_argument("-n", type=int, default=20_000, help="calls per figure")
    parser.add_argument(
        "--wire",
        action="store_true",
        help="MongoDB: the wire-compatible server in its own process, not mongomock in this one",
    )
    parser.add_argument(
        "--without",
        default="",
        help=f"what-if, comma-separated, of: {', '.join(WHAT_IFS)} (see what_if)",
    )
    args = parser.parse_args(argv)
    skipped = [w for w in args.without.split(",") if w]
    if unknown := set(skipped) - set(WHAT_IFS):
        parser.error(f"--without: unknown {sorted(unknown)}")
    what_if(skipped)
    try:
        import uvloop

        uvloop.run(measure(args.what, args.n, args.wire))
    except ImportError:
        asyncio.run(measure(args.what, args.n, args.wire))
    return 0


if __name__ == "__main__":
    sys.exit(main())
