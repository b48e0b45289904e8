"""The change feed's cost on the write path: an in-process loop of hot updates (the optimistic
transaction a PATCH runs) with the feed's XADD in each MULTI, and the same loop without it.

    python -m bench.feed_overhead [updates]

Prints both rates and the ratio (with / without). A private redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec
from redis.asyncio import Redis

from sessionmgr.devstack import RedisServer
from sessionmgr.domain.model import utcnow
from sessionmgr.services.ports import Change, HotView
from sessionmgr.storage.hot import RedisHotStore
from tests.unit.factories import SessionRecordFactory


async def _loop(store: RedisHotStore, updates: int) -> float:
    record = SessionRecordFactory.build(version=1)
    await store.create(record, None, b"{}")

    def decide(view: HotView) -> Change:
        new = msgspec.structs.replace(
            view.record, version=view.record.version + 1, last_active=utcnow()
        )
        new.work_in_progress = {"step": new.version}
        fields = frozenset({"version", "last_active", "work_in_progress"})
        return Change(record=new, fields=fields, result=b"{}")

    started = time.perf_counter()
    for _ in range(updates):
        await store.transact(record.id, decide, None)
    return updates / (time.perf_counter() - started)


async def main(updates: int) -> None:
    server = RedisServer().start()
    try:
        redis = Redis.from_url(server.url)
        with_feed = RedisHotStore(redis)
        without = RedisHotStore(redis)
        without._queue_feed = lambda *args: None  # type: ignore[method-assign]
        rates: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(3):  # interleaved rounds: the machine's noise hits both alike
            rates["without"].append(await _loop(without, updates))
            rates["with"].append(await _loop(with_feed, updates))
        await redis.aclose()
    finally:
        server.cleanup()
    best = {k: max(v) for k, v in rates.items()}
    print(f"updates/s without the feed: {best['without']:.0f}, with it: {best['with']:.0f}")
    print(f"ratio (with / without): {best['with'] / best['without']:.3f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
