"""The `sessionmgr` command line (DESIGN §8): `serve`, `dev`, `token`, `check`, `archive-sweep`,
`idle-sweep`, `outbox`.

Exit codes: 0 success, 1 a `check` failed or a session could not be archived, 2 bad usage or
configuration (the message names the variable); `dev` stopped by SIGINT/SIGTERM ends with
128 + the signal, after cleaning up.
Heavy modules are imported by the command that needs them, so `token` and `--version` answer
at once.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import re
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sessionmgr
from sessionmgr.settings import (
    PREFIX,
    ConfigError,
    Settings,
    load_settings,
    require_jwt,
    unknown_variables,
)

CHECK_TIMEOUT_S = 3.0
MAX_REASON_CHARS = 300
SWEEP_LIMIT = 1000
_SPAN = re.compile(r"^(\d{1,6})([dhm])$")
_SPAN_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw} is not a positive integer")
    return value


def _span(raw: str) -> timedelta:
    match = _SPAN.fullmatch(raw.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a duration like 30d, 12h or 90m")
    if int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is zero: give at least 1m (idle longer than)")
    return timedelta(**{_SPAN_UNITS[match.group(2)]: int(match.group(1))})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionmgr", description="Shared working state of multi-agent sessions."
    )
    parser.add_argument(
        "--version", action="version", version=f"sessionmgr {sessionmgr.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API with the environment's settings")
    serve.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")  # noqa: S104
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes (default 1: scale with replicas, not workers)",
    )
    serve.set_defaults(handler=_serve)

    dev = commands.add_parser(
        "dev", help="run everything on this machine: private Redis, in-memory MongoDB"
    )
    dev.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dev.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    dev.set_defaults(handler=_dev)

    token = commands.add_parser("token", help=f"print a token signed with {PREFIX}JWT_SECRET")
    token.add_argument("--sub", required=True, help="the principal, e.g. alice or mad:planner")
    token.add_argument("--roles", default="", help="comma-separated roles, e.g. admin,service")
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds (default 3600)")
    token.set_defaults(handler=_token)

    check = commands.add_parser("check", help="validate the configuration and reach each backend")
    check.set_defaults(handler=_check)

    sweep = commands.add_parser(
        "archive-sweep", help="archive sessions at rest for longer than --older-than to S3"
    )
    sweep.add_argument(
        "--older-than", type=_span, required=True, help="idle time, e.g. 30d, 12h or 90m"
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the sessions, change nothing")
    sweep.add_argument(
        "--limit",
        type=_positive,
        default=SWEEP_LIMIT,
        help=f"at most this many sessions in this run (default {SWEEP_LIMIT})",
    )
    sweep.set_defaults(handler=_archive_sweep)
    idle = commands.add_parser(
        "idle-sweep",
        help=f"suspend active sessions idle for {PREFIX}IDLE_SUSPEND_AFTER (once, now)",
    )
    idle.add_argument(
        "--idle-after",
        type=_span,
        default=None,
        help=f"idle time instead of {PREFIX}IDLE_SUSPEND_AFTER, e.g. 30m or 2h",
    )
    idle.add_argument("--dry-run", action="store_true", help="list the sessions, change nothing")
    idle.add_argument(
        "--backfill",
        action="store_true",
        help="first index the hot sessions the sweep's index lacks (once, after an upgrade: "
        "one SCAN of Redis)",
    )
    idle.set_defaults(handler=_idle_sweep)
    _add_outbox_commands(commands)
    redis_commands = commands.add_parser("redis", help="the Redis key layout")
    redis_actions = redis_commands.add_subparsers(
        dest="redis_command", metavar="ACTION", required=True
    )
    migrate = redis_actions.add_parser(
        "migrate-layout",
        help="move the keys of sessionmgr < 0.2 to the partitioned layout (replicas stopped)",
    )
    migrate.set_defaults(handler=_migrate_layout)
    return parser


def _migrate_layout(args: argparse.Namespace) -> int:
    from sessionmgr.telemetry import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    return asyncio.run(_run_migrate_layout(settings))


async def _run_migrate_layout(settings: Settings) -> int:
    from sessionmgr.storage import keys
    from sessionmgr.storage.hot import redis_client
    from sessionmgr.storage.migrate import migrate_layout
    from sessionmgr.storage.redis_nodes import close as close_redis

    if settings.redis_cluster:
        print("sessionmgr redis migrate-layout: a Redis Cluster never held the old layout")
        return 0
    client = redis_client(settings, socket_timeout_s=max(5.0, settings.redis_socket_timeout_s))
    try:
        raw = await client.get(keys.LAYOUT_KEY)
        found = raw.decode() if isinstance(raw, bytes) else raw
        if found is not None and found != keys.expected_layout():
            print(
                f"sessionmgr redis migrate-layout: Redis holds the layout {found!r}, "
                f"not {keys.expected_layout()!r}: set {PREFIX}REDIS_PARTITIONS back",
                file=sys.stderr,
            )
            return 2
        done = await migrate_layout(client)
    finally:
        await close_redis(client)
    print(
        f"moved {done.keys} keys, {done.outbox_entries} outbox entries, "
        f"{done.dead_letters} dead letters and {done.idle_entries} idle-index entries; "
        f"Redis now holds the layout {keys.expected_layout()}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sessionmgr.api.auth import TokenVerifier
    from sessionmgr.api.guarded_http import GuardedHttpProtocol
    from sessionmgr.telemetry import configure_logging, trace_exporters

    settings = load_settings()
    require_jwt(settings)
    TokenVerifier(settings)  # a bad key or algorithm list fails here, not at the first request
    trace_exporters()  # so does an OTEL_* exporter sessionmgr cannot use
    if settings.metrics_port is not None and args.workers > 1:
        raise ConfigError(
            f"{PREFIX}METRICS_PORT needs --workers 1: each worker process keeps its own "
            "metrics, and only one of them could listen on the port (scale with replicas)"
        )
    configure_logging(settings.log_level)
    GuardedHttpProtocol.configure(settings)
    for name in unknown_variables():
        logging.getLogger("sessionmgr").warning(
            "%s is not a setting (a typo?); it is ignored", name
        )
    uvicorn.run(
        "sessionmgr.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        lifespan="on",
        proxy_headers=True,  # trusted from FORWARDED_ALLOW_IPS (uvicorn's default: 127.0.0.1)
        access_log=False,  # the metrics middleware and our JSON logs cover requests
        log_config=None,  # keep the JSON logging configured above
        server_header=False,
        # httptools with a bounded head, read timeouts and a connection cap (docs/security.md)
        http=GuardedHttpProtocol,
        # SIGTERM: stop accepting, finish requests in flight for up to this long, then the
        # lifespan stops the write-behind after its current entry and closes the clients.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def _dev(args: argparse.Namespace) -> int:
    from sessionmgr import devstack

    try:
        devstack.run(args.host, args.port)
    except devstack.DevStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace) -> int:
    from sessionmgr.api.auth import issue_token
    from sessionmgr.settings import effective_algorithms

    settings = load_settings()
    if settings.jwt_secret is None:
        raise ConfigError(
            f"{PREFIX}JWT_SECRET is not set: `token` signs with that secret. For `sessionmgr "
            "dev`, use the export line its banner prints, or start dev with your own "
            f"{PREFIX}JWT_SECRET (32+ characters) and pass the same value here"
        )
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    print(
        issue_token(
            settings.jwt_secret,
            args.sub,
            roles=roles,
            ttl_s=args.ttl,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            algorithm=effective_algorithms(settings)[0],
        )
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(f"{'ok':<4}  {'config':<8} {PREFIX}* variables are valid")
    for name in unknown_variables():
        print(f"{'warn':<4}  {'config':<8} {name} is not a setting (a typo?); it is ignored")
    return 0 if asyncio.run(_run_checks(settings)) else 1


async def _run_checks(settings: Settings) -> bool:
    from sessionmgr.devstack import redact_url

    _import_backends()  # before the clocks start: importing the drivers takes a while

    # MongoDB gets its own server-selection timeout plus a second: its error says more.
    mongodb_timeout_s = max(CHECK_TIMEOUT_S, settings.mongodb_timeout_ms / 1000 + 1)
    redis_target = redact_url(settings.redis_url)
    if settings.redis_sentinels:
        sentinels = ",".join(f"{h}:{p}" for h, p in settings.redis_sentinels)
        redis_target = f"sentinels {sentinels} master {settings.redis_sentinel_master}"
    checks: list[tuple[str, str, float, Callable[[], Awaitable[str | Checked | None]]]] = [
        ("jwt", _jwt_source(settings), CHECK_TIMEOUT_S, lambda: _check_jwt(settings)),
        ("redis", redis_target, CHECK_TIMEOUT_S, lambda: _ping_redis(settings)),
        (
            "mongodb",
            redact_url(settings.mongodb_uri),
            mongodb_timeout_s,
            lambda: _ping_mongodb(settings),
        ),
        (
            "s3",
            f"{redact_url(settings.s3_endpoint_url or 'AWS')} bucket {settings.s3_bucket}",
            CHECK_TIMEOUT_S * 2,  # two attempts of the client's own timeout at most
            lambda: _ping_s3(settings),
        ),
    ]
    all_ok = True
    for name, target, timeout_s, probe in checks:
        try:
            note = await asyncio.wait_for(probe(), timeout_s)
        except TimeoutError:
            all_ok = False
            _report(False, name, target, f"no answer within {timeout_s:g} s")
        # An operator's tool reports every failure as a line, whatever its type, not a traceback.
        except Exception as exc:
            all_ok = False
            _report(False, name, target, redact_url(_reason(exc)))
        else:
            if isinstance(note, Checked):
                _report(True, name, target, note.note)
                for warning in note.warnings:
                    print(f"{'warn':<4}  {name:<8} {warning}", flush=True)
            else:
                _report(True, name, target, note)
    return all_ok


@dataclass(frozen=True)
class Checked:
    """A probe's note, and warnings about what it found (printed as `warn` lines, exit 0)."""

    note: str
    warnings: list[str]


