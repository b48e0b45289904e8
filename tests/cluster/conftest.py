"""A real Redis Cluster (3 masters, 3 replicas) under the app, with the default layout.

The fixtures of tests/integration are reused as they are; only `settings` changes: Redis is
the Cluster (`SESSIONMGR_REDIS_CLUSTER=true`, `redis_url` naming one node) and the key layout
has the default 256 partitions, so a test's sessions spread over every master.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis as redis_sync

from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage import keys
from tests.conftest import JWT_SECRET, REDIS_TIMEOUT_S
from tests.integration.conftest import (  # noqa: F401 - fixtures, reused as they are
    api,
    app_container,
    manual_api,
    manual_container,
    manual_redis,
    manual_warm,
    redis,
    warm,
)
from tests.support.redis_cluster import RedisClusterServer
from tests.support.s3_server import S3_BUCKET, S3Server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    if shutil.which("redis-cli") is None or shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server and redis-cli (Debian: redis-server, redis-tools) build the Cluster"
        )
    cluster = RedisClusterServer().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(autouse=True)
def _default_partitions(_one_partition: None) -> None:
    keys.configure(keys.DEFAULT_PARTITIONS)


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServer) -> str:
    """The Cluster, emptied (every master) for each test."""
    with redis_sync.RedisCluster.from_url(redis_cluster.url) as client:
        client.flushall(target_nodes=redis_sync.RedisCluster.PRIMARIES)
    return redis_cluster.url


@pytest.fixture
def settings(cluster_url: str, s3_server: S3Server) -> Settings:
    return load_settings(
        {},
        redis_url=cluster_url,
        redis_cluster=True,
        redis_partitions=keys.DEFAULT_PARTITIONS,
        mongodb_uri="mongomock://",
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
        outbox_claim_idle_ms=1000,
        rate_limit_per_s=0,
        gc_freeze=False,
        # The participants' race of test_concurrency holds 50 leases for its whole run, which
        # takes longer than 30 s on a loaded 2-core machine with six Redis processes.
        lease_ttl_s=120,
        redis_socket_timeout_s=REDIS_TIMEOUT_S,  # as on one Redis: above the test loop's stalls
    )
