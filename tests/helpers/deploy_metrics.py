"""The metric names kvserve's deployment files read, collected by parsing those files: the Grafana
dashboard, the alert rules, prometheus-adapter's rules and the HPAs, and the inference-gateway
endpoint picker's config. Tests check each one against what /metrics really exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EPP_CONFIG = DEPLOY / "k8s" / "overlays" / "inference-gateway" / "epp-config.yaml"
# Series names in PromQL and adapter queries: kvserve's, vLLM's and the process collector's.
PROMQL_METRIC_RE = re.compile(r"\b(?:kvserve_|vllm:|process_)[A-Za-z0-9_:]*[A-Za-z0-9_]")
# The EPP's metric fields in an engine config, and its built-in `vllm` engine's names
# (llm-d-router v0.9.0, pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go),
# used for pods of engine type vllm.
EPP_SPEC_FIELDS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec")
EPP_BUILTIN_VLLM = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"}


def walk_strings(node: object, keys: set[str]) -> Iterator[str]:
    """Every string value stored under one of `keys`, anywhere in a JSON/YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from walk_strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item, keys)


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kvserve.json").read_text())
    exprs = walk_strings(dashboard, {"expr", "definition"})
    return {name for expr in exprs for name in PROMQL_METRIC_RE.findall(expr)}


def alert_metric_names() -> set[str]:
    rules = load_yaml(DEPLOY / "prometheus" / "rules.yml")[0]
    return {name for group in rules["groups"] for rule in group["rules"]
            for name in PROMQL_METRIC_RE.findall(rule["expr"])}


def hpa_metric_names() -> set[str]:
    """Per-pod metrics the HPAs under deploy/k8s scale on, as the series prometheus-adapter reads for them."""
    adapter = load_yaml(DEPLOY / "prometheus-adapter" / "values.yaml")[0]["rules"]["custom"]
    series_for = {rule["name"]["as"]: PROMQL_METRIC_RE.findall(rule["seriesQuery"]) for rule in adapter}
    names: set[str] = set()
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        for doc in load_yaml(path):
            if doc.get("kind") != "HorizontalPodAutoscaler":
                continue
            for metric in doc["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    wanted = metric["pods"]["metric"]["name"]
                    names |= {wanted, *series_for.get(wanted, [])}
    return names


def router_metric_names() -> set[str]:
    """What the endpoint picker scrapes: its engine config's metric specs, without label selectors."""
    config = load_yaml(EPP_CONFIG)[0]
    names: set[str] = set()
    for plugin in config["plugins"]:
        if plugin["type"] != "core-metrics-extractor":
            continue
        params = plugin.get("parameters", {})
        engines = {engine["name"]: engine for engine in params.get("engineConfigs", [])}
        default = params.get("defaultEngine", "vllm")
        if default in engines:
            names |= {engines[default][field].split("{")[0] for field in EPP_SPEC_FIELDS
                      if engines[default].get(field)}
        else:
            names |= EPP_BUILTIN_VLLM
    return names
