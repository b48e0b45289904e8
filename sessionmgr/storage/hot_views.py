"""What this replica last saw of each hot session it wrote: a write decides on that state and
commits in one round trip, instead of reading the hash first (two).

A remembered state is never trusted, only tried. The commit script applies a change only if
the hash's `rev` stamp and version are still those the change was decided on, and every lease
the decision saw as live is still there (`hot._COMMIT_SCRIPT`); every write of a session's
hash, timeline or lease keys sets a new `rev`. So a state that another replica (or a suspend,
a load, a rebase) made stale costs no more than a read would have: the refused commit answers
with the session as it is now, and the change is decided again on that. A refusal (409, 412,
403, ...) is only ever answered from such a fresh state: a decision that refuses on a
remembered one is run again on a read (`RedisHotStore.transact`).

Leases also end without a write (their TTL, and an eviction or a DEL the commit's check
catches). A remembered state keeps each lease's deadline on this replica's monotonic clock,
counted from the moment the read (or the commit that set the lease) was sent, so never later
than Redis' own, and is not used when a lease is within `LEASE_MARGIN_S` of it or past it.

What is kept are the bytes Redis holds (the hash's fields and the recent events, as the read
script answers them), decoded anew for each write: a decision never shares an object with
the memory. The memory is bounded by those bytes, least recently written first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import msgspec

LEASE_MARGIN_S = 1.0
ENTRY_SHARE = 64  # one session may take at most this share of the budget; a larger one is not kept


class Remembered(msgspec.Struct, kw_only=True):
    """A hot session as this replica's own last commit of it left it: the hash's fields and
    the recent events as Redis holds them, its `rev`, and each live lease's deadline."""

    fields: dict[bytes, bytes]
    recent: list[bytes]
    rev: bytes
    deadlines: dict[str, float] = msgspec.field(default_factory=dict)  # monotonic seconds

    @property
    def size(self) -> int:
        return sum(map(len, self.fields.values())) + sum(map(len, self.recent))

    def lease_ttl_ms(self, now: float) -> dict[str, int]:
        return {mad: int((deadline - now) * 1000) for mad, deadline in self.deadlines.items()}


def lease_deadlines(ttl_ms: Mapping[str, int], sent_at: float) -> dict[str, float]:
    return {mad: sent_at + ttl / 1000 for mad, ttl in ttl_ms.items()}


def after_commit(
    before: Remembered,
    *,
    fields: Mapping[str, bytes],
    events: list[bytes],
    leases_set: list[str],
    leases_dropped: list[str],
    participants: set[str],
    rev: bytes,
    sent_at: float,
    lease_s: float,
    recent: int,
) -> Remembered:
    """The session as a commit of `fields` and `events` left it: what a read right after it
    would return, with the leases' deadlines as known here. The commit's commands run in
    this order: the hash, the timeline (trimmed to `recent`), the leases set, then dropped."""
    deadlines = dict(before.deadlines)
    deadlines.update(dict.fromkeys(leases_set, sent_at + lease_s))
    for mad in leases_dropped:
        deadlines.pop(mad, None)
    return Remembered(
        fields={**before.fields, **{name.encode(): value for name, value in fields.items()}},
        recent=(before.recent + events)[-recent:],
        rev=rev,
        # The read script reports the leases of participants only.
        deadlines={mad: d for mad, d in deadlines.items() if mad in participants},
    )


class HotViews:
    """An LRU of `Remembered` by session id, bounded by `budget_bytes` (0: nothing kept)."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._largest = budget_bytes // ENTRY_SHARE
        self._entries: OrderedDict[str, tuple[Remembered, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, session_id: str) -> tuple[Remembered, dict[str, int]] | None:
        """The session and its leases' remaining lives counted now; None when there is
        none, or when a lease is too near its deadline to trust the count."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        remembered = entry[0]
        ttls = remembered.lease_ttl_ms(time.monotonic())
        if any(ttl < LEASE_MARGIN_S * 1000 for ttl in ttls.values()):
            self.drop(session_id)
            return None
        return remembered, ttls

    def put(self, session_id: str, remembered: Remembered) -> None:
        self.drop(session_id)
        size = remembered.size
        if size > self._largest:
            return
        self._entries[session_id] = (remembered, size)
        self._bytes += size
        while self._bytes > self._budget:
            _, (_, oldest) = self._entries.popitem(last=False)
            self._bytes -= oldest

    def drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._bytes -= entry[1]
