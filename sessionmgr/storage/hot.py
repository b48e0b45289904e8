"""The hot tier: one Redis hash per active session, its recent timeline, leases and the outbox.

Every key of a session carries the hash tag of its partition (storage/keys.py), so that each
MULTI stays in one Redis Cluster slot. Each top-level field of the record is a
hash field of its own (msgspec JSON), so a patch writes only what it changes. Updates run the
optimistic transaction of DESIGN §2 in two round trips: read (one script), decide, then one
commit script that applies the write + outbox entry + idempotency record only if the hash is
still the one the decision read (its `rev` stamp, see `_COMMIT_SCRIPT`), else answers the
session as it is now, to decide again on. In one round trip when this replica's own last
commit of the session left the state decided on (`hot_views.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ExecAbortError,
    MasterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.domain.errors import (
    ArchiveInProgress,
    BackendUnavailable,
    ConcurrencyConflict,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    PreconditionFailed,
    SessionNotFound,
    TooManyIdempotencyKeys,
    WriteContended,
)
from sessionmgr.domain.model import (
    ContextUpdate,
    Participant,
    SessionRecord,
    SessionState,
    TimelineEvent,
    new_write_id,
    unique_64,
)
from sessionmgr.services.ports import (
    AT_REST,
    CREATE_SCOPE,
    DONE,
    REBASED,
    Change,
    Decide,
    Flush,
    HotView,
    Idempotency,
    Loader,
    OutboxEntry,
    RecordCheck,
    Replayed,
    SessionRebased,
    Undelivered,
    WriteDiverged,
)
from sessionmgr.settings import Settings
from sessionmgr.storage import feed, keys
from sessionmgr.storage.commands import Words
from sessionmgr.storage.hot_views import HotViews, Remembered, after_commit, lease_deadlines
from sessionmgr.storage.redis_nodes import ClusterNodes, SessionmgrCluster, nodes_of
from sessionmgr.storage.redis_pool import BoundedPool, sentinel_client
from sessionmgr.storage.script_batch import batch_of
from sessionmgr.storage.write_turns import WriteTurns

log = logging.getLogger(__name__)

# Partition 0's streams and idle index: with SESSIONMGR_REDIS_PARTITIONS=1, every session's.
OUTBOX_STREAM = keys.outbox(0)
DEAD_LETTER_STREAM = keys.dead_letters(0)
IDLE_INDEX = keys.idle_index(0)
_RECORD_FIELDS = tuple(SessionRecord.__struct_fields__)
_FIELD_DECODERS: dict[bytes, msgspec.json.Decoder[Any]] = {
    f.name.encode(): msgspec.json.Decoder(f.type) for f in msgspec.structs.fields(SessionRecord)
}
_DEFAULTED = frozenset(
    f.name.encode() for f in msgspec.structs.fields(SessionRecord) if f.required is False
)
_RACE_RETRIES = 8  # commits beaten in a row before a write pauses between tries
_RACE_BUDGET_S = 2.0  # ... and how long after the call (its wait for a turn too) it may try
_PAUSE_CAP_S = 0.05


def _contended(session_id: str, beaten: int, started: float, what: str = "write") -> WriteContended:
    # Logged where it is answered (api/problems.py), as every other contended answer is.
    return WriteContended(session_id, beaten, time.monotonic() - started, what)


def _version_refusal(
    decide: Decide, view: HotView
) -> ConcurrencyConflict | PreconditionFailed | None:
    """The refusal `decide` gives `view` for the version(s) it names, if that is its answer."""
    try:
        decide(view)
    except (ConcurrencyConflict, PreconditionFailed) as refused:
        return refused
    except Exception:  # any other refusal is the turn's to answer
        return None
    return None


def _pause_after(beaten: int) -> float:
    """A jittered pause that doubles with each commit beaten past `_RACE_RETRIES`, capped."""
    return random.uniform(0, min(_PAUSE_CAP_S, 0.001 * 2 ** (beaten - _RACE_RETRIES)))  # noqa: S311


def _ignore(_on: str) -> None:
    """No one to tell what a write was decided on (a store built without metrics)."""


CLAIM_TTL_S = 60
_SCAN_BATCH = 500
SCAN_LIMIT = 20_000  # outbox entries; past this a full read or suspend answers 503
PENDING = b"\x00pending"  # never a JSON answer
# A caller's live keys: forget the expired, refuse a new one past the cap, note this one.
_ADMIT_KEY_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3])
then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
# The archive fence: not on a hot session (2), taken (1), or held by another archiver (0).
_FENCE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""
_FENCE_TAKEN, _FENCE_HOT = 1, 2
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(TimelineEvent).decode
_decode_participants = msgspec.json.Decoder(dict[str, Participant]).decode
_decode_acl = msgspec.json.Decoder(list[str]).decode
_decode_str = msgspec.json.Decoder(str).decode


# A session as a read sees it: the hash, the recent timeline, each participant's lease TTL and
# the request's idempotency record. Lease keys share the session's hash tag, so they live on
# its shard. Shared by the read script and by the commit script, which answers with it when it
# refuses a change decided on a state that is no longer the session's.
_VIEW_LUA = """
local function view(hash, timeline, idem, lease_prefix)
  local h = redis.call('HGETALL', hash)
  local stored = false
  if idem then stored = redis.call('GET', idem) end
  if #h == 0 then return {h, {}, {}, stored} end
  local recent = redis.call('LRANGE', timeline, 0, -1)
  local ttls = {}
  for i = 1, #h, 2 do
    if h[i] == 'participants' then
      for mad, _ in pairs(cjson.decode(h[i + 1])) do
        table.insert(ttls, mad)
        table.insert(ttls, redis.call('PTTL', lease_prefix .. mad))
      end
    end
  end
  return {h, recent, ttls, stored}
end
"""
# Reads a session in one round trip (also inside WATCH). KEYS: hash, timeline[, idempotency
# record]; ARGV[1]: the prefix of the session's lease keys.
_READ_SCRIPT = _VIEW_LUA + "return view(KEYS[1], KEYS[2], KEYS[3], ARGV[1])\n"
_READ_SHA = hashlib.sha1(_READ_SCRIPT.encode(), usedforsecurity=False).hexdigest()


async def _run_read_script(
    client: Any, keys: list[str], lease_prefix: str, *, batched: bool = False
) -> Any:
    return await _evalsha(client, _READ_SHA, _READ_SCRIPT, keys, lease_prefix, batched=batched)


async def _evalsha(
    client: Any, sha: str, script: str, keys: list[str], *args: Any, batched: bool = False
) -> Any:
    """EVALSHA: the script's digest travels, not its text. Redis forgets scripts on restart
    or SCRIPT FLUSH; then the one EVAL that answers NOSCRIPT sends it (and caches it again).
    Not redis-py's `register_script`: on a WATCHing pipeline it would make EXEC check the
    script first, one more round trip for every update. `batched`: sent with the other
    script calls of this event-loop turn to the same client (storage/script_batch.py)."""
    # `execute_command`: redis-py's Cluster pipeline refuses its own `evalsha` method, not the
    # command (the keys name the slot, which the WATCH already holds).
    words = (len(keys), *keys, *args)
    batch = batch_of(client) if batched else None
    try:
        if batch is not None:
            return await batch.call(("EVALSHA", sha, *words))
        return await client.execute_command("EVALSHA", sha, *words)
    except NoScriptError:  # nothing ran: the script was unknown
        return await client.execute_command("EVAL", script, *words)


# Runs the commands ARGV holds from index i on, in order, each as its length and words
# (storage/commands.py): the change a write script applies.
_RUN_LUA = """
local function run(i)
  while i <= #ARGV do
    local n = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + n))
    i = i + n + 1
  end
