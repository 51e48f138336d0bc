"""deploy/ against the real thing: the `prometheus` binary (Debian's package; `.ci/run` installs it)
scrapes two real servers over one real vLLM engine (tiny target + tiny draft, K = 3) with the job
and rules of deploy/prometheus/, after they served speculative requests, errors, a 504 and a 429.
Then every query of every dashboard panel must return data, every rule must evaluate without
error, and every metric name the dashboard, the rules and the promtool tests use must be one the
server exports. Grafana itself cannot be installed here, so the dashboard is tested up to
Grafana: its queries run as Grafana would send them (variables filled in), against real data.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests import deploy_assets as assets
from tests.integration.server_harness import API_KEY, MODEL, LiveEngine, PacedEngine, tiny_config

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    if os.environ.get("CI"):
        raise RuntimeError("the prometheus binary is missing in CI: .ci/run installs Debian's `prometheus`")
    pytest.skip("no `prometheus` binary (`apt-get install prometheus`, as .ci/run does)", allow_module_level=True)


@pytest.fixture(scope="module")
def live(tiny_target, tiny_draft):
    """Adaptive speculation (the server's default), so the engine's policy series
    (vllm_lk_spec_estimated_speedup, vllm_lk_spec_cost_seconds) exist for the panels and rules."""
    engine = LiveEngine(tiny_config(tiny_target, tiny_draft, speculation="adaptive"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def servers(live):
    """Two instances of one job: `main` (the test config) and `strict` (one request at a time,
    0.5 s per request, outputs paced so a long request always outlives it), which is where the
    429 and the 504 happen."""
    main, _ = live.serve()
    strict, strict_app = live.serve(tiny_config(live.config.target, live.config.drafter, max_queue=1, request_timeout_s=0.5,
                                                speculation="adaptive"),
                                    engine=PacedEngine(live.engine))
    return {"main": main, "strict": strict, "strict_app": strict_app}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(servers, tmp_path_factory):
    """A real Prometheus with deploy/'s job and rules, scraping both servers every second."""
    config = yaml.safe_load(assets.PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "vllm-lk" and job["metrics_path"] == "/metrics"
    job["static_configs"] = [{"targets": [servers[name].removeprefix("http://") for name in ("main", "strict")]}]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(assets.ALERTS)]
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(base, "/-/ready") is not None, 30, "Prometheus to start", work / "prometheus.log")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _get(base: str, path: str, **params):
    try:
        response = httpx.get(base + path, params=params, timeout=10)
    except httpx.HTTPError:
        return None
    return response if response.status_code == 200 else None


def _wait(condition, seconds: float, what: str, log=None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}" + (f"; log:\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.02)  # the 429 must be sent within the long request's 0.5 s


