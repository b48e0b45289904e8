"""The service on a Sentinel-managed Redis under a steady write load, through a `SENTINEL
FAILOVER` and through a SIGKILL of the master: writes are refused with 503 and Retry-After
meanwhile (never a 500), reads go on, the service finds the new master by itself, and every
acknowledged write that did not survive is counted and reported."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sessionmgr import cli
from sessionmgr.container import build_container
from sessionmgr.settings import Settings, load_settings
from tests.conftest import JWT_SECRET
from tests.integration.conftest import serving
from tests.sentinel.conftest import FIGURES
from tests.support.s3_server import S3_BUCKET, S3Server
from tests.support.sentinel import MASTER_NAME, SentinelTopology

WRITERS = 4
PAUSE_S = 0.01
STEADY_AFTER_S = 1.0  # recovered: this long of accepted writes after the failover
GIVE_UP_S = 30.0


@pytest.fixture
def sentinel_settings(topology: SentinelTopology, s3_server: S3Server) -> Settings:
    return load_settings(
        {},
        redis_url="redis://ignored-with-sentinels/0",
        redis_sentinels=tuple(("127.0.0.1", p) for p in topology.sentinel_ports),
        redis_sentinel_master=MASTER_NAME,
        mongodb_uri="mongomock://",
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
        rate_limit_per_s=0,
        gc_freeze=False,
    )


@pytest.fixture
async def api(sentinel_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_container(sentinel_settings)) as http:
        yield http


@dataclass
class Load:
    """What the writers and the reader saw, with times relative to the failover's start."""

    acknowledged: dict[str, dict[int, int]] = field(default_factory=dict)  # sid: seq -> n
    refused: list[float] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    reads: int = 0
    reads_failed: list[str] = field(default_factory=list)
    started: float = 0.0  # monotonic time of the failover


async def _writer(
    api: httpx.AsyncClient, sid: str, headers: dict[str, str], load: Load, stop: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        body = {"events": [{"kind": "note", "data": {"n": n}}]}
        r = await api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=headers)
        now = time.monotonic() - load.started if load.started else None
        if r.status_code == 200:
            load.acknowledged[sid][r.json()["first_seq"]] = n
            if now is not None:
                load.accepted_at.append(now)
        elif r.status_code == 503 and r.headers.get("retry-after"):
            if now is not None:
                load.refused.append(now)
        else:
            load.unexpected.append(f"{r.status_code} {r.headers.get('retry-after')} {r.text}")
        await asyncio.sleep(PAUSE_S)


async def _reader(
    api: httpx.AsyncClient, sid: str, headers: dict[str, str], load: Load, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        r = await api.get(f"/v1/sessions/{sid}", headers=headers)
        load.reads += 1
        if r.status_code != 200:
            load.reads_failed.append(f"{r.status_code} {r.text[:200]}")
        await asyncio.sleep(PAUSE_S)


def _recovered(load: Load) -> bool:
    if not load.accepted_at or not load.refused:
        return bool(load.accepted_at) and load.accepted_at[-1] > STEADY_AFTER_S * 2
    return load.accepted_at[-1] - max(load.refused) >= STEADY_AFTER_S


async def _under_load(
    api: httpx.AsyncClient, auth: Any, topology: SentinelTopology, *, kill: bool
) -> tuple[Load, float]:
    headers = auth("alice")
    sids = [
        (await api.post("/v1/sessions", json={}, headers=headers)).json()["id"]
        for _ in range(WRITERS)
    ]
    load = Load(acknowledged={sid: {} for sid in sids})
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_writer(api, sid, headers, load, stop)) for sid in sids]
    tasks.append(asyncio.create_task(_reader(api, sids[0], headers, load, stop)))
    try:
        await asyncio.sleep(0.5)  # steady before the failover
        old = topology.master_port()
        load.started = time.monotonic()
        if kill:
            topology.kill_master()
        else:
            await asyncio.to_thread(topology.failover)
        elected_s = await asyncio.to_thread(topology.wait_for_new_master, old)
        while not _recovered(load):
            if time.monotonic() - load.started > GIVE_UP_S:
                pytest.fail(f"no steady writes within {GIVE_UP_S} s: {len(load.refused)} refused")
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return load, elected_s


