"""`python -m bench.memory` runs end to end and reports a plausible figure per session."""

from __future__ import annotations

import re

import pytest

from bench import memory


async def test_the_memory_bench_reports_bytes_per_active_session(
    capsys: pytest.CaptureFixture[str],
) -> None:
    await memory.measure(sessions=20, wip_bytes=10_240, events=20)

    out = capsys.readouterr().out
    found = re.search(r"per active session: (\d+) bytes", out)
    assert found is not None, out
    # At least the 10 KB work_in_progress and 20 events; far less than 100 KB.
    assert 11_000 < int(found.group(1)) < 100_000, out
    assert re.search(r"shape: work_in_progress (\d+) bytes of JSON, 20 recent events", out)
    hash_bytes = re.search(r"hash (\d+), timeline (\d+)", out)
    assert hash_bytes is not None and int(hash_bytes.group(1)) > 10_240, out
