"""Reading deploy/ for the tests: dashboard queries, rule expressions and the metric names in them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-lk.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

# What Grafana would put in for the dashboard's variables, for running its queries by hand.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "instance": ".*", "draft_cost": "0.05"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}
# synthetic series Prometheus makes itself
SYNTHETIC = {"up"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel."""
    board = board or dashboard()
    return [(panel["title"], target["refId"], target["expr"])
            for panel in board["panels"] for target in panel.get("targets", [])]


def concrete(expr: str, variables: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` variables replaced; refuses leftovers."""
    variables = variables or GRAFANA_VARIABLES

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def rules() -> list[dict]:
    """Every rule of alerts.yml (recording and alerting)."""
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def dashboard_metric_names() -> set[str]:
    return set().union(*(metric_names(concrete(expr)) for _, _, expr in panel_queries()))


def rule_metric_names() -> set[str]:
    return set().union(*(metric_names(rule["expr"]) for rule in rules()))


def alerts_test_series() -> list[tuple[str, set[str]]]:
    """(metric name, label names) of every input series of the promtool tests."""
    out = []
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for series in case["input_series"]:
            name, _, labels = series["series"].partition("{")
            out.append((name.strip(), set(re.findall(r"(\w+)\s*=", labels))))
    return out
