"""Every problem type of the server's catalogue maps to its exception; odd answers too."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest
from sessionmgr_client import Conflict, Fenced, LeaseLost, ProblemError, RateLimited, Unavailable
from sessionmgr_client._errors import BY_SLUG, BY_STATUS, MAX_RETRY_AFTER_S, error_for

from sessionmgr.api.problem_types import CATALOGUE, ProblemType

REQUEST = httpx.Request("GET", "http://x/v1/sessions/abc")


def answer(status: int, body: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers, request=REQUEST)


def problem(slug: str, status: int) -> httpx.Response:
    body = (
        f'{{"type":"/problems#{slug}","title":"t","status":{status},'
        f'"detail":"d","instance":"/v1/sessions/abc","current_version":3}}'
    ).encode()
    return answer(status, body, **{"Content-Type": "application/problem+json"})


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda t: t.slug)
def test_every_catalogued_type_has_a_typed_exception(entry: ProblemType) -> None:
    """A type the client does not know yet (one added on the server since) still gets the
    exception of its status, never the bare ProblemError."""
    slug, status = entry.slug, entry.status
    error = error_for(problem(slug, status))
    expected = BY_SLUG.get(slug) or BY_STATUS.get(status)
    assert expected is not None, f"/problems#{slug} ({status}) maps to no exception"
    assert type(error) is expected
    assert (error.status, error.problem.slug, error.problem.current_version) == (status, slug, 3)


def test_lease_losses_share_a_base() -> None:
    assert isinstance(error_for(problem("fenced", 409)), Fenced | LeaseLost)
    assert not isinstance(error_for(problem("version-conflict", 409)), LeaseLost)


def test_retry_after_seconds_and_dates_are_read_and_capped() -> None:
    limited = error_for(answer(429, b"{}", **{"Retry-After": "2"}))
    assert isinstance(limited, RateLimited)
    assert limited.retry_after == 2.0
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert error_for(answer(503, b"", **{"Retry-After": far})).retry_after == MAX_RETRY_AFTER_S


def test_an_answer_that_is_no_problem_document_still_raises_by_status() -> None:
    error = error_for(answer(502, b"<html>bad gateway</html>", **{"Content-Type": "text/html"}))
    assert type(error) is ProblemError
    assert error.status == 502
    assert "bad gateway" in error.problem.detail
    broken = error_for(answer(503, b"{not json", **{"Content-Type": "application/json"}))
    assert isinstance(broken, Unavailable)
    assert type(error_for(problem("version-conflict", 409))) is Conflict
