"""`python -m bench.peer`: the peer, Google ADK's `DatabaseSessionService` on PostgreSQL.

What a user would pick instead of sessionmgr, driven in this process (no HTTP, no auth: the
peer's best case), with the session shape of sessionmgr's scenarios (`bench/shape.py`): a
`work_in_progress` dict and a 200-byte context summary as the session's state, one event of
the same dict per append. Each operation runs sequentially (one task) and with N concurrent
tasks (N = the wrk connections of sessionmgr's scenarios):

- create: `create_session` with that state;
- get: `get_session` of a seeded session (5 events) with its 20 most recent events, as
  sessionmgr's GET answers its recent timeline;
- append: `append_event` to a seeded session. ADK refuses an append from a stale `Session`
  object, so each task appends to sessions of its own (sessionmgr's appends, without
  `expected_version`, never conflict either).

Its own CPU (this process: ADK, SQLAlchemy, asyncpg and the driving loop) is measured over
each window, and PostgreSQL's (every `postgres` process on the machine: the server is shared,
so that column also holds whatever else used it then). bench/run.py starts it pinned where the
service runs; it prints one JSON document. Without a reachable PostgreSQL it says so and
writes `{"skip": "<why>"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import shape
from bench.load import percentiles_us

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
URL_ENV = "BENCH_PEER_URL"
OWNER = "bench-user"
RECENT = 20
SEED_EVENTS = 5
SEED_CONCURRENCY = 16
_TICK = os.sysconf("SC_CLK_TCK")


def redacted(url: str) -> str:
    """The URL without a password, for messages and the results file."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def postgres_cpu_s() -> float:
    """utime + stime of every process named `postgres` (the server and its backends)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name != "postgres" and not name.startswith("postgres:"):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def event(data: dict[str, Any]) -> Any:
    from google.adk.events import Event

    return Event(author=OWNER, invocation_id="bench", custom_metadata=data)


async def measure(
    name: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    op: Callable[[int], Awaitable[None]],
) -> dict[str, Any]:
    """Run `op(task)` in `concurrency` tasks for `warmup` then `seconds`; time each call."""

    async def window(length: float, latencies: list[float] | None) -> None:
        stop = time.perf_counter() + length

        async def task(i: int) -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await op(i)
                if latencies is not None:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(task(i) for i in range(concurrency)))

    if warmup > 0:
        await window(warmup, None)
    latencies: list[float] = []
    cpu0, pg0, wall0 = time.process_time(), postgres_cpu_s(), time.perf_counter()
    await window(seconds, latencies)
    wall = time.perf_counter() - wall0
    cpu, pg = time.process_time() - cpu0, postgres_cpu_s() - pg0
    n = len(latencies)
    result = {
        "op": name,
        "concurrency": concurrency,
        "requests": n,
        "wall_s": round(wall, 3),
        "throughput": n / wall if wall else 0.0,
        "cpu_ms_per_request": cpu * 1000 / n if n else None,
        "postgres_cpu_ms_per_request": pg * 1000 / n if n else None,
        "latency_us": percentiles_us(latencies),
    }
    print(
        f"    peer {name} x{concurrency}: {result['throughput']:.0f} ops/s, "
        f"{result['cpu_ms_per_request'] or 0:.2f} ms CPU/op (+ PostgreSQL "
        f"{result['postgres_cpu_ms_per_request'] or 0:.2f})",
        file=sys.stderr,
        flush=True,
    )
    return result


async def run(url: str, seconds: float, warmup: float, sessions: int, concurrency: int) -> Any:
    from google.adk.sessions import DatabaseSessionService
    from google.adk.sessions.base_session_service import GetSessionConfig
    from sqlalchemy import text

    # A pool as large as the concurrency: no task waits for a connection, the peer's best case
    # (PostgreSQL's default max_connections is 100).
    service = DatabaseSessionService(url, pool_size=concurrency, max_overflow=0)
    app = f"sessionmgr-bench-{uuid.uuid4().hex[:8]}"  # this run's rows, deleted at the end
    try:
        await service.prepare_tables()

        async def seed_one() -> Any:
            made = await service.create_session(
                app_name=app, user_id=OWNER, state=shape.seed_state()
            )
            for i in range(SEED_EVENTS):
                await service.append_event(made, event(shape.seed_event(i)))
            return made

        gate = asyncio.Semaphore(SEED_CONCURRENCY)

        async def bounded() -> Any:
            async with gate:
                return await seed_one()

        print(f"    peer: seeding {sessions} sessions ...", file=sys.stderr, flush=True)
        seeded = await asyncio.gather(*(bounded() for _ in range(sessions)))
        ids = [s.id for s in seeded]
        config = GetSessionConfig(num_recent_events=RECENT)
        state = {
            "work_in_progress": shape.WORK_IN_PROGRESS,
            "context_summary": shape.CONTEXT_SUMMARY,
        }

        async def create(_: int) -> None:
            await service.create_session(app_name=app, user_id=OWNER, state=state)

        async def get(_: int) -> None:
            got = await service.get_session(
                app_name=app, user_id=OWNER, session_id=random.choice(ids), config=config
            )
            assert got is not None

        results = []
        for tasks in (1, concurrency):
            # Each task appends to its own sessions (a stale Session object is refused).
            own = [seeded[i::tasks] for i in range(tasks)]

            async def append(i: int, own: list[list[Any]] = own) -> None:
                s = random.choice(own[i])
                await service.append_event(s, event(shape.EVENT))
                del s.events[:-RECENT]  # keep the in-memory copy as short as a GET's

            results += [
                await measure("create", tasks, seconds, warmup, create),
                await measure("get", tasks, seconds, warmup, get),
                await measure("append", tasks, seconds, warmup, append),
            ]
        async with service.db_engine.begin() as conn:
            for table in ("events", "sessions", "user_states", "app_states"):
                await conn.execute(text(f"DELETE FROM {table} WHERE app_name = :app"), {"app": app})
        return results
    finally:
        await service.close()


async def reachable(url: str) -> str | None:
    """None when PostgreSQL answers at `url`, else why not."""
    try:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine
    except ImportError as exc:
        return f"the peer's dependencies are missing ({exc}): install the bench dependency group"
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            print(f"    peer: PostgreSQL {version} at {redacted(url)}", file=sys.stderr)
        return None
    except Exception as exc:  # any failure means "not reachable": say which
        return f"no PostgreSQL reachable at {redacted(url)} ({type(exc).__name__}: {exc})"
    finally:
        await engine.dispose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"url": redacted(args.url)}
    if why := await reachable(args.url):
        print(f"    peer: skipped: {why}", file=sys.stderr, flush=True)
        return out | {"skip": why}
    out["packages"] = {
        name: metadata.version(name) for name in ("google-adk", "sqlalchemy", "asyncpg")
    }
    out["results"] = await run(args.url, args.seconds, args.warmup, args.sessions, args.concurrency)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"a postgresql+asyncpg:// URL (default ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    try:
        import uvloop  # the peer gets the same loop as the service

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(main_async(args))
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
