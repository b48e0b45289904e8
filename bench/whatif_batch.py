"""What-if, never a configuration: a replica's concurrent script calls sent to Redis together.

With `BENCH_WHATIF_BATCH=1` in its environment, `python -m bench.serve` (the replica
`bench.run` starts) replaces `storage.hot._evalsha`: every EVALSHA (the commit script, the
read script) asked for in one turn of the event loop joins one pipeline, sent by one task
and read back in one go, instead of each request's own round trip. It sizes what batching
would give an append or a GET (bench/profiles/findings.md); it is not how the service runs.
What it leaves out, and what a real one would need: a setting to turn it off; the Cluster
client and a WATCHing pipeline (it must never batch those); each caller's own copy of an
error the whole batch met; and tests of a lost reply and of a cancelled caller with several
commits in one batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import NoScriptError

from sessionmgr.storage import hot

_Pending = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]


class _Batch:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.pending: _Pending = []
        self.sending: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    def submit(self, words: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((words, future))
        if len(self.pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: _Pending) -> None:
        batch = [(words, future) for words, future in batch if not future.cancelled()]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for words, _ in batch:
                    pipe.execute_command(*words)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # every caller learns it: outcome unknown for each
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


_batches: dict[int, _Batch] = {}


async def _batched_evalsha(client: Any, sha: str, script: str, keys: list[str], *args: Any) -> Any:
    batch = _batches.get(id(client))
    if batch is None:
        batch = _batches[id(client)] = _Batch(client)
    try:
        return await batch.submit(("EVALSHA", sha, len(keys), *keys, *args))
    except NoScriptError:  # nothing ran: the script was unknown
        return await client.execute_command("EVAL", script, len(keys), *keys, *args)


def install() -> None:
    hot._evalsha = _batched_evalsha  # type: ignore[assignment]
