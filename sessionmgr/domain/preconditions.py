"""`If-Match` as the domain sees it: which versions of a session a write may apply to."""

from __future__ import annotations

import msgspec

from sessionmgr.domain.errors import PreconditionFailed


class Precondition(msgspec.Struct, frozen=True):
    """A parsed `If-Match`: `*` (the session exists) or a set of versions, any of which matches.

    Weak tags never get here: they cannot match under strong comparison (RFC 9110 §13.1.1), so
    a header of weak tags only is a precondition no version meets (`versions` empty).
    """

    any_version: bool = False
    versions: frozenset[int] = frozenset()

    def matches(self, version: int) -> bool:
        return self.any_version or version in self.versions

    def check(self, session_id: str, version: int) -> None:
        """Raise `PreconditionFailed` unless the session's current `version` matches."""
        if not self.matches(version):
            behind = all(v < version for v in self.versions)  # none: no version ever matches
            raise PreconditionFailed(session_id, version, behind=behind)


def check(precondition: Precondition | None, session_id: str, version: int) -> None:
    """`Precondition.check`, for the callers whose precondition is optional."""
    if precondition is not None:
        precondition.check(session_id, version)
