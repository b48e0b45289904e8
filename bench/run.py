"""`python -m bench.run`: start the stack, seed it, run every scenario, write the results.

Results go to bench/results/<label>.json, then bench/report.py turns them into
docs/benchmarks.md and its plots. `--quick` is a smoke run (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import load, report
from bench.load import Part
from bench.peer import DEFAULT_URL as PEER_URL
from bench.peer import URL_ENV as PEER_URL_ENV
from bench.stack import REPO, Proc, Stack, StackError, pinned, require_tool, running_stack

RESULTS = REPO / "bench" / "results"
OWNER = "bench-user"
# The mix's warm and cold readers pause this long between reads: a few reads of dormant and
# archived sessions a second beside ~1 000 requests a second on active ones.
READER_PACE_S = 0.25
BUCKET = "sessionmgr-bench"


@dataclass
class Plan:
    seconds: float
    warmup: float
    sessions: int
    warm_sessions: int
    cold_sessions: int
    connections: int
    replicas: int
    server_cpus: str | None
    support_cpus: str | None
    write_behind: str = "separate"
    only: set[str] = field(default_factory=set)
    cold_in_mix: bool = True
    warm_tier: str = "wire"
    peer_url: str = ""
    floors_first: bool = False

    def wants(self, name: str) -> bool:
        return not self.only or name in self.only


@dataclass
class Env:
    stack: Stack
    token: str
    secret: str
    service_env: dict[str, str]
    ids: dict[str, Path]
    cold_ids: list[str]
    cold_skip: str | None
    tmp: Path


def machine() -> dict[str, Any]:
    def run(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    lscpu = {
        k.strip(): v.strip()
        for k, _, v in (line.partition(":") for line in run("lscpu").splitlines())
    }
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    packages = [
        "sessionmgr",
        "litestar",
        "msgspec",
        "redis",
        "uvicorn",
        "fastapi",
        "pydantic",
        "pyjwt",
        "mongomock-motor",
        "nx-27017",
        "moto",
    ]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    uvloop = any(_importable(m) for m in ("uvloop", "httptools"))
    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "mhz": lscpu.get("CPU max MHz") or lscpu.get("CPU MHz", "?"),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": run("redis-server", "--version").split(" v=")[-1].split()[0],
        "wrk": run("wrk", "-v").splitlines()[0] if run("wrk", "-v") else "?",
        "packages": versions,
        "uvicorn_fast_path": uvloop,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def create_bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench-secret",
    )
    s3.create_bucket(Bucket=BUCKET)


async def scenario(
    env: Env,
    plan: Plan,
    name: str,
    target: str,
    servers: Sequence[Proc],
    ports: Sequence[int],
    parts: Sequence[Part],
    *,
    threads: int = 1,
    probes: Sequence[Awaitable[dict[str, Any]]] = (),
    note: str = "",
    writes: bool = False,
) -> dict[str, Any]:
    """Warm up, then measure: every part at once (one wrk each), CPU and memory around it.

    After a scenario that `writes`, the outbox's backlog at the end of the measured window
    and the time the write-behind then takes to drain it: a rate the write-behind cannot keep
    up with only fills Redis."""
    print(f"  {name} ({target}, {len(ports)} replica(s)) ...", flush=True)
    if plan.warmup > 0:
        await asyncio.gather(
            *(
                load.run_wrk(
                    p,
                    ports,
                    env.token,
                    plan.warmup,
                    threads,
                    plan.support_cpus,
                    env.tmp / f"warmup-{i}.json",
                )
                for i, p in enumerate(parts)
            )
        )
    redis = next(p for p in env.stack.procs if p.name == "redis")
    worker = next((p for p in env.stack.procs if p.name == "write-behind"), None)
    cpu_before = [s.cpu_s() for s in servers]
    redis_before = redis.cpu_s()
    worker_before = worker.cpu_s() if worker else 0.0
    started = time.monotonic()
    jobs: list[Awaitable[dict[str, Any]]] = [
        load.run_wrk(
            p,
            ports,
            env.token,
            plan.seconds,
            threads,
            plan.support_cpus,
            env.tmp / f"{name}-{i}.json".replace(" ", "_"),
        )
        for i, p in enumerate(parts)
    ]
    jobs.extend(probes)
    results = await asyncio.gather(*jobs)
    wall = time.monotonic() - started
    cpu = [s.cpu_s() - b for s, b in zip(servers, cpu_before, strict=True)]
    requests = sum(r["requests"] for r in results)
    memory = [s.memory_mb() for s in servers]
    result = {
        "name": name,
        "target": target,
        "replicas": len(ports),
        "connections": sum(r["connections"] for r in results),
        "wall_s": round(wall, 2),
        "parts": results,
        "requests": requests,
        # Each part over its own measured window: the wall time also holds start-up and the
        # tail of a slow reader, which would understate a mix's rate.
        "throughput": sum(part_rate(r) for r in results),
        "server_cpu_s": sum(cpu),
        "cpu_ms_per_request": sum(cpu) * 1000 / requests if requests else None,
        "redis_cpu_ms_per_request": (redis.cpu_s() - redis_before) * 1000 / requests
        if requests
        else None,
        "write_behind_cpu_ms_per_request": (worker.cpu_s() - worker_before) * 1000 / requests
        if worker and requests
        else None,
        "memory": memory,
        "note": note,
    }
    if writes:
        result["outbox"] = await load.outbox_drain(env.stack.redis_url)
    for r in results:
        r["throughput"] = part_rate(r)
    ok = sum(r.get("ok", 0) for r in results)
    other = sum(r.get("other", 0) for r in results)
    print(
        f"    {result['throughput']:.0f} req/s, "
        f"{result['cpu_ms_per_request'] or 0:.2f} ms CPU/req, ok {ok}, other {other}",
        flush=True,
    )
    if other > report.ERRORS_ALLOWED * (ok + other):
        print(
            f"    NOT A MEASUREMENT: {other} of {ok + other} answers were errors; the report "
            "leaves this scenario out of every ratio",
            flush=True,
        )
    if writes:
        o = result["outbox"]
        print(
            f"    outbox: {o['backlog']} entries at the end, drained in {o['drain_s']:.1f} s"
            + ("" if o["left"] == 0 else f" ({o['left']} left when the wait ended)"),
            flush=True,
        )
    return result


async def paired(
    env: Env,
    plan: Plan,
    ours: Callable[[], Awaitable[dict[str, Any]]],
    floor_env: dict[str, str] | None,
    name: str,
    target: str,
    parts: Sequence[Part],
) -> list[dict[str, Any]]:
    """sessionmgr's scenario and its floor's (bench/baselines/floor.py) on the same core, in
    the order `--floors-first` asks; no floor without its environment."""

    async def floor() -> dict[str, Any]:
        assert floor_env is not None
        proc, port = env.stack.start_baseline(
            "floor", "bench.baselines.floor:app", floor_env, plan.server_cpus, "/floor/none"
        )
        try:
            return await scenario(env, plan, name, target, [proc], [port], parts)
        finally:
            env.stack.stop(proc)

    order = [ours] if floor_env is None else [floor, ours] if plan.floors_first else [ours, floor]
    return [await run_one() for run_one in order]


def part_rate(part: dict[str, Any]) -> float:
    return part["requests"] / (part["duration_us"] / 1e6) if part["duration_us"] else 0.0


WIRE_LABEL = "wire-compatible server (nx-27017 over SQLite, not MongoDB)"


def warm_tier(stack: Stack, plan: Plan) -> tuple[str, str]:
    """The MongoDB URI and what to call it: a real one (SESSIONMGR_TEST_MONGODB_URI), the
    wire-compatible server all processes share, or the in-process engine of each process."""
    if uri := os.environ.get("SESSIONMGR_TEST_MONGODB_URI"):
        return uri, "real"
    if plan.warm_tier == "wire":
        return stack.start_wire_mongo(), WIRE_LABEL
    return "mongomock://", "mongomock"


async def prepare(stack: Stack, plan: Plan, tmp: Path, mongodb: str) -> tuple[Env, Proc, int]:
    from sessionmgr.api.auth import issue_token

    stack.start_redis()
    stack.start_s3()
    create_bucket(f"http://127.0.0.1:{stack.s3_port}")
    secret = secrets.token_urlsafe(32)
    token = issue_token(secret, OWNER, ttl_s=12 * 3600)
    service_env = stack.service_env(secret, mongodb, BUCKET)
    in_process = plan.write_behind == "inprocess"
    if not in_process:
        stack.start_worker(service_env, plan.support_cpus)
    replica, port = stack.start_replica(
        "sessionmgr-0", service_env, plan.server_cpus, write_behind=in_process
    )
    base = f"http://127.0.0.1:{port}"
    print(
        f"seeding {plan.sessions} active, {plan.warm_sessions} dormant and "
        f"{plan.cold_sessions} archived sessions ...",
        flush=True,
    )
    hot = await load.seed(base, token, plan.sessions)
    warm = await load.seed(base, token, plan.warm_sessions)
    cold = await load.seed(base, token, plan.cold_sessions)
    # Suspending scans the outbox backlog of the write-behind: let it drain first (see the
    # report: with a long backlog, concurrent suspends time out).
    left = await load.drain_outbox(stack.redis_url)
    if left:
        raise StackError(f"the write-behind did not drain the outbox ({left} entries left)")
    for sid, status in zip(
        warm + cold, await load.post_each(base, token, warm + cold, "suspend"), strict=True
    ):
        if status != 200:
            raise StackError(f"suspend of {sid} answered {status}")
    statuses = await load.post_each(base, token, cold, "archive")
    cold_skip = None
    if any(s != 200 for s in statuses):
        seen = sorted(set(statuses))
        cold_skip = (
            f"POST /v1/sessions/{{id}}/archive answered {seen}, not 200: this build has "
            "no cold tier yet, so the cold GET is not measured"
        )
        print(f"  skip cold: {cold_skip}", flush=True)
    ids = {
        "hot": load.write_ids(tmp / "hot.ids", hot),
        "warm": load.write_ids(tmp / "warm.ids", warm),
    }
    env = Env(stack, token, secret, service_env, ids, cold, cold_skip, tmp)
    return env, replica, port


async def run(plan: Plan, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": plan.__dict__ | {"only": sorted(plan.only)},
        "scenarios": [],
    }
    with running_stack(plan.server_cpus, plan.support_cpus) as stack:
        mongodb, out["mongodb"] = warm_tier(stack, plan)
        env, replica, port = await prepare(stack, plan, tmp, mongodb)
        out["cold_skip"] = env.cold_skip
        scenarios: list[dict[str, Any]] = out["scenarios"]
        c = plan.connections
        hot, warm = env.ids["hot"], env.ids["warm"]
        one = ([replica], [port])
        redis_env = {"BENCH_REDIS_URL": stack.redis_url, "BENCH_JWT_SECRET": env.secret}

        # Warm reads first: mongomock scans its collections, which later scenarios grow.
        if plan.wants("warm"):
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "warm GET",
                    "sessionmgr",
                    *one,
                    [Part("GET warm", "get.lua", c, warm)],
                )
            )
        if plan.wants("get"):
            scenarios += await paired(
                env,
                plan,
                lambda: scenario(
                    env, plan, "hot GET", "sessionmgr", *one, [Part("GET hot", "get.lua", c, hot)]
                ),
                redis_env,
                "hot GET",
                report.FLOORS["get"],
                [Part("GET hot", "get.lua", c, hot, path="/floor/")],
            )
        fast = None
        if plan.wants("get") or plan.wants("update"):
            fast, fastport = stack.start_baseline(
                "fastapi",
                "bench.baselines.fastapi_app:app",
                redis_env,
                plan.server_cpus,
                "/v1/sessions/none",
            )
        if plan.wants("get") and fast:
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "hot GET",
                    "FastAPI + pydantic",
                    [fast],
                    [fastport],
                    [Part("GET hot", "get.lua", c, hot)],
                )
            )
        if plan.wants("update"):
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "update",
                    "sessionmgr",
                    *one,
                    [Part("PATCH", "update.lua", c, hot)],
                    writes=True,
                )
            )
            if fast:
                scenarios.append(
                    await scenario(
                        env,
                        plan,
                        "update",
                        "FastAPI + pydantic",
                        [fast],
                        [fastport],
                        [Part("PATCH", "update.lua", c, hot)],
                    )
                )
        if fast:
            stack.stop(fast)
        if plan.wants("append"):
            scenarios += await paired(
                env,
                plan,
                lambda: scenario(
                    env,
                    plan,
                    "timeline append",
                    "sessionmgr",
                    *one,
                    [Part("POST timeline", "append.lua", c, hot)],
                    writes=True,
                ),
                redis_env,
                "timeline append",
                report.FLOORS["append"],
                [Part("POST timeline", "append.lua", c, hot)],
            )
        half = len(env.cold_ids) // 2
        if plan.wants("cold") and not env.cold_skip:
            probe = load.cold_probe(f"http://127.0.0.1:{port}", env.token, env.cold_ids[:half], 8)
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "cold GET",
                    "sessionmgr",
                    *one,
                    [],
                    probes=[probe],
                    note="each archived session read once",
                )
            )
        if plan.wants("mixed"):
            get_c = c - 14
            parts = [
                Part("GET hot", "get.lua", get_c, hot),
                Part("PATCH", "update.lua", 10, hot),
                Part("POST timeline", "append.lua", 3, hot),
                Part("POST create", "create.lua", 1),
            ]
            base = f"http://127.0.0.1:{port}"
            saturated = await scenario(
                env,
                plan,
                "mixed",
                "sessionmgr",
                *one,
                parts,
                probes=readers(env, plan, base, env.cold_ids[half : half + half // 2]),
                note="closed loop: as fast as the replica answers",
                writes=True,
            )
            scenarios.append(saturated)
            # The same mix at half the load the replica sustained: latency at a given load,
            # not the queue that a saturated closed loop builds (Little's law).
            # Half of what the hot-path parts sustained (the readers are paced anyway).
            sustained = sum(part_rate(r) for r in saturated["parts"][: len(parts)])
            delay = max(1, round(1000 * c / (sustained * 0.5)))
            paced = [dataclasses.replace(x, delay_ms=delay) for x in parts]
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "mixed (50 % load)",
                    "sessionmgr",
                    *one,
                    paced,
                    probes=readers(env, plan, base, env.cold_ids[half + half // 2 :]),
                    note=f"each connection waits 0-{2 * delay} ms between requests",
                    writes=True,
                )
            )
            # The same again without the warm and cold readers: what the hot path holds when
            # nothing else runs on the replica's loop (mongomock's reads run on it, see docs).
            scenarios.append(
                await scenario(
                    env,
                    plan,
                    "mixed (50 % load, hot path only)",
                    "sessionmgr",
                    *one,
                    paced,
                    note="as above, without the warm and cold readers",
                    writes=True,
                )
            )
        if plan.wants("replicas") and plan.replicas > 1:
            scenarios.append(await replicas(env, plan, stack, replica, port))
        # Last: each create adds a session to the in-memory MongoDB, which slows its scans.
        if plan.wants("create"):
            floor_env = None
            if out["mongodb"] != "mongomock":  # the floor needs a server of its own to reach
                floor_env = redis_env | {
                    "BENCH_MONGODB_URI": mongodb,
                    "BENCH_MONGODB_DB": f"bench_floor_{secrets.token_hex(3)}",
                }
            scenarios += await paired(
                env,
                plan,
                lambda: scenario(
                    env,
                    plan,
                    "create",
                    "sessionmgr",
                    *one,
                    [Part("POST create", "create.lua", c)],
                    writes=True,
                ),
                floor_env,
                "create",
                report.FLOORS["create"],
                [Part("POST create", "create.lua", c)],
            )
    if plan.wants("peer"):
        out["peer"] = await peer(plan, tmp)
    out["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return out


async def peer(plan: Plan, tmp: Path) -> dict[str, Any]:
    """The peer (`bench/peer.py`): ADK's DatabaseSessionService on PostgreSQL, in a process
    pinned where the service ran, once the stack is down; sequential, then with as many
    concurrent tasks as the wrk runs have connections."""
    print("  peer (google-adk DatabaseSessionService on PostgreSQL, in-process) ...", flush=True)
    out = tmp / "peer.json"
    argv = [
        sys.executable,
        "-m",
        "bench.peer",
        "--url",
        plan.peer_url,
        "--seconds",
        str(plan.seconds),
        "--warmup",
        str(min(plan.warmup, 2.0)),
        "--sessions",
        str(min(plan.sessions, 500)),
        "--concurrency",
        str(plan.connections),
        "--out",
        str(out),
    ]
    proc = await asyncio.create_subprocess_exec(*pinned(plan.server_cpus, argv), cwd=REPO)
    if await proc.wait() != 0 or not out.exists():
        why = f"bench.peer exited with {proc.returncode}; its output is above"
        print(f"  skip peer: {why}", flush=True)
        return {"skip": why}
    result: dict[str, Any] = json.loads(out.read_text())
    if "skip" in result:
        print(f"  skip peer: {result['skip']}", flush=True)
    return result


def readers(
    env: Env, plan: Plan, base: str, cold_ids: Sequence[str]
) -> list[Awaitable[dict[str, Any]]]:
    """The mix's slow readers: one connection reading dormant sessions (warm GET) and one
    reading archived ones (cold GET, each once), each pausing READER_PACE_S between reads."""
    if not plan.cold_in_mix:
        return []
    found = [
        load.warm_probe(
            base, env.token, env.ids["warm"].read_text().split(), plan.seconds, READER_PACE_S
        )
    ]
    if not env.cold_skip:
        found.append(
            load.cold_probe(
                base, env.token, cold_ids, 1, pace_s=READER_PACE_S, seconds=plan.seconds
            )
        )
    return found


async def replicas(env: Env, plan: Plan, stack: Stack, first: Proc, port: int) -> dict[str, Any]:
    """The mixed hot path on N replicas: one wrk thread per replica, no load balancer; with a
    shared warm tier, a paced reader of dormant sessions besides."""
    spread = "0,1" if plan.server_cpus else None
    if spread:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", spread, str(first.pid)], check=True, capture_output=True
        )
    servers, ports = [first], [port]
    for i in range(1, plan.replicas):
        proc, p = stack.start_replica(
            f"sessionmgr-{i}",
            env.service_env,
            spread,
            write_behind=plan.write_behind == "inprocess",
        )
        servers.append(proc)
        ports.append(p)
    c, hot = plan.connections, env.ids["hot"]
    parts = [
        Part("GET hot", "get.lua", c - 13, hot),
        Part("PATCH", "update.lua", 10, hot),
        Part("POST timeline", "append.lua", 3, hot),
    ]
    note = "GET, PATCH, append of active sessions; replicas float over both cores"
    probes: list[Awaitable[dict[str, Any]]] = []
    if env.service_env["SESSIONMGR_MONGODB_URI"].startswith("mongomock://"):
        note = "hot path only: " + note
        note += "; each replica has its own in-memory MongoDB (no shared warm tier here)"
    else:
        # A shared warm tier: dormant sessions (seeded through the first replica) are read
        # through the last one, paced as in the single-replica mix.
        real = os.environ.get("SESSIONMGR_TEST_MONGODB_URI")
        shared = "a real MongoDB" if real else f"the {WIRE_LABEL}"
        note += f"; warm GET through replica {plan.replicas}; the replicas share {shared}"
        if plan.cold_in_mix:
            warm_ids = env.ids["warm"].read_text().split()
            base = f"http://127.0.0.1:{ports[-1]}"
            probes.append(load.warm_probe(base, env.token, warm_ids, plan.seconds, READER_PACE_S))
    return await scenario(
        env,
        plan,
        "mixed",
        f"sessionmgr x{plan.replicas}",
        servers,
        ports,
        parts,
        threads=plan.replicas,
        probes=probes,
        note=note,
        writes=True,
    )


def parse(argv: Sequence[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s scenarios, few sessions"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per scenario")
    parser.add_argument("--sessions", type=int, default=1000, help="active sessions to seed")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the service to CPU 0 and Redis + wrk to CPU 1",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: get,update,append,create,warm,cold,mixed,replicas,peer",
    )
    parser.add_argument(
        "--write-behind",
        choices=["separate", "inprocess"],
        default="separate",
        help="separate (default): the write-behind in a process of its own, so mongomock's scans "
        "do not stall the API; inprocess: as `sessionmgr serve` runs it",
    )
    parser.add_argument(
        "--warm-tier",
        choices=["wire", "inprocess"],
        default="wire",
        help=f"wire (default): one {WIRE_LABEL} shared by every process; inprocess: the "
        "in-memory engine (mongomock) in each process. SESSIONMGR_TEST_MONGODB_URI wins over both",
    )
    parser.add_argument(
        "--no-cold-in-mix",
        action="store_true",
        help="leave the warm and cold readers out of the mixed workload (both read the "
        "in-memory MongoDB, whose scans run inside the replica's loop)",
    )
    parser.add_argument(
        "--peer-url",
        default=os.environ.get(PEER_URL_ENV, PEER_URL),
        help=f"the peer's PostgreSQL, a postgresql+asyncpg:// URL (default ${PEER_URL_ENV} or "
        f"{PEER_URL}); when none answers there the peer scenario says so and is skipped",
    )
    parser.add_argument(
        "--floors-first",
        action="store_true",
        help="run each floor (bench/baselines/floor.py) before sessionmgr's scenario, not after",
    )
    parser.add_argument("--label", default="latest", help="results file bench/results/<label>.json")
    parser.add_argument("--no-report", action="store_true", help="skip docs/benchmarks.md")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile the hot GET and update with py-spy (bench/profiles/)",
    )
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    pin = not args.no_pin and cpus >= 2
    plan = Plan(
        seconds=2.0 if args.quick else args.seconds,
        warmup=1.0 if args.quick else args.warmup,
        sessions=100 if args.quick else args.sessions,
        warm_sessions=20 if args.quick else 200,
        cold_sessions=20 if args.quick else 200,
        connections=args.connections,
        replicas=args.replicas,
        server_cpus="0" if pin else None,
        support_cpus=(f"1-{cpus - 1}" if cpus > 2 else "1") if pin else None,
        only={s.strip() for s in args.only.split(",") if s.strip()},
        write_behind=args.write_behind,
        cold_in_mix=not args.no_cold_in_mix,
        warm_tier=args.warm_tier,
        peer_url=args.peer_url,
        floors_first=args.floors_first,
    )
    return plan, args


def _cpus(spec: str) -> set[int]:
    """A taskset CPU list ("1", "1-3") as a set."""
    first, _, last = spec.partition("-")
    return set(range(int(first), int(last or first) + 1))


def preflight() -> None:
    require_tool("wrk", "wrk (apt-get install wrk)")
    require_tool("redis-server", "redis-server (apt-get install redis-server)")
    require_tool("taskset", "util-linux")
    require_tool("moto_server", "moto[server] (the bench dependency group)")
    for module in ("fastapi", "pydantic", "matplotlib", "httpx", "boto3", "nx_27017"):
        if not _importable(module):
            raise StackError(f"{module} is missing: install the bench dependency group")


def main(argv: Sequence[str] | None = None) -> int:
    plan, args = parse(argv)
    try:
        preflight()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import tempfile

    if plan.support_cpus:  # this process drives the probes: keep it off the service's core
        os.sched_setaffinity(0, _cpus(plan.support_cpus))
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        try:
            results = asyncio.run(run(plan, Path(tmp)))
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    results["label"] = args.label
    results["quick"] = args.quick
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.label}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {path.relative_to(REPO)}")
    if args.profile:
        from bench import profile

        profile.main(["--seconds", "2" if args.quick else "10"])
    if not args.no_report:
        report.main([str(path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
