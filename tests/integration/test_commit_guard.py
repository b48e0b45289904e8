"""The commit script: an update applies only to the hash its decision read (DESIGN §2).

An update reads the session (one script), decides in Python, then commits in one script that
first checks the hash is still the one it read (there, the same `rev`, the same version) and
the request's idempotency record still absent; refused, the script answers the session as it
is now. Each test puts another write between one update's read and its commit and checks
that the update was decided again on the new state, never applied over it. The other write
comes from another store, as from another replica: a replica's own writers of a session take
turns (`storage/write_turns.py`) and cannot come between. On redis-server
and on fakeredis with Lua. (A write that decides on what the replica's own last commit left,
without a read, is `test_hot_views.py`'s.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.domain.model import Participant
from sessionmgr.services.ports import Change, HotView, Idempotency, Replayed
from sessionmgr.storage.hot import COMMIT_SHA, RedisHotStore, hot_key
from tests.unit.factories import SessionRecordFactory

JOINED = datetime(2026, 11, 30, tzinfo=UTC)
RENEWED = JOINED + timedelta(seconds=60)


def between_read_and_commit(
    monkeypatch: pytest.MonkeyPatch, action: Callable[[], Awaitable[Any]]
) -> list[int]:
    """Run `action` once, right after the next read of the hash; returns the versions read."""
    real_read = RedisHotStore._seen
    versions: list[int] = []

    async def read(self: RedisHotStore, client: Any, session_id: str, idem: Any) -> Any:
        seen = await real_read(self, client, session_id, idem)
        versions.append(seen.view.record.version if seen.view else -1)
        if len(versions) == 1:
            await action()
        return seen

    monkeypatch.setattr(RedisHotStore, "_seen", read)
    return versions


def bump(work: dict[str, Any], decided: list[int] | None = None) -> Callable[[HotView], Change]:
    """A patch: the next version, `work` merged into work_in_progress. Each version decided
    on goes to `decided`."""

    def decide(view: HotView) -> Change:
        if decided is not None:
            decided.append(view.record.version)
        record = msgspec.structs.replace(
            view.record,
            version=view.record.version + 1,
            work_in_progress={**view.record.work_in_progress, **work},
        )
        return Change(record=record, fields=frozenset({"version", "work_in_progress"}))

    return decide


def with_participant(mad: str, *, renewal: bool) -> Callable[[HotView], Change]:
    """`participants` written whole from what was read, with `mad` in it: a join (the next
    version) or a lease renewal (the same version, Redis only)."""

    def decide(view: HotView) -> Change:
        expires = RENEWED if renewal else JOINED
        mine = Participant(joined_at=JOINED, lease_expires_at=expires, token=1)
        participants = {**view.record.participants, mad: mine}
        if renewal:
            record = msgspec.structs.replace(view.record, participants=participants)
            return Change(record=record, fields=frozenset({"participants"}), hot_only=True)
        record = msgspec.structs.replace(
            view.record, version=view.record.version + 1, participants=participants
        )
        return Change(record=record, fields=frozenset({"version", "participants"}))

    return decide


def join(mad: str) -> Callable[[HotView], Change]:
    return with_participant(mad, renewal=False)


def renew(mad: str) -> Callable[[HotView], Change]:
    return with_participant(mad, renewal=True)


async def hot(store: RedisHotStore, session_id: str) -> HotView:
    view = await store.load(session_id)
    assert view is not None
    return view


async def test_a_write_between_read_and_commit_makes_the_update_decide_again(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisHotStore(store_redis)
    other = RedisHotStore(store_redis)  # another replica
    record = SessionRecordFactory.build(version=1, work_in_progress={})
    await store.create(record, None, b"{}")
    read = between_read_and_commit(
        monkeypatch, lambda: other.transact(record.id, bump({"b": 1}), None)
    )
    decided: list[int] = []

    change = await store.transact(record.id, bump({"a": 1}, decided), None)

    assert isinstance(change, Change)
    assert read == [1, 1], "read, then the other write read and committed"
    assert decided == [1, 2], "decided on the read, then on what the refused commit answered"
    view = await hot(store, record.id)
    assert view.record.version == 3
    assert view.record.work_in_progress == {"a": 1, "b": 1}


async def test_a_write_at_the_same_version_also_makes_it_decide_again(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal rewrites `participants` without a new version: only `rev` shows it. A join
    decided before it would otherwise write `participants` back without the renewal."""
    store = RedisHotStore(store_redis)
    other = RedisHotStore(store_redis)  # another replica
    record = SessionRecordFactory.build(version=1, participants={})
    await store.create(record, None, b"{}")
    read = between_read_and_commit(
        monkeypatch, lambda: other.transact(record.id, renew("renewed"), None)
    )

    assert isinstance(await store.transact(record.id, join("joiner"), None), Change)

    assert read == [1, 1], "read, then the renewal read and committed"
    # Decided again on what the refused commit answered: the renewal is kept.
    view = await hot(store, record.id)
    assert view.record.version == 2
    assert set(view.record.participants) == {"renewed", "joiner"}
    assert view.record.participants["renewed"].lease_expires_at == RENEWED


