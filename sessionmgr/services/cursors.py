"""The opaque `next_cursor` of a session list: a keyset position, never an offset.

A keyset cursor names the last item a page showed (its id, and for `order=recent` its
`last_active`), so the next page starts right after it however many sessions were created,
changed or deleted meanwhile: nothing unchanged is skipped or shown twice.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

from sessionmgr.domain.errors import InvalidInput
from sessionmgr.domain.model import SessionRecord
from sessionmgr.services.ports import ListAfter
from sessionmgr.services.views import ListOrder

_BY_ID = re.compile(r"[0-9a-f]{32}")
_BY_RECENCY = re.compile(r"r:(\d{1,16}):([0-9a-f]{32})")


def encode(last: SessionRecord, order: ListOrder) -> str:
    if order is ListOrder.RECENT:
        millis = round(last.last_active.timestamp() * 1000)
        raw = f"r:{millis}:{last.id}"
    else:
        raw = last.id  # the format cursors always had: old ones stay valid
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(cursor: str, order: ListOrder) -> ListAfter:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _foreign() from None
    if order is ListOrder.RECENT:
        match = _BY_RECENCY.fullmatch(raw)
        if match is None:
            raise _foreign()
        at = datetime.fromtimestamp(int(match.group(1)) / 1000, tz=UTC)
        return ListAfter(id=match.group(2), last_active=at)
    if not _BY_ID.fullmatch(raw):
        raise _foreign()
    return ListAfter(id=raw)


def _foreign() -> InvalidInput:
    return InvalidInput("cursor is not one this service handed out for this order", "cursor")
