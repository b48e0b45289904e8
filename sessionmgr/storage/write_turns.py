"""One write at a time per session in this replica, in the order they came.

Writers of one session that run at once in one replica would race each other's commits: each
round of commits only one of them wins, and the others decide again on what it left. With
enough of them, a write without a precondition could lose every round it is given. Taking
turns leaves only the writers of other replicas to race, and this replica's writers each
commit once, on the state the one before it left (`hot_views`).

A session nobody else in this replica is writing costs a few dictionary operations and no
await; a turn is handed to the next waiter directly, so a late comer never overtakes the
queue.

The re-base of a session after Redis lost writes takes its turn too. A suspend does not: it
flushes to MongoDB, which the session's writes must not wait on.
"""

from __future__ import annotations

import asyncio
from collections import deque


class WriteTurns:
    """Per-session turns: `await enter(id)`, then `leave(id)` once, in a `finally`."""

    def __init__(self) -> None:
        # A session being written: None while no one waits, else its waiters in order.
        self._queues: dict[str, deque[asyncio.Future[None]] | None] = {}

    def __len__(self) -> int:
        """Sessions being written in this replica now."""
        return len(self._queues)

    def busy(self, session_id: str) -> bool:
        """Whether a writer of the session has its turn now (`enter` would wait)."""
        return session_id in self._queues

    async def enter(self, session_id: str, timeout_s: float | None = None) -> None:
        """Return once it is this caller's turn to write the session; `TimeoutError` if that
        takes longer than `timeout_s` (then the caller has no turn)."""
        if session_id not in self._queues:
            self._queues[session_id] = None
            return
        waiters = self._queues[session_id]
        if waiters is None:
            waiters = self._queues[session_id] = deque()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            async with asyncio.timeout(timeout_s):
                await turn
        except BaseException:  # cancelled, or timed out
            if turn.done() and not turn.cancelled():
                self.leave(session_id)  # handed the turn, then cancelled: pass it on
            else:
                turn.cancel()  # still queued: `leave` skips a cancelled turn
            raise

    def leave(self, session_id: str) -> None:
        """End this caller's turn: the next waiter's begins."""
        waiters = self._queues.get(session_id)
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._queues[session_id]
