"""The kustomize overlays render, validate against Kubernetes' schemas, and keep their policies.

Rendering needs `kubectl` (or `kustomize`) on PATH; everything runs offline.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest

from sessionmgr.cli import _parser
from sessionmgr.settings import Settings, load_settings, require_jwt, unknown_variables
from tests.deploy.conftest import (
    Obj,
    api_pod,
    effective_env,
    find,
    one,
    pod_templates,
    rendered,
    selects,
    sweep_pod,
)

# The oldest Kubernetes the manifests are for (topology spread matchLabelKeys, CronJob
# timeZone) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
NAMESPACES = {"dev": "sessionmgr-dev", "prod": "sessionmgr"}


# --- every object is valid Kubernetes -----------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", ["base", "dev", "prod", "prod-sentinel", "prod-cluster"])
def test_every_rendered_object_validates_offline(target: str, version: str) -> None:
    objs = rendered(target)
    assert objs
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{target}: {name} is invalid for {version} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{target}: {name}: {exc.message}")


def test_base_runs_three_replicas() -> None:
    assert one(rendered("base"), "Deployment", "sessionmgr")["spec"]["replicas"] == 3


def test_dev_runs_one_replica_without_an_autoscaler() -> None:
    objs = rendered("dev")
    assert one(objs, "Deployment", "sessionmgr")["spec"]["replicas"] == 1
    assert not find(objs, "HorizontalPodAutoscaler")
    assert one(objs, "CronJob", "sessionmgr-archive-sweep")["spec"]["suspend"] is True


def test_prod_scales_three_to_five_replicas_with_an_hpa() -> None:
    objs = rendered("prod")
    deployment = one(objs, "Deployment", "sessionmgr")
    # The HPA owns the count; a fixed one would be reset by every `kubectl apply`.
    assert "replicas" not in deployment["spec"]
    hpa = one(objs, "HorizontalPodAutoscaler", "sessionmgr")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 5)
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sessionmgr",
    }
    assert one(objs, "CronJob", "sessionmgr-archive-sweep")["spec"].get("suspend") is not True


# --- the namespace --------------------------------------------------------------------------


def test_overlay_namespace_enforces_the_restricted_pod_security_standard(
    overlay: str, objs: list[Obj]
) -> None:
    namespace = one(objs, "Namespace", NAMESPACES[overlay])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACES[overlay], obj["metadata"]["name"]


# --- pods: security, resources, /tmp ------------------------------------------------------


def test_every_pod_runs_restricted_with_a_read_only_root(objs: list[Obj]) -> None:
    for name, template in pod_templates(objs):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["securityContext"].get("runAsUser", 0) != 0, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{name} container {container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc.get("privileged") is not True, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where


def test_every_container_has_requests_and_limits(objs: list[Obj]) -> None:
    for name, template in pod_templates(objs):
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert set(resources[bound]) >= {"cpu", "memory"}, (name, bound)


@pytest.mark.parametrize("pod", [api_pod, sweep_pod], ids=["api", "archive-sweep"])
def test_sessionmgr_pods_get_a_writable_tmp_from_an_empty_dir(objs: list[Obj], pod: Any) -> None:
    spec = pod(objs)["spec"]
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
    assert "emptyDir" in volume
    assert volume["emptyDir"].get("sizeLimit")


def test_the_service_account_mounts_no_token(objs: list[Obj]) -> None:
    account = one(objs, "ServiceAccount", "sessionmgr")
    assert account["automountServiceAccountToken"] is False
    assert api_pod(objs)["spec"]["serviceAccountName"] == "sessionmgr"
    assert sweep_pod(objs)["spec"]["serviceAccountName"] == "sessionmgr"


# --- the API pods: serve, ports, probes, spreading ------------------------------------------


def _api_container(objs: list[Obj]) -> Obj:
    (container,) = api_pod(objs)["spec"]["containers"]
    return dict(container)


def test_api_container_serves_with_one_worker_per_pod(objs: list[Obj]) -> None:
    args = _parser().parse_args(_api_container(objs)["args"])
    assert args.command == "serve"
    assert (args.host, args.port, args.workers) == ("0.0.0.0", 8080, 1)


def test_api_container_names_the_http_and_metrics_ports(objs: list[Obj]) -> None:
    container = _api_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9464}
    env = effective_env(objs, container)
    assert env["SESSIONMGR_METRICS_PORT"] == str(ports["metrics"])


def test_probes_use_the_health_routes(objs: list[Obj]) -> None:
    container = _api_container(objs)
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": ("/health/live", "http"),
        "livenessProbe": ("/health/live", "http"),
        "readinessProbe": ("/health/ready", "http"),
    }
    # The readiness route checks both backends with a 1 s bound each, in parallel.
    assert container["readinessProbe"]["timeoutSeconds"] >= 2


def test_api_pods_spread_over_zones_and_nodes(objs: list[Obj]) -> None:
    template = api_pod(objs)
    constraints = template["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints:
        assert constraint["maxSkew"] == 1
        assert selects(constraint["labelSelector"], template["metadata"]["labels"])


def test_pdb_lets_one_api_pod_go_at_a_time(objs: list[Obj]) -> None:
    pdb = one(objs, "PodDisruptionBudget", "sessionmgr")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert selects(pdb["selector"], api_pod(objs)["metadata"]["labels"])
    assert not selects(pdb["selector"], sweep_pod(objs)["metadata"]["labels"])


# --- Services ---------------------------------------------------------------------------------


def test_public_service_exposes_the_api_port_only(objs: list[Obj]) -> None:
    service = one(objs, "Service", "sessionmgr")["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["ports"]] == [
        ("http", 8080, "http")
    ]
    assert selects(service["selector"], api_pod(objs)["metadata"]["labels"])
    # A sweep pod has no readiness probe: it must never receive API traffic.
    assert not selects(service["selector"], sweep_pod(objs)["metadata"]["labels"])


def test_metrics_are_reachable_through_an_internal_headless_service(objs: list[Obj]) -> None:
    service = one(objs, "Service", "sessionmgr-metrics")["spec"]
    assert service["clusterIP"] == "None"
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["ports"]] == [
        ("metrics", 9464, "metrics")
    ]
    annotations = api_pod(objs)["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9464"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_no_other_service_or_ingress_reaches_the_metrics_port(objs: list[Obj]) -> None:
    for service in find(objs, "Service"):
        if service["metadata"]["name"] == "sessionmgr-metrics":
            continue
        for port in service["spec"]["ports"]:
            assert port["targetPort"] not in ("metrics", 9464), service["metadata"]["name"]
    for ingress in find(objs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == "sessionmgr"


# --- NetworkPolicy ----------------------------------------------------------------------------


def _ports(rules: list[Obj]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for rule in rules for p in rule["ports"]}


def _policies_for(objs: list[Obj], labels: dict[str, str], direction: str) -> list[Obj]:
    return [
        p["spec"]
        for p in find(objs, "NetworkPolicy")
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def test_the_namespace_denies_all_traffic_by_default(objs: list[Obj]) -> None:
    deny = [
        p["spec"]
        for p in find(objs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


@pytest.mark.parametrize("pod", [api_pod, sweep_pod], ids=["api", "archive-sweep"])
def test_egress_reaches_dns_redis_mongodb_and_https_only(objs: list[Obj], pod: Any) -> None:
    policies = _policies_for(objs, pod(objs)["metadata"]["labels"], "Egress")
    rules = [rule for p in policies for rule in p.get("egress", [])]
    for rule in rules:
        assert rule.get("ports"), "an egress rule without ports opens every port"
    assert _ports(rules) == {
        (53, "UDP"),
        (53, "TCP"),  # DNS
        (6379, "TCP"),
        (6380, "TCP"),  # Redis, plain and TLS
        (27017, "TCP"),  # MongoDB
        (443, "TCP"),  # S3 and the token issuer's JWKS
        (4318, "TCP"),  # OTLP/HTTP to the collector
    }


def test_ingress_opens_the_api_port_and_the_metrics_port_to_monitoring_only(
    objs: list[Obj],
) -> None:
    policies = _policies_for(objs, api_pod(objs)["metadata"]["labels"], "Ingress")
    rules = [rule for p in policies for rule in p.get("ingress", [])]
    assert _ports(rules) == {(8080, "TCP"), (9464, "TCP")}
    for rule in rules:
        if (9464, "TCP") in _ports([rule]):
            monitoring = {"kubernetes.io/metadata.name": "monitoring"}
            assert rule["from"] == [{"namespaceSelector": {"matchLabels": monitoring}}]
    sweep_rules = _policies_for(objs, sweep_pod(objs)["metadata"]["labels"], "Ingress")
    assert not [rule for p in sweep_rules for rule in p.get("ingress", [])]


def test_dev_redis_accepts_sessionmgr_pods_only() -> None:
    objs = rendered("dev")
    redis_labels = one(objs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    rules = [r for p in _policies_for(objs, redis_labels, "Ingress") for r in p.get("ingress", [])]
    assert _ports(rules) == {(6379, "TCP")}
    for rule in rules:
        (peer,) = rule["from"]
        assert selects(peer["podSelector"], api_pod(objs)["metadata"]["labels"])


# --- the archive-sweep CronJob ----------------------------------------------------------------


def test_archive_sweep_cronjob_never_overlaps(objs: list[Obj]) -> None:
    spec = one(objs, "CronJob", "sessionmgr-archive-sweep")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] in {
        "Never",
        "OnFailure",
    }


def test_archive_sweep_runs_the_cli_command() -> None:
    (container,) = sweep_pod(rendered("prod"))["spec"]["containers"]
    args = container["args"]
    assert args[0] == "archive-sweep"
    assert "--dry-run" not in args
    assert re.fullmatch(r"\d+d", args[args.index("--older-than") + 1])
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if "archive-sweep" not in commands:
        pytest.skip("`sessionmgr archive-sweep` is not in this build's CLI yet (cold tier)")
    assert parser.parse_args(args).command == "archive-sweep"


def test_archive_sweep_runs_like_the_api_pods(objs: list[Obj]) -> None:
    api, sweep = api_pod(objs)["spec"], sweep_pod(objs)["spec"]
    assert sweep["securityContext"] == api["securityContext"]
    (api_c,) = api["containers"]
    (sweep_c,) = sweep["containers"]
    assert sweep_c["image"] == api_c["image"]
    assert sweep_c["securityContext"] == api_c["securityContext"]
    assert sweep_c["envFrom"] == api_c["envFrom"]
    assert sweep_c.get("env") == api_c.get("env")
    assert effective_env(objs, sweep_c) == effective_env(objs, api_c)


# --- configuration the pods get -----------------------------------------------------------------


def _settings_env(env: dict[str, str]) -> dict[str, str]:
    # $(VAR) is expanded by the kubelet; a stand-in password keeps the URL's shape.
    return {k: re.sub(r"\$\(([A-Z_]+)\)", "stand-in", v) for k, v in env.items()}


def test_pods_get_a_valid_configuration(objs: list[Obj]) -> None:
    env = _settings_env(effective_env(objs, _api_container(objs)))
    require_jwt(load_settings(env))
    unknown = set(unknown_variables(env))
    assert not unknown, f"not settings (typos?): {sorted(unknown)}"
    assert env["TZ"] == "UTC"


def test_prod_talks_tls_to_every_backend() -> None:
    objs = rendered("prod")
    container = _api_container(objs)
    env = effective_env(objs, container)
    settings = load_settings(_settings_env(env))
    assert settings.redis_url.startswith("rediss://")
    assert "tls=true" in settings.mongodb_uri
    assert settings.s3_endpoint_url is not None
    assert settings.s3_endpoint_url.startswith("https://")
    assert settings.jwt_jwks_url is not None
    assert settings.jwt_jwks_url.startswith("https://")
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for ca_file in (settings.redis_ca_file, settings.mongodb_ca_file):
        assert ca_file is not None
        assert any(ca_file.startswith(m + "/") for m in mounts), ca_file


@pytest.mark.parametrize("pod", [api_pod, sweep_pod], ids=["api", "archive-sweep"])
def test_prod_sentinel_finds_the_redis_master_through_three_sentinels_over_tls(pod: Any) -> None:
    objs = rendered("prod-sentinel")
    (container,) = pod(objs)["spec"]["containers"]
    env = _settings_env(effective_env(objs, container))
    assert not unknown_variables(env)
    settings = load_settings(env)
    require_jwt(settings)
    assert len(settings.redis_sentinels) == 3
    assert {port for _, port in settings.redis_sentinels} == {26379}
    assert (settings.redis_sentinel_master, settings.redis_sentinel_tls) == ("sessionmgr", True)
    assert settings.redis_url.startswith("rediss://")  # the master's TLS and credentials
    assert settings.redis_sentinel_password == "<secret:sessionmgr-secrets/REDIS_SENTINEL_PASSWORD>"
    egress = _policies_for(objs, pod(objs)["metadata"]["labels"], "Egress")
    prod = _policies_for(rendered("prod"), pod(objs)["metadata"]["labels"], "Egress")
    ports = _ports([rule for p in egress for rule in p.get("egress", [])])
    assert ports - _ports([rule for p in prod for rule in p.get("egress", [])]) == {(26379, "TCP")}


@pytest.mark.parametrize("pod", [api_pod, sweep_pod], ids=["api", "archive-sweep"])
def test_prod_cluster_reaches_the_redis_cluster_with_prods_credentials(pod: Any) -> None:
    objs = rendered("prod-cluster")
    (container,) = pod(objs)["spec"]["containers"]
    env = _settings_env(effective_env(objs, container))
    assert not unknown_variables(env)
    settings = load_settings(env)
    require_jwt(settings)
    assert settings.redis_cluster and not settings.redis_sentinels
    assert settings.redis_partitions == 256  # the default, fixed for the deployment's life
    assert settings.redis_url.startswith("rediss://sessionmgr:")
    assert "@redis-cluster.sessionmgr-data.svc.cluster.local:6380/0" in settings.redis_url
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("SESSIONMGR_REDIS_URL")  # $(…) resolves
    egress = _policies_for(objs, pod(objs)["metadata"]["labels"], "Egress")
    prod = _policies_for(rendered("prod"), pod(objs)["metadata"]["labels"], "Egress")
    rules = [rule for p in egress for rule in p.get("egress", [])]
    assert _ports(rules) == _ports([rule for p in prod for rule in p.get("egress", [])])


def test_prod_passwords_come_from_the_secret_and_nothing_secret_is_shipped() -> None:
    objs = rendered("prod")
    assert not find(objs, "Secret")
    env = effective_env(objs, _api_container(objs))
    assert env["REDIS_PASSWORD"] == "<secret:sessionmgr-secrets/REDIS_PASSWORD>"
    assert env["MONGODB_PASSWORD"] == "<secret:sessionmgr-secrets/MONGODB_PASSWORD>"
    assert "$(REDIS_PASSWORD)@" in env["SESSIONMGR_REDIS_URL"]
    assert "$(MONGODB_PASSWORD)@" in env["SESSIONMGR_MONGODB_URI"]
    config = one(objs, "ConfigMap", _config_map_name(objs))["data"]
    assert not any(re.search("SECRET|PASSWORD|TOKEN", k) for k in config)


def test_prod_ingress_terminates_tls_for_its_hosts() -> None:
    ingress = one(rendered("prod"), "Ingress", "sessionmgr")["spec"]
    hosts = {rule["host"] for rule in ingress["rules"]}
    tls_hosts = {h for entry in ingress["tls"] for h in entry["hosts"]}
    assert hosts <= tls_hosts
    assert all(entry["secretName"] for entry in ingress["tls"])


def test_prod_ingress_sets_the_edge_limits_of_docs_security() -> None:
    annotations = one(rendered("prod"), "Ingress", "sessionmgr")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    body_mib = int(annotations[prefix + "proxy-body-size"].removesuffix("m"))
    assert body_mib * 1_048_576 == Settings().max_body_bytes  # the same limit at the edge
    assert annotations[prefix + "proxy-request-buffering"] == "on"  # slow bodies stay at nginx
    assert int(annotations[prefix + "limit-connections"]) > 0
    assert int(annotations[prefix + "proxy-send-timeout"]) <= Settings().body_timeout_s


def test_prod_pins_an_image_tag() -> None:
    image = _api_container(rendered("prod"))["image"]
    assert ":" in image.rsplit("/", 1)[-1]
    assert not image.endswith(":latest")


def _config_map_name(objs: list[Obj]) -> str:
    (source,) = [s for s in _api_container(objs)["envFrom"] if "configMapRef" in s]
    return str(source["configMapRef"]["name"])
