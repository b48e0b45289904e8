"""A real `sessionmgr serve` in a process of its own, and the one schema every problem meets.

The black-box tests of the HTTP contract talk to it over TCP with a plain httpx client, as a
MAD would; every 4xx/5xx answer they see is checked against `PROBLEM_SCHEMA` as it arrives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from sessionmgr.api.auth import issue_token
from sessionmgr.devstack import free_port
from tests.conftest import JWT_SECRET

START_TIMEOUT_S = 30.0

# RFC 9457 as this API promises it (docs/problems.md): one shape for every error.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "pattern": r"^/problems#[a-z][a-z-]*$"},
        "title": {"type": "string", "minLength": 1},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string", "minLength": 1},
        "instance": {"type": "string", "pattern": "^/"},
        "current_version": {"type": ["integer", "null"]},
        "backend": {"type": "string"},
        "limit": {"type": "string"},
        "quota": {"type": "integer"},
        "errors": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "additionalProperties": False,
                "properties": {
                    # a JSON pointer into the body, or a query parameter's or header's name
                    "field": {"type": "string", "pattern": r"^(|/.*|[A-Za-z][A-Za-z_-]*)$"},
                    "message": {"type": "string", "minLength": 1},
                },
            },
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(PROBLEM_SCHEMA)


def check_problem(response: httpx.Response) -> dict[str, Any]:
    """An error answer in the one problem shape; returns its body. Leaked exception text
    (a Python repr such as `'data'`, a traceback) fails it too."""
    assert response.headers.get("content-type", "").startswith("application/problem+json"), (
        response.status_code,
        response.headers,
        response.text[:300],
    )
    body = response.json()
    errors = sorted(_VALIDATOR.iter_errors(body), key=str)
    assert not errors, (body, [e.message for e in errors])
    assert body["status"] == response.status_code, body
    assert "Traceback" not in response.text, body
    return body  # type: ignore[no-any-return]


class Served:
    """The process, its URL, and the problems every client made from it has seen."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log
        self.problems: list[dict[str, Any]] = []

    def client(self) -> httpx.Client:
        """A client whose every 4xx/5xx answer is checked against the problem schema."""

        def record(response: httpx.Response) -> None:
            if response.status_code >= 400 and response.request.method != "HEAD":
                response.read()
                self.problems.append(check_problem(response))

        return httpx.Client(base_url=self.base_url, timeout=15, event_hooks={"response": [record]})


def headers(sub: str, roles: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(JWT_SECRET, sub, roles=roles)}", **extra}


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[Served]:
    """`sessionmgr serve` with `env` on a free port, stopped (and waited for) at the end."""
    port = free_port()
    full_env = {
        **os.environ,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
        "SESSIONMGR_LOG_LEVEL": "WARNING",
        "SESSIONMGR_GC_FREEZE": "false",
        **env,
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(  # fixed argv, no shell
            [
                *(sys.executable, "-m", "sessionmgr", "serve"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    served = Served(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_until_live(served)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_live(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=served.base_url) as http:
        while time.monotonic() < deadline and served.process.poll() is None:
            try:
                if http.get("/health/live").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(
        "sessionmgr serve did not start: " + served.log.read_text(errors="replace")[-2000:]
    )
