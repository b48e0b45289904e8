"""The idle sweep's paging over its index, on fakes: a session that fails stays in the idle
range and is skipped (no endless loop on it), batches are bounded, the lock is held."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sessionmgr.domain.model import SessionRecord, SessionState
from sessionmgr.services.idle import IdleSweeper
from sessionmgr.services.ports import HotView, RecordCheck

NOW = 10_000.0
OLD = datetime.fromtimestamp(NOW - 3600, UTC)


def record(session_id: str) -> SessionRecord:
    return SessionRecord(
        id=session_id,
        version=1,
        state=SessionState.ACTIVE,
        owner_id="alice",
        acl=[],
        created_at=OLD,
        last_active=OLD,
        participants={},
        work_in_progress={},
        context_summary={},
    )


class Index:
    def __init__(self, ids: list[str]) -> None:
        self.scores = {sid: NOW - 3600 + i for i, sid in enumerate(ids)}
        self.reads = 0

    async def older_than(self, cutoff: float, limit: int, offset: int = 0) -> list[Any]:
        self.reads += 1
        found = sorted((s, sid) for sid, s in self.scores.items() if s <= cutoff)
        return [(sid, s) for s, sid in found[offset : offset + limit]]

    async def forget(self, session_id: str, cutoff: float) -> bool:
        return self.scores.pop(session_id, None) is not None

    async def postpone(self, session_id: str, at: float) -> None:
        self.scores[session_id] = max(at, self.scores.get(session_id, at))

    async def size(self) -> int:
        return len(self.scores)


class Hot:
    def __init__(self, ids: list[str]) -> None:
        self.hot = set(ids)

    async def load(self, session_id: str) -> HotView | None:
        if session_id not in self.hot:
            return None
        return HotView(record=record(session_id), recent=[])


class Lock:
    def __init__(self) -> None:
        self.held: str | None = None
        self.extended = 0

    async def acquire(self, ttl_ms: int) -> str | None:
        if self.held:
            return None
        self.held = "t"
        return "t"

    async def extend(self, token: str, ttl_ms: int) -> bool:
        self.extended += 1
        return token == self.held

    async def release(self, token: str) -> None:
        if token == self.held:
            self.held = None


def sweeper(ids: list[str], failing: set[str], **options: Any) -> tuple[IdleSweeper, Index, Lock]:
    hot, index, lock = Hot(ids), Index(ids), Lock()

    async def suspend(session_id: str, check: RecordCheck) -> SessionRecord | None:
        if session_id in failing:
            raise RuntimeError("a bug")
        check(record(session_id))
        hot.hot.discard(session_id)
        return record(session_id)

    made = IdleSweeper(
        hot,  # type: ignore[arg-type]
        suspend,
        index,
        lock,
        idle_after_s=60,
        clock=lambda: NOW,
        **options,
    )
    return made, index, lock


async def test_a_failing_session_is_skipped_and_the_rest_are_suspended() -> None:
    ids = [f"s{i:02d}" for i in range(7)]
    sweep, index, lock = sweeper(ids, failing={"s00", "s03"}, batch=2)

    result = await sweep.sweep()

    assert result.failed == ["s00", "s03"]
    assert sorted(result.suspended) == ["s01", "s02", "s04", "s05", "s06"]
    assert sorted(index.scores) == ["s00", "s03"]  # tried again by the next sweep
    assert lock.held is None and lock.extended == 3  # after each full batch


async def test_a_sweep_stops_after_max_batches() -> None:
    ids = [f"s{i:02d}" for i in range(10)]
    sweep, index, _ = sweeper(ids, failing=set(), batch=2, max_batches=3)

    result = await sweep.sweep()

    assert len(result.suspended) == 6 and index.reads == 3
    assert len(index.scores) == 4  # the next sweep goes on


async def test_a_held_lock_means_no_sweep() -> None:
    sweep, index, lock = sweeper(["s1"], failing=set())
    lock.held = "another replica"

    result = await sweep.sweep()

    assert not result.ran and index.reads == 0 and lock.held == "another replica"
