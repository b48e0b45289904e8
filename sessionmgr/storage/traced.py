"""A client span around every call of a store: `traced(store, tracer, "redis")`.

Generic over the port, so any tier's adapter (Redis, MongoDB, S3) is wrapped the same way at
the composition root. Each span is named `<system> <method>` and carries `db.system`,
`db.operation` and `sessionmgr.session_id` (from an argument named `session_id`, a `record`
or `scope`), plus `sessionmgr.outcome`: `ok`, `error` (the backend failed: status ERROR, the
exception recorded) or the name of the domain error the call ended with (a version conflict,
an unknown session), which is the store answering, not failing.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar, cast

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from sessionmgr.domain.errors import BackendUnavailable, SessionError
from sessionmgr.services.ports import CREATE_SCOPE
from sessionmgr.telemetry import records

T = TypeVar("T")
SESSION_ID = "sessionmgr.session_id"
OUTCOME = "sessionmgr.outcome"
_Locate = Callable[[tuple[Any, ...], dict[str, Any]], str | None]


def traced(store: T, tracer: Tracer, system: str) -> T:
    """`store` with each public coroutine method in a span; other attributes pass through.

    With tracing off (`tracer` records nothing) it is `store` itself: a span nobody records
    would cost every call its creation and nothing else."""
    if not records(tracer):
        return store
    return cast(T, TracedStore(store, tracer, system))


class TracedStore:
    def __init__(self, store: Any, tracer: Tracer, system: str) -> None:
        self._store = store
        self._tracer = tracer
        self._system = system

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        wrapper = self._wrap(name, attr)
        self.__dict__[name] = wrapper  # found directly from now on
        return wrapper

    def _wrap(self, name: str, method: Callable[..., Awaitable[Any]]) -> Any:
        locate = _session_locator(method)
        store = self._store
        span_name = f"{self._system} {name}"
        base = {"db.system": self._system, "db.operation": name}

        @wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            attributes = dict(base)
            if (session_id := locate(args, kwargs)) is not None:
                attributes[SESSION_ID] = session_id
            with self._tracer.start_as_current_span(
                span_name,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    # Looked up per call, so the store's own attribute is the one that runs.
                    result = await getattr(store, name)(*args, **kwargs)
                except SessionError as exc:
                    if isinstance(exc, BackendUnavailable):
                        _failed(span, exc)
                    else:
                        span.set_attribute(OUTCOME, type(exc).__name__)
                        span.record_exception(exc)
                    raise
                except BaseException as exc:
                    _failed(span, exc)
                    raise
                span.set_attribute(OUTCOME, "ok")
                span.set_status(Status(StatusCode.OK))
                return result

        return call


def _failed(span: Any, exc: BaseException) -> None:
    span.set_attribute(OUTCOME, "error")
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _session_locator(method: Callable[..., Any]) -> _Locate:
    """Where a method's session id is: an argument `session_id`, `record.id`, or `scope`."""
    params = list(inspect.signature(method).parameters)
    for name, of in (("session_id", _as_is), ("record", _record_id), ("scope", _scope)):
        if name in params:
            return _argument(params.index(name), name, of)
    return lambda args, kwargs: None


def _argument(index: int, name: str, of: Callable[[Any], str | None]) -> _Locate:
    def locate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        value = args[index] if index < len(args) else kwargs.get(name)
        return None if value is None else of(value)

    return locate


def _as_is(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _record_id(value: Any) -> str | None:
    return _as_is(getattr(value, "id", None))


def _scope(value: Any) -> str | None:
    return None if value == CREATE_SCOPE else _as_is(value)
