"""`python -m bench.serve`: sessionmgr as `sessionmgr serve` runs it, with the write-behind
worker in a process of its own when asked.

Without a MongoDB server here, the warm tier is mongomock, which runs its queries as Python
scans inside the event loop: an in-process write-behind then stalls every request while it
writes, which a real MongoDB (awaited over the network) would not. `--no-write-behind` serves
the API without the worker; `--worker-only` runs the worker alone, so its CPU is measured
apart and it never blocks the API's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence


def serve(host: str, port: int, write_behind: bool) -> None:
    import gc
    import os

    import uvicorn

    # A diagnosis switch (docs/benchmarks.md): the in-memory MongoDB keeps every session in
    # this process, and a full collection of that heap stalls the loop for ~100 ms.
    if os.environ.get("BENCH_NO_GC"):
        gc.disable()

    from sessionmgr.app import create_app
    from sessionmgr.container import build_container
    from sessionmgr.settings import load_settings

    uvicorn.run(
        lambda: create_app(build_container(write_behind=write_behind)),
        factory=True,
        host=host,
        port=port,
        lifespan="on",
        proxy_headers=True,
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=load_settings().shutdown_grace_s,
    )


async def worker_only() -> None:
    from sessionmgr.container import build_container

    container = build_container(write_behind=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await container.init_resources()
    await container.write_behind()
    try:
        await stop.wait()
    finally:
        await container.shutdown_resources()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-write-behind", action="store_true")
    parser.add_argument("--worker-only", action="store_true")
    args = parser.parse_args(argv)
    if args.worker_only:
        asyncio.run(worker_only())
    else:
        serve(args.host, args.port, not args.no_write_behind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
