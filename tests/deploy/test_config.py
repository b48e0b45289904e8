"""config/: alert rules, the Grafana dashboard, the collector, env files, against the code.

Every metric the dashboard and the alerts query must be a family of sessionmgr.metrics.Metrics
(with the labels they use), so renaming a family breaks these tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from sessionmgr.metrics import Metrics
from sessionmgr.settings import Settings, load_settings, require_jwt, unknown_variables
from tests.deploy.conftest import ROOT, Obj, rendered

CONFIG = ROOT / "config"
ALERTS = CONFIG / "prometheus" / "alerts.yaml"
DASHBOARD = CONFIG / "grafana" / "sessionmgr-dashboard.json"
# Labels Prometheus attaches at scrape time or from Kubernetes discovery.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}


def _families() -> dict[str, set[str]]:
    """Every series name `/metrics` can show, mapped to the labels it may carry."""
    metrics = Metrics()
    families = [f for f in vars(metrics).values() if isinstance(f, MetricWrapperBase)]
    # Every family the registry holds is an attribute of Metrics, and the other way round.
    assert {m.name for m in metrics.registry.collect()} == {f._name for f in families}
    names: dict[str, set[str]] = {}
    for family in families:
        # prometheus-client keeps these two private; a test may look.
        name, labels = family._name, set(family._labelnames)
        if isinstance(family, Counter):
            names[f"{name}_total"] = labels
        elif isinstance(family, Histogram):
            names[f"{name}_bucket"] = labels | {"le"}
            names[f"{name}_sum"] = labels
            names[f"{name}_count"] = labels
        elif isinstance(family, Gauge):
            names[name] = labels
    return names


FAMILIES = _families()


def _alert_rules() -> list[Obj]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard() -> Obj:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels() -> Iterator[Obj]:
    for panel in _dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_promql() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every Prometheus query, Grafana's variables filled in."""
    queries = []
    for panel in _panels():
        for target in panel.get("targets", []):
            if "expr" in target:
                queries.append((panel["title"], target["expr"]))
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), \w+\)", variable["definition"])
            assert inner, variable["definition"]
            queries.append((f"variable {variable['name']}", inner.group(1)))
    return [(title, _fill_variables(expr)) for title, expr in queries]


def _fill_variables(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$route", ".*")


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it is matched or grouped on) for each selector in `expr`."""
    found: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    # Grouping labels must exist on every series under the aggregation.
    return [(name, labels | grouping) for name, labels in found]


def _all_queries() -> list[tuple[str, str]]:
    alerts = [(f"alert {r['alert']}", r["expr"]) for r in _alert_rules()]
    return alerts + _dashboard_promql()


@pytest.mark.parametrize(("where", "expr"), _all_queries(), ids=lambda v: str(v)[:60])
def test_every_query_parses_and_uses_existing_metrics_and_labels(where: str, expr: str) -> None:
    selectors = _selectors(expr)
    assert selectors, f"{where}: no metric in {expr}"
    for name, labels in selectors:
        assert name in FAMILIES, f"{where}: {name} is not exported by sessionmgr.metrics"
        unknown = labels - FAMILIES[name] - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"


def test_the_dashboard_shows_every_metric_family() -> None:
    used = {name for _, expr in _dashboard_promql() for name, _ in _selectors(expr)}
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    every = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in FAMILIES}
    assert every - bases == set()


# --- alert rules ---------------------------------------------------------------------


def test_alerts_have_a_duration_severity_and_what_an_operator_needs() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert isinstance(promql_parser.parse_duration(rule["for"]), timedelta), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"][annotation].strip(), (rule["alert"], annotation)


def _alerts_on(metric: str) -> list[Obj]:
    return [r for r in _alert_rules() if metric in {n for n, _ in _selectors(r["expr"])}]


@pytest.mark.parametrize(
    ("metric", "must_contain"),
    [
        ("sessionmgr_http_requests_total", '"5.."'),
        ("sessionmgr_http_request_duration_seconds_bucket", "histogram_quantile(0.99"),
        ("sessionmgr_outbox_lag_seconds", ">"),
        ("sessionmgr_outbox_dead_letters", "> 0"),
        ("sessionmgr_circuit_breaker_state", "== 2"),
        ("sessionmgr_read_only", "== 1"),
    ],
    ids=["5xx rate", "p99 latency", "outbox lag", "dead letters", "breaker open", "read-only"],
)
def test_the_required_alerts_exist(metric: str, must_contain: str) -> None:
    alerts = _alerts_on(metric)
    assert any(must_contain in a["expr"] for a in alerts), f"no alert on {metric}"


# --- the dashboard ---------------------------------------------------------------------


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["tempo"]["query"] == "tempo"
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        uid = panel["datasource"]["uid"]
        assert uid in {"${datasource}", "${tempo}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_has_a_traces_panel_on_tempo() -> None:
    traces = [p for p in _panels() if p.get("datasource", {}).get("type") == "tempo"]
    assert traces
    for panel in traces:
        (target,) = panel["targets"]
        assert target["queryType"] == "traceql"
        assert 'resource.service.name = "sessionmgr"' in target["query"]


# --- the OpenTelemetry collector -----------------------------------------------------


def test_collector_has_a_traces_pipeline_of_defined_components() -> None:
    config = yaml.safe_load((CONFIG / "otel-collector.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert "traces" in pipelines
    for pipeline in pipelines.values():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{component} is not defined"
        assert pipeline["processors"][0] == "memory_limiter"
        assert "batch" in pipeline["processors"]
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].rstrip("/"))


def test_services_send_otlp_where_the_collector_listens() -> None:
    config = yaml.safe_load((CONFIG / "otel-collector.yaml").read_text())
    # sessionmgr exports OTLP over HTTP/protobuf only (it refuses the grpc protocol).
    http = _port(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    dev_env = _env_file(CONFIG / "dev.env")
    assert _port(dev_env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == http
    prod_config = next(o for o in rendered("prod") if o["kind"] == "ConfigMap")["data"]
    assert _port(prod_config["OTEL_EXPORTER_OTLP_ENDPOINT"]) == http


def test_local_prometheus_scrapes_the_metrics_port_and_loads_the_rules() -> None:
    config = yaml.safe_load((CONFIG / "prometheus" / "prometheus.yaml").read_text())
    for rule_file in config["rule_files"]:
        assert (CONFIG / "prometheus" / rule_file).is_file()
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert _port(target) == int(_env_file(CONFIG / "dev.env")["SESSIONMGR_METRICS_PORT"])


# --- env files -----------------------------------------------------------------------


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def test_dev_env_is_a_valid_configuration_for_serve() -> None:
    env = _env_file(CONFIG / "dev.env")
    settings = load_settings(env)
    require_jwt(settings)
    assert settings.mongodb_in_memory
    assert not unknown_variables(env)
    assert env["TZ"] == "UTC"


def test_every_setting_is_in_the_env_example_and_the_readme_table() -> None:
    example = (CONFIG / "sessionmgr.env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for field in Settings.__struct_fields__:
        var = f"SESSIONMGR_{field.upper()}"
        assert re.search(rf"^# {var}=", example, re.MULTILINE), f"{var} not in the example"
        assert f"| `{var}` |" in readme, f"{var} not in the README's configuration table"
