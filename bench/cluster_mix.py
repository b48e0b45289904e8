"""The mixed workload on one Redis and on a Redis Cluster, side by side (issue 15).

    python -m bench.cluster_mix [--seconds 20] [--tasks 32] [--sessions 300]

Starts a standalone redis-server and a Redis Cluster of three masters and three replicas
(tests/support/redis_cluster.py), every node with AOF everysec, on loopback. For each, builds
the app in this process (`bench.inprocess`, the in-memory MongoDB) with the default layout of
256 partitions, seeds active sessions, then drives the mix of docs/benchmarks.md (80 % reads,
15 % updates at the version read, 5 % appends) from `--tasks` concurrent clients through
httpx's ASGI transport: no HTTP server, no network, so what differs is the Redis side and
sessionmgr's routing to it. It reports operations per second, p50/p99 per operation,
conflicts, other errors, this process's CPU per operation, the Redis servers' CPU per
operation, and the outbox left at the end and how long one write-behind worker (run after
the measured window) took to drain it.

Writes bench/results/cluster_mix.json and docs/benchmarks-cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.inprocess import bearer, build_app

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_S = 3.0


@dataclass
class Outcome:
    mode: str
    seconds: float
    ops: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    conflicts: int = 0
    errors: int = 0
    cpu_ms_per_op: float = 0.0
    redis_cpu_ms_per_op: float = 0.0
    outbox_left: int = 0
    drain_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_standalone(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    from tests.support.redis_cluster import free_cluster_ports

    (port,) = free_cluster_ports(1)
    proc = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis as redis_sync

    for _ in range(200):
        with suppress(redis_sync.RedisError):
            if redis_sync.Redis(port=port).ping():
                break
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


async def run_mix(
    mode: str, url: str, pids: list[int], seconds: float, tasks: int, sessions: int
) -> Outcome:
    app = build_app(url, write_behind=False, redis_cluster=(mode == "cluster"))
    headers = {"Authorization": bearer()}
    outcome = Outcome(mode=mode, seconds=seconds)
    samples: dict[str, list[float]] = {"GET": [], "PATCH": [], "append": []}
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            ids = []
            for i in range(sessions):
                r = await http.post(
                    "/v1/sessions", json={"work_in_progress": {"n": i}}, headers=headers
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            stop = time.monotonic() + WARMUP_S

            async def client(seed: int) -> None:
                rnd = random.Random(seed)
                while time.monotonic() < stop:
                    sid = rnd.choice(ids)
                    roll = rnd.random()
                    started = time.perf_counter()
                    if roll < 0.80:
                        op, r = "GET", await http.get(f"/v1/sessions/{sid}", headers=headers)
                    elif roll < 0.95:
                        current = await http.get(f"/v1/sessions/{sid}", headers=headers)
                        body = {
                            "expected_version": current.json()["version"],
                            "patch": {"work_in_progress": {"n": rnd.random()}},
                        }
                        started = time.perf_counter()
                        op = "PATCH"
                        r = await http.patch(f"/v1/sessions/{sid}", json=body, headers=headers)
                    else:
                        event = {"kind": "note", "data": {"x": "y" * 150}}
                        op = "append"
                        r = await http.post(
                            f"/v1/sessions/{sid}/timeline",
                            json={"events": [event]},
                            headers=headers,
                        )
                    samples[op].append((time.perf_counter() - started) * 1000)
                    if r.status_code == 409:
                        outcome.conflicts += 1
                    elif r.status_code >= 300:
                        outcome.errors += 1

            await asyncio.gather(*(client(i) for i in range(tasks)))  # warm-up, not counted
            for values in samples.values():
                values.clear()
            outcome.conflicts = outcome.errors = 0
            stop = time.monotonic() + seconds
            cpu0, redis0 = time.process_time(), sum(_cpu_s(p) for p in pids)
            await asyncio.gather(*(client(tasks + i) for i in range(tasks)))
            cpu = time.process_time() - cpu0
            redis_cpu = sum(_cpu_s(p) for p in pids) - redis0
            from sessionmgr.api.bridge import resolve
            from sessionmgr.container import RedisWriteBehindWorker
            from sessionmgr.storage.outbox import RedisOutbox

            container = app.state["container"]
            redis, warm = await resolve(container.redis), await resolve(container.warm)
            outbox = RedisOutbox(redis)
            outcome.outbox_left = await outbox.pending()
            # Then one write-behind worker (as a replica runs it) carries the backlog to the
            # in-memory MongoDB: on one Redis it blocks in XREADGROUP, on a Cluster it polls.
            worker = RedisWriteBehindWorker(redis, warm, consumer="drain", block_ms=1000)
            await worker.ensure_group()
            drained_at = time.monotonic()
            while await worker.pending() and time.monotonic() - drained_at < 120:
                await worker.step()
            outcome.drain_s = time.monotonic() - drained_at
    for op, values in samples.items():
        outcome.ops[op] = len(values)
        if values:
            cuts = statistics.quantiles(values, n=100)
            outcome.latency_ms[op] = (round(cuts[49], 2), round(cuts[98], 2))
    outcome.cpu_ms_per_op = cpu * 1000 / max(1, outcome.total)
    outcome.redis_cpu_ms_per_op = redis_cpu * 1000 / max(1, outcome.total)
    return outcome


def report(results: list[Outcome], args: argparse.Namespace) -> str:
    one, many = results
    lines = [
        "# Benchmark: the mixed workload on one Redis and on a Redis Cluster",
        "",
        f"Measured with `python -m bench.cluster_mix --seconds {args.seconds:g} --tasks "
        f"{args.tasks} --sessions {args.sessions}` on {time.strftime('%Y-%m-%d')}, "
        f"Python {platform.python_version()}, on the 2-core development machine (shared with "
        "other jobs: quote the ratios, not the absolute figures).",
        "",
        "- The app runs in this one process (`bench.inprocess`, the in-memory MongoDB), "
        "without its write-behind while it is measured (its in-memory MongoDB would take the "
        "process's CPU); after the measured seconds one write-behind worker drains the outbox, "
        "timed (`drained in`). It is driven by concurrent clients through httpx's ASGI "
        "transport: no HTTP server and no network, so the difference is the Redis side and "
        "sessionmgr's routing to it (the Cluster's per-node clients, the write-behind polling each "
        "partition). The HTTP benchmark with wrk is docs/benchmarks.md.",
        "- One Redis: one `redis-server`. Cluster: three masters and three replicas "
        "(`redis-cli --cluster create … --cluster-replicas 1`). Every node AOF everysec, "
        "loopback. 256 partitions in both.",
        "- Each side warms up for 3 s (not counted), then runs the measured seconds. "
        "Mix: 80 % GET, 15 % PATCH at the version just read (its GET is not counted), "
        "5 % timeline appends, on sessions chosen at random.",
        "",
        "| Redis | ops/s | GET p50 / p99 ms | PATCH p50 / p99 ms | append p50 / p99 ms "
        "| conflicts | other errors | CPU ms/op (sessionmgr) | CPU ms/op (Redis, all nodes) "
        "| outbox at the end | drained in |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat = {op: "{} / {}".format(*r.latency_ms.get(op, ("-", "-"))) for op in r.ops}
        lines.append(
            f"| {r.mode} | {r.total / r.seconds:.0f} | {lat['GET']} | {lat['PATCH']} "
            f"| {lat['append']} | {r.conflicts} | {r.errors} | {r.cpu_ms_per_op:.3f} "
            f"| {r.redis_cpu_ms_per_op:.3f} | {r.outbox_left} | {r.drain_s:.2f} s |"
        )
    ratio = (many.total / many.seconds) / max(1e-9, one.total / one.seconds)
    lines += [
        "",
        f"In this run the Cluster served **{ratio:.2f}x** the operations per second of one "
        f"Redis, at {many.cpu_ms_per_op / max(1e-9, one.cpu_ms_per_op):.2f}x sessionmgr's "
        "CPU per operation. On one machine the Cluster cannot show what it is for (more "
        "memory and more Redis cores than one server has); this measures what it costs the "
        "service.",
        "",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Outcome]:
    from sessionmgr.storage import keys
    from tests.support.redis_cluster import RedisClusterServer

    keys.configure(keys.DEFAULT_PARTITIONS)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        proc, url = start_standalone(Path(tmp))
        try:
            results.append(
                await run_mix("one Redis", url, [proc.pid], args.seconds, args.tasks, args.sessions)
            )
        finally:
            proc.terminate()
            proc.wait()
    cluster = RedisClusterServer().start()
    try:
        pids = [p.pid for p in cluster.processes.values()]
        results.append(
            await run_mix("cluster", cluster.url, pids, args.seconds, args.tasks, args.sessions)
        )
    finally:
        cluster.cleanup()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_mix", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--no-report", action="store_true", help="print only")
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    text = report(results, args)
    print(text)
    if not args.no_report:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "cluster_mix.json").write_text(
            json.dumps([asdict(r) for r in results], indent=2)
        )
        (ROOT / "docs" / "benchmarks-cluster.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
