"""storage/insert_batch.py: the sessions creates store in one event-loop turn go to MongoDB as
one unordered insert, and each create learns what became of its own document. Run on the
in-memory engine and on the MongoDB wire-compatible server (nx-27017 over SQLite, not MongoDB:
tests/support/wire_mongo.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo.errors import (
    AutoReconnect,
    DocumentTooLarge,
    DuplicateKeyError,
    WriteConcernError,
    WriteError,
    WTimeoutError,
)

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import SessionRecord, SessionState, new_write_id, utcnow
from sessionmgr.settings import load_settings
from sessionmgr.storage.insert_batch import _answers
from sessionmgr.storage.warm import MongoWarmStore, open_warm_store
from tests.support.wire_mongo import LABEL as WIRE


@pytest.fixture(params=["mongomock", WIRE])
async def warm_uri(request: pytest.FixtureRequest) -> str:
    if request.param == WIRE:
        return str(request.getfixturevalue("wire_mongo").uri)
    return "mongomock://"


async def _open(uri: str, **overrides: Any) -> AsyncIterator[MongoWarmStore]:
    settings = load_settings(
        {}, mongodb_uri=uri, mongodb_db=f"t{secrets.token_hex(4)}", **overrides
    )
    resource = open_warm_store(settings)
    store = await anext(resource)
    yield store
    await store._client.drop_database(settings.mongodb_db)
    await resource.aclose()


@pytest.fixture
async def warm(warm_uri: str) -> AsyncIterator[MongoWarmStore]:
    async for store in _open(warm_uri):
        yield store


class Counting:
    """A collection that counts the inserts it is asked for, by kind."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def insert_one(self, doc: dict[str, Any]) -> Any:
        self.calls.append(("insert_one", 1))
        return await self._collection.insert_one(doc)

    async def insert_many(self, docs: list[dict[str, Any]], **options: Any) -> Any:
        self.calls.append(("insert_many", len(docs)))
        assert options == {"ordered": False}  # one document's error must not stop the rest
        return await self._collection.insert_many(docs, **options)