async def _lost(api: httpx.AsyncClient, auth: Any, load: Load) -> int:
    """Acknowledged appends that a full read no longer shows (gone, or another event now)."""
    lost = 0
    for sid, acked in load.acknowledged.items():
        r = await api.get(f"/v1/sessions/{sid}?include=full", headers=auth("alice"))
        assert r.status_code == 200, r.text
        shown = {e["seq"]: e["data"]["n"] for e in r.json()["full_timeline"]}
        lost += sum(1 for seq, n in acked.items() if shown.get(seq) != n)
    return lost


def _figures(name: str, load: Load, elected_s: float, lost: int, settings: Settings) -> str:
    acked = sum(len(a) for a in load.acknowledged.values())
    recovery = "no write refused"
    if load.refused:
        last = max(load.refused)
        again = min((t for t in load.accepted_at if t >= last), default=float("nan"))
        recovery = (
            f"{len(load.refused)} writes refused (503 + Retry-After), accepted again after "
            f"{again:.2f} s (circuit breaker reset {settings.breaker_reset_s:g} s)"
        )
    return (
        f"{name}: new master named after {elected_s:.2f} s; {recovery}; {acked} writes "
        f"acknowledged, {lost} of them lost; {load.reads} reads, {len(load.reads_failed)} failed"
    )


def test_check_reports_the_topology_the_sentinels_show(
    topology: SentinelTopology,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SESSIONMGR_REDIS_SENTINELS", topology.sentinel_addresses)
    monkeypatch.setenv("SESSIONMGR_REDIS_SENTINEL_MASTER", MASTER_NAME)
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("SESSIONMGR_S3_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("SESSIONMGR_S3_BUCKET", S3_BUCKET)
    deadline = time.monotonic() + 10
    while topology.replicas_online() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # a replica that lost its link (a loaded machine) resyncs first

    assert cli.main(["check"]) == 0

    lines = capsys.readouterr().out.splitlines()
    redis_line = next(line for line in lines if line.startswith("ok    redis"))
    assert f"sentinels {topology.sentinel_addresses} master {MASTER_NAME}" in redis_line
    replica = topology.data_ports[1]
    assert f"master with 1 replica(s) online (127.0.0.1:{replica})" in redis_line
    master = f"127.0.0.1:{topology.master_port()}"
    assert f"master {master} named {MASTER_NAME!r} by 3 of 3 sentinel(s)" in redis_line
    assert any(line.startswith("warn  redis    no persistence") for line in lines)


async def test_sentinel_failover_under_load_loses_nothing(
    api: httpx.AsyncClient, auth: Any, topology: SentinelTopology, sentinel_settings: Settings
) -> None:
    """SENTINEL FAILOVER pauses writes on the old master until the replica has caught up."""
    load, elected_s = await _under_load(api, auth, topology, kill=False)
    lost = await _lost(api, auth, load)
    FIGURES.append(_figures("SENTINEL FAILOVER", load, elected_s, lost, sentinel_settings))
    assert load.unexpected == [], load.unexpected[:5]
    assert load.reads_failed == [], load.reads_failed[:5]
    assert lost == 0


async def test_master_killed_under_load_counts_what_it_lost(
    api: httpx.AsyncClient, auth: Any, topology: SentinelTopology, sentinel_settings: Settings
) -> None:
    """SIGKILL of the master: refused writes are 503s, the service recovers by itself, and
    acknowledged writes the replica had not received yet are counted (asynchronous
    replication may lose the last milliseconds of writes)."""
    load, elected_s = await _under_load(api, auth, topology, kill=True)
    lost = await _lost(api, auth, load)
    FIGURES.append(_figures("SIGKILL of the master", load, elected_s, lost, sentinel_settings))
    assert load.unexpected == [], load.unexpected[:5]
    assert load.reads_failed == [], load.reads_failed[:5]
    assert load.refused, "writes to a dead master were acknowledged?"
    acked = sum(len(a) for a in load.acknowledged.values())
    assert 0 <= lost < acked
