"""The metrics port setting, and `serve`'s refusal to split one registry over workers."""

from __future__ import annotations

from typing import Any

import pytest

from sessionmgr import cli
from sessionmgr.settings import ConfigError, load_settings

SECRET = "s" * 40


def test_metrics_port_is_unset_by_default() -> None:
    assert load_settings({}).metrics_port is None


def test_metrics_port_is_read_from_the_environment() -> None:
    assert load_settings({"SESSIONMGR_METRICS_PORT": "9464"}).metrics_port == 9464


@pytest.mark.parametrize("raw", ["0", "65536", "metrics", "94.64"])
def test_a_bad_metrics_port_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_METRICS_PORT"):
        load_settings({"SESSIONMGR_METRICS_PORT": raw})


def test_serve_refuses_a_metrics_port_with_several_workers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(app))
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_METRICS_PORT", "9464")

    assert cli.main(["serve", "--workers", "2"]) == 2
    assert "SESSIONMGR_METRICS_PORT" in capsys.readouterr().err
    assert calls == []


def test_serve_with_a_metrics_port_and_one_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(app))
    monkeypatch.setattr("sessionmgr.telemetry.configure_logging", lambda level: None)
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("SESSIONMGR_METRICS_PORT", "9464")

    assert cli.main(["serve"]) == 0
    assert calls == ["sessionmgr.app:create_app"]


def test_serve_refuses_an_otel_exporter_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    monkeypatch.setenv("SESSIONMGR_JWT_SECRET", SECRET)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")

    assert cli.main(["serve"]) == 2
    assert "OTEL_TRACES_EXPORTER" in capsys.readouterr().err
