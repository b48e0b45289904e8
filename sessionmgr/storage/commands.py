"""A commit's Redis commands written down as the commit script's words, without redis-py.

The commit script (`hot._COMMIT_SCRIPT`) runs the commands a decision queued, each sent as its
length and its words. They used to be queued on a redis-py pipeline that was never sent, only
read back: a pipeline object, and for each command redis-py's method, its `execute_command`
and the pipeline's queueing: about 4 us of an append's CPU in one process (timed with the
Redis call itself left out). `Words` takes the same calls, with the arguments the commit path
uses, and writes down the words redis-py's methods would have queued
(tests/unit/test_commit_words.py holds the two to the same words). The code that queues a
change (`RedisHotStore._queue_change`, `_touch`, `feed.queue`, `_index_idem`) runs on either,
so a real pipeline (a load, a rebase) and a write script (a commit, a create) share it. A
call this class does not know is an AttributeError. What redis-py refuses for these calls
before sending is refused here too, and so is a command with nothing to write (an empty
ZADD, RPUSH or DEL), which Redis would refuse inside the script after the commands before it
had run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Words:
    """Commands as `[len(args), *args]` in `words`, in the order they were queued."""

    __slots__ = ("words",)

    def __init__(self, words: list[Any]) -> None:
        self.words = words

    def _add(self, *args: Any) -> None:
        self.words.append(len(args))
        self.words.extend(args)

    def hset(self, name: str, *, mapping: Mapping[str, Any]) -> None:
        if not mapping:
            raise ValueError("hset: no field to set")
        args: list[Any] = ["HSET", name]
        for pair in mapping.items():
            args.extend(pair)
        self._add(*args)

    def rpush(self, name: str, *values: Any) -> None:
        if not values:
            raise ValueError("rpush: no value to push")
        self._add("RPUSH", name, *values)

    def ltrim(self, name: str, start: int, end: int) -> None:
        self._add("LTRIM", name, start, end)

    def set(self, name: str, value: Any, *, ex: int | None = None, px: int | None = None) -> None:
        if ex is not None and px is not None:
            raise ValueError("set: ex or px, not both")
        if not isinstance(ex if px is None else px, int | None):
            raise TypeError("set: ex and px are whole seconds and milliseconds")
        if ex is not None:
            self._add("SET", name, value, "EX", ex)
        elif px is not None:
            self._add("SET", name, value, "PX", px)
        else:
            self._add("SET", name, value)

    def delete(self, *names: str) -> None:
        if not names:
            raise ValueError("delete: no key to delete")
        self._add("DEL", *names)

    def expire(self, name: str, seconds: int) -> None:
        self._add("EXPIRE", name, seconds)

    def zadd(self, name: str, mapping: Mapping[str, float]) -> None:
        if not mapping:
            raise ValueError("zadd: no member to add")
        args: list[Any] = ["ZADD", name]
        for member, score in mapping.items():
            args += [score, member]
        self._add(*args)

    def zremrangebyscore(self, name: str, low: Any, high: Any) -> None:
        self._add("ZREMRANGEBYSCORE", name, low, high)

    def xadd(
        self,
        name: str,
        fields: Mapping[str, Any],
        *,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> None:
        args: list[Any] = ["XADD", name]
        if maxlen is not None:
            if not isinstance(maxlen, int) or maxlen < 0:
                raise ValueError("xadd: maxlen must be a non-negative integer")
            args.append(b"MAXLEN")
            if approximate:
                args.append(b"~")
            args.append(str(maxlen))
        args.append("*")
        if not fields:
            raise ValueError("xadd: no field to add")
        for pair in fields.items():
            args.extend(pair)
        self._add(*args)
