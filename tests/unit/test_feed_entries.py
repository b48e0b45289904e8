"""Which feed entries a committed change gives (sessionmgr.storage.feed.change_entries)."""

from __future__ import annotations

import json
from datetime import timedelta

import msgspec

from sessionmgr.domain import leases
from sessionmgr.domain.model import ContextUpdate, utcnow
from sessionmgr.services.ports import Change
from sessionmgr.storage.feed import change_entries
from tests.unit.factories import SessionRecordFactory, TimelineEventFactory

TTL = timedelta(seconds=30)


def _kinds(entries: list[dict[str, bytes]]) -> list[tuple[str, dict[str, object]]]:
    return [(e["k"].decode(), json.loads(e["d"])) for e in entries]


def _bumped(record, **changes):  # type: ignore[no-untyped-def]
    return msgspec.structs.replace(record, version=record.version + 1, **changes)


def test_a_patch_names_its_fields_and_the_context() -> None:
    before = SessionRecordFactory.build(participants={})
    after = _bumped(before, work_in_progress={"a": 1})
    change = Change(
        record=after,
        fields=frozenset({"version", "last_active", "work_in_progress", "write_id"}),
        context=ContextUpdate(version=after.version, value={"x": 1}),
    )
    ((kind, data),) = _kinds(change_entries(before, change))
    assert kind == "patched"
    assert data == {
        "session_id": before.id,
        "version": after.version,
        "kind": "patched",
        "fields": ["full_context", "work_in_progress"],
    }


def test_an_append_carries_its_events() -> None:
    before = SessionRecordFactory.build(participants={})
    events = TimelineEventFactory.batch(2)
    change = Change(
        record=_bumped(before), fields=frozenset({"version", "timeline_seq"}), events=events
    )
    ((kind, data),) = _kinds(change_entries(before, change))
    assert kind == "appended"
    assert [e["seq"] for e in data["events"]] == [e.seq for e in events]  # type: ignore[index]


def test_join_leave_and_lapse() -> None:
    now = utcnow()
    before = SessionRecordFactory.build(participants={}, lease_grants=0)
    joined, _ = leases.granted(before, "a", now, TTL)
    joined = _bumped(joined)
    join = Change(record=joined, fields=frozenset({"version", "participants"}), leases_set=["a"])
    assert _kinds(change_entries(before, join)) == [
        ("joined", {"session_id": before.id, "version": joined.version, "kind": "joined",
                    "mad_name": "a", "token": 1}),
    ]  # fmt: skip
    two, _ = leases.granted(joined, "b", now, TTL)
    left = _bumped(leases.without(two, ["a", "b"]))
    leave = Change(record=left, fields=frozenset({"version", "participants"}), leases_dropped=["a"])
    assert [(k, d["mad_name"]) for k, d in _kinds(change_entries(two, leave))] == [
        ("left", "a"),
        ("lapsed", "b"),  # reaped by this write, not removed by it
    ]


def test_a_renewal_or_a_rejoin_of_a_live_lease_gives_nothing() -> None:
    now = utcnow()
    record, _ = leases.granted(SessionRecordFactory.build(participants={}), "a", now, TTL)
    renewed = leases.renewed(record, "a", now, TTL)
    change = Change(record=renewed, fields=frozenset({"participants"}), leases_set=["a"])
    assert change_entries(record, change) == []
    change.hot_only = True
    assert change_entries(record, change) == []
