"""Whether the answer being sent is the replay of an Idempotency-Key's first answer.

The service marks it; the API says so in an `Idempotent-Replayed: true` header. A context
variable, because the answer's type (a session, an append result, nothing) has no room for it.
"""

from __future__ import annotations

from contextvars import ContextVar

REPLAYED: ContextVar[bool] = ContextVar("sessionmgr_replayed", default=False)


def mark_replayed() -> None:
    REPLAYED.set(True)
