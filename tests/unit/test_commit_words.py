"""`storage.commands.Words` writes down what redis-py's own command methods would queue."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Encoder

from sessionmgr.domain import model
from sessionmgr.domain.model import Participant, SessionRecord, TimelineEvent, utcnow
from sessionmgr.services.ports import Change, Idempotency
from sessionmgr.storage import hot
from sessionmgr.storage.commands import Words
from sessionmgr.storage.hot import RedisHotStore, encode_record
from sessionmgr.storage.hot_views import Remembered
from tests.unit.factories import SessionRecordFactory


class _PipelineWords:
    """The words as the commit wrote them before `Words`: each call queued on a redis-py
    pipeline (never sent) and read back from its command stack."""

    def __init__(self, words: list[Any]) -> None:
        self.words = words
        self._pipe = Redis().pipeline(transaction=False)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pipe, name)

        def queue(*args: Any, **kwargs: Any) -> None:
            start = len(self._pipe.command_stack)
            method(*args, **kwargs)
            for command, _options in self._pipe.command_stack[start:]:
                self.words += [len(command), *command]

        return queue


def _both(queue: Any) -> tuple[list[Any], list[Any]]:
    """What `queue` leaves on redis-py's pipeline (as the script's words) and on `Words`."""
    expected: list[Any] = []
    queue(_PipelineWords(expected))
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
        (lambda w: w.zadd("z", {}), ValueError),
        (lambda w: w.rpush("t"), ValueError),
        (lambda w: w.delete(), ValueError),
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


def _change(kind: str, before: SessionRecord, now: datetime) -> Change:
    lease = {"joined_at": now, "lease_expires_at": now}
    record = msgspec.structs.replace(
        before,
        version=before.version + 1,
        participants={"new": Participant(**lease, token=2), "keep": before.participants["keep"]},
    )
    if kind == "append":  # a join, a leave and two events with it
        event = TimelineEvent(seq=1, at=now, actor="mad:new", kind="note", data={"n": 1})
        return Change(
            record=record,
            fields=frozenset({"version", "participants", "timeline_seq"}),
            events=[event, event],
            leases_set=["new"],
            leases_dropped=["old"],
            result=b"{}",
        )
    if kind == "renewal":  # same version, no outbox entry, no feed entry
        return Change(
            record=msgspec.structs.replace(before),
            fields=frozenset({"participants"}),
            leases_set=["keep"],
            hot_only=True,
            result=b"{}",
        )
    return Change(record=record, fields=frozenset({"version", "context_summary"}), result=b"x")


@pytest.mark.parametrize("kind", ["append", "renewal", "patch"])
@pytest.mark.parametrize("keyed", [False, True])
def test_a_commit_sends_the_words_a_pipeline_would_have(
    kind: str, keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RedisHotStore._commit`'s keys and words, with `Words` and with the pipeline it
    replaced, byte for byte as redis-py encodes them (stamps drawn alike, the clock held)."""
    now = utcnow()
    lease = {"joined_at": now, "lease_expires_at": now}
    before = SessionRecordFactory.build(
        version=7,
        participants={
            "old": Participant(**lease, token=1),
            "keep": Participant(**lease, token=3),
        },
    )
    fields = {name.encode(): value for name, value in encode_record(before).items()}
    idem = Idempotency(key_digest="abc", fingerprint="f") if keyed else None
    monkeypatch.setattr(time, "time", lambda: 1_733_065_200.123456)

    def commit(recorder: Any) -> tuple[list[str], list[bytes]]:
        sent: dict[str, Any] = {}

        async def run_commit(self: Any, client: Any, keys: list[str], words: list[Any]) -> int:
            sent["keys"], sent["words"] = keys, list(words)
            return 1

        monkeypatch.setattr(RedisHotStore, "_run_commit", run_commit)
        monkeypatch.setattr(hot, "Words", recorder)
        store = RedisHotStore(Redis(), feed_maxlen=1000, idempotency_ttl_s=600)
        deadline = time.monotonic() + 20
        state = Remembered(
            fields=dict(fields),
            recent=[],
            rev=b"r0",
            deadlines=dict.fromkeys(before.participants, deadline),
        )
        view = hot._view_of(state, dict.fromkeys(before.participants, 20_000))
        seen = hot._Seen(view=view, state=state, fresh=False)
        model._stamps.seed(42)
        asyncio.run(store._commit(None, before.id, seen, _change(kind, before, now), idem))
        encoder = Encoder("utf-8", "strict", False)
        return sent["keys"], [encoder.encode(word) for word in sent["words"]]

    keys, words = commit(Words)
    assert commit(_PipelineWords) == (keys, words)
    assert (len(keys) == 3) is keyed
    assert (b"XADD" in words) is (kind != "renewal")  # a renewal has no outbox or feed entry
