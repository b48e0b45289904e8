"""Which Redis a key lives on: the one server, or the Cluster node that serves its slot.

A session's transaction (WATCH, reads, MULTI ... EXEC) must run on one connection to the node
that holds its slot. redis-py's asyncio Cluster pipeline runs each command of a transaction
through `asyncio.run` on a thread of its own (redis-py 8.1), which blocks the event loop and
shares connections across loops, so sessionmgr does not use it: `ClusterNodes` hands out a
plain client per node (the same timeouts, no hidden retries, a bounded pool each), found
from the Cluster client's slot map. A MOVED or ASK met on it (the slot moved: a resharding
or a failover) marks every map stale; the next lookup reads the Cluster's slots again, and
the request that met it answers 503, retryable, as while Redis is away.

Everything that is not one session's (the outbox's and the idle index's reads over all
partitions) goes through the Cluster client itself, which routes each command by its key.
"""

from __future__ import annotations

from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sessionmgr.storage.redis_pool import BoundedPool


class SessionmgrCluster(RedisCluster):
    """redis-py's Cluster client, with the options its per-node clients are made with."""

    def __init__(self, *args: Any, node_options: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_options: dict[str, Any] = node_options
        self.nodes = ClusterNodes(self)

    async def close_all(self) -> None:
        """At shutdown: the per-node clients, then the Cluster client. (redis-py calls its
        own `aclose` whenever it resets its slot map; the per-node clients outlive that.)"""
        await self.nodes.aclose()
        await self.aclose()


class SingleNode:
    """One Redis (standalone, or the master Sentinel names): every key is there."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def of(self, key: str) -> Redis:
        return self._redis


class ClusterNodes:
    """A plain client per Cluster master, each chosen by the slot of a key."""

    generation: ClassVar[int] = 0  # bumped by `moved`: every map is read again

    def __init__(self, cluster: SessionmgrCluster) -> None:
        self._cluster = cluster
        self._clients: dict[str, Redis] = {}
        self._seen = ClusterNodes.generation

    @classmethod
    def moved(cls) -> None:
        """A node answered MOVED or ASK: the slot map of every client is out of date."""
        cls.generation += 1

    async def of(self, key: str) -> Redis:
        cluster = self._cluster
        if cluster._initialize:
            await cluster.initialize()
            await self._forget_departed()
        elif self._seen != ClusterNodes.generation:
            seen = ClusterNodes.generation
            await cluster.nodes_manager.initialize()
            self._seen = seen  # only once the map was read: a failed read is tried again
            await self._forget_departed()
        node = cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        client = self._clients.get(node.name)
        if client is None:
            options = dict(cluster.node_options)
            pool = BoundedPool(
                host=node.host,
                port=node.port,
                max_connections=options.pop("max_connections"),
                timeout=options.pop("pool_timeout"),
                **options,
            )
            # `from_pool`: closing the client disconnects its pool too.
            client = self._clients[node.name] = Redis.from_pool(pool)
        return client

    async def _forget_departed(self) -> None:
        """Close the clients of nodes the slot map no longer has as masters."""
        masters = {n.name for n in self._cluster.get_primaries()}
        for name in [n for n in self._clients if n not in masters]:
            await self._clients.pop(name).aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


async def close(redis: Any) -> None:
    """Close a client of `redis_client`: with a Cluster, its per-node clients too."""
    await (redis.close_all() if isinstance(redis, SessionmgrCluster) else redis.aclose())


def nodes_of(redis: Any) -> SingleNode | ClusterNodes:
    return redis.nodes if isinstance(redis, SessionmgrCluster) else SingleNode(redis)