async def test_a_session_suspended_between_read_and_commit_is_not_written_back(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash deleted in between: the commit writes nothing (no hash of one field), and
    the update answers "not hot" so that the service loads the session and decides again."""
    store = RedisHotStore(store_redis)
    record = SessionRecordFactory.build(version=1)
    await store.create(record, None, b"{}")
    between_read_and_commit(monkeypatch, lambda: store_redis.delete(hot_key(record.id)))

    assert await store.transact(record.id, bump({"a": 1}), None) is None

    assert await store_redis.exists(hot_key(record.id)) == 0


async def test_a_session_written_and_reloaded_between_read_and_commit_is_decided_again(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspended and loaded again in between, at the same version: a load stamps the hash
    with a new `rev`, so the commit of the decision read before is refused all the same."""
    store = RedisHotStore(store_redis)
    other = RedisHotStore(store_redis)  # another replica
    record = SessionRecordFactory.build(version=1, participants={})
    await store.create(record, None, b"{}")

    async def renew_suspend_reload() -> None:
        await other.transact(record.id, renew("renewed"), None)
        current = (await hot(store, record.id)).record
        await store_redis.delete(hot_key(record.id))

        async def loader() -> Any:
            return current, []

        assert await other.activate(record.id, loader) is not None

    read = between_read_and_commit(monkeypatch, renew_suspend_reload)

    assert isinstance(await store.transact(record.id, join("joiner"), None), Change)

    assert read[0] == 1 and read[-1] == 1, "decided again on the reloaded hash"
    assert len(read) >= 3
    view = await hot(store, record.id)
    assert set(view.record.participants) == {"renewed", "joiner"}


async def test_the_same_key_committed_in_between_answers_the_first_result(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that writes no field of the record: its commit still stamps a new `rev`,
    and the idempotency record shows that a request with this key committed in between; the
    refused commit answers that record, and this one replays it."""
    store = RedisHotStore(store_redis)
    record = SessionRecordFactory.build(version=1)
    await store.create(record, None, b"{}")
    idem = Idempotency(key_digest="k" * 16, fingerprint="f")
    calls: list[str] = []

    def lease_only(view: HotView) -> Change:
        calls.append("decided")
        return Change(record=view.record, fields=frozenset(), leases_set=["m"], result=b"first")

    other = Idempotency(key_digest="k" * 16, fingerprint="f")
    another = RedisHotStore(store_redis)  # another replica
    between_read_and_commit(monkeypatch, lambda: another.transact(record.id, lease_only, other))

    outcome = await store.transact(record.id, lease_only, idem)

    assert outcome == Replayed(result=b"first")
    assert calls == ["decided", "decided"], "the other request, then this one once"


async def test_the_commit_runs_after_redis_forgot_its_script(store_redis: Redis) -> None:
    store = RedisHotStore(store_redis)
    record = SessionRecordFactory.build(version=1, work_in_progress={})
    await store.create(record, None, b"{}")
    await store_redis.script_flush()

    assert isinstance(await store.transact(record.id, bump({"a": 1}), None), Change)

    assert await store_redis.script_exists(COMMIT_SHA) == [True]
    assert (await hot(store, record.id)).record.version == 2
    assert isinstance(await store.transact(record.id, bump({"b": 2}), None), Change)
    assert (await hot(store, record.id)).record.work_in_progress == {"a": 1, "b": 2}
