"""Load: seeding through the API, wrk runs (bench/wrk/*.lua) and the cold-read probe."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench import shape
from bench.stack import pinned, require_tool

LUA_DIR = Path(__file__).resolve().parent / "wrk"
SEED_CONCURRENCY = 16
SEED_RETRIES = 5
T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """One wrk process of a scenario: an operation, its script, ids and connections."""

    op: str
    script: str
    connections: int
    ids: Path | None = None
    path: str | None = None  # BENCH_PATH for get.lua (the floor serves /floor/<id>)
    delay_ms: int = 0  # pace each connection (0: as fast as answers come)


async def _seed_one(client: httpx.AsyncClient, events: int) -> str:
    resp = await client.post("/v1/sessions", json=shape.seed_state())
    resp.raise_for_status()
    sid: str = resp.json()["id"]
    if events:
        batch = [shape.seed_event(i) for i in range(events)]
        (
            await client.post(f"/v1/sessions/{sid}/timeline", json={"events": batch})
        ).raise_for_status()
    return sid


def _client(base_url: str, token: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}"},
        limits=httpx.Limits(max_connections=concurrency),
        timeout=30,
    )


async def _bounded(concurrency: int, jobs: Sequence[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def seed(base_url: str, token: str, count: int, *, events: int = 5) -> list[str]:
    """Create `count` active sessions through the API, each with `events` timeline events."""
    async with _client(base_url, token, SEED_CONCURRENCY) as client:
        return await _bounded(SEED_CONCURRENCY, [_seed_one(client, events) for _ in range(count)])


async def post_each(base_url: str, token: str, ids: Sequence[str], action: str) -> list[int]:
    """POST /v1/sessions/<id>/<action> for each id (suspend, archive); returns the statuses."""

    async def one(client: httpx.AsyncClient, sid: str) -> int:
        # A suspend can fail with 500/503 while the service's loop is busy (see the report);
        # seeding retries, and the retries are printed, not hidden.
        for attempt in range(SEED_RETRIES):
            status = (await client.post(f"/v1/sessions/{sid}/{action}")).status_code
            if status < 500:
                return status
            print(f"  {action} {sid}: {status}, retry {attempt + 1}", flush=True)
            await asyncio.sleep(0.5 * (attempt + 1))
        return status

    async with _client(base_url, token, 4) as client:
        return await _bounded(4, [one(client, sid) for sid in ids])


async def drain_outbox(redis_url: str, timeout_s: float = 180) -> int:
    """Wait until the write-behind has carried the outbox to MongoDB; returns what is left."""
    from redis.asyncio import Redis

    from sessionmgr.storage.outbox import RedisOutbox

    client = Redis.from_url(redis_url)
    outbox = RedisOutbox(client)  # every partition's stream (the replicas' default layout)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            left = await outbox.pending()
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)
    finally:
        await client.aclose()


async def outbox_drain(redis_url: str, timeout_s: float = 120) -> dict[str, Any]:
    """The outbox's backlog now, and how long the write-behind takes to carry it to MongoDB
    (polled every 0.1 s; `left` is what remained if `timeout_s` ran out first)."""
    from redis.asyncio import Redis

    from sessionmgr.storage.outbox import RedisOutbox

    client = Redis.from_url(redis_url)
    outbox = RedisOutbox(client)  # every partition's stream (the replicas' default layout)
    try:
        started = time.monotonic()
        backlog = left = await outbox.pending()
        while left and time.monotonic() - started < timeout_s:
            await asyncio.sleep(0.1)
            left = await outbox.pending()
        return {"backlog": backlog, "drain_s": round(time.monotonic() - started, 2), "left": left}
    finally:
        await client.aclose()


def write_ids(path: Path, ids: Sequence[str]) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


async def run_wrk(
    part: Part,
    ports: Sequence[int],
    token: str,
    seconds: float,
    threads: int,
    cpus: str | None,
    out: Path,
) -> dict[str, Any]:
    """One wrk process; returns the JSON its done() hook wrote, with the op's name."""
    wrk = require_tool("wrk", "wrk (apt-get install wrk)")
    env = {
        **os.environ,
        "BENCH_LUA_DIR": str(LUA_DIR),
        "BENCH_TOKEN": token,
        "BENCH_OUT": str(out),
        "BENCH_IDS": str(part.ids or ""),
        "BENCH_PORTS": ",".join(map(str, ports)) if len(ports) > 1 else "",
        "BENCH_CREATE_BODY": shape.CREATE_BODY,
        "BENCH_APPEND_BODY": shape.APPEND_BODY,
    }
    if part.path:
        env["BENCH_PATH"] = part.path
    if part.delay_ms:
        env["BENCH_DELAY_MS"] = str(part.delay_ms)
    threads = max(1, min(threads, part.connections))
    argv = [
        wrk,
        "-t",
        str(threads),
        "-c",
        str(part.connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA_DIR / part.script),
        f"http://127.0.0.1:{ports[0]}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *pinned(cpus, argv),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {output.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["op"] = part.op
    result["connections"] = part.connections
    return result


async def warm_probe(
    base_url: str, token: str, ids: Sequence[str], seconds: float, pace_s: float
) -> dict[str, Any]:
    """For `seconds`, read dormant sessions one after another (a read leaves them dormant)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        for sid in itertools.cycle(ids):
            if time.perf_counter() - started >= seconds:
                break
            t0 = time.perf_counter()
            resp = await client.get(f"/v1/sessions/{sid}")
            latencies.append(time.perf_counter() - t0)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            await asyncio.sleep(pace_s)
    return _probe_result("GET warm", 1, latencies, statuses, time.perf_counter() - started)


async def cold_probe(
    base_url: str,
    token: str,
    ids: Sequence[str],
    concurrency: int,
    pace_s: float = 0.0,
    seconds: float | None = None,
) -> dict[str, Any]:
    """Read each archived session once (a second read would no longer be cold), stopping
    after `seconds` when given (beside wrk, within its measured window)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {token}"}
    queue = list(ids)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:

        async def worker() -> None:
            while queue and (seconds is None or time.perf_counter() - started < seconds):
                sid = queue.pop()
                t0 = time.perf_counter()
                resp = await client.get(f"/v1/sessions/{sid}")
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if pace_s:
                    await asyncio.sleep(pace_s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _probe_result(
        "GET cold", concurrency, latencies, statuses, time.perf_counter() - started
    )


def _probe_result(
    op: str, connections: int, latencies: list[float], statuses: dict[int, int], elapsed: float
) -> dict[str, Any]:
    return {
        "op": op,
        "connections": connections,
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "ok": sum(n for s, n in statuses.items() if s < 300),
        "conflicts": statuses.get(409, 0),
        "other": sum(n for s, n in statuses.items() if s >= 300 and s != 409),
        "statuses": {str(k): v for k, v in statuses.items()},
        "latency_us": percentiles_us(latencies),
    }


def percentiles_us(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6

    return {
        "min": ordered[0] * 1e6,
        "mean": statistics.fmean(ordered) * 1e6,
        "max": ordered[-1] * 1e6,
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
        "p999": pct(99.9),
    }
