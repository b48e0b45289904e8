"""The `sessionmgr` command line and its dev stack: what a developer or operator sees."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis as redis_sync

import sessionmgr
from sessionmgr import cli, devstack
from sessionmgr.api.auth import TokenVerifier
from sessionmgr.devstack import DevStackError, RedisServer, free_port, redact_url
from sessionmgr.settings import load_settings
from tests.support.s3_server import S3_BUCKET, S3Server

SECRET = "cli-test-secret-that-is-long-enough-0123456789"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment with no SESSIONMGR_* variable."""
    for name in list(os.environ):
        if name.startswith("SESSIONMGR_"):
            monkeypatch.delenv(name)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"sessionmgr {sessionmgr.__version__}\n"


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


async def test_token_is_accepted_by_the_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_JWT_AUDIENCE", "sessionmgr")
    monkeypatch.setenv("SESSIONMGR_JWT_ISSUER", "https://issuer.example")

    code = cli.main(["token", "--sub", "mad:planner", "--roles", "service, admin", "--ttl", "120"])

    assert code == 0
    token = capsys.readouterr().out.strip()
    principal = await TokenVerifier(load_settings()).verify(f"Bearer {token}")
    assert principal.sub == "mad:planner"
    assert principal.roles == {"service", "admin"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120


def test_token_uses_the_configured_hmac_algorithm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET * 2)  # HS512 wants 64 bytes or more
    monkeypatch.setenv("SESSIONMGR_JWT_ALGORITHMS", "HS512")

    assert cli.main(["token", "--sub", "alice"]) == 0

    assert jwt.get_unverified_header(capsys.readouterr().out.strip())["alg"] == "HS512"


def test_token_without_secret_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "--sub", "alice"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "SESSIONMGR_JWT_SECRET" in captured.err


