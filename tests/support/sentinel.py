"""A Sentinel-managed Redis on loopback: a master, its replicas and three sentinels, each a real
process (`redis-server`, and `redis-sentinel` or `redis-server --sentinel`), fast to fail over:
the master is down after `DOWN_AFTER_MS` without answers."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis as redis_sync

from sessionmgr.devstack import _die_with_parent, free_port

MASTER_NAME = "sessionmgr"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
READY_TIMEOUT_S = 20.0


def sentinel_command() -> list[str] | None:
    """`redis-sentinel` (Debian's package), else `redis-server --sentinel`; None without both."""
    if binary := shutil.which("redis-sentinel"):
        return [binary]
    if binary := shutil.which("redis-server"):
        return [binary]  # the config file goes first, then --sentinel
    return None


class _Process:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A fixed argv built from PATH's redis binaries and our temp files; no shell.
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class SentinelTopology:
    """A master, `replicas` replicas and 3 sentinels; `start()` returns once the sentinels know
    each other and every replica is in sync."""

    def __init__(self, replicas: int = 1) -> None:
        command = sentinel_command()
        if command is None:
            raise RuntimeError("neither redis-sentinel nor redis-server is on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="sessionmgr-sentinel-"))
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[int, _Process] = {}
        for i, port in enumerate(self.data_ports):
            argv = [
                *(shutil.which("redis-server") or "redis-server", "--port", str(port)),
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(self._dir(f"node{i}"))),
                *("--logfile", str(self.dir / f"node{i}.log")),
            ]
            if i > 0:
                argv += ["--replicaof", "127.0.0.1", str(self.data_ports[0])]
            self.nodes[port] = _Process(argv, self.dir / f"node{i}.log")
        self.sentinels: list[_Process] = []
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        "bind 127.0.0.1",
                        f"dir {self._dir(f'sentinel{i}')}",
                        f"logfile {self.dir / f'sentinel{i}.log'}",
                        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.data_ports[0]} 2",
                        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                        f"sentinel parallel-syncs {MASTER_NAME} 1",
                        "",
                    ]
                )
            )
            argv = [*command, str(conf)]
            if not command[0].endswith("redis-sentinel"):
                argv.append("--sentinel")
            self.sentinels.append(_Process(argv, self.dir / f"sentinel{i}.log"))

    def _dir(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(exist_ok=True)
        return path

    @property
    def sentinel_addresses(self) -> str:
        """`SESSIONMGR_REDIS_SENTINELS`."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> SentinelTopology:
        for node in self.nodes.values():
            node.start()
        for port in self.data_ports:
            _wait_for_ping(port)
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._sentinels_ready():
                return self
            time.sleep(0.1)
        self.cleanup()
        raise RuntimeError(f"the sentinels did not find each other and the replica ({self.dir})")

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with redis_sync.Redis(port=port, socket_timeout=0.5) as s:
                    state = s.sentinel_master(MASTER_NAME)
            except redis_sync.RedisError:
                return False
            replicas = len(self.data_ports) - 1
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < replicas:
                return False
        for port in self.data_ports[1:]:
            with redis_sync.Redis(port=port, socket_timeout=0.5) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
        return self.replicas_online() == len(self.data_ports) - 1

    def replicas_online(self) -> int:
        """Replicas the master itself counts as `online` (in sync, streaming)."""
        with self.master_client() as master:
            info = master.info("replication")
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
        )

    def master_port(self) -> int:
        with redis_sync.Redis(port=self.sentinel_ports[0], socket_timeout=0.5) as s:
            _host, port = s.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def master_client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.master_port(), socket_timeout=0.5)

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.nodes[port].kill()
        return port

    def failover(self) -> None:
        """`SENTINEL FAILOVER`: a graceful switch, asked of one sentinel."""
        with redis_sync.Redis(port=self.sentinel_ports[0], socket_timeout=2) as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def wait_for_new_master(self, old_port: int, timeout_s: float = 20.0) -> float:
        """Seconds until the sentinels name a master other than `old_port` that takes writes."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                port = self.master_port()
                if port != old_port:
                    with redis_sync.Redis(port=port, socket_timeout=0.5) as r:
                        if r.info("replication")["role"] == "master":
                            return time.monotonic() - started
            except redis_sync.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"no new master within {timeout_s} s ({self.dir})")

    def cleanup(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_for_ping(port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer")
