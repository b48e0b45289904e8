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
- a write concern error: each document the server did not refuse gets a
  `WriteConcernError` (stored, not known to be durable), as `insert_one` would raise;
- the command lost (a lost connection, a time-out, no primary): each create its own copy of
  the error, outcome unknown as for a lone insert (storage/turn_batch.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    WriteConcernError,
    WriteError,
)

from sessionmgr.storage.mongo_errors import DUPLICATE_KEY
from sessionmgr.storage.turn_batch import TurnBatch


class InsertBatch(TurnBatch[Mapping[str, Any], None]):
    """The documents to insert into one collection that wait for the end of this loop turn."""

    def __init__(self, collection: Any) -> None:
        super().__init__()
        self.collection = collection

    async def _send_all(self, calls: list[Mapping[str, Any]]) -> list[BaseException | None]:
        try:
            await self.collection.insert_many(calls, ordered=False)
        except BulkWriteError as exc:
            return _answers(len(calls), exc.details)
        return [None] * len(calls)

    def _lost(self) -> Exception:
        return AutoReconnect("the batch inserting this document ended")


def _answers(count: int, details: Mapping[str, Any]) -> list[BaseException | None]:
    """Each document's outcome from a `BulkWriteError`'s details."""
    answers: list[BaseException | None] = [None] * count
    for error in details.get("writeErrors", []):
        kind = DuplicateKeyError if error.get("code") == DUPLICATE_KEY else WriteError
        answers[error["index"]] = kind(error.get("errmsg", ""), error.get("code"), error)
    concern = details.get("writeConcernErrors") or []
    if concern:
        first = concern[0]
        for index, answer in enumerate(answers):
            if answer is None:
                answers[index] = WriteConcernError(
                    first.get("errmsg", ""), first.get("code"), first
                )
    return answers
