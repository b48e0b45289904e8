"""Quotas (docs/security.md): how many sessions an owner, participants a session and events a
timeline may have. Roles admin and service get `quota_privileged_factor` times each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from sessionmgr.domain import rules
from sessionmgr.domain.errors import QuotaExceeded
from sessionmgr.domain.model import Principal, SessionRecord
from sessionmgr.services.ports import WarmStore

if TYPE_CHECKING:
    from sessionmgr.services.sessions import Limits


def quota(limits: Limits, principal: Principal, base: int) -> int:
    """A quota as it applies to `principal`."""
    return base * limits.quota_privileged_factor if principal.may_act_for_others else base


class OwnerCounts:
    """This replica's recent counts of each owner's sessions, so that a create need not count
    in MongoDB every time (issue 16: the count was one of a create's three MongoDB round
    trips, and against a slow server the one that bounded the create rate).

    A count stands in for `ttl_s` seconds, raised by each create this replica lets through
    meanwhile, and only while it is under half the quota: an owner nearer the quota is
    counted before every create, as without this. What it gives up: creates of the same
    owner through other replicas within `ttl_s` are not in the estimate, so the quota can be
    passed only if more than half of it is created elsewhere within `ttl_s` (500 creates in
    one second for one owner at the default quota and TTL). Deletes are not subtracted: an
    estimate is never lower than the count it comes from (it only recounts sooner).

    One count of an owner at a time: creates of that owner that find no usable estimate while
    a count is on its way wait for it and then try the estimate it leaves, instead of each
    counting too (`check_owner`). Without that, the creates in flight when the estimate
    lapsed all counted at once: 64 concurrent creates of one owner made 68 counts in 12 s,
    each a scan of the owner's sessions on the benchmark's warm tier, and that bounded the
    create rate (issue 16). A create that the new estimate does not admit (an owner over half
    the quota, or a count that failed) counts on its own, as without this.
    """

    MAX_OWNERS = 10_000  # forgotten all at once past this: a bound, not an LRU

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}
        self._counting: dict[str, asyncio.Future[None]] = {}

    def admit(self, owner: str, cap: int) -> bool:
        """True when the last count lets this create through without counting again (the
        create is then added to the estimate)."""
        seen = self._seen.get(owner)
        if seen is None or self._ttl <= 0:
            return False
        at, count = seen
        if self._clock() - at > self._ttl or 2 * (count + 1) > cap:
            return False
        self._seen[owner] = (at, count + 1)
        return True

    def counted(self, owner: str, count: int) -> None:
        """MongoDB counted `count` sessions of `owner` just now, before a create it admits."""
        if self._ttl <= 0:
            return
        if len(self._seen) >= self.MAX_OWNERS:
            self._seen.clear()
        self._seen[owner] = (self._clock(), count + 1)

    async def await_count(self, owner: str) -> bool:
        """Wait for a count of `owner` that is on its way; False when none is."""
        running = self._counting.get(owner)
        if running is None:
            return False
        await asyncio.wait([running])  # never cancels the count if this create is cancelled
        return True

    @contextlib.contextmanager
    def counting(self, owner: str) -> Iterator[None]:
        """Around a count of `owner`'s sessions: creates that come meanwhile wait for it (not
        when a count is already on its way, or with the estimate off)."""
        if self._ttl <= 0 or owner in self._counting:
            yield
            return
        done = asyncio.get_running_loop().create_future()
        self._counting[owner] = done
        try:
            yield
        finally:
            del self._counting[owner]
            done.set_result(None)


async def check_owner(
    limits: Limits,
    warm: WarmStore,
    principal: Principal,
    owner: str,
    other_than: str | None = None,
    *,
    counts: OwnerCounts | None = None,
) -> None:
    """Before a create: counted in MongoDB, where every session of every state is, or taken
    from `counts` (see `OwnerCounts` for what that gives up).

    Creates racing each other may pass the quota by the number in flight. `other_than` is a
    session the count leaves out: a keyed create's own id, stored by an earlier attempt.
    """
    cap = quota(limits, principal, limits.max_sessions_per_owner)
    if counts is None:
        await _count(warm, owner, cap, other_than)
        return
    if counts.admit(owner, cap):
        return
    if await counts.await_count(owner) and counts.admit(owner, cap):
        return
    with counts.counting(owner):
        counts.counted(owner, await _count(warm, owner, cap, other_than))


async def _count(warm: WarmStore, owner: str, cap: int, other_than: str | None) -> int:
    count = await warm.count_owned(owner, cap, other_than)
    if count >= cap:
        raise QuotaExceeded(f"{owner} owns too many sessions", "max_sessions_per_owner", cap)
    return count


def check_participants(limits: Limits, principal: Principal, record: SessionRecord) -> None:
    """Before a participant that is not there yet joins `record`. A privileged principal's
    quota stops where the session's MongoDB document would pass its limit."""
    cap = quota(limits, principal, limits.max_participants)
    cap = min(cap, rules.participants_that_fit(limits.max_field_bytes))
    if len(record.participants) >= cap:
        what = f"the session has {len(record.participants)} participants"
        raise QuotaExceeded(what, "max_participants", cap)


def check_events(limits: Limits, principal: Principal, record: SessionRecord, adding: int) -> None:
    """Before `adding` events join `record`'s timeline (its last seq counts its events)."""
    cap = quota(limits, principal, limits.max_timeline_events)
    if record.timeline_seq + adding > cap:
        raise QuotaExceeded(
            f"the timeline holds {record.timeline_seq} events", "max_timeline_events", cap
        )
