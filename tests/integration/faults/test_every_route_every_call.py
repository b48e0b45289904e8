"""Every mutating route, a fault at every backend call on its path, then the client's retry.

For each route, a clean run first records the backend calls the request makes (Redis, MongoDB,
S3, through the adapters). Then, for each of those calls and each way it can fail, a fresh
session goes through the same request with one fault injected at that call:

- `before`: the call fails before it reaches the backend (nothing applied);
- `lost`: the call is applied, then its reply is lost (the caller cannot know);
- `timeout`: the call is applied, then the caller gives up waiting.

The client then retries with the same Idempotency-Key until it gets an answer that is not a
503 (or "in flight"). Each case records its history and checks it: exactly one effect, a retry
of an answered request gets that first answer again, and MongoDB converges to what was
acknowledged. Real redis-server and a real S3 endpoint (moto's server); MongoDB is the
in-memory engine (the fault sits at the adapter's driver calls either way).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container, build_container
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.settings import Settings
from tests.integration.conftest import serving

Headers = dict[str, str]
MODES = ("before", "lost", "timeout")
ROUTES = (
    "create",
    "patch",
    "append",
    "join",
    "leave",
    "renew",
    "suspend",
    "resume",
    "archive",
    "delete",
)
# Reads that decide nothing about the outcome when they fail are still faults worth having:
# every call on the path is injected, reads included.
SKIP = frozenset({"ping"})
# A lost reply inside these is handled by the method itself, at the driver (the archive fence
# gives back what it took: tests/unit/test_archive_seams.py). Injected at the method's edge,
# "applied, reply lost" would be a second fault (the give-back failing too); the fence's TTL
# bounds that case, by design.
SELF_HEALING = frozenset({("redis", "fence")})


class Fault(msgspec.Struct):
    store: str
    method: str
    nth: int  # the nth call of this method during the request (1-based)
    mode: str
    fired: bool = False


class Injector:
    """Wraps the bare adapters' coroutine methods: records calls, and fires one planned fault."""

    def __init__(self) -> None:
        self.recording: list[tuple[str, str]] | None = None
        self.fault: Fault | None = None
        self._seen: dict[tuple[str, str], int] = {}

    def wrap(self, name: str, store: object) -> None:
        for method, fn in inspect.getmembers(store, inspect.iscoroutinefunction):
            if method.startswith("_") or method in SKIP:
                continue
            setattr(store, method, self._wrapped(name, method, fn))

    def plan(self, fault: Fault | None) -> None:
        self.fault, self._seen = fault, {}

    def _wrapped(
        self, store: str, method: str, fn: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.recording is not None:
                self.recording.append((store, method))
            key = (store, method)
            self._seen[key] = self._seen.get(key, 0) + 1
            fault = self.fault
            if (
                fault is None
                or fault.fired
                or (fault.store, fault.method) != key
                or fault.nth != self._seen[key]
            ):
                return await fn(*args, **kwargs)
            fault.fired = True
            if fault.mode == "before":
                raise BackendUnavailable(store, f"injected: {method} failed before it was sent")
            await fn(*args, **kwargs)
            if fault.mode == "timeout":
                await asyncio.sleep(0.2)
            raise BackendUnavailable(
                store, f"injected: {method} applied, its reply lost", retryable=False
            )

        return call


@pytest.fixture
async def rig(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Container, Injector]]:
    tuned = msgspec.structs.replace(settings, breaker_failures=1000, retry_attempts=1)
    container = build_container(tuned, write_behind=False)
    async with serving(container) as api:
        injector = Injector()
        injector.wrap("redis", await resolve(container.hot))
        injector.wrap("mongodb", await resolve(container.warm))
        injector.wrap("s3", await resolve(container.cold))
        yield api, container, injector


async def prepare(api: httpx.AsyncClient, owner: Headers, route: str) -> str | None:
    """The session a route acts on, in the state the route needs."""
    if route == "create":
        return None
    created = await api.post("/v1/sessions", json={"work_in_progress": {"n": 0}}, headers=owner)
    sid: str = created.json()["id"]
    if route in ("leave", "renew"):
        joined = await api.post(
            f"/v1/sessions/{sid}/participants", json={"mad_name": "m1"}, headers=owner
        )
        assert joined.status_code == 200
    if route in ("resume", "archive"):
        assert (await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)).status_code == 200
    return sid


def request_of(route: str, sid: str | None) -> tuple[str, str, Any]:
    base = f"/v1/sessions/{sid}"
    return {
        "create": ("POST", "/v1/sessions", {"work_in_progress": {"made": 1}}),
        "patch": ("PATCH", base, {"expected_version": 1, "patch": {"work_in_progress": {"n": 1}}}),
        "append": ("POST", f"{base}/timeline", {"events": [{"kind": "once"}]}),
        "join": ("POST", f"{base}/participants", {"mad_name": "m2"}),
        "leave": ("DELETE", f"{base}/participants/m1", None),
        "renew": ("PUT", f"{base}/participants/m1/lease", None),
        "suspend": ("POST", f"{base}/suspend", None),
        "resume": ("POST", f"{base}/resume", None),
        "archive": ("POST", f"{base}/archive", None),
        "delete": ("DELETE", base, None),
    }[route]