end
"""

# Commits a decided change: the compare-and-set that replaces WATCH ... MULTI/EXEC (one
# round trip, where WATCH, the read and MULTI/EXEC took three). The write applies only if the
# hash is the one the decision was made on: still there, the same `rev` (a stamp every write
# of the hash, its timeline or its lease keys sets anew: a commit, a create, a load, a rebase)
# and the same version; and only if the request's idempotency record is still absent. Then it
# runs the change's commands in order, atomically as a script runs, and answers 1. Refused, it
# answers what the read script would (`_VIEW_LUA`): the session as it is now, to decide on
# again without another read. It also refuses when a lease the decision saw as live is gone
# (run out, evicted, deleted: a lease key can go without a write of the hash). Every key the
# commands name carries the session's hash tag (its partition's), so they live in the slot of
# KEYS[1], as with MULTI.
# KEYS: hash, timeline[, idempotency record]. ARGV: the lease keys' prefix, rev as read ('' for
# none), version as read, the number of live leases and their MADs, then each command as its
# length and words.
COMMIT_MARK = "-- sessionmgr commit"  # the script's first line: what names it on the wire
_COMMIT_SCRIPT = (
    COMMIT_MARK
    + _VIEW_LUA
    + _RUN_LUA
    + """
local now = redis.call('HMGET', KEYS[1], 'rev', 'version')
local same = now[2] and (now[1] or '') == ARGV[2] and now[2] == ARGV[3]
  and not (KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1)
local leases = tonumber(ARGV[4])
for j = 5, 4 + leases do
  if not same then break end
  same = redis.call('EXISTS', ARGV[1] .. ARGV[j]) == 1
end
if not same then return view(KEYS[1], KEYS[2], KEYS[3], ARGV[1]) end
run(5 + leases)
return 1
"""
)
COMMIT_SHA = hashlib.sha1(_COMMIT_SCRIPT.encode(), usedforsecurity=False).hexdigest()

# Runs a create's commands as one script, in order, atomically as a script runs: what MULTI ...
# EXEC did, as one EVALSHA, so that it goes with the other script calls of its event-loop turn
# (storage/script_batch.py). Unconditional, as that MULTI was: the create's id is new (MongoDB's
# insert let it in first, DESIGN §2). KEYS: the session's hash (every key the commands name
# shares its slot). ARGV: each command as its length and words (storage/commands.py).
APPLY_MARK = "-- sessionmgr apply"  # the script's first line: what names it on the wire
_APPLY_SCRIPT = APPLY_MARK + _RUN_LUA + "run(1)\nreturn 1\n"
APPLY_SHA = hashlib.sha1(_APPLY_SCRIPT.encode(), usedforsecurity=False).hexdigest()
REV = "rev"  # the hash's write stamp: not a field of the record (`decode_record` skips it)


def _new_rev() -> bytes:
    return b"%016x" % unique_64()


def _stamped(record: SessionRecord, fields: frozenset[str] | None = None) -> dict[str, bytes]:
    """The record's `fields` (all of them by default) as hash fields, with a new `rev`: a
    decision that read the hash before this write is stale."""
    return {**encode_record(record, fields), REV: _new_rev()}


class _Seen(msgspec.Struct, kw_only=True):
    """A session to decide on: as a read (or a refused commit) found it (`fresh`), or as
    this replica's last commit of it left it. `view` None: not hot. `state`: the bytes behind
    `view`. `stored`: the request's idempotency record, when read."""

    view: HotView | None
    state: Remembered | None
    stored: bytes | None = None
    fresh: bool = True


def _seen_of(answer: list[Any], sent_at: float) -> _Seen:
    """The read script's answer (`_VIEW_LUA`): hash, recent events, lease TTLs, stored record.
    `sent_at`: when it was asked for (monotonic), from which the leases' deadlines count."""
    raw, recent, ttls, stored = answer
    if not raw:
        return _Seen(view=None, state=None, stored=stored)
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    live = {mad.decode(): ttl for mad, ttl in zip(ttls[::2], ttls[1::2], strict=True) if ttl > 0}
    rev = fields.pop(REV.encode(), b"")
    state = Remembered(
        fields=fields, recent=list(recent), rev=rev, deadlines=lease_deadlines(live, sent_at)
    )
    return _Seen(view=_view_of(state, live), state=state, stored=stored)


def _view_of(state: Remembered, lease_ttl_ms: dict[str, int]) -> HotView:
    return HotView(
        record=decode_record(state.fields),
        recent=lambda: [_decode_event(e) for e in state.recent],
        lease_ttl_ms=lease_ttl_ms,
    )


_decode_outbox = msgspec.json.Decoder(OutboxEntry).decode


def fence_key(session_id: str) -> str:
    """Held while the session is archived: no replica may load it into Redis meanwhile."""
    return keys.fence(session_id)


def hot_key(session_id: str) -> str:
    return keys.hot(session_id)


def timeline_key(session_id: str) -> str:
    return keys.timeline(session_id)


def lease_key(session_id: str, mad: str) -> str:
    return keys.lease(session_id, mad)


def idem_key(scope: str, idem: Idempotency) -> str:
    """A request's record: in the slot of the session it is about, or (a create's, which
    exists before its session does) in a slot of its own."""
    if scope == CREATE_SCOPE:
        return keys.create_idem(idem.key_digest)
    return keys.idem(scope, idem.key_digest)


def idem_index_key(session_id: str) -> str:
    return keys.idem_index(session_id)


def rebased_key(session_id: str) -> str:
    return keys.rebased(session_id)


def outbox_key(session_id: str) -> str:
    """The outbox stream of the session's partition."""
    return keys.outbox(keys.partition_of(session_id))


def idle_key(session_id: str) -> str:
    return keys.idle_index(keys.partition_of(session_id))


def _event_mark(event: TimelineEvent) -> str:
    digest = hashlib.sha256(_encode(event), usedforsecurity=False).hexdigest()[:16]
    return f"e{event.seq}:{digest}"


