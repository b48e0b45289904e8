"""Bad input on every route: a 4xx problem+json (DESIGN §4), never a 500, and nothing changed."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.e2e.conftest import Api, Cast, assert_problem, stable

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIB = 1_048_576
MAX_FIELD = 262_144
JSON = {"content-type": "application/json"}

# name -> (method, path, a valid body); `{sid}` is the session, `{v}` its version.
BODY_ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "create": ("POST", "/v1/sessions", {"work_in_progress": {"a": 1}}),
    "patch": (
        "PATCH",
        "/v1/sessions/{sid}",
        {"expected_version": "{v}", "patch": {"work_in_progress": {"a": 2}}},
    ),
    "append": ("POST", "/v1/sessions/{sid}/timeline", {"events": [{"kind": "note", "data": {}}]}),
    "add_participant": ("POST", "/v1/sessions/{sid}/participants", {"mad_name": "helper"}),
}
# name -> (method, path, a valid body or None); `{mad}` is a MAD already in the session.
SESSION_ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "get": ("GET", "/v1/sessions/{sid}", None),
    "patch": BODY_ROUTES["patch"],
    "append": BODY_ROUTES["append"],
    "add_participant": BODY_ROUTES["add_participant"],
    "renew_lease": ("PUT", "/v1/sessions/{sid}/participants/{mad}/lease", None),
    "remove_participant": ("DELETE", "/v1/sessions/{sid}/participants/{mad}", None),
    "suspend": ("POST", "/v1/sessions/{sid}/suspend", None),
    "resume": ("POST", "/v1/sessions/{sid}/resume", None),
    "archive": ("POST", "/v1/sessions/{sid}/archive", None),
    "delete": ("DELETE", "/v1/sessions/{sid}", None),
}


@pytest_asyncio.fixture(loop_scope="module")
async def target(app_api: Api, cast: Cast) -> dict[str, Any]:
    """alice's session with one MAD, as `GET ?include=full` shows it."""
    session = await app_api.create(cast.owner, work_in_progress={"step": 1})
    await app_api.add(session["id"], cast.owner, cast.mad)
    return await app_api.full(session["id"], cast.owner)


def fill(text: str, session: dict[str, Any], cast: Cast) -> str:
    return text.format(sid=session["id"], v=session["version"], mad=cast.mad)


def valid_body(route: str, session: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(BODY_ROUTES[route][2]))
    if body.get("expected_version") == "{v}":
        body["expected_version"] = session["version"]
    return body


