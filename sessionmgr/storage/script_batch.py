"""One round trip to Redis for the script calls many requests make at once.

Every hot read, every commit and every create's write is one EVALSHA (`hot._READ_SCRIPT`,
`hot._COMMIT_SCRIPT`, `hot._APPLY_SCRIPT`).
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
- a caller cancelled before its batch's task starts sends nothing, and a batch that ends
  without answering a caller answers it with a lost connection (storage/turn_batch.py).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.storage.turn_batch import TurnBatch


class ScriptBatch(TurnBatch[tuple[Any, ...], Any]):
    """The script calls to one Redis client that wait for the end of this loop turn."""

    def __init__(self, client: Redis) -> None:
        super().__init__()
        self.client = client

    async def _send_all(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for words in calls:
                pipe.execute_command(*words)
            return list(await pipe.execute(raise_on_error=False))

    def _lost(self) -> Exception:
        return RedisConnectionError("the batch sending this command ended")


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
