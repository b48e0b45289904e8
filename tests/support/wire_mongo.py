"""A MongoDB wire-compatible server for the tests: nx-27017 (SQLite underneath), not MongoDB.

No MongoDB server can be installed on the CI machine, so the tests that need one server shared
by several processes (tests/multi_replica) and the warm store's contract run on
`nx-27017` (pinned in the `tests` dependency group), started as a subprocess on a free port
with an explicit `-p PORT --pid-file FILE` (its defaults are port 27017 and a fixed pid file)
and a data directory of its own. Test ids and docs call it "wire-compatible server".

Three of its bugs meet the warm store; they are worked around here, inside the server process
(`python -m tests.support.wire_mongo` wraps nx-27017's command handler, then runs its `main`),
so that sessionmgr's own Motor/Beanie calls go out unchanged and nothing in `sessionmgr/` or the
schema bends to it:

1. A compound index containing `_id` (the `owner_id`/`acl` indexes) makes every later insert
   fail with `JSON path error near '_id'`: such an index is created without its `_id` part
   (`_id` is unique anyway, so the index serves the same queries).
2. `listIndexes` reports generated names, not the names given: the names (and the keys, with
   the `_id` part of 1) that were asked for are reported back, from a map kept in the data
   directory so it survives a restart of the server.
3. A dotted inclusion projection (`{"archive.sha256": 1}`) comes back as a flat
   `"archive.sha256"` key: such keys are nested again in the reply's first batch (every
   dotted projection the warm store makes is a `find_one`, one batch).

`SESSIONMGR_TEST_MONGODB_URI`, when set, names a real MongoDB instead; the same tests run there
unchanged and none of this is used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sessionmgr.devstack import _die_with_parent
from tests.support.redis_server import free_port

LABEL = "wire-compatible server"
START_TIMEOUT_S = 20.0
REPO_ROOT = Path(__file__).resolve().parents[2]
INDEX_MAP = "given-index-names.json"


class WireMongoServer:
    """nx-27017 (with the workarounds above) on a free loopback port, data in a temp dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sessionmgr-wire-mongo-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> WireMongoServer:
        (self.dir / "data").mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        # A fixed argv (this interpreter, this module), no shell; the child keeps its own copy
        # of the stderr file.
        with open(self.dir / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "tests.support.wire_mongo"),
                    *("--host", "127.0.0.1", "-p", str(self.port)),
                    *("--pid-file", str(self.dir / "nx.pid")),
                    *("--data-dir", str(self.dir / "data")),
                    *("--log-file", str(self.dir / "nx.log")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.answers():
                return self
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"the {LABEL} did not answer on port {self.port}: {tail}")

    def answers(self) -> bool:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, Any]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=300, connectTimeoutMS=300
        )
        try:
            client.admin.command("ping")
        except PyMongoError:
            return False
        finally:
            client.close()
        return True

    def pause(self) -> None:
        """SIGSTOP: the server holds every request until `resume` (clients time out)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        lines: list[str] = []
        for name in ("nx.log", "stderr.log"):
            try:
                lines += (self.dir / name).read_text(errors="replace").splitlines()[-3:]
            except OSError:
                continue
        return " | ".join(lines) or "no log"


# -- inside the server process -----------------------------------------------------------------


class _GivenIndexes:
    """What each index was asked to be (name, key), by (db, collection, stored key)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._map: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._map = json.loads(path.read_text())

    @staticmethod
    def _slot(db: str, coll: str, key: dict[str, Any]) -> str:
        return json.dumps([db, coll, list(key.items())])

    def remember(self, db: str, coll: str, stored: dict[str, Any], given: dict[str, Any]) -> None:
        with self._lock:
            self._map[self._slot(db, coll, stored)] = given
            self._path.write_text(json.dumps(self._map))

    def given(self, db: str, coll: str, stored: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            return self._map.get(self._slot(db, coll, stored))


def _body(msg: dict[str, Any]) -> dict[str, Any] | None:
    for kind, doc in msg.get("sections", []):
        if kind == "body" and isinstance(doc, dict):
            return doc
    return None


def _nest_dotted(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if "." not in key:
            out[key] = value
            continue
        head, *rest = key.split(".")
        node = out.setdefault(head, {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = value
    return out


def _install_workarounds(data_dir: Path) -> None:
    from nx_27017.handler import NeoSQLiteHandler

    given = _GivenIndexes(data_dir / INDEX_MAP)
    original = NeoSQLiteHandler.handle_command

    def handle_command(self: Any, msg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = _body(msg)
        if body is None:
            return original(self, msg)  # type: ignore[no-any-return]
        db = str(body.get("$db", "test"))
        if "createIndexes" in body:  # bug 1: no `_id` in a compound key; bug 2: keep the name
            coll = str(body["createIndexes"])
            for spec in body.get("indexes", []):
                key = dict(spec.get("key", {}))
                if len(key) > 1 and "_id" in key:
                    stored = {k: v for k, v in key.items() if k != "_id"}
                    spec["key"] = stored
                else:
                    stored = key
                if spec.get("name"):
                    given.remember(db, coll, stored, {"name": spec["name"], "key": key})
        request_id, reply = original(self, msg)
        if "listIndexes" in body and reply.get("ok"):
            coll = str(body["listIndexes"])
            for entry in reply.get("cursor", {}).get("firstBatch", []):
                asked = given.given(db, coll, dict(entry.get("key", {})))
                if asked is not None:
                    entry.update(asked)
        projection = body.get("projection") if "find" in body else None
        if projection and any("." in k for k in projection) and reply.get("ok"):
            cursor = reply.get("cursor", {})
            cursor["firstBatch"] = [_nest_dotted(d) for d in cursor.get("firstBatch", [])]
        return request_id, reply

    NeoSQLiteHandler.handle_command = handle_command  # type: ignore[method-assign]


def _serve() -> None:
    from nx_27017.nx_27017 import main

    data_dir = Path(sys.argv[sys.argv.index("--data-dir") + 1])
    _install_workarounds(data_dir)
    main()


if __name__ == "__main__":
    _serve()
