"""The inference-gateway overlay: its custom resources validate against the published CRD schemas
(tests/data/crds), and the pieces point at each other (pool -> kvserve pods and EPP, route -> pool,
EPP -> its config, config -> metric names kvserve exposes). Needs kubectl (make check-deploy)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers.deploy_metrics import EPP_CONFIG, router_metric_names
from test_deploy import find_tool, need_tool, run

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
OVERLAY = "deploy/k8s/overlays/inference-gateway"


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of each served version in tests/data/crds."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = \
                    version["schema"]["openAPIV3Schema"]
    return schemas


def validation_errors(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    # OpenAPI v3 schemas are JSON Schema draft 4 plus x-kubernetes-* keywords, which validators ignore.
    validator = jsonschema.Draft4Validator(schemas[(doc["apiVersion"], doc["kind"])])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    result = run(need_tool("kubectl"), "kustomize", OVERLAY)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def named(docs: list[dict], kind: str, name: str) -> dict:
    # configMapGenerator appends a content hash to the name.
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def test_custom_resources_match_the_published_crds(docs: list[dict]) -> None:
    schemas = crd_schemas()
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in schemas]
    assert {d["kind"] for d in custom} == {"InferencePool", "HTTPRoute", "Gateway"}
    for doc in custom:
        assert validation_errors(doc, schemas) == [], doc["kind"]


def test_schema_validation_rejects_a_broken_pool(docs: list[dict]) -> None:
    # The schemas must really be applied: a string port or a negative weight fails them.
    schemas = crd_schemas()
    bad_target = copy.deepcopy(named(docs, "InferencePool", "kvserve"))
    bad_target["spec"]["targetPorts"] = [{"number": "http"}]
    assert validation_errors(bad_target, schemas), "a non-integer target port must fail the CRD schema"
    bad_weight = copy.deepcopy(named(docs, "HTTPRoute", "kvserve"))
    bad_weight["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    assert validation_errors(bad_weight, schemas), "a negative backend weight must fail the CRD schema"


def test_pool_selects_kvserve_pods_only_and_targets_their_port(docs: list[dict]) -> None:
    pool = named(docs, "InferencePool", "kvserve")["spec"]
    kvserve = named(docs, "Deployment", "kvserve")
    epp = named(docs, "Deployment", "kvserve-epp")
    kvserve_labels = kvserve["spec"]["template"]["metadata"]["labels"]
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= kvserve_labels.items()
    assert not pool["selector"]["matchLabels"].items() <= epp_labels.items()
    ports = {p["containerPort"] for p in kvserve["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [8000] and 8000 in ports
    # The base's Service, PDB and ServiceMonitor must not pick up the EPP's pods either.
    service = named(docs, "Service", "kvserve")
    assert not service["spec"]["selector"].items() <= epp_labels.items()


def test_pool_route_gateway_and_epp_point_at_each_other(docs: list[dict]) -> None:
    pool = named(docs, "InferencePool", "kvserve")
    picker = pool["spec"]["endpointPickerRef"]
    epp_service = named(docs, "Service", picker["name"])
    epp = named(docs, "Deployment", "kvserve-epp")
    container = epp["spec"]["template"]["spec"]["containers"][0]
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    service_port = next(p for p in epp_service["spec"]["ports"] if p["port"] == picker["port"]["number"])
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[service_port["targetPort"]] == 9002
    args = container["args"]
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert flag["--pool-name"] == pool["metadata"]["name"]
    assert flag["--grpc-port"] == "9002" and flag["--pool-group"] == "inference.networking.k8s.io"
    assert container["image"].startswith("ghcr.io/llm-d/llm-d-router-endpoint-picker:v")

    # The config file the EPP reads is the generated ConfigMap's key, mounted where --config-file says.
    mount = next(m for m in container["volumeMounts"] if flag["--config-file"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = named(docs, "ConfigMap", "kvserve-epp-config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    key = flag["--config-file"].removeprefix(mount["mountPath"] + "/")
    assert yaml.safe_load(config_map["data"][key]) == yaml.safe_load(EPP_CONFIG.read_text())

    route = named(docs, "HTTPRoute", "kvserve")["spec"]
    gateway = named(docs, "Gateway", "inference-gateway")
    assert [p["name"] for p in route["parentRefs"]] == [gateway["metadata"]["name"]]
    (backend,) = route["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])

    role = named(docs, "Role", "kvserve-epp")
    granted = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] if "watch" in rule["verbs"]}
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= granted
    binding = named(docs, "RoleBinding", "kvserve-epp")
    assert binding["subjects"][0]["name"] == epp["spec"]["template"]["spec"]["serviceAccountName"]


def test_epp_config_names_metrics_kvserve_exposes() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import ServiceMetrics

    exposed = {family.name for family in text_string_to_metric_families(ServiceMetrics("m").render().decode())}
    wanted = router_metric_names()
    assert {"kvserve_num_requests_waiting", "kvserve_kv_cache_usage_ratio"} <= wanted
    assert wanted <= exposed, sorted(wanted - exposed)


def test_kubernetes_validate_passes_on_the_plain_resources(docs: list[dict], tmp_path: Path) -> None:
    if find_tool("kubernetes-validate") is None:
        pytest.skip("kubernetes-validate not installed")
    plain = [d for d in docs if (d["apiVersion"], d["kind"]) not in crd_schemas() and d["kind"] != "ServiceMonitor"]
    manifest = tmp_path / "plain.yaml"
    manifest.write_text(yaml.safe_dump_all(plain))
    result = run(need_tool("kubernetes-validate"), "--strict", str(manifest))
    assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, result.stdout + result.stderr
