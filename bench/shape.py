"""The session shape every write scenario uses, sessionmgr's (through wrk) and the peer's.

One place, so that the two sides store the same bytes: `bench/wrk/create.lua` and
`append.lua` get these bodies from the environment (`BENCH_CREATE_BODY`,
`BENCH_APPEND_BODY`), and `bench/peer.py` builds ADK's session state and events from the same
dicts.
"""

from __future__ import annotations

import json
from typing import Any

CONTEXT_BYTES = 200


def _context() -> dict[str, Any]:
    """A context summary whose JSON is exactly CONTEXT_BYTES long."""
    ctx: dict[str, Any] = {"goal": "measure", "owner": "bench", "notes": ""}
    ctx["notes"] = "c" * (CONTEXT_BYTES - len(compact(ctx)))
    return ctx


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


WORK_IN_PROGRESS: dict[str, Any] = {"step": 1, "plan": "benchmark create"}
CONTEXT_SUMMARY: dict[str, Any] = _context()
# One timeline event as the API takes it; ADK's event carries the same dict.
EVENT: dict[str, Any] = {"kind": "note", "data": {"text": "benchmark event", "n": 1}}

CREATE_BODY = compact({"work_in_progress": WORK_IN_PROGRESS, "context_summary": CONTEXT_SUMMARY})
APPEND_BODY = compact({"events": [EVENT]})


def seed_state() -> dict[str, Any]:
    """The state of a seeded session (the ones GET and append work on)."""
    return {
        "work_in_progress": {"step": 1, "plan": "benchmark session", "notes": ["a", "b", "c"]},
        "context_summary": CONTEXT_SUMMARY,
    }


def seed_event(i: int) -> dict[str, Any]:
    return {"kind": "note", "data": {"text": f"seed event {i}", "n": i}}
