"""`sessionmgr dev`: the whole service on one machine, with private backends that die with it.

Redis is a private `redis-server` from PATH on a free port, or an in-process fakeredis where
there is none (unless `SESSIONMGR_REDIS_URL` is set); MongoDB the in-memory engine (unless
`SESSIONMGR_MONGODB_URI` is set); S3 an in-process moto server (unless `SESSIONMGR_S3_ENDPOINT_URL`
or `SESSIONMGR_S3_BUCKET` is set); the JWT secret a random one for this run (unless
`SESSIONMGR_JWT_SECRET` is set). `RedisServer` and `InProcessS3` are also the test suite's.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from types import FrameType

import msgspec
import uvicorn
from dependency_injector import providers

from sessionmgr.api.auth import issue_token
from sessionmgr.api.guarded_http import GuardedHttpProtocol
from sessionmgr.settings import PREFIX, Settings, effective_algorithms, load_settings

DEV_SUB = "dev-user"
DEV_AWS_KEY = "sessionmgr-dev"
DEV_TOKEN_TTL_S = 12 * 3600
REDIS_START_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
_USERINFO = re.compile(r"(?<=://)([^/?#@:]*):[^/?#@]*@")


class DevStackError(RuntimeError):
    """The dev stack cannot start; the message says what to install or set."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact_url(url: str) -> str:
    """`redis://user:secret@host` → `redis://user:***@host`: URLs are printed, passwords not."""
    return _USERINFO.sub(r"\1:***@", url)