async def send(
    api: httpx.AsyncClient, owner: Headers, route: str, sid: str | None, key: str
) -> httpx.Response:
    method, path, body = request_of(route, sid)
    headers = {**owner, "Idempotency-Key": key}
    return await api.request(method, path, json=body, headers=headers)


async def until_answered(
    api: httpx.AsyncClient, owner: Headers, route: str, sid: str | None, key: str
) -> list[httpx.Response]:
    """Retry with the same key while the answer is "unavailable" or "in flight"."""
    history = []
    for _ in range(20):
        answer = await send(api, owner, route, sid, key)
        history.append(answer)
        if answer.status_code not in (503, 409) or (
            answer.status_code == 409 and "in-flight" not in answer.json().get("type", "")
        ):
            return history
        await asyncio.sleep(0.05)
    return history


async def check_one_effect(
    api: httpx.AsyncClient,
    container: Container,
    owner: Headers,
    route: str,
    sid: str | None,
    final: httpx.Response,
) -> None:
    """The route's effect happened exactly once, and MongoDB holds what was acknowledged."""
    assert final.status_code in (200, 201, 204), final.text
    if route == "create":
        sid = final.json()["id"]
        listed = (await api.get("/v1/sessions?limit=100", headers=owner)).json()["items"]
        assert [s["id"] for s in listed] == [sid], "exactly one session was created"
    assert sid is not None
    read = await api.get(f"/v1/sessions/{sid}?include=full", headers=owner)
    if route == "delete":
        assert read.status_code == 404
        return
    assert read.status_code == 200, read.text
    session = read.json()
    expected = {
        "create": (1, "active"),
        "patch": (2, "active"),
        "append": (2, "active"),
        "join": (2, "active"),
        "leave": (3, "active"),
        "renew": (2, "active"),
        "suspend": (1, "dormant"),
        "resume": (1, "active"),
        "archive": (1, "archived"),
    }[route]
    assert (session["version"], session["state"]) in (expected, (expected[0], "dormant")), session
    if route == "append":
        assert [e["kind"] for e in session["full_timeline"]] == ["once"], "appended once"
    if route == "join":
        assert set(session["participants"]) == {"m2"}
    if route == "leave":
        assert "m1" not in session["participants"]
    # MongoDB converges: suspend (a flush) and compare what it holds with what was answered.
    if session["state"] == "active":
        assert (await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)).status_code == 200
    warm = await resolve(container.warm)
    stored = await warm.get(sid)
    assert stored is not None and stored.version == session["version"]
    events = await warm.all_events(sid) if route != "archive" else []
    assert len(events) == (1 if route == "append" else 0)


def same_answer(first: httpx.Response, later: httpx.Response) -> bool:
    if first.status_code != later.status_code:
        return False
    if first.status_code == 204:
        return True
    a, b = first.json(), later.json()
    for volatile in ("last_active", "participants", "expires_at"):
        a.pop(volatile, None), b.pop(volatile, None)
    return bool(a == b)


async def calls_of(
    api: httpx.AsyncClient, injector: Injector, owner: Headers, route: str
) -> list[tuple[str, str, int]]:
    """The backend calls a clean run of the route makes, each with its occurrence number."""
    sid = await prepare(api, owner, route)
    injector.plan(None)
    injector.recording = []
    answer = await send(api, owner, route, sid, "clean-run")
    calls, injector.recording = injector.recording, None
    assert answer.status_code in (200, 201, 204), answer.text
    counted: dict[tuple[str, str], int] = {}
    out = []
    for store, method in calls:
        counted[(store, method)] = counted.get((store, method), 0) + 1
        out.append((store, method, counted[(store, method)]))
    return out


@pytest.mark.parametrize("route", ROUTES)
async def test_a_fault_at_any_call_then_a_keyed_retry_has_exactly_one_effect(
    rig: tuple[httpx.AsyncClient, Container, Injector],
    auth: Callable[..., Headers],
    route: str,
) -> None:
    api, container, injector = rig
    calls = await calls_of(api, injector, auth(f"probe-{route}"), route)
    assert calls, "the route reaches a backend"
    failures = []
    for n, ((store, method, nth), mode) in enumerate(itertools.product(calls, MODES)):
        if mode != "before" and (store, method) in SELF_HEALING:
            continue
        owner = auth(f"{route}-{n}")
        sid = await prepare(api, owner, route)
        injector.plan(Fault(store=store, method=method, nth=nth, mode=mode))
        first = await send(api, owner, route, sid, f"key-{n}")
        injector.plan(None)
        history = [first, *await until_answered(api, owner, route, sid, f"key-{n}")]
        case = f"{store}.{method}#{nth} {mode}: " + " ".join(str(r.status_code) for r in history)
        try:
            assert first.status_code in (200, 201, 204, 503), first.text
            answered = [r for r in history if r.status_code in (200, 201, 204)]
            assert answered, "the retries got an answer"
            assert all(same_answer(answered[0], r) for r in answered), "retries replay it"
            await check_one_effect(api, container, owner, route, sid, answered[-1])
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
    assert not failures, "\n".join(failures)
