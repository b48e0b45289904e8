"""What the HTTP limits cost a hot GET: uvicorn's stock httptools protocol against
`GuardedHttpProtocol`, alternating, on loopback (docs/security.md quotes a run).

    python -m bench.guarded_http [--rounds 4] [--seconds 8] [--connections 16]
    python -m bench.guarded_http --protocol-only [--rounds 15]

Each round starts one server per protocol (one process, uvloop, the in-memory MongoDB, a
private redis-server shared by both), warms it for 2 s, then drives keep-alive GETs of one
active session for `--seconds` and prints requests/s and the server's CPU time per request
(from /proc/<pid>/stat, so other load on the machine does not count against it). Linux only.
On a shared machine the run-to-run spread is larger than the difference, so `--protocol-only`
also measures the protocols alone: 20 000 GET heads fed to each through a fake transport to a
trivial app, best and median of `--rounds` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER = """
import sys, uvicorn
from sessionmgr.api.guarded_http import GuardedHttpProtocol
http = GuardedHttpProtocol if sys.argv[2] == "guarded" else "httptools"
uvicorn.run("sessionmgr.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
            lifespan="on", access_log=False, log_config=None, log_level="warning", http=http)
"""
SECRET = "bench-guarded-http-secret-0123456789abcdef"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, request: bytes, seconds: float, connections: int) -> int:
    done = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < end:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            at = head.lower().index(b"content-length: ") + 16
            await reader.readexactly(int(head[at : head.index(b"\r\n", at)]))
            done += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return done


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _ok(scope: object, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def _protocol_us(protocol: type, requests: int) -> float:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app=_ok, log_config=None, access_log=False, lifespan="off")
    config.load()
    instance = protocol(config, ServerState(), {})
    instance.connection_made(_Transport())
    head = (
        b"GET /v1/sessions/0123456789abcdef0123456789abcdef HTTP/1.1\r\nHost: b\r\n"
        b"Authorization: Bearer " + b"t" * 180 + b"\r\nAccept: */*\r\n\r\n"
    )
    started = time.perf_counter()
    for _ in range(requests):
        instance.data_received(head)
        await asyncio.sleep(0)  # the request's task runs and answers
        await asyncio.sleep(0)
    return (time.perf_counter() - started) / requests * 1e6


def protocol_only(rounds: int) -> None:
    import statistics

    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from sessionmgr.api.guarded_http import GuardedHttpProtocol, HttpLimits

    GuardedHttpProtocol.limits = HttpLimits()
    took: dict[str, list[float]] = {"stock": [], "guarded": []}
    for _ in range(rounds):
        for kind, protocol in (("stock", HttpToolsProtocol), ("guarded", GuardedHttpProtocol)):
            took[kind].append(uvloop.run(_protocol_us(protocol, 20_000)))
    for kind, values in took.items():
        print(f"{kind:<8} best {min(values):5.2f} us, median {statistics.median(values):5.2f} us")
    print(f"ratio of the best: {min(took['guarded']) / min(took['stock']):.3f}")


def serve(kind: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), kind], env=env)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--protocol-only", action="store_true")
    args = parser.parse_args()
    if args.protocol_only:
        protocol_only(args.rounds)
        return

    from sessionmgr.api.auth import issue_token
    from sessionmgr.devstack import RedisServer, free_port

    redis = RedisServer().start()
    env = {
        **os.environ,
        "SESSIONMGR_REDIS_URL": redis.url,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_JWT_SECRET": SECRET,
        "SESSIONMGR_RATE_LIMIT_PER_S": "0",
        "SESSIONMGR_LOG_LEVEL": "WARNING",
    }
    token = issue_token(SECRET, "bench")
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        port = free_port()
        first = serve("stock", port, env)
        create = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/sessions", data=b"{}", headers=auth, method="POST"
        )
        with urllib.request.urlopen(create) as answer:
            sid = answer.headers["Location"].rsplit("/", 1)[1]
        first.terminate()
        first.wait()
        request = (
            f"GET /v1/sessions/{sid} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        for _ in range(args.rounds):
            for kind in ("stock", "guarded"):
                port = free_port()
                process = serve(kind, port, env)
                try:
                    asyncio.run(load(port, request, 2.0, args.connections))
                    before = cpu_s(process.pid)
                    done = asyncio.run(load(port, request, args.seconds, args.connections))
                    used = cpu_s(process.pid) - before
                finally:
                    process.terminate()
                    process.wait()
                print(
                    f"{kind:<8} {done / args.seconds:8.0f} req/s "
                    f"{used / done * 1e6:6.0f} us CPU per request",
                    flush=True,
                )
    finally:
        redis.cleanup()


if __name__ == "__main__":
    main()
