"""What this replica last saw of each hot session it wrote: a write decides on that view and
commits in one round trip, instead of reading the hash first (two).

A view is never trusted, only tried. The commit script applies a change only if the hash's
`rev` stamp and version are still those the change was decided on (`hot._COMMIT_SCRIPT`), and
every write of a session's hash, timeline or lease keys sets a new `rev`. So a view that
another replica (or a suspend, a load, a rebase) made stale costs no more than a read would
have: the refused commit answers with the session as it is now, and the change is decided
again on that. A refusal (409, 412, 403, ...) is only ever answered from such a fresh state:
a decision that refuses on a remembered view is run again on a read (`RedisHotStore.transact`).

The one thing that changes in Redis without a write is a lease running out. A view keeps
each lease's deadline on this replica's monotonic clock, counted from the moment the read (or
the commit that set the lease) was sent, so never later than Redis' own; a view with a lease
within `LEASE_MARGIN_S` of its deadline, or past it, is not used (the write reads instead).

The views are bounded in bytes: the sizes of the hash fields and recent events as Redis holds
them (Python's objects for them take a few times that), least recently written first out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import msgspec

from sessionmgr.domain.model import SessionRecord, TimelineEvent
from sessionmgr.services.ports import HotView

LEASE_MARGIN_S = 1.0
ENTRY_SHARE = 64  # one view may take at most this share of the budget; a larger one is not kept


class Seen(msgspec.Struct, kw_only=True):
    """A hot session as a read (or a refused commit) met it, or as this replica's own commit
    left it. `view` None: not hot. `stored`: the request's idempotency record, when read."""

    view: HotView | None
    rev: bytes
    stored: bytes | None = None
    fresh: bool = True  # read from Redis for this request, not remembered
    field_sizes: dict[str, int] = msgspec.field(default_factory=dict)
    event_sizes: list[int] = msgspec.field(default_factory=list)
    deadlines: dict[str, float] = msgspec.field(default_factory=dict)  # monotonic seconds

    @property
    def size(self) -> int:
        return sum(self.field_sizes.values()) + sum(self.event_sizes)


def lease_deadlines(ttl_ms: Mapping[str, int], sent_at: float) -> dict[str, float]:
    return {mad: sent_at + ttl / 1000 for mad, ttl in ttl_ms.items()}


def after_commit(
    seen: Seen,
    *,
    fields: Mapping[str, bytes],
    record: SessionRecord,
    events: list[TimelineEvent],
    event_sizes: list[int],
    leases_set: list[str],
    leases_dropped: list[str],
    rev: bytes,
    sent_at: float,
    lease_s: float,
    recent: int,
) -> Seen:
    """The session as the commit of `fields` (encoded, from `record`) and `events` left it:
    what a read right after it would return, with the leases' deadlines as known here."""
    assert seen.view is not None
    before = seen.view
    now = msgspec.structs.replace(before.record, **{n: getattr(record, n) for n in fields})
    deadlines = {m: d for m, d in seen.deadlines.items() if m not in leases_dropped}
    deadlines.update(dict.fromkeys(leases_set, sent_at + lease_s))
    deadlines = {m: d for m, d in deadlines.items() if m in now.participants}
    return Seen(
        view=HotView(record=now, recent=(before.recent + events)[-recent:]),
        rev=rev,
        fresh=False,
        field_sizes={**seen.field_sizes, **{n: len(v) for n, v in fields.items()}},
        event_sizes=(seen.event_sizes + event_sizes)[-recent:],
        deadlines=deadlines,
    )


class HotViews:
    """An LRU of `Seen` by session id, bounded by `budget_bytes` (0: nothing is kept)."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._largest = budget_bytes // ENTRY_SHARE
        self._entries: OrderedDict[str, Seen] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, session_id: str) -> Seen | None:
        """A copy to decide on, its leases' remaining lives counted now; None when there is
        none, or when a lease is too near its deadline to trust the count."""
        seen = self._entries.get(session_id)
        if seen is None or seen.view is None:
            return None
        now = time.monotonic()
        ttls = {mad: int((deadline - now) * 1000) for mad, deadline in seen.deadlines.items()}
        if any(ttl < LEASE_MARGIN_S * 1000 for ttl in ttls.values()):
            self.drop(session_id)
            return None
        view = seen.view
        return msgspec.structs.replace(
            seen,
            view=HotView(
                record=msgspec.structs.replace(view.record),
                recent=list(view.recent),
                lease_ttl_ms=ttls,
            ),
            fresh=False,
        )

    def put(self, session_id: str, seen: Seen) -> None:
        self.drop(session_id)
        size = seen.size
        if seen.view is None or size > self._largest:
            return
        self._entries[session_id] = seen
        self._bytes += size
        while self._bytes > self._budget:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size

    def drop(self, session_id: str) -> None:
        seen = self._entries.pop(session_id, None)
        if seen is not None:
            self._bytes -= seen.size