def _rebased(
    view: HotView,
    diverged: WriteDiverged,
    todo: list[TimelineEvent],
    backlog: Undelivered,
    keep: int,
) -> tuple[OutboxEntry, list[TimelineEvent]]:
    """The re-based record (above MongoDB), its moved events and the new recent timeline."""
    record = view.record
    version = max(record.version, diverged.floor_version) + 1
    base = max(record.timeline_seq, diverged.stored_seq)
    moved = [
        TimelineEvent(seq=base + i, at=e.at, actor=e.actor, kind=e.kind, data=e.data)
        for i, e in enumerate(todo, start=1)
    ]
    new = msgspec.structs.replace(
        record, version=version, timeline_seq=base + len(moved), write_id=new_write_id()
    )
    # The incoming `full_context` goes along only if nothing newer waits in the outbox (a
    # newer one lands, or is re-based, by itself).
    context = diverged.context
    if context is not None and backlog.context is not None:
        context = context if backlog.context.version <= context.version else None
    context = ContextUpdate(version=version, value=context.value) if context else None
    gone = {(e.seq, _encode(e)) for e in todo}
    recent = [e for e in view.recent if (e.seq, _encode(e)) not in gone] + moved
    recent = sorted(recent, key=lambda e: e.seq)[-keep:]
    return OutboxEntry(record=new, events=moved, context=context), recent


def caller_keys_key(caller: str) -> str:
    return keys.caller_keys(caller)


def gone_key(session_id: str) -> str:
    return keys.gone(session_id)


def encode_record(record: SessionRecord, fields: frozenset[str] | None = None) -> dict[str, bytes]:
    names = _RECORD_FIELDS if fields is None else [n for n in _RECORD_FIELDS if n in fields]
    return {name: _encode(getattr(record, name)) for name in names}


def decode_record(raw: dict[bytes, bytes]) -> SessionRecord:
    # A field added to the record later (`lease_grants`) is absent from older hashes: its
    # default stands in. A required field missing is a KeyError, never a silent default.
    values = {
        name.decode(): decoder.decode(raw[name])
        for name, decoder in _FIELD_DECODERS.items()
        if name in raw or name not in _DEFAULTED
    }
    return SessionRecord(**values)


