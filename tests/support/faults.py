"""Fault injection on real servers: a Redis that can be killed, frozen and restarted, and a
TCP proxy that loses a reply after the server executed the command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal

from sessionmgr.devstack import RedisServer
from sessionmgr.storage.hot import APPLY_MARK, APPLY_SHA, COMMIT_MARK, COMMIT_SHA

# What a write's last round trip carries: EXEC of a MULTI, the commit script of an update or
# the apply script of a create (by its digest, or by its text after Redis forgot it: each
# script opens with its mark).
WRITE_MARKERS = (
    b"\r\nEXEC\r\n",
    COMMIT_SHA.encode(),
    COMMIT_MARK.encode(),
    APPLY_SHA.encode(),
    APPLY_MARK.encode(),
)


def script_commands(args: tuple[object, ...]) -> list[tuple[object, ...]] | None:
    """The commands a write script's call carries, or None for any other command. A commit
    (`RedisHotStore._commit`) has, after the script and its keys, the lease keys' prefix, the
    rev and the version read, and the live leases (their number, then each MAD); an apply (a
    create) has its commands right after its keys. Each command is its length, then its words."""
    script = str(args[1]) if len(args) > 1 and args[0] in ("EVALSHA", "EVAL") else ""
    keys = int(str(args[2])) if script else 0
    if script == COMMIT_SHA or script.startswith(COMMIT_MARK):
        leases = int(str(args[3 + keys + 3]))
        words = args[3 + keys + 4 + leases :]
    elif script == APPLY_SHA or script.startswith(APPLY_MARK):
        words = args[3 + keys :]
    else:
        return None
    found, i = [], 0
    while i < len(words):
        n = int(str(words[i]))
        found.append(tuple(words[i + 1 : i + 1 + n]))
        i += n + 1
    return found


def is_commit(args: tuple[object, ...]) -> bool:
    """A call of the commit script: EVALSHA of its digest, or EVAL of its text."""
    script = str(args[1]) if len(args) > 1 else ""
    return args[0] in ("EVALSHA", "EVAL") and (
        script == COMMIT_SHA or script.startswith(COMMIT_MARK)
    )


class DurableRedis(RedisServer):
    """A redis-server on a fixed port with `appendfsync always`: what it acknowledged survives
    SIGKILL, and a restart (`start()` again) comes back on the same port with the same data."""

    persistence = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF already holds survives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open (the kernel accepts them), nothing is answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class ReplyDropper:
    """A TCP proxy in front of Redis. Armed, it forwards the next write (a chunk holding EXEC,
    the commit script or a create's apply script, `WRITE_MARKERS`) to the server, throws away
    whatever the server answers on that connection, and then closes it: the client cannot
    know whether its write was applied."""

    LINGER_S = 0.1  # long enough for the server to execute and answer the whole chunk

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.armed = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, times: int = 1) -> None:
        self.armed = times

    async def start(self) -> ReplyDropper:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        lost = asyncio.Event()
        try:
            await asyncio.gather(
                self._upward(client_r, server_w, lost), self._downward(server_r, client_w, lost)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)

    async def _upward(
        self, client: asyncio.StreamReader, server: asyncio.StreamWriter, lost: asyncio.Event
    ) -> None:
        while data := await client.read(65536):
            if self.armed and any(marker in data for marker in WRITE_MARKERS):
                self.armed -= 1
                lost.set()
            server.write(data)
            await server.drain()
            if lost.is_set():
                await asyncio.sleep(self.LINGER_S)
                self.dropped += 1
                raise ConnectionResetError("reply dropped by the fault proxy")
        server.close()

    async def _downward(
        self, server: asyncio.StreamReader, client: asyncio.StreamWriter, lost: asyncio.Event
    ) -> None:
        while data := await server.read(65536):
            if lost.is_set():
                continue  # the reply is lost on the way back
            client.write(data)
            await client.drain()
        client.close()
