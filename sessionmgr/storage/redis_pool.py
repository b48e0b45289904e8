"""A bounded Redis connection pool whose checkout costs nothing when a connection is free.

redis-py's `BlockingConnectionPool` gives every command an `asyncio.Condition`, a timeout
context and its observability records, even when a connection is waiting in the pool:
about 17 us of CPU per command more than this pool (`python -m bench.micro pool`).
`BoundedPool` keeps its contract (at most `max_connections`; a caller waits up to `timeout`
for one, then gets `ConnectionError("No connection available.")`) and only pays for waiting
when it waits. Its connections (`_LeanConnection`) are redis-py's, with two costs of every
command taken out: the Python packer and the write's timeout where a write cannot wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from sessionmgr.settings import Settings

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # a runtime dependency (redis[hiredis]); without it redis-py packs commands itself
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover
    _hiredis_pack = None

# Arguments hiredis writes byte for byte as redis-py's Encoder does (UTF-8 strict; a float as
# its `repr`, tests/unit/test_redis_connection.py): an update's commit carries the idle index's
# score, and a float left to redis-py would send the whole command, event and all, to the
# Python packer. Bools, enums, memoryviews and every other type are redis-py's to encode (or
# refuse).
_C_PACKED = frozenset({str, bytes, int, float})


class _LeanConnection(AbstractConnection):
    """A connection of `BoundedPool`: redis-py's, packing commands in C (below), and its
    `send_packed_command` with its write timeout (`socket_timeout`) set only on
    a write that can wait, and by `asyncio.timeout` instead of `asyncio.wait_for`.

    On Python 3.11 `wait_for` runs the write in a Task of its own: a task, a future and one
    more turn of the event loop (an epoll call) for every command sent. And a command the
    socket takes at once (the transport's buffer is empty after the write: nearly every one)
    has nothing to wait for: a transport pauses its writer only while data waits in its
    buffer, so `drain` returns at once (or reports a connection lost), and a timeout around
    it (a timer armed and cancelled, ~10 us on the benchmark's VM) bounds nothing. Only when
    data waits does `drain` run under the timeout. Same outcomes as redis-py's: a write that
    does not finish within `socket_timeout` disconnects and raises `TimeoutError("Timeout
    writing to socket")`, an OS error disconnects and raises `ConnectionError`, a cancelled
    write disconnects (its data may be half sent).
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.socket_timeout:
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            writer = cast(asyncio.StreamWriter, self._writer)
            writer.writelines(command)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            if len(e.args) == 1:
                err_no, errmsg = "UNKNOWN", e.args[0]
            else:
                err_no, errmsg = e.args[0], e.args[1]
            raise RedisConnectionError(f"Error {err_no} while writing to socket. {errmsg}.") from e
        except BaseException:
            await self.disconnect(nowait=True)
            raise

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        """The command in RESP, packed by hiredis in C as redis-py's synchronous client does
        when hiredis is installed (`HiredisRespSerializer`): the asyncio client packs in
        Python, about 7 us per command on the benchmark's VM against 1. The same bytes
        (tests/unit/test_redis_connection.py); an argument hiredis could write otherwise
        (see `_C_PACKED`), or an encoding other than UTF-8 strict, goes to redis-py's own."""
        encoder = self.encoder
        if (
            _hiredis_pack is None
            or encoder.encoding != "utf-8"
            or encoder.encoding_errors != "strict"
            or not _C_PACKED.issuperset(map(type, args))
        ):
            return super().pack_command(*args)
        first = args[0]
        if isinstance(first, str):  # 'CONFIG GET': the server wants its words apart
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:  # type: ignore[operator]
            args = (*first.split(), *args[1:])  # type: ignore[union-attr]
        return [_hiredis_pack(args)]


_LEAN: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _lean(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (TCP, TLS, Unix socket, Sentinel-managed) as a `_LeanConnection`."""
    if issubclass(connection_class, _LeanConnection):
        return connection_class
    lean = _LEAN.get(connection_class)
    if lean is None:
        lean = _LEAN[connection_class] = type(
            connection_class.__name__, (_LeanConnection, connection_class), {}
        )
    return lean


class BoundedPool(ConnectionPool):
    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connection_class = _lean(self.connection_class)
        self.timeout = timeout
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_maintenance = False

    def set_in_maintenance(self, in_maintenance: bool) -> None:
        """Called by redis-py around its MOVING handling (RESP3 maintenance notifications),
        which rewrites the pool's lists under `self._lock`: meanwhile checkouts and releases
        take that lock too, as `BlockingConnectionPool` does."""
        self._in_maintenance = in_maintenance

    def _exhausted(self) -> bool:
        return (
            not self._available_connections
            and len(self._in_use_connections) >= self.max_connections
        )

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        while True:
            if self._exhausted():
                await self._wait()
            if not self._in_maintenance:
                connection = self._take()
                break
            async with self._lock:  # redis-py is moving connections between the lists
                if not self._exhausted():
                    connection = self._take()
                    break
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            if connection.should_reconnect():  # type: ignore[no-untyped-call]
                # Still counted in use while it disconnects: no caller opens one more meanwhile.
                await connection.disconnect()
        finally:  # even if this release is cancelled: the connection is never lost to the pool
            if self._in_maintenance:
                async with self._lock:
                    self._put_back(connection)
            else:
                self._put_back(connection)

    def _take(self) -> AbstractConnection:
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        return connection  # a free one, or a new one

    def _put_back(self, connection: AbstractConnection) -> None:
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
        self._wake_one()

    async def _wait(self) -> None:
        """Wait until a connection is free (not in arrival order: a new caller may take it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self._exhausted():
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: the wake-up goes to the next caller
                waiter.cancel()
                if isinstance(exc, TimeoutError):
                    raise RedisConnectionError("No connection available.") from None
                raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class SentinelBoundedPool(BoundedPool, SentinelConnectionPool):
    """`BoundedPool`'s checkout on redis-py's Sentinel pool: every new connection asks the
    sentinels where the master is, and a connection that finds it demoted (READONLY) drops
    itself, so the pool follows a failover without a restart."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name=service_name, sentinel_manager=sentinel_manager, **kwargs)


class SentinelRedis(Redis):
    """The master's client; closing it closes the clients of the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            await self.sentinel_manager.aclose()


def sentinel_client(settings: Settings, options: dict[str, Any], pool_timeout: float) -> Redis:
    """A client of the master the sentinels name `redis_sentinel_master`, with `options` (the
    standalone client's timeouts, no retries) on every connection, to the master and to the
    sentinels alike.

    The master's address comes from the sentinels; `redis_url` gives its username, password,
    database and TLS (`rediss://`). During a failover a write fails fast (the old master is
    gone or answers READONLY; no master is known yet): `ConnectionError`, a 503.
    """
    url = parse_url(settings.redis_url)
    master: dict[str, Any] = {
        **options,
        "username": url.get("username"),
        "password": url.get("password"),
        "db": url.get("db", 0),
        "ssl": settings.redis_url.startswith("rediss://"),
    }
    to_sentinels: dict[str, Any] = {
        k: v
        for k, v in options.items()
        if k in ("socket_timeout", "socket_connect_timeout", "retry")
    }
    if settings.redis_sentinel_password:
        to_sentinels["password"] = settings.redis_sentinel_password
    if settings.redis_sentinel_tls:
        to_sentinels["ssl"] = True
        if settings.redis_ca_file:
            to_sentinels["ssl_ca_certs"] = settings.redis_ca_file
    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        settings.redis_sentinel_master or "",
        redis_class=SentinelRedis,
        connection_pool_class=SentinelBoundedPool,
        max_connections=settings.redis_pool_size,
        timeout=pool_timeout,
        **master,
    )
    client.sentinel_manager = sentinel
    return client  # type: ignore[no-any-return]
