"""The change feed (`GET /v1/sessions/{id}/changes`) against a real `sessionmgr serve` and a real
redis-server: every change kind once, in commit order; a resume gets exactly what it missed; a
position the capped stream no longer holds gets `reset`, never a gap; the per-principal cap
answers 429; a stranger gets no feed; SIGTERM ends the streams at once."""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from sessionmgr.storage.feed import feed_key
from tests.e2e.served import Served, check_problem, headers, serve
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3_BUCKET, S3Server
from tests.support.sse import Event, Stream

CAP = 3
MAXLEN = 10


def _env(redis_server: RedisServer, s3_server: S3Server) -> dict[str, str]:
    if redis_server.process is None:
        redis_server.start()
    return {
        "SESSIONMGR_REDIS_URL": redis_server.url,
        "SESSIONMGR_S3_ENDPOINT_URL": s3_server.url,
        "SESSIONMGR_S3_BUCKET": S3_BUCKET,
        "SESSIONMGR_FEED_HEARTBEAT_S": "0.3",
        "SESSIONMGR_FEED_MAX_STREAMS_PER_PRINCIPAL": str(CAP),
        "SESSIONMGR_FEED_MAXLEN": str(MAXLEN),
        "SESSIONMGR_LEASE_TTL_S": "1",
        "SESSIONMGR_LEASE_GRACE_S": "0",
        "SESSIONMGR_RATE_LIMIT_PER_S": "1000",
        "SESSIONMGR_RATE_LIMIT_BURST": "1000",
        "SESSIONMGR_SHUTDOWN_GRACE_S": "20",
    }


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("feed") / "serve.log"
    with serve(_env(redis_server, s3_server), log) as server:
        yield server


def _owner() -> dict[str, str]:
    return headers(f"feed-owner-{secrets.token_hex(4)}")


def _create(http: httpx.Client, who: dict[str, str]) -> str:
    created = http.post("/v1/sessions", headers=who, json={"work_in_progress": {"step": "start"}})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _patch(http: httpx.Client, who: dict[str, str], sid: str, value: str) -> int:
    answer = http.patch(
        f"/v1/sessions/{sid}",
        headers={**who, "If-Match": "*"},
        json={"patch": {"work_in_progress": {"step": value}}},
    )
    assert answer.status_code == 200, answer.text
    return int(answer.json()["version"])


def _stream(served: Served, who: dict[str, str], sid: str, **extra: str) -> Stream:
    query = f"?since={extra.pop('since')}" if "since" in extra else ""
    return Stream(served.base_url, f"/v1/sessions/{sid}/changes{query}", {**who, **extra})


def _kinds(events: list[Event]) -> list[str]:
    return [e.event for e in events]


