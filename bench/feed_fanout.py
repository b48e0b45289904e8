"""The change feed's fan-out alone (no HTTP): one replica's hub with N subscribers over M
sessions, a writer committing feed entries at a fixed rate, and the time from each commit's
reply to each subscriber's hand-off.

    python -m bench.feed_fanout [subscribers] [sessions] [changes_per_s] [seconds]

Not the `nox -s bench` scenario of issue 13 (HTTP, uvicorn, 1 000 SSE connections): it
measures what the shared reader and the queues add, and the Redis connections they hold.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

import msgspec

from sessionmgr.devstack import RedisServer
from sessionmgr.metrics import Metrics
from sessionmgr.settings import load_settings
from sessionmgr.storage import feed
from sessionmgr.storage.feed_hub import FeedHub
from sessionmgr.storage.hot import redis_client


async def main(subscribers: int, sessions: int, rate: float, seconds: float) -> None:
    server = RedisServer().start()
    try:
        settings = load_settings({}, redis_url=server.url)  # the app's pool: 64 connections
        redis = redis_client(settings)
        reader = redis_client(settings, socket_timeout_s=5)
        hub = FeedHub(redis, reader, Metrics(), queue_size=1024, max_per_principal=subscribers)
        sids = [secrets.token_hex(16) for _ in range(sessions)]
        committed: dict[int, float] = {}  # version -> when its commit was sent
        lags: list[float] = []
        before = len(await redis.client_list())

        async def consume(i: int) -> None:
            sub, first = await hub.open(sids[i % sessions], "bench", None, 0)
            async for item in hub.events(sub, first):
                if item is not None:
                    version = msgspec.json.decode(item.data)["version"]
                    lags.append(time.perf_counter() - committed[version])

        consumers = [asyncio.create_task(consume(i)) for i in range(subscribers)]
        await asyncio.sleep(1)
        connections = len(await redis.client_list()) - before
        cpu0, wall0 = time.process_time(), time.perf_counter()
        n = int(rate * seconds)
        for k in range(n):
            sid = sids[k % sessions]
            committed[k] = time.perf_counter()  # from before the commit: its round trip counts
            async with redis.pipeline(transaction=True) as pipe:
                feed.queue(pipe, sid, [feed.entry(sid, k, "patched", fields=["x"])], 1000)
                await pipe.execute()
            await asyncio.sleep(max(0.0, wall0 + (k + 1) / rate - time.perf_counter()))
        await asyncio.sleep(1)
        cpu = time.process_time() - cpu0
        hub.drain()
        failed = [r for r in await asyncio.gather(*consumers, return_exceptions=True) if r]
        if failed:
            print(f"{len(failed)} subscribers failed: {failed[0]!r}")
        await hub.stop()
        await reader.aclose()
        await redis.aclose()
    finally:
        server.cleanup()
    lags.sort()
    expected = n * subscribers // sessions
    print(f"{subscribers} subscribers on {sessions} sessions, {rate:.0f} changes/s for {seconds} s")
    print(f"events delivered: {len(lags)} of {expected}")
    print(f"Redis connections opened (the reader + the pool the opens used): {connections}")
    for q in (0.5, 0.99, 0.999):
        print(f"p{q * 100:g} commit -> hand-off: {lags[int(q * (len(lags) - 1))] * 1000:.2f} ms")
    print(f"CPU per delivered event (writer included): {cpu / max(1, len(lags)) * 1e6:.1f} µs")


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:]]
    defaults = [1000, 100, 500, 10]
    s, m, r, t = [*args, *defaults[len(args) :]]
    asyncio.run(main(int(s), int(m), r, t))