class RedisHotStore:
    """`HotStore` on redis-py's asyncio client; internal retries are off on the write path."""

    def __init__(
        self,
        redis: Redis,
        *,
        recent_timeline: int = 20,
        lease_ttl_s: int = 30,
        idempotency_ttl_s: int = 86_400,
        deleted_ttl_s: int = 86_400,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 500,
        feed_maxlen: int = 1000,
        feed_retention_s: int = 3600,
        view_cache_mb: int = 8,
        decided: Callable[[str], None] | None = None,
        batch_scripts: bool = True,
    ) -> None:
        self._redis = redis
        self._batch = batch_scripts  # reads and commits: storage/script_batch.py
        self._views = HotViews(view_cache_mb << 20)
        self._turns = WriteTurns()  # this replica's writers of a session, one at a time
        # Told what each write decision was taken on: "memory", "read" or "refused_commit".
        self._decided = decided or _ignore
        self._nodes = nodes_of(redis)
        self._layout_checked = False
        self._feed = (feed_maxlen, feed_retention_s)
        self._wait = (wait_replicas, wait_timeout_ms)
        self._recent = recent_timeline
        self._lease_ms = lease_ttl_s * 1000
        self._idem_ttl = idempotency_ttl_s
        self._deleted_ttl = deleted_ttl_s

    async def _at(self, key: str) -> Redis:
        """The Redis (the Cluster node) that holds `key`; finding it may read the slot map,
        whose failures are Redis' like any other (`BackendUnavailable`)."""
        return await self._guard(self._nodes.of(key))  # type: ignore[no-any-return]

    async def ping(self) -> None:
        if isinstance(self._redis, SessionmgrCluster):  # the masters: replicas serve no one
            await self._guard(self._redis.ping(target_nodes=SessionmgrCluster.PRIMARIES))
        else:
            await self._guard(self._redis.ping())

    async def load(self, session_id: str) -> HotView | None:
        """One round trip: the hash, the recent timeline and every lease's remaining life."""
        view, _, _ = await self._read(await self._at(hot_key(session_id)), session_id, None)
        return view

    async def _read(
        self, client: Any, session_id: str, idem: Idempotency | None
    ) -> tuple[HotView | None, bytes | None, bytes]:
        """The session's view, the request's idempotency record and the hash's `rev`."""
        seen = await self._seen(client, session_id, idem)
        return seen.view, seen.stored, seen.state.rev if seen.state else b""

    async def _seen(self, client: Any, session_id: str, idem: Idempotency | None) -> _Seen:
        keys = self._view_keys(session_id, idem)
        sent_at = time.monotonic()
        answer = await self._guard(
            _run_read_script(client, keys, lease_key(session_id, ""), batched=self._batch)
        )
        return _seen_of(answer, sent_at)

    @staticmethod
    def _view_keys(session_id: str, idem: Idempotency | None) -> list[str]:
        keys = [hot_key(session_id), timeline_key(session_id)]
        if idem is not None:
            keys.append(idem_key(session_id, idem))
        return keys

    async def access_fields(self, session_id: str) -> tuple[str, list[str]] | None:
        key = hot_key(session_id)
        owner, acl = await self._guard((await self._at(key)).hmget(key, ["owner_id", "acl"]))
        if owner is None:
            return None
        return _decode_str(owner), _decode_acl(acl)

    async def _layout(self) -> None:
        """Before this store's first write: Redis holds this key layout (storage/keys.py).
        A replica checks it at start too, but one that started while Redis was unreachable
        must not write under another partition count once it answers."""
        if self._layout_checked:
            return
        try:
            await self._guard(keys.check_layout(self._redis))
        except keys.LayoutMismatch as exc:
            log.critical("refusing to write: %s", exc)
            raise BackendUnavailable("redis", str(exc), 30, retryable=False) from exc
        self._layout_checked = True

    async def _transaction(self, key: str) -> Pipeline:
        """A transaction on the Redis (the Cluster node) that holds `key`'s slot."""
        await self._layout()
        return (await self._at(key)).pipeline(transaction=True)

    async def _acknowledged(self, key: str) -> Pipeline:
        """A transaction whose EXEC counts as acknowledged: with `wait_replicas`, only once
        that many replicas hold it (Redis WAIT on the same connection, right after EXEC)."""
        await self._layout()
        client = await self._at(key)
        if not self._wait[0]:
            return client.pipeline(transaction=True)
        pipe = ReplicatedPipeline(client.connection_pool, client.response_callbacks, True, None)
        pipe.replication = self._wait
        return pipe

    @staticmethod
    def _touch(pipe: Any, session_id: str) -> None:
        """Note the session in its partition's idle index, in the script or MULTI that writes
        it (the index shares the session's slot): a session written is always indexed."""
        pipe.zadd(idle_key(session_id), {session_id: time.time()})

    async def create(self, record: SessionRecord, idem: Idempotency | None, result: bytes) -> None:
        """The hash and its indexes in one script (`_APPLY_SCRIPT`), then the create's answer
        for its key. The answer lives in a slot of its own (the key's), so it is written after
        the script: until it is, the key's claim says "in flight", and a retry once the claim
        is released or lapsed finds the session by its key-derived id and answers it
        (SessionService._finish_create)."""
        await self._layout()
        key = hot_key(record.id)
        client = await self._at(key)
        todo = Words([])  # the script's words; the script runs them as MULTI ... EXEC would
        todo.hset(key, mapping=_stamped(record))
        self._touch(todo, record.id)
        if idem is not None:  # deleting the session drops the record (`drop`)
            self._index_idem(todo, record.id, idem_key(CREATE_SCOPE, idem))
        await self._guard(
            self._run_script(client, APPLY_SHA, _APPLY_SCRIPT, [key], todo.words),
            outcome_unknown=True,
        )
        if idem is not None:
            try:
                await self.remember(CREATE_SCOPE, idem, result)
            except BackendUnavailable as exc:  # never write the hash again: not retryable
                raise BackendUnavailable(
                    "redis", "the session was stored, its answer was not", retryable=False
                ) from exc

    async def activate(self, session_id: str, load: Loader) -> SessionRecord | None:
        """Load a dormant session into Redis unless it is there already or was deleted.

        `load` reads MongoDB only once the WATCH is set and the hash is known to be absent: a
        suspend writes MongoDB before it deletes the hash, so whatever `load` reads then is
        the newest state, and any activation or suspend racing this one fires the WATCH.
        Returns the record loaded, or None when the session was (or became) hot meanwhile.
        """
        key, gone, fence = hot_key(session_id), gone_key(session_id), fence_key(session_id)
        self._views.drop(session_id)  # whatever is loaded has a `rev` of its own
        async with await self._transaction(key) as pipe:
            try:
                await self._guard(pipe.watch(key, gone, fence))
                # EXISTS as a bare command: a Cluster pipeline splits its `exists` by slot
                # and, while WATCHing, hands back an un-run coroutine instead of the answer.
                if await self._guard(pipe.execute_command("EXISTS", gone)):
                    raise SessionNotFound(session_id)
                if await self._guard(pipe.execute_command("EXISTS", fence)):
                    raise ArchiveInProgress(session_id)
                if await self._guard(pipe.execute_command("EXISTS", key)):
                    return None
                record, recent = await load()
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(key, mapping=_stamped(record))  # type: ignore[arg-type]
                self._touch(pipe, session_id)
                pipe.delete(timeline_key(session_id))
                if recent:
                    pipe.rpush(timeline_key(session_id), *[_encode(e) for e in recent])
                self._queue_feed(
                    pipe, session_id, [feed.entry(session_id, record.version, "resumed")]
                )
                pipe.persist(keys.feed(session_id))  # kept while hot; see `suspend`
                # Safe to run again: the WATCHed hash shows whether this one was applied.
                await self._guard(pipe.execute(), outcome_unknown=True, replayable=True)
            except WatchError:
                log.debug("session %s activated concurrently", session_id)
                return None
            return record

    async def transact(
        self,
        session_id: str,
        decide: Decide,
        idem: Idempotency | None,
        *,
        names_version: bool = False,
    ) -> Replayed | Change | None:
        """Run `decide` on the current state and write its change atomically, or raise.

        Returns None when the session is not hot, a `Replayed` answer for a repeated
        Idempotency-Key, or the `Change` that was committed. A concurrent writer between the
        read and the commit makes it run `decide` again on the new state: every decision
        re-checks the expected version, so a stale change is a `ConcurrencyConflict`, never
        applied. This replica's writers of one session take turns (`write_turns`), so they
        do not race each other; a commit beaten `_RACE_RETRIES` times in a row tries on,
        after a jittered pause and a read each time, until `_RACE_BUDGET_S` after the call
        (its wait for its turn included), then raises `WriteContended` (nothing written).
        A write that names a version (`names_version`) already passed is refused without
        waiting for its turn (`_refuse_early`).

        The state decided on is the one this replica's last commit of the session left
        (`hot_views`), else a read: one round trip instead of two. A commit refused answers
        with the session as it is now, which the next decision takes. A decision that
        refuses on a remembered state is run again on a read: refusals are only ever
        answered from what Redis holds.
        """
        await self._layout()
        client = await self._at(hot_key(session_id))
        started = time.monotonic()
        if names_version and self._turns.busy(session_id):
            await self._refuse_early(client, session_id, decide, idem)
        await self._take_turn(session_id, started)
        try:
            return await self._transact(client, session_id, decide, idem, started)
        finally:
            self._turns.leave(session_id)

    async def _take_turn(self, session_id: str, started: float, what: str = "write") -> None:
        """This replica's turn to write the session (`leave` it in a `finally`), or
        `WriteContended` (its time counted from `started`) after `_RACE_BUDGET_S` of waiting."""
        try:
            await self._turns.enter(session_id, _RACE_BUDGET_S)
        except TimeoutError:
            raise _contended(session_id, 0, started, what) from None

    async def _refuse_early(
        self, client: Any, session_id: str, decide: Decide, idem: Idempotency | None
    ) -> None:
        """Raise the refusal of a write that names a version already passed, without waiting
        for a turn: waiting only to be refused, its read would hold up the writes behind it.

        Only such a refusal: the writes queued ahead of this one can only raise the version,
        never bring it back, whereas anything else they might cure (a join's lease, a version
        ahead of the session's, an ACL) is left to the turn, which keeps the order writes came
        in. A read is asked only when the remembered state refuses the version named (a peek,
        not counted: memory may lag another replica's writes); a refusal is answered only from
        that read of Redis (counted as a decision on a read). A replay or a session not hot is
        left to the turn too."""
        seen = self._remembered(session_id)
        if seen is None or seen.view is None or _version_refusal(decide, seen.view) is None:
            return  # as remembered, the version it names is the session's: worth no read
        seen = await self._seen(client, session_id, idem)
        if seen.view is None or (idem is not None and replay_of(idem, seen.stored)):
            return
        refused = _version_refusal(decide, seen.view)
        if refused is not None and refused.behind:
            self._decided("read")
            raise refused  # as the turn would, on what Redis holds

    async def _transact(
        self,
        client: Any,
        session_id: str,
        decide: Decide,
        idem: Idempotency | None,
        started: float,
    ) -> Replayed | Change | None:
        on = "memory"  # what the decision is taken on, for `sessionmgr_hot_write_decisions`
        seen = self._remembered(session_id)
        if seen is None:
            seen, on = await self._seen(client, session_id, idem), "read"
        beaten = 0
        while True:
            if idem is not None and (replay := replay_of(idem, seen.stored)) is not None:
                return replay
            if seen.view is None:
                self._views.drop(session_id)
                return None
            self._decided(on)
            try:
                change = decide(seen.view)
            except Exception:
                if seen.fresh:
                    raise
                change = None
            if change is None:
                if seen.fresh:
                    return None
                seen, on = await self._seen(client, session_id, idem), "read"  # refused on memory
                continue
            outcome = await self._commit(client, session_id, seen, change, idem)
            if not isinstance(outcome, _Seen):
                self._views.put(session_id, outcome[1])
                return change
            seen, on = outcome, "refused_commit"  # the session as the commit found it
            beaten += 1
            if beaten >= _RACE_RETRIES:
                if time.monotonic() - started > _RACE_BUDGET_S:
                    self._views.drop(session_id)
                    raise _contended(session_id, beaten, started)
                # Out of step with the writers that keep winning, then decide on the session
                # as it is after the pause, not on what the refusal answered before it.
                await asyncio.sleep(_pause_after(beaten))
                seen, on = await self._seen(client, session_id, idem), "read"

    def view_memory(self) -> tuple[int, int]:
        """The view memory's size: (sessions, bytes)."""
        return len(self._views), self._views.bytes

    def _remembered(self, session_id: str) -> _Seen | None:
        """What this replica's last commit of the session left, decoded anew."""
        found = self._views.get(session_id)
        if found is None:
            return None
        state, lease_ttl_ms = found
        return _Seen(view=_view_of(state, lease_ttl_ms), state=state, fresh=False)

    async def _commit(
        self, client: Any, session_id: str, seen: _Seen, change: Change, idem: Idempotency | None
    ) -> tuple[Change, Remembered] | _Seen:
        """The commit script with `change`'s commands, guarded by what `seen` holds (its
        `rev`, version and live leases). Applied: the change and the session as it left it;
        refused: the session as it is now."""
        assert seen.view is not None
        assert seen.state is not None
        live = list(seen.view.lease_ttl_ms)
        words: list[Any] = [lease_key(session_id, ""), seen.state.rev, seen.view.record.version]
        words += [len(live), *live]
        # The change's commands, written down as the script's words and never sent as such:
        # the commit script runs them once its check passes.
        todo = Words(words)
        written, encoded_events = self._queue_change(todo, session_id, change)
        self._touch(todo, session_id)
        self._queue_feed(todo, session_id, feed.change_entries(seen.view.record, change))
        keys = self._view_keys(session_id, idem)
        if idem is not None:
            kept = change.result if change.stored is None else change.stored
            todo.set(keys[2], idem_value(idem, kept), ex=self._idem_ttl)
            self._index_idem(todo, session_id, keys[2])
        sent_at = time.monotonic()
        try:
            # With an idempotency record in the commit a re-run finds the first answer.
            answer = await self._guard(
                self._run_commit(client, keys, words),
                outcome_unknown=True,
                replayable=idem is not None,
            )
        except BaseException:
            self._views.drop(session_id)  # applied or not: unknown
            raise
        if answer != 1:
            return _seen_of(answer, sent_at)
        holder = change.record if "participants" in written else seen.view.record
        return change, after_commit(
            seen.state,
            fields={name: value for name, value in written.items() if name != REV},
            events=encoded_events,
            participants=set(holder.participants),
            leases_set=change.leases_set,
            leases_dropped=change.leases_dropped,
            rev=written[REV],
            sent_at=sent_at,
            lease_s=self._lease_ms / 1000,
            recent=self._recent,
        )

    async def _run_commit(self, client: Any, keys: list[str], words: list[Any]) -> Any:
        return await self._run_script(client, COMMIT_SHA, _COMMIT_SCRIPT, keys, words)

    async def _run_script(
        self, client: Any, sha: str, text: str, keys: list[str], words: list[Any]
    ) -> Any:
        """EVALSHA of a write script (EVAL once Redis has forgotten it), and with
        `wait_replicas` the WAIT after it on the same connection: acknowledged only once that
        many replicas hold it. Without WAIT, one command: no pipeline to build and parse."""
        if not self._wait[0]:
            return await _evalsha(client, sha, text, keys, *words, batched=self._batch)
        script: tuple[Any, ...] = ("EVALSHA", sha)
        for _ in range(2):
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*script, len(keys), *keys, *words)
                pipe.execute_command("WAIT", *self._wait)
                answers = await pipe.execute(raise_on_error=False)
            if isinstance(answers[0], NoScriptError):
                script = ("EVAL", text)  # nothing ran: the script was unknown
                continue
            if isinstance(answers[0], Exception):
                raise answers[0]
            if answers[0] == 1:
                _check_replicas(int(answers[1]), *self._wait)
            return answers[0]
        raise AssertionError("unreachable: EVAL does not answer NOSCRIPT")

    def _queue_feed(self, pipe: Any, session_id: str, entries: list[dict[str, bytes]]) -> None:
        feed.queue(pipe, session_id, entries, self._feed[0])

    async def note(self, session_id: str, version: int, kind: str) -> None:
        """A feed entry for a change committed outside Redis (`archived`: MongoDB holds it)."""
        async with await self._transaction(keys.feed(session_id)) as pipe:
            self._queue_feed(pipe, session_id, [feed.entry(session_id, version, kind)])
            pipe.expire(keys.feed(session_id), self._feed[1])
            await self._guard(pipe.execute())

    def _queue_change(
        self, pipe: Any, session_id: str, change: Change
    ) -> tuple[dict[str, bytes], list[bytes]]:
        """Queue `change`'s commands; what they write to the hash (always a new `rev`, so a
        view of the session decided on before is stale) and the events, encoded."""
        if "version" in change.fields:  # a new version: a write of its own, named
            change.record.write_id = new_write_id()
            change.fields = change.fields | {"write_id"}
        written = _stamped(change.record, change.fields)
        pipe.hset(hot_key(session_id), mapping=written)
        events = [_encode(e) for e in change.events]
        if events:
            tl = timeline_key(session_id)
            pipe.rpush(tl, *events)
            pipe.ltrim(tl, -self._recent, -1)
        for mad in change.leases_set:
            pipe.set(lease_key(session_id, mad), b"1", px=self._lease_ms)
        for mad in change.leases_dropped:
            pipe.delete(lease_key(session_id, mad))
        if not change.hot_only and (change.fields or change.events or change.context):
            entry = OutboxEntry(record=change.record, events=change.events, context=change.context)
            pipe.xadd(outbox_key(session_id), {"sid": session_id, "entry": _encode(entry)})
        return written, events

    async def rebase(self, diverged: WriteDiverged) -> str:
        """Move the hot session above what MongoDB holds after Redis lost writes it had.

        The session's version goes past MongoDB's, and the incoming events whose seqs MongoDB
        holds for other events get new seqs past every seq either side handed out; one outbox
        entry carries the whole record and the moved events. Each event (and a clashing
        version) is moved once, whoever meets it first (the write-behind or a suspend):
        markers in the session's slot say what was moved. Returns REBASED, DONE (nothing left
        to move) or AT_REST (the session left Redis; the write is kept in MongoDB's conflicts).
        """
        sid = diverged.session_id
        started = time.monotonic()
        # A writer like the others (Redis only): this replica's writes wait for it.
        await self._take_turn(sid, started, "re-base")
        try:
            return await self._rebase(diverged, started)
        finally:
            self._turns.leave(sid)
            self._views.drop(sid)  # re-based: a new `rev`, other seqs

    async def _rebase(self, diverged: WriteDiverged, started: float) -> str:
        sid = diverged.session_id
        key, tl, moved_key = hot_key(sid), timeline_key(sid), rebased_key(sid)
        marks = [_event_mark(e) for e in diverged.events]
        version_mark = f"v{diverged.record.version}:{diverged.record.write_id}"
        for _ in range(_RACE_RETRIES):
            async with await self._acknowledged(key) as pipe:
                try:
                    await self._guard(pipe.watch(key, tl, moved_key))
                    done = await self._guard(pipe.hmget(moved_key, [version_mark, *marks]))
                    todo = [
                        e for e, seen in zip(diverged.events, done[1:], strict=True) if not seen
                    ]
                    bump = diverged.version_clash and not done[0]
                    if not todo and not bump:
                        return DONE
                    view, _, _ = await self._read(pipe, sid, None)
                    if view is None:
                        return AT_REST
                    backlog = await self.undelivered(sid, pipe)
                    entry, recent = _rebased(view, diverged, todo, backlog, self._recent)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, mapping=_stamped(entry.record))  # type: ignore[arg-type]
                    pipe.delete(tl)
                    if recent:
                        pipe.rpush(tl, *[_encode(e) for e in recent])
                    pipe.xadd(outbox_key(sid), {"sid": sid, "entry": _encode(entry)})
                    # Versions and seqs moved: a subscriber must read the session again.
                    rebased = feed.entry(sid, entry.record.version, "reset", reason="rebased")
                    self._queue_feed(pipe, sid, [rebased])
                    pipe.hset(moved_key, mapping=dict.fromkeys([version_mark, *marks], b"1"))
                    pipe.expire(moved_key, self._idem_ttl * 7)
                    await self._guard(pipe.execute(), outcome_unknown=True, replayable=True)
                except WatchError:
                    continue
                return REBASED
        # Other replicas' writes beat every try: nothing moved; whoever meets the write
        # again (the write-behind keeps its entry pending) re-bases it then.
        raise _contended(sid, _RACE_RETRIES, started, "re-base")

    async def claim(self, scope: str, idem: Idempotency) -> Replayed | None:
        """Take the key for a request outside the transaction (create, suspend, resume, delete).

        Returns the first answer when the key was used before; raises `IdempotencyKeyInFlight`
        while another request with it is running. The claim lapses after `CLAIM_TTL_S`.
        """
        key = idem_key(scope, idem)
        async with await self._transaction(key) as pipe:
            pipe.set(key, pending_value(idem), nx=True, ex=CLAIM_TTL_S)
            self._index_idem(pipe, scope, key)
            # Not replayable: a re-run would find its own claim and call it in flight.
            claimed = (await self._guard(pipe.execute(), outcome_unknown=True))[0]
        if claimed:
            return None
        return replay_of(idem, await self._guard((await self._at(key)).get(key)))

    async def replay(self, scope: str, idem: Idempotency) -> Replayed | None:
        """The first answer for this key, if there is one; writes nothing."""
        key = idem_key(scope, idem)
        return replay_of(idem, await self._guard((await self._at(key)).get(key)))

    async def release(self, scope: str, idem: Idempotency) -> None:
        """Give this attempt's claim back after a failure; never an answer stored meanwhile,
        never the claim of a newer attempt with the same key."""
        pending, key = pending_value(idem), idem_key(scope, idem)
        await self._guard((await self._at(key)).eval(_RELEASE_SCRIPT, 1, key, pending))

    async def admit_key(self, idem: Idempotency, cap: int) -> None:
        """Count a new key against its caller's live keys; `TooManyIdempotencyKeys` past `cap`.

        One sorted set per caller, scored by expiry: a key counts until its records would
        have expired, so a caller cannot hold more than `cap` records at once.
        """
        now, key = time.time(), caller_keys_key(idem.caller)
        admitted = await self._guard(
            (await self._at(key)).eval(
                _ADMIT_KEY_SCRIPT,
                1,
                key,
                now,
                idem.key_digest,
                cap,
                now + self._idem_ttl,
                self._idem_ttl,
            )
        )
        if not admitted:
            raise TooManyIdempotencyKeys(cap, self._idem_ttl)

    async def remember(self, scope: str, idem: Idempotency, result: bytes) -> None:
        key = idem_key(scope, idem)
        async with await self._transaction(key) as pipe:
            pipe.set(key, idem_value(idem, result), ex=self._idem_ttl)
            self._index_idem(pipe, scope, key)
            await self._guard(pipe.execute())

    def _index_idem(self, pipe: Any, scope: str, key: str) -> None:
        """Note a session's idempotency records, so that deleting the session deletes them."""
        if scope != CREATE_SCOPE:
            # Scored by expiry, trimmed as it grows: a busy session's index stays small.
            now = time.time()
            pipe.zadd(idem_index_key(scope), {key: now + self._idem_ttl})
            pipe.zremrangebyscore(idem_index_key(scope), "-inf", now)
            pipe.expire(idem_index_key(scope), self._idem_ttl)

    async def suspend(
        self,
        session_id: str,
        flush: Flush,
        check: RecordCheck | None = None,
    ) -> SessionRecord | None:
        """Flush the session to MongoDB, then drop its hot keys; start again if it changed.

        The flush carries what the outbox still holds for the session too, so MongoDB is
        complete the moment the session is dormant, however far the write-behind lags.
        `check` (an If-Match) sees the record read under the WATCH and may refuse it.
        """
        try:
            # Not in the session's turn: its writes must not wait on MongoDB's flush (through
            # a slow MongoDB they would answer contended), so a write may beat it.
            return await self._suspend(session_id, flush, check)
        finally:  # dormant or not, what a write of this replica remembered is forgotten
            self._views.drop(session_id)

    async def _suspend(
        self, session_id: str, flush: Flush, check: RecordCheck | None
    ) -> SessionRecord | None:
        key, tl = hot_key(session_id), timeline_key(session_id)
        started = time.monotonic()
        for _ in range(_RACE_RETRIES):
            async with await self._transaction(key) as pipe:
                await self._guard(pipe.watch(key, tl))
                view, _, _ = await self._read(pipe, session_id, None)
                if view is None:
                    return None
                record = view.record
                if check is not None:
                    check(record)
                record.state = SessionState.DORMANT
                # First what Redis holds (this fails fast while MongoDB is down), then the
                # backlog, read on this same connection: a second one could starve the pool.
                try:
                    await flush(record, view.recent, None)
                    backlog = await self.undelivered(session_id, pipe)
                    if backlog.events or backlog.context:
                        await flush(record, backlog.events, backlog.context)
                except SessionRebased:
                    continue  # Redis had lost writes; the session moved above MongoDB
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.delete(key, tl, *[lease_key(session_id, m) for m in record.participants])
                pipe.zrem(idle_key(session_id), session_id)
                # The feed outlives the hot keys for a while: a subscriber reads `suspended`
                # (and `resumed` when it comes back); once it expires, a resume gets `reset`.
                self._queue_feed(
                    pipe, session_id, [feed.entry(session_id, record.version, "suspended")]
                )
                pipe.expire(keys.feed(session_id), self._feed[1])
                try:
                    await self._guard(pipe.execute(), outcome_unknown=True, replayable=True)
                except WatchError:
                    continue
                return record
        # Writes beat every try: the session is in use. It stays active: the last flush
        # wrote what Redis held then (marked dormant), which the next versioned write behind
        # it replaces.
        raise _contended(session_id, _RACE_RETRIES, started, "suspend")

    async def undelivered(self, session_id: str, client: Any = None) -> Undelivered:
        """What the outbox holds for this session: its events and newest `full_context`.

        The outbox holds only undelivered entries (the worker deletes what it delivered), so
        this is one XLEN while the write-behind keeps up, and a scan of its backlog otherwise.
        """
        stream = outbox_key(session_id)
        client = client or await self._at(stream)
        events: list[TimelineEvent] = []
        context: ContextUpdate | None = None
        backlog = await self._guard(client.xlen(stream))
        if not backlog:
            return Undelivered(events=events, context=context)
        if backlog > SCAN_LIMIT:
            # MongoDB is down or far behind: a clear 503 beats a scan that takes seconds.
            raise BackendUnavailable(
                "mongodb", f"the write-behind is {backlog} entries behind", 5, retryable=False
            )
        start = "-"
        sid = session_id.encode()
        while True:
            batch = await self._guard(client.xrange(stream, min=start, max="+", count=_SCAN_BATCH))
            for _, fields in batch:
                if fields.get(b"sid") != sid:
                    continue
                entry = _decode_outbox(fields[b"entry"])
                events += entry.events
                if entry.context and (context is None or entry.context.version > context.version):
                    context = entry.context
            if len(batch) < _SCAN_BATCH:
                return Undelivered(events=events, context=context)
            start = "(" + batch[-1][0].decode()

    async def parked(self, session_id: str) -> int:
        """How many of this session's writes sit on the dead-letter stream (usually empty)."""
        dead = keys.dead_letters(keys.partition_of(session_id))
        client = await self._at(dead)
        if not await self._guard(client.xlen(dead)):
            return 0
        sid, count, start = session_id.encode(), 0, "-"
        while True:
            batch = await self._guard(client.xrange(dead, min=start, max="+", count=_SCAN_BATCH))
            count += sum(1 for _, fields in batch if fields.get(b"sid") == sid)
            if len(batch) < _SCAN_BATCH:
                return count
            start = "(" + batch[-1][0].decode()

    async def is_deleted(self, session_id: str) -> bool:
        key = gone_key(session_id)
        return bool(await self._guard((await self._at(key)).exists(key)))

    async def mark_deleted(self, session_id: str) -> None:
        """The tombstone, and the feed's `deleted` entry in the same MULTI."""
        self._views.drop(session_id)  # no copy of a deleted session's data stays here
        version = await self._current_version(session_id) or await self._fed_version(session_id)
        async with await self._transaction(gone_key(session_id)) as pipe:
            pipe.set(gone_key(session_id), b"1", ex=self._deleted_ttl)
            # No copy of the session's data outlives it: the feed keeps only `deleted` (a
            # resume from before it gets `reset`, then sees the session is gone).
            pipe.delete(keys.feed(session_id))
            self._queue_feed(pipe, session_id, [feed.entry(session_id, version, "deleted")])
            pipe.expire(keys.feed(session_id), self._feed[1])
            await self._guard(pipe.execute())

    async def _fed_version(self, session_id: str) -> int:
        """The version the feed's newest entry named (0 when it has none)."""
        key = keys.feed(session_id)
        last = await self._guard((await self._at(key)).xrevrange(key, count=1))
        return int(msgspec.json.decode(last[0][1][b"d"])["version"]) if last else 0

    async def drop(self, session_id: str) -> None:
        """Delete every key of the session but its tombstone: data, leases, idempotency records."""
        try:
            await self._drop(session_id)
        finally:  # dropped or not, and whatever a write put back meanwhile: forgotten
            self._views.drop(session_id)

    async def _drop(self, session_id: str) -> None:
        node = await self._at(hot_key(session_id))
        async with node.pipeline(transaction=False) as pipe:
            pipe.hget(hot_key(session_id), "participants")
            pipe.zrange(idem_index_key(session_id), 0, -1)
            participants, idem_keys = await self._guard(pipe.execute())
        mads = list(_decode_participants(participants)) if participants else []
        # The records first (a keyed create's lives in its key's slot: one DEL each), then
        # the session's keys in one MULTI; a failure in between leaves only expiring records.
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in idem_keys:
                pipe.delete(key)
            await self._guard(pipe.execute())
        async with node.pipeline(transaction=True) as pipe:
            pipe.delete(
                hot_key(session_id),
                timeline_key(session_id),
                idem_index_key(session_id),
                *[lease_key(session_id, m) for m in mads],
            )
            pipe.zrem(idle_key(session_id), session_id)
            await self._guard(pipe.execute())

    async def fence(self, session_id: str, ttl_s: int) -> str | None:
        """Take the archive fence of a session that is not hot; None when it is hot.

        Raises `ArchiveInProgress` while another archive holds it. An activation watches the
        fence, so once this returns a token no replica can load the session until `unfence`
        (or the TTL, which bounds a crashed archiver's hold).
        """
        token = secrets.token_hex(16)
        try:
            async with await self._transaction(hot_key(session_id)) as pipe:
                # One script: a hot session is never fenced, so there is nothing to give back
                # (a failed give-back would hold the session for the fence's whole TTL).
                pipe.execute_command(
                    "EVAL",
                    _FENCE_SCRIPT,
                    2,
                    fence_key(session_id),
                    hot_key(session_id),
                    token,
                    ttl_s,
                )
                (outcome,) = await self._guard(pipe.execute(), outcome_unknown=True)
        except BackendUnavailable:
            # The SET may have been applied with its reply lost: a retry would find this very
            # fence and take it for another archiver's. Release it if it is ours (best effort;
            # the TTL bounds it otherwise) and let the caller run the archive again.
            with contextlib.suppress(BackendUnavailable):
                await self.unfence(session_id, token)
            raise
        if outcome == _FENCE_HOT:
            return None
        if outcome != _FENCE_TAKEN:
            raise ArchiveInProgress(session_id)
        return token

    async def unfence(self, session_id: str, token: str) -> None:
        key = fence_key(session_id)
        await self._guard((await self._at(key)).eval(_RELEASE_SCRIPT, 1, key, token))

    async def _current_version(self, session_id: str) -> int | None:
        key = hot_key(session_id)
        raw = await self._guard((await self._at(key)).hget(key, "version"))
        return int(raw) if raw is not None else None

    @staticmethod
    async def _guard(
        awaitable: Awaitable[Any], *, outcome_unknown: bool = False, replayable: bool = False
    ) -> Any:
        """Turn a connection failure into `BackendUnavailable`; a WatchError passes through.

        A write whose reply was lost may have been applied: it is `retryable` only when
        running it again cannot apply it twice (`replayable`).
        """
        try:
            return await awaitable
        except WatchError as exc:
            # redis-py reports a connection lost while WATCHing as a WatchError: that is no
            # concurrent writer, and re-deciding after a lost EXEC reply could apply it twice.
            # Nor is a slot that moved to another Cluster node (resharding, failover).
            lost = exc.__context__
            if isinstance(lost, _REDIRECTS):
                raise _moved(lost) from lost
            if not isinstance(lost, _CONNECTION_ERRORS):
                raise
            ClusterNodes.moved()  # a node gone: its slots may have a new master
            raise _unavailable(outcome_unknown, replayable) from lost
        except _REDIRECTS as exc:
            raise _moved(exc) from exc
        except _CONNECTION_ERRORS as exc:
            ClusterNodes.moved()
            raise _unavailable(outcome_unknown, replayable) from exc


