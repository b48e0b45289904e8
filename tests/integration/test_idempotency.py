"""Idempotency-Key: a repeated request gets the first answer, even when that answer was lost.

A lost reply is simulated in the client: the write (a MULTI/EXEC through redis-py's pipeline,
or a write script, an update's commit or a create's apply, through
`RedisHotStore._run_script`) runs on the real
redis-server, then the caller sees `ConnectionError`, as it would if
the connection dropped after Redis executed it and before its reply arrived. The outcome is
then unknown to the service; its own retries (stamina, `SESSIONMGR_RETRY_ATTEMPTS`, 3 in
tests) re-run the transaction, which finds the idempotency record and answers as the first
run would have. Without a key the outcome stays unknown: 503, not retried, applied at most once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.storage.hot import (
    OUTBOX_STREAM,
    OutboxEntry,
    RedisHotStore,
    timeline_key,
)
from tests.integration.session_api import create_session, get_session, hot_record
from tests.support.faults import is_commit, script_commands

Headers = dict[str, str]
Sent = list[tuple[Any, ...]]  # the commands of one round trip, each as its words
SentTest = Callable[[Sent], bool]
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


class LostReplies:
    """Makes the next `times` matching transactions run on Redis and then lose their reply."""

    def __init__(self) -> None:
        self.armed = 0
        self.dropped = 0
        self.matches: SentTest = lambda _sent: False

    def arm(self, matches: SentTest, times: int = 1) -> None:
        self.matches, self.armed = matches, times

    def lose(self, sent: Sent) -> bool:
        """Whether to lose the reply to `sent` (decided before it goes)."""
        return self.armed > 0 and self.matches(sent)

    def lost(self) -> None:
        self.armed -= 1
        self.dropped += 1
        raise RedisConnectionError("Connection closed by server.")


def commands(sent: Sent) -> Sent:
    """The commands, with a write script's own commands in its place."""
    found: Sent = []
    for args in sent:
        carried = script_commands(args)
        found += [args] if carried is None else carried
    return found


def writes_outbox(sent: Sent) -> bool:
    """The commit of an update: the commit script, whose commands XADD to session_outbox."""
    return any(is_commit(args) for args in sent) and any(
        a[0] == "XADD" and a[1] == OUTBOX_STREAM for a in commands(sent)
    )


def creates_session(sent: Sent) -> bool:
    """The write of a keyed create: HSET of a new hot hash, noting its create record
    in the session's index of records (the record itself follows, in the key's slot)."""
    names = [(a[0], str(a[1])) for a in commands(sent)]
    return any(c == "HSET" and k.startswith("session_hot:") for c, k in names) and any(
        c == "ZADD" and k.startswith("session_idem_keys:") for c, k in names
    )


@pytest.fixture
def lost_replies(monkeypatch: pytest.MonkeyPatch) -> LostReplies:
    lost = LostReplies()
    real_execute, real_script = Pipeline.execute, RedisHotStore._run_script

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        # Decided before execute() resets the stack.
        drop = lost.lose([args for args, _options in self.command_stack])
        result: list[Any] = await real_execute(self, raise_on_error)
        if drop:
            lost.lost()
        return result

    async def run_script(
        self: RedisHotStore, client: Any, sha: str, text: str, keys: list[str], words: Sent
    ) -> Any:
        drop = lost.lose([("EVALSHA", sha, len(keys), *keys, *words)])
        result = await real_script(self, client, sha, text, keys, words)
        if drop:
            lost.lost()
        return result

    monkeypatch.setattr(RedisHotStore, "_run_script", run_script)

    monkeypatch.setattr(Pipeline, "execute", execute)
    return lost


def assert_redis_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) >= 1
    problem = response.json()
    assert problem["status"] == 503
    assert problem["backend"] == "redis"
    assert "Traceback" not in response.text


async def outbox_versions(api_redis: Any, session_id: str) -> list[int]:
    entries = [_decode_entry(f[b"entry"]) for _id, f in await api_redis.xrange(OUTBOX_STREAM)]
    return [e.record.version for e in entries if e.record.id == session_id]


async def test_a_lost_update_reply_is_answered_by_the_retry_with_the_same_key(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Any,
    lost_replies: LostReplies,
) -> None:
    owner = auth()
    sid = (await create_session(manual_api, owner, work_in_progress={"n": 0}))["id"]
    body = {"expected_version": 1, "patch": {"work_in_progress": {"n": 1}}}
    keyed = {**owner, "Idempotency-Key": "patch-once-1"}
    lost_replies.arm(writes_outbox)

    retry = await manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=keyed)

    assert lost_replies.dropped == 1, "the service's retry replayed without a second commit"
    assert retry.status_code == 200, retry.text
    assert retry.json()["version"] == 2
    assert retry.json()["work_in_progress"] == {"n": 1}
    assert retry.headers["etag"] == '"2"'
    again = await manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=keyed)
    assert again.status_code == 200, again.text
    assert again.json() == retry.json()

    session = await get_session(manual_api, owner, sid)
    assert session["version"] == 2
    assert await outbox_versions(manual_redis, sid) == [2], "the patch was applied twice"

    unkeyed = await manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=owner)
    assert unkeyed.status_code == 409, unkeyed.text
    assert unkeyed.json()["current_version"] == 2

    other_body = {"expected_version": 2, "patch": {"work_in_progress": {"n": 5}}}
    reused = await manual_api.patch(f"/v1/sessions/{sid}", json=other_body, headers=keyed)
    assert reused.status_code == 422, reused.text
    assert (await get_session(manual_api, owner, sid))["version"] == 2


