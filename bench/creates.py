"""`python -m bench.creates`: concurrent creates of one owner, and where their time goes.

The app called as ASGI in this process (no HTTP server, no wrk), a private redis-server, and
the warm tier in a process of its own: the wire-compatible server (nx-27017) by default, as in
`bench.run`, or `--mongodb-uri`. Seeds `--seed` sessions for the owner (the quota count scans
them), then runs `-c` tasks creating sessions for `--seconds`, and prints the rate, the
latencies, the CPU per create of this process and of the warm tier's server, and how often
and how long each MongoDB step ran (issue 16: 64 concurrent creates made 68 quota counts in
12 s, and each held the wire-compatible server for seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

STEPS = ("count_owned", "insert", "_written_by")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_steps() -> dict[str, list[float]]:
    """Wrap the warm store's create steps to count calls and add up their wall time."""
    from sessionmgr.storage.warm import MongoWarmStore

    spent: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])

    def timed(name: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(MongoWarmStore, name)

        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(self, *args, **kwargs)
            finally:
                step = spent[name]
                step[0] += 1
                step[1] += time.perf_counter() - started

        setattr(MongoWarmStore, name, wrapper)

    for name in STEPS:
        timed(name)
    return spent


async def measure(args: argparse.Namespace) -> None:
    from bench import shape
    from bench.inprocess import bearer, build_app
    from tests.support.redis_server import RedisServer
    from tests.support.wire_mongo import WireMongoServer

    spent = time_steps()
    redis = RedisServer().start()
    mongo = None if args.mongodb_uri else WireMongoServer().start()
    try:
        settings: dict[str, Any] = {"max_sessions_per_owner": args.quota}
        if args.quota_count_ttl_s is not None:
            settings["quota_count_ttl_s"] = args.quota_count_ttl_s
        uri = args.mongodb_uri or (mongo.uri if mongo else "")
        app = build_app(redis.url, mongodb_uri=uri, **settings)
        auth, body = bearer().encode(), shape.CREATE_BODY.encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/sessions/",
            "raw_path": b"/v1/sessions/",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"bench"),
                (b"authorization", auth),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
            "client": ("127.0.0.1", 5555),
            "server": ("127.0.0.1", 8080),
        }

        async def create() -> int:
            status = [0]

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            await app({**scope, "state": {}}, receive, send)  # type: ignore[arg-type]
            return status[0]

        async with app.lifespan():
            gate = asyncio.Semaphore(16)

            async def seed_one() -> None:
                async with gate:
                    if (status := await create()) != 201:
                        raise RuntimeError(f"seeding: a create answered {status}")

            started = time.perf_counter()
            await asyncio.gather(*(seed_one() for _ in range(args.seed)))
            print(f"seeded {args.seed} sessions in {time.perf_counter() - started:.1f} s")
            spent.clear()
            latencies: list[float] = []
            statuses: collections.Counter[int] = collections.Counter()
            stop = time.perf_counter() + args.seconds

            async def task() -> None:
                while time.perf_counter() < stop:
                    began = time.perf_counter()
                    statuses[await create()] += 1
                    latencies.append(time.perf_counter() - began)

            server_pid = mongo.process.pid if mongo and mongo.process else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            server0 = process_cpu_s(server_pid) if server_pid else 0.0
            await asyncio.gather(*(task() for _ in range(args.c)))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            server = process_cpu_s(server_pid) - server0 if server_pid else 0.0
        n = len(latencies)
        latencies.sort()
        print(
            f"{n} creates in {wall:.1f} s with {args.c} tasks: {n / wall:.0f}/s, "
            f"statuses {dict(statuses)}"
        )
        print(
            f"  latency p50 {latencies[n // 2] * 1e3:.0f} ms, p95 "
            f"{latencies[int(n * 0.95)] * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms"
        )
        print(f"  this process: {cpu / n * 1e3:.2f} ms CPU per create ({cpu / wall:.0%} of a core)")
        if server_pid:
            print(
                f"  the wire-compatible server: {server / n * 1e3:.2f} ms CPU per create "
                f"({server / wall:.0%} of a core)"
            )
        for name in STEPS:
            calls, total = spent.get(name, [0, 0.0])
            if calls:
                print(f"  {name}: {calls} calls, {total / calls * 1e3:.1f} ms each on average")
    finally:
        if mongo:
            mongo.cleanup()
        redis.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.creates", description=__doc__)
    parser.add_argument("--seed", type=int, default=2000, help="sessions the owner has first")
    parser.add_argument("-c", type=int, default=64, help="concurrent tasks creating")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quota", type=int, default=100_000_000, help="sessions per owner")
    parser.add_argument(
        "--quota-count-ttl-s",
        type=float,
        default=None,
        help="SESSIONMGR_QUOTA_COUNT_TTL_S (default: the setting's own)",
    )
    parser.add_argument("--mongodb-uri", default="", help="instead of the wire-compatible server")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(measure(args))
    else:
        uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
