"""The benchmark's stack on loopback: redis-server, an S3 endpoint (moto), the MongoDB
wire-compatible server, sessionmgr replicas and the baselines, each a child process pinned to
the CPUs it is given; and their CPU and memory as /proc tells them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        raise StackError(f"{name} is not on PATH: install the {package} package")
    return path


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


@dataclass
class Proc:
    """A child process of the stack; `pid` is the process doing the work (not taskset)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid  # taskset execs its command: same pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def memory_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        values = {}
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return {"rss_mb": values.get("VmRSS", 0.0), "hwm_mb": values.get("VmHWM", 0.0)}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # loopback only
            return bool(resp.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


@dataclass
class Stack:
    """Starts and stops every process; `workdir` holds their logs and Redis' files."""

    server_cpus: str | None = "0"
    support_cpus: str | None = "1"
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="sessionmgr-bench-"))
    )
    procs: list[Proc] = field(default_factory=list)
    redis_port: int = 0
    s3_port: int = 0

    def spawn(
        self, name: str, argv: Sequence[str], cpus: str | None, env: Mapping[str, str] | None = None
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            pinned(cpus, argv),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_until(self, proc: Proc, ready: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise StackError(
                    f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}"
                )
            if _http_ok(ready):
                return
            time.sleep(0.2)
        raise StackError(f"{proc.name} did not answer {ready} in {timeout_s} s:\n{proc.log_tail()}")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> Proc:
        binary = require_tool("redis-server", "redis-server (apt-get install redis-server)")
        self.redis_port = free_port()
        # AOF everysec, as the README recommends for production; no RDB snapshots mid-run.
        proc = self.spawn(
            "redis",
            [
                binary,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.workdir),
            ],
            self.support_cpus,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
            time.sleep(0.1)
        raise StackError(f"redis-server did not answer:\n{proc.log_tail()}")

    def start_s3(self) -> Proc:
        binary = require_tool("moto_server", "moto[server] (the bench dependency group)")
        self.s3_port = free_port()
        proc = self.spawn(
            "s3", [binary, "-H", "127.0.0.1", "-p", str(self.s3_port)], self.support_cpus
        )
        self.wait_until(proc, f"http://127.0.0.1:{self.s3_port}/")
        return proc

    def service_env(self, jwt_secret: str, mongodb_uri: str, bucket: str) -> dict[str, str]:
        return {
            "SESSIONMGR_REDIS_URL": self.redis_url,
            "SESSIONMGR_MONGODB_URI": mongodb_uri,
            "SESSIONMGR_MONGODB_DB": "sessionmgr_bench",
            "SESSIONMGR_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "SESSIONMGR_S3_BUCKET": bucket,
            "SESSIONMGR_JWT_SECRET": jwt_secret,
            "SESSIONMGR_LOG_LEVEL": "WARNING",
            # One token drives every connection: a per-principal limit would measure itself.
            "SESSIONMGR_RATE_LIMIT_PER_S": "0",
            # One owner creates tens of thousands of sessions (seeding, the create scenario):
            # past the default quota (1 000) every create would be a 403. Each create still
            # counts the owner's sessions in MongoDB, up to this cap.
            "SESSIONMGR_MAX_SESSIONS_PER_OWNER": "100000000",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start_replica(
        self,
        name: str,
        env: Mapping[str, str],
        cpus: str | None,
        wrap: Sequence[str] = (),
        *,
        write_behind: bool = True,
    ) -> tuple[Proc, int]:
        """`sessionmgr serve`, or bench/serve.py without the worker when `write_behind` is off."""
        port = free_port()
        where = ["--host", "127.0.0.1", "--port", str(port)]
        if write_behind:
            argv = [*wrap, str(BIN / "sessionmgr"), "serve", *where]
        else:
            argv = [*wrap, sys.executable, "-m", "bench.serve", "--no-write-behind", *where]
        proc = self.spawn(name, argv, cpus, env)
        self.wait_until(proc, f"http://127.0.0.1:{port}/health/live", timeout_s=60)
        return proc, port

    def start_wire_mongo(self) -> str:
        """The MongoDB wire-compatible server (nx-27017 over SQLite, not MongoDB) with the
        workarounds of tests/support/wire_mongo.py, on the support CPUs; returns its URI."""
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        port = free_port()
        data = self.workdir / "wire-mongo"
        data.mkdir(exist_ok=True)
        argv = [
            *(sys.executable, "-m", "tests.support.wire_mongo", "--host", "127.0.0.1"),
            *("-p", str(port), "--pid-file", str(data / "nx.pid")),
            *("--data-dir", str(data), "--log-file", str(data / "nx.log")),
        ]
        proc = self.spawn("wire-mongo", argv, self.support_cpus)
        uri = f"mongodb://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.popen.poll() is None:
            client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=300)
            try:
                client.admin.command("ping")
                return uri
            except PyMongoError:
                time.sleep(0.1)
            finally:
                client.close()
        raise StackError(f"the wire-compatible server did not answer:\n{proc.log_tail()}")

    def start_worker(self, env: Mapping[str, str], cpus: str | None) -> Proc:
        """The write-behind worker alone (bench/serve.py --worker-only)."""
        proc = self.spawn(
            "write-behind", [sys.executable, "-m", "bench.serve", "--worker-only"], cpus, env
        )
        time.sleep(2)
        if proc.popen.poll() is not None:
            raise StackError(f"the write-behind worker exited:\n{proc.log_tail()}")
        return proc

    def start_baseline(
        self, name: str, module: str, env: Mapping[str, str], cpus: str | None, ready_path: str
    ) -> tuple[Proc, int]:
        port = free_port()
        argv = [
            str(BIN / "uvicorn"),
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--no-server-header",
            "--log-level",
            "warning",
        ]
        proc = self.spawn(name, argv, cpus, env)
        self.wait_until(proc, f"http://127.0.0.1:{port}{ready_path}")
        return proc, port

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


@contextlib.contextmanager
def running_stack(server_cpus: str | None, support_cpus: str | None) -> Iterator[Stack]:
    stack = Stack(server_cpus=server_cpus, support_cpus=support_cpus)
    try:
        yield stack
    finally:
        stack.stop_all()
        shutil.rmtree(stack.workdir, ignore_errors=True)
