"""The transport under `AsyncClient`: auth, retries with one Idempotency-Key, typed errors."""

from __future__ import annotations

import inspect
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import msgspec
import stamina

from sessionmgr_client._errors import (
    IdempotencyKeyInFlight,
    RateLimited,
    Unauthenticated,
    Unavailable,
    error_for,
)

T = TypeVar("T")

Token = str | Callable[[], str] | Callable[[], Awaitable[str]]
Version = int | str  # a version (sent as the tag "<n>") or an entity tag as it came


def _retryable(exc: Exception) -> bool | float:
    """stamina's hook: retry transport errors, 503, 429 and a key in flight; honour
    Retry-After (jittered a little, so that callers told the same second do not return in
    step)."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, Unavailable | RateLimited | IdempotencyKeyInFlight):
        if exc.retry_after is None:
            return True
        return exc.retry_after + random.uniform(0, 0.1 + exc.retry_after / 10)  # noqa: S311
    return False


def tag(version: Version) -> str:
    """An If-Match value: `"<n>"` for a version, an entity tag as it is."""
    return f'"{version}"' if isinstance(version, int) else version


def new_key() -> str:
    return uuid.uuid4().hex


class HttpCore:
    """Requests to one sessionmgr: the bearer token (a callable is asked for every request,
    and once more after a 401), retries of connection errors, 503, 429 and a key in flight
    (bounded, jittered, honouring Retry-After), every error answer raised typed."""

    def __init__(
        self,
        base_url: str,
        token: Token | None = None,
        *,
        timeout: float = 10.0,
        max_attempts: int = 5,
        retry_timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.retry_timeout = retry_timeout
        self._token = token
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, transport=transport)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def with_token(self, token: Token) -> Self:
        """The same server and connections under another principal (a MAD's token, say);
        closing it leaves this client's connections open."""
        twin = type(self)(
            self.base_url,
            token,
            max_attempts=self.max_attempts,
            retry_timeout=self.retry_timeout,
            http_client=self._http,
        )
        twin._owns_http = False
        return twin

    # -- plumbing ---------------------------------------------------------------------------

    async def _bearer(self) -> dict[str, str]:
        if self._token is None:
            return {}
        value = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(value):
            value = await value
        return {"Authorization": f"Bearer {value}"}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """One logical call: its tries share `idempotency_key`; an error answer is raised."""
        sent = {k: v for k, v in (headers or {}).items() if v}
        if idempotency_key:
            sent["Idempotency-Key"] = idempotency_key
        body = msgspec.json.encode(json) if json is not None else content
        if json is not None:
            sent.setdefault("Content-Type", "application/json")
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            return await self._attempts(method, path, body, query, sent)
        except Unauthenticated:
            if not self.refreshes_token:
                raise
            # the token may have expired since the callable made it: once more, with a new one
            return await self._attempts(method, path, body, query, sent)

    @property
    def refreshes_token(self) -> bool:
        """Whether the token comes from a callable, so that a 401 is worth one more try."""
        return callable(self._token)

    async def _attempts(
        self,
        method: str,
        path: str,
        body: bytes | None,
        query: dict[str, Any],
        sent: dict[str, str],
    ) -> httpx.Response:
        async for attempt in stamina.retry_context(
            on=_retryable,
            attempts=self.max_attempts,
            timeout=self.retry_timeout,
            wait_initial=0.1,
            wait_max=5.0,
        ):
            with attempt:
                response = await self._http.request(
                    method,
                    self.base_url + path,
                    content=body,
                    params=query,
                    headers={**sent, **await self._bearer()},
                )
                if response.status_code >= 400:
                    raise error_for(response)
                return response
        raise AssertionError("stamina ends with an answer or an exception")  # pragma: no cover

    async def _call(self, cls: type[T], method: str, path: str, **kwargs: Any) -> T:
        response = await self.request(method, path, **kwargs)
        return msgspec.json.decode(response.content, type=cls)

    @staticmethod
    def _write_headers(
        if_match: Version | None, lease_token: int | None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        headers = dict(extra or {})
        if if_match is not None:
            headers["If-Match"] = tag(if_match)
        if lease_token is not None:
            headers["Lease-Token"] = str(lease_token)
        return headers

    # used by _watch: the same auth as every request
    async def _headers_for_stream(self) -> dict[str, str]:
        return await self._bearer()

    @property
    def http(self) -> httpx.AsyncClient:
        return self._http
