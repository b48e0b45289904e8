"""What happens when Redis lost acknowledged writes and reused their versions or seqs.

Redis can roll back (an AOF `everysec` crash, a failover to a replica that was behind, a
restore). New writes then reuse versions and seqs MongoDB already holds for other writes. The
write-behind or a suspend meets such a write; nothing is discarded: the write is kept in
MongoDB's `session_conflicts` (with what MongoDB held), counted, logged, and the hot session
is re-based above MongoDB so that it, and every later write, lands.
"""

from __future__ import annotations

import logging

from sessionmgr.metrics import Metrics
from sessionmgr.services.ports import REBASED, HotStore, WarmStore, WriteDiverged

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, hot: HotStore, warm: WarmStore, metrics: Metrics | None = None) -> None:
        self._hot = hot
        self._warm = warm
        self._metrics = metrics or Metrics()

    async def settle(self, diverged: WriteDiverged) -> bool:
        """Keep, count and re-base; True when the hot session changed (read it again)."""
        new = await self._warm.keep_conflict(diverged)
        outcome = await self._hot.rebase(diverged)
        if new:
            self._metrics.write_divergences.inc()
            self._metrics.write_behind_entries.labels("diverged").inc()
            log.error(
                "write divergence on session %s: %s; kept in session_conflicts, %s",
                diverged.session_id,
                diverged,
                "session re-based above MongoDB" if outcome == REBASED else f"re-base {outcome}",
                extra={"session_id": diverged.session_id},
            )
        return outcome == REBASED
