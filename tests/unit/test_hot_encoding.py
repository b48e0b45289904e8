"""storage/hot.py codec: a record survives the trip through the Redis hash, field by field."""

from __future__ import annotations

import os
import random
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from redis.crc import key_slot

from sessionmgr.domain import model
from sessionmgr.domain.model import SessionRecord, SessionState, new_write_id
from sessionmgr.services.ports import CREATE_SCOPE, Idempotency
from sessionmgr.storage import keys as layout
from sessionmgr.storage.hot import (
    OutboxEntry,
    decode_record,
    encode_record,
    fence_key,
    gone_key,
    hot_key,
    idem_index_key,
    idem_key,
    idle_key,
    lease_key,
    outbox_key,
    rebased_key,
    timeline_key,
)
from tests.unit.factories import SessionRecordFactory, TimelineEventFactory


def as_redis_hash(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """What HGETALL hands back for what HSET was given."""
    return {name.encode(): value for name, value in fields.items()}


@pytest.mark.parametrize("state", list(SessionState))
def test_every_field_round_trips(state: SessionState) -> None:
    for record in SessionRecordFactory.batch(25, state=state):
        decoded = decode_record(as_redis_hash(encode_record(record)))
        for name in SessionRecord.__struct_fields__:
            assert getattr(decoded, name) == getattr(record, name), name
        assert decoded == record


def test_timestamps_keep_their_instant_and_zone() -> None:
    record = SessionRecordFactory.build()
    decoded = decode_record(as_redis_hash(encode_record(record)))
    assert decoded.created_at.utcoffset() == record.created_at.utcoffset()
    assert decoded.created_at == record.created_at
    for mad, participant in record.participants.items():
        assert decoded.participants[mad].lease_expires_at == participant.lease_expires_at


def test_every_record_field_is_its_own_hash_field() -> None:
    encoded = encode_record(SessionRecordFactory.build())
    assert set(encoded) == set(SessionRecord.__struct_fields__)
    assert all(isinstance(value, bytes) for value in encoded.values())


def test_a_partial_encoding_writes_only_the_changed_fields() -> None:
    before = SessionRecordFactory.build(version=4)
    after = msgspec.structs.replace(before, version=5, context_summary={"goal": "new"})
    patch = encode_record(after, frozenset({"version", "context_summary"}))
    assert set(patch) == {"version", "context_summary"}

    stored = as_redis_hash(encode_record(before))
    stored.update(as_redis_hash(patch))  # HSET of only those fields
    assert decode_record(stored) == after


def test_a_hash_missing_a_field_is_not_silently_accepted() -> None:
    stored = as_redis_hash(encode_record(SessionRecordFactory.build()))
    del stored[b"owner_id"]
    with pytest.raises(KeyError):
        decode_record(stored)


def test_a_hash_written_before_fencing_tokens_reads_with_no_grant_yet() -> None:
    record = SessionRecordFactory.build(lease_grants=5)
    stored = as_redis_hash(encode_record(record))
    del stored[b"lease_grants"]
    assert decode_record(stored) == msgspec.structs.replace(record, lease_grants=0)


def test_an_outbox_entry_round_trips_with_its_events() -> None:
    entry = OutboxEntry(record=SessionRecordFactory.build(), events=TimelineEventFactory.batch(3))
    assert msgspec.json.decode(msgspec.json.encode(entry), type=OutboxEntry) == entry


@pytest.mark.parametrize("partitions", [1, 7, 256])
def test_every_key_a_write_touches_is_in_the_session_slot(partitions: int) -> None:
    """What one MULTI of a session writes shares one Redis Cluster slot (CRC16 of the tag)."""
    layout.configure(partitions)
    for sid in ("0123456789abcdef0123456789abcdef", "ffffffffffffffffffffffffffffffff", "a"):
        idem = Idempotency(key_digest="d", fingerprint="f")
        names = [
            hot_key(sid),
            timeline_key(sid),
            lease_key(sid, "planner"),
            gone_key(sid),
            idem_key(sid, idem),
            idem_index_key(sid),
            rebased_key(sid),
            fence_key(sid),
            outbox_key(sid),
            idle_key(sid),
            layout.feed(sid),
            layout.dead_letters(layout.partition_of(sid)),
        ]
        assert len({key_slot(n.encode()) for n in names}) == 1, names
        assert len(set(names)) == len(names)
        assert layout.session_id_in(hot_key(sid)) == sid
        assert layout.session_id_in(lease_key(sid, "planner")) == sid


def test_sessions_spread_over_every_partition() -> None:
    layout.configure(256)
    seen = {layout.partition_of(uuid.uuid4().hex) for _ in range(20_000)}
    assert seen == set(range(256))
    assert len({key_slot(layout.outbox(p).encode()) for p in range(256)}) == 256


def test_a_create_record_lives_in_the_slot_of_its_key() -> None:
    idem = Idempotency(key_digest="abc", fingerprint="f")
    assert key_slot(idem_key(CREATE_SCOPE, idem).encode()) == key_slot(b"{abc}")


def test_write_stamps_are_drawn_anew_in_a_forked_child() -> None:
    """Write ids and `rev` stamps come from a generator of their own (`model.unique_64`): a
    process forked from another must not draw the same sequence, or two replicas could
    stamp two writes alike."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.close(read)
            os.write(write, " ".join(new_write_id() for _ in range(4)).encode())
        finally:
            os._exit(0)  # never on into the rest of the suite
    os.close(write)
    ours = [new_write_id() for _ in range(4)]
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    os.waitpid(child, 0)
    assert len(theirs) == 4
    assert all(len(stamp) == 16 and int(stamp, 16) >= 0 for stamp in ours + theirs)
    assert set(ours).isdisjoint(theirs)
    assert len(set(ours)) == 4


def test_write_stamps_do_not_follow_random_seed() -> None:
    """A `random.seed(n)` elsewhere in the process (a library, a test plugin) must not make
    two replicas draw the same stamps."""
    random.seed(1234)
    first = [new_write_id() for _ in range(3)]
    random.seed(1234)
    again = [new_write_id() for _ in range(3)]
    random.seed()
    assert set(first).isdisjoint(again)


@pytest.mark.parametrize(
    "ms",
    [0, 1, 999, 1_733_065_200_123, 1_733_065_200_999, 2_000_000_000_001, 4_294_967_295_999],
)
def test_now_is_the_clock_s_whole_millisecond(ms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`utcnow` is the millisecond MongoDB keeps, exactly, up to 2106: every tier reads the
    same instant."""
    monkeypatch.setattr(model.time, "time_ns", lambda: ms * 1_000_000 + 999_999)
    now = model.utcnow()
    assert now == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert now.tzinfo is UTC


def test_now_follows_the_clock() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    now = model.utcnow()
    assert before <= now <= datetime.now(UTC)
    assert now.microsecond % 1000 == 0
