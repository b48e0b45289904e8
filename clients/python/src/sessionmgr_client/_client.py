"""`AsyncClient`: one method per route, the update loop, participants and the feed."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from sessionmgr_client._errors import Conflict, PreconditionFailed, ProblemError
from sessionmgr_client._http import HttpCore, Token, Version, new_key, tag
from sessionmgr_client._models import (
    AppendResult,
    ArchivedSession,
    Change,
    LeaseInfo,
    NewEvent,
    Page,
    Session,
    SessionSummary,
    TimelineEvent,
    TimelinePage,
)

if TYPE_CHECKING:
    from sessionmgr_client._participant import Participant

__all__ = ["AsyncClient", "EventLike", "Patch", "Token", "UpdateFn", "Version", "tag"]

Patch = dict[str, Any]
UpdateFn = Callable[[Session], Patch | Awaitable[Patch | None] | None]
EventLike = NewEvent | Mapping[str, Any]

MERGE_PATCH = "application/merge-patch+json"


class AsyncClient(HttpCore):
    """sessionmgr over HTTP, for asyncio code.

    `token` is the bearer token, or a callable (sync or async) that returns a fresh one; it is
    called for every request, retries included. Errors are raised as the `ProblemError`
    subclass their problem `type` names. Connection errors, 503 and 429 are retried (at most
    `max_attempts` tries within `retry_timeout` seconds, jittered exponential backoff, or the
    `Retry-After` the server sent); every mutation carries one `Idempotency-Key` for all its
    tries, so a retried write takes effect once.
    """

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self,
        owner_id: str | None = None,
        work_in_progress: dict[str, Any] | None = None,
        context_summary: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Session:
        body: dict[str, Any] = {}
        if owner_id is not None:
            body["owner_id"] = owner_id
        if work_in_progress is not None:
            body["work_in_progress"] = work_in_progress
        if context_summary is not None:
            body["context_summary"] = context_summary
        return await self._call(
            Session, "POST", "/v1/sessions", json=body, idempotency_key=idempotency_key or new_key()
        )

    async def get_session(self, session_id: str, *, full: bool = False) -> Session:
        params = {"include": "full"} if full else None
        return await self._call(Session, "GET", f"/v1/sessions/{session_id}", params=params)

    async def list_page(
        self,
        *,
        state: str | None = None,
        order: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        params = {"state": state, "order": order, "limit": limit, "cursor": cursor}
        return await self._call(Page, "GET", "/v1/sessions", params=params)

    async def list_sessions(
        self, *, state: str | None = None, order: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[SessionSummary]:
        """Every session the caller may list, following `next_cursor` to the end."""
        cursor: str | None = None
        while True:
            page = await self.list_page(state=state, order=order, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def timeline(
        self, session_id: str, *, after_seq: int = 0, limit: int | None = None
    ) -> TimelinePage:
        params = {"after_seq": after_seq, "limit": limit}
        return await self._call(
            TimelinePage, "GET", f"/v1/sessions/{session_id}/timeline", params=params
        )

    async def iter_timeline(
        self, session_id: str, *, after_seq: int = 0, page_size: int | None = None
    ) -> AsyncIterator[TimelineEvent]:
        """Every event after `after_seq`, oldest first, page after page."""
        next_after: int | None = after_seq
        while next_after is not None:
            page = await self.timeline(session_id, after_seq=next_after, limit=page_size)
            for event in page.items:
                yield event
            next_after = page.next_after_seq

    async def patch(
        self,
        session_id: str,
        fields: Patch,
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
        lease_token: int | None = None,
        idempotency_key: str | None = None,
    ) -> Session:
        """Replace each top-level field `fields` names; name the version you read by
        `expected_version` (stale: Conflict) or `if_match` (stale: PreconditionFailed)."""
        body: dict[str, Any] = {"patch": fields}
        if expected_version is not None:
            body["expected_version"] = expected_version
        return await self._call(
            Session,
            "PATCH",
            f"/v1/sessions/{session_id}",
            json=body,
            headers=self._write_headers(if_match, lease_token),
            idempotency_key=idempotency_key or new_key(),
        )

    async def merge_patch(
        self,
        session_id: str,
        document: Patch,
        *,
        if_match: Version,
        lease_token: int | None = None,
        idempotency_key: str | None = None,
    ) -> Session:
        """An RFC 7396 merge patch of work_in_progress and context_summary (null removes)."""
        return await self._call(
            Session,
            "PATCH",
            f"/v1/sessions/{session_id}",
            content=msgspec.json.encode(document),
            headers=self._write_headers(if_match, lease_token, {"Content-Type": MERGE_PATCH}),
            idempotency_key=idempotency_key or new_key(),
        )

    async def append(
        self,
        session_id: str,
        events: list[EventLike],
        *,
        expected_version: int | None = None,
        if_match: Version | None = None,
        lease_token: int | None = None,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        body: dict[str, Any] = {
            "events": [
                e if isinstance(e, NewEvent) else {"kind": e["kind"], "data": e.get("data", {})}
                for e in events
            ]
        }
        if expected_version is not None:
            body["expected_version"] = expected_version
        return await self._call(
            AppendResult,
            "POST",
            f"/v1/sessions/{session_id}/timeline",
            json=body,
            headers=self._write_headers(if_match, lease_token),
            idempotency_key=idempotency_key or new_key(),
        )

    async def join(
        self,
        session_id: str,
        mad_name: str,
        *,
        if_match: Version | None = None,
        idempotency_key: str | None = None,
    ) -> Session:
        """Add `mad:<mad_name>` with a lease (or, as that MAD, rejoin); the fencing token is
        `session.participants[mad_name].token`."""
        return await self._call(
            Session,
            "POST",
            f"/v1/sessions/{session_id}/participants",
            json={"mad_name": mad_name},
            headers=self._write_headers(if_match, None),
            idempotency_key=idempotency_key or new_key(),
        )

    async def renew_lease(
        self,
        session_id: str,
        mad_name: str,
        *,
        lease_token: int | None = None,
        idempotency_key: str | None = None,
    ) -> LeaseInfo:
        """Extend a live lease. The one mutation sent without an Idempotency-Key unless you
        pass one: a renewal is idempotent by nature (a repeat extends the same lease, same
        token), and a MAD renewing every 10 s would otherwise use up most of the caller's
        live keys (`SESSIONMGR_IDEMPOTENCY_MAX_KEYS_PER_CALLER`, 10 000 a day by default)."""
        return await self._call(
            LeaseInfo,
            "PUT",
            f"/v1/sessions/{session_id}/participants/{mad_name}/lease",
            headers=self._write_headers(None, lease_token),
            idempotency_key=idempotency_key,
        )

    async def leave(
        self,
        session_id: str,
        mad_name: str,
        *,
        lease_token: int | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        """Remove the participant (or leave, as that MAD)."""
        await self.request(
            "DELETE",
            f"/v1/sessions/{session_id}/participants/{mad_name}",
            headers=self._write_headers(None, lease_token),
            idempotency_key=idempotency_key or new_key(),
        )

    async def _lifecycle(
        self, session_id: str, action: str, if_match: Version | None, key: str | None
    ) -> Session:
        return await self._call(
            Session,
            "POST",
            f"/v1/sessions/{session_id}/{action}",
            headers=self._write_headers(if_match, None),
            idempotency_key=key or new_key(),
        )

    async def suspend(
        self,
        session_id: str,
        *,
        if_match: Version | None = None,
        idempotency_key: str | None = None,
    ) -> Session:
        return await self._lifecycle(session_id, "suspend", if_match, idempotency_key)

    async def resume(
        self,
        session_id: str,
        *,
        if_match: Version | None = None,
        idempotency_key: str | None = None,
    ) -> Session:
        return await self._lifecycle(session_id, "resume", if_match, idempotency_key)

    async def archive(
        self,
        session_id: str,
        *,
        if_match: Version | None = None,
        idempotency_key: str | None = None,
    ) -> ArchivedSession:
        return await self._call(
            ArchivedSession,
            "POST",
            f"/v1/sessions/{session_id}/archive",
            headers=self._write_headers(if_match, None),
            idempotency_key=idempotency_key or new_key(),
        )

    async def delete(
        self,
        session_id: str,
        *,
        if_match: Version | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        await self.request(
            "DELETE",
            f"/v1/sessions/{session_id}",
            headers=self._write_headers(if_match, None),
            idempotency_key=idempotency_key or new_key(),
        )

    # -- read-modify-write ------------------------------------------------------------------

    async def update(
        self,
        session_id: str,
        fn: UpdateFn,
        *,
        max_attempts: int = 20,
        lease_token: int | None = None,
    ) -> Session:
        """Read, `fn(session)` -> patch (None: nothing to change), PATCH with If-Match; on
        409/412 (someone wrote in between) read again and call `fn` again, after a short
        jittered pause, at most `max_attempts` times (then the last Conflict or
        PreconditionFailed is raised). `fn` may be async; it must not have side effects
        beyond its answer, since it may run more than once."""
        last: ProblemError | None = None
        for attempt in range(max_attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))  # noqa: S311
            session = await self.get_session(session_id)
            answer = fn(session)
            fields = await answer if inspect.isawaitable(answer) else answer
            if fields is None:
                return session
            try:
                return await self.patch(
                    session_id, fields, if_match=session.version, lease_token=lease_token
                )
            except (Conflict, PreconditionFailed) as exc:
                last = exc
        assert last is not None
        raise last

    # -- leases and the feed ----------------------------------------------------------------

    def participant(
        self,
        session_id: str,
        mad_name: str,
        *,
        token: Token | None = None,
        renew_every: float | None = None,
    ) -> Participant:
        """`async with client.participant(sid, "planner") as p:` joins (as `token`'s
        principal, default this client's), renews the lease in the background, sends the
        fencing token with every write made through `p`, and leaves on exit. A lost lease
        (Fenced or LeaseExpired from a renewal) cancels the code inside, which then sees that
        exception; a write through `p` after the loss raises it too and is not sent."""
        from sessionmgr_client._participant import Participant

        client = self.with_token(token) if token is not None else self
        return Participant(client, session_id, mad_name, renew_every=renew_every)

    def watch(
        self,
        session_id: str,
        since: str | None = None,
        *,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
    ) -> AsyncIterator[Change]:
        """`async for change in client.watch(sid):` every change of the session in commit
        order, from `since` (a change's `id`; None: from now). Reconnects by itself with
        `Last-Event-ID`; a `reset` change means events were not retained: re-read."""
        from sessionmgr_client._watch import watch

        return watch(
            self,
            session_id,
            since,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
        )
