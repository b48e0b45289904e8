"""`python -m bench.memory`: Redis memory per active session, for sizing the hot tier.

Starts a private redis-server, creates N sessions through `SessionService` in this process
(the in-memory MongoDB), each with a `work_in_progress` of about 10 KB and 20 timeline events
(the recent timeline Redis keeps at its default length), and compares `INFO memory` before
and after. The outbox is measured, then deleted before the figure is taken, as the
write-behind leaves it while it keeps up (the write-behind itself does not run here: the
in-memory MongoDB would take minutes over the events). `MEMORY USAGE` of one session's keys
shows where the bytes are.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

GIB = 1024**3


def _wip(i: int, size: int) -> dict[str, Any]:
    """A `work_in_progress` of about `size` bytes of JSON: a plan, notes and some numbers."""
    steps = [
        {"step": n, "status": "done" if n % 3 else "open", "owner": f"mad-{n % 4}"}
        for n in range(20)
    ]
    filler = size - len(str(steps)) - 200
    return {
        "plan": steps,
        "notes": (f"session {i}: " + "lorem ipsum dolor sit amet " * (filler // 27 + 1))[:filler],
        "scores": [round(n * 0.37, 2) for n in range(20)],
    }


def _event(n: int) -> dict[str, Any]:
    return {
        "kind": "tool_call",
        "data": {"tool": "search", "query": f"step {n} of the plan", "ok": True},
    }


async def _memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def measure(sessions: int, wip_bytes: int, events: int) -> None:
    from sessionmgr.api.bridge import resolve
    from sessionmgr.container import build_container
    from sessionmgr.devstack import RedisServer, dev_aws_credentials
    from sessionmgr.domain.model import NewEvent, Principal
    from sessionmgr.settings import load_settings
    from sessionmgr.storage import keys
    from sessionmgr.storage.hot import hot_key, timeline_key

    dev_aws_credentials(os.environ)
    server = RedisServer().start()
    settings = load_settings(
        {},
        redis_url=server.url,
        mongodb_uri="mongomock://",
        jwt_secret="bench-memory-secret-0123456789abcdef",
        s3_endpoint_url="http://127.0.0.1:9",  # never called
        gc_freeze=False,
        idle_sweep=False,
    )
    container = build_container(settings, write_behind=False)
    try:
        init = container.init_resources()
        if inspect.isawaitable(init):
            await init
        service = await resolve(container.sessions)
        redis = await resolve(container.redis)
        owner = Principal(sub="bench-memory", roles=frozenset({"admin"}))
        info = await redis.info("server")
        await redis.execute_command("MEMORY", "PURGE")
        before = await _memory(redis)
        started = time.monotonic()
        ids = []
        for i in range(sessions):
            created = await service.create(owner, work_in_progress=_wip(i, wip_bytes))
            batch = [NewEvent(**_event(n)) for n in range(events)]
            await service.append(owner, created.id, batch)
            ids.append(created.id)
        took = time.monotonic() - started
        streams = [keys.outbox(p) for p in range(keys.partitions())]
        indexes = [keys.idle_index(p) for p in range(keys.partitions())]
        outbox = sum([await redis.memory_usage(s, samples=0) or 0 for s in streams])
        outbox_entries = sum([await redis.xlen(s) for s in streams])
        await redis.delete(*streams)  # as delivered: the write-behind deletes each entry
        after = await _memory(redis)
        per_session = (after - before) / sessions
        one = ids[-1]
        usage = {
            "hash": await redis.memory_usage(hot_key(one), samples=0),
            "timeline": await redis.memory_usage(timeline_key(one), samples=0),
            "feed": await redis.memory_usage(keys.feed(one), samples=0),
        }
        index = sum([await redis.memory_usage(i, samples=0) or 0 for i in indexes])
        stored = await redis.hget(hot_key(one), "work_in_progress")
        print(f"redis {info['redis_version']}, {sessions} active sessions in {took:.1f} s")
        print(f"  shape: work_in_progress {len(stored)} bytes of JSON, {events} recent events")
        print(f"  used_memory: {before} -> {after} bytes")
        print(f"  per active session: {per_session:.0f} bytes (INFO memory, outbox drained)")
        print(
            f"  outbox before it was drained: {outbox} bytes for {outbox_entries} entries "
            f"({outbox / max(1, outbox_entries):.0f} per entry: what a MongoDB outage adds)"
        )
        print(
            f"  one session's keys (MEMORY USAGE): hash {usage['hash']}, "
            f"timeline {usage['timeline']}, change feed {usage['feed']}, "
            f"idle index {index / sessions:.0f} (its share)"
        )
        print(f"  sessions per GiB of used_memory: {GIB / per_session:,.0f}")
    finally:
        closing = container.shutdown_resources()
        if inspect.isawaitable(closing):
            await closing
        server.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--wip-bytes", type=int, default=10_240)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args(argv)
    asyncio.run(measure(args.sessions, args.wip_bytes, args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
