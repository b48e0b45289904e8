"""`sessionmgr serve` replicas as real processes on loopback, sharing whatever backends they are
given (tests/multi_replica)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from sessionmgr.devstack import _die_with_parent, free_port

START_TIMEOUT_S = 60.0  # three imports of the whole app on a busy 2-core machine


class Replica:
    """One `python -m sessionmgr serve` on a free port; its log goes to `log_path`."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def spawn(self) -> None:
        self.port = free_port()
        with self.log_path.open("ab") as log:
            # A fixed argv (this interpreter, the sessionmgr module), no shell.
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "sessionmgr", "serve"),
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                ],
                env=self.env,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"replica {self.name} is not ready: {self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process holds everything it has (connections, pending entries)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain; what it held is left for the others."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return "\n".join(text[-lines:]) or "empty log"


def start_all(replicas: list[Replica]) -> None:
    """Start every replica at once (imports overlap), then wait for each to be ready."""
    for replica in replicas:
        if not replica.alive():
            replica.spawn()
    for replica in replicas:
        replica.wait_ready()


def service_env(**settings: str) -> dict[str, str]:
    """This process's environment without its SESSIONMGR_* variables, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONMGR_")}
    env.update({f"SESSIONMGR_{k.upper()}": v for k, v in settings.items()})
    return env
