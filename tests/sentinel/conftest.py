"""A Sentinel-managed Redis (tests/support/sentinel.py) for the module, and the failover figures
the tests measured, printed at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.sentinel import SentinelTopology, sentinel_command

FIGURES: list[str] = []


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    if sentinel_command() is None:
        pytest.skip("needs redis-sentinel or redis-server on PATH (apt-get install redis-sentinel)")
    started = SentinelTopology().start()
    yield started
    started.cleanup()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("Redis Sentinel failover figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
