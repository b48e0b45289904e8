"""`python -m bench.drain`: how fast the write-behind carries a backlog into the warm tier.

A write rate the write-behind cannot sustain is not a rate (issue 16): this fills the outbox
with appends made through the app (called as ASGI in this process, its own worker off), then
starts one write-behind worker, as a replica runs it, and times it until the outbox is empty:
entries per second (wall clock) and the worker's CPU per entry (this process's CPU time; the
warm tier runs in a process of its own and is not counted). `--one-at-a-time` makes the
worker deliver every entry alone through `apply` (what it did before batches), so both are
measured on one machine in one run:

    python -m bench.drain --entries 5000 --sessions 100
    python -m bench.drain --entries 5000 --sessions 100 --one-at-a-time

The warm tier is the wire-compatible server of the test bed (nx-27017 over SQLite, not
MongoDB), or the MongoDB that `--mongodb-uri` names.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Sequence
from typing import Any


class OneAtATime:
    """The warm store as the worker met it before batches: `apply_many` leaves every entry
    to `apply`."""

    def __init__(self, warm: Any) -> None:
        self._warm = warm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._warm, name)

    async def apply_many(self, entries: Sequence[Any]) -> list[int]:
        return list(range(len(entries)))


async def fill(app: Any, entries: int, sessions: int) -> None:
    """`sessions` sessions, then `entries` appends of one event each over them, in turn."""
    import httpx

    from bench import shape
    from bench.inprocess import bearer

    headers = {"authorization": bearer(), "content-type": "application/json"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        ids = []
        for _ in range(sessions):
            r = await client.post("/v1/sessions", content=shape.CREATE_BODY, headers=headers)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        async def append(n: int) -> None:
            path = f"/v1/sessions/{ids[n % sessions]}/timeline"
            r = await client.post(path, content=shape.APPEND_BODY, headers=headers)
            assert r.status_code == 200, r.text

        for start in range(0, entries, 32):  # 32 at a time, as concurrent clients would
            await asyncio.gather(*(append(n) for n in range(start, min(entries, start + 32))))


async def drain(
    redis_url: str,
    mongodb_uri: str,
    db: str,
    batch: int,
    one_at_a_time: bool = False,
    server: Any = None,
) -> tuple[int, float, float, float | None]:
    """Run one worker until the outbox is empty: (entries, wall seconds, CPU seconds, and the
    CPU seconds of `server`, the warm tier's process, when it is one of the stack's)."""
    from sessionmgr.container import RedisWriteBehindWorker
    from sessionmgr.settings import load_settings
    from sessionmgr.storage.hot import redis_client
    from sessionmgr.storage.warm import open_warm_store

    settings = load_settings({}, redis_url=redis_url, mongodb_uri=mongodb_uri, mongodb_db=db)
    redis = redis_client(settings)
    resource = open_warm_store(settings)
    warm = await anext(resource)
    try:
        worker = RedisWriteBehindWorker(
            redis,
            OneAtATime(warm) if one_at_a_time else warm,
            consumer="drain",
            batch=batch,
            block_ms=10,
        )
        await worker.ensure_group()
        backlog = await worker.pending()
        served = server.cpu_s() if server is not None else 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        while await worker.pending():
            await worker.step(block_ms=10)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server_cpu = server.cpu_s() - served if server is not None else None
        stored = await warm._events.count_documents({})
        if stored != backlog:  # one event per append: MongoDB must hold every one
            raise SystemExit(f"the warm tier holds {stored} events, {backlog} were appended")
        return backlog, wall, cpu, server_cpu
    finally:
        await resource.aclose()
        await redis.aclose()


async def measure(args: argparse.Namespace) -> tuple[int, float]:
    from bench.inprocess import build_app
    from bench.stack import running_stack
    from sessionmgr.devstack import RedisServer

    redis = RedisServer().start()
    try:
        with running_stack(None, None) as stack:
            uri = args.mongodb_uri or stack.start_wire_mongo()
            db = f"bench_drain_{secrets.token_hex(3)}"
            app = build_app(
                redis.url, mongodb_uri=uri, mongodb_db=db, max_sessions_per_owner=100_000_000
            )
            async with app.lifespan():
                await fill(app, args.entries, args.sessions)
            server = next((p for p in stack.procs if p.name == "wire-mongo"), None)
            entries, wall_s, cpu_s, server_s = await drain(
                redis.url, uri, db, args.batch, args.one_at_a_time, server
            )
            how = "one entry at a time" if args.one_at_a_time else f"batches of {args.batch}"
            served = (
                ""
                if server_s is None
                else f"; its server's CPU {server_s / entries * 1e6:.0f} us per entry "
                f"({server_s / wall_s:.0%} of a core)"
            )
            print(
                f"write-behind, {how}: {entries} entries over {args.sessions} sessions drained "
                f"in {wall_s:.2f} s = {entries / wall_s:.0f} entries/s; "
                f"worker CPU {cpu_s / entries * 1e6:.0f} us per entry; every event in MongoDB "
                f"(warm tier: {'given URI' if args.mongodb_uri else 'wire-compatible server'})"
                + served,
                flush=True,
            )
            return entries, wall_s
    finally:
        redis.cleanup()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--entries", type=int, default=5000, help="appends to drain")
    parser.add_argument("--sessions", type=int, default=100, help="sessions they go to")
    parser.add_argument("--batch", type=int, default=1000, help="SESSIONMGR_OUTBOX_BATCH")
    parser.add_argument("--one-at-a-time", action="store_true", help="the worker before batches")
    parser.add_argument("--mongodb-uri", default="", help="a MongoDB to use instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(measure(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
