"""Small steps the integration tests share: calls on the HTTP API, Redis probes, bounded waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from redis.asyncio import Redis

from sessionmgr.domain.model import SessionRecord
from sessionmgr.storage.feed import feed_key
from sessionmgr.storage.hot import decode_record, hot_key

T = TypeVar("T")
POLL_S = 0.05


async def create_session(
    client: httpx.AsyncClient, headers: dict[str, str], **body: Any
) -> dict[str, Any]:
    response = await client.post("/v1/sessions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def get_session(
    client: httpx.AsyncClient, headers: dict[str, str], session_id: str, *, full: bool = False
) -> dict[str, Any]:
    query = "?include=full" if full else ""
    response = await client.get(f"/v1/sessions/{session_id}{query}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def patch_session(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    session_id: str,
    expected_version: int,
    **patch: Any,
) -> dict[str, Any]:
    response = await client.patch(
        f"/v1/sessions/{session_id}",
        json={"expected_version": expected_version, "patch": patch},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def append_events(
    client: httpx.AsyncClient, headers: dict[str, str], session_id: str, *events: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/sessions/{session_id}/timeline", json={"events": list(events)}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *, timeout_s: float = 5.0
) -> T:
    """Probe until `accept` holds or the time is up; returns the last value for the assert."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(POLL_S)


async def keys_of(redis: Redis, session_id: str) -> set[str]:
    """Every Redis key of the session (each names it after its partition's hash tag)."""
    return {key.decode() async for key in redis.scan_iter(match=f"*}}:{session_id}*")}


async def only_deleted_in_feed(redis: Redis, session_id: str) -> bool:
    """After a delete the change feed holds one entry, `deleted`, and none of the data."""
    entries = await redis.xrange(feed_key(session_id))
    return [fields[b"k"] for _, fields in entries] == [b"deleted"]


async def hot_record(redis: Redis, session_id: str) -> SessionRecord | None:
    raw = await redis.hgetall(hot_key(session_id))  # type: ignore[misc]
    return decode_record(raw) if raw else None


def comparable(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    """An answer without its request id (each request has its own): two ways to one answer
    compare equal."""
    headers = {k: v for k, v in response.headers.items() if k != "x-request-id"}
    return response.status_code, headers, response.content
