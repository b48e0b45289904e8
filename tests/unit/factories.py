"""polyfactory factories for the domain structs, with values every tier can store.

Datetimes are timezone-aware UTC at millisecond precision (what MongoDB keeps), ids are
128-bit hex like the service's own, and the free-form dicts hold nested JSON of every kind.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from polyfactory import Use
from polyfactory.factories.msgspec_factory import MsgspecFactory

from sessionmgr.domain.model import (
    NewEvent,
    Participant,
    Principal,
    SessionRecord,
    TimelineEvent,
    new_session_id,
)

_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


def aware_datetime() -> datetime:
    return _EPOCH + timedelta(milliseconds=random.randrange(10 * 365 * 86_400_000))


def json_value(depth: int = 0) -> Any:
    """A random JSON value: scalars of every type, unicode, and nested objects and arrays."""
    scalars: list[Any] = [
        None,
        True,
        False,
        random.randint(-(2**63), 2**63 - 1),
        random.random() * 1e6,
        "plain",
        "ünïcødé ✓ 漢字",
        "",
    ]
    if depth >= 3:
        return random.choice(scalars)
    pick = random.randrange(3)
    if pick == 0:
        return json_object(depth + 1)
    if pick == 1:
        return [json_value(depth + 1) for _ in range(random.randrange(4))]
    return random.choice(scalars)


def json_object(depth: int = 0) -> dict[str, Any]:
    return {f"k{i}": json_value(depth) for i in range(random.randrange(1, 5))}


class _Base:
    @classmethod
    def get_provider_map(cls) -> dict[Any, Any]:
        return {**super().get_provider_map(), datetime: aware_datetime}  # type: ignore[misc]


class ParticipantFactory(_Base, MsgspecFactory[Participant]):
    pass


class SessionRecordFactory(_Base, MsgspecFactory[SessionRecord]):
    id = Use(new_session_id)
    version = Use(random.randint, 1, 10_000)
    timeline_seq = Use(random.randint, 0, 10_000)
    work_in_progress = Use(json_object)
    context_summary = Use(json_object)


class TimelineEventFactory(_Base, MsgspecFactory[TimelineEvent]):
    data = Use(json_object)


class NewEventFactory(_Base, MsgspecFactory[NewEvent]):
    kind = Use(lambda: random.choice(["note", "tool.call", "plan:step", "msg/out"]))
    data = Use(json_object)


def principal(sub: str, *roles: str) -> Principal:
    return Principal(sub=sub, roles=frozenset(roles))
