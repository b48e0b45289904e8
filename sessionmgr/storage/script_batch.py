"""One round trip to Redis for the script calls many requests make at once.

Every hot read and every commit is one EVALSHA (`hot._READ_SCRIPT`, `hot._COMMIT_SCRIPT`).
Under load, many requests ask for theirs in the same turn of the event loop; sent one by
one, each pays for its own write, its own read and its own wake-up of the loop. A
`ScriptBatch` (one per Redis client, that is per node) collects the calls of one turn and
sends them as one pipeline, on one connection, in the order they were asked for, then hands
each caller its own reply: about a quarter of a hot GET's CPU, a tenth to a third of an append's
(`python -m bench.run`, bench/profiles/findings.md). `SESSIONMGR_REDIS_BATCH=false` sends
each call alone.

Nothing a caller can observe changes but the time:
- each script runs alone in Redis, as before, so a commit's compare-and-set and a read's
  snapshot are what they were; two commits of one session in a batch run in order, and the
  second is refused (and decided again) as it would have been on its own connection;
- a reply that is an error (NOSCRIPT, MOVED, a refused script) is that caller's alone;
- when the batch's connection fails, every caller in it gets its own copy of the error, and
  each commit is outcome-unknown as a lone one is (`RedisHotStore._guard`); nothing is
  retried here (redis-py's retries are off on this client);
- a caller cancelled before its batch's task starts sends nothing; one cancelled later (the
  task waiting for a connection, say) may have sent its script, as a lone call cancelled
  mid-flight may have: outcome unknown;
- the batch is sent by a task this object holds until it ends, and when it ends every caller
  it has not answered gets a lost connection, whatever ended it: no caller waits on a batch
  nobody sends.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

_Call = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class ScriptBatch:
    """The script calls to one Redis client that wait for the end of this loop turn."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._waiting: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, *words: Any) -> asyncio.Future[Any]:
        """The reply to the command `words`, sent with the others of this loop turn."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((words, reply))
        if len(self._waiting) == 1:
            loop.call_soon(self._send_waiting)
        return reply

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._ended, batch))

    def _ended(self, batch: list[_Call], task: asyncio.Task[None]) -> None:
        """The batch's task ended: a caller it did not answer (the task cancelled, before its
        first step or on its way, the replica stopping) learns that its script may or may
        not have run."""
        self._sending.discard(task)
        for _, reply in batch:
            if not reply.done():
                reply.set_exception(RedisConnectionError("the batch sending this command ended"))

    async def _send(self, batch: list[_Call]) -> None:
        batch = [(words, reply) for words, reply in batch if not reply.cancelled()]
        if not batch:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for words, _ in batch:
                    pipe.execute_command(*words)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # cancelled, the task ends and `_ended` answers
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(_own_copy(exc))
            return
        for (_, reply), answer in zip(batch, replies, strict=True):
            if reply.done():
                continue
            if isinstance(answer, BaseException):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)


def _own_copy(exc: Exception) -> Exception:
    """A copy of the batch's error for one caller (each raises and chains its own), caused by
    the error itself; the error when it cannot be copied."""
    try:
        mine = copy.copy(exc)
    except Exception:  # an exception type that refuses a copy: share it
        return exc
    mine.__cause__ = exc
    mine.__traceback__ = None
    return mine


_BATCH = "_sessionmgr_script_batch"


def batch_of(client: Any) -> ScriptBatch | None:
    """The client's batch (made once, kept on the client, so it lives and goes with it);
    None for what must not be batched: a pipeline (a WATCH, a MULTI) or a Cluster client
    (its own pipeline sorts commands by node: calls go to `ClusterNodes`' node clients)."""
    if not isinstance(client, Redis) or isinstance(client, Pipeline):
        return None
    batch: ScriptBatch | None = client.__dict__.get(_BATCH)
    if batch is None:
        batch = ScriptBatch(client)
        client.__dict__[_BATCH] = batch
    return batch