# Unreachable, or reachable but unable to serve writes for now (a replica after a Sentinel
# failover answers READONLY; MASTERDOWN, TRYAGAIN, CLUSTERDOWN while a master is elected).
_CONNECTION_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    ExecAbortError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
    # redis-py's Cluster client: no node of the Cluster answered at all
    RedisClusterException,
)


# A Cluster node answered MOVED or ASK: the command was not run there, so whatever it was
# (a MULTI aborts as a whole) may run again once the client knows the slot's new node.
_REDIRECTS = (MovedError, AskError)


def _moved(redirect: Exception) -> BackendUnavailable:
    if isinstance(redirect, MovedError):  # an ASK is a migration under way: the map holds
        ClusterNodes.moved()  # every slot map is read again before its next use
    return BackendUnavailable(
        "redis", "the session's slot is moving between cluster nodes", 1, retryable=True
    )


def _unavailable(outcome_unknown: bool, replayable: bool) -> BackendUnavailable:
    detail = "the outcome of the write is unknown" if outcome_unknown else "not reachable"
    return BackendUnavailable("redis", detail, retryable=replayable or not outcome_unknown)


def idem_value(idem: Idempotency, result: bytes) -> bytes:
    return idem.fingerprint.encode() + b"\n" + result


def pending_value(idem: Idempotency) -> bytes:
    """A claim: the fingerprint, then PENDING and the attempt that holds it."""
    return idem_value(idem, PENDING + b":" + idem.attempt.encode())