async def send(
    api: Api,
    cast: Cast,
    route: str,
    session: dict[str, Any],
    *,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    method, path, _ = BODY_ROUTES.get(route) or SESSION_ROUTES[route]
    all_headers = api.h(cast.owner, **(headers or {}))
    if raw is not None:
        return await api.client.request(
            method, fill(path, session, cast), content=raw, headers={**all_headers, **JSON}
        )
    return await api.client.request(
        method, fill(path, session, cast), json=body, headers=all_headers
    )


async def assert_unchanged(
    api: Api, cast: Cast, before: dict[str, Any], route: str = "create"
) -> None:
    """The session reads as before; after a refused create, no other session appeared."""
    after = await api.full(before["id"], cast.owner)
    assert stable(after) == stable(before), "a refused request changed the session"
    if route == "create":
        assert [s["id"] for s in await api.list_all(cast.owner)] == [before["id"]]


def nest(depth: int, shape: str, leaf: str = "1") -> str:
    if shape == "object":
        return '{"a":' * depth + leaf + "}" * depth
    return "[" * depth + leaf + "]" * depth


def with_value(route: str, session: dict[str, Any], raw_value: str) -> bytes:
    """A valid body for `route` whose free-form object holds `raw_value` (raw JSON text)."""
    if route == "create":
        text = f'{{"work_in_progress": {{"x": {raw_value}}}}}'
    elif route == "patch":
        patch = f'{{"work_in_progress": {{"x": {raw_value}}}}}'
        text = f'{{"expected_version": {session["version"]}, "patch": {patch}}}'
    elif route == "append":
        text = f'{{"events": [{{"kind": "note", "data": {{"x": {raw_value}}}}}]}}'
    else:
        text = f'{{"mad_name": {raw_value}}}'
    return text.encode()


# -- malformed and mistyped bodies ---------------------------------------------------------

MALFORMED = {
    "truncated": b'{"work_in_progress": {"a": 1}',
    "bare_word": b"{bad",
    "single_quotes": b"{'mad_name': 'x'}",
    "trailing_data": b"{}{}",
    "nan": b'{"work_in_progress": {"a": NaN}}',
    "invalid_utf8": b'{"mad_name": "\xff\xfe"}',
    "lone_surrogate": b'{"mad_name": "\\ud800"}',
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_malformed_json_is_400(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, payload: bytes
):
    r = await send(app_api, cast, route, target, raw=payload)
    assert_problem(r, 400)
    await assert_unchanged(app_api, cast, target, route)


@pytest.mark.parametrize("route", [r for r in BODY_ROUTES if r != "create"])
async def test_empty_body_is_4xx(app_api: Api, cast: Cast, target: dict[str, Any], route: str):
    """A create without a body is a create with every default (tests/e2e/test_contract.py)."""
    r = await send(app_api, cast, route, target, raw=b"")
    problem = assert_problem(r, (400, 422))
    assert "'data'" not in r.text, problem  # the framework's KeyError is not the client's to read
    await assert_unchanged(app_api, cast, target, route)


WRONG_TYPES: list[tuple[str, Any]] = [
    ("create", None),
    ("create", []),
    ("create", "x"),
    ("create", {"work_in_progress": 3}),
    ("create", {"work_in_progress": [1]}),
    ("create", {"context_summary": "x"}),
    ("create", {"owner_id": 5}),
    ("create", {"owner_id": ""}),
    ("create", {"owner_id": "x" * 257}),
    ("patch", {"expected_version": "{v-str}", "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": 1.5, "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": True, "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": 0, "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": -1, "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": 2**70, "patch": {"work_in_progress": {}}}),
    ("patch", {"expected_version": "{v}", "patch": [{"work_in_progress": {}}]}),
    ("patch", {"expected_version": "{v}", "patch": "work_in_progress"}),
    ("patch", {"expected_version": "{v}"}),
    ("patch", []),
    ("append", {"events": {"kind": "note"}}),
    ("append", {"events": [3]}),
    ("append", {"events": [{"kind": "note", "data": [1]}]}),
    ("append", {"events": [{"kind": "note", "data": "x"}]}),
    ("append", {"events": [{"data": {}}]}),
    ("append", {"events": [{"kind": "note"}], "expected_version": "{v-str}"}),
    ("append", {}),
    ("add_participant", {"mad_name": 3}),
    ("add_participant", {"mad_name": ["planner"]}),
    ("add_participant", {"mad_name": None}),
    ("add_participant", {}),
]


def _fill_version(body: Any, session: dict[str, Any]) -> Any:
    """`{v}` becomes the current version; `{v-str}` the same number as a JSON string."""
    if isinstance(body, dict) and body.get("expected_version") == "{v}":
        return {**body, "expected_version": session["version"]}
    if isinstance(body, dict) and body.get("expected_version") == "{v-str}":
        return {**body, "expected_version": str(session["version"])}
    return body


@pytest.mark.parametrize(
    ("route", "body"), WRONG_TYPES, ids=[f"{r}-{b!r}"[:60] for r, b in WRONG_TYPES]
)
async def test_wrong_types_are_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, body: Any
):
    r = await send(
        app_api, cast, route, target, raw=json.dumps(_fill_version(body, target)).encode()
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


UNKNOWN_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("create", {"work_in_progress": {}, "zzz": 1}),
    ("create", {"id": "0" * 32}),
    ("create", {"full_context": {}}),
    ("create", {"acl": ["mad:x"]}),
    ("patch", {"expected_version": "{v}", "patch": {"work_in_progress": {}}, "extra": 1}),
    ("append", {"events": [{"kind": "note"}], "extra": 1}),
    ("append", {"events": [{"kind": "note", "seq": 1}]}),
    ("append", {"events": [{"kind": "note", "actor": "mad:someone-else"}]}),
    ("append", {"events": [{"kind": "note", "at": "2020-01-01T00:00:00Z"}]}),
    ("add_participant", {"mad_name": "helper", "role": "admin"}),
]


@pytest.mark.parametrize(
    ("route", "body"), UNKNOWN_FIELDS, ids=[f"{r}-{sorted(b)}" for r, b in UNKNOWN_FIELDS]
)
async def test_unknown_fields_are_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, body: dict[str, Any]
):
    r = await send(app_api, cast, route, target, body=_fill_version(body, target))
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


