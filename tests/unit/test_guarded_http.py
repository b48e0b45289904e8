"""The decisions of the guarded HTTP protocol, without sockets (tests/e2e/test_http_limits.py
drives it on a real server)."""

from __future__ import annotations

import json

from sessionmgr.api.guarded_http import BODY_RATE_GRACE_S, HttpLimits, body_too_slow, problem_bytes
from sessionmgr.settings import load_settings

LIMITS = HttpLimits(body_timeout_s=30.0, body_min_rate_bps=1000)


def test_a_body_within_the_grace_is_not_held_to_the_rate() -> None:
    assert not body_too_slow(LIMITS, BODY_RATE_GRACE_S - 0.1, 0)


def test_a_body_below_the_minimum_rate_after_the_grace_must_end() -> None:
    elapsed = BODY_RATE_GRACE_S + 1
    assert body_too_slow(LIMITS, elapsed, int(1000 * elapsed) - 1)
    assert not body_too_slow(LIMITS, elapsed, int(1000 * elapsed))


def test_a_body_past_the_timeout_must_end_whatever_its_rate() -> None:
    assert body_too_slow(LIMITS, 30.0, 10_000_000)


def test_a_zero_minimum_rate_leaves_only_the_timeout() -> None:
    limits = HttpLimits(body_timeout_s=30.0, body_min_rate_bps=0)
    assert not body_too_slow(limits, 29.0, 0)
    assert body_too_slow(limits, 30.0, 0)


def test_the_limits_come_from_the_settings() -> None:
    settings = load_settings(
        {
            "SESSIONMGR_MAX_HEAD_BYTES": "8192",
            "SESSIONMGR_MAX_HEADERS": "50",
            "SESSIONMGR_HEADER_TIMEOUT_S": "2.5",
            "SESSIONMGR_BODY_TIMEOUT_S": "12",
            "SESSIONMGR_BODY_MIN_RATE_BPS": "0",
            "SESSIONMGR_MAX_CONNECTIONS": "64",
        }
    )
    assert HttpLimits.of(settings) == HttpLimits(
        max_head_bytes=8192,
        max_headers=50,
        header_timeout_s=2.5,
        body_timeout_s=12.0,
        body_min_rate_bps=0,
        max_connections=64,
    )


def test_a_refusal_is_a_whole_problem_answer_that_closes() -> None:
    answer = problem_bytes(431, "head-too-large", "too big")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head
    problem = json.loads(body)
    assert problem["status"] == 431
    assert problem["title"] == "Request Header Fields Too Large"
