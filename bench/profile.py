"""`python -m bench.profile`: py-spy profiles of sessionmgr's hot GET and update under wrk.

Each runs one replica under `py-spy record` (launched by py-spy: attaching to a running pid
is refused on some kernels), drives it with wrk, stops it, and writes to bench/profiles/:
`<name>.txt`, the functions and packages ranked by their share of samples, and
`<name>.collapsed.gz`, the collapsed stacks for any flame-graph tool.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import load
from bench.load import Part
from bench.stack import REPO, require_tool, running_stack

PROFILES = REPO / "bench" / "profiles"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
# Samples inside the event loop (not start-up imports); with uvloop the loop itself is C, so
# the innermost Python frame all of them share is asyncio's Runner.run.
EVENT_LOOP = ("run_forever (asyncio/base_events.py", "Runner.run (asyncio/runners.py")
AREAS = [
    ("sessionmgr", "sessionmgr/"),
    ("litestar", "litestar/"),
    ("uvicorn + h11/httptools (HTTP parsing)", ("uvicorn/", "h11/", "httptools/")),
    ("redis-py", "redis/"),
    ("PyJWT + cryptography", ("jwt/", "cryptography/")),
    ("msgspec", "msgspec/"),
    ("prometheus_client", "prometheus_client/"),
    (
        "mongomock / motor / beanie (write-behind)",
        ("mongomock", "motor/", "beanie/", "pymongo/", "bson/"),
    ),
    ("dependency_injector", "dependency_injector/"),
    ("asyncio + selectors/uvloop (event loop)", ("asyncio/", "selectors.py", "uvloop/")),
]


def area_of(path: str) -> str:
    for name, marks in AREAS:
        for mark in (marks,) if isinstance(marks, str) else marks:
            if mark in path:
                return name
    return "other"


def summarize(collapsed: str, top: int = 25) -> str:
    """Rank functions by inclusive and self share, and packages by self share."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit() or not any(m in stack for m in EVENT_LOOP):
            continue  # start-up (imports) and shutdown are not the load
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
        areas[area_of(stack.split(";")[-1])] += count
    if not total:
        return "no samples\n"
    out = [f"samples: {total}", "", "self share by package (innermost frame):"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in areas.most_common()]
    # Frames nearly every sample passes through (the loop, the server) say nothing: left out.
    ranked = [(name, n) for name, n in inclusive.most_common() if n < 0.95 * total][:top]
    out += [
        "",
        f"top {top} functions by total share (on the stack; the loop and server frames "
        "in every sample left out):",
    ]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in ranked]
    out += ["", f"top {top} functions by self share:"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    return "\n".join(out) + "\n"


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for anchor in ("site-packages/", "lib/python3.11/", "/work/"):
        if anchor in path:
            path = path.split(anchor, 1)[1]
    return f"{match['func']} ({path})"


async def profile_one(
    name: str, part: Part, seconds: float, rate: int, warm_tier: str = "inprocess"
) -> str:
    py_spy = require_tool("py-spy", "py-spy (the bench dependency group)")
    from sessionmgr.api.auth import issue_token

    with running_stack("0", "1") as stack, tempfile.TemporaryDirectory() as tmp:
        stack.start_redis()
        stack.start_s3()
        secret = secrets.token_urlsafe(32)
        token = issue_token(secret, "bench-user", ttl_s=3600)
        mongodb = stack.start_wire_mongo() if warm_tier == "wire" else "mongomock://"
        env = stack.service_env(secret, mongodb, "sessionmgr-bench")
        if warm_tier == "wire":  # the write-behind apart, as bench/run.py runs it
            stack.start_worker(env, "1")
        # Seed through a replica that is not profiled, then stop it: the profile then holds
        # the load alone, and the profiled replica serves the seeded sessions from Redis.
        seeder, port = stack.start_replica(f"{name}-seeder", env, "0")
        ids = await load.seed(f"http://127.0.0.1:{port}", token, 1000)
        await load.drain_outbox(stack.redis_url)
        stack.stop(seeder)
        raw = Path(tmp) / f"{name}.collapsed"
        wrap = [
            py_spy,
            "record",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--",
        ]
        spy, port = stack.start_replica(
            f"{name}-profiled", env, "0", wrap=wrap, write_behind=warm_tier != "wire"
        )
        part = Part(part.op, part.script, part.connections, load.write_ids(Path(tmp) / "ids", ids))
        served = _children(spy.pid)
        cpu_before = sum(_cpu_s(pid) for pid in served)
        done = await load.run_wrk(part, [port], token, seconds, 1, "1", Path(tmp) / "wrk.json")
        cpu = sum(_cpu_s(pid) for pid in served) - cpu_before
        requests = done["requests"]
        rate = requests / (done["duration_us"] / 1e6) if done["duration_us"] else 0.0
        headline = (
            f"{name}: {requests} requests, {rate:.0f} req/s, "
            f"{cpu * 1000 / max(1, requests):.3f} ms of replica CPU per request "
            f"(warm tier: {warm_tier}; under py-spy, which slows it)\n"
        )
        # Stop the service, not py-spy: py-spy writes its file when its target exits.
        for child in _children(spy.pid):
            os.kill(child, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.popen.wait(30)
        stack.stop(spy)
        text = raw.read_text() if raw.exists() else ""
    PROFILES.mkdir(parents=True, exist_ok=True)
    with gzip.open(PROFILES / f"{name}.collapsed.gz", "wt") as f:
        f.write(text)
    summary = headline + summarize(text)
    (PROFILES / f"{name}.txt").write_text(summary)
    return summary


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


PARTS = {
    "hot_get": Part("GET hot", "get.lua", 64),
    "update": Part("PATCH", "update.lua", 64),
    "append": Part("POST timeline", "append.lua", 64),
    "create": Part("POST create", "create.lua", 64),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument(
        "--only", default="hot_get,update", help=f"comma-separated, of: {','.join(PARTS)}"
    )
    parser.add_argument(
        "--warm-tier",
        choices=["wire", "inprocess"],
        default="inprocess",
        help="inprocess: mongomock in the replica (and the write-behind in it); wire: the "
        "wire-compatible server in its own process and the write-behind apart, as bench.run",
    )
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        print(f"profiling {name} ...", flush=True)
        summary = asyncio.run(
            profile_one(name, PARTS[name], args.seconds, args.rate, args.warm_tier)
        )
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
