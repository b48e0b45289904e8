"""`python -m bench.where`: where a warm GET and a cold GET spend the replica's CPU.

One process, no HTTP server: the app is called through httpx's ASGI transport with the
in-memory MongoDB (mongomock), a private redis-server and moto's S3 in a thread. It seeds
sessions with timeline events, suspends some (warm) and archives others (cold), waits for
the write-behind to carry everything to MongoDB, then reads them under cProfile (this thread
only: moto's thread is not in the figures) and prints the share of the profiled time by
package. This is the evidence behind the benchmark's note that the warm and cold readers of
the mix spend their time in mongomock.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import pstats
import sys
from collections.abc import Sequence

PACKAGES = (
    ("mongomock", ("mongomock",)),
    ("motor / pymongo / bson", ("motor/", "pymongo/", "bson/")),
    ("beanie", ("beanie/",)),
    ("pydantic", ("pydantic",)),
    ("aiobotocore / botocore / aiohttp (S3)", ("botocore/", "aiohttp/", "aioboto3/")),
    ("sessionmgr", ("sessionmgr/",)),
    ("litestar", ("litestar/",)),
    ("redis-py", ("redis/",)),
    ("httpx (the caller here)", ("httpx/", "httpcore/")),
    ("asyncio", ("asyncio/",)),
)


def shares(profile: cProfile.Profile) -> list[tuple[str, float]]:
    stats = pstats.Stats(profile)
    by_package: collections.Counter[str] = collections.Counter()
    for (path, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        name = "built-in functions (C)" if path == "~" else "other"
        for package, marks in PACKAGES:
            if any(mark in path for mark in marks):
                name = package
                break
        by_package[name] += own
    total = sum(by_package.values()) or 1.0
    return [(name, 100 * own / total) for name, own in by_package.most_common()]


async def measure(sessions: int, reads: int) -> None:
    import httpx

    from bench.inprocess import bearer, build_app
    from bench.load import drain_outbox
    from sessionmgr.devstack import InProcessS3, RedisServer

    redis, s3 = RedisServer().start(), InProcessS3("bench-where").start()
    try:
        app = build_app(redis.url, s3=s3, write_behind=True)
        headers = {"Authorization": bearer(roles=("admin",))}
        transport = httpx.ASGITransport(app=app)
        async with (
            app.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as c,
        ):
            ids = []
            for i in range(sessions):
                r = await c.post(
                    "/v1/sessions/",
                    json={"work_in_progress": {"step": i}, "context_summary": {"s": "x" * 200}},
                )
                r.raise_for_status()
                ids.append(r.json()["id"])
                events = [{"kind": "note", "data": {"i": j}} for j in range(5)]
                (await c.post(f"/v1/sessions/{ids[-1]}/timeline", json={"events": events}))
            warm, cold = ids[:reads], ids[reads : 2 * reads]
            for sid in warm + cold:
                (await c.post(f"/v1/sessions/{sid}/suspend")).raise_for_status()
            for sid in cold:
                (await c.post(f"/v1/sessions/{sid}/archive")).raise_for_status()
            # The write-behind shares this thread: let it finish first, so that the profile
            # holds the reads alone.
            left = await drain_outbox(redis.url)
            print(f"outbox drained ({left} entries left)")
            for label, chosen in (("warm GET (dormant)", warm), ("cold GET (archived)", cold)):
                profile = cProfile.Profile()
                profile.enable()
                for sid in chosen:
                    (await c.get(f"/v1/sessions/{sid}")).raise_for_status()
                profile.disable()
                print(f"{label}: {len(chosen)} reads, share of profiled time by package")
                for name, share in shares(profile):
                    if share >= 0.5:
                        print(f"  {share:5.1f} %  {name}")
    finally:
        s3.stop()
        redis.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.where", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1400)
    parser.add_argument("--reads", type=int, default=50, help="warm reads, and cold reads")
    args = parser.parse_args(argv)
    asyncio.run(measure(args.sessions, args.reads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