def _report(ok: bool, name: str, target: str, note: str | None) -> None:
    line = f"{'ok' if ok else 'FAIL':<4}  {name:<8} {target}"
    print(f"{line}  {note}" if note else line, flush=True)


def _reason(exc: BaseException) -> str:
    # PyMongo appends a whole topology description after ", Timeout:"; the cause comes first.
    text = " ".join(str(exc).split(", Timeout: ")[0].split()) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _jwt_source(settings: Settings) -> str:
    if settings.jwt_secret:
        return f"{PREFIX}JWT_SECRET"
    if settings.jwt_public_key:
        return f"{PREFIX}JWT_PUBLIC_KEY"
    return settings.jwt_jwks_url or "(none)"


def _import_backends() -> None:
    import sessionmgr.api.auth
    import sessionmgr.storage.cold
    import sessionmgr.storage.hot
    import sessionmgr.storage.warm  # noqa: F401


async def _check_jwt(settings: Settings) -> str | None:
    from sessionmgr.api.auth import TokenVerifier
    from sessionmgr.settings import effective_algorithms

    require_jwt(settings)
    TokenVerifier(settings)
    if settings.jwt_jwks_url:
        count = await asyncio.to_thread(_fetch_jwks_keys, settings.jwt_jwks_url)
        return f"{count} key(s), algorithms {','.join(effective_algorithms(settings))}"
    return f"algorithms {','.join(effective_algorithms(settings))}"


