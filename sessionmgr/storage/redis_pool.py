"""A bounded Redis connection pool whose checkout costs nothing when a connection is free.

redis-py's `BlockingConnectionPool` gives every command an `asyncio.Condition`, a timeout
context and its observability records, even when a connection is waiting in the pool: a
third of redis-py's own cost per hot GET (docs/benchmarks.md). `BoundedPool` keeps its
contract (at most `max_connections`; a caller waits up to `timeout` for one, then gets
`ConnectionError("No connection available.")`) and only pays for waiting when it waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class BoundedPool(ConnectionPool):
    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _exhausted(self) -> bool:
        return (
            not self._available_connections
            and len(self._in_use_connections) >= self.max_connections
        )

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        if self._exhausted():
            await self._wait()
        connection = self.get_available_connection()  # type: ignore[no-untyped-call]  # a free one, or a new one
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
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
