"""What a replica remembers of the sessions it wrote (storage/hot_views.py): bounded in bytes,
the commit's effect on the leases as Redis applies it, never a lease near its end."""

from __future__ import annotations

import time

import msgspec
import pytest

from sessionmgr.domain.model import TimelineEvent, utcnow
from sessionmgr.services.ports import HotView
from sessionmgr.storage import hot
from sessionmgr.storage.hot import encode_record
from sessionmgr.storage.hot_views import ENTRY_SHARE, HotViews, Remembered, after_commit
from tests.unit.factories import SessionRecordFactory


def remembered(size: int, deadlines: dict[str, float] | None = None) -> Remembered:
    return Remembered(
        fields={b"work_in_progress": b"x" * size}, recent=[], rev=b"r", deadlines=deadlines or {}
    )


def test_the_least_recently_written_go_first_once_the_bytes_are_spent() -> None:
    views = HotViews(budget_bytes=ENTRY_SHARE * 100)
    for n in range(ENTRY_SHARE + 6):
        views.put(f"s{n}", remembered(100))  # each the largest share of the budget one may take
    views.get("s0")  # reading is not writing: s0 is still the oldest

    assert len(views) == ENTRY_SHARE
    assert views.bytes == ENTRY_SHARE * 100
    gone = [n for n in range(ENTRY_SHARE + 6) if views.get(f"s{n}") is None]
    assert gone == [0, 1, 2, 3, 4, 5]


def test_writing_a_session_again_replaces_its_bytes() -> None:
    views = HotViews(budget_bytes=ENTRY_SHARE * 100)
    views.put("a", remembered(40))
    views.put("a", remembered(60))
    views.put("b", remembered(10))
    views.drop("b")
    views.drop("never")

    assert len(views) == 1
    assert views.bytes == 60


def test_a_session_larger_than_its_share_of_the_budget_is_not_kept() -> None:
    views = HotViews(budget_bytes=ENTRY_SHARE * 100)
    views.put("a", remembered(100))
    views.put("a", remembered(101))  # ENTRY_SHARE * 100 / ENTRY_SHARE = 100 bytes at most

    assert views.get("a") is None, "the older state of the session is dropped, not kept"
    assert views.bytes == 0


def test_a_budget_of_nothing_keeps_nothing() -> None:
    views = HotViews(budget_bytes=0)
    views.put("a", remembered(1))

    assert views.get("a") is None and views.bytes == 0


def test_a_lease_within_a_second_of_its_end_makes_the_state_unusable() -> None:
    views = HotViews(budget_bytes=1 << 20)
    now = time.monotonic()
    views.put("long", remembered(10, {"m": now + 5}))
    views.put("short", remembered(10, {"m": now + 0.5, "other": now + 30}))

    found = views.get("long")
    assert found is not None
    assert 4000 < found[1]["m"] <= 5000
    assert views.get("short") is None
    assert views.bytes == 10, "the unusable state is dropped"


def test_a_lease_set_and_dropped_by_one_commit_is_gone_as_in_redis() -> None:
    """The commit's commands set leases before they drop any: one named in both is gone."""
    before = remembered(1, {"m": 10.0, "kept": 20.0, "left": 30.0})
    after = after_commit(
        before,
        fields={"participants": b"{}"},
        events=[b"e1", b"e2", b"e3"],
        leases_set=["m", "new", "stranger"],
        leases_dropped=["m", "left"],
        participants={"m", "kept", "new"},
        rev=b"r2",
        sent_at=100.0,
        lease_s=30.0,
        recent=2,
    )

    assert after.deadlines == {"kept": 20.0, "new": 130.0}, "'stranger' is no participant"
    assert after.recent == [b"e2", b"e3"]
    assert after.fields == {b"work_in_progress": b"x", b"participants": b"{}"}
    assert after.rev == b"r2"


def test_a_view_decodes_its_recent_events_once_and_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decision that never looks at the recent events (an append, a leave) never pays for
    decoding them; one that does gets them decoded anew from the remembered bytes, once."""
    now = utcnow()
    events = [
        TimelineEvent(seq=n, at=now, actor="mad:a", kind="note", data={"n": n}) for n in (1, 2)
    ]
    record = SessionRecordFactory.build()
    state = Remembered(
        fields={k.encode(): v for k, v in encode_record(record).items()},
        recent=[msgspec.json.encode(e) for e in events],
        rev=b"r",
    )
    decoded: list[int] = []
    real = hot._decode_event

    def counting(raw: bytes) -> TimelineEvent:
        decoded.append(1)
        return real(raw)

    monkeypatch.setattr(hot, "_decode_event", counting)
    view = hot._view_of(state, {})
    assert view.record == record
    assert decoded == []
    assert view.recent == events
    assert view.recent == events
    assert len(decoded) == 2  # once each, however often asked
    assert view == HotView(record=record, recent=events)
    assert view.recent is not hot._view_of(state, {}).recent  # never an object shared

    decoded.clear()
    other = hot._view_of(state, {"mad:a": 5_000})
    reaped = other.with_record(SessionRecordFactory.build())
    assert decoded == []  # a view with another record decodes nothing either
    assert reaped.lease_ttl_ms == {"mad:a": 5_000}
    assert reaped.recent == events
