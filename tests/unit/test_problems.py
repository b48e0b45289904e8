"""api/problems.py: every error becomes the right status and an RFC 9457 problem+json body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar, get, post
from litestar.params import FromPath, JSONBody
from litestar.testing import TestClient

from sessionmgr.api.problem_types import CATALOGUE
from sessionmgr.api.problems import _STATUS, EXCEPTION_HANDLERS, PROBLEM_JSON, responses
from sessionmgr.domain.errors import (
    AccessDenied,
    AuthenticationFailed,
    BackendUnavailable,
    ConcurrencyConflict,
    Fenced,
    IdempotencyKeyReused,
    InvalidInput,
    LeaseExpired,
    PayloadTooLarge,
    RateLimited,
    ReadOnlyMode,
    SessionDormant,
    SessionError,
    SessionNotFound,
    VersionRequired,
    WriteContended,
)

SID = "0123456789abcdef0123456789abcdef"
ERRORS: dict[str, SessionError] = {
    "unauthenticated": AuthenticationFailed("token expired"),
    "forbidden": AccessDenied(),
    "not-found": SessionNotFound(SID),
    "conflict": ConcurrencyConflict(SID, 7),
    "too-large": PayloadTooLarge("work_in_progress is 300000 bytes encoded; the limit is 262144"),
    "reused": IdempotencyKeyReused(),
    "invalid": InvalidInput("'acl' cannot be patched", "patch.acl"),
    "version-required": VersionRequired(),
    "mongodb-down": BackendUnavailable("mongodb", "ServerSelectionTimeoutError", 3),
    "read-only": ReadOnlyMode(),
    "rate-limited": RateLimited(4),
    "lease-expired": LeaseExpired(SID, "planner"),
    "fenced": Fenced(SID, "planner", 3),
    "dormant": SessionDormant(SID),
    "contended": WriteContended(SID, 23, 2.01),
}


class Body(msgspec.Struct, forbid_unknown_fields=True):
    expected_version: int


@get("/v1/sessions/{session_id:str}/raise/{name:str}")
async def raise_domain_error(session_id: FromPath[str], name: FromPath[str]) -> None:
    raise ERRORS[name]


@get("/v1/boom")
async def boom() -> None:
    raise RuntimeError("secret internals: password=hunter2")


@post("/v1/echo")
async def echo(data: JSONBody[Body]) -> Body:
    return data


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    app = Litestar(
        [raise_domain_error, boom, echo],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=1024,
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def problem_of(client: TestClient[Litestar], name: str) -> tuple[Any, dict[str, Any]]:
    response = client.get(f"/v1/sessions/{SID}/raise/{name}")
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    return response, response.json()


@pytest.mark.parametrize(
    ("name", "status", "slug"),
    [
        ("unauthenticated", 401, "unauthenticated"),
        ("forbidden", 403, "forbidden"),
        ("not-found", 404, "not-found"),
        ("conflict", 409, "version-conflict"),
        ("too-large", 413, "too-large"),
        ("reused", 422, "idempotency-key-reused"),
        ("invalid", 422, "invalid-input"),
        ("version-required", 428, "version-required"),
        ("mongodb-down", 503, "backend-unavailable"),
        ("read-only", 503, "backend-unavailable"),
        ("rate-limited", 429, "rate-limited"),
        ("lease-expired", 409, "lease-expired"),
        ("fenced", 409, "fenced"),
        ("dormant", 409, "dormant"),
        ("contended", 503, "contended"),
    ],
)
def test_each_domain_error_has_its_status_and_problem_body(
    client: TestClient[Litestar], name: str, status: int, slug: str
) -> None:
    response, body = problem_of(client, name)
    assert response.status_code == status
    assert body["status"] == status
    assert body["type"] == f"/problems#{slug}"
    assert body["title"]
    assert body["detail"] == str(ERRORS[name])
    assert body["instance"] == f"/v1/sessions/{SID}/raise/{name}"


def test_a_conflict_carries_the_current_version(client: TestClient[Litestar]) -> None:
    _, body = problem_of(client, "conflict")
    assert body["current_version"] == 7


def test_invalid_input_names_the_field(client: TestClient[Litestar]) -> None:
    _, body = problem_of(client, "invalid")
    assert body["errors"] == [{"field": "/patch/acl", "message": str(ERRORS["invalid"])}]


def test_unavailable_names_the_backend_and_when_to_retry(client: TestClient[Litestar]) -> None:
    response, body = problem_of(client, "mongodb-down")
    assert body["backend"] == "mongodb"
    assert response.headers["retry-after"] == "3"
    response, body = problem_of(client, "read-only")
    assert body["backend"] == "redis"
    assert response.headers["retry-after"] == "2"


def test_contended_says_when_to_retry_and_names_no_version(client: TestClient[Litestar]) -> None:
    """A write beaten by others until its budget ran out: no version was stale, so none is
    named (nor counted as a version conflict); the same request again is safe."""
    response, body = problem_of(client, "contended")
    assert response.headers["retry-after"] == "1"
    assert set(body) == {"type", "title", "status", "detail", "instance"}
    assert "lost the race 23 times in 2.0 s" in body["detail"]


def test_rate_limited_says_when_to_retry(client: TestClient[Litestar]) -> None:
    response, body = problem_of(client, "rate-limited")
    assert response.headers["retry-after"] == "4"
    assert "backend" not in body


def test_unauthenticated_asks_for_a_bearer_token(client: TestClient[Litestar]) -> None:
    response, _ = problem_of(client, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("name", ["forbidden", "not-found", "too-large", "version-required"])
def test_plain_problems_carry_no_extension_members(client: TestClient[Litestar], name: str) -> None:
    response, body = problem_of(client, name)
    assert set(body) == {"type", "title", "status", "detail", "instance"}
    assert "retry-after" not in response.headers


def test_an_unexpected_error_is_a_500_without_internals(client: TestClient[Litestar]) -> None:
    response = client.get("/v1/boom")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert response.json()["type"] == "/problems#internal"


def test_malformed_json_is_a_400_problem(client: TestClient[Litestar]) -> None:
    response = client.post(
        "/v1/echo", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["status"] == 400


def test_a_body_that_breaks_the_schema_is_a_422_listing_the_errors(
    client: TestClient[Litestar],
) -> None:
    response = client.post("/v1/echo", json={"expected_version": "three"})
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "/problems#invalid-input"
    assert body["errors"]


def test_a_body_over_the_limit_is_a_413_problem(client: TestClient[Litestar]) -> None:
    response = client.post(
        "/v1/echo", content=b" " * 2048, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["type"] == "/problems#too-large"


def test_unknown_routes_and_methods_are_problems(client: TestClient[Litestar]) -> None:
    missing = client.get("/v1/nowhere")
    assert (missing.status_code, missing.json()["type"]) == (
        404,
        "/problems#not-found",
    )
    wrong = client.delete("/v1/echo")
    assert (wrong.status_code, wrong.json()["type"]) == (
        405,
        "/problems#method-not-allowed",
    )
    assert wrong.headers["content-type"].startswith(PROBLEM_JSON)


def test_openapi_entries_describe_problem_answers() -> None:
    specs = responses(401, 409, 503)
    assert set(specs) == {401, 409, 503}
    assert all(spec.media_type == PROBLEM_JSON for spec in specs.values())
    assert specs[409].description == "Conflict"


def test_every_problem_type_is_explained_at_problems() -> None:
    """Each `type` an answer can carry has its section in the catalogue behind `/problems`
    (and docs/problems.md): a new domain error needs its explanation too."""
    explained = {t.slug: t.status for t in CATALOGUE}
    for _, status, slug in _STATUS:
        assert explained.get(slug) == status, f"{slug} ({status}) is not in the catalogue"
    for slug in ("malformed", "not-found", "method-not-allowed", "too-large", "internal"):
        assert slug in explained