def _fetch_jwks_keys(url: str) -> int:
    # The URL comes from validated settings (http/https only).
    with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S) as resp:  # noqa: S310
        document: Any = json.loads(resp.read(1_048_576))
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("the JWKS document has no keys")
    return len(keys)


async def _ping_redis(settings: Settings) -> Checked:
    from sessionmgr.storage.hot import redis_client
    from sessionmgr.storage.redis_nodes import close as close_redis
    from sessionmgr.storage.redis_report import describe

    client = redis_client(settings, socket_timeout_s=CHECK_TIMEOUT_S)
    try:
        await client.ping()
        note, warnings = await describe(client, settings)
    finally:
        await close_redis(client)
    return Checked(note, warnings)


async def _ping_mongodb(settings: Settings) -> str | None:
    from sessionmgr.storage.warm import mongo_client

    client = mongo_client(settings)
    try:
        await client[settings.mongodb_db].command("ping")
    finally:
        client.close()
    if settings.mongodb_in_memory:
        return "in-memory engine"
    return f"database {settings.mongodb_db}"


def _archive_sweep(args: argparse.Namespace) -> int:
    from sessionmgr.telemetry import configure_logging

    settings = load_settings()
    configure_logging("WARNING" if settings.log_level in ("DEBUG", "INFO") else settings.log_level)
    return asyncio.run(_sweep(settings, args))


