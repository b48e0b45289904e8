"""The calls many requests make to one backend in one turn of the event loop, sent as one.

A subclass says how a list of calls goes out in one round trip and what each caller gets
(`_send_all`), and which error a caller gets when the batch ends without answering it
(`_lost`). This class gathers the calls and answers every caller exactly once:
- calls go out in the order they were asked for, one batch per loop turn;
- an answer that is an exception is that caller's alone; a failure of the whole round trip
  gives every caller its own copy of the error (each raises and chains its own), marked as
  one failure they share, so that the backend's circuit breaker counts it once;
- a caller cancelled before its batch's task starts sends nothing; one cancelled later may
  have been sent, as a lone call cancelled mid-flight may have;
- the batch goes out in a task this object holds until it ends, and when it ends every caller
  it has not answered gets `_lost()`, whatever ended it: no caller waits on a batch nobody
  sends.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Sequence
from typing import Generic, TypeVar

from sessionmgr.domain.errors import share

Call = TypeVar("Call")
Answer = TypeVar("Answer")


class TurnBatch(Generic[Call, Answer]):
    def __init__(self) -> None:
        self._waiting: list[tuple[Call, asyncio.Future[Answer]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, call: Call) -> asyncio.Future[Answer]:
        """The answer to `call`, sent with the others of this loop turn."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        self._waiting.append((call, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._send_waiting)
        return answer

    async def _send_all(self, calls: list[Call]) -> Sequence[Answer | BaseException]:
        """Send `calls` in one round trip; one answer or error for each, in order."""
        raise NotImplementedError

    def _lost(self) -> Exception:
        """The error of a caller whose batch ended without an answer: the call may or may not
        have reached the backend."""
        raise NotImplementedError

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._ended, batch))

    def _ended(
        self, batch: list[tuple[Call, asyncio.Future[Answer]]], task: asyncio.Task[None]
    ) -> None:
        """The batch's task ended: a caller it did not answer (the task cancelled, before its
        first step or on its way, the replica stopping) learns that its call may or may not
        have gone through."""
        self._sending.discard(task)
        for _, answer in batch:
            if not answer.done():
                answer.set_exception(self._lost())

    async def _send(self, batch: list[tuple[Call, asyncio.Future[Answer]]]) -> None:
        batch = [(call, answer) for call, answer in batch if not answer.cancelled()]
        if not batch:
            return
        try:
            answers = await self._send_all([call for call, _ in batch])
        except Exception as exc:  # cancelled, the task ends and `_ended` answers
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(_own_copy(exc))
            return
        for (_, answer), given in zip(batch, answers, strict=True):
            if answer.done():
                continue
            if isinstance(given, BaseException):
                answer.set_exception(given)
            else:
                answer.set_result(given)


def _own_copy(exc: Exception) -> Exception:
    """A copy of the batch's error for one caller (each raises and chains its own), caused by
    the error itself; the error when it cannot be copied. Either is marked as a failure the
    batch's callers share, which a circuit breaker counts once (`errors.share`)."""
    try:
        mine = copy.copy(exc)
    except Exception:  # an exception type that refuses a copy: share it
        share(exc, exc)
        return exc
    mine.__cause__ = exc
    mine.__traceback__ = None
    share(mine, exc)
    return mine
