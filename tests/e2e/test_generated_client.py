"""A client generated from the served OpenAPI document works (issue 12).

openapi-python-client (a maintained generator, in the `tests` group) turns the document a
running `sessionmgr serve` serves at `/schema/openapi.json` into a Python package; the test
imports it and drives a create / read / patch / conflict cycle through it, over TCP. The
generator runs offline: it reads the document from a file and formats with the ruff of this
environment. `--fail-on-warning` makes any part it had to skip a failure.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from sessionmgr.api.auth import issue_token
from tests.conftest import JWT_SECRET
from tests.e2e.served import Served, serve
from tests.support.redis_server import RedisServer

pytest.importorskip(
    "openapi_python_client", reason="openapi-python-client (tests group) is not installed"
)

PACKAGE = "generated_sessionmgr"  # not `sessionmgr_client`: that name is the real client's


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if redis_server.process is None:
        redis_server.start()
    log = tmp_path_factory.mktemp("client") / "serve.log"
    with serve({"SESSIONMGR_REDIS_URL": redis_server.url}, log) as server:
        yield server


@pytest.fixture(scope="module")
def generated(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("generated")
    document = root / "openapi.json"
    document.write_bytes(httpx.get(f"{served.base_url}/schema/openapi.json").content)
    config = root / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\nproject_name_override: generated\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(  # fixed argv, no shell
        [
            *(sys.executable, "-m", "openapi_python_client", "generate"),
            *("--path", str(document), "--config", str(config), "--meta", "none"),
            *("--output-path", str(root / PACKAGE), "--fail-on-warning"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_a_generated_client_creates_reads_patches_and_meets_conflicts(
    served: Served, generated: ModuleType
):
    api = "api.sessions"
    create_session = _module(f"{api}.create_session")
    get_session = _module(f"{api}.get_session")
    update_session = _module(f"{api}.update_session")
    models = _module("models")
    client = generated.AuthenticatedClient(
        base_url=served.base_url, token=issue_token(JWT_SECRET, "alice-generated")
    )

    created = create_session.sync_detailed(
        client=client, body=models.CreateSessionBody.from_dict({"work_in_progress": {"step": 1}})
    )
    assert created.status_code == 201
    session = created.parsed
    assert isinstance(session, models.Session)
    assert session.work_in_progress.to_dict() == {"step": 1}
    etag = created.headers["etag"]

    read = get_session.sync_detailed(session.id, client=client)
    assert (read.status_code, read.parsed.version) == (200, 1)
    unchanged = get_session.sync_detailed(session.id, client=client, if_none_match=etag)
    assert (unchanged.status_code, unchanged.parsed) == (304, None)

    patch = models.PatchBody.from_dict({"patch": {"work_in_progress": {"step": 2}}})
    patched = update_session.sync_detailed(session.id, client=client, body=patch, if_match=etag)
    assert patched.status_code == 200
    assert isinstance(patched.parsed, models.Session)
    assert (patched.parsed.version, patched.parsed.work_in_progress.to_dict()) == (2, {"step": 2})

    stale = update_session.sync_detailed(session.id, client=client, body=patch, if_match=etag)
    assert stale.status_code == 412
    assert isinstance(stale.parsed, models.Problem)
    assert (stale.parsed.type_, stale.parsed.current_version) == (
        "/problems#precondition-failed",
        2,
    )

    old = models.PatchBody.from_dict({"expected_version": 1, "patch": {"context_summary": {}}})
    conflict = update_session.sync_detailed(session.id, client=client, body=old)
    assert conflict.status_code == 409
    assert isinstance(conflict.parsed, models.Problem)
    assert conflict.parsed.current_version == 2


def test_the_generated_patch_model_knows_the_allowed_keys(generated: ModuleType):
    patch_fields = _module("models.patch_body_patch").PatchBodyPatch
    assert {"work_in_progress", "context_summary", "full_context"} <= set(
        patch_fields.__annotations__
    )