def _counted(warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting(warm._sessions)
    monkeypatch.setattr(warm, "_sessions", counting)
    return counting


def record(session_id: str | None = None) -> SessionRecord:
    now = utcnow()
    return SessionRecord(
        id=session_id or secrets.token_hex(16),
        version=1,
        state=SessionState.ACTIVE,
        owner_id="alice",
        acl=[],
        created_at=now,
        last_active=now,
        participants={},
        work_in_progress={"step": 0},
        context_summary={},
        write_id=new_write_id(),
    )


async def test_the_creates_of_one_turn_are_one_insert(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _counted(warm, monkeypatch)
    records = [record() for _ in range(12)]
    assert await asyncio.gather(*(warm.insert(r) for r in records)) == [True] * 12
    assert counting.calls == [("insert_many", 12)]
    for stored in records:
        assert await warm.get(stored.id) == stored


async def test_a_taken_id_fails_its_own_create_and_no_other(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = record()
    assert await warm.insert(taken)
    again = record(taken.id)  # a retried keyed create whose first attempt stored its session
    others = [record() for _ in range(3)]
    counting = _counted(warm, monkeypatch)
    answers = await asyncio.gather(*(warm.insert(r) for r in [others[0], again, *others[1:]]))
    assert answers == [True, False, True, True]
    assert counting.calls == [("insert_many", 4)]
    assert await warm.get(taken.id) == taken  # the first one stays
    for stored in others:
        assert await warm.get(stored.id) == stored


class LosesInserts:
    """A collection whose inserts are lost with their connection (outcome unknown)."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def insert_many(self, docs: list[dict[str, Any]], **options: Any) -> Any:
        raise AutoReconnect("connection reset")


async def test_a_lost_insert_gives_each_create_its_own_unavailable(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "_sessions", LosesInserts(warm._sessions))
    results = await asyncio.gather(
        *(warm.insert(record()) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, BackendUnavailable) and r.retryable for r in results)
    causes = [r.__cause__ for r in results]
    assert all(isinstance(c, AutoReconnect) for c in causes)
    assert len({id(c) for c in causes}) == 3  # each raises and chains its own copy


async def test_a_create_cancelled_before_its_turn_ends_stores_nothing(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _counted(warm, monkeypatch)
    kept, dropped = record(), record()
    cancelled = asyncio.ensure_future(warm.insert(dropped))
    await asyncio.sleep(0)  # its document is waiting for the end of the turn
    cancelled.cancel()
    assert await warm.insert(kept)
    assert cancelled.cancelled()
    assert counting.calls == [("insert_many", 1)]
    assert await warm.get(dropped.id) is None
    assert await warm.get(kept.id) == kept


async def test_without_batching_each_create_is_its_own_insert(
    warm_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for warm in _open(warm_uri, mongodb_batch=False):
        assert warm._inserts is None
        counting = _counted(warm, monkeypatch)
        records = [record() for _ in range(3)]
        assert await asyncio.gather(*(warm.insert(r) for r in records)) == [True] * 3
        assert counting.calls == [("insert_one", 1)] * 3


def test_each_document_gets_its_own_outcome_from_a_bulk_error() -> None:
    details = {
        "writeErrors": [
            {"index": 1, "code": 11000, "errmsg": "E11000 duplicate key"},
            {"index": 2, "code": 121, "errmsg": "Document failed validation"},
        ],
        "writeConcernErrors": [{"code": 64, "errmsg": "waiting for replication timed out"}],
    }
    answers = _answers(4, details)
    assert isinstance(answers[1], DuplicateKeyError)
    assert isinstance(answers[2], WriteError) and not isinstance(answers[2], DuplicateKeyError)
    assert answers[2].code == 121
    # Stored but not known to be durable: what insert_one raises for a write concern error.
    assert isinstance(answers[0], WriteConcernError) and answers[0].code == 64
    assert isinstance(answers[3], WriteConcernError)
    assert _answers(2, {"writeErrors": [{"index": 0, "code": 11000}]})[1] is None
    # A time-out is what a lone insert raises for it: transient, retried.
    timed_out = {"code": 64, "errmsg": "timed out", "errInfo": {"wtimeout": True}}
    (answer,) = _answers(1, {"writeErrors": [], "writeConcernErrors": [timed_out]})
    assert isinstance(answer, WTimeoutError)
    (answer,) = _answers(1, {"writeConcernErrors": [{"code": 50, "errmsg": "max time"}]})
    assert isinstance(answer, WTimeoutError)


class TooLargeFor:
    """A collection whose driver cannot send one document (`big`): an `insert_many` stores the
    documents before it and then fails, as pymongo does when it meets it in a batch."""

    def __init__(self, collection: Any, big: str) -> None:
        self._collection = collection
        self._big = big

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def insert_many(self, docs: list[dict[str, Any]], **options: Any) -> Any:
        before = docs[: [d["_id"] for d in docs].index(self._big)]
        if before:
            await self._collection.insert_many(before, **options)
        raise DocumentTooLarge("BSON document too large")

    async def insert_one(self, doc: dict[str, Any]) -> Any:
        if doc["_id"] == self._big:
            raise DocumentTooLarge("BSON document too large")
        return await self._collection.insert_one(doc)


async def test_a_document_too_large_to_send_fails_its_own_create_only(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent_first, big, after = record(), record(), record()
    monkeypatch.setattr(warm, "_sessions", TooLargeFor(warm._sessions, big.id))
    answers = await asyncio.gather(
        *(warm.insert(r) for r in [sent_first, big, after]), return_exceptions=True
    )
    assert answers[0] is True  # stored by the batch, found by its write when sent again
    assert isinstance(answers[1], DocumentTooLarge)
    assert answers[2] is True
    assert await warm.get(sent_first.id) == sent_first
    assert await warm.get(after.id) == after
    assert await warm.get(big.id) is None


async def test_a_batch_that_ends_unsent_leaves_its_creates_outcome_unknown(
    warm: MongoWarmStore,
) -> None:
    """Its task cancelled before its first step (a replica stopping): the create learns a
    lost connection, a 503 it may retry, never a wait without end."""
    assert warm._inserts is not None
    inserting = asyncio.ensure_future(warm.insert(record()))
    await asyncio.sleep(0)  # the document waits for the end of the turn
    warm._inserts._send_waiting()  # the batch leaves now (the scheduled one finds it empty)
    (task,) = warm._inserts._sending
    task.cancel()
    with pytest.raises(BackendUnavailable) as lost:
        await asyncio.wait_for(inserting, 2)
    assert lost.value.retryable
    assert isinstance(lost.value.__cause__, AutoReconnect)
