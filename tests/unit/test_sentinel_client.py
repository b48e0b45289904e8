"""storage/hot.py `redis_client` with sentinels: redis-py's Sentinel pool, our bounded checkout,
the standalone client's short timeouts and no retries, credentials from SESSIONMGR_REDIS_URL."""

from __future__ import annotations

import time

import pytest
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.devstack import free_port
from sessionmgr.settings import load_settings
from sessionmgr.storage.hot import redis_client
from sessionmgr.storage.redis_pool import SentinelBoundedPool, SentinelRedis


async def test_the_master_is_reached_through_the_sentinels_with_the_same_limits() -> None:
    settings = load_settings(
        {},
        redis_url="redis://app:pw@ignored:1/3",
        redis_sentinels=(("127.0.0.1", 26379), ("127.0.0.2", 26379)),
        redis_sentinel_master="sessionmgr",
        redis_sentinel_password="sentinel-pw",
        redis_pool_size=7,
    )
    client = redis_client(settings)
    try:
        assert isinstance(client, SentinelRedis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelBoundedPool)
        assert (pool.service_name, pool.max_connections, pool.timeout) == ("sessionmgr", 7, 2.0)
        assert issubclass(pool.connection_class, SentinelManagedConnection)
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "pw", 3)
        assert kwargs["socket_timeout"] == settings.redis_socket_timeout_s
        assert kwargs["retry"].get_retries() == 0
        manager = client.sentinel_manager
        assert manager is not None
        assert [s.connection_pool.connection_kwargs["host"] for s in manager.sentinels] == [
            "127.0.0.1",
            "127.0.0.2",
        ]
        to_sentinel = manager.sentinels[0].connection_pool.connection_kwargs
        assert to_sentinel["password"] == "sentinel-pw"
        assert to_sentinel["socket_timeout"] == settings.redis_socket_timeout_s
    finally:
        await client.aclose()


async def test_rediss_means_tls_to_the_master_and_sentinel_tls_to_the_sentinels() -> None:
    settings = load_settings(
        {},
        redis_url="rediss://ignored/0",
        redis_sentinels=(("127.0.0.1", 26379),),
        redis_sentinel_master="m",
        redis_sentinel_tls=True,
    )
    client = redis_client(settings)
    try:
        assert issubclass(client.connection_pool.connection_class, SentinelManagedSSLConnection)
        manager = client.sentinel_manager  # type: ignore[attr-defined]
        assert manager.sentinels[0].connection_pool.connection_class is SSLConnection
    finally:
        await client.aclose()


async def test_no_sentinel_answering_fails_fast_as_a_connection_error() -> None:
    """MasterNotFoundError is a ConnectionError: the hot store maps it to 503, never a 500."""
    settings = load_settings(
        {},
        redis_sentinels=(("127.0.0.1", free_port()), ("127.0.0.1", free_port())),
        redis_sentinel_master="m",
    )
    client = redis_client(settings)
    started = time.monotonic()
    try:
        with pytest.raises(MasterNotFoundError) as raised:
            await client.set("k", "v")
    finally:
        await client.aclose()
    assert isinstance(raised.value, RedisConnectionError)
    assert time.monotonic() - started < 2 * settings.redis_socket_timeout_s * 2