def replay_of(idem: Idempotency, stored: bytes | None) -> Replayed | None:
    if stored is None:
        return None
    fingerprint, _, result = stored.partition(b"\n")
    if fingerprint.decode() != idem.fingerprint:
        raise IdempotencyKeyReused()
    if result.startswith(PENDING):
        raise IdempotencyKeyInFlight()
    return Replayed(result=result)


class ReplicatedPipeline(Pipeline):
    """A MULTI/EXEC followed, on the same connection, by `WAIT replicas timeout`: Redis then
    says how many replicas hold everything this connection wrote. Fewer than asked is not an
    acknowledgement: the write is applied on the master, but a failover now could take it."""

    replication: tuple[int, int] = (0, 0)  # (replicas, timeout in ms)

    async def _execute_transaction(
        self, connection: Any, commands: Any, raise_on_error: Any
    ) -> Any:
        result = await super()._execute_transaction(connection, commands, raise_on_error)
        replicas, timeout_ms = self.replication
        await connection.send_command("WAIT", replicas, timeout_ms)
        _check_replicas(int(await connection.read_response()), replicas, timeout_ms)
        return result


def _check_replicas(acked: int, replicas: int, timeout_ms: int) -> None:
    if acked < replicas:
        raise BackendUnavailable(
            "redis",
            f"the write reached {acked} of the {replicas} replicas asked for within "
            f"{timeout_ms} ms (SESSIONMGR_REDIS_WAIT_REPLICAS): its outcome is unknown",
            retryable=False,
        )


