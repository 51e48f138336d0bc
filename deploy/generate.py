"""Writes the generated deploy assets from their sources, so each fact lives in one place.

- grafana/dashboards/vllm-lk.json: the Grafana dashboard, from the panel list below;
- k8s/prometheusrule.yaml: prometheus/alerts.yml's groups as a prometheus-operator PrometheusRule;
- k8s/grafana-dashboard-configmap.yaml: the dashboard JSON in a ConfigMap for Grafana's sidecar.

    python deploy/generate.py          # rewrite them
    python deploy/generate.py --check  # exit 1 if a committed file differs (tests/unit/test_deploy_assets.py)

The dashboard selects its data source through a `datasource` variable (`${datasource}`), not
`__inputs`, which only the import dialog understands: file provisioning would fail on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-lk.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "prometheusrule.yaml"
DASHBOARD_CONFIGMAP = DEPLOY / "k8s" / "grafana-dashboard-configmap.yaml"
LABELS = {"app.kubernetes.io/name": "vllm-lk", "app.kubernetes.io/part-of": "vllm-lk"}
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'  # every panel follows the instance variable
RI = "[$__rate_interval]"


def rate(metric: str, by: str = "instance", match: str = "") -> str:
    """sum by (BY) (rate(METRIC{instance=~"$instance", MATCH}[$__rate_interval]))"""
    extra = f", {match}" if match else ""
    return f"sum by ({by}) (rate({metric}{{{SEL}{extra}}}{RI}))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{SEL}}}{RI})))"


TAU_SERVER = (f"1 + {rate('vllm_lk_spec_accepted_tokens_total')} / {rate('vllm_lk_spec_verification_steps_total')}")
TAU_ENGINE = (f"1 + {rate('vllm:spec_decode_num_accepted_tokens_total')} / {rate('vllm:spec_decode_num_drafts_total')}")
SPEEDUP = (
    f"({rate('vllm_lk_spec_verification_steps_total')} + {rate('vllm_lk_spec_accepted_tokens_total')})"
    f" / ({rate('vllm_lk_spec_verification_steps_total')} + $draft_cost * {rate('vllm_lk_spec_drafted_tokens_total')})"
)

# time series panels: (title, description, unit, [(expr, legend)], width, height)
PANELS = [
    ("Acceptance length (engine counters)",
     "Tokens per target forward pass, tau = 1 + accepted drafts / verification steps, from the server's "
     "counters, vLLM's own (1 + accepted / drafts) and the server's rolling window (vllm_lk_window_*). "
     "1 means every draft is rejected; K + 1 is the most a step can emit.",
     "none", [(TAU_SERVER, "{{instance}} server"), (TAU_ENGINE, "{{instance}} vLLM"),
              (f"vllm_lk_window_acceptance_length{{{SEL}}}", "{{instance}} rolling window")], 12, 8),
    ("Acceptance length per request (quantiles)",
     "Distribution over finished requests of each request's own acceptance length "
     "(vllm_lk_request_acceptance_length histogram, buckets of 0.25): p10, p50, p90 and the mean.",
     "none", [(quantile(0.1, "vllm_lk_request_acceptance_length"), "p10"),
              (quantile(0.5, "vllm_lk_request_acceptance_length"), "p50"),
              (quantile(0.9, "vllm_lk_request_acceptance_length"), "p90"),
              (f"{rate('vllm_lk_request_acceptance_length_sum', 'job')} / "
               f"{rate('vllm_lk_request_acceptance_length_count', 'job')}", "mean")], 12, 8),
    ("Acceptance rate per draft position",
     "Accepted / drafted at each draft position (0-based); a draft at position i is accepted only if "
     "all before it were. Server counters, and vLLM's per-position counters over its drafts.",
     "percentunit", [
         (f"{rate('vllm_lk_spec_accepted_tokens_total', 'position')} / "
          f"{rate('vllm_lk_spec_drafted_tokens_total', 'position')}", "position {{position}}"),
         (f"{rate('vllm:spec_decode_num_accepted_tokens_per_pos_total', 'position')} / ignoring (position) "
          f"group_left sum(rate(vllm:spec_decode_num_drafts_total{{{SEL}}}{RI}))", "position {{position}} (vLLM)")],
     12, 8),
    ("Drafted vs accepted tokens/s",
     "Draft tokens proposed and accepted per second (all positions), from the server's counters and vLLM's.",
     "short", [(rate("vllm_lk_spec_drafted_tokens_total", "job"), "drafted"),
               (rate("vllm_lk_spec_accepted_tokens_total", "job"), "accepted"),
               (rate("vllm:spec_decode_num_draft_tokens_total", "job"), "drafted (vLLM)"),
               (rate("vllm:spec_decode_num_accepted_tokens_total", "job"), "accepted (vLLM)")], 12, 8),
    ("Estimated speedup",
     "Decode speedup over the target alone, estimated from the counters: (steps + accepted) / (steps + "
     "c * drafted), i.e. tau / (1 + c * drafts per step), where c = $draft_cost is one draft forward's cost "
     "relative to a target forward (dashboard variable; ~0.05 for an EAGLE-3 head, larger for an independent "
     "draft model). Assumes verifying K + 1 tokens costs one target forward (memory-bound decoding).",
     "none", [(SPEEDUP, "{{instance}}")], 12, 8),
    ("Adaptive speculation",
     "From the engine's own drafting record (vllm_lk_spec_*: polled at each scrape). Estimated speedup: "
     "adaptive speculation's measured tokens/s over its cost model's rate without drafts (absent under fixed "
     "speculation; the VllmLkSpeculationSlowerThanNone alert fires below 0.97). Drafts per request and step, "
     "and the share of engine steps that made no draft (k* = 0).",
     "none", [(f"vllm_lk_spec_estimated_speedup{{{SEL}}}", "{{instance}} estimated speedup"),
              (f"{rate('vllm_lk_spec_drafts_per_step_sum')} / {rate('vllm_lk_spec_drafts_per_step_count')}",
               "{{instance}} drafts per request-step"),
              (f"{rate('vllm_lk_spec_steps_without_drafts_total')} / {rate('vllm_lk_spec_engine_steps_total')}",
               "{{instance}} share of steps without drafts")], 12, 8),
    ("Tokens/s",
     "Generated and prompt tokens per second, and generated tokens/s over the server's rolling window.",
     "short", [(rate("vllm_lk_generation_tokens_total"), "{{instance}} generated"),
               (rate("vllm_lk_prompt_tokens_total"), "{{instance}} prompt"),
               (f"vllm_lk_window_generation_tokens_per_second{{{SEL}}}", "{{instance}} generated (window)")], 12, 8),
    ("Time to first token",
     "From request arrival to its first generated token (vllm_lk_time_to_first_token_seconds).",
     "s", [(quantile(0.5, "vllm_lk_time_to_first_token_seconds"), "p50"),
           (quantile(0.95, "vllm_lk_time_to_first_token_seconds"), "p95")], 8, 8),
    ("Time per output token",
     "Per finished request: (last token time - first token time) / (tokens - 1) "
     "(vllm_lk_time_per_output_token_seconds).",
     "s", [(quantile(0.5, "vllm_lk_time_per_output_token_seconds"), "p50"),
           (quantile(0.95, "vllm_lk_time_per_output_token_seconds"), "p95")], 8, 8),
    ("Running and waiting requests",
     "Admitted requests that have produced their first token (running) and that still wait for it.",
     "short", [(f"vllm_lk_requests_running{{{SEL}}}", "{{instance}} running"),
               (f"vllm_lk_requests_waiting{{{SEL}}}", "{{instance}} waiting")], 8, 8),
    ("Errors and 429s",
     "API (/v1) responses per second with status 5xx (500 internal, 503 not ready or dead, 504 timeout) "
     "or 429 (admission queue full), by status; and their share of all /v1 responses.",
     "short", [(rate("vllm_lk_requests_total", "status", 'endpoint=~"/v1/.*", status=~"5..|429"'), "{{status}}"),
               (rate("vllm_lk_requests_total", "job", 'endpoint=~"/v1/.*", status=~"5..|429"') + " / "
                + rate("vllm_lk_requests_total", "job", 'endpoint=~"/v1/.*"'), "share of /v1 responses")], 12, 8),
    ("API requests by status",
     "All /v1 responses per second by status code (499: the client left before the response).",
     "short", [(rate("vllm_lk_requests_total", "status", 'endpoint=~"/v1/.*"'), "{{status}}")], 12, 8),
]

INFO_PANEL = {
    "title": "Served model and drafter",
    "description": "vllm_lk_info: served model name, target, drafter, vLLM speculative method, K and the "
    "loss the drafter was trained with (from its lk_metadata.json).",
    "expr": f"vllm_lk_info{{{SEL}}}",
}


def _target(ref: str, expr: str, legend: str, table: bool = False) -> dict:
    target = {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend}
    target.update({"format": "table", "instant": True} if table else {"range": True})
    return target


def _layout(widths_heights: list[tuple[int, int]], y0: int) -> list[dict]:
    """Left-to-right, wrapping at 24 columns."""
    positions, x, y, row_h = [], 0, y0, 0
    for w, h in widths_heights:
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        positions.append({"x": x, "y": y, "w": w, "h": h})
        x, row_h = x + w, max(row_h, h)
    return positions


def dashboard() -> dict:
    info = {
        "id": 1, "type": "table", "title": INFO_PANEL["title"], "datasource": DS,
        "description": INFO_PANEL["description"], "gridPos": {"x": 0, "y": 0, "w": 24, "h": 4},
        "targets": [_target("A", INFO_PANEL["expr"], "", table=True)],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}],
        "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True},
    }
    panels = [info]
    for n, ((title, description, unit, targets, _, _), pos) in enumerate(
            zip(PANELS, _layout([(p[4], p[5]) for p in PANELS], 4)), start=2):
        panels.append({
            "id": n, "type": "timeseries", "title": title, "description": description, "datasource": DS,
            "gridPos": pos,
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0}}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}},
            "targets": [_target(chr(ord("A") + i), expr, legend) for i, (expr, legend) in enumerate(targets)],
        })
    templating = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"type": "query", "name": "instance", "label": "Instance", "datasource": DS,
         "query": {"query": "label_values(vllm_lk_info, instance)", "refId": "instance"},
         "definition": "label_values(vllm_lk_info, instance)", "refresh": 2, "includeAll": True, "multi": True,
         "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "hide": 0, "sort": 1, "options": []},
        {"type": "custom", "name": "draft_cost", "label": "Draft cost (x target forward)",
         "query": "0.02,0.05,0.1,0.2,0.5", "current": {"text": "0.05", "value": "0.05"}, "hide": 0,
         "includeAll": False, "multi": False,
         "options": [{"text": v, "value": v, "selected": v == "0.05"} for v in ("0.02", "0.05", "0.1", "0.2", "0.5")]},
    ]
    return {
        "uid": "vllm-lk", "title": "vllm-lk: speculative decoding", "tags": ["vllm-lk", "vllm", "speculative-decoding"],
        "description": "Is speculative decoding paying off? Acceptance, throughput, latency and errors of vllm-lk servers.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "", "annotations": {"list": []},
        "links": [], "templating": {"list": templating}, "panels": panels,
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, the dashboard JSON) as `|` blocks, as a person would write them."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _yaml(doc: dict, header: str) -> str:
    return header + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120)


def render() -> dict[Path, str]:
    """Every generated file and its content."""
    dashboard_json = json.dumps(dashboard(), indent=2) + "\n"
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "vllm-lk", "labels": {**LABELS, "release": "kube-prometheus-stack"}},
            "spec": {"groups": groups}}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "vllm-lk-dashboard", "labels": {**LABELS, "grafana_dashboard": "1"}},
                 "data": {DASHBOARD.name: dashboard_json}}
    note = "# Generated by deploy/generate.py from {}; do not edit.\n"
    return {
        DASHBOARD: dashboard_json,
        PROMETHEUS_RULE: _yaml(rule, note.format("deploy/prometheus/alerts.yml")),
        DASHBOARD_CONFIGMAP: _yaml(configmap, note.format("the dashboard in deploy/generate.py")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path.relative_to(DEPLOY.parent))
        if not args.check:
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
