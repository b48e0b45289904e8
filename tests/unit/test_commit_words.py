"""`storage.commands.Words` writes down what redis-py's own command methods would queue."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.domain.model import Participant, TimelineEvent, utcnow
from sessionmgr.services.ports import Change
from sessionmgr.storage import feed
from sessionmgr.storage.commands import Words
from sessionmgr.storage.hot import RedisHotStore
from tests.unit.factories import SessionRecordFactory


def _both(queue: Any) -> tuple[list[Any], list[Any]]:
    """What `queue` leaves on redis-py's pipeline (as the script's words) and on `Words`."""
    pipe = Redis().pipeline(transaction=False)
    queue(pipe)
    expected: list[Any] = []
    for args, _options in pipe.command_stack:
        expected += [len(args), *args]
    got: list[Any] = []
    queue(Words(got))
    return expected, got


@pytest.mark.parametrize(
    "queue",
    [
        lambda p: p.hset("h", mapping={"version": b"2", "rev": b"ab"}),
        lambda p: p.rpush("t", b"e1", b"e2"),
        lambda p: p.ltrim("t", -20, -1),
        lambda p: p.set("k", b"1", px=30_000),
        lambda p: p.set("k", b"v", ex=86_400),
        lambda p: p.set("k", b"v"),
        lambda p: p.delete("a", "b"),
        lambda p: p.expire("k", 60),
        lambda p: p.zadd("z", {"s1": 1.5, "s2": 2}),
        lambda p: p.zremrangebyscore("z", "-inf", 17.25),
        lambda p: p.xadd("s", {"sid": "x", "entry": b"{}"}),
        lambda p: p.xadd("s", {"a": b"1"}, maxlen=1000, approximate=True),
        lambda p: p.xadd("s", {"a": b"1"}, maxlen=0, approximate=False),
    ],
)
def test_each_command_is_written_as_redis_py_queues_it(queue: Any) -> None:
    expected, got = _both(queue)
    assert got == expected


@pytest.mark.parametrize(
    ("queue", "error"),
    [
        (lambda w: w.hset("h", mapping={}), ValueError),
        (lambda w: w.xadd("s", {}), ValueError),
        (lambda w: w.xadd("s", {"a": b"1"}, maxlen=-1), ValueError),
        (lambda w: w.set("k", b"v", ex=1, px=1000), ValueError),
        (lambda w: w.set("k", b"v", px=1.5), TypeError),
        (lambda w: w.sadd("s", b"m"), AttributeError),
    ],
)
def test_what_redis_py_would_refuse_is_refused_before_anything_is_written(
    queue: Any, error: type[Exception]
) -> None:
    """A command Redis would refuse inside the script would leave the commands before it
    applied: it is refused here, while nothing has been sent."""
    words: list[Any] = ["header"]
    with pytest.raises(error):
        queue(Words(words))
    assert words == ["header"]


def test_a_whole_change_is_written_as_on_a_pipeline() -> None:
    """What a commit queues for an append with a joined participant, a dropped lease and an
    idempotency record: the same words either way (the write id and `rev` are drawn anew for
    each queueing, so they are compared apart)."""
    now = utcnow()
    lease = {"joined_at": now, "lease_expires_at": now}
    before = SessionRecordFactory.build(participants={"old": Participant(**lease, token=1)})
    record = msgspec.structs.replace(
        before,
        version=before.version + 1,
        participants={"new": Participant(**lease, token=2)},
    )
    event = TimelineEvent(seq=1, at=now, actor="mad:new", kind="note", data={"n": 1})
    store = RedisHotStore.__new__(RedisHotStore)
    store._recent, store._lease_ms, store._feed, store._idem_ttl = 20, 30_000, (1000, 60), 600

    def queue(pipe: Any) -> None:
        change = Change(
            record=record,
            fields=frozenset({"version", "participants"}),
            events=[event],
            leases_set=["new"],
            leases_dropped=["old"],
            result=b"{}",
        )
        store._queue_change(pipe, before.id, change)
        store._touch(pipe, before.id)
        store._queue_feed(pipe, before.id, feed.change_entries(before, change))
        pipe.set("idem", b"answer", ex=600)
        store._index_idem(pipe, before.id, "idem")

    expected, got = _both(queue)
    assert len(got) == len(expected)
    drawn = {i for i, word in enumerate(expected) if word in ("write_id", "rev")}
    for i in sorted(drawn):  # the values that follow the two drawn fields
        expected[i + 1] = got[i + 1]
    stamps = [i for i, w in enumerate(expected) if isinstance(w, float)]  # time.time() scores
    for i in stamps:
        assert abs(got[i] - expected[i]) < 5
        expected[i] = got[i]
    outbox = [i for i, w in enumerate(expected) if w == "entry"]
    for i in outbox:  # the outbox entry holds the write id too
        expected[i + 1] = got[i + 1]
    assert got == expected
    assert "HSET" in got and "XADD" in got and "DEL" in got and "ZADD" in got
