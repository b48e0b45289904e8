"""The HTTP-level limits on a real `sessionmgr serve` (docs/security.md): an oversized head is
a 431 that costs no memory, silent and slow clients are closed after the (shortened)
timeouts, past the connection cap a request gets a 503; and two Authorization headers or an
absurd `exp` (which only a raw socket and a hand-made token can send) are a 400 and a 401."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sessionmgr.api.auth import issue_token
from sessionmgr.devstack import free_port
from tests.conftest import JWT_SECRET
from tests.support.redis_server import RedisServer
from tests.unit.test_token_hygiene import signed_raw

START_TIMEOUT_S = 30.0
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 12


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
        )


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as closed)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _problem(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    problem: dict[str, object] = json.loads(body)
    return problem


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if redis_server.process is None:
        redis_server.start()
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "SESSIONMGR_REDIS_URL": redis_server.url,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
        "SESSIONMGR_RATE_LIMIT_PER_S": "0",
        "SESSIONMGR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "SESSIONMGR_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "SESSIONMGR_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "SESSIONMGR_GC_FREEZE": "false",
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(  # fixed argv, no shell
            [
                sys.executable,
                "-m",
                "sessionmgr",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    server = Served(process, port, log)
    try:
        _wait_until_live(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_live(server: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            with server.connect() as sock:
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                if _status(_read_until_closed(sock)) == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sessionmgr serve did not start: {server.log.read_text()[-2000:]}")


def _get_live(server: Served) -> int:
    with server.connect() as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return _status(_read_until_closed(sock))


def test_a_1_mb_header_is_a_431_and_the_process_does_not_grow(served: Served) -> None:
    with served.connect() as sock:
        # The server may answer and close before taking it all: what we want.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 1_048_576)
        answer = _read_until_closed(sock)
    assert _status(answer) == 431, answer[:300]
    assert _problem(answer)["type"] == "/problems#head-too-large"

    before = served.rss_kb()
    sockets = [served.connect() for _ in range(20)]
    try:
        for sock in sockets:  # unfinished 1 MB heads, as the attack sent them
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 1_048_576)
        time.sleep(0.5)
        grown_kb = served.rss_kb() - before
    finally:
        for sock in sockets:
            sock.close()
    # Before the limit, 20 buffered heads were 20 MB at least; the parser now holds 16 KB each.
    assert grown_kb < 5 * 1024, f"RSS grew by {grown_kb} KB"
    assert _get_live(served) == 200


def test_too_many_header_lines_is_a_431(served: Served) -> None:
    lines = b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    with served.connect() as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + lines + b"\r\n")
        answer = _read_until_closed(sock)
    assert _status(answer) == 431, answer[:300]
    assert "header lines" in str(_problem(answer)["detail"])


def test_a_head_within_the_limit_is_served(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(
            b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Fine: "
            + b"a" * 12_000
            + b"\r\nConnection: close\r\n\r\n"
        )
        assert _status(_read_until_closed(sock)) == 200


def test_a_silent_connection_is_closed_after_the_header_timeout(served: Served) -> None:
    with served.connect() as sock:
        started = time.monotonic()
        answer = _read_until_closed(sock)
        took = time.monotonic() - started
    assert answer == b""  # nothing was asked, nothing is answered
    assert HEADER_TIMEOUT_S * 0.8 <= took < HEADER_TIMEOUT_S + 3, took


def test_an_unfinished_head_is_a_408_after_the_header_timeout(served: Served) -> None:
    with served.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        for _ in range(3):  # trickling bytes does not extend the deadline
            time.sleep(HEADER_TIMEOUT_S / 4)
            sock.sendall(b"a")
        answer = _read_until_closed(sock)
        took = time.monotonic() - started
    assert _status(answer) == 408, answer[:300]
    assert took < HEADER_TIMEOUT_S + 3, took


def test_a_dribbled_body_is_a_408_after_the_body_timeout(served: Served) -> None:
    token = issue_token(JWT_SECRET, "dribbler")
    head = (
        "POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 200\r\n\r\n"
    )
    with served.connect() as sock:
        started = time.monotonic()
        sock.sendall(head.encode() + b"{")
        try:
            while time.monotonic() - started < BODY_TIMEOUT_S + 5:
                time.sleep(0.25)
                sock.sendall(b" ")  # 4 bytes/s, far below the minimum rate
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_closed(sock)
        took = time.monotonic() - started
    assert _status(answer) == 408, answer[:300]
    assert "body" in str(_problem(answer)["detail"])
    assert took < BODY_TIMEOUT_S + 3, took


def test_past_the_connection_cap_a_request_gets_503(served: Served) -> None:
    idle = [served.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them all
        with served.connect() as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = _read_until_closed(sock)  # closed after the answer, though keep-alive
    finally:
        for sock in idle:
            sock.close()
    assert _status(answer) == 503, answer[:300]
    assert b"retry-after: 1" in answer.lower()
    assert _problem(answer)["type"] == "/problems#too-many-connections"
    time.sleep(0.2)  # the idle ones are gone: the replica serves again
    assert _get_live(served) == 200


def test_two_authorization_headers_are_a_400(served: Served) -> None:
    good = issue_token(JWT_SECRET, "twice")
    with served.connect() as sock:
        sock.sendall(
            f"GET /v1/sessions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {good}\r\n"
            f"Authorization: Bearer {good}x\r\nConnection: close\r\n\r\n".encode()
        )
        answer = _read_until_closed(sock)
    assert _status(answer) == 400, answer[:300]
    assert "one Authorization header" in str(_problem(answer)["detail"])


def test_a_token_with_an_exp_of_10_to_the_309_is_a_401(served: Served) -> None:
    token = signed_raw('{"sub":"huge","exp":1' + "0" * 309 + "}", JWT_SECRET)
    with served.connect() as sock:
        sock.sendall(
            f"GET /v1/sessions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}"
            "\r\nConnection: close\r\n\r\n".encode()
        )
        answer = _read_until_closed(sock)
    assert _status(answer) == 401, answer[:300]
    assert "exp claim is invalid" in str(_problem(answer)["detail"])
