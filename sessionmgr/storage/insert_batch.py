"""One MongoDB insert for the new sessions many creates store at once (a group commit).

A create stores its session's document in MongoDB before it answers (DESIGN §2). Under load,
many creates reach that insert in the same turn of the event loop; sent one by one, each pays
for its own command, its own hand-off to the driver's thread and its own wake-up. An
`InsertBatch` (one per collection) sends the documents of one turn as one unordered
`insert_many` and tells each create what became of its own document. A create still answers
only once its document is stored. `SESSIONMGR_MONGODB_BATCH=false` inserts each alone.

What a create sees is what `insert_one` would give it:
- its document stored: None;
- another document holds its `_id` (a retried keyed create): its own `DuplicateKeyError`;
  any other error about its document alone: its own `WriteError`; one document's error does
  not stop the others (the insert is unordered);
- a write concern error (a `WTimeoutError` when it is a time-out): each document the server
  did not refuse gets it, as `insert_one` would raise it: 503, whether or not that document
  was stored (the driver does not say which of the commands it split a batch into the error
  was of); a document stored then stays a valid dormant session, as after a lone insert;
- the command lost (a lost connection, a time-out, no primary): each create its own copy of
  the error, outcome unknown as for a lone insert (storage/turn_batch.py);
- a document the driver cannot send (larger than a command may carry): the batch is sent
  again one document at a time, so that only that create fails, as it would alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from bson.errors import InvalidDocument
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    WriteConcernError,
    WriteError,
    WTimeoutError,
)

from sessionmgr.storage.mongo_errors import DUPLICATE_KEY
from sessionmgr.storage.turn_batch import TurnBatch


class InsertBatch(TurnBatch[Mapping[str, Any], None]):
    """The documents to insert into one collection that wait for the end of this loop turn."""

    def __init__(self, collection: Callable[[], Any]) -> None:
        super().__init__()
        self._collection = collection  # looked up at each send: the store's, whatever it is then

    async def _send_all(self, calls: list[Mapping[str, Any]]) -> list[BaseException | None]:
        collection = self._collection()
        try:
            await collection.insert_many(calls, ordered=False)
        except BulkWriteError as exc:
            return _answers(len(calls), exc.details)
        except InvalidDocument:  # DocumentTooLarge too: the driver cannot send one of them
            if len(calls) == 1:
                raise
            # Each alone, so that it fails its own create only; one the first send stored is
            # found by its write.
            alone = (_insert_alone(collection, doc) for doc in calls)
            return await asyncio.gather(*alone, return_exceptions=True)
        return [None] * len(calls)

    def _lost(self) -> Exception:
        return AutoReconnect("the batch inserting this document ended")


async def _insert_alone(collection: Any, doc: Mapping[str, Any]) -> None:
    try:
        await collection.insert_one(doc)
    except DuplicateKeyError:
        mine = {"_id": doc["_id"], "write_id": doc.get("write_id")}
        if await collection.find_one(mine, {"_id": 1}) is None:
            raise


def _answers(count: int, details: Mapping[str, Any]) -> list[BaseException | None]:
    """Each document's outcome from a `BulkWriteError`'s details."""
    answers: list[BaseException | None] = [None] * count
    for error in details.get("writeErrors", []):
        kind = DuplicateKeyError if error.get("code") == DUPLICATE_KEY else WriteError
        answers[error["index"]] = kind(error.get("errmsg", ""), error.get("code"), error)
    concern = details.get("writeConcernErrors") or []
    if concern:
        # Not told which command's documents it concerns (the driver may split a large
        # batch): every document not refused gets it, as `insert_one` would raise it.
        first = concern[0]
        concerned = WTimeoutError if _timed_out(first) else WriteConcernError
        for index, answer in enumerate(answers):
            if answer is None:
                answers[index] = concerned(first.get("errmsg", ""), first.get("code"), first)
    return answers


def _timed_out(error: Mapping[str, Any]) -> bool:
    """A write concern error that is a time-out, which `insert_one` raises as `WTimeoutError`
    (pymongo's own test: code 50, or `errInfo.wtimeout`)."""
    return error.get("code") == 50 or bool((error.get("errInfo") or {}).get("wtimeout"))
