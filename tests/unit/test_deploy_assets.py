"""deploy/ checked without a server: promtool on the rules, the dashboard's structure, and every
file the compose stack, the Kubernetes manifests and the Dockerfiles name.

What cannot run here: Grafana (not installable on these machines) and Docker (a client without a
daemon), so no image is built and no stack is started. Everything short of them is tested: the
dashboard JSON as Grafana's file provisioning reads it, its queries against a real Prometheus and
server (tests/integration/test_deploy_prometheus.py), the compose file's and manifests' every
reference, and the Dockerfiles' install steps against the Makefile's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import deploy_assets as assets

DEPLOY = assets.DEPLOY
ROOT = DEPLOY.parent
PROMTOOL = shutil.which("promtool")


def _generator():
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_generated_files_are_up_to_date():
    for path, text in _generator().render().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `python deploy/generate.py`"


# --- Prometheus --------------------------------------------------------------------------------

def _promtool(*args: str) -> str:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: .ci/run installs Debian's `prometheus`")
        pytest.skip("no promtool (`apt-get install prometheus`, as .ci/run does)")
    proc = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_check_config():
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules():
    out = _promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(assets.rules())} rules found" in out


def test_promtool_test_rules():
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_firing_and_a_silent_test():
    alerts = {rule["alert"] for rule in assets.rules() if "alert" in rule}
    cases = [case for test in yaml.safe_load(assets.ALERTS_TEST.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == fires == silent


def test_every_alert_has_a_for_duration_and_a_traffic_guard():
    for rule in assets.rules():
        if "alert" not in rule:
            continue
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys()
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        if "up" not in assets.metric_names(rule["expr"]):  # a server that is down has no traffic to guard on
            assert re.search(r"\band\b.*(rate|baseline)\w*\s*>", rule["expr"], re.S), rule["alert"]


def test_alerts_and_config_agree_on_the_job():
    (job,) = yaml.safe_load(assets.PROMETHEUS_YML.read_text())["scrape_configs"]
    for rule in assets.rules():
        for selector in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert selector == job["job_name"]


# --- Grafana -----------------------------------------------------------------------------------

def test_dashboard_structure():
    board = assets.dashboard()
    assert "__inputs" not in board and "__requires" not in board  # file provisioning does not resolve them
    assert board["uid"] == "vllm-lk" and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in "xywh") and pos["x"] + pos["w"] <= 24
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
            assets.concrete(target["expr"])  # every variable it uses is one the dashboard defines
    assert set(assets.GRAFANA_VARIABLES) - {"__rate_interval"} <= variables.keys()


def test_dashboard_has_the_panels_sres_asked_for():
    titles = {panel["title"] for panel in assets.dashboard()["panels"]}
    for wanted in ("Acceptance length (engine counters)", "Acceptance length per request (quantiles)",
                   "Acceptance rate per draft position", "Drafted vs accepted tokens/s", "Estimated speedup",
                   "Tokens/s", "Time to first token", "Time per output token", "Running and waiting requests",
                   "Errors and 429s", "Served model and drafter"):
        assert wanted in titles
    speedup = next(p for p in assets.dashboard()["panels"] if p["title"] == "Estimated speedup")
    assert "$draft_cost" in speedup["targets"][0]["expr"] and "(steps + accepted) / (steps + c * drafted)" in speedup["description"]


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/vllm-lk.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    mounts = _bind_mounts(_compose()["services"]["grafana"])
    assert mounts[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == DEPLOY / "grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == DEPLOY / "grafana/provisioning/dashboards"


# --- compose -----------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> local path of a service's bind mounts (named volumes left out)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_references_only_files_that_exist():
    compose = _compose()
    assert set(compose["services"]) == {"vllm-lk", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for path in _bind_mounts(service).values():
            assert path.exists(), f"{name}: {path}"
        for volume in service.get("volumes", []):
            if not volume.startswith("."):
                assert volume.split(":")[0] in compose["volumes"]
    build = compose["services"]["vllm-lk"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
    prometheus = _bind_mounts(compose["services"]["prometheus"])
    config = "/etc/prometheus/prometheus.yml"
    assert prometheus[config] == assets.PROMETHEUS_YML
    for rule_file in yaml.safe_load(assets.PROMETHEUS_YML.read_text())["rule_files"]:  # resolved next to the config
        assert prometheus[str(Path(config).parent / rule_file)] == assets.PROMETHEUS_YML.parent / rule_file
    grafana = compose["services"]["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _bind_mounts(grafana)[str(Path(home).parent)] / Path(home).name == assets.DASHBOARD


def test_compose_and_k8s_commands_are_valid_serve_invocations():
    from server.cli import build_parser

    deployment = _k8s()["Deployment"]
    commands = [_compose()["services"]["vllm-lk"]["command"], deployment["spec"]["template"]["spec"]["containers"][0]["args"],
                _dockerfile_cmd("Dockerfile.cpu"), _dockerfile_cmd("Dockerfile.cuda")]
    for command in commands:
        assert command[:2] == ["vllm-lk", "serve"]
        args = build_parser().parse_args(command[1:])
        assert args.port == 8000 and args.host in {"0.0.0.0", "127.0.0.1"}


# --- Kubernetes --------------------------------------------------------------------------------

def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _yaml_docs(path):
            assert doc["kind"] not in docs
            docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert set(_k8s()) == {"Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap", "PersistentVolumeClaim"}


def test_deployment_probes_and_cache():
    docs = _k8s()
    pod = docs["Deployment"]["spec"]["template"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # the first start builds the models
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = container["volumeMounts"]
    assert env["VLLM_LK_CACHE"] == mount["mountPath"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_service_and_servicemonitor_select_the_server():
    docs = _k8s()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (job,) = yaml.safe_load(assets.PROMETHEUS_YML.read_text())["scrape_configs"]
    assert service["metadata"]["name"] == job["job_name"]  # the operator's job label is the Service name
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"


def test_prometheusrule_and_dashboard_configmap_carry_the_sources():
    docs = _k8s()
    assert docs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(assets.ALERTS.read_text())["groups"]
    data = docs["ConfigMap"]["data"]
    assert json.loads(data[assets.DASHBOARD.name]) == assets.dashboard()
    assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- Dockerfiles -------------------------------------------------------------------------------

def _instructions(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / name).read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dockerfile_cmd(name: str) -> list[str]:
    (cmd,) = [json.loads(arg) for op, arg in _instructions(name) if op == "CMD"]
    return cmd


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_copies_files_that_exist_and_are_not_ignored(name):
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    copied = [shlex.split(arg)[:-1] for op, arg in _instructions(name) if op == "COPY"]
    assert copied
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists() and source in allowed, source
    # every package pyproject installs is copied
    included = {p.split("*")[0] for p in re.findall(r'"(\w+)\*"', (ROOT / "pyproject.toml").read_text())}
    assert included <= {s for sources in copied for s in sources}
    env = " ".join(arg for op, arg in _instructions(name) if op == "ENV")
    assert "VLLM_LK_CACHE=/cache" in env


def test_cpu_dockerfile_installs_like_the_makefile():
    runs = " && ".join(arg for op, arg in _instructions("Dockerfile.cpu") if op == "RUN")
    torch_pin = re.search(r'torch==[\w.]+', (ROOT / "Makefile").read_text()).group(0)
    steps = [torch_pin, '".[cpu]"', "pip uninstall -y torchvision torchaudio torchcodec", "vllm-lk doctor"]
    where = [runs.find(step) for step in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where))
    assert _instructions("Dockerfile.cpu")[0][1].startswith("python:3.")


def test_cuda_dockerfile_installs_the_gpu_extra():
    runs = " && ".join(arg for op, arg in _instructions("Dockerfile.cuda") if op == "RUN")
    assert 'pip install ".[gpu]"' in runs and "vllm-lk doctor" in runs
    assert _instructions("Dockerfile.cuda")[0][1].startswith("nvidia/cuda:")


def test_the_cache_variable_is_the_one_the_code_reads(monkeypatch, tmp_path):
    from training.toy.target import default_cache_dir

    monkeypatch.setenv("VLLM_LK_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
