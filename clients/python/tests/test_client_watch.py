"""`watch()` against a small fake SSE endpoint on a real socket (the server's change feed is
built on another branch): parsing, resuming with Last-Event-ID after a dropped stream,
`retry:`, heartbeats, `reset`, 503 with Retry-After, and a 404 raised."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from sessionmgr_client import AsyncClient, Change, Client, NotFound, Unauthenticated

SID = "a" * 32
Serve = Callable[["FakeFeed"], Awaitable["FakeFeed"]]


def event(kind: str, position: str, version: int, **extra: object) -> bytes:
    data = json.dumps({"session_id": SID, "version": version, "kind": kind, **extra})
    return f"id: {position}\nevent: {kind}\ndata: {data}\n\n".encode()


@dataclass
class FakeFeed:
    """Answers the n-th connection with `scripts[n]`: a status line and body chunks; the
    connection is closed after the last chunk (a dropped stream) unless `hold` is set."""

    scripts: list[tuple[int, list[bytes], dict[str, str]]]
    hold: bool = True
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
        headers["request-line"] = request_line
        index = len(self.requests)
        self.requests.append(headers)
        status, chunks, extra = self.scripts[min(index, len(self.scripts) - 1)]
        content_type = "text/event-stream" if status == 200 else "application/problem+json"
        head_out = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
        head_out += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        writer.write((head_out + "\r\n").encode())
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        if status == 200 and self.hold and index == len(self.scripts) - 1:
            for _ in range(100):  # heartbeats until the client goes
                writer.write(b": heartbeat\n\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()


@pytest.fixture
async def feed_server() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def serve(feed: FakeFeed) -> FakeFeed:
        server = await asyncio.start_server(feed.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        feed.url = f"http://127.0.0.1:{port}"
        return feed

    yield serve
    for server in servers:
        server.close()


async def take(client: AsyncClient, n: int, since: str | None = None) -> list[Change]:
    seen: list[Change] = []
    async for change in client.watch(SID, since=since, reconnect_delay=0.05):
        seen.append(change)
        if len(seen) == n:
            break
    return seen


async def test_resumes_after_a_dropped_stream_and_yields_reset(feed_server: Serve) -> None:
    feed = await feed_server(
        FakeFeed(
            [
                (
                    200,
                    [
                        b"retry: 50\n\n",
                        event("patched", "1-0", 2, fields=["work_in_progress"]),
                        b": heartbeat\n\n",
                        event("appended", "2-0", 3, first_seq=1, last_seq=1),
                        b'id: 3-0\nevent: joined\ndata: {"session_id": "',  # cut mid-event
                    ],
                    {},
                ),
                (200, [event("reset", "9-0", 7), event("left", "10-0", 8, mad_name="x")], {}),
            ]
        )
    )
    tokens = iter(f"t{i}" for i in range(100))
    async with AsyncClient(feed.url, token=lambda: next(tokens)) as client:
        seen = await take(client, 4, since="0-5")
    assert [(c.id, c.kind, c.version) for c in seen] == [
        ("1-0", "patched", 2),
        ("2-0", "appended", 3),
        ("9-0", "reset", 7),
        ("10-0", "left", 8),
    ]
    assert seen[0].data["fields"] == ["work_in_progress"]
    assert {c.session_id for c in seen} == {SID}
    first, second = feed.requests[:2]
    assert first["request-line"].startswith(f"GET /v1/sessions/{SID}/changes ")
    assert first["last-event-id"] == "0-5"
    assert second["last-event-id"] == "2-0"  # the last whole event, not the cut one
    assert first["accept"] == "text/event-stream"
    assert (first["authorization"], second["authorization"]) == ("Bearer t0", "Bearer t1")


async def test_waits_out_a_503_then_streams(feed_server: Serve) -> None:
    problem = json.dumps(
        {
            "type": "/problems#backend-unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "redis is down",
            "instance": f"/v1/sessions/{SID}/changes",
            "backend": "redis",
        }
    ).encode()
    feed = await feed_server(
        FakeFeed([(503, [problem], {"Retry-After": "0"}), (200, [event("patched", "1-0", 2)], {})])
    )
    async with AsyncClient(feed.url, token="t") as client:
        seen = await take(client, 1)
    assert [c.id for c in seen] == ["1-0"]
    assert "last-event-id" not in feed.requests[1]


async def test_a_missing_session_is_raised_not_retried(feed_server: Serve) -> None:
    problem = json.dumps(
        {
            "type": "/problems#not-found",
            "title": "Not Found",
            "status": 404,
            "detail": "no such session",
            "instance": f"/v1/sessions/{SID}/changes",
        }
    ).encode()
    feed = await feed_server(FakeFeed([(404, [problem], {})]))
    async with AsyncClient(feed.url, token="t") as client:
        with pytest.raises(NotFound):
            await take(client, 1)
    assert len(feed.requests) == 1


def test_the_blocking_client_watches_too() -> None:
    async def main() -> None:
        feed = FakeFeed([(200, [event("suspended", "1-0", 4), event("resumed", "2-0", 4)], {})])
        server = await asyncio.start_server(feed.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def blocking() -> list[str]:
            with Client(f"http://127.0.0.1:{port}", token="t") as client:
                kinds = []
                for change in client.watch(SID):
                    kinds.append(change.kind)
                    if len(kinds) == 2:
                        break
                return kinds

        assert await asyncio.to_thread(blocking) == ["suspended", "resumed"]
        server.close()

    asyncio.run(main())


async def test_a_401_reconnects_once_with_a_fresh_token(feed_server: Serve) -> None:
    problem = json.dumps(
        {
            "type": "/problems#unauthenticated",
            "title": "Unauthorized",
            "status": 401,
            "detail": "the token expired",
            "instance": f"/v1/sessions/{SID}/changes",
        }
    ).encode()
    feed = await feed_server(
        FakeFeed([(401, [problem], {}), (200, [event("patched", "1-0", 2)], {})])
    )
    tokens = iter(["old", "new"])
    async with AsyncClient(feed.url, token=lambda: next(tokens)) as client:
        assert [c.id for c in await take(client, 1)] == ["1-0"]
    assert [r["authorization"] for r in feed.requests] == ["Bearer old", "Bearer new"]
    twice = await feed_server(FakeFeed([(401, [problem], {})]))
    async with AsyncClient(twice.url, token=lambda: "old") as client:
        with pytest.raises(Unauthenticated):
            await take(client, 1)
    assert len(twice.requests) == 2
