"""Deployment files agree with the service: metric names queried, env settings, probes, security.

Tests that need hadolint, yamllint, kubectl or kubernetes-validate skip when those are absent;
`make check-deploy` (scripts/check_deploy.sh) installs them and runs this file with them on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.deploy_metrics import load_yaml, walk_strings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
METRIC_RE = re.compile(r"\bkvserve_[a-z0-9_]+\b")
# Labels Prometheus itself attaches to scraped series (job, instance) or the operator/adapter adds.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "service", "container", "endpoint"}
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count", "_created")}


# ---------------------------------------------------------------- helpers


def find_tool(name: str) -> str | None:
    """A deploy tool on PATH or in the venv scripts/install_deploy_tools.sh fills."""
    tools_dir = Path(os.environ.get("KVSERVE_DEPLOY_TOOLS", Path.home() / ".cache" / "kvserve-deploy-tools"))
    candidate = tools_dir / "bin" / name
    return shutil.which(name) or (str(candidate) if candidate.exists() else None)


def need_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed (run scripts/install_deploy_tools.sh or make check-deploy)")
    return path


def run(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, input=input_text, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Series names a fresh ServiceMetrics registry exposes on /metrics, each with its label names."""
    if importlib.util.find_spec("service.metrics") is None:
        pytest.skip("service.metrics not written yet")
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics("test-model")
    metrics.observe_error(503)  # the errors counter has no child (so no label names) until an error
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        labels = {name for sample in family.samples for name in sample.labels}
        for suffix in SERIES_SUFFIXES[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kvserve.json").read_text())
    return list(walk_strings(dashboard, {"expr", "definition"}))


def alert_exprs() -> list[str]:
    rules = load_yaml(DEPLOY / "prometheus" / "rules.yml")[0]
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def adapter_rules() -> list[dict]:
    return load_yaml(DEPLOY / "prometheus-adapter" / "values.yaml")[0]["rules"]["custom"]


def hpa_metric_names(docs: list[dict]) -> set[str]:
    return {m["pods"]["metric"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
            for m in d["spec"]["metrics"] if m["type"] == "Pods"}


def labels_used(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    used: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return used


# ---------------------------------------------------------------- metrics queried vs exposed


def test_metric_list_matches_the_service_contract(exposed: dict[str, set[str]]) -> None:
    # The names issue 4 promises; the dashboard below is built on exactly these.
    promised = {"kvserve_num_requests_running", "kvserve_num_requests_waiting", "kvserve_kv_cache_usage_ratio",
                "kvserve_prompt_tokens_total", "kvserve_generation_tokens_total",
                "kvserve_request_success_total", "kvserve_request_errors_total", "kvserve_num_preemptions_total",
                "kvserve_prefix_cache_queries_total", "kvserve_prefix_cache_hits_total"}
    promised |= {f"{h}_bucket" for h in (
        "kvserve_time_to_first_token_seconds", "kvserve_inter_token_latency_seconds",
        "kvserve_e2e_request_latency_seconds", "kvserve_request_queue_time_seconds",
        "kvserve_request_prompt_tokens", "kvserve_request_generation_tokens", "kvserve_iteration_tokens")}
    assert promised <= exposed.keys(), sorted(promised - exposed.keys())
    assert all("model" in exposed[name] for name in promised)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_and_label_is_exposed(exposed: dict[str, set[str]], source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    for expr in exprs:
        names = set(METRIC_RE.findall(expr))
        unknown = names - exposed.keys()
        assert not unknown, f"{source} queries {sorted(unknown)} which /metrics does not expose: {expr}"
        available = set().union(*(exposed[n] for n in names)) | TARGET_LABELS if names else TARGET_LABELS
        assert labels_used(expr) <= available, f"{source} uses unknown labels in: {expr}"


def test_dashboard_covers_the_operator_panels() -> None:
    queried = {name for expr in dashboard_exprs() for name in METRIC_RE.findall(expr)}
    for needed in ("kvserve_num_requests_running", "kvserve_num_requests_waiting",
                   "kvserve_time_to_first_token_seconds_bucket", "kvserve_inter_token_latency_seconds_bucket",
                   "kvserve_generation_tokens_total", "kvserve_kv_cache_usage_ratio",
                   "kvserve_num_preemptions_total", "kvserve_request_errors_total"):
        assert needed in queried
    assert any("by (code)" in expr and "kvserve_request_errors_total" in expr for expr in dashboard_exprs())


def test_adapter_rules_and_hpa_use_exposed_metrics(exposed: dict[str, set[str]]) -> None:
    provided = set()
    for rule in adapter_rules():
        series = METRIC_RE.findall(rule["seriesQuery"])
        assert series and set(series) <= exposed.keys(), rule["seriesQuery"]
        # The adapter maps series to pods by these labels; Prometheus adds them when scraping pods.
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        provided.add(rule["name"]["as"])
    hpa_docs = load_yaml(DEPLOY / "k8s" / "base" / "hpa.yaml") + load_yaml(
        DEPLOY / "k8s" / "overlays" / "nvidia-gpu" / "hpa-gpu.yaml")
    wanted = hpa_metric_names(hpa_docs)
    assert wanted == {"kvserve_num_requests_waiting"}
    assert wanted <= provided <= exposed.keys()


# ---------------------------------------------------------------- settings and routes


def server_env_vars() -> dict[str, set[str]]:
    """KVSERVE_* variables handed to the server, by the file that sets them."""
    found: dict[str, set[str]] = {}
    dockerfile = (ROOT / "Dockerfile").read_text()
    found["Dockerfile"] = set(re.findall(r"\b(KVSERVE_[A-Z_]+)=", dockerfile))
    compose = load_yaml(ROOT / "docker-compose.yml")[0]
    found["docker-compose.yml"] = set(compose["services"]["kvserve"]["environment"])
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        for doc in load_yaml(path):
            if doc.get("kind") == "ConfigMap":
                found[str(path.relative_to(ROOT))] = set(doc["data"])
    return found


def test_every_server_env_var_is_a_setting() -> None:
    if importlib.util.find_spec("service.settings") is None:
        pytest.skip("service.settings not written yet")
    from service.settings import Settings

    engine_env = {"KVSERVE_HOME", "KVSERVE_KERNEL_CACHE"}  # read by the engine (models_registry, paged_decode)
    known = {f"KVSERVE_{name.upper()}" for name in Settings.model_fields} | engine_env
    for where, names in server_env_vars().items():
        assert names, where
        assert names <= known, f"{where} sets {sorted(names - known)}, which kvserve does not read"


def test_probed_paths_are_routes() -> None:
    if importlib.util.find_spec("service.app") is None:
        pytest.skip("service.app not written yet")
    from service.app import create_app
    from service.settings import Settings

    # The OpenAPI schema lists routes of included routers too (app.routes may hold them lazily).
    paths = create_app(Settings()).openapi()["paths"]
    assert {"/health", "/ready", "/metrics"} <= paths.keys()


# ---------------------------------------------------------------- Dockerfile and compose


def final_stage(dockerfile: str) -> str:
    return re.split(r"^FROM .*$", dockerfile, flags=re.M)[-1]


def test_dockerfile_runtime_stage() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = final_stage(text)
    user = re.search(r"^USER (\d+)(?::(\d+))?$", runtime, re.M)
    assert user and int(user.group(1)) != 0, "numeric non-root USER (k8s runAsNonRoot needs a number)"
    entrypoint = re.search(r"^ENTRYPOINT (.*)$", runtime, re.M)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["kvserve", "serve"], "exec-form entrypoint"
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", runtime, re.M)
    assert re.search(r"^EXPOSE 8000$", runtime, re.M) and "KVSERVE_PORT=8000" in runtime
    assert "KVSERVE_HOST=0.0.0.0" in runtime
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "ARG TORCH_INDEX_URL=" in text


def test_dockerignore_admits_exactly_what_copy_needs() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = {src.rstrip("/") for line in copied for src in line.split()}
    assert rules[0] == "**", "ignore everything, then allow what the build copies"
    assert sources <= allowed, sorted(sources - allowed)
    assert all((ROOT / src).exists() or src == "README.md" for src in sources)  # README: the lead's


def test_compose_wiring() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")[0]
    services = compose["services"]
    assert {"kvserve", "prometheus", "grafana"} <= services.keys()
    assert "3000:3000" in services["grafana"]["ports"] and "8000:8000" in services["kvserve"]["ports"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"]
    targets = [t for job in scrape for config in job["static_configs"] for t in config["targets"]]
    assert targets == ["kvserve:8000"]
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- linters and kustomize


def test_hadolint_dockerfile() -> None:
    result = run(need_tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_all_yaml() -> None:
    result = run(need_tool("yamllint"), "--strict", "-c", "deploy/.yamllint.yaml", "docker-compose.yml", "deploy/")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """`kubectl kustomize` output of every overlay, parsed."""
    kubectl = need_tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", str(overlay))
        assert result.returncode == 0, result.stderr
        out[overlay.name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def one(docs: list[dict], kind: str) -> dict:
    """kvserve's own resource of this kind (the base labels them; overlays may add others, e.g. the EPP)."""
    found = [d for d in docs if d["kind"] == kind
             and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "kvserve"]
    assert len(found) == 1, kind
    return found[0]


def test_overlays_exist_and_include_gpu() -> None:
    assert {"cpu", "nvidia-gpu"} <= {p.name for p in OVERLAYS}


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_kubernetes_validate_passes(rendered: dict[str, list[dict]], overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered[overlay]))
    result = run(need_tool("kubernetes-validate"), "--strict", "--quiet", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_a_broken_deployment(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    # The validator must really read our manifests: a wrong type in the Deployment has to fail.
    deployment = json.loads(json.dumps(one(rendered["cpu"], "Deployment")))
    deployment["spec"]["replicas"] = "two"
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    assert run(need_tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)).returncode != 0


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_deployment_probes_drain_and_security(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8000}
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    config = one(docs, "ConfigMap")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(config["KVSERVE_SHUTDOWN_TIMEOUT"])
    assert config["KVSERVE_HOST"] == "0.0.0.0" and config["KVSERVE_PORT"] == "8000"

    uid = int(re.search(r"^USER (\d+)", final_stage((ROOT / "Dockerfile").read_text()), re.M).group(1))
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts and set(mounts.values()) <= volumes
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_selectors_hpa_pdb_and_servicemonitor(rendered: dict[str, list[dict]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = one(docs, "ServiceMonitor")  # no published schema: check what the operator needs here
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    assert monitor["spec"]["endpoints"][0]["port"] in service_ports

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "kvserve_num_requests_waiting"
    assert kinds["Resource"]["resource"]["name"] == "cpu"  # fallback when the adapter has no data
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_gpu_overlay_requests_a_gpu(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["nvidia-gpu"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert one(docs, "ConfigMap")["data"]["KVSERVE_DEVICE"] == "cuda"
    assert pod["containers"][0]["image"].endswith("-cuda")
    cpu_pod = one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"].get("limits", {})
