"""Entity tags and conditional requests (RFC 9110 §8.8.3, §13) for session representations.

The ETag of a session is `"<version>"`, followed by `-<digest>` when the body shows state that
moves without a new version (the session at rest, participants' leases, which lapse and renew
on their own clock), and by `-full` for `?include=full`. So the tag changes whenever the body
does, and a poller with If-None-Match never misses a change nor downloads an unchanged body.

If-Match is about the version a write applies to: a listed strong tag matches when its version
(the part before the first `-`) is the session's version. A lease renewing between a read and
a write therefore never fails a write's precondition; weak tags never match (strong
comparison); `*` matches any existing session.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from sessionmgr.domain.errors import InvalidInput
from sessionmgr.domain.model import Session, SessionState
from sessionmgr.domain.preconditions import Precondition

_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e]*)"')
_OUR_TAG = re.compile(r"(\d{1,18})(?:-[0-9a-z-]+)?")
_BARE_VERSION = re.compile(r"\d{1,18}")  # `If-Match: 3`, accepted as "3" for older clients


def etag(session: Session, *, full: bool = False) -> str:
    """The strong entity tag of `session`'s representation (quoted)."""
    tag = str(session.version)
    if session.participants or session.state is not SessionState.ACTIVE:
        tag += "-" + _moving_state_digest(session)
    if full:
        tag += "-full"
    return f'"{tag}"'


def version_tag(version: int) -> str:
    """The tag a 412 answers with: any tag of this version passes If-Match."""
    return f'"{version}"'


def _moving_state_digest(session: Session) -> str:
    """The state and every participant as the body shows them (all their fields, whatever
    a participant comes to carry), in a canonical order."""
    raw = msgspec.json.encode([session.state.value, session.participants], order="sorted")
    return hashlib.sha256(raw).hexdigest()[:12]


def if_match(header: str | None) -> Precondition | None:
    """Parse an If-Match header; a value that is no list of entity tags is a 422."""
    if header is None:
        return None
    if header.strip() == "*":
        return Precondition(any_version=True)
    versions: set[int] = set()
    for weak, opaque in _tags(header, "If-Match"):
        if weak:
            continue  # strong comparison: a weak tag matches nothing
        if match := _OUR_TAG.fullmatch(opaque):
            versions.add(int(match.group(1)))
    return Precondition(versions=frozenset(versions))


def none_match(header: str | None, current: str) -> bool:
    """True when If-None-Match names the current tag (weak comparison) or is `*`: a 304."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return any(f'"{opaque}"' == current for _, opaque in _tags(header, "If-None-Match"))


def _tags(header: str, name: str) -> list[tuple[bool, str]]:
    tags: list[tuple[bool, str]] = []
    for member in header.split(","):
        member = member.strip()
        if not member:
            continue
        if _BARE_VERSION.fullmatch(member):
            tags.append((False, member))
            continue
        match = _ENTITY_TAG.fullmatch(member)
        if match is None:
            raise InvalidInput(f'{name} must be "*" or entity tags in quotes, like "3"', name)
        tags.append((match.group(1) is not None, match.group(2)))
    if not tags:
        raise InvalidInput(f'{name} must be "*" or entity tags in quotes, like "3"', name)
    return tags
