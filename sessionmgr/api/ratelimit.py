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


class RateLimiter:
    def __init__(
        self,
        per_s: float,
        burst: int,
        metrics: Metrics | None = None,
        *,
        max_principals: int = MAX_PRINCIPALS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_s = per_s
        self._burst = float(burst)
        self._metrics = metrics
        self._max = max_principals
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    @property
    def enabled(self) -> bool:
        return self._per_s > 0

    def take(self, principal: str) -> None:
        """Spend one request of `principal`'s budget, or raise `RateLimited`."""
        if not self.enabled:
            return
        now = self._clock()
        tokens, at = self._buckets.pop(principal, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        allowed = tokens >= 1
        self._buckets[principal] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        if not allowed:
            if self._metrics is not None:
                self._metrics.rate_limited.inc()
            raise RateLimited(max(1, math.ceil((1 - tokens) / self._per_s)))
