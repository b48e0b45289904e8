"""A page of a session's timeline, merged from MongoDB and what has not reached it yet."""

from __future__ import annotations

import msgspec

from sessionmgr.domain.model import TimelineEvent

DEFAULT_PAGE = 100  # events a page holds when the caller names no limit (at most the max)


class TimelinePage(msgspec.Struct, frozen=True):
    """Events after a seq, oldest first; `next_after_seq` continues, None when none is left."""

    items: list[TimelineEvent]
    next_after_seq: int | None


def page_of(
    stored: list[TimelineEvent], unstored: list[TimelineEvent], after_seq: int, limit: int
) -> TimelinePage:
    """The first `limit` events after `after_seq`.

    `stored` must be MongoDB's first `limit + 1` events after `after_seq` and `unstored` every
    event not known to be there (the outbox's backlog, the hot recent events): then each event
    of the page is in one of them, and an event past the page shows there is more.
    """
    by_seq = {e.seq: e for e in stored if e.seq > after_seq}
    by_seq.update((e.seq, e) for e in unstored if e.seq > after_seq)
    seqs = sorted(by_seq)
    items = [by_seq[s] for s in seqs[:limit]]
    more = len(seqs) > limit
    return TimelinePage(items=items, next_after_seq=items[-1].seq if more and items else None)