# -- what a patch may name -------------------------------------------------------------------

IMMUTABLE = {
    "id": "0" * 32,
    "version": 99,
    "state": "archived",
    "owner_id": "mallory",
    "acl": ["mallory"],
    "created_at": "2020-01-01T00:00:00Z",
    "last_active": "2020-01-01T00:00:00Z",
    "participants": {"mallory": {}},
    "recent_timeline": [],
    "full_timeline": [],
    "archive": None,
    "timeline_seq": 0,
    "no_such_field": {},
}


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "with_a_legal_field"])
@pytest.mark.parametrize(("field", "value"), IMMUTABLE.items(), ids=IMMUTABLE.keys())
async def test_patching_an_immutable_field_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], field: str, value: Any, alone: bool
):
    patch = {field: value} if alone else {"work_in_progress": {"sneaky": 1}, field: value}
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"expected_version": target["version"], "patch": patch},
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "patch")


async def test_empty_patch_is_422(app_api: Api, cast: Cast, target: dict[str, Any]):
    r = await send(
        app_api, cast, "patch", target, body={"expected_version": target["version"], "patch": {}}
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "patch")


@pytest.mark.parametrize("value", [3, "text", [1, 2], None, True], ids=repr)
@pytest.mark.parametrize("field", ["work_in_progress", "context_summary", "full_context"])
async def test_patch_field_that_is_not_an_object_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], field: str, value: Any
):
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"expected_version": target["version"], "patch": {field: value}},
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "patch")


# -- sizes ---------------------------------------------------------------------------------


def oversized(route: str, session: dict[str, Any], size: int) -> bytes:
    filler = "x" * size
    return with_value(route, session, json.dumps(filler))


@pytest.mark.parametrize("content_length", [True, False], ids=["content_length", "no_length"])
@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_body_over_max_body_bytes_is_413(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, content_length: bool
):
    body = oversized(route, target, MIB + 1024)
    method, path, _ = BODY_ROUTES[route]
    request = app_api.client.build_request(
        method, fill(path, target, cast), content=body, headers={**app_api.h(cast.owner), **JSON}
    )
    if not content_length:
        del request.headers["content-length"]
    r = await app_api.client.send(request)
    assert_problem(r, 413)
    await assert_unchanged(app_api, cast, target, route)