async def _sweep(settings: Settings, args: argparse.Namespace) -> int:
    from sessionmgr.api.bridge import resolve
    from sessionmgr.container import build_container
    from sessionmgr.domain.errors import BackendUnavailable
    from sessionmgr.services.archive import sweep

    started = time.monotonic()
    container = build_container(settings, write_behind=False)
    try:
        archivist = await resolve(container.archivist)
        result = await sweep(
            archivist,
            args.older_than,
            limit=args.limit,
            dry_run=args.dry_run,
            report=lambda line: print(line, flush=True),
        )
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        closing = container.shutdown_resources()
        if inspect.isawaitable(closing):
            await closing
    took = f"{time.monotonic() - started:.1f} s"
    if args.dry_run:
        print(f"dry run: {result.selected} session(s) would be archived; nothing changed ({took})")
        return 0
    summary = f"done: {result.archived} archived, {result.skipped} skipped"
    summary += f", {len(result.failed)} failed in {took}"
    print(summary, flush=True)
    if result.failed:
        print(f"failed: {' '.join(result.failed)}", flush=True)
        return 1
    return 0


def _idle_sweep(args: argparse.Namespace) -> int:
    from sessionmgr.telemetry import configure_logging

    settings = load_settings()
    configure_logging("WARNING" if settings.log_level in ("DEBUG", "INFO") else settings.log_level)
    return asyncio.run(_idle(settings, args))


async def _idle(settings: Settings, args: argparse.Namespace) -> int:
    from sessionmgr.api.bridge import resolve
    from sessionmgr.container import build_container
    from sessionmgr.domain.errors import BackendUnavailable
    from sessionmgr.services.idle import IdleSweeper

    container = build_container(settings, write_behind=False)
    try:
        sweeper: IdleSweeper = await resolve(container.idle_sweeper)
        if args.backfill:
            print(f"backfill: {await sweeper.backfill()} hot session(s) added to the index")
        idle_after = args.idle_after.total_seconds() if args.idle_after else None
        result = await sweeper.sweep(
            dry_run=args.dry_run,
            idle_after_s=idle_after,
            report=lambda line: print(line, flush=True),
        )
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        closing = container.shutdown_resources()
        if inspect.isawaitable(closing):
            await closing
    took = f"{result.took_s:.1f} s"
    if not result.ran:
        print("another idle sweep holds the lock (a replica's); nothing done", flush=True)
        return 0
    if args.dry_run:
        print(f"dry run: {len(result.suspended)} session(s) would be suspended ({took})")
        return 0
    print(
        f"done: {len(result.suspended)} suspended, {result.in_use} in use, {result.gone} gone, "
        f"{len(result.failed)} failed in {took}",
        flush=True,
    )
    if result.failed:
        print(f"failed: {' '.join(result.failed)}", flush=True)
        return 1
    return 0