def _ordered(events: list[Event]) -> None:
    ids = [tuple(int(p) for p in str(e.id).split("-")) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    versions = [e.data["version"] for e in events]
    assert versions == sorted(versions), versions


def test_every_change_kind_appears_once_in_commit_order(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        with _stream(served, owner, sid) as feed:
            assert feed.status == 200
            assert feed.content_type.startswith("text/event-stream")
            _patch(http, owner, sid, "one")
            appended = http.post(
                f"/v1/sessions/{sid}/timeline",
                headers=owner,
                json={
                    "events": [
                        {"kind": "note", "data": {"n": 1}},
                        {"kind": "note", "data": {"n": 2}},
                    ]
                },
            )
            assert appended.status_code == 200, appended.text
            for mad in ("alpha", "beta"):
                joined = http.post(
                    f"/v1/sessions/{sid}/participants", headers=owner, json={"mad_name": mad}
                )
                assert joined.status_code == 200, joined.text
            assert (
                http.delete(f"/v1/sessions/{sid}/participants/alpha", headers=owner).status_code
                == 204
            )
            time.sleep(1.3)  # beta's 1 s lease lapses; grace 0: the next write reaps it
            _patch(http, owner, sid, "two")
            assert http.post(f"/v1/sessions/{sid}/suspend", headers=owner).status_code == 200
            assert http.post(f"/v1/sessions/{sid}/resume", headers=owner).status_code == 200
            archived = http.post(f"/v1/sessions/{sid}/archive", headers=owner)
            assert archived.status_code == 200, archived.text
            assert http.delete(f"/v1/sessions/{sid}", headers=owner).status_code == 204
            expected = [
                "patched", "appended", "joined", "joined", "left", "lapsed", "patched",
                "suspended", "resumed", "suspended", "archived", "deleted",
            ]  # fmt: skip
            events = feed.wait_for(len(expected))
            time.sleep(0.5)  # nothing more may come
            events = list(feed.events)
            assert feed.retry == 2000
    assert _kinds(events) == expected, _kinds(events)
    _ordered(events)
    assert all(e.data["session_id"] == sid and e.data["kind"] == e.event for e in events)
    assert events[0].data["fields"] == ["work_in_progress"]
    assert [ev["seq"] for ev in events[1].data["events"]] == [1, 2]
    assert set(events[1].data["events"][0]) == {"seq", "at", "actor", "kind", "data"}
    assert events[2].data["mad_name"] == "alpha" and events[2].data["token"] >= 1
    assert events[4].data == {
        "session_id": sid,
        "version": events[4].data["version"],
        "kind": "left",
        "mad_name": "alpha",
    }
    assert events[5].data["mad_name"] == "beta"


def test_heartbeats_keep_an_idle_stream_open(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
    with _stream(served, owner, sid) as feed:
        time.sleep(1.0)
        assert feed.comments.count("ping") >= 2, feed.comments
        assert feed.events == []


def test_a_resume_gets_exactly_the_missed_events(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        with _stream(served, owner, sid) as first:
            versions = [_patch(http, owner, sid, f"v{i}") for i in range(3)]
            seen = first.wait_for(3)
        assert [e.data["version"] for e in seen] == versions
        missed = [_patch(http, owner, sid, f"w{i}") for i in range(4)]
        # by header, and by ?since=: all after that position, once each, then live
        expected = [*versions[1:], *missed]
        for how in ({"Last-Event-ID": str(seen[0].id)}, {"since": str(seen[0].id)}):
            with _stream(served, owner, sid, **how) as again:
                again.wait_for(len(expected))
                expected.append(_patch(http, owner, sid, "live"))
                again.wait_for(len(expected))
                time.sleep(0.3)  # nothing more may come
                got = list(again.events)
            assert [e.data["version"] for e in got] == expected, got
            assert "reset" not in _kinds(got)
            _ordered(got)


def test_a_position_the_capped_stream_dropped_gets_reset_never_a_gap(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        with _stream(served, owner, sid) as first:
            _patch(http, owner, sid, "kept")
            (old,) = first.wait_for(1)
        # MAXLEN ~ 10 trims whole stream nodes (100 entries each): write well past one.
        for i in range(MAXLEN + 230):
            _patch(http, owner, sid, f"n{i}")
        current = http.get(f"/v1/sessions/{sid}", headers=owner).json()["version"]
        with _stream(served, owner, sid, **{"Last-Event-ID": str(old.id)}) as again:
            (reset,) = again.wait_for(1)
            after = _patch(http, owner, sid, "after")
            got = again.wait_for(2)
        assert reset.event == "reset"
        assert reset.data == {
            "session_id": sid,
            "version": current,
            "kind": "reset",
            "reason": "gone",
        }
        assert [e.event for e in got] == ["reset", "patched"]
        assert got[1].data["version"] == after
        # resuming from the reset's own id continues right after it
        with _stream(served, owner, sid, since=str(reset.id)) as third:
            (one,) = third.wait_for(1)
        assert one.data["version"] == after


def test_a_dormant_sessions_expired_feed_gets_reset(
    served: Served, redis_server: RedisServer
) -> None:
    import redis as redis_sync

    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        with _stream(served, owner, sid) as first:
            _patch(http, owner, sid, "x")
            (old,) = first.wait_for(1)
        assert http.post(f"/v1/sessions/{sid}/suspend", headers=owner).status_code == 200
        with redis_sync.Redis.from_url(redis_server.url) as r:
            assert 0 < r.ttl(feed_key(sid)) <= 3600
            r.delete(feed_key(sid))  # its retention ran out
        with _stream(served, owner, sid, since=str(old.id)) as again:
            (reset,) = again.wait_for(1)
            assert http.post(f"/v1/sessions/{sid}/resume", headers=owner).status_code == 200
            got = again.wait_for(2)
    assert [e.event for e in got] == ["reset", "resumed"]
    assert reset.data["reason"] == "gone"


def test_the_per_principal_cap_answers_429(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        streams = [_stream(served, owner, sid).start() for _ in range(CAP)]
        try:
            assert [s.status for s in streams] == [200] * CAP
            refused = http.get(f"/v1/sessions/{sid}/changes", headers=owner)
            assert refused.status_code == 429
            body = check_problem(refused)
            assert body["type"] == "/problems#too-many-streams"
            assert int(refused.headers["retry-after"]) >= 1
            other = _owner()  # another principal is not counted against this one
            sid2 = _create(http, other)
            with _stream(served, other, sid2) as theirs:
                assert theirs.status == 200
        finally:
            for s in streams:
                s.close()
        time.sleep(0.5)
        with _stream(served, owner, sid) as again:  # closed streams no longer count
            assert again.status == 200


def test_a_stranger_gets_no_feed(served: Served) -> None:
    owner, stranger = _owner(), _owner()
    with served.client() as http:
        sid = _create(http, owner)
        answer = http.get(f"/v1/sessions/{sid}/changes", headers=stranger)
        assert answer.status_code in (403, 404)
        check_problem(answer)
        missing = http.get(f"/v1/sessions/{secrets.token_hex(16)}/changes", headers=owner)
        assert missing.status_code == 404
        bad = http.get(f"/v1/sessions/{sid}/changes?since=nonsense", headers=owner)
        assert bad.status_code == 422
        assert http.get(f"/v1/sessions/{sid}/changes").status_code == 401


def test_sigterm_ends_the_streams_at_once(
    redis_server: RedisServer, s3_server: S3Server, tmp_path: pytest.TempPathFactory
) -> None:
    owner = _owner()
    with serve(_env(redis_server, s3_server), tmp_path / "serve.log") as server:  # type: ignore[operator]
        with server.client() as http:
            sid = _create(http, owner)
        feed = _stream(server, owner, sid).start()
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = started + 10
        while not feed.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feed.ended, "the stream stayed open after SIGTERM"
        assert time.monotonic() - started < 5  # not the 20 s grace period
        # uvicorn finished cleanly; the CLI then re-raises the signal (exit status -15)
        assert server.process.wait(timeout=10) in (0, -signal.SIGTERM)
        feed.close()


def test_the_feed_metrics_count_streams_events_and_resets(served: Served) -> None:
    owner = _owner()
    with served.client() as http:
        sid = _create(http, owner)
        with _stream(served, owner, sid) as feed:
            _patch(http, owner, sid, "m")
            feed.wait_for(1)
            during = http.get("/metrics").text
        with _stream(served, owner, sid, since="1-0") as gone:  # never a position: reset
            gone.wait_for(1)
        after = http.get("/metrics").text
    (open_now,) = re.findall(r"^sessionmgr_feed_open_streams (\S+)$", during, re.MULTILINE)
    assert float(open_now) >= 1
    assert 'sessionmgr_feed_events_delivered_total{kind="patched"}' in after
    assert 'sessionmgr_feed_resets_total{reason="gone"}' in after
    assert "sessionmgr_feed_lag_seconds_count" in after
