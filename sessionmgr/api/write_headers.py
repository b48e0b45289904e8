"""The headers of a write, read the same way by the handlers (api/sessions.py) and the append
lane (api/append_lane.py): the Idempotency-Key as the service's `Idempotency`, and the
Lease-Token as an integer."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from sessionmgr.domain.errors import InvalidInput
from sessionmgr.services.ports import Idempotency

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
LEASE_TOKEN = re.compile(r"^[1-9]\d{0,17}$")


def idempotency(
    sub: str, key: str | None, method: str, path: str, if_match: str, body: Any = None
) -> Idempotency | None:
    """The request's key, scoped to its caller, with the fingerprint of what it asks: the
    method, the path, the If-Match header (`if_match`, "" when absent) and the parsed `body`."""
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key must be 1-255 visible ASCII characters", "Idempotency-Key"
        )
    scope = hashlib.sha256(f"{sub}\x00{key}".encode()).hexdigest()
    caller = hashlib.sha256(sub.encode()).hexdigest()[:32]
    payload = msgspec.json.encode(body) if body is not None else b""
    # The preconditions are part of the request: the same key and body with another
    # If-Match is another request (422), never the first one's answer.
    fingerprint = hashlib.sha256(
        method.encode()
        + b" "
        + path.encode()
        + b"\nif-match: "
        + if_match.encode("latin-1")
        + b"\n"
        + payload
    ).hexdigest()
    return Idempotency(key_digest=scope, fingerprint=fingerprint, caller=caller)


def lease_token(value: str | None) -> int | None:
    if value is None:
        return None
    if not LEASE_TOKEN.fullmatch(value.strip()):
        raise InvalidInput("Lease-Token must be the integer a lease grant returned", "Lease-Token")
    return int(value)