async def _ping_s3(settings: Settings) -> str | None:
    from sessionmgr.storage.cold import open_archive_store

    resource = open_archive_store(settings)
    store = await anext(resource)
    try:
        await store.ping()
    finally:
        await resource.aclose()
    return "bucket reachable"


# -- outbox: what the write-behind holds, and its dead letters ----------------------------------


def _add_outbox_commands(commands: Any) -> None:
    outbox = commands.add_parser(
        "outbox", help="the write-behind outbox: status, and replay or drop of dead letters"
    )
    actions = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="pending entries, consumers and dead letters")
    status.add_argument("--json", action="store_true", help="one JSON document")
    status.add_argument(
        "--limit", type=_positive, default=100, help="dead letters listed (default 100)"
    )
    status.set_defaults(handler=_outbox)
    replay = actions.add_parser("replay", help="put dead letters back into the outbox")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", help="a dead letter's id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(handler=_outbox)
    drop = actions.add_parser("drop", help="delete one dead letter for good (logged)")
    drop.add_argument("--id", required=True, help="the dead letter's id")
    drop.set_defaults(handler=_outbox)


def _outbox(args: argparse.Namespace) -> int:
    from sessionmgr.telemetry import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    return asyncio.run(_run_outbox(settings, args))


async def _run_outbox(settings: Settings, args: argparse.Namespace) -> int:
    from sessionmgr.storage import keys
    from sessionmgr.storage.hot import redis_client
    from sessionmgr.storage.outbox import OutboxAdmin
    from sessionmgr.storage.redis_nodes import close as close_redis

    client = redis_client(settings, socket_timeout_s=max(5.0, settings.redis_socket_timeout_s))
    try:
        try:
            await keys.check_layout(client)  # another partition count would read other streams
        except keys.LayoutMismatch as exc:
            print(f"sessionmgr outbox: {exc}", file=sys.stderr)
            return 2
        admin = OutboxAdmin(client)
        if args.outbox_command == "status":
            status = await admin.status(limit=args.limit)
            _print_outbox_status(status, as_json=args.json)
            return 0
        if args.outbox_command == "replay":
            replayed = await admin.replay(None if args.all else args.id)
            for letter in replayed:
                print(f"replayed {letter.id} (session {letter.session_id} v{letter.version})")
            missing = set(args.id or ()) - {letter.id for letter in replayed}
            for entry_id in sorted(missing):
                print(f"error: no dead letter {entry_id}", file=sys.stderr)
            print(f"{len(replayed)} dead letter(s) back in the outbox", flush=True)
            return 1 if missing else 0
        dropped = await admin.drop(args.id)
        if dropped is None:
            print(f"error: no dead letter {args.id}", file=sys.stderr)
            return 1
        print(f"dropped {dropped.id} (session {dropped.session_id} v{dropped.version}) for good")
        return 0
    finally:
        await close_redis(client)


def _print_outbox_status(status: Any, *, as_json: bool) -> None:
    import msgspec

    if as_json:
        print(msgspec.json.encode(status).decode())
        return
    print(f"pending       {status.pending} entries, oldest {status.oldest_age_s:.1f} s old")
    print(f"consumers     {len(status.consumers)}")
    for c in status.consumers:
        print(f"  {c.name:<40} pending {c.pending:<6} idle {c.idle_ms / 1000:.1f} s")
    print(f"dead letters  {status.dead_letters}")
    for d in status.dead:
        print(f"  {d.id}  session {d.session_id} v{d.version}  attempts {d.attempts}")
        print(f"      {d.error}")
    if len(status.dead) < status.dead_letters:
        print(f"  ... {status.dead_letters - len(status.dead)} more (--limit)")
