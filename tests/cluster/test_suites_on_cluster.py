"""The lifecycle and concurrency suites of tests/integration, unchanged, on a Redis Cluster.

Pytest collects the test functions imported here as tests of this module, so they run with
this folder's fixtures: the app on a real Cluster with 256 partitions.
"""

from tests.integration.test_concurrency import (  # noqa: F401 - collected here
    test_concurrent_increments_by_participants_lose_nothing,
    test_concurrent_increments_lose_nothing,
)
from tests.integration.test_lifecycle import *  # noqa: F403 - collected here
