"""sessionmgr-client stands alone: none of the server's dependencies, typed, importable."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"sessionmgr", "litestar", "redis", "motor", "beanie", "aioboto3", "jwt", "uvicorn"}


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    probe = (
        "import json, sys, sessionmgr_client; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=CLIENT
    ).stdout
    loaded = set(json.loads(out))
    assert not loaded & SERVER_ONLY, loaded & SERVER_ONLY


def test_its_dependencies_are_the_client_ones() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert names == {"httpx", "httpx-sse", "msgspec", "stamina"}
    assert project["name"] == "sessionmgr-client"
    assert (CLIENT / "src" / "sessionmgr_client" / "py.typed").exists()
