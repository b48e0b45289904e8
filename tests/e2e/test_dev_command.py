"""`sessionmgr dev` as a developer runs it: banner, token, a session, and a clean stop."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from sessionmgr.devstack import free_port

STARTUP_TIMEOUT_S = 30.0

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server on PATH"
)


def _lines(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_banner(lines: queue.Queue[str], process: subprocess.Popen[str]) -> str:
    """Everything printed up to the banner's last line, the curl that reads a session."""
    text = ""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while "/v1/sessions/<id>" not in text:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            pytest.fail(f"no token from sessionmgr dev (exit {process.poll()}):\n{text}")
        try:
            text += lines.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            continue
    return text


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONMGR_")}
    with (tmp_path / "stderr.log").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sessionmgr", "dev", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            yield process, port
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_dev_serves_with_the_printed_token_and_stops_its_redis(
    dev_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = dev_process
    assert process.stdout is not None
    banner = _read_banner(_lines(process.stdout), process)
    token = re.search(r"export TOKEN=(\S+)", banner)
    redis_port = re.search(r"redis://127\.0\.0\.1:(\d+)/0", banner)
    assert token is not None
    assert redis_port is not None
    assert f"curl -s -X POST http://127.0.0.1:{port}/v1/sessions" in banner

    headers = {"Authorization": f"Bearer {token.group(1)}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as http:
        created = http.post("/v1/sessions", json={"work_in_progress": {"step": 1}})
        assert created.status_code == 201, created.text
        fetched = http.get(created.headers["Location"])
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["owner_id"] == "dev-user"
    assert fetched.json()["work_in_progress"] == {"step": 1}
    assert re.search(r"s3 +http://127\.0\.0\.1:\d+ bucket sessionmgr-archive  \(in-process", banner)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as http:
        archived = http.post(f"{created.headers['Location']}/archive")
        assert archived.status_code == 200, archived.text
        assert archived.json()["state"] == "archived"
        back = http.get(created.headers["Location"])
    assert back.status_code == 200, back.text
    assert (back.json()["state"], back.json()["work_in_progress"]) == ("dormant", {"step": 1})

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=15) == 128 + signal.SIGTERM
    assert not _accepts_connections(int(redis_port.group(1)))
    assert not _accepts_connections(port)
