"""`sessionmgr outbox status | replay | drop` end to end on a real redis-server.

Entries get parked the only way the worker parks them now: MongoDB refuses them for their
content, again and again over `park_after_s` (0 here), while another session's entries go
through. Archive then refuses the session with a 409 that says why, until an operator acts.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from sessionmgr import cli
from sessionmgr.domain.model import SessionRecord
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM
from sessionmgr.storage.warm import MongoWarmStore
from tests.conftest import TEST_PARTITIONS
from tests.integration.session_api import append_events, create_session, patch_session
from tests.integration.test_write_behind import FaultyWarm, worker

Headers = dict[str, str]


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    for name in list(os.environ):
        if name.startswith("SESSIONMGR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SESSIONMGR_REDIS_URL", redis_url)
    monkeypatch.setenv("SESSIONMGR_REDIS_PARTITIONS", str(TEST_PARTITIONS))  # the app's layout
    monkeypatch.setenv("SESSIONMGR_LOG_LEVEL", "WARNING")


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command as an operator runs it (its own event loop, so in a thread here)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["outbox", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def park_writes_of(
    redis: Redis, warm: MongoWarmStore, bad: str, good: str, api: httpx.AsyncClient, owner: Headers
) -> None:
    """MongoDB refuses `bad`'s entries (a validation error); `good`'s go through meanwhile."""

    def refuse(record: SessionRecord) -> None:
        if record.id == bad:
            raise ValueError("Document failed validation (injected)")

    faulty = FaultyWarm(warm, before=refuse)
    w = worker(redis, faulty, "W", max_deliveries=2, park_after_s=0, refused_retry_s=0)
    await w.ensure_group()
    await w.step(block_ms=10)  # the bad entries fail once, the good ones land
    await patch_session(api, owner, good, 2, work_in_progress={"later": True})
    for _ in range(5):
        await w.step(block_ms=10)
    assert w.parked == 2


async def test_status_replay_and_drop_of_dead_letters(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    auth: Callable[..., Headers],
    operator_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    owner = auth()
    bad = (await create_session(manual_api, owner))["id"]
    good = (await create_session(manual_api, owner))["id"]
    await patch_session(manual_api, owner, bad, 1, work_in_progress={"lost?": "no"})
    await append_events(manual_api, owner, bad, {"kind": "note", "data": {"n": 1}})
    await patch_session(manual_api, owner, good, 1, work_in_progress={"n": 1})
    await park_writes_of(manual_redis, manual_warm, bad, good, manual_api, owner)

    code, out, _ = await run_cli(capsys, "status")
    assert code == 0
    assert "dead letters  2" in out
    assert f"session {bad} v2" in out and f"session {bad} v3" in out
    assert "Document failed validation" in out
    code, out, _ = await run_cli(capsys, "status", "--json")
    status = json.loads(out)
    assert status["dead_letters"] == 2
    assert {d["version"] for d in status["dead"]} == {2, 3}
    assert status["consumers"][0]["name"] == "W"

    suspended = await manual_api.post(f"/v1/sessions/{bad}/suspend", headers=owner)
    assert suspended.status_code == 200
    refused = await manual_api.post(f"/v1/sessions/{bad}/archive", headers=owner)
    assert refused.status_code == 409, refused.text
    assert refused.json()["type"].endswith("#outbox-parked")
    assert "sessionmgr outbox status" in refused.json()["detail"]

    v3 = next(d for d in status["dead"] if d["version"] == 3)
    code, out, _ = await run_cli(capsys, "drop", "--id", v3["id"])
    assert (code, await manual_redis.xlen(DEAD_LETTER_STREAM)) == (0, 1)
    assert "for good" in out
    code, _, err = await run_cli(capsys, "drop", "--id", v3["id"])
    assert code == 1 and "no dead letter" in err
    code, _, err = await run_cli(capsys, "replay", "--id", "1-1")
    assert code == 1 and "no dead letter 1-1" in err

    code, out, _ = await run_cli(capsys, "replay", "--all")
    assert code == 0 and "1 dead letter(s) back in the outbox" in out
    assert await manual_redis.xlen(DEAD_LETTER_STREAM) == 0
    assert await manual_redis.xlen(OUTBOX_STREAM) >= 1
    healthy = worker(manual_redis, manual_warm, "W2")
    await healthy.ensure_group()
    await healthy.step(block_ms=10)
    stored = await manual_warm.get(bad)
    assert stored is not None and stored.version == 3  # the suspend's flush already had v3
    assert (await manual_api.post(f"/v1/sessions/{bad}/archive", headers=owner)).status_code == 200