def _die_with_parent() -> None:
    """Linux: the kernel stops redis-server if its parent dies without cleaning up (SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A private redis-server on a free loopback port, keeping nothing on disk."""

    description = "private redis-server, stops with dev"
    # Nothing on disk: a dev Redis lives as long as `sessionmgr dev`.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise DevStackError(
                "redis-server is not on PATH: install it (apt-get install redis-server, or "
                f"brew install redis) or set {PREFIX}REDIS_URL to a Redis you run"
            )
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sessionmgr-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # A session of its own: Ctrl-C reaches only sessionmgr, which stops Redis after the
        # write-behind worker has drained, not before. The argv is fixed; there is no shell.
        self.process = subprocess.Popen(  # noqa: S603
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *self.persistence,
                *("--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._answers_ping():
                return self
            time.sleep(0.05)
        log = self._log_tail()
        self.stop()
        raise DevStackError(f"redis-server did not answer on port {self.port}: {log}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            lines = (self.dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "empty log"


class InProcessRedis:
    """fakeredis serving RESP on a loopback port, for machines without redis-server.

    Needs the `dev` extra (`pip install -e '.[dev]'`: fakeredis with Lua, which the hot
    store's read script uses). Good for trying the API; use a real redis-server for anything
    else, it is the only one the test suite proves correct.
    """

    description = "in-process fakeredis, stops with dev"

    def __init__(self) -> None:
        try:
            from fakeredis import TcpFakeServer
        except ImportError:
            raise DevStackError(
                "redis-server is not on PATH and fakeredis is not installed: install "
                "redis-server (apt-get install redis-server, or brew install redis), or "
                "pip install -e '.[dev]' for an in-process Redis, or set SESSIONMGR_REDIS_URL"
            ) from None
        self._server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> InProcessRedis:
        self._thread.start()
        return self

    def cleanup(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve loop that must be running
            self._server.shutdown()
        self._server.server_close()


class InProcessS3:
    """An S3 endpoint (moto's server) on a free loopback port, in a thread of this process.

    Needs the `dev` extra (`pip install -e '.[dev]'`). Objects live in memory and go when the
    process ends; the bucket is created at start. Also the test suite's S3.
    """

    description = "in-process S3 (moto), gone when dev stops"

    def __init__(self, bucket: str, region: str = "us-east-1") -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise DevStackError(
                "moto is not installed: install the dev extra (pip install -e '.[dev]') or set "
                f"{PREFIX}S3_ENDPOINT_URL to an S3 endpoint you run"
            ) from None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.bucket = bucket
        self.region = region
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> InProcessS3:
        import boto3

        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        # moto takes any credentials; these never leave this machine.
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=DEV_AWS_KEY,
            aws_secret_access_key=DEV_AWS_KEY,
        )
        options = {}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        client.create_bucket(Bucket=self.bucket, **options)
        client.close()
        return self

    def stop(self) -> None:
        if self.port:
            self._server.stop()
            self.port = 0


def moto_installed() -> bool:
    return importlib.util.find_spec("moto") is not None


def dev_aws_credentials(environ: MutableMapping[str, str]) -> None:
    """Credentials for the in-process S3 where none are set, and no probe of cloud metadata."""
    environ.setdefault("AWS_ACCESS_KEY_ID", DEV_AWS_KEY)
    environ.setdefault("AWS_SECRET_ACCESS_KEY", DEV_AWS_KEY)
    environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def s3_configured(environ: Mapping[str, str]) -> bool:
    return bool(environ.get(f"{PREFIX}S3_ENDPOINT_URL") or environ.get(f"{PREFIX}S3_BUCKET"))


def private_redis() -> RedisServer | InProcessRedis:
    """A private redis-server when one is on PATH, else an in-process Redis (DESIGN §7)."""
    if shutil.which("redis-server"):
        return RedisServer()
    return InProcessRedis()


def dev_settings(environ: Mapping[str, str]) -> Settings:
    """The environment's settings, with in-memory MongoDB and a random JWT secret as defaults."""
    overrides: dict[str, str] = {}
    if not environ.get(f"{PREFIX}MONGODB_URI"):
        overrides["mongodb_uri"] = "mongomock://"
    keys = ("JWT_SECRET", "JWT_PUBLIC_KEY", "JWT_JWKS_URL")
    if not any(environ.get(PREFIX + k) for k in keys):
        overrides["jwt_secret"] = secrets.token_urlsafe(36)  # 48 characters
    return load_settings(environ, **overrides)


def dev_token(settings: Settings) -> str | None:
    """A token for `dev-user`, or None when tokens come from an issuer we hold no key for."""
    if settings.jwt_secret is None:
        return None
    return issue_token(
        settings.jwt_secret,
        DEV_SUB,
        ttl_s=DEV_TOKEN_TTL_S,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        algorithm=effective_algorithms(settings)[0],
    )


def banner(
    base_url: str,
    settings: Settings,
    redis: RedisServer | InProcessRedis | None,
    s3: InProcessS3 | None = None,
    *,
    s3_off: bool = False,
) -> str:
    redis_origin = redis.description if redis else f"from {PREFIX}REDIS_URL"
    s3_origin = s3.description if s3 else "from the environment"
    s3_target = f"{settings.s3_endpoint_url or 'AWS'} bucket {settings.s3_bucket}"
    if s3_off:
        s3_target, s3_origin = "off", "archiving answers 503; pip install -e '.[dev]' for S3"
    mongo_origin = (
        "in memory, gone when dev stops"
        if settings.mongodb_in_memory
        else f"from {PREFIX}MONGODB_URI"
    )
    lines = [
        f"sessionmgr dev is up on {base_url}  (Ctrl-C stops it)",
        f"  redis    {redact_url(settings.redis_url)}  ({redis_origin})",
        f"  mongodb  {redact_url(settings.mongodb_uri)}  ({mongo_origin})",
        f"  s3       {s3_target}  ({s3_origin})",
        f"  api      {base_url}/schema  (OpenAPI: {base_url}/schema/openapi.json)",
        f"  health   {base_url}/health",
        "",
    ]
    if settings.ui:
        lines.insert(-2, f"  ui       {base_url}/ui  (the session inspector: sign in with a token)")
    token = dev_token(settings)
    if token is None:
        lines.append("Tokens come from your issuer (a public key or JWKS is configured).")
        return "\n".join(lines)
    auth = '-H "Authorization: Bearer $TOKEN"'
    lines += [
        f"A token for sub {DEV_SUB} (no roles, valid {DEV_TOKEN_TTL_S // 3600} h):",
        f"export TOKEN={token}",
        "",
        "Create a session, then read it (put the id from the first answer in the second):",
        f"curl -s -X POST {base_url}/v1/sessions {auth} -H 'Content-Type: application/json' "
        """-d '{"work_in_progress":{"step":1}}'""",
        f"curl -s {base_url}/v1/sessions/<id> {auth}",
        "",
        "Tokens for other callers (a MAD, an admin), signed with this run's secret:",
        f"{PREFIX}JWT_SECRET={settings.jwt_secret} {self_command()} token --sub mad:planner",
        f"{PREFIX}JWT_SECRET={settings.jwt_secret} {self_command()} token --sub ops --roles admin",
    ]
    return "\n".join(lines)


def self_command() -> str:
    """How a shell in this directory runs this very `sessionmgr` (an unactivated venv's, say)."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) != "sessionmgr" or not os.access(argv0, os.X_OK):
        return f"{shlex.quote(sys.executable)} -m sessionmgr"
    on_path = shutil.which("sessionmgr")
    if on_path and os.path.samefile(on_path, argv0):
        return "sessionmgr"
    relative = os.path.relpath(argv0)
    return shlex.quote(relative if not relative.startswith("..") else argv0)


def base_url(host: str, port: int) -> str:
    """Where a local curl reaches the server (a wildcard bind is reached on loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host)  # noqa: S104
    if shown is None:
        shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class _DevServer(uvicorn.Server):
    """Prints the banner once the socket listens, so every line of it works when it appears."""

    def __init__(self, config: uvicorn.Config, banner_text: str) -> None:
        super().__init__(config)
        self._banner = banner_text

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            print(self._banner, flush=True)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGINT/SIGTERM become SystemExit, so `finally` blocks run.

    uvicorn handles both while it serves and, once shut down, raises the signal again with the
    handler it found: with the default SIGTERM handler the process would die on the spot and
    leave redis-server behind.
    """
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(host: str, port: int, environ: Mapping[str, str] | None = None) -> None:
    """Serve until stopped; the private redis-server is stopped whatever happens."""
    from sessionmgr.app import create_app  # the whole app: only `dev` itself needs it
    from sessionmgr.container import build_container

    env = os.environ if environ is None else environ
    settings = dev_settings(env)
    redis: RedisServer | InProcessRedis | None = None
    s3: InProcessS3 | None = None
    s3_off = False
    with _signals_exit():
        try:
            if not env.get(f"{PREFIX}REDIS_URL"):
                redis = private_redis().start()
                settings = msgspec.structs.replace(settings, redis_url=redis.url)
            container = build_container(settings)
            if not s3_configured(env):
                if moto_installed():
                    s3 = InProcessS3(settings.s3_bucket, settings.s3_region).start()
                    dev_aws_credentials(os.environ)
                    settings = msgspec.structs.replace(settings, s3_endpoint_url=s3.url)
                    container = build_container(settings)
                else:  # no S3 at all: archiving answers 503, everything else works
                    container.archivist.override(providers.Object(None))
                    s3_off = True
            app = create_app(container)
            GuardedHttpProtocol.configure(settings)
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                lifespan="on",
                access_log=False,
                log_config=None,
                server_header=False,
                http=GuardedHttpProtocol,  # the limits `serve` has (docs/security.md)
                timeout_graceful_shutdown=5,
            )
            text = banner(base_url(host, port), settings, redis, s3, s3_off=s3_off)
            _DevServer(config, text).run()
        finally:
            if redis is not None:
                redis.cleanup()
            if s3 is not None:
                s3.stop()