FIELD_OVER_LIMIT = {
    "create-work_in_progress": ("create", {"work_in_progress": {"x": "y" * (MAX_FIELD + 10)}}),
    "create-context_summary": ("create", {"context_summary": {"x": "y" * (MAX_FIELD + 10)}}),
    "patch-work_in_progress": ("patch", {"work_in_progress": {"x": "y" * (MAX_FIELD + 10)}}),
    "patch-context_summary": ("patch", {"context_summary": {"x": "y" * (MAX_FIELD + 10)}}),
    "patch-full_context": ("patch", {"full_context": {"x": "y" * (MAX_FIELD + 10)}}),
    "append-data": ("append", {"x": "y" * (MAX_FIELD + 10)}),
    # Half the limit as JSON, nearly three times it as MongoDB stores it (BSON): each array
    # element carries its index as its key.
    "create-work_in_progress-bson": ("create", {"work_in_progress": {"x": [0] * (MAX_FIELD // 4)}}),
    "patch-full_context-bson": ("patch", {"full_context": {"x": [0] * (MAX_FIELD // 4)}}),
    "append-data-bson": ("append", {"x": [0] * (MAX_FIELD // 4)}),
}


@pytest.mark.parametrize(
    ("route", "payload"), FIELD_OVER_LIMIT.values(), ids=FIELD_OVER_LIMIT.keys()
)
async def test_field_over_max_field_bytes_is_413(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, payload: dict[str, Any]
):
    if route == "patch":
        body: dict[str, Any] = {"expected_version": target["version"], "patch": payload}
    elif route == "append":
        body = {"events": [{"kind": "note", "data": payload}]}
    else:
        body = payload
    assert len(json.dumps(body)) < MIB, "the body itself must stay under the body limit"
    r = await send(app_api, cast, route, target, body=body)
    assert_problem(r, 413)
    await assert_unchanged(app_api, cast, target, route)


async def test_fields_just_under_the_limit_are_accepted(app_api: Api, cast: Cast):
    big = {"x": "y" * (MAX_FIELD - 100)}
    r = await app_api.client.post(
        "/v1/sessions",
        json={"work_in_progress": big, "context_summary": big},
        headers=app_api.h(cast.owner),
    )
    assert r.status_code == 201, r.text[:300]
    assert (await app_api.full(r.json()["id"], cast.owner))["context_summary"] == big


# -- what a stored value may look like -----------------------------------------------------


@pytest.mark.parametrize("shape", ["object", "array"])
@pytest.mark.parametrize("depth", [40, 1000, 5000])
@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_deeply_nested_json_is_4xx(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, depth: int, shape: str
):
    r = await send(app_api, cast, route, target, raw=with_value(route, target, nest(depth, shape)))
    assert_problem(r, (400, 413, 422))
    await assert_unchanged(app_api, cast, target, route)


BAD_KEYS = {
    "dollar": "$set",
    "dollar_only": "$",
    "dot": "a.b",
    "dot_only": ".",
    "empty": "",
    "nul": "a\x00b",
    "too_long": "k" * 257,
}


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
@pytest.mark.parametrize("route", ["create", "patch", "append"])
async def test_reserved_keys_are_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, key: str, nested: bool
):
    value = json.dumps({"ok": [{key: 1}]} if nested else {key: 1})
    r = await send(app_api, cast, route, target, raw=with_value(route, target, value))
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


BIG_INTS = {
    "2^63": str(2**63),
    "-2^63-1": str(-(2**63) - 1),
    "2^64": str(2**64),
    "10^30": str(10**30),
    "400_digits": "9" * 400,
    "in_a_list": f"[1, {2**63}]",
}


@pytest.mark.parametrize("number", BIG_INTS.values(), ids=BIG_INTS.keys())
@pytest.mark.parametrize("route", ["create", "patch", "append"])
async def test_integers_beyond_64_bits_are_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, number: str
):
    r = await send(app_api, cast, route, target, raw=with_value(route, target, number))
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


async def test_64_bit_boundaries_are_kept_exactly(app_api: Api, cast: Cast):
    wip = {"max": 2**63 - 1, "min": -(2**63)}
    session = await app_api.create(cast.owner, work_in_progress=wip)
    assert (await app_api.full(session["id"], cast.owner))["work_in_progress"] == wip


async def test_float_out_of_range_is_4xx(app_api: Api, cast: Cast, target: dict[str, Any]):
    r = await send(app_api, cast, "create", target, raw=with_value("create", target, "1e400"))
    assert_problem(r, (400, 422))
    await assert_unchanged(app_api, cast, target)


# -- odd ids and names in the path ---------------------------------------------------------

ODD_IDS = {
    "dotdot": "%2E%2E",
    "dotted": "planner.v2",
    "nul": "%00",
    "33_hex": "a" * 33,
    "31_hex": "a" * 31,
    "uppercase_hex": "A" * 32,
    "unicode": "é" * 32,
    "fullwidth_hex": "\uff46" * 32,  # FULLWIDTH LATIN SMALL LETTER F
    "1000_chars": "x" * 1000,
    "space": "%20" + "a" * 31,
    "unknown": "0123456789abcdef" * 2,
}


@pytest.mark.parametrize("odd", ODD_IDS.values(), ids=ODD_IDS.keys())
@pytest.mark.parametrize("route", SESSION_ROUTES)
async def test_odd_session_ids_are_404(app_api: Api, cast: Cast, route: str, odd: str):
    method, path, body = SESSION_ROUTES[route]
    url = path.format(sid=odd, mad=cast.mad)
    if body is not None:
        body = valid_body(route, {"version": 1})
    r = await app_api.client.request(method, url, json=body, headers=app_api.h(cast.owner))
    assert_problem(r, 404)
    assert await app_api.list_all(cast.owner) == [], "an odd id brought a session into being"


BAD_MAD_NAMES = [
    "",
    "-lead",
    ".hidden",
    "..",
    "planner.v2",  # a dotted key in `participants` would be a path to MongoDB
    "a b",
    "a/b",
    "mad:x",
    "x" * 65,
    "é",
    "a\x00b",
    "<b>",
]
BAD_MAD_PATHS = {
    "dotdot": "%2E%2E",
    "dotted": "planner.v2",
    "dash": "-lead",
    "space": "a%20b",
    "colon": "mad:x",
    "65_chars": "x" * 65,
    "unicode": "%C3%A9",
    "nul": "%00",
}


@pytest.mark.parametrize("name", BAD_MAD_NAMES, ids=repr)
async def test_bad_mad_name_in_body_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], name: str
):
    r = await send(app_api, cast, "add_participant", target, body={"mad_name": name})
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "add_participant")


@pytest.mark.parametrize("name", BAD_MAD_PATHS.values(), ids=BAD_MAD_PATHS.keys())
@pytest.mark.parametrize("route", ["renew_lease", "remove_participant"])
async def test_bad_mad_name_in_path_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, name: str
):
    method, path, _ = SESSION_ROUTES[route]
    url = path.format(sid=target["id"], mad=name)
    r = await app_api.client.request(method, url, headers=app_api.h(cast.owner))
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


# -- timeline events -----------------------------------------------------------------------

BAD_KINDS = ["", " ", "a b", "x" * 65, "-lead", "é", "<script>", "a\nb", None, 3, ["note"]]


@pytest.mark.parametrize("second", [False, True], ids=["first", "second_of_two"])
@pytest.mark.parametrize("kind", BAD_KINDS, ids=lambda k: repr(k)[:20])
async def test_bad_event_kind_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], kind: Any, second: bool
):
    events = [{"kind": "note"}, {"kind": kind}] if second else [{"kind": kind}]
    r = await send(app_api, cast, "append", target, body={"events": events})
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "append")


async def test_empty_events_list_is_422(app_api: Api, cast: Cast, target: dict[str, Any]):
    r = await send(app_api, cast, "append", target, body={"events": []})
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "append")


async def test_too_many_events_is_422(app_api: Api, cast: Cast, target: dict[str, Any]):
    events = [{"kind": "note", "data": {"i": i}} for i in range(101)]
    r = await send(app_api, cast, "append", target, body={"events": events})
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "append")


