"""`python -m bench.drain` runs end to end, both ways, and drains everything it wrote."""

from __future__ import annotations

import pytest

from bench import drain


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["batches", "one-at-a-time"])
async def test_the_drain_bench_carries_every_append_to_the_warm_tier(
    one_at_a_time: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    args = drain.parser().parse_args(["--entries", "120", "--sessions", "12"])
    args.one_at_a_time = one_at_a_time

    entries, wall_s = await drain.measure(args)

    assert entries == 120  # the backlog was all there before the worker started
    assert wall_s > 0
    out = capsys.readouterr().out
    how = "one entry at a time" if one_at_a_time else "batches of 1000"
    assert f"write-behind, {how}: 120 entries over 12 sessions drained" in out, out
    assert "every event in MongoDB" in out
