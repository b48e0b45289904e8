"""What `sessionmgr check` says of Redis: the topology it sees, and settings that can drop data.

The hot tier holds every write until the write-behind has carried it to MongoDB, so a Redis
that evicts keys (`maxmemory-policy` other than `noeviction`) or keeps nothing across a restart
(no RDB snapshot, no AOF) can lose acknowledged writes: `check` warns, it does not fail.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sessionmgr.settings import Settings
from sessionmgr.storage import keys


async def describe(client: Redis, settings: Settings) -> tuple[str, list[str]]:
    """A one-line topology note and the warnings, from the server `client` talks to."""
    if settings.redis_cluster:
        return await _cluster(client)
    info: dict[str, Any] = await client.info()
    parts = [f"redis {info.get('redis_version', '?')}", _role(info), await _layout(client)]
    if settings.redis_sentinels:
        parts.append(await _sentinels(client, settings))
    return ", ".join(parts), [*_eviction(info), *await _persistence(client, info)]


async def _layout(client: Any) -> str:
    found = await client.get(keys.LAYOUT_KEY)
    wanted = keys.expected_layout()
    if found is None:
        return f"key layout {wanted} (not recorded yet: the first replica records it)"
    if found.decode() != wanted:
        raise ValueError(
            f"Redis holds the key layout {found.decode()!r}, this configuration is {wanted!r} "
            "(SESSIONMGR_REDIS_PARTITIONS is fixed for the life of a deployment)"
        )
    return f"key layout {wanted}"


async def _cluster(client: Any) -> tuple[str, list[str]]:
    """A Cluster: its state, its masters and replicas, and each master's settings."""
    state: dict[str, Any] = await client.cluster_info()
    primaries = client.get_primaries()
    nodes: dict[str, Any] = await client.cluster_nodes()
    replicas = [n for n in nodes.values() if "slave" in n["flags"] and "fail" not in n["flags"]]
    parts = [
        f"redis cluster {state.get('cluster_state', '?')}",
        f"{len(primaries)} master(s), {len(replicas)} replica(s)",
        f"{state.get('cluster_slots_ok', '?')} of 16384 slots served",
        await _layout(client),
    ]
    warnings: list[str] = []
    if state.get("cluster_state") != "ok":
        warnings.append("the cluster is not ok: some slots have no master; writes to them fail")
    for node in primaries:
        info: dict[str, Any] = await client.info(target_nodes=node)
        warnings += [f"{node.name}: {w}" for w in _eviction(info)]
        if not int(info.get("aof_enabled", 0)):
            warnings.append(
                f"{node.name}: AOF is off: a restart of this master (without a replica taking "
                "over) loses the writes the write-behind had not carried to MongoDB yet"
            )
    return ", ".join(parts), warnings


def _role(info: dict[str, Any]) -> str:
    role = str(info.get("role", "?"))
    if role != "master":
        return f"role {role} (writes will fail: point sessionmgr at the master)"
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    online = [r for r in replicas if r.get("state") == "online"]
    listed = " ".join(f"{r.get('ip')}:{r.get('port')}" for r in online)
    return f"master with {len(online)} replica(s) online" + (f" ({listed})" if listed else "")


async def _sentinels(client: Redis, settings: Settings) -> str:
    manager = getattr(client, "sentinel_manager", None)
    if manager is None:
        return "sentinels unknown"
    name = settings.redis_sentinel_master
    host, port = await manager.discover_master(name)
    answering = 0
    for sentinel in manager.sentinels:
        try:
            await sentinel.ping()
        except RedisError:
            continue
        answering += 1
    total = len(manager.sentinels)
    return f"master {host}:{port} named {name!r} by {answering} of {total} sentinel(s)"


def _eviction(info: dict[str, Any]) -> list[str]:
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        return []
    return [
        f"maxmemory-policy is {policy}: Redis may evict sessions and undelivered outbox "
        "entries when full; set it to noeviction (a full Redis then refuses writes, 503)"
    ]


async def _persistence(client: Redis, info: dict[str, Any]) -> list[str]:
    if int(info.get("aof_enabled", 0)):
        return []
    try:
        save = (await client.config_get("save")).get("save", "")
    except ResponseError:  # CONFIG is renamed or disabled (managed Redis): no way to tell
        return ["persistence unknown (CONFIG GET is refused) and AOF is off: check it yourself"]
    if save:
        return [
            f"only RDB snapshots ({save!r}), no AOF: a restart of Redis loses the writes since "
            "the last snapshot that the write-behind had not carried to MongoDB yet"
        ]
    return [
        "no persistence (neither AOF nor RDB snapshots): a restart of Redis loses every write "
        "the write-behind had not carried to MongoDB yet (replicas alone do not cover a restart)"
    ]