async def test_max_events_per_append_is_accepted(app_api: Api, cast: Cast, target: dict[str, Any]):
    events = [{"kind": "note", "data": {"i": i}} for i in range(100)]
    r = await send(app_api, cast, "append", target, body={"events": events})
    assert r.status_code == 200, r.text
    assert r.json()["appended"] == 100
    after = await app_api.full(target["id"], cast.owner)
    assert len(after["full_timeline"]) == len(target["full_timeline"]) + 100


# -- query strings -------------------------------------------------------------------------

BAD_LIST_QUERIES = {
    "limit_0": "limit=0",
    "limit_negative": "limit=-1",
    "limit_abc": "limit=abc",
    "limit_float": "limit=1.5",
    "limit_empty": "limit=",
    "cursor_garbage": "cursor=zz",
    "cursor_punctuation": "cursor=!!!",
    "cursor_not_an_id": "cursor=" + base64.urlsafe_b64encode(b"not-a-session-id").decode(),
    "cursor_huge": "cursor=" + "x" * 300,
    "cursor_nul": "cursor=%00",
    "state_bogus": "state=bogus",
}


@pytest.mark.parametrize("query", BAD_LIST_QUERIES.values(), ids=BAD_LIST_QUERIES.keys())
async def test_bad_list_query_is_400_or_422(app_api: Api, cast: Cast, query: str):
    r = await app_api.client.get(f"/v1/sessions?{query}", headers=app_api.h(cast.owner))
    assert_problem(r, (400, 422))


async def test_huge_limit_is_refused_or_capped(app_api: Api, cast: Cast):
    """DESIGN §5: page sizes are capped. A huge limit is either refused or served capped."""
    for i in range(101):
        r = await app_api.client.post(
            "/v1/sessions", json={"work_in_progress": {"i": i}}, headers=app_api.h(cast.owner)
        )
        assert r.status_code == 201, r.text
    r = await app_api.client.get("/v1/sessions?limit=100000", headers=app_api.h(cast.owner))
    if r.status_code != 200:
        assert_problem(r, (400, 422))
        return
    page = r.json()
    assert len(page["items"]) <= 100
    assert page["next_cursor"], "a capped page must say that more follow"


