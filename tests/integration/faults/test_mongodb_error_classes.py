"""MongoDB refusing every write for a while, with each class of error a deployment meets:
nothing is parked, every acknowledged write reaches MongoDB, and the outbox drains within
seconds of recovery (issue 11, "The write-behind gives up on entries during an outage").

Writes go on the whole time (active sessions live in Redis), and each answer is recorded;
after the outage the recorded history is checked against MongoDB. CI runs each class for
1 s and a 10 s outage whose error changes on every call; `nox -s faults` runs 10 s and 120 s
for each class (SESSIONMGR_FAULTS_LONG=1).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from pymongo.errors import AutoReconnect, ExecutionTimeout, OperationFailure, WriteConcernError
from redis.asyncio import Redis

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.conftest import serving
from tests.integration.session_api import create_session, eventually

Headers = dict[str, str]
LONG = os.environ.get("SESSIONMGR_FAULTS_LONG") == "1"

ERROR_CLASSES: dict[str, Callable[[], Exception]] = {
    "network": lambda: AutoReconnect("connection reset by peer"),
    "timeout": lambda: ExecutionTimeout("operation exceeded time limit", 50),
    "auth": lambda: OperationFailure("Authentication failed.", 18),
    "unauthorized": lambda: OperationFailure("not authorized on sessionmgr", 13),
    "write-concern": lambda: WriteConcernError("waiting for replication timed out", 64),
    "not-primary": lambda: OperationFailure("not primary", 10107),
    "election": lambda: OperationFailure("interrupted due to repl state change", 11602),
    "shutdown": lambda: OperationFailure("interrupted at shutdown", 11600),
    "disk-full": lambda: OperationFailure("No space left on device", 14031),
    "quota": lambda: OperationFailure("you are over your space quota", 8000),
}


class Refusing:
    """A Motor collection or database whose every call fails with `error()` when awaited."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Refusing:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Refusing:
        return self

    def __await__(self) -> Generator[Any, None, None]:
        raise self._error()
        yield  # pragma: no cover


class History(msgspec.Struct):
    """What each session was answered: its last acknowledged version and appended seqs."""

    versions: dict[str, int]
    seqs: dict[str, list[int]]
    refused: int = 0


@pytest.fixture
def container(settings: Settings) -> Container:
    tuned = msgspec.structs.replace(
        settings, breaker_failures=3, breaker_reset_s=0.5, outbox_backoff_max_s=1.0
    )
    return build_container(tuned)


@pytest.fixture
async def api(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(container) as http:
        yield http


async def write_steadily(
    api: httpx.AsyncClient,
    owner: Headers,
    history: History,
    stop: asyncio.Event,
    pause_s: float = 0.02,
) -> None:
    """Patch and append to every session in turn until `stop`, recording every answer, with
    `pause_s` between rounds."""
    while not stop.is_set():
        for sid in history.versions:
            answer = await api.patch(
                f"/v1/sessions/{sid}",
                json={"patch": {"work_in_progress": {"at": time.time()}}},
                headers={**owner, "If-Match": f'"{history.versions[sid]}"'},
            )
            if answer.status_code != 200:
                history.refused += 1
                continue
            history.versions[sid] = answer.json()["version"]
            appended = await api.post(
                f"/v1/sessions/{sid}/timeline",
                json={"events": [{"kind": "tick", "data": {"v": history.versions[sid]}}]},
                headers=owner,
            )
            if appended.status_code == 200:
                body = appended.json()
                history.versions[sid] = body["version"]
                history.seqs[sid].append(body["last_seq"])
            else:
                history.refused += 1
        await asyncio.sleep(pause_s)


async def outage(
    api: httpx.AsyncClient,
    container: Container,
    owner: Headers,
    errors: Iterator[Exception],
    seconds: float,
) -> None:
    warm: MongoWarmStore = await resolve(container.warm)
    redis: Redis = await resolve(container.redis)
    sids = [(await create_session(api, owner, work_in_progress={"i": i}))["id"] for i in range(3)]
    history = History(versions=dict.fromkeys(sids, 1), seqs={s: [] for s in sids})
    stop = asyncio.Event()
    # A longer outage writes less often, so that its backlog is about the 10 s one's: what it
    # adds is the length (the backoff at its cap and the breaker opening and closing for
    # minutes), not a larger backlog. (At the 10 s pace, 120 s queue about 20 000 entries,
    # which the in-memory MongoDB of these tests, whose inserts scan its collections, takes
    # far longer than seconds to take: `python -m bench.drain` measures drain rates.)
    pause_s = 0.02 if seconds <= 10 else 0.05 * seconds / 10
    writer = asyncio.create_task(write_steadily(api, owner, history, stop, pause_s))
    await asyncio.sleep(0.3)

    real = {a: getattr(warm, a) for a in ("_db", "_sessions", "_events")}
    failing = Refusing(lambda: next(errors))
    for attribute in real:
        setattr(warm, attribute, failing)
    try:
        await asyncio.sleep(seconds)
        assert await redis.xlen(OUTBOX_STREAM) > 0, "writes went on and queued up"
    finally:
        for attribute, value in real.items():
            setattr(warm, attribute, value)
    recovered = time.monotonic()
    await asyncio.sleep(0.3)
    stop.set()
    await writer

    drained = await eventually(lambda: redis.xlen(OUTBOX_STREAM), lambda n: n == 0, timeout_s=10)
    assert drained == 0, "the outbox drains within seconds of recovery"
    assert time.monotonic() - recovered < 10
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0, "an outage parks nothing"
    assert history.refused == 0, "writes to active sessions never depended on MongoDB"
    for sid in sids:
        stored = await warm.get(sid)
        assert stored is not None and stored.version == history.versions[sid]
        seqs = [e.seq for e in await warm.all_events(sid)]
        assert seqs == list(range(1, stored.timeline_seq + 1))
        assert set(history.seqs[sid]) <= set(seqs), "every acknowledged event is in MongoDB"


@pytest.mark.parametrize("kind", sorted(ERROR_CLASSES))
async def test_a_one_second_outage_of_each_class_loses_and_parks_nothing(
    api: httpx.AsyncClient, container: Container, auth: Callable[..., Headers], kind: str
) -> None:
    make = ERROR_CLASSES[kind]
    await outage(api, container, auth(), (make() for _ in itertools.count()), 1.0)


async def test_a_ten_second_outage_of_changing_errors_loses_and_parks_nothing(
    api: httpx.AsyncClient, container: Container, auth: Callable[..., Headers]
) -> None:
    errors = (make() for make in itertools.cycle(ERROR_CLASSES.values()))
    await outage(api, container, auth(), errors, 10.0)


@pytest.mark.skipif(not LONG, reason="long soak: `nox -s faults` (SESSIONMGR_FAULTS_LONG=1)")
@pytest.mark.parametrize("seconds", [10.0, 120.0])
@pytest.mark.parametrize("kind", sorted(ERROR_CLASSES))
async def test_long_outages_of_each_class_lose_and_park_nothing(
    api: httpx.AsyncClient,
    container: Container,
    auth: Callable[..., Headers],
    kind: str,
    seconds: float,
) -> None:
    make = ERROR_CLASSES[kind]
    await outage(api, container, auth(), (make() for _ in itertools.count()), seconds)
