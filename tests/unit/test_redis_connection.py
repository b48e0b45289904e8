"""`BoundedPool`'s connections (storage/redis_pool.py `_LeanConnection`) keep redis-py's
write timeout, armed only on a write that can wait: a write that does not finish within
`socket_timeout` still disconnects and raises redis-py's TimeoutError, an OS error or a
connection lost its ConnectionError, and no write runs in a task of its own. They pack
commands in C into the very bytes redis-py's Python packer writes."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.storage.redis_pool import BoundedPool


class _Writer:
    """A stream writer whose socket takes everything at once, or whose transport keeps
    `pending` bytes (its `drain` then waits for ever), or that fails with `error`."""

    def __init__(self, *, pending: int = 0, error: OSError | None = None) -> None:
        self.sent: list[bytes] = []
        self.pending = pending
        self.error = error
        self.transport = self

    def get_write_buffer_size(self) -> int:
        return self.pending

    def writelines(self, data: Any) -> None:
        self.sent.extend(data)

    def close(self) -> None:
        """What redis-py's connection calls when it is collected still "connected"."""

    async def drain(self) -> None:
        if self.error is not None:
            raise self.error
        if self.pending:
            await asyncio.get_running_loop().create_future()  # never done
        self.sent.append(b"drained in %d" % id(asyncio.current_task()))


def _connected(writer: _Writer, socket_timeout: float | None = 0.05) -> Any:
    pool = BoundedPool.from_url(
        "redis://127.0.0.1:9/0", max_connections=1, timeout=1, socket_timeout=socket_timeout
    )
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    connection._reader, connection._writer = object(), writer  # "connected"
    disconnects: list[bool] = []

    async def disconnect(nowait: bool = False, **_: Any) -> None:
        disconnects.append(nowait)
        connection._reader = connection._writer = None

    connection.disconnect = disconnect
    return connection, disconnects


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:9/0", Connection),
        ("rediss://127.0.0.1:9/0", SSLConnection),
        ("unix:///tmp/none.sock", UnixDomainSocketConnection),
    ],
)
def test_each_kind_of_connection_keeps_its_class(url: str, base: type) -> None:
    pool = BoundedPool.from_url(url, max_connections=1, timeout=1, socket_timeout=0.5)
    assert issubclass(pool.connection_class, base)
    assert pool.connection_class.__name__ == base.__name__


async def test_a_write_that_does_not_finish_in_time_disconnects_and_times_out() -> None:
    connection, disconnects = _connected(_Writer(pending=100))
    started = asyncio.get_running_loop().time()
    with pytest.raises(RedisTimeoutError, match="Timeout writing to socket"):
        await connection.send_packed_command(b"*1\r\n$4\r\nPING\r\n", check_health=False)
    assert 0.04 <= asyncio.get_running_loop().time() - started < 1.0
    assert disconnects == [True]


async def test_an_os_error_while_writing_disconnects_as_a_connection_error() -> None:
    writer = _Writer(pending=100, error=ConnectionResetError(104, "reset by peer"))
    connection, disconnects = _connected(writer)
    with pytest.raises(RedisConnectionError, match="Error 104 while writing to socket"):
        await connection.send_packed_command([b"*1\r\n$4\r\nPING\r\n"], check_health=False)
    assert disconnects == [True]


async def test_a_connection_lost_is_reported_by_a_write_the_socket_took() -> None:
    connection, disconnects = _connected(_Writer(error=ConnectionResetError("Connection lost")))
    with pytest.raises(RedisConnectionError, match=r"while writing to socket\. Connection lost"):
        await connection.send_packed_command(b"PING", check_health=False)
    assert disconnects == [True]


async def test_a_cancelled_write_disconnects() -> None:
    connection, disconnects = _connected(_Writer(pending=100), socket_timeout=30)
    task = asyncio.create_task(connection.send_packed_command(b"PING", check_health=False))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert disconnects == [True]


async def test_a_write_the_socket_takes_at_once_arms_no_timer_and_runs_in_the_callers_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11's `asyncio.wait_for` would run the write in a task of its own, and a
    timeout around a `drain` that cannot wait bounds nothing."""

    def unexpected(*_: Any, **__: Any) -> None:
        raise AssertionError("a timeout armed")

    monkeypatch.setattr(asyncio, "wait_for", unexpected)
    monkeypatch.setattr(asyncio, "timeout", unexpected)
    writer = _Writer()
    connection, disconnects = _connected(writer)
    await connection.send_packed_command(b"PING", check_health=False)
    assert writer.sent == [b"PING", b"drained in %d" % id(asyncio.current_task())]
    assert disconnects == []


class _Kind(enum.IntEnum):
    ONE = 1


PACKED = [
    ("EVALSHA", "f" * 40, 3, "session_hot:{p7}:ab", "session_timeline:{p7}:ab", "lease:{p7}:"),
    ("HGETALL", b"session_hot:{p7}:ab"),
    ("SET", "k", "\u00e9t\u00e9 \u2713", -5, 0, 2**63 - 1),
    ("CONFIG GET", "maxmemory"),  # two words in the command's name
    (b"CLIENT LIST",),
    ("SET", "big", b"x" * 10_000),  # redis-py sends these in pieces: the same bytes
    ("XADD", "s", "MAXLEN", "~", 1000, "*", "f", b'{"a": [1, 2]}'),
    ("ZADD", "idle", 1733000000.125, "ab"),  # a float: written as redis-py writes it
    ("EVALSHA", "f" * 40, 1, "k", 0.1, -0.0, 1e300, 5e-324, float("inf"), float("nan"), b"{}"),
    ("SET", "k", _Kind.ONE),  # an int subclass: redis-py's own encoding
    ("SET", "k", memoryview(b"view")),
]


@pytest.mark.parametrize("args", PACKED)
def test_a_command_is_packed_into_redis_pys_bytes(args: tuple[Any, ...]) -> None:
    ours = BoundedPool.from_url("redis://127.0.0.1:9/0", max_connections=1, timeout=1)
    packed = ours.make_connection().pack_command(*args)  # type: ignore[no-untyped-call]
    assert b"".join(packed) == b"".join(Connection().pack_command(*args))


def test_a_commit_with_a_float_is_packed_in_c_in_one_piece() -> None:
    # redis-py's Python packer sends a large value as a piece of its own; hiredis packs one.
    ours = BoundedPool.from_url("redis://127.0.0.1:9/0", max_connections=1, timeout=1)
    args = ("EVALSHA", "f" * 40, 1, "k", 1733000000.125, b"x" * 10_000)
    assert len(ours.make_connection().pack_command(*args)) == 1  # type: ignore[no-untyped-call]
    assert len(Connection().pack_command(*args)) > 1


@pytest.mark.parametrize("value", [True, None, 1.5j])
def test_what_redis_py_refuses_is_still_refused(value: Any) -> None:
    ours = BoundedPool.from_url("redis://127.0.0.1:9/0", max_connections=1, timeout=1)
    with pytest.raises(DataError):
        ours.make_connection().pack_command("SET", "k", value)  # type: ignore[no-untyped-call]


def test_another_encoding_is_redis_pys_to_pack() -> None:
    ours = BoundedPool.from_url(
        "redis://127.0.0.1:9/0", max_connections=1, timeout=1, encoding="latin-1"
    )
    packed = ours.make_connection().pack_command("SET", "k", "\u00e9")  # type: ignore[no-untyped-call]
    assert b"".join(packed) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"
