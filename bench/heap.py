"""`python -m bench.heap`: how long one full garbage collection stalls a sessionmgr replica,
with its start-up heap left to the collector and frozen (`SESSIONMGR_GC_FREEZE`).

Starts the app as a replica does (a private redis-server, the in-memory MongoDB, the S3 client
configured but not called), creates sessions through the API, then times `gc.collect()`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Sequence


def _full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1000


async def measure(sessions: int) -> None:
    import httpx

    from bench.inprocess import bearer, build_app
    from sessionmgr.devstack import RedisServer

    redis = RedisServer().start()
    try:
        # Not frozen at start-up: frozen by hand below, after the first figures.
        app = build_app(redis.url, gc_freeze=False)
        headers = {"Authorization": bearer()}
        transport = httpx.ASGITransport(app=app)
        async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/schema/openapi.json")
            print(f"after start-up: {len(gc.get_objects())} objects tracked by the collector")
            print(f"  one full collection: {_full_collection_ms():.1f} ms")
            for i in range(sessions):
                r = await c.post(
                    "/v1/sessions/",
                    json={"work_in_progress": {"step": i}, "context_summary": {"s": "x" * 200}},
                    headers=headers,
                )
                r.raise_for_status()
            print(f"after {sessions} creates: {len(gc.get_objects())} objects")
            print(f"  one full collection: {_full_collection_ms():.1f} ms")
            gc.freeze()
            print(f"frozen: {gc.get_freeze_count()} objects out of the collector's reach")
            print(f"  one full collection: {_full_collection_ms():.1f} ms")
            gc.unfreeze()
    finally:
        redis.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heap", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args(argv)
    asyncio.run(measure(args.sessions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