@pytest.mark.parametrize("command", [["serve"], ["check"], ["token", "--sub", "a"], ["dev"]])
def test_bad_configuration_stops_with_the_variable_named(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_LEASE_TTL_S", "0")

    assert cli.main(command) == 2

    assert "error: SESSIONMGR_LEASE_TTL_S" in capsys.readouterr().err


def test_serve_refuses_to_start_without_a_token_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve"]) == 2
    assert "SESSIONMGR_JWT_SECRET" in capsys.readouterr().err


def test_serve_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_serve_runs_the_app_factory_behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr("sessionmgr.telemetry.configure_logging", lambda level: None)
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_SHUTDOWN_GRACE_S", "7")

    assert cli.main(["serve", "--port", "9000", "--workers", "2"]) == 0

    [(app, options)] = calls
    assert app == "sessionmgr.app:create_app"
    assert options["factory"] is True
    assert (options["port"], options["workers"], options["host"]) == (9000, 2, "0.0.0.0")
    assert options["proxy_headers"] is True
    assert options["lifespan"] == "on"
    assert options["timeout_graceful_shutdown"] == 7


def test_dev_without_redis_server_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither redis-server nor the in-process fallback (the `dev` extra) is installed."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "fakeredis", None)  # import fails as if not installed

    assert cli.main(["dev", "--port", str(free_port())]) == 2

    err = capsys.readouterr().err
    assert "redis-server is not on PATH" in err
    assert "pip install -e '.[dev]'" in err
    assert "apt-get install redis-server" in err
    assert "SESSIONMGR_REDIS_URL" in err


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`check` reaches S3 too: the tests' moto server, never a cloud endpoint."""
    monkeypatch.setenv("SESSIONMGR_S3_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("SESSIONMGR_S3_BUCKET", S3_BUCKET)
    return s3_server


def test_check_passes_when_every_backend_answers(
    redis_url: str,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)

    assert cli.main(["check"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "config"],
        ["ok", "jwt"],
        ["ok", "redis"],
        ["warn", "redis"],  # the tests' redis-server keeps nothing on disk
        ["ok", "mongodb"],
        ["ok", "s3"],
    ]
    assert redis_url in lines[2]
    assert "master with 0 replica(s) online" in lines[2]
    assert "no persistence" in lines[3]
    assert f"{s3_env.url} bucket {S3_BUCKET}  bucket reachable" in lines[5]


def test_check_warns_when_redis_may_evict_or_keeps_only_snapshots(
    redis_url: str,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    with redis_sync.Redis.from_url(redis_url) as r:
        r.config_set("maxmemory-policy", "allkeys-lru")
        r.config_set("save", "3600 1")
        try:
            assert cli.main(["check"]) == 0
        finally:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("save", "")

    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warn")]
    assert len(warnings) == 2, warnings
    assert "maxmemory-policy is allkeys-lru" in warnings[0]
    assert "only RDB snapshots ('3600 1'), no AOF" in warnings[1]


def test_check_fails_on_a_missing_bucket(
    redis_url: str,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_S3_BUCKET", "no-such-bucket")

    assert cli.main(["check"]) == 1

    out = capsys.readouterr().out
    assert "FAIL  s3" in out
    assert "bucket no-such-bucket does not exist" in out


def test_check_fails_on_an_unreachable_redis_without_showing_its_password(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", f"redis://app:s3cret@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)

    assert cli.main(["check"]) == 1

    out = capsys.readouterr().out
    redis_line = next(line for line in out.splitlines() if "redis" in line.split()[:2])
    assert redis_line.startswith("FAIL  redis")
    assert "app:***@127.0.0.1" in redis_line
    assert "s3cret" not in out
    assert "ok    mongodb" in out


def test_check_fails_without_a_way_to_verify_tokens(
    redis_url: str,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")

    assert cli.main(["check"]) == 1

    assert "FAIL  jwt" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("rediss://:pw@cache:6380/0", "rediss://:***@cache:6380/0"),
        ("mongodb://app:p%40ss@h1:1,h2:2/db?tls=true", "mongodb://app:***@h1:1,h2:2/db?tls=true"),
        ("mongodb+srv://app@cluster.example/db", "mongodb+srv://app@cluster.example/db"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_dev_defaults_to_in_memory_mongodb_and_a_fresh_secret_per_run() -> None:
    settings = devstack.dev_settings({})

    assert settings.mongodb_uri == "mongomock://"
    assert settings.jwt_secret is not None
    assert len(settings.jwt_secret) == 48
    assert devstack.dev_settings({}).jwt_secret != settings.jwt_secret
    token = devstack.dev_token(settings)
    assert token is not None
    principal = await TokenVerifier(settings).verify(f"Bearer {token}")
    assert (principal.sub, principal.roles) == ("dev-user", frozenset())
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 12 * 3600


def test_dev_uses_the_backends_and_secret_the_environment_names() -> None:
    env = {
        "SESSIONMGR_REDIS_URL": "redis://:hunter2@cache:6379/0",
        "SESSIONMGR_MONGODB_URI": "mongodb://app:hunter2@db:27017/",
        "SESSIONMGR_JWT_SECRET": SECRET,
    }
    settings = devstack.dev_settings(env)

    text = devstack.banner("http://127.0.0.1:8080", settings, redis=None)

    assert settings.jwt_secret == SECRET
    assert "redis://:***@cache:6379/0  (from SESSIONMGR_REDIS_URL)" in text
    assert "mongodb://app:***@db:27017/  (from SESSIONMGR_MONGODB_URI)" in text
    assert "hunter2" not in text
    assert "export TOKEN=" in text
    assert "ui       http://127.0.0.1:8080/ui " in text  # the inspector, beside the token


def test_dev_prints_no_token_when_an_issuer_signs_them() -> None:
    settings = devstack.dev_settings({"SESSIONMGR_JWT_JWKS_URL": "https://idp.example/jwks"})

    text = devstack.banner("http://127.0.0.1:8080", settings, redis=None)

    assert settings.jwt_secret is None
    assert "TOKEN" not in text
    assert "from your issuer" in text


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
    ],
)
def test_banner_urls_reach_the_server_from_this_machine(host: str, url: str) -> None:
    assert devstack.base_url(host, 8080) == url


def test_redis_server_that_cannot_start_says_why() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1])
        try:
            with pytest.raises(DevStackError, match="did not answer on port"):
                server.start()
            assert server.process is None
        finally:
            server.cleanup()
    assert not server.dir.exists()


def test_check_warns_about_a_misspelled_variable(
    redis_url: str,
    s3_env: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_LEASE_TIME", "5")

    assert cli.main(["check"]) == 0

    out = capsys.readouterr().out
    assert "warn  config   SESSIONMGR_LEASE_TIME is not a setting" in out


def test_dev_uses_an_s3_the_environment_names() -> None:
    env = {"SESSIONMGR_S3_ENDPOINT_URL": "https://s3.internal:9000"}
    settings = devstack.dev_settings(env)

    text = devstack.banner("http://127.0.0.1:8080", settings, redis=None)

    assert devstack.s3_configured(env)
    assert not devstack.s3_configured({})
    assert (
        "s3       https://s3.internal:9000 bucket sessionmgr-archive  (from the environment)"
        in (text)
    )


def test_dev_without_moto_says_archiving_is_off() -> None:
    text = devstack.banner("http://127.0.0.1:8080", devstack.dev_settings({}), None, s3_off=True)
    assert "s3       off  (archiving answers 503; pip install -e '.[dev]' for S3)" in text


def test_the_banner_names_the_sessionmgr_that_runs(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unactivated venv's sessionmgr is not on PATH: the banner's token lines must still
    run as printed from the directory dev was started in."""
    exe = tmp_path / ".venv" / "bin" / "sessionmgr"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(exe), "dev"])
    assert devstack.self_command() == ".venv/bin/sessionmgr"

    monkeypatch.setenv("PATH", str(exe.parent))
    assert devstack.self_command() == "sessionmgr"

    monkeypatch.setattr(sys, "argv", ["-m"])  # python -m sessionmgr dev
    assert devstack.self_command().endswith(" -m sessionmgr")
