"""A MAD's membership of one session: join, keep the lease alive, write fenced, leave."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from sessionmgr_client._errors import (
    Dormant,
    Forbidden,
    LeaseLost,
    NotFound,
    ProblemError,
    SessionMgrError,
)
from sessionmgr_client._models import AppendResult, Session

if TYPE_CHECKING:
    from sessionmgr_client._client import AsyncClient, EventLike, Patch, UpdateFn, Version

MIN_RENEW_EVERY_S = 0.05


class LeaseGone(SessionMgrError):
    """The participant is no longer one (removed, reaped, no access any more, or the session
    was suspended): `__cause__` is the answer that said so."""


def renew_interval(session: Session, mad_name: str) -> float:
    """A third of what is left of the lease the join granted (bounded by the lease's length),
    so that two renewals may fail before it lapses."""
    me = session.participants[mad_name]
    now = datetime.now(UTC)
    left = min(
        (me.lease_expires_at - me.joined_at).total_seconds(),
        (me.lease_expires_at - now).total_seconds(),
    )
    return max(MIN_RENEW_EVERY_S, left / 3)


class Participant:
    """What `AsyncClient.participant()` returns; use it with `async with`."""

    def __init__(
        self,
        client: AsyncClient,
        session_id: str,
        mad_name: str,
        *,
        renew_every: float | None = None,
        cancel_body: bool = True,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.mad_name = mad_name
        self.token: int | None = None  # the fencing token of the grant, once joined
        self.session: Session | None = None  # as the join answered it
        self.lost: ProblemError | LeaseGone | None = None
        self._renew_every = renew_every
        self._cancel_body = cancel_body
        self._body: asyncio.Task[Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._cancelled_body = False
        self._delivered = False  # the code inside has seen `lost` raised already
        self._closing = False

    async def __aenter__(self) -> Self:
        session = await self.client.join(self.session_id, self.mad_name)
        self.session = session
        self.token = session.participants[self.mad_name].token
        every = self._renew_every or renew_interval(session, self.mad_name)
        self._body = asyncio.current_task()
        self._renewer = asyncio.create_task(
            self._renew(every), name=f"sessionmgr-lease-{self.mad_name}"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self.lost is not None:  # no leave: the name is someone else's now, or gone
            if self._cancelled_body and exc_type is asyncio.CancelledError:
                assert self._body is not None
                self._body.uncancel()
                raise self.lost from self.lost.__cause__  # not from the CancelledError
            if not self._delivered:
                raise self.lost
            return
        try:
            await self.client.leave(self.session_id, self.mad_name, lease_token=self.token)
        except (ProblemError, httpx.TransportError) as leave_error:
            if exc is None:
                raise
            exc.add_note(f"leaving as {self.mad_name} failed too: {leave_error!r}")

    async def _renew(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.client.renew_lease(
                    self.session_id, self.mad_name, lease_token=self.token
                )
            except LeaseLost as exc:
                self._lose(exc)
                return
            except (NotFound, Forbidden, Dormant) as exc:
                gone = LeaseGone(f"{self.mad_name} is no longer a participant: {exc}")
                gone.__cause__ = exc
                self._lose(gone)
                return
            except (ProblemError, httpx.TransportError):
                # retried inside already; the next round tries again, and a lease that lapsed
                # meanwhile answers lease-expired, which ends the participation above
                continue

    def _lose(self, exc: ProblemError | LeaseGone) -> None:
        if self.lost is None:
            self.lost = exc
        if self._cancel_body and not self._closing and self._body is not None:
            self._cancelled_body = self._body.cancel(f"lease of {self.mad_name} lost: {exc}")

    def _check(self) -> int | None:
        if self.lost is not None:
            self._delivered = True
            raise self.lost
        return self.token

    async def _fenced(self, call: Any) -> Any:
        try:
            return await call
        except LeaseLost as exc:
            if self.lost is None:
                self.lost = exc  # raised here to the writer; no cancel needed
            self._delivered = True
            raise

    # -- writes through the lease -----------------------------------------------------------

    async def get(self) -> Session:
        return await self.client.get_session(self.session_id)

    async def patch(
        self,
        fields: Patch,
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
    ) -> Session:
        token = self._check()
        result: Session = await self._fenced(
            self.client.patch(
                self.session_id,
                fields,
                expected_version=expected_version,
                if_match=if_match,
                lease_token=token,
            )
        )
        return result

    async def merge_patch(self, document: Patch, *, if_match: Version) -> Session:
        token = self._check()
        result: Session = await self._fenced(
            self.client.merge_patch(self.session_id, document, if_match=if_match, lease_token=token)
        )
        return result

    async def append(
        self,
        events: list[EventLike],
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
    ) -> AppendResult:
        token = self._check()
        result: AppendResult = await self._fenced(
            self.client.append(
                self.session_id,
                events,
                expected_version=expected_version,
                if_match=if_match,
                lease_token=token,
            )
        )
        return result

    async def update(self, fn: UpdateFn, *, max_attempts: int = 20) -> Session:
        token = self._check()
        result: Session = await self._fenced(
            self.client.update(self.session_id, fn, max_attempts=max_attempts, lease_token=token)
        )
        return result
