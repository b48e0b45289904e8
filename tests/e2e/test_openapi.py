"""The OpenAPI document lists every route with every status it can answer (DESIGN §4-5).

Also: the public operational routes answer without a token.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import pytest_asyncio
from litestar.testing import AsyncTestClient

from tests.e2e.conftest import Api

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROBLEM_JSON = "application/problem+json"
SID = "/v1/sessions/{session_id}"

# DESIGN §4: (method, path) -> the statuses a caller can meet there.
V1_COMMON = {401, 429, 503}  # 429: the per-principal rate limit
PER_SESSION = {403, 404}
BODY = {400, 413, 422}
IDEMPOTENT = {422}  # Idempotency-Key reused with another request
DESIGN_ROUTES: dict[tuple[str, str], tuple[int, set[int]]] = {
    ("POST", "/v1/sessions"): (201, V1_COMMON | BODY | IDEMPOTENT | {403}),
    ("GET", "/v1/sessions"): (200, V1_COMMON | {422}),
    ("GET", SID): (200, V1_COMMON | PER_SESSION | {422}),
    ("PATCH", SID): (200, V1_COMMON | PER_SESSION | BODY | {409, 428}),
    ("POST", f"{SID}/timeline"): (200, V1_COMMON | PER_SESSION | BODY | {409}),
    ("POST", f"{SID}/participants"): (200, V1_COMMON | PER_SESSION | BODY),
    ("PUT", f"{SID}/participants/{{mad_name}}/lease"): (200, V1_COMMON | PER_SESSION | {422}),
    ("DELETE", f"{SID}/participants/{{mad_name}}"): (204, V1_COMMON | PER_SESSION | {422}),
    ("POST", f"{SID}/suspend"): (200, V1_COMMON | PER_SESSION | IDEMPOTENT),
    ("POST", f"{SID}/resume"): (200, V1_COMMON | PER_SESSION | IDEMPOTENT),
    ("POST", f"{SID}/archive"): (200, V1_COMMON | PER_SESSION | IDEMPOTENT),
    ("DELETE", SID): (204, V1_COMMON | PER_SESSION | IDEMPOTENT),
    ("GET", "/health/live"): (200, set()),
    ("GET", "/health/ready"): (200, {503}),  # 503 when MongoDB cannot be reached
    ("GET", "/health"): (200, {503}),
    ("GET", "/metrics"): (200, set()),
}
# A lease renewal is a PUT, idempotent by nature: renewing twice leaves the same lease.
MUTATING = {
    key
    for key in DESIGN_ROUTES
    if key[0] != "GET" and key[1].startswith("/v1/") and not key[1].endswith("/lease")
}
PUBLIC = {key for key in DESIGN_ROUTES if not key[1].startswith("/v1/")}
BODY_ROUTES = {
    ("POST", "/v1/sessions"),
    ("PATCH", SID),
    ("POST", f"{SID}/timeline"),
    ("POST", f"{SID}/participants"),
}


@pytest_asyncio.fixture(loop_scope="module")
async def schema(api: AsyncTestClient[Any]) -> dict[str, Any]:
    r = await api.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def served_routes(api: AsyncTestClient[Any]) -> set[tuple[str, str]]:
    """(method, path) of every route the running app answers, in OpenAPI path syntax."""
    served = set()
    for route in api.app.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in getattr(route, "methods", ()):
            if method not in ("HEAD", "OPTIONS"):
                served.add((method, path.rstrip("/") or "/"))
    return served


def operation(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    paths = schema["paths"]
    assert path in paths, f"{path} is missing from the OpenAPI document"
    op = paths[path].get(method.lower())
    assert op is not None, f"{method} {path} is missing from the OpenAPI document"
    return op  # type: ignore[no-any-return]


def key_id(key: tuple[str, str]) -> str:
    return f"{key[0]} {key[1]}"


async def test_every_served_route_is_documented(api: AsyncTestClient[Any], schema: dict[str, Any]):
    documented = {
        (method.upper(), path)
        for path, ops in schema["paths"].items()
        for method in ops
        if method in {"get", "put", "post", "patch", "delete"}
    }
    # /schema documents the API; /ui and /static are the inspector's HTML pages and assets
    # for a browser (docs/ui.md), not part of the API a client is generated for.
    served = {r for r in served_routes(api) if not r[1].startswith(("/schema", "/ui", "/static"))}
    assert served - documented == set(), "served but not in the OpenAPI document"
    assert documented - served == set(), "documented but not served"


@pytest.mark.parametrize("key", sorted(DESIGN_ROUTES), ids=key_id)
async def test_design_route_documents_its_statuses(
    api: AsyncTestClient[Any], schema: dict[str, Any], key: tuple[str, str]
):
    method, path = key
    if key not in served_routes(api):
        pytest.fail(f"{method} {path} of DESIGN §4 is not served")
    success, problems = DESIGN_ROUTES[key]
    responses = operation(schema, method, path)["responses"]
    documented = {int(code) for code in responses if code.isdigit()}
    assert success in documented, f"{method} {path} does not document its {success}"
    missing = problems - documented
    assert not missing, f"{method} {path} does not document {sorted(missing)}"
    assert 500 not in documented


@pytest.mark.parametrize("key", sorted(k for k in DESIGN_ROUTES if k not in PUBLIC), ids=key_id)
async def test_problem_answers_are_problem_json(
    api: AsyncTestClient[Any], schema: dict[str, Any], key: tuple[str, str]
):
    assert key in served_routes(api), f"{key_id(key)} of DESIGN §4 is not served"
    responses = operation(schema, *key)["responses"]
    for code, response in responses.items():
        if code.isdigit() and int(code) >= 400:
            content = response.get("content", {})
            assert PROBLEM_JSON in content, f"{key_id(key)} {code} is not problem+json: {content}"
            ref = content[PROBLEM_JSON]["schema"].get("$ref", "")
            assert ref.endswith("/Problem"), (code, content)


async def test_problem_schema_has_the_rfc_9457_members(schema: dict[str, Any]):
    problem = schema["components"]["schemas"]["Problem"]
    assert {"type", "title", "status"} <= set(problem["properties"])
    assert {"type", "title", "status"} <= set(problem.get("required", []))
    assert "current_version" in problem["properties"], "409 answers carry current_version"


@pytest.mark.parametrize("key", sorted(MUTATING), ids=key_id)
async def test_mutations_document_the_idempotency_key(
    api: AsyncTestClient[Any], schema: dict[str, Any], key: tuple[str, str]
):
    assert key in served_routes(api), f"{key_id(key)} of DESIGN §4 is not served"
    params = operation(schema, *key).get("parameters", [])
    headers = {p["name"].lower() for p in params if p.get("in") == "header"}
    assert "idempotency-key" in headers, f"{key_id(key)} parameters: {params}"


async def test_patch_documents_if_match(schema: dict[str, Any]):
    params = operation(schema, "PATCH", SID).get("parameters", [])
    assert "if-match" in {p["name"].lower() for p in params if p.get("in") == "header"}


@pytest.mark.parametrize("key", sorted(BODY_ROUTES), ids=key_id)
async def test_body_routes_document_a_json_body(schema: dict[str, Any], key: tuple[str, str]):
    body = operation(schema, *key).get("requestBody")
    assert body is not None, f"{key_id(key)} documents no request body"
    assert "application/json" in body["content"]


async def test_no_internal_dependency_leaks_as_a_parameter(schema: dict[str, Any]):
    """A dependency shown as a parameter would invite clients to send it (STYLE: no @inject)."""
    leaked = [
        (path, method, p["name"])
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict)
        for p in op.get("parameters", [])
        if p["name"] in {"sessions", "request", "container", "verifier", "data"}
        or (p["name"] == "state" and p.get("in") != "query")
    ]
    assert leaked == []


async def test_list_documents_its_query_parameters(schema: dict[str, Any]):
    params = {p["name"]: p for p in operation(schema, "GET", "/v1/sessions")["parameters"]}
    assert {"state", "limit", "cursor"} <= set(params)
    assert all(params[name]["in"] == "query" for name in ("state", "limit", "cursor"))
    text = repr(params["state"]["schema"])
    for ref in re.findall(r"#/components/schemas/(\w+)", text):
        text += repr(schema["components"]["schemas"][ref])
    assert all(state in text for state in ("active", "dormant", "archived")), text


async def test_bearer_security_scheme_guards_v1(schema: dict[str, Any]):
    schemes = schema["components"]["securitySchemes"]
    bearer = [
        name
        for name, s in schemes.items()
        if s.get("type") == "http" and s.get("scheme", "").lower() == "bearer"
    ]
    assert bearer, f"no HTTP bearer scheme in {schemes}"
    for path, ops in schema["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            required = op.get("security", schema.get("security", []))
            names = {name for requirement in required for name in requirement}
            assert names & set(bearer), f"{method.upper()} {path} does not require the bearer"


@pytest.mark.parametrize("key", sorted(PUBLIC), ids=key_id)
async def test_public_routes_are_documented_as_public(schema: dict[str, Any], key: tuple[str, str]):
    """Under a global bearer requirement, a public route must say `security: []`."""
    op = operation(schema, *key)
    required = op.get("security", schema.get("security", []))
    assert required in ([], [{}]), f"{key_id(key)} is documented as needing {required}"


# -- the public routes answer without a token ------------------------------------------------


async def test_liveness_answers_without_a_token(api: AsyncTestClient[Any]):
    r = await api.get("/health/live")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "alive"


@pytest.mark.parametrize("path", ["/health/ready", "/health"])
async def test_readiness_answers_without_a_token(api: AsyncTestClient[Any], path: str):
    r = await api.get(path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert {name: b["status"] for name, b in body["backends"].items()} == {
        "redis": "up",
        "mongodb": "up",
    }


async def test_metrics_answer_without_a_token(app_api: Api, cast: Any):
    await app_api.create(cast.owner)  # so that a request has been counted
    r = await app_api.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert "sessionmgr_http_requests" in r.text
    assert 'route="/v1/sessions"' in r.text


async def test_schema_answers_without_a_token(api: AsyncTestClient[Any]):
    r = await api.get("/schema/openapi.json")
    assert r.status_code == 200
    assert r.json()["openapi"].startswith("3.")


async def test_public_routes_ignore_a_bad_token(api: AsyncTestClient[Any]):
    bad = {"Authorization": "Bearer not-a-token"}
    for path in ("/health/live", "/health/ready", "/metrics"):
        r = await api.get(path, headers=bad)
        assert r.status_code == 200, (path, r.text)


# -- a document to generate clients from (issue 12) ------------------------------------------

OPERATION_IDS = {
    ("POST", "/v1/sessions"): "createSession",
    ("GET", "/v1/sessions"): "listSessions",
    ("GET", SID): "getSession",
    ("PATCH", SID): "updateSession",
    ("POST", f"{SID}/timeline"): "appendTimeline",
    ("POST", f"{SID}/participants"): "addParticipant",
    ("PUT", f"{SID}/participants/{{mad_name}}/lease"): "renewLease",
    ("DELETE", f"{SID}/participants/{{mad_name}}"): "removeParticipant",
    ("POST", f"{SID}/suspend"): "suspendSession",
    ("POST", f"{SID}/resume"): "resumeSession",
    ("POST", f"{SID}/archive"): "archiveSession",
    ("DELETE", SID): "deleteSession",
}
SESSION_WRITES = {
    key for key in OPERATION_IDS if key[0] != "GET" and key != ("POST", "/v1/sessions")
}


@pytest.mark.parametrize("key", sorted(OPERATION_IDS), ids=key_id)
async def test_operations_have_stable_ids_summaries_descriptions_and_tags(
    schema: dict[str, Any], key: tuple[str, str]
):
    op = operation(schema, *key)
    assert op["operationId"] == OPERATION_IDS[key]
    assert op.get("summary") and op.get("description"), op.get("summary")
    assert op.get("tags") == ["sessions"]


async def test_operation_ids_are_unique(schema: dict[str, Any]):
    ids = [
        op["operationId"]
        for ops in schema["paths"].values()
        for op in ops.values()
        if isinstance(op, dict) and "operationId" in op
    ]
    assert len(ids) == len(set(ids)), ids


def _request_headers(op: dict[str, Any]) -> set[str]:
    return {p["name"] for p in op.get("parameters", []) if p.get("in") == "header"}


@pytest.mark.parametrize("key", sorted(SESSION_WRITES), ids=key_id)
async def test_session_writes_document_their_request_headers_and_412(
    schema: dict[str, Any], key: tuple[str, str]
):
    op = operation(schema, *key)
    assert {"If-Match", "Lease-Token"} <= _request_headers(op)
    if not key[1].endswith("/lease"):
        assert "Idempotency-Key" in _request_headers(op)
    assert "412" in op["responses"]


async def test_conditional_get_is_documented(schema: dict[str, Any]):
    op = operation(schema, "GET", SID)
    assert "If-None-Match" in _request_headers(op)
    assert "ETag" in op["responses"]["304"]["headers"]
    assert "ETag" in op["responses"]["200"]["headers"]
    assert schema["paths"][SID]["head"]["operationId"] == "headSession"


@pytest.mark.parametrize(
    ("key", "status", "header"),
    [
        (("POST", "/v1/sessions"), "201", "Location"),
        (("POST", "/v1/sessions"), "201", "ETag"),
        (("POST", "/v1/sessions"), "201", "Idempotent-Replayed"),
        (("PATCH", SID), "200", "Idempotent-Replayed"),
        (("PATCH", SID), "412", "ETag"),
        (("PATCH", SID), "401", "WWW-Authenticate"),
        (("PATCH", SID), "429", "Retry-After"),
        (("PATCH", SID), "429", "RateLimit"),
        (("PATCH", SID), "429", "RateLimit-Policy"),
        (("PATCH", SID), "503", "Retry-After"),
        (("GET", "/v1/sessions"), "200", "X-Request-ID"),
        (("GET", SID), "404", "X-Request-ID"),
    ],
)
async def test_response_headers_are_declared_with_a_schema(
    schema: dict[str, Any], key: tuple[str, str], status: str, header: str
):
    declared = operation(schema, *key)["responses"][status].get("headers", {})
    assert header in declared, (status, sorted(declared))
    assert declared[header].get("schema"), declared[header]


async def test_the_patch_body_names_its_allowed_keys(schema: dict[str, Any]):
    patch = schema["components"]["schemas"]["PatchBody"]["properties"]["patch"]
    assert set(patch["properties"]) == {"work_in_progress", "context_summary", "full_context"}
    assert patch["additionalProperties"] is False


@pytest.mark.parametrize("key", sorted(BODY_ROUTES), ids=key_id)
async def test_bodies_have_real_examples(schema: dict[str, Any], key: tuple[str, str]):
    content = operation(schema, *key)["requestBody"]["content"]["application/json"]
    (example,) = content["examples"].values()
    assert example["value"] and "string" not in repr(example["value"]), example


async def test_problem_examples_are_real_problems(schema: dict[str, Any]):
    examples = operation(schema, "PATCH", SID)["responses"]["409"]["content"][PROBLEM_JSON]
    values = [e["value"] for e in examples["examples"].values()]
    assert {v["type"] for v in values} >= {"/problems#version-conflict"}
    assert all(v["status"] == 409 and v["detail"] for v in values)


async def test_metrics_are_documented_as_text(schema: dict[str, Any]):
    assert set(operation(schema, "GET", "/metrics")["responses"]["200"]["content"]) == {
        "text/plain"
    }


async def test_a_create_may_come_without_a_body(schema: dict[str, Any]):
    assert operation(schema, "POST", "/v1/sessions")["requestBody"]["required"] is False


def _examples(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """(where, media schema, example value) for every example of a body or an answer."""
    found = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if not isinstance(op, dict):
                continue
            media = [("request", op.get("requestBody", {}).get("content", {}))]
            media += [(code, r.get("content", {})) for code, r in op.get("responses", {}).items()]
            for where, content in media:
                for media_type in content.values():
                    for example in media_type.get("examples", {}).values():
                        name = f"{method.upper()} {path} {where}"
                        found.append((name, media_type["schema"], example["value"]))
    return found


async def test_every_example_fits_its_schema(schema: dict[str, Any]):
    examples = _examples(schema)
    assert len(examples) > 50, "the document lost its examples"
    for where, media_schema, value in examples:
        root = {**media_schema, "components": schema["components"]}
        errors = [e.message for e in jsonschema.Draft202012Validator(root).iter_errors(value)]
        assert not errors, (where, value, errors)
