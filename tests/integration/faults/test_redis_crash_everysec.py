"""A real redis-server with `appendfsync everysec`, SIGKILLed under writes, then restarted.

AOF everysec may lose the last second of writes when the machine goes down; a SIGKILL of the
process alone usually loses none (Redis hands each write to the kernel at once and fsyncs once
a second), so here Redis mostly comes back whole, and test_redis_rollback.py forces the
rollback instead. Either way the history of every answer is recorded and checked: every
write acknowledged after the restart is in MongoDB after a suspend, exactly once, with no hole
in the timeline, and every divergence met on the way is both counted and kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import msgspec
import pytest

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.conftest import serving
from tests.integration.faults.conftest import fault_settings
from tests.integration.faults.test_redis_outage import sample
from tests.support.faults import DurableRedis

Headers = dict[str, str]


class EverysecRedis(DurableRedis):
    persistence = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")


class History(msgspec.Struct):
    """Every answer: (monotonic time, what, n, status, version)."""

    answers: list[tuple[float, str, int, int, int]] = []


@pytest.fixture
def everysec() -> Iterator[EverysecRedis]:
    server = EverysecRedis().start()
    yield server
    server.cleanup()


@pytest.fixture
def crash_container(settings: Settings, everysec: EverysecRedis) -> Container:
    return build_container(fault_settings(settings, everysec.url))


@pytest.fixture
async def crash_api(crash_container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(crash_container) as http:
        yield http


async def write_on(
    api: httpx.AsyncClient, owner: Headers, sid: str, history: History, stop: asyncio.Event
) -> None:
    version, n = 1, 0
    while not stop.is_set():
        n += 1
        patched = await api.patch(
            f"/v1/sessions/{sid}",
            json={"patch": {"work_in_progress": {"n": n}}},
            headers={**owner, "If-Match": f'"{version}"', "Idempotency-Key": f"p{n}"},
        )
        history.answers.append((time.monotonic(), "patch", n, patched.status_code, 0))
        if patched.status_code == 200:
            version = patched.json()["version"]
        elif patched.status_code in (409, 412):
            read = await api.get(f"/v1/sessions/{sid}", headers=owner)
            if read.status_code == 200:
                version = read.json()["version"]
        appended = await api.post(
            f"/v1/sessions/{sid}/timeline",
            json={"events": [{"kind": "tick", "data": {"n": n}}]},
            headers={**owner, "Idempotency-Key": f"a{n}"},
        )
        history.answers.append((time.monotonic(), "append", n, appended.status_code, 0))
        if appended.status_code == 200:
            version = appended.json()["version"]
        await asyncio.sleep(0.005)


async def test_every_write_acknowledged_after_a_crash_and_restart_reaches_mongodb(
    crash_api: httpx.AsyncClient,
    crash_container: Container,
    everysec: EverysecRedis,
    auth: Callable[..., Headers],
) -> None:
    owner = auth()
    sid = (await crash_api.post("/v1/sessions", json={}, headers=owner)).json()["id"]
    history, stop = History(), asyncio.Event()
    writer = asyncio.create_task(write_on(crash_api, owner, sid, history, stop))
    await asyncio.sleep(1.5)
    everysec.kill()  # no shutdown, no final fsync: up to a second of writes may go
    await asyncio.sleep(0.5)
    everysec.start()
    restarted = time.monotonic()
    await asyncio.sleep(3.0)
    stop.set()
    await writer

    for _ in range(100):
        suspended = await crash_api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
        if suspended.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert suspended.status_code == 200, suspended.text

    after = [a for a in history.answers if a[0] > restarted and a[3] == 200]
    assert any(what == "append" for _, what, *_ in after), "writes went on after the restart"
    warm: MongoWarmStore = await resolve(crash_container.warm)
    events = await warm.all_events(sid)
    ticks = [e.data.get("n") for e in events]
    for _, what, n, _, _ in after:
        if what == "append":
            assert ticks.count(n) == 1, f"append {n}, acknowledged after the restart, is kept once"
    last_patch = max((n for _, what, n, *_ in after if what == "patch"), default=None)
    stored = await warm.get(sid)
    assert stored is not None
    if last_patch is not None:
        assert stored.work_in_progress == {"n": last_patch}
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "no hole"
    counted = sample((await crash_api.get("/metrics")).text, "sessionmgr_write_divergences_total")
    kept = await warm._conflicts.count_documents({"session_id": sid})
    assert (counted or 0) == kept, "every divergence is both counted and kept"
