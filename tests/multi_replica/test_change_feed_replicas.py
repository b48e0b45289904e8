"""The change feed across three replicas: a subscriber on one, writers on the two others. Its
connection dropped mid-stream and resumed with Last-Event-ID, then its replica SIGTERMed and
the stream resumed on another: every change arrives exactly once, in commit order."""

from __future__ import annotations

import threading
import time

import httpx

from tests.multi_replica.conftest import Stack, bearer
from tests.support.sse import Event, Stream

WRITES = 60


def _writer(stack: Stack, sid: str, owner: str, versions: list[int], done: threading.Event) -> None:
    """PATCHes through replicas 1 and 2 in turn, a few dozen a second."""
    clients = [httpx.Client(base_url=r.url, timeout=15) for r in stack.replicas[1:]]
    try:
        for i in range(WRITES):
            answer = clients[i % 2].patch(
                f"/v1/sessions/{sid}",
                headers={**bearer(owner), "If-Match": "*"},
                json={"patch": {"work_in_progress": {"i": i}}},
            )
            assert answer.status_code == 200, answer.text
            versions.append(int(answer.json()["version"]))
            time.sleep(0.03)
    finally:
        done.set()
        for c in clients:
            c.close()


def _follow(url: str, sid: str, owner: str, last: str | None) -> Stream:
    extra = {"Last-Event-ID": last} if last else {}
    return Stream(url, f"/v1/sessions/{sid}/changes", {**bearer(owner), **extra}).start()


def _wait(stream: Stream, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(stream.events) < count and time.monotonic() < deadline and not stream.ended:
        time.sleep(0.02)


def test_every_change_exactly_once_across_a_dropped_connection_and_a_sigterm(
    stack: Stack, owner: str
) -> None:
    sub_replica, other = stack.replicas[0], stack.replicas[1]
    with httpx.Client(base_url=sub_replica.url, timeout=15) as http:
        created = http.post("/v1/sessions", headers=bearer(owner), json={})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
    received: list[Event] = []
    versions: list[int] = []
    done = threading.Event()
    feed = _follow(sub_replica.url, sid, owner, None)
    writer = threading.Thread(target=_writer, args=(stack, sid, owner, versions, done))
    writer.start()

    _wait(feed, 10)
    feed.close()  # the connection drops mid-stream
    received += feed.events
    time.sleep(0.3)  # writes go on meanwhile
    feed = _follow(sub_replica.url, sid, owner, received[-1].id)

    _wait(feed, 15)
    sub_replica.stop()  # SIGTERM: the replica ends its streams, then exits
    _wait(feed, 10_000, timeout_s=5)
    assert feed.ended, "the stream outlived its replica's SIGTERM"
    received += feed.events
    feed.close()
    feed = _follow(other.url, sid, owner, received[-1].id)  # resume elsewhere

    assert done.wait(60)
    writer.join()
    _wait(feed, WRITES - len(received))
    time.sleep(0.5)  # nothing more may come
    feed.close()
    received += feed.events

    assert [e.event for e in received] == ["patched"] * WRITES
    assert [e.data["version"] for e in received] == versions  # once each, in commit order
    assert "reset" not in {e.event for e in received}
