"""Services know storage only through their ports: no service module imports a backend's
client library or a storage adapter (the write-behind and the idle sweep included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).parents[2] / "sessionmgr" / "services"
FORBIDDEN = ("redis", "pymongo", "motor", "beanie", "aioboto3", "botocore", "sessionmgr.storage")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", sorted(SERVICES.glob("*.py")), ids=lambda p: p.name)
def test_a_service_imports_no_backend_and_no_adapter(module: Path) -> None:
    bad = {m for m in _imports(module) for f in FORBIDDEN if m == f or m.startswith(f + ".")}
    assert not bad, f"{module.name} imports {sorted(bad)}: reach storage through services/ports.py"


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from redis.asyncio import Redis\n")
    assert "redis.asyncio" in _imports(module)
