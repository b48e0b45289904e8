"""The answer with a session: the same two ASGI messages from every path that sends one."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent

from sessionmgr.domain.model import Session


def session_answer(
    session: Session, status: int, headers: Mapping[str, str], method: str
) -> tuple[HTTPResponseStartEvent, HTTPResponseBodyEvent]:
    """The two ASGI messages that answer with `session` (`SessionResponse`, the read lane)."""
    body = msgspec.json.encode(session)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),  # a HEAD says how long a GET would be
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    return (
        {"type": "http.response.start", "status": status, "headers": raw},
        {
            "type": "http.response.body",
            "body": b"" if method == "HEAD" else body,
            "more_body": False,
        },
    )