async def test_a_lost_reply_without_a_key_is_a_503_and_applied_once(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Any,
    lost_replies: LostReplies,
) -> None:
    owner = auth()
    sid = (await create_session(manual_api, owner))["id"]
    lost_replies.arm(writes_outbox)

    first = await manual_api.post(
        f"/v1/sessions/{sid}/timeline", json={"events": [{"kind": "a"}]}, headers=owner
    )

    assert_redis_unavailable(first)
    assert "outcome of the write is unknown" in first.json()["detail"]
    assert lost_replies.dropped == 1, "an unknown outcome without a key is never retried"
    record = await hot_record(manual_redis, sid)
    assert record is not None
    assert record.version == 2, "the commit did run on Redis, once"
    assert await manual_redis.llen(timeline_key(sid)) == 1


async def test_a_lost_append_reply_is_answered_by_the_retry_with_the_same_key(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Any,
    lost_replies: LostReplies,
) -> None:
    owner = auth()
    sid = (await create_session(manual_api, owner))["id"]
    body = {"events": [{"kind": "a", "data": {"i": 1}}, {"kind": "b"}], "expected_version": 1}
    keyed = {**owner, "Idempotency-Key": "append-once-1"}
    lost_replies.arm(writes_outbox)

    first = await manual_api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=keyed)

    assert lost_replies.dropped == 1
    assert first.status_code == 200, "the service's own retry found the first answer"
    assert first.json() == {"version": 2, "appended": 2, "first_seq": 1, "last_seq": 2}
    retry = await manual_api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=keyed)
    assert retry.status_code == 200, retry.text
    assert retry.json() == {"version": 2, "appended": 2, "first_seq": 1, "last_seq": 2}

    session = await get_session(manual_api, owner, sid, full=True)
    assert session["version"] == 2
    assert [e["seq"] for e in session["recent_timeline"]] == [1, 2]
    assert [e["seq"] for e in session["full_timeline"]] == [1, 2]
    assert [e["kind"] for e in session["full_timeline"]] == ["a", "b"]
    assert await manual_redis.llen(timeline_key(sid)) == 2
    assert await outbox_versions(manual_redis, sid) == [2]

    unkeyed = await manual_api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=owner)
    assert unkeyed.status_code == 409, unkeyed.text
    assert unkeyed.json()["current_version"] == 2
    assert await manual_redis.llen(timeline_key(sid)) == 2


async def test_a_lost_create_reply_is_answered_by_the_retry_with_the_same_key(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers], lost_replies: LostReplies
) -> None:
    keyed = {**auth(), "Idempotency-Key": "create-once-1"}
    body = {"work_in_progress": {"goal": "one session"}}
    lost_replies.arm(creates_session)

    first = await manual_api.post("/v1/sessions", json=body, headers=keyed)

    assert lost_replies.dropped == 1
    assert_redis_unavailable(first)
    retry = await manual_api.post("/v1/sessions", json=body, headers=keyed)
    assert retry.status_code == 201, retry.text
    listed = (await manual_api.get("/v1/sessions", headers=auth())).json()["items"]
    assert [s["id"] for s in listed] == [retry.json()["id"]]


async def test_create_with_the_same_key_twice_makes_one_session(
    api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    keyed = {**auth(), "Idempotency-Key": "create-1"}
    body = {"work_in_progress": {"goal": "ship"}}

    first = await api.post("/v1/sessions", json=body, headers=keyed)
    second = await api.post("/v1/sessions", json=body, headers=keyed)

    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    listed = (await api.get("/v1/sessions", headers=auth())).json()["items"]
    assert [s["id"] for s in listed] == [first.json()["id"]]

    other = await api.post("/v1/sessions", json={"work_in_progress": {}}, headers=keyed)
    assert other.status_code == 422, other.text
    bob = await api.post("/v1/sessions", json=body, headers=auth("bob", **keyed_only(keyed)))
    assert bob.status_code == 201, bob.text
    assert bob.json()["id"] != first.json()["id"], "a key is scoped to its caller"


async def test_concurrent_creates_with_the_same_key_make_one_session(
    api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    """A client that times out and retries while its first request is still running."""
    keyed = {**auth(), "Idempotency-Key": "create-racing-1"}
    body = {"work_in_progress": {"goal": "ship"}}

    answers = await asyncio.gather(
        *(api.post("/v1/sessions", json=body, headers=keyed) for _ in range(5))
    )

    assert all(a.status_code in (201, 409) for a in answers), [a.text for a in answers]
    created = {a.json()["id"] for a in answers if a.status_code == 201}
    assert len(created) == 1, f"one key made {len(created)} sessions"
    listed = (await api.get("/v1/sessions", headers=auth())).json()["items"]
    assert [s["id"] for s in listed] == list(created)


def keyed_only(headers: Headers) -> Headers:
    return {"Idempotency-Key": headers["Idempotency-Key"]}
