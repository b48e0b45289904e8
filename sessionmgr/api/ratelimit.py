"""The per-principal rate limit (DESIGN §5): a token bucket per JWT `sub`, in this replica.

Keyed on the principal, not the client address (behind an ingress every caller shares one).
The buckets live in the process, so the limit holds per replica (N replicas admit up to N
times the rate) and keeps working while Redis is down. At most `max_principals` buckets are
kept, least recently used dropped first: a dropped principal simply starts with a full bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from sessionmgr.domain.errors import RateLimited
from sessionmgr.metrics import Metrics

MAX_PRINCIPALS = 100_000


class _Policy:
    """A token bucket's shape: `per_s` requests a second, `burst` at once (0 per_s: no limit)."""

    def __init__(self, name: str, per_s: float, burst: int) -> None:
        self.name = name
        self.per_s = per_s
        self.burst = float(burst)
        # As an IETF RateLimit-Policy: `burst` requests per the window that refills the bucket.
        self.window_s = max(1, math.ceil(burst / per_s)) if per_s > 0 else 1


class RateLimiter:
    def __init__(
        self,
        per_s: float,
        burst: int,
        metrics: Metrics | None = None,
        *,
        service_per_s: float | None = None,
        service_burst: int | None = None,
        max_principals: int = MAX_PRINCIPALS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = _Policy("default", per_s, burst)
        # Callers with role `service` (a MAD's back end, say) may get a higher limit of their own.
        self._service = (
            _Policy("service", service_per_s, service_burst or burst)
            if service_per_s is not None
            else self._default
        )
        self._metrics = metrics
        self._max = max_principals
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    @property
    def enabled(self) -> bool:
        return self._default.per_s > 0 or self._service.per_s > 0

    def take(self, principal: str, *, service: bool = False) -> None:
        """Spend one request of `principal`'s budget, or raise `RateLimited`."""
        refused = self._spend(principal, service)
        if refused is None:
            return
        policy, tokens = refused
        if self._metrics is not None:
            self._metrics.rate_limited.inc()
        raise RateLimited(
            max(1, math.ceil((1 - tokens) / policy.per_s)),
            quota=int(policy.burst),
            window_s=policy.window_s,
            policy=policy.name,
        )

    def admits(self, principal: str, *, service: bool = False) -> bool:
        """Spend one request of `principal`'s budget if it has one; a refusal changes and
        counts nothing (`take` then refuses the same request, and counts it)."""
        return self._spend(principal, service) is None

    def _spend(self, principal: str, service: bool) -> tuple[_Policy, float] | None:
        """None when one request was spent (or there is no limit); else the policy and the
        tokens the bucket holds (fewer than one). A refusal leaves the bucket's count as it was
        (its refill runs from when it was last spent from) and keeps it most recently used."""
        policy = self._service if service else self._default
        if policy.per_s <= 0:
            return None
        now = self._clock()
        tokens, at = self._buckets.get(principal, (policy.burst, now))
        tokens = min(policy.burst, tokens + (now - at) * policy.per_s)
        if tokens < 1:
            if principal in self._buckets:
                self._buckets.move_to_end(principal)  # a caller kept refused stays refused
            return policy, tokens
        self._buckets.pop(principal, None)
        self._buckets[principal] = (tokens - 1, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return None