def query(base: str, expr: str) -> list[dict]:
    body = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _drive(servers) -> dict[str, int]:
    """Speculative traffic (sampled and greedy, completions and streamed chat), a 400, a 404, and on
    the strict server a 504 (a long request past its 0.5 s) with a 429 while it runs."""
    statuses = {}
    client = OpenAI(base_url=servers["main"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for i in range(6):
        out = client.completions.create(model=MODEL, prompt=f"def f{i}(x):\n", max_tokens=32,
                                        temperature=1.0 if i % 2 else 0.0, seed=i, extra_body={"ignore_eos": True})
        assert out.usage.model_extra["speculative"]["verification_steps"] > 0
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Sort {i} items."}],
                                                max_tokens=24, temperature=0.8, stream=True)
        assert sum(1 for _ in stream) > 1
        time.sleep(0.3)  # spread over several scrapes, so rate() sees the counters move
    statuses["400"] = httpx.post(servers["main"] + "/v1/completions", json={"model": MODEL}, headers=AUTH).status_code
    statuses["404"] = httpx.post(servers["main"] + "/v1/completions", json={"model": "nope", "prompt": "x"},
                                 headers=AUTH).status_code
    # once: the server creates the 429/5xx series at 0, so rate() sees this first increment
    statuses["first"] = _timeout_and_refusal(servers)
    time.sleep(2)
    return statuses


def _timeout_and_refusal(servers) -> tuple[int, int]:
    admission = servers["strict_app"].state.server.admission
    long = {"model": MODEL, "prompt": "x", "max_tokens": 480, "temperature": 1.0, "ignore_eos": True}
    status = {}
    holder = threading.Thread(target=lambda: status.__setitem__(
        "long", httpx.post(servers["strict"] + "/v1/completions", json=long, headers=AUTH, timeout=60).status_code))
    holder.start()
    _wait(lambda: admission.in_flight == 1, 30, "the long request to be admitted")
    second = httpx.post(servers["strict"] + "/v1/completions", json={**long, "max_tokens": 1}, headers=AUTH, timeout=60)
    holder.join(60)
    return status.get("long"), second.status_code


@pytest.fixture(scope="module")
def scraped(servers, prometheus):
    """Traffic sent while Prometheus scrapes; returns the statuses seen and main's /metrics text."""
    _wait(lambda: len(query(prometheus, 'up{job="vllm-lk"} == 1')) == 2, 30, "both targets up")
    statuses = _drive(servers)
    time.sleep(3)  # a few more scrapes, so the last requests' series have two points each
    return statuses, httpx.get(servers["main"] + "/metrics").text


def test_traffic_included_errors_a_timeout_and_a_refusal(scraped):
    statuses, _ = scraped
    assert statuses == {"400": 400, "404": 404, "first": (504, 429)}


def test_every_dashboard_query_returns_data(prometheus, scraped):
    queries = assets.panel_queries()
    assert len(queries) >= 20
    empty = []
    for title, ref, expr in queries:
        result = query(prometheus, assets.concrete(expr))
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title} / {ref}: {assets.concrete(expr)} -> {values}")
    assert not empty, "\n".join(empty)
    (errors,) = [expr for title, ref, expr in queries if title == "Errors and 429s" and ref == "A"]
    by_status = {r["metric"]["status"]: float(r["value"][1]) for r in query(prometheus, assets.concrete(errors))}
    # the alerted statuses exist from start-up at 0 (server/metrics.py); only those that happened move
    assert {"429", "500", "503", "504"} <= by_status.keys(), by_status
    assert by_status["429"] > 0 and by_status["504"] > 0 and by_status["500"] == by_status["503"] == 0, by_status


def test_dashboard_instance_variable_has_values(prometheus, scraped, servers):
    # Grafana's label_values(vllm_lk_info, instance) is this API call
    variable = next(v for v in assets.dashboard()["templating"]["list"] if v["name"] == "instance")
    assert variable["query"]["query"] == "label_values(vllm_lk_info, instance)"
    body = httpx.get(prometheus + "/api/v1/label/instance/values", params={"match[]": "vllm_lk_info"}).json()
    assert sorted(body["data"]) == sorted(servers[n].removeprefix("http://") for n in ("main", "strict"))


def test_rules_load_and_evaluate_without_errors(prometheus, scraped):
    expected = {r.get("record") or r.get("alert") for r in assets.rules()}

    def evaluated() -> list[dict]:
        groups = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    _wait(lambda: all(r["health"] != "unknown" for r in evaluated()), 15, "every rule to be evaluated")
    loaded = evaluated()
    assert {r["name"] for r in loaded} == expected
    assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []
    # the short-window recordings have data already (the 6 h baselines need 7 h of history)
    for name in sorted(assets.recorded_names()):
        if "baseline" not in name:
            assert query(prometheus, name), name
    refused = {r["metric"]["instance"]: float(r["value"][1]) for r in query(prometheus, "vllm_lk:requests_429:ratio_rate5m")}
    assert max(refused.values()) > 0  # the strict server's 429


def _exported(text: str) -> dict[str, set[str]]:
    """Sample names in a /metrics text and the label names each carries."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_every_metric_name_used_is_exported(scraped):
    exported = _exported(scraped[1])
    recorded = assets.recorded_names()
    used = assets.dashboard_metric_names() | assets.rule_metric_names()
    missing = sorted(used - recorded - assets.SYNTHETIC - set(exported))
    assert not missing, f"used in deploy/ but not in /metrics: {missing}"
    # the promtool tests feed series shaped like the real ones: real names, real label names
    for name, labels in assets.alerts_test_series():
        if name in assets.SYNTHETIC:
            continue
        assert name in exported, name
        assert labels - {"job", "instance"} <= exported[name], (name, labels, exported[name])
