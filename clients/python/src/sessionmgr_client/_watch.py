"""The change feed: Server-Sent Events over `GET /v1/sessions/{id}/changes`, resumed by id."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

from sessionmgr_client._errors import (
    IdempotencyKeyInFlight,
    RateLimited,
    Unauthenticated,
    Unavailable,
    error_for,
)
from sessionmgr_client._models import Change

if TYPE_CHECKING:
    from sessionmgr_client._client import AsyncClient

RETRYABLE = (Unavailable, RateLimited, IdempotencyKeyInFlight)


def change_of(sse: ServerSentEvent, session_id: str) -> Change:
    data: Any = json.loads(sse.data)
    if not isinstance(data, dict):
        data = {"value": data}
    kind = sse.event if sse.event and sse.event != "message" else str(data.get("kind", ""))
    return Change(
        id=sse.id or None,
        kind=kind,
        session_id=str(data.get("session_id", session_id)),
        version=int(data.get("version", 0)),
        data=data,
    )


async def watch(
    client: AsyncClient,
    session_id: str,
    since: str | None,
    *,
    reconnect_delay: float,
    max_reconnect_delay: float,
    idle_timeout: float = 60.0,
) -> AsyncIterator[Change]:
    """Every change after `since`; reconnects (Last-Event-ID) after a dropped or ended
    stream, a connection error, 503 or 429, waiting the server's `retry:` (or Retry-After),
    doubled on each failure in a row up to `max_reconnect_delay`, jittered. Other error
    answers (404, 403, 401, ...) are raised."""
    last_id = since
    delay = reconnect_delay
    failures = 0
    refreshed = False
    url = f"{client.base_url}/v1/sessions/{session_id}/changes"
    timeout = httpx.Timeout(10.0, read=idle_timeout)
    while True:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(await client._headers_for_stream())
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        wait: float | None = None
        try:
            async with aconnect_sse(
                client.http, "GET", url, headers=headers, timeout=timeout
            ) as source:
                response = source.response
                if response.status_code >= 400:
                    await response.aread()
                    error = error_for(response)
                    if isinstance(error, Unauthenticated) and client.refreshes_token:
                        if refreshed:
                            raise error
                        refreshed = True  # once: the callable makes a fresh token
                        wait = 0.0
                    elif not isinstance(error, RETRYABLE):
                        raise error
                    else:
                        wait = error.retry_after
                        failures += 1
                else:
                    refreshed = False
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            delay = sse.retry / 1000
                        if not sse.data:
                            continue  # a heartbeat or a lone `retry:`
                        failures = 0
                        change = change_of(sse, session_id)
                        if change.id is not None:
                            last_id = change.id
                        yield change
        except (httpx.TransportError, SSEError):
            failures += 1
        if wait is None:
            wait = min(max_reconnect_delay, delay * 2 ** max(0, failures - 1))
        await asyncio.sleep(wait * random.uniform(0.8, 1.2))  # noqa: S311
