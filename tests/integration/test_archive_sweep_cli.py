"""`sessionmgr archive-sweep` as an operator runs it: progress lines, a summary, an exit code."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

import pytest
from mongomock_motor import AsyncMongoMockClient

from sessionmgr import cli
from sessionmgr.api.bridge import resolve
from sessionmgr.container import build_container
from sessionmgr.domain.model import Principal, utcnow
from sessionmgr.services.sessions import SessionService
from sessionmgr.settings import load_settings
from sessionmgr.storage import warm as warm_module
from tests.conftest import JWT_SECRET
from tests.support.s3_server import S3_BUCKET, S3Server

OWNER = Principal(sub="alice")


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, s3_server: S3Server
) -> dict[str, str]:
    """The CLI reads the process environment; its in-memory MongoDB is shared with the test."""
    for name in list(os.environ):
        if name.startswith("SESSIONMGR_"):
            monkeypatch.delenv(name)
    values = {
        "SESSIONMGR_REDIS_URL": redis_url,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_S3_ENDPOINT_URL": s3_server.url,
        "SESSIONMGR_S3_BUCKET": S3_BUCKET,
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    shared = AsyncMongoMockClient(tz_aware=True)
    monkeypatch.setattr(warm_module, "mongo_client", lambda settings: shared)
    return values


async def _seed(idle: list[timedelta], active: int = 0) -> list[str]:
    """Dormant sessions last active `idle` ago (and some still active); returns their ids."""
    container = build_container(load_settings(), write_behind=False)
    try:
        sessions: SessionService = await resolve(container.sessions)
        warm = await resolve(container.warm)
        ids = []
        for age in idle:
            session = await sessions.create(OWNER, work_in_progress={"age": str(age)})
            await sessions.suspend(OWNER, session.id)
            await warm._sessions.update_one(
                {"_id": session.id}, {"$set": {"last_active": utcnow() - age}}
            )
            ids.append(session.id)
        for _ in range(active):
            session = await sessions.create(OWNER)
            await warm._sessions.update_one(
                {"_id": session.id}, {"$set": {"last_active": utcnow() - timedelta(days=90)}}
            )
        return ids
    finally:
        await container.shutdown_resources()


async def _states(ids: list[str]) -> list[str]:
    container = build_container(load_settings(), write_behind=False)
    try:
        warm = await resolve(container.warm)
        return [(await warm.stored(i)).record.state.value for i in ids]
    finally:
        await container.shutdown_resources()


def test_dry_run_lists_and_changes_nothing(
    environment: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    old = asyncio.run(_seed([timedelta(days=40), timedelta(days=31), timedelta(days=2)]))

    code = cli.main(["archive-sweep", "--older-than", "30d", "--dry-run"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "2 session(s) idle for more than 30d (limit 1000)"
    assert out[1:3] == [f"[1/2] would archive {old[0]}", f"[2/2] would archive {old[1]}"]
    assert out[3].startswith("dry run: 2 session(s) would be archived; nothing changed")
    assert asyncio.run(_states(old)) == ["dormant"] * 3


def test_a_sweep_archives_the_idle_sessions_with_progress(
    environment: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = asyncio.run(_seed([timedelta(hours=30), timedelta(hours=20), timedelta(minutes=5)], 1))

    code = cli.main(["archive-sweep", "--older-than", "12h"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert out[0] == "3 session(s) idle for more than 12h (limit 1000)"
    assert out[1].startswith("[1/3] skipped   ") and "active in Redis" in out[1]
    assert out[2].startswith(f"[2/3] archived  {ids[0]}  (version 1, ")
    assert out[3].startswith(f"[3/3] archived  {ids[1]}  (version 1, ")
    assert out[4].startswith("done: 2 archived, 1 skipped, 0 failed in ")
    assert asyncio.run(_states(ids)) == ["archived", "archived", "dormant"]

    assert cli.main(["archive-sweep", "--older-than", "90m", "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1 session(s) idle for more than 90m (limit 1)"
    assert "active in Redis" in out[1]


def test_a_failed_archive_is_named_and_fails_the_run(
    environment: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = asyncio.run(_seed([timedelta(days=3)]))
    monkeypatch.setenv("SESSIONMGR_S3_BUCKET", "no-such-bucket")

    code = cli.main(["archive-sweep", "--older-than", "1d"])

    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[1].startswith(f"[1/1] FAILED    {ids[0]}  s3 is unavailable: NoSuchBucket")
    assert out[-2].startswith("done: 0 archived, 0 skipped, 1 failed")
    assert out[-1] == f"failed: {ids[0]}"
    assert asyncio.run(_states(ids)) == ["dormant"]


@pytest.mark.parametrize("span", ["30", "1w", "-3h", "d"])
def test_a_bad_duration_is_a_usage_error(
    environment: Any, span: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["archive-sweep", f"--older-than={span}"]) == 2
    assert "30d, 12h or 90m" in capsys.readouterr().err


@pytest.mark.parametrize("span", ["0d", "0m"])
def test_a_zero_duration_says_so(
    environment: Any, span: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["archive-sweep", f"--older-than={span}"]) == 2
    assert "is zero: give at least 1m" in capsys.readouterr().err