@pytest.mark.parametrize("value", ["bogus", "FULL", "", "full,bogus"])
async def test_bad_include_is_422(app_api: Api, cast: Cast, target: dict[str, Any], value: str):
    r = await app_api.client.get(
        f"/v1/sessions/{target['id']}", params={"include": value}, headers=app_api.h(cast.owner)
    )
    assert_problem(r, 422)


# -- versions ------------------------------------------------------------------------------

BAD_IF_MATCH = ["bogus", '"1', '1"', "W/", '"a" "b"']
# Well-formed entity tags no version of the session can have: they never match (412).
FOREIGN_IF_MATCH = ['"abc"', '"-1"', '"1.5"', '""', '"99999999999999999999"']


@pytest.mark.parametrize("value", FOREIGN_IF_MATCH)
async def test_an_if_match_naming_no_version_is_412(
    app_api: Api, cast: Cast, target: dict[str, Any], value: str
):
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"patch": {"work_in_progress": {"x": 1}}},
        headers={"If-Match": value},
    )
    assert assert_problem(r, 412)["current_version"] == target["version"]
    await assert_unchanged(app_api, cast, target, "patch")


@pytest.mark.parametrize("value", BAD_IF_MATCH)
async def test_bad_if_match_is_422(app_api: Api, cast: Cast, target: dict[str, Any], value: str):
    if value in ('"1', '1"'):
        value = value.replace("1", str(target["version"]))  # only the quoting is wrong
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"patch": {"work_in_progress": {"x": 1}}},
        headers={"If-Match": value},
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, "patch")


async def test_if_match_alone_is_enough(app_api: Api, cast: Cast, target: dict[str, Any]):
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"patch": {"work_in_progress": {"x": 1}}},
        headers={"If-Match": f'"{target["version"]}"'},
    )
    assert r.status_code == 200, r.text
    assert r.headers["etag"].startswith(f'"{target["version"] + 1}-'), r.headers  # a MAD is in


async def test_patch_without_any_version_is_428(app_api: Api, cast: Cast, target: dict[str, Any]):
    r = await send(app_api, cast, "patch", target, body={"patch": {"work_in_progress": {"x": 1}}})
    assert_problem(r, 428)
    await assert_unchanged(app_api, cast, target, "patch")


@pytest.mark.parametrize("how", ["body", "timeline"])
async def test_stale_version_is_409_with_current_version(
    app_api: Api, cast: Cast, target: dict[str, Any], how: str
):
    stale = target["version"] - 1
    if how == "body":
        r = await send(
            app_api,
            cast,
            "patch",
            target,
            body={"expected_version": stale, "patch": {"work_in_progress": {"x": 1}}},
        )
    else:
        r = await send(
            app_api,
            cast,
            "append",
            target,
            body={"events": [{"kind": "note"}], "expected_version": stale},
        )
    problem = assert_problem(r, 409)
    assert problem["current_version"] == target["version"]
    await assert_unchanged(app_api, cast, target, "patch")


@pytest.mark.parametrize(
    ("header_offset", "body_offset", "status"), [(1, 0, 412), (0, -1, 409)], ids=["412", "409"]
)
async def test_expected_version_and_if_match_are_both_checked(
    app_api: Api,
    cast: Cast,
    target: dict[str, Any],
    header_offset: int,
    body_offset: int,
    status: int,
):
    """If-Match first (412), then the body's expected_version (409)."""
    version = target["version"]
    r = await send(
        app_api,
        cast,
        "patch",
        target,
        body={"expected_version": version + body_offset, "patch": {"work_in_progress": {"x": 1}}},
        headers={"If-Match": f'"{version + header_offset}"'},
    )
    assert assert_problem(r, status)["current_version"] == version
    await assert_unchanged(app_api, cast, target, "patch")


# -- Idempotency-Key -----------------------------------------------------------------------

OTHER_BODY = {
    "create": {"work_in_progress": {"a": 999}},
    "patch": {"expected_version": "{v}", "patch": {"work_in_progress": {"a": 999}}},
    "append": {"events": [{"kind": "other", "data": {}}]},
    "add_participant": {"mad_name": "someone-else"},
}


