"""Two MADs, `ping` and `pong`, play one ball on one session, each woken by the change feed.

Each instance joins the session as its MAD (a lease, renewed in the background, and a
fencing token on every write), waits for changes, and when the ball is on its side hits it
back: one `update()` (read, change, PATCH with If-Match, again on conflict) and a timeline
event. Run against `sessionmgr dev`, with a JWT secret of your own so that `sessionmgr token`
can mint the MADs' tokens:

    export SESSIONMGR_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    sessionmgr dev &
    B=http://127.0.0.1:8080
    OWNER=$(sessionmgr token --sub dev-user)
    SID=$(python examples/pingpong.py setup --base-url $B --token "$OWNER")
    python examples/pingpong.py play --base-url $B --session $SID --name ping \\
        --token "$(sessionmgr token --sub mad:ping)" &
    python examples/pingpong.py play --base-url $B --session $SID --name pong \\
        --token "$(sessionmgr token --sub mad:pong)"

Each prints its hits and stops when the rally is over (`--rally`, 10 hits by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from sessionmgr_client import AsyncClient, Change, Membership, ProblemError, Session

OTHER = {"ping": "pong", "pong": "ping"}
QUIET_S = 5.0  # re-read after this long without a change (a feed that is down, say)


async def setup(client: AsyncClient, rally: int) -> str:
    session = await client.create_session(
        work_in_progress={"ball": 0, "turn": "ping", "rally": rally}
    )
    for name in OTHER:
        await client.join(session.id, name)  # the owner adds both; each rejoins as itself
    return session.id


async def feed(client: AsyncClient, session_id: str, changes: asyncio.Queue[Change]) -> None:
    async for change in client.watch(session_id):
        await changes.put(change)


def over(session: Session) -> bool:
    wip = session.work_in_progress
    return bool(wip["ball"] >= wip["rally"])


async def play(client: AsyncClient, session_id: str, name: str, quiet: float = QUIET_S) -> int:
    changes: asyncio.Queue[Change] = asyncio.Queue()
    async with client.participant(session_id, name) as me:
        watcher = asyncio.create_task(feed(client, session_id, changes))
        try:
            while not over(session := await me.get()):
                if session.work_in_progress["turn"] == name:
                    await hit(me, name)
                    continue
                with contextlib.suppress(TimeoutError):
                    change = await asyncio.wait_for(changes.get(), quiet)
                    if change.kind == "reset":
                        print(f"{name}: the feed was reset at version {change.version}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProblemError):
                await watcher  # a feed that failed for good: its error, not a warning
    print(f"{name}: rally over at {session.work_in_progress['ball']} hits")
    return int(session.work_in_progress["ball"])


async def hit(me: Membership, name: str) -> None:
    def swing(session: Session) -> dict[str, Any] | None:
        wip = session.work_in_progress
        if wip["turn"] != name or over(session):
            return None  # someone else moved meanwhile: nothing to do
        return {"work_in_progress": {**wip, "ball": wip["ball"] + 1, "turn": OTHER[name]}}

    session = await me.update(swing)
    ball = session.work_in_progress["ball"]
    await me.append([{"kind": "hit", "data": {"by": name, "ball": ball}}])
    print(f"{name}: hit {ball}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["setup", "play"])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--token", required=True)
    parser.add_argument("--session")
    parser.add_argument("--name", choices=sorted(OTHER))
    parser.add_argument("--rally", type=int, default=10)
    args = parser.parse_args()
    async with AsyncClient(args.base_url, token=args.token) as client:
        if args.command == "setup":
            print(await setup(client, args.rally))
        elif args.session and args.name:
            await play(client, args.session, args.name)
        else:
            parser.error("play needs --session and --name")


if __name__ == "__main__":
    asyncio.run(main())
