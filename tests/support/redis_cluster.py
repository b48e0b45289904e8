"""A real Redis Cluster on loopback: 3 masters and 3 replicas of the Debian `redis-server`.

Built as an operator would: six `redis-server --cluster-enabled yes` nodes (AOF everysec, as
the prod overlay runs Redis), then `redis-cli --cluster create ... --cluster-replicas 1
--cluster-yes`. Each node needs its port and port + 10000 (the cluster bus) free.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis as redis_sync

START_TIMEOUT_S = 30.0


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """Ports p with p and p + 10000 free (the bus), never 6379, from a free range."""
    found: list[int] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        start = 20_000 + int(s.getsockname()[1]) % 20_000
    port = start
    while len(found) < count and port < 55_000:
        if port != 6379 and _free(port) and _free(port + 10_000):
            found.append(port)
        port += 1
    if len(found) < count:
        raise RuntimeError("no free ports for a Redis Cluster")
    return found


class RedisClusterServer:
    def __init__(self, masters: int = 3, replicas_per_master: int = 1) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError(
                "redis-server and redis-cli are needed (apt-get install redis-server)"
            )
        self.binary, self.cli = binary, cli
        self.masters, self.per_master = masters, replicas_per_master
        self.ports = free_cluster_ports(masters * (1 + replicas_per_master))
        self.dir = Path(tempfile.mkdtemp(prefix="sessionmgr-cluster-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                self.binary,
                *("--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", "2000"),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
                *("--dir", str(node_dir), "--logfile", str(node_dir / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.node(port).ping():
                    return
            except redis_sync.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"cluster node {port} did not start")

    def start(self) -> RedisClusterServer:
        for port in self.ports:
            self.start_node(port)
        self.redis_cli(
            "--cluster",
            "create",
            *[f"127.0.0.1:{p}" for p in self.ports],
            "--cluster-replicas",
            str(self.per_master),
            "--cluster-yes",
        )
        self.wait_ok()
        return self

    def redis_cli(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Every running node says `cluster_state:ok` and knows every other node."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                states = [self.node(p).cluster("info") for p in self.processes]
                if all(s["cluster_state"] == "ok" for s in states) and all(
                    int(s["cluster_known_nodes"]) == len(self.ports) for s in states
                ):
                    masters, replicas = self.roles()
                    if (len(masters), len(replicas)) == (
                        self.masters,
                        self.masters * self.per_master,
                    ):
                        return
            except redis_sync.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def roles(self) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        """(masters, replicas) as CLUSTER NODES on a live node describes them."""
        port = next(iter(self.processes))
        nodes = self.node(port).cluster("nodes")
        masters = [
            {"id": v["node_id"], "port": int(k.split(":")[1].split("@")[0]), **v}
            for k, v in nodes.items()
            if "master" in v["flags"] and "fail" not in v["flags"] and v.get("slots")
        ]
        replicas = [
            {"id": v["node_id"], "port": int(k.split(":")[1].split("@")[0]), **v}
            for k, v in nodes.items()
            if "slave" in v["flags"] and "fail" not in v["flags"]
        ]
        return masters, replicas

    def reshard(self, slots: int) -> None:
        """Move `slots` slots from the first master to the second, keys and all, as an
        operator would (`redis-cli --cluster reshard`)."""
        masters, _ = self.roles()
        source, target = masters[0], masters[1]
        self.redis_cli(
            "--cluster",
            "reshard",
            f"127.0.0.1:{source['port']}",
            *("--cluster-from", str(source["id"]), "--cluster-to", str(target["id"])),
            *("--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "50"),
            timeout=600,
        )

    def failover(self) -> tuple[int, int]:
        """`CLUSTER FAILOVER` on a replica: it takes its master's slots (after catching up
        with it, so nothing written is lost). Returns (old master port, new master port)."""
        masters, replicas = self.roles()
        replica = replicas[0]
        master = next(m for m in masters if m["id"] == replica["master_id"])
        self.node(int(str(replica["port"]))).execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            masters, _ = self.roles()
            if any(m["id"] == replica["id"] for m in masters):
                self.wait_ok()
                return int(str(master["port"])), int(str(replica["port"]))
            time.sleep(0.1)
        raise RuntimeError("CLUSTER FAILOVER did not complete")

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