def redis_client(settings: Settings, *, socket_timeout_s: float | None = None) -> Redis:
    """A client with short timeouts and no hidden retries: an unknown outcome must surface."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s or settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 10,
    }
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file
    keys.configure(settings.redis_partitions)
    if settings.redis_cluster:
        # Not a `Redis`, but it answers every command sessionmgr sends one outside a
        # session's transaction (and those run on `ClusterNodes`' per-node clients).
        return cast(Redis, cluster_client(settings, options))
    # A full pool makes a request wait briefly for a connection instead of failing at once.
    pool_timeout = max(1.0, settings.redis_socket_timeout_s * 4)
    if settings.redis_sentinels:
        return sentinel_client(settings, options, pool_timeout)
    pool = BoundedPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=pool_timeout,
        **options,
    )
    return Redis(connection_pool=pool)


def cluster_client(settings: Settings, options: dict[str, Any]) -> SessionmgrCluster:
    """redis-py's Cluster client on the node `redis_url` names (it finds the others), with a
    plain client per master for each session's transactions (storage/redis_nodes.py).

    No hidden retries here either: a connection lost is `BackendUnavailable` as with one
    Redis, and a MOVED or ASK (the slot moved) is a 503 the caller may retry at once, after
    which the slot map is read again.
    """
    # Credentials, database and TLS as the URL gives them; each node's own host and port.
    from_url = {k: v for k, v in parse_url(settings.redis_url).items() if k not in ("host", "port")}
    node_options = {
        **from_url,
        **options,
        "max_connections": settings.redis_pool_size,
        "pool_timeout": max(1.0, settings.redis_socket_timeout_s * 4),
    }
    cluster_options = {
        k: v for k, v in options.items() if k not in ("health_check_interval", "retry_on_timeout")
    }
    client = SessionmgrCluster.from_url(
        settings.redis_url,
        node_options=node_options,
        max_connections=settings.redis_pool_size,
        require_full_coverage=False,
        **cluster_options,
    )
    return cast(SessionmgrCluster, client)
