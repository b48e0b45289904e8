"""What the OpenAPI document says beyond what Litestar derives from the handlers.

Litestar documents each route from its signature; a client generator also needs the headers
of every answer (problem answers included), the 304 of a conditional GET, the allowed keys of
a patch and real examples. `complete_openapi` adds them once, at start-up, to the document
Litestar then serves at `/schema/openapi.json`.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi.spec import (
    Example,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)

STRING = Schema(type=OpenAPIType.STRING)
INTEGER = Schema(type=OpenAPIType.INTEGER)
OBJECT = Schema(type=OpenAPIType.OBJECT, additional_properties=True)
MUTATING = {"post", "put", "patch", "delete"}


def _header(description: str, schema: Schema = STRING) -> OpenAPIHeader:
    return OpenAPIHeader(schema=schema, description=description)


REQUEST_ID = _header(
    "The caller's X-Request-ID, echoed; else the request's trace id (from its traceparent, or "
    "a new one). Quote it when reporting a problem."
)
RETRY_AFTER = _header("Seconds to wait before retrying.", INTEGER)
PROBLEM_HEADERS: dict[str, dict[str, OpenAPIHeader]] = {
    "401": {"WWW-Authenticate": _header('`Bearer realm="sessionmgr"`: send a bearer token.')},
    "412": {"ETag": _header("The session's current version tag; any tag of it passes If-Match.")},
    "429": {
        "Retry-After": RETRY_AFTER,
        "RateLimit": _header('The caller\'s remaining quota: `"default";r=0;t=<seconds>`.'),
        "RateLimit-Policy": _header(
            'The caller\'s limit: `"<policy>";q=<requests>;w=<seconds>` (`default` or `service`).'
        ),
    },
    "503": {"Retry-After": RETRY_AFTER},
}
IDEMPOTENT_REPLAYED = _header(
    "`true` when this is the stored answer to an earlier request with the same Idempotency-Key."
)
NOT_MODIFIED = OpenAPIResponse(
    description="Not Modified: the ETag sent as If-None-Match is current; no body.",
    headers={"ETag": _header("The current entity tag (the one sent).")},
)
PATCH_FIELDS = Schema(
    type=OpenAPIType.OBJECT,
    description="The fields to replace, each as a whole; at least one.",
    properties={
        "work_in_progress": OBJECT,
        "context_summary": OBJECT,
        "full_context": OBJECT,
    },
    additional_properties=False,
    min_properties=1,
)
SESSION_ID = "0f8fad5bd9cb469fa16570867728950e"
REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "createSession": {"work_in_progress": {"step": 1, "plan": ["draft", "review"]}},
    "updateSession": {"expected_version": 3, "patch": {"work_in_progress": {"step": 2}}},
    "appendTimeline": {"events": [{"kind": "note", "data": {"text": "draft ready"}}]},
    "addParticipant": {"mad_name": "planner"},
}
SESSION_EXAMPLE: dict[str, Any] = {
    "id": SESSION_ID,
    "version": 5,
    "state": "active",
    "owner_id": "alice",
    "acl": ["mad:planner"],
    "created_at": "2026-11-27T04:10:40.211000Z",
    "last_active": "2026-11-27T04:10:40.593000Z",
    "participants": {
        "planner": {
            "joined_at": "2026-11-27T04:10:40.593000Z",
            "lease_expires_at": "2026-11-27T04:11:10Z",
            "active": True,
            "token": 3,
            "lapsed_at": None,
        }
    },
    "work_in_progress": {"step": 2},
    "context_summary": {"goal": "ship"},
    "recent_timeline": [
        {
            "seq": 1,
            "at": "2026-11-27T04:10:40.572000Z",
            "actor": "alice",
            "kind": "note",
            "data": {"text": "hello"},
        }
    ],
    "archive": None,
}


async def complete_openapi(app: Litestar) -> None:
    """An `on_startup` hook: complete the document before it is first served."""
    document = app.openapi_schema
    for path, item in (document.paths or {}).items():
        for method in ("get", "put", "post", "patch", "delete", "head"):
            operation = getattr(item, method, None)
            if isinstance(operation, Operation):
                _complete(document, path, method, operation)
    schemas = document.components.schemas if document.components else None
    if schemas and isinstance(patch_body := schemas.get("PatchBody"), Schema):
        patch_body.properties = {**(patch_body.properties or {}), "patch": PATCH_FIELDS}


def _complete(document: OpenAPI, path: str, method: str, operation: Operation) -> None:
    responses = operation.responses or {}
    for status, response in responses.items():
        if not isinstance(response, OpenAPIResponse):
            continue
        headers = response.headers = dict(response.headers or {})
        for header in headers.values():
            if isinstance(header, OpenAPIHeader) and header.schema is None:
                header.schema = STRING
        headers["X-Request-ID"] = REQUEST_ID
        headers.update(PROBLEM_HEADERS.get(status, {}))
        if method in MUTATING and status.startswith("2") and path.startswith("/v1/"):
            headers["Idempotent-Replayed"] = IDEMPOTENT_REPLAYED
        if status.startswith("2") and response.content and "json" in next(iter(response.content)):
            _example_answer(response, operation.operation_id)
    if operation.operation_id in ("getSession", "headSession"):
        responses["304"] = NOT_MODIFIED
    if path == "/metrics" and "200" in responses:
        metrics = responses["200"]
        if isinstance(metrics, OpenAPIResponse):
            metrics.content = {"text/plain": OpenAPIMediaType(schema=STRING)}
            metrics.description = "Prometheus text exposition format 0.0.4."
    _example_request(operation)


ANSWER_EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    "Session": ("an active session", SESSION_EXAMPLE),
    "AppendResult": (
        "two events appended",
        {"version": 6, "appended": 2, "first_seq": 4, "last_seq": 5},
    ),
    "LeaseInfo": (
        "a renewed lease",
        {"mad_name": "planner", "expires_at": "2026-11-27T04:11:40Z", "token": 3},
    ),
    "ArchivedSession": (
        "the stub of an archived session",
        {
            **{k: SESSION_EXAMPLE[k] for k in ("id", "version", "owner_id", "acl", "created_at")},
            "state": "archived",
            "last_active": SESSION_EXAMPLE["last_active"],
            "archive": {
                "key": f"sessions/2026/11/{SESSION_ID}.json.gz",
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "size": 18234,
                "archived_at": "2026-12-30T03:17:02.114000Z",
            },
            "body_archived": True,
            "restore": f"GET /v1/sessions/{SESSION_ID} brings the body back from the archive",
        },
    ),
}


def _example_answer(response: OpenAPIResponse, operation_id: str | None) -> None:
    media = next(iter((response.content or {}).values()))
    schema = media.schema
    if isinstance(schema, Reference):
        name = schema.ref.rsplit("/", 1)[-1]
        if name in ANSWER_EXAMPLES:
            summary, value = ANSWER_EXAMPLES[name]
            media.examples = {name.lower(): Example(summary=summary, value=value)}


def _example_request(operation: Operation) -> None:
    body = operation.request_body
    example = REQUEST_EXAMPLES.get(operation.operation_id or "")
    if not isinstance(body, RequestBody) or example is None:
        return
    for media in body.content.values():
        media.examples = {"example": Example(summary=operation.summary, value=example)}
    if operation.operation_id == "createSession":
        body.required = False  # no body: a session with every default