@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_idempotency_key_with_another_body_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str
):
    key = {"Idempotency-Key": f"retry-{route}-{cast.owner}"}
    first = await send(app_api, cast, route, target, body=valid_body(route, target), headers=key)
    assert first.status_code in (200, 201), first.text
    before = await app_api.full(target["id"], cast.owner)
    sessions = await app_api.list_all(cast.owner)

    r = await send(
        app_api, cast, route, before, body=_fill_version(OTHER_BODY[route], before), headers=key
    )

    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, before, route="")
    assert await app_api.list_all(cast.owner) == sessions, "no other session appeared"


@pytest.mark.parametrize("route", BODY_ROUTES)
async def test_idempotency_key_with_the_same_body_returns_the_first_answer(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str
):
    key = {"Idempotency-Key": f"retry-{route}-{cast.owner}"}
    body = valid_body(route, target)
    first = await send(app_api, cast, route, target, body=body, headers=key)
    assert first.status_code in (200, 201), first.text
    between = await app_api.full(target["id"], cast.owner)
    mine = await app_api.list_all(cast.owner)

    again = await send(app_api, cast, route, target, body=body, headers=key)

    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers.get("etag") == first.headers.get("etag")
    after = await app_api.full(target["id"], cast.owner)
    assert stable(after) == stable(between), "the repeat was applied a second time"
    assert await app_api.list_all(cast.owner) == mine


@pytest.mark.parametrize("route", ["suspend", "resume", "archive", "remove_participant", "delete"])
async def test_idempotency_key_repeat_without_body_returns_the_first_answer(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str
):
    if route == "resume":
        await app_api.suspend(target["id"], cast.owner)
    key = {"Idempotency-Key": f"retry-{route}-{cast.owner}"}
    first = await send(app_api, cast, route, target, headers=key)
    assert first.status_code in (200, 204), first.text
    again = await send(app_api, cast, route, target, headers=key)
    assert again.status_code == first.status_code, again.text
    assert again.content == first.content


BAD_KEYS_HEADER = {"empty": "", "space": "a b", "too_long": "k" * 256, "non_ascii": "clé"}


@pytest.mark.parametrize("value", BAD_KEYS_HEADER.values(), ids=BAD_KEYS_HEADER.keys())
@pytest.mark.parametrize("route", ["create", "patch", "suspend", "archive"])
async def test_bad_idempotency_key_is_422(
    app_api: Api, cast: Cast, target: dict[str, Any], route: str, value: str
):
    headers = app_api.h(cast.owner)
    method, path, body = BODY_ROUTES.get(route) or SESSION_ROUTES[route]
    if body is not None:
        body = valid_body(route, target)
    r = await app_api.client.request(
        method,
        fill(path, target, cast),
        json=body,
        headers=[*headers.items(), ("Idempotency-Key", value.encode())],
    )
    assert_problem(r, 422)
    await assert_unchanged(app_api, cast, target, route)


# -- the wrong method ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/sessions/{sid}"), ("POST", "/v1/sessions/{sid}"), ("DELETE", "/v1/sessions")],
)
async def test_wrong_method_is_405_problem(
    app_api: Api, cast: Cast, target: dict[str, Any], method: str, path: str
):
    r = await app_api.client.request(
        method, fill(path, target, cast), headers=app_api.h(cast.owner)
    )
    assert_problem(r, 405)
    await assert_unchanged(app_api, cast, target, method)


# -- problems name what the client sent, not our Python names -------------------------------


async def test_a_bad_query_parameter_is_named_as_sent(app_api: Api, cast: Cast):
    r = await app_api.client.get("/v1/sessions?state=sleepy", headers=app_api.h(cast.owner))
    problem = assert_problem(r, 422)
    assert [e["field"] for e in problem["errors"]] == ["state"], problem


async def test_an_unknown_top_level_field_names_the_body(app_api: Api, cast: Cast):
    r = await app_api.client.post("/v1/sessions", json={"foo": 1}, headers=app_api.h(cast.owner))
    problem = assert_problem(r, 422)
    assert problem["errors"] == [
        {"field": "/foo", "message": "Object contains unknown field `foo`"}
    ], problem


async def test_truncated_json_says_it_is_not_json(app_api: Api, cast: Cast):
    r = await app_api.client.post(
        "/v1/sessions",
        content=b'{"work_in_progress": {',
        headers={**app_api.h(cast.owner), "Content-Type": "application/json"},
    )
    assert "not valid JSON" in assert_problem(r, 400)["detail"]
