"""The write side of the change feed: one capped Redis Stream per session,
`session_feed:{p<n>}:<id>` (storage/keys.py).

Each committed change queues its feed entry (`XADD ... MAXLEN ~ N`) in the very MULTI that
commits it, so an entry exists exactly when its change does: nothing is published after the
fact. An entry holds the SSE event name (`k`) and its JSON `data` (`d`), ready to send.
The stream's entry id is the event's `id` (a subscriber's position).
"""

from __future__ import annotations

from typing import Any

import msgspec

from sessionmgr.domain.model import SessionRecord
from sessionmgr.services.ports import Change
from sessionmgr.storage import keys

KINDS = (
    "patched",
    "appended",
    "joined",
    "left",
    "lapsed",
    "suspended",
    "resumed",
    "archived",
    "deleted",
    "reset",
)
# Bookkeeping a write changes along with what it is about: never "patched" by itself.
_BOOKKEEPING = frozenset(
    {"version", "last_active", "write_id", "participants", "acl", "lease_grants", "timeline_seq"}
)
_encode = msgspec.json.Encoder().encode


def feed_key(session_id: str) -> str:
    return keys.feed(session_id)


def entry(session_id: str, version: int, kind: str, **extra: Any) -> dict[str, bytes]:
    data = {"session_id": session_id, "version": version, "kind": kind, **extra}
    return {"k": kind.encode(), "d": _encode(data)}


def change_entries(before: SessionRecord, change: Change) -> list[dict[str, bytes]]:
    """The feed entries of one committed change, in the order a reader should see them.

    Usually one: `patched`, `appended`, `joined` or `left`. A write that also reaps lapsed
    participants adds one `lapsed` per MAD. A lease renewal (`hot_only`, same version)
    changes nothing a reader of the session sees, and has none.
    """
    if change.hot_only or "version" not in change.fields:
        return []
    sid, version, after = change.record.id, change.record.version, change.record
    out: list[dict[str, bytes]] = []
    dropped = set(change.leases_dropped)
    for mad in before.participants:
        if mad not in after.participants:
            kind = "left" if mad in dropped else "lapsed"
            out.append(entry(sid, version, kind, mad_name=mad))
    for mad in change.leases_set:
        now = after.participants.get(mad)
        was = before.participants.get(mad)
        if now is not None and (was is None or was.token != now.token):
            out.append(entry(sid, version, "joined", mad_name=mad, token=now.token))
    if change.events:
        out.append(entry(sid, version, "appended", events=change.events))
    fields = sorted(change.fields - _BOOKKEEPING)
    if change.context is not None and "full_context" not in fields:
        fields.append("full_context")
    if fields:
        out.append(entry(sid, version, "patched", fields=sorted(fields)))
    if not out:  # a version bump with nothing else named: still a change readers must see
        out.append(entry(sid, version, "patched", fields=[]))
    return out


def queue(pipe: Any, session_id: str, entries: list[dict[str, bytes]], maxlen: int) -> None:
    """XADD each entry inside the caller's MULTI; the stream keeps about `maxlen` entries."""
    key = feed_key(session_id)
    for fields in entries:
        pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
