"""`Client`: the same methods as `AsyncClient`, blocking, generated from the async ones.

The async core runs on an event loop in a thread of the client's own; each call hands its
coroutine to that loop and waits. So a participant's lease keeps being renewed between
calls, while the calling thread does whatever it does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import httpx

from sessionmgr_client._client import AsyncClient, EventLike, Patch, Token, UpdateFn, Version
from sessionmgr_client._models import AppendResult, Session
from sessionmgr_client._participant import Participant

P = ParamSpec("P")
T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="sessionmgr-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _next(iterator: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await anext(iterator)
    except StopAsyncIteration:
        return False, None


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._async, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _blocking_iter(
    method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        iterator = method(self._async, *args, **kwargs)
        try:
            while True:
                more, item = self._loop.run(_next(iterator))
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            self._loop.run(_close(iterator))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class Client:
    """sessionmgr over HTTP, blocking: `with Client(url, token=...) as c: c.get_session(sid)`.

    Every method of `AsyncClient` is here with the same arguments; `list_sessions`,
    `iter_timeline` and `watch` return plain iterators, `participant()` a context manager
    for `with`. Do not share one `Client` across processes (forks).
    """

    def __init__(
        self,
        base_url: str,
        token: Token | None = None,
        *,
        timeout: float = 10.0,
        max_attempts: int = 5,
        retry_timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._loop = _Loop()
        self._async = AsyncClient(
            base_url,
            token,
            timeout=timeout,
            max_attempts=max_attempts,
            retry_timeout=retry_timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self._async.aclose())
        self._loop.close()

    create_session = _blocking(AsyncClient.create_session)
    get_session = _blocking(AsyncClient.get_session)
    list_page = _blocking(AsyncClient.list_page)
    list_sessions = _blocking_iter(AsyncClient.list_sessions)
    timeline = _blocking(AsyncClient.timeline)
    iter_timeline = _blocking_iter(AsyncClient.iter_timeline)
    patch = _blocking(AsyncClient.patch)
    merge_patch = _blocking(AsyncClient.merge_patch)
    append = _blocking(AsyncClient.append)
    join = _blocking(AsyncClient.join)
    renew_lease = _blocking(AsyncClient.renew_lease)
    leave = _blocking(AsyncClient.leave)
    suspend = _blocking(AsyncClient.suspend)
    resume = _blocking(AsyncClient.resume)
    archive = _blocking(AsyncClient.archive)
    delete = _blocking(AsyncClient.delete)
    update = _blocking(AsyncClient.update)
    watch = _blocking_iter(AsyncClient.watch)

    def participant(
        self,
        session_id: str,
        mad_name: str,
        *,
        token: Token | None = None,
        renew_every: float | None = None,
    ) -> SyncParticipant:
        """`with client.participant(sid, "planner") as p:` as `AsyncClient.participant`,
        except that a lost lease cannot interrupt blocking code: the next write through `p`
        (and the end of the `with`) raises it instead."""
        client = self._async.with_token(token) if token is not None else self._async
        inner = Participant(
            client, session_id, mad_name, renew_every=renew_every, cancel_body=False
        )
        return SyncParticipant(self, inner)


class SyncParticipant:
    """What `Client.participant()` returns; use it with `with`. Writes carry `Lease-Token`."""

    def __init__(self, client: Client, inner: Participant) -> None:
        self._run = client._loop.run
        self.inner = inner

    @property
    def token(self) -> int | None:
        return self.inner.token

    @property
    def lost(self) -> BaseException | None:
        return self.inner.lost

    def __enter__(self) -> Self:
        self._run(self.inner.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run(self.inner.__aexit__(exc_type, exc, tb))

    def get(self) -> Session:
        return self._run(self.inner.get())

    def patch(
        self,
        fields: Patch,
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
    ) -> Session:
        return self._run(
            self.inner.patch(fields, expected_version=expected_version, if_match=if_match)
        )

    def merge_patch(self, document: Patch, *, if_match: Version) -> Session:
        return self._run(self.inner.merge_patch(document, if_match=if_match))

    def append(
        self,
        events: list[EventLike],
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
    ) -> AppendResult:
        return self._run(
            self.inner.append(events, expected_version=expected_version, if_match=if_match)
        )

    def update(self, fn: UpdateFn, *, max_attempts: int = 20) -> Session:
        return self._run(self.inner.update(fn, max_attempts=max_attempts))
